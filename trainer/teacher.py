"""The teacher of `trainer distill`: an exported model run by onnxruntime in this process.

`--teacher` names one of (docs/distillation.md):
  - an .onnx file taking uint8 images [N, H, W, C] and giving probabilities [N, classes]:
    every model `exporter to-onnx` writes (a member, NAME-fused, a single model) has that
    signature (docs/design.md §3);
  - a model directory of a Triton-layout repository holding such a graph: the highest
    numbered version's model.onnx (e.g. model_repository/cifar10-fused);
  - an ensemble model directory (config.pbtxt platform "ensemble", e.g.
    model_repository/cifar10): its steps run in order as Triton runs them, each step's
    model.onnx from the same repository (its pinned version, else the highest), so the
    exporter's NAME members then NAME-average give the weighted mean of the members.
The fused graph and the ensemble give the same probabilities; the fused one is faster.

Only onnxruntime and the shared library's config.pbtxt reader are used: the trainer does
not import the exporter (the import contracts in pyproject.toml).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainer.errors import TrainerError

MODEL_FILENAME = "model.onnx"
ENSEMBLE_PLATFORM = "ensemble"
EXPECTED = (
    "expected an .onnx file whose input is uint8 images [N, H, W, C] and whose output is probabilities "
    "[N, classes] (as `exporter to-onnx` writes), or a model directory of a model repository "
    "(e.g. model_repository/NAME-fused, or the ensemble model_repository/NAME)"
)


class TeacherError(TrainerError):
    """--teacher names something that cannot teach this run (the CLI prints it on one line)."""


@dataclass
class _Step:
    """One graph of the teacher: which named tensors it reads and which it writes."""

    path: Path
    session: object  # onnxruntime.InferenceSession
    input_map: dict[str, str]  # graph input -> tensor name
    output_map: dict[str, str]  # graph output -> tensor name


@dataclass
class Teacher:
    path: Path  # what --teacher named
    kind: str  # "onnx" (one graph) or "ensemble" (steps)
    steps: list[_Step]
    input_name: str  # the tensor the images are fed as
    output_name: str  # the tensor holding the probabilities
    dataset: str | None = None  # from the exporter's metadata, when there
    class_names: list[str] | None = None  # from labels.txt or the exporter's metadata
    files: dict[str, str] = field(default_factory=dict)  # each model file -> its sha256

    @property
    def sha256(self) -> str:
        """The model file's sha256; for an ensemble, the sha256 of its files' digests in step order."""
        if len(self.files) == 1:
            return next(iter(self.files.values()))
        return hashlib.sha256("\n".join(self.files.values()).encode()).hexdigest()

    @property
    def provider(self) -> str:
        return self.steps[0].session.get_providers()[0]

    def describe(self) -> dict:
        """What config.json records about the teacher."""
        return {"path": str(self.path), "kind": self.kind, "sha256": self.sha256, "files": self.files}

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities [N, classes] (float32) for uint8 images [N, H, W, C]."""
        tensors = {self.input_name: np.ascontiguousarray(images)}
        for step in self.steps:
            feeds = {graph_input: tensors[name] for graph_input, name in step.input_map.items()}
            outputs = step.session.run(list(step.output_map), feeds)
            tensors.update(
                {step.output_map[graph_output]: value for graph_output, value in zip(step.output_map, outputs)}
            )
        return np.asarray(tensors[self.output_name], dtype=np.float32)

    def check_fits(self, dataset: str, image_shape: tuple[int, ...], class_names: list[str]) -> None:
        """Refuse a teacher for another data set, image size or class list before any work."""
        if self.dataset is not None and self.dataset != dataset:
            raise TeacherError(f"the teacher {self.path} was trained on {self.dataset}, not {dataset}")
        graph_input = next(i for step in self.steps for i in step.session.get_inputs()
                           if step.input_map.get(i.name) == self.input_name)  # fmt: skip
        dims = [d if isinstance(d, int) else None for d in graph_input.shape]
        if (
            graph_input.type != "tensor(uint8)"
            or len(dims) != 4
            or any(d is not None and d != want for d, want in zip(dims[1:], image_shape))
        ):
            shape = ", ".join(map(str, image_shape))
            raise TeacherError(f"the teacher {self.path} takes {graph_input.type} {graph_input.shape}, not the "
                               f"{dataset} images uint8 [N, {shape}]; {EXPECTED}")  # fmt: skip
        if self.class_names is not None and list(self.class_names) != list(class_names):
            raise TeacherError(f"the teacher {self.path} has classes {self.class_names}, not {dataset}'s "
                               f"{class_names}")  # fmt: skip


