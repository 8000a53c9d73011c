"""Read a Triton-layout model repository: which models exist, their configs, versions,
labels, and the order to load them in (ensemble steps before the ensemble).

    repository/
      NAME/config.pbtxt              a ModelConfig in protobuf text format
      NAME/labels.txt                optional: one class name per line (label_filename)
      NAME/<version>/model.onnx      numbered version folders (platform onnxruntime_onnx)
      ENSEMBLE/config.pbtxt          platform "ensemble" + ensemble_scheduling steps
      ENSEMBLE/1/                    (Triton wants an empty version folder; we assume 1 if absent)

Everything here is file reading and validation; no model is executed. A problem is
raised as a `RepositoryError` whose message names the model and file involved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ensemble_serving.model_config import (
    CONFIG_FILENAME,
    ModelConfig,
    ModelConfigError,
    datatype_name,
    load_model_config,
)
from ensemble_serving.tensors import DATATYPES, NUMPY_DTYPES
from server.models.autocomplete import (
    AutoComplete,
    AutoCompleteError,
    complete_backend_fields,
    complete_from_graph,
    needs_graph,
)

ONNX_PLATFORMS = {"onnxruntime_onnx"}
ONNX_BACKENDS = {"onnxruntime"}
ENSEMBLE_PLATFORM = "ensemble"
DEFAULT_MODEL_FILENAME = "model.onnx"

_OBJECT = np.dtype(object)


class RepositoryError(Exception):
    """The repository, or a model in it, cannot be served as it is."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as the config declares it."""

    name: str
    datatype: str  # protocol name: "UINT8", "FP32", ...
    dims: tuple[int, ...]  # without the batch dimension when the model batches; -1 = any size
    labels: tuple[str, ...] = ()  # class names (label_filename), outputs only

    @property
    def dtype(self) -> np.dtype:
        """How the server holds the tensor: BYTES as an object array of str (onnxruntime's
        string tensors), BF16 as uint16 bit patterns, the others as themselves."""
        return _OBJECT if self.datatype == "BYTES" else NUMPY_DTYPES[self.datatype]

    def shape(self, batching: bool) -> list[int]:
        """The full shape clients see (ModelMetadata): batch dimension -1 first when batching."""
        return [-1, *self.dims] if batching else list(self.dims)

    def describe(self, batching: bool) -> str:
        return f"{self.name!r} {self.datatype} {self.shape(batching)}"


@dataclass(frozen=True)
class EnsembleStep:
    model_name: str
    model_version: str  # "" = latest
    input_map: dict[str, str]  # step model's input -> ensemble tensor
    output_map: dict[str, str]  # step model's output -> ensemble tensor


@dataclass(frozen=True)
class ModelSpec:
    """One model of the repository, validated on its own (ensemble steps are checked by
    `check_ensembles`, which needs the other models)."""

    name: str
    directory: Path
    config: ModelConfig
    versions: tuple[str, ...]  # the versions to serve, ascending
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    steps: tuple[EnsembleStep, ...] = ()

    @property
    def platform(self) -> str:
        return ENSEMBLE_PLATFORM if self.is_ensemble else "onnxruntime_onnx"

    @property
    def is_ensemble(self) -> bool:
        return self.config.platform == ENSEMBLE_PLATFORM

    @property
    def max_batch_size(self) -> int:
        return self.config.max_batch_size

    @property
    def batching(self) -> bool:
        return self.config.max_batch_size > 0

    @property
    def latest_version(self) -> str:
        return self.versions[-1]

    def model_file(self, version: str) -> Path:
        filename = self.config.default_model_filename or DEFAULT_MODEL_FILENAME
        return self.directory / version / filename

    def dependencies(self) -> list[str]:
        return [step.model_name for step in self.steps]