def load_teacher(path: str | Path, threads: int | None = None, cuda: bool = False) -> Teacher:
    """The teacher --teacher names (see the module docstring), its sessions ready to run."""
    path = Path(path)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise TeacherError("trainer distill runs its teacher with onnxruntime: pip install 'ensemble-serving[train]'")
    if path.is_file():
        if path.suffix != ".onnx":
            raise TeacherError(f"--teacher {path}: not an .onnx file; {EXPECTED}")
        in_repository = path.parent.name.isdigit()  # NAME/<version>/model.onnx: labels.txt is in NAME/
        return _single_graph(path, path, _labels_beside(path.parent.parent) if in_repository else None, threads, cuda)
    if not path.is_dir():
        raise TeacherError(f"--teacher {path}: no such file or directory; {EXPECTED}")
    if (path / "config.pbtxt").is_file() and _platform(path) == ENSEMBLE_PLATFORM:
        return _ensemble(path, threads, cuda)
    version = _latest_version(path)
    if version is None:
        raise TeacherError(f"--teacher {path}: a directory without <version>/{MODEL_FILENAME} or an ensemble "
                           f"config.pbtxt; {EXPECTED}")  # fmt: skip
    return _single_graph(path, version / MODEL_FILENAME, _labels_beside(path), threads, cuda)


def _single_graph(named: Path, model_file: Path, labels: list[str] | None, threads, cuda) -> Teacher:
    session = _session(model_file, threads, cuda)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise TeacherError(
            f"--teacher {model_file} has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); {EXPECTED}"
        )
    names = [o.name for o in outputs]
    output = "probabilities" if "probabilities" in names else names[0] if len(names) == 1 else None
    if output is None:
        raise TeacherError(
            f"--teacher {model_file} has outputs {', '.join(names)} and none named probabilities; {EXPECTED}"
        )
    step = _Step(model_file, session, {inputs[0].name: "images"}, {output: "probabilities"})
    metadata = session.get_modelmeta().custom_metadata_map
    return Teacher(named, "onnx", [step], "images", "probabilities", dataset=metadata.get("dataset"),
                   class_names=labels or _json_list(metadata.get("class_names")),
                   files=_digests([model_file]))  # fmt: skip


def _ensemble(model_dir: Path, threads, cuda) -> Teacher:
    config = _model_config(model_dir)
    repository = model_dir.parent
    steps = []
    for step in config.ensemble_scheduling.step:
        member_dir = repository / step.model_name
        version = member_dir / str(step.model_version) if step.model_version > 0 else _latest_version(member_dir)
        if version is None or not (version / MODEL_FILENAME).is_file():
            raise TeacherError(f"--teacher {model_dir}: its step {step.model_name} has no {MODEL_FILENAME} in "
                               f"{member_dir} (nested ensembles are not run); {EXPECTED}")  # fmt: skip
        session = _session(version / MODEL_FILENAME, threads, cuda)
        steps.append(_Step(version / MODEL_FILENAME, session, dict(step.input_map), dict(step.output_map)))
    if not steps or len(config.input) != 1 or len(config.output) != 1:
        raise TeacherError(f"--teacher {model_dir}: an ensemble needs steps, one input and one output; {EXPECTED}")
    available = {config.input[0].name}
    for step in steps:  # each step reads only tensors the images or earlier steps made
        graph_inputs = {i.name for i in step.session.get_inputs()}
        if set(step.input_map) != graph_inputs or not set(step.input_map.values()) <= available:
            raise TeacherError(f"--teacher {model_dir}: step {step.path} reads {sorted(step.input_map.values())}, "
                               f"not what earlier steps make; {EXPECTED}")  # fmt: skip
        available |= set(step.output_map.values())
    if config.output[0].name not in available:
        raise TeacherError(f"--teacher {model_dir}: no step makes its output {config.output[0].name}; {EXPECTED}")
    metadata = steps[0].session.get_modelmeta().custom_metadata_map
    return Teacher(model_dir, "ensemble", steps, config.input[0].name, config.output[0].name,
                   dataset=metadata.get("dataset"), class_names=_labels_beside(model_dir),
                   files=_digests([step.path for step in steps]))  # fmt: skip


def _session(model_file: Path, threads: int | None, cuda: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(str(model_file), options, providers=providers)
    except Exception as error:  # noqa: BLE001 (onnxruntime raises its own types for unreadable graphs)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TeacherError(f"--teacher {model_file}: onnxruntime cannot load it ({first_line}); {EXPECTED}") from None


def _platform(model_dir: Path) -> str:
    config = _model_config(model_dir)
    return config.platform or config.backend


def _model_config(model_dir: Path):
    from ensemble_serving.model_config import ModelConfigError, load_model_config

    try:
        return load_model_config(model_dir)
    except ModelConfigError as error:
        raise TeacherError(f"--teacher {model_dir}: {error}") from None


def _latest_version(model_dir: Path) -> Path | None:
    versions = (
        [d for d in model_dir.iterdir() if d.name.isdigit() and (d / MODEL_FILENAME).is_file()]
        if model_dir.is_dir()
        else []
    )
    return max(versions, key=lambda d: int(d.name), default=None)


def _labels_beside(model_dir: Path) -> list[str] | None:
    labels = model_dir / "labels.txt"
    return labels.read_text(encoding="utf-8").splitlines() if labels.is_file() else None


def _json_list(text: str | None) -> list[str] | None:
    try:
        value = json.loads(text) if text else None
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) else None


def _digests(files: list[Path]) -> dict[str, str]:
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


# --------------------------------------------------------------------------- running it once, cached


def teacher_probabilities(teacher: Teacher, images: np.ndarray, batch_size: int, console, what: str) -> np.ndarray:
    """The teacher's probabilities for uint8 NHWC images, in batches, with a progress bar on a terminal."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    started, out = time.perf_counter(), []
    columns = [
        TextColumn(f"teacher on {what}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("teacher", total=len(images))
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            out.append(teacher.predict(batch))
            progress.update(task, advance=len(batch))
    probs = np.concatenate(out) if out else np.zeros((0, 0), np.float32)
    if len(probs) and (probs.ndim != 2 or probs.min() < 0 or not np.allclose(probs.sum(1), 1, atol=1e-3)):
        raise TeacherError(
            f"the teacher {teacher.path} does not output probabilities (rows >= 0 summing to 1); {EXPECTED}"
        )
    seconds = time.perf_counter() - started
    rate = len(images) / max(seconds, 1e-9)
    console.print(f"teacher on {what}: {len(images):,} images in {seconds:.1f} s ({rate:,.0f}/s, {teacher.provider})")
    return probs


def fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of a split's pixels and labels: a cache made from other data is never reused."""
    digest = hashlib.sha256(np.ascontiguousarray(images).data)
    digest.update(np.ascontiguousarray(labels.astype(np.int64)).data)
    return digest.hexdigest()


def read_cache(path: Path, key: dict) -> dict[str, np.ndarray] | None:
    """The cached arrays if `path` was written for exactly `key`, else None."""
    try:
        with np.load(path) as cached:  # allow_pickle stays at its default, False: no object arrays
            if json.loads(str(cached["key"])) != key:
                return None
            return {name: cached[name] for name in cached.files if name != "key"}
    except (OSError, ValueError, KeyError):
        return None


def write_cache(path: Path, key: dict, arrays: dict[str, np.ndarray]) -> None:
    """Written beside and renamed into place, so an interrupted write leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, key=np.array(json.dumps(key, sort_keys=True)), **arrays)
    tmp.replace(path)