def _inside(path: Path, folder: Path, what: str, model: str) -> Path:
    """`path` with links resolved, if it lies inside `folder`; a RepositoryError otherwise.

    Config fields name files (label_filename, default_model_filename): "../../x",
    an absolute path or a symbolic link must not make the server read files from
    outside the model's folder.
    """
    resolved = path.resolve()
    if not resolved.is_relative_to(folder.resolve()):
        raise RepositoryError(f"model {model!r}: {what} {path} resolves to {resolved}, outside {folder}; "
                              f"model files must live inside the model repository")
    return resolved


inside_model_folder = _inside  # for the other modules that read files a config names


def _tensor_specs(kind: str, tensors, directory: Path, model: str) -> tuple[TensorSpec, ...]:
    specs = []
    for tensor in tensors:
        try:
            datatype = datatype_name(tensor.data_type)
        except ModelConfigError as error:
            raise RepositoryError(f"model {model!r}: {kind} {tensor.name!r}: {error}") from None
        if datatype not in DATATYPES:
            raise RepositoryError(f"model {model!r}: {kind} {tensor.name!r}: datatype {datatype} is not supported "
                                  f"(served: {', '.join(DATATYPES)})")
        labels: tuple[str, ...] = ()
        label_filename = getattr(tensor, "label_filename", "")
        if label_filename:
            path = _inside(directory / label_filename, directory, "label_filename", model)
            try:
                labels = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
            except OSError as error:
                raise RepositoryError(f"model {model!r}: label_filename {path}: {error}") from None
        specs.append(TensorSpec(tensor.name, datatype, tuple(tensor.dims), labels))
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise RepositoryError(f"model {model!r}: duplicate {kind} names {names}")
    return tuple(specs)


def _available_versions(directory: Path) -> list[int]:
    return sorted(int(child.name) for child in directory.iterdir() if child.is_dir() and child.name.isdigit())


def _versions_to_serve(config: ModelConfig, available: list[int], model: str) -> tuple[str, ...]:
    """Apply the config's version_policy (Triton's default: the latest one)."""
    policy = config.version_policy.WhichOneof("policy_choice") if config.HasField("version_policy") else None
    if policy == "all":
        chosen = available
    elif policy == "specific":
        wanted = list(config.version_policy.specific.versions)
        missing = sorted(set(wanted) - set(available))
        if missing:
            raise RepositoryError(f"model {model!r}: version_policy asks for versions {missing}, "
                                  f"found version folders {available}")
        chosen = sorted(wanted)
    else:
        count = config.version_policy.latest.num_versions if policy == "latest" else 0
        chosen = available[-max(count, 1):]
    return tuple(str(version) for version in chosen)


def _read_config(directory: Path, completion: AutoComplete) -> ModelConfig:
    """The folder's config.pbtxt; an empty config to complete when there is none and
    auto-complete is on (Triton serves such a folder from its graph alone)."""
    name = directory.name
    if completion.enabled and not (directory / CONFIG_FILENAME).exists():
        return ModelConfig()
    try:
        return load_model_config(directory / CONFIG_FILENAME)
    except ModelConfigError as error:
        raise RepositoryError(f"model {name!r}: {error}{_off_hint(completion)}") from None


def _off_hint(completion: AutoComplete) -> str:
    """Said after a config that is incomplete only because auto-complete was turned off."""
    return "" if completion.enabled else " (auto-complete is off: --disable-auto-complete-config)"


def _complete(config: ModelConfig, directory: Path, version: str, completion: AutoComplete) -> None:
    """Fill what the config leaves out from the graph of `version` (server/models/autocomplete.py)."""
    if not completion.enabled or not needs_graph(config):
        return
    name = directory.name
    model_file = directory / version / (config.default_model_filename or DEFAULT_MODEL_FILENAME)
    _inside(model_file, directory, "default_model_filename", name)
    if not model_file.exists():
        raise RepositoryError(f"model {name!r} version {version}: missing {model_file}")
    try:
        complete_from_graph(config, model_file, completion.default_max_batch_size)
    except AutoCompleteError as error:
        raise RepositoryError(f"model {name!r}: {error}") from None


def read_model(directory: Path, config: ModelConfig | None = None,
               completion: AutoComplete = AutoComplete()) -> ModelSpec:  # fmt: skip
    """Parse and check one model folder; `config` replaces its config.pbtxt (a load
    request's override). What the config leaves out is completed from the ONNX graph
    unless `completion` is off."""
    name = directory.name
    if config is None:
        config = _read_config(directory, completion)
    if config.name and config.name != name:
        raise RepositoryError(f"model {name!r}: config.pbtxt says name {config.name!r}; "
                              f"it must match the folder name {name!r}")
    config.name = name
    available = _available_versions(directory)
    complete_backend_fields(config, [directory / str(version) for version in available])
    is_ensemble = config.platform == ENSEMBLE_PLATFORM
    if not is_ensemble and config.platform not in ONNX_PLATFORMS and config.backend not in ONNX_BACKENDS:
        raise RepositoryError(f"model {name!r}: platform {config.platform!r} / backend {config.backend!r} "
                              f"is not served; expected platform 'onnxruntime_onnx' or 'ensemble' "
                              f"(or a version folder holding model.onnx, to auto-complete them)")
    if config.max_batch_size < 0:
        raise RepositoryError(f"model {name!r}: max_batch_size {config.max_batch_size} must be >= 0")

    if not available and is_ensemble:
        available = [1]  # an ensemble has no files; accept a missing (empty) version folder
    if not available:
        raise RepositoryError(f"model {name!r}: no numbered version folder in {directory} (expected e.g. 1/model.onnx)")
    versions = _versions_to_serve(config, available, name)
    if not is_ensemble:
        _complete(config, directory, versions[-1], completion)

    inputs = _tensor_specs("input", config.input, directory, name)
    outputs = _tensor_specs("output", config.output, directory, name)
    if not inputs or not outputs:
        raise RepositoryError(f"model {name!r}: config.pbtxt must declare at least one input and one output"
                              f"{_off_hint(completion)}")

    steps: tuple[EnsembleStep, ...] = ()
    if is_ensemble:
        if not config.ensemble_scheduling.step:
            raise RepositoryError(f"model {name!r}: platform 'ensemble' needs ensemble_scheduling steps")
        steps = tuple(
            EnsembleStep(step.model_name, "" if step.model_version < 0 else str(step.model_version),
                         dict(step.input_map), dict(step.output_map))
            for step in config.ensemble_scheduling.step
        )
    spec = ModelSpec(name, directory, config, versions, inputs, outputs, steps)
    if not is_ensemble:
        for version in versions:
            _inside(spec.model_file(version), directory, "default_model_filename", name)
            if not spec.model_file(version).is_file():
                raise RepositoryError(f"model {name!r} version {version}: missing {spec.model_file(version)}")
    return spec


@dataclass
class Repository:
    """Every model folder found; `specs` holds those that parsed, `errors` the others."""

    root: Path
    specs: dict[str, ModelSpec]
    errors: dict[str, str]

    @property
    def names(self) -> list[str]:
        return sorted([*self.specs, *self.errors])


def scan_repository(root: str | Path, completion: AutoComplete = AutoComplete()) -> Repository:
    root = Path(root)
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} is not a directory")
    specs: dict[str, ModelSpec] = {}
    errors: dict[str, str] = {}
    for directory in sorted(root.iterdir()):
        if not directory.is_dir() or directory.name.startswith("."):
            continue
        try:
            _inside(directory, root, "folder", directory.name)
            specs[directory.name] = read_model(directory, completion=completion)
        except RepositoryError as error:
            errors[directory.name] = str(error)
    if not specs and not errors:
        raise RepositoryError(f"model repository {root} holds no model folders")
    return Repository(root, specs, errors)


def check_ensemble(spec: ModelSpec, specs: dict[str, ModelSpec]) -> None:
    """An ensemble's steps must name known models and wire tensors that exist."""
    available = {tensor.name for tensor in spec.inputs}  # tensors produced so far
    for index, step in enumerate(spec.steps):
        where = f"ensemble {spec.name!r} step {index} ({step.model_name!r})"
        member = specs.get(step.model_name)
        if member is None:
            raise RepositoryError(f"{where}: no such model in the repository")
        if spec.max_batch_size > member.max_batch_size:
            raise RepositoryError(f"{where}: the ensemble's max_batch_size {spec.max_batch_size} exceeds the "
                                  f"model's {member.max_batch_size}")
        if step.model_version and step.model_version not in member.versions:
            raise RepositoryError(f"{where}: version {step.model_version} is not served "
                                  f"(served: {', '.join(member.versions)})")
        member_inputs = {tensor.name for tensor in member.inputs}
        member_outputs = {tensor.name for tensor in member.outputs}
        if set(step.input_map) != member_inputs:
            raise RepositoryError(f"{where}: input_map covers {sorted(step.input_map)}, "
                                  f"the model's inputs are {sorted(member_inputs)}")
        for source in step.input_map.values():
            if source not in available:
                raise RepositoryError(f"{where}: input tensor {source!r} is neither an ensemble input "
                                      f"nor an output of an earlier step")
        for output in step.output_map:
            if output not in member_outputs:
                raise RepositoryError(f"{where}: output_map names {output!r}, the model's outputs are "
                                      f"{sorted(member_outputs)}")
        available.update(step.output_map.values())
    for tensor in spec.outputs:
        if tensor.name not in available:
            raise RepositoryError(f"ensemble {spec.name!r}: no step produces the output {tensor.name!r}")


def load_order(repository: Repository, wanted: tuple[str, ...] | list[str] = ()) -> list[ModelSpec]:
    """The models to load, dependencies first: `wanted` (all when empty) plus every model
    an ensemble among them needs. Raises for unknown or broken models in that set."""
    wanted = list(wanted) or repository.names
    order: list[ModelSpec] = []
    visiting: set[str] = set()

    def visit(name: str, needed_by: str | None) -> None:
        if any(spec.name == name for spec in order):
            return
        if name in repository.errors:
            raise RepositoryError(repository.errors[name])
        if name not in repository.specs:
            reason = f"needed by ensemble {needed_by!r}" if needed_by else "asked for with --model"
            raise RepositoryError(f"model {name!r} ({reason}) is not in {repository.root}; "
                                  f"found: {', '.join(repository.names)}")
        if name in visiting:
            raise RepositoryError(f"ensemble {name!r} depends on itself")
        visiting.add(name)
        spec = repository.specs[name]
        for dependency in spec.dependencies():
            visit(dependency, name)
        if spec.is_ensemble:
            check_ensemble(spec, repository.specs)
        visiting.discard(name)
        order.append(spec)

    for name in wanted:
        visit(name, None)
    return order


def load_order_skipping_broken(repository: Repository, wanted: tuple[str, ...] | list[str] = ()
                               ) -> tuple[list[ModelSpec], dict[str, str]]:  # fmt: skip
    """`load_order`, except that a broken model, and every ensemble that needs it, is left
    out and returned in {name: reason} instead of failing the whole set (the server's
    default; `--strict` uses `load_order`). A name not in the repository at all is still
    an error: that is a typo in --model, not a broken model."""
    order: list[ModelSpec] = []
    failed: dict[str, str] = {}
    for name in list(wanted) or repository.names:
        if name not in repository.specs and name not in repository.errors:
            load_order(repository, [name])  # raises, naming the models that do exist
        try:
            specs = load_order(repository, [name])
        except RepositoryError as error:
            own_error = name in repository.errors
            failed[name] = str(error) if own_error else f"model {name!r} needs a model that cannot load: {error}"
            continue
        loaded = {spec.name for spec in order}
        order.extend(spec for spec in specs if spec.name not in loaded)
    return order, failed
