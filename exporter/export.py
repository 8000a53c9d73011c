"""Run dirs -> a checked, Triton-layout model repository: the exporter's one public function.

    result = export_repository(["runs/mnist-s0", "runs/mnist-s1"], "model_repository", "mnist")

writes (for two or more run dirs)
    mnist-m0, mnist-m1, ...   the members (ONNX, images -> probabilities)
    mnist-average             N probability inputs -> their (weighted) mean (ONNX)
    mnist                     platform "ensemble": every member, then the average
    mnist-fused               (fused=True) one ONNX graph holding all members and the mean
    <model>-int8              (quantize="int8") int8 members, and for an ensemble mnist-int8
and for a single run dir one model named `name` (plus `name`-int8).

The ensemble's weights (exporter.weights) are uniform, given, or fitted on the validation
split every member held out; non-uniform ones are recorded in weights.json beside
mnist-average (and mnist-fused) with their validation figures.

Every ONNX model is checked against PyTorch before anything is written: parity at
batch sizes 1 and 64 (max |diff| <= 1e-4 and identical argmax), the ensemble against
the weighted mean of the PyTorch members. Any failure raises an ExportError subclass
and leaves the repository untouched (see repository.StagedRepository).

The plan (which names get written), the option checks and the result types are in
exporter.plan; their public names are re-exported here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from exporter import average, onnx_export, parity
from exporter import quantize as quantization
from exporter import weights as ensemble_weights
from exporter.errors import ExportError, ParityError
from exporter.plan import (  # public names re-exported for callers
    QUANTIZE_MODES,
    ExportResult,
    Plan,
    Steps,
    WrittenModel,
    _check_options,
    _count_steps,
    _NoProgress,
    plan_names,
)
from exporter.repository import (
    DEFAULT_MAX_QUEUE_DELAY_US,
    ENSEMBLE_PLATFORM,
    ONNX_PLATFORM,
    VERSION,
    StagedRepository,
    VersionChoice,
    average_config,
    ensemble_config,
    member_config,
    refuse_existing_message,
)
from exporter.run_dirs import Member, check_run_dirs, load_member, weights_sha256
from exporter.weights import FIT, UNIFORM, WEIGHTS_FILENAME, WeightsChoice

PARITY_FILENAME = "parity.json"
QUANTIZATION_FILENAME = "quantization.json"


def export_repository(
    run_dirs: list[str | Path],
    repository: str | Path,
    name: str,
    *,
    weights: str | list[float] | None = None,
    fused: bool = False,
    overwrite: bool = False,
    data_dir: str | Path | None = None,
    max_batch_size: int = 64,
    quantize: str | None = None,
    max_accuracy_drop: float = 0.5,
    instance_kind: str = "cpu",
    instances: int = 1,
    max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US,
    version: int | None = None,
    next_version: bool = False,
    progress: Steps | None = None,
) -> ExportResult:
    """Export run dirs into `repository` as model(s) named after `name` (see the module docstring).
    With `version` or `next_version`, add that version to the models instead of replacing
    them (exporter.repository: the version folder is renamed into place). `weights`: None or
    "uniform", "fit" (on the members' validation split) or one number per run dir (exporter.weights)."""
    progress = progress or _NoProgress()
    run_dirs = [Path(run_dir) for run_dir in run_dirs]
    _check_options(run_dirs, fused, max_batch_size, quantize, max_accuracy_drop, instance_kind, instances)
    plan = plan_names(name, len(run_dirs), fused, quantize)
    choice = ensemble_weights.choose(weights, len(run_dirs))
    progress.begin(_count_steps(len(run_dirs), fused, quantize, weigh=bool(plan.ensemble) and choice.mode != UNIFORM))
    add_version = version is not None or next_version
    if add_version and overwrite:
        raise ExportError("--overwrite replaces whole models; --version / --next-version adds a version: choose one")
    versioned = [model for model in plan.all_names if model not in (plan.ensemble, plan.int8_ensemble)]
    folder = VersionChoice(version, next_version).resolve(Path(repository).resolve(), versioned) if add_version \
        else VERSION

    with StagedRepository(repository, folder, add_version) as staged:
        clashes = [] if add_version else staged.existing(plan.all_names)
        if clashes and not overwrite:  # fail before minutes of work, and again at commit
            raise ExportError(refuse_existing_message(staged.repository, clashes))
        exporter = _Exporter(staged, plan, choice, data_dir, progress,
                             dict(max_batch_size=max_batch_size, instance_kind=instance_kind,
                                  instances=instances, max_queue_delay_us=max_queue_delay_us))  # fmt: skip
        exporter.run(run_dirs, quantize, max_accuracy_drop)
        progress.step(f"moving {len(plan.all_names)} model(s) into {staged.repository}")
        staged.commit(overwrite)
        return ExportResult(staged.repository, name, exporter.written)


class WeightedEnsemble(torch.nn.Module):
    """The PyTorch side of the fused graph: the weighted mean of the members' probabilities."""

    def __init__(self, members: list[torch.nn.Module], weights: list[float]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.weights = [float(weight) for weight in weights]  # constants in the graph

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return sum(weight * member(images) for weight, member in zip(self.weights, self.members))


class _Exporter:
    """One export run: holds the members, the parity images and what has been staged so far."""

    def __init__(self, staged: StagedRepository, plan: Plan, choice: WeightsChoice, data_dir, progress: Steps,
                 runtime_options: dict):  # fmt: skip
        self.staged, self.plan, self.choice = staged, plan, choice
        self.weights = choice.weights  # None until fitted (--weights fit)
        self.validation: ensemble_weights.ValidationSet | None = None  # for non-uniform weights
        self.why_no_validation = ""
        self.weights_report: dict | None = None  # weights.json, for non-uniform weights
        self.data_dir, self.progress, self.runtime_options = data_dir, progress, runtime_options
        self.written: list[WrittenModel] = []
        self.member_bytes: list[bytes] = []
        self.torch_outputs: list[dict[int, np.ndarray]] = []  # per member, per batch size
        self.onnx_outputs: list[dict[int, np.ndarray]] = []

    # ----------------------------------------------------------------- the whole run

    def run(self, run_dirs: list[Path], quantize: str | None, max_accuracy_drop: float) -> None:
        self.members = self._load(run_dirs)
        first = self.members[0]
        self.input_shape, self.class_names = first.input_shape, first.class_names
        self.images = parity.parity_images(first.dataset, self.input_shape, self.data_dir)
        for index, member in enumerate(self.members):
            self._export_member(member, self.plan.members[index])
        if self.plan.ensemble:
            self._choose_weights()
            self._export_average_and_ensemble()
        if self.plan.fused:
            self._export_fused()
        if quantize == "int8":
            self._export_int8(max_accuracy_drop)

    def _load(self, run_dirs: list[Path]) -> list[Member]:
        runs = check_run_dirs(run_dirs)  # all configs first: a bad last run dir fails before any work
        self._find_validation(runs)  # and --weights fit without a shared validation split
        members = []
        for run_dir, config in runs:
            self.progress.step(f"loading {run_dir}")
            members.append(load_member(run_dir, config))
        return members

    # ----------------------------------------------------------------- members

    def _export_member(self, member: Member, model_name: str) -> None:
        self.progress.step(f"{model_name}: exporting {member.run_dir.name} to ONNX")
        model = onnx_export.export_module(member.module, self.input_shape)
        self.progress.step(f"{model_name}: parity, onnxruntime vs PyTorch")
        torch_out = parity.run_at_batch_sizes(member.predict, self.images.images)
        onnx_out = parity.run_at_batch_sizes(parity.session_predictor(parity.cpu_session(onnx_export.serialize(model))),
                                             self.images.images)  # fmt: skip
        report = parity.parity_report(
            torch_out, onnx_out, model=model_name,
            reference_name=f"PyTorch {torch.__version__} (trainer.checkpoint.load_serving_model, CPU)",
            candidate_name=parity.runtime_name(), images=self.images.description,
        )  # fmt: skip
        report["source_run"] = str(member.run_dir.resolve())
        _refuse_if_failed(report)
        onnx_export.set_metadata(model, self._member_metadata(member, _parity_summary(report)))
        model_bytes = onnx_export.serialize(model)
        self.member_bytes.append(model_bytes)
        self.torch_outputs.append(torch_out)
        self.onnx_outputs.append(onnx_out)
        config = member_config(model_name, self.input_shape, len(self.class_names), **self.runtime_options)
        self._write(model_name, "member", config, model_bytes, {PARITY_FILENAME: report})

    def _member_metadata(self, member: Member, parity_summary: dict | str) -> dict:
        config = member.config
        return {
            "dataset": config["dataset"],
            "class_names": config["class_names"],
            "source_run": str(member.run_dir.resolve()),
            "source_weights_sha256": weights_sha256(member.run_dir),
            "architecture": config["architecture"],
            "input": {"name": "images", "dtype": "uint8", "layout": "NHWC", "shape": ["batch", *self.input_shape]},
            "normalization": config["normalization"],
            "trainer_metrics": config.get("metrics", {}),
            "parity": parity_summary,
            "exporter": _exporter_note(),
        }

    # ----------------------------------------------------------------- ensemble weights

    def _find_validation(self, runs: list[tuple[Path, dict]]) -> None:
        if self.choice.mode == UNIFORM or not self.plan.ensemble:
            return
        try:
            self.validation = ensemble_weights.validation_set(runs, self.data_dir)
        except ExportError as error:
            if self.choice.mode == FIT:
                raise ExportError(f"--weights fit: {error}") from None
            self.why_no_validation = str(error)  # given weights need no validation; weights.json says why none

    def _choose_weights(self) -> None:
        """Fit the weights (--weights fit) and, given a validation split, measure them and uniform on it."""
        if self.choice.mode == UNIFORM:
            return
        what = "fitting the weights" if self.choice.mode == FIT else "the given weights"
        where = f"on {len(self.validation.labels)} validation images" if self.validation else "(no validation split)"
        self.progress.step(f"{self.plan.average}: {what} {where}")
        members = [(name, member.run_dir) for name, member in zip(self.plan.members, self.members)]
        self.weights, self.weights_report = ensemble_weights.settle(
            self.choice, members, self.member_bytes, self.validation, self.why_no_validation
        )

    def _weights_files(self) -> dict[str, dict]:
        return {WEIGHTS_FILENAME: self.weights_report} if self.weights_report else {}

    def _weights_metadata(self) -> dict:
        return {} if self.choice.mode == UNIFORM else {"weights_mode": self.choice.mode}

    # ----------------------------------------------------------------- average + ensemble

    def _export_average_and_ensemble(self) -> None:
        plan = self.plan
        self.progress.step(f"{plan.average} + {plan.ensemble}: averaging graph vs numpy, ensemble vs PyTorch mean")
        model = average.build_average_model(self.weights, len(self.class_names))
        onnx_export.set_metadata(model, {"members": plan.members, "weights": self.weights, **self._weights_metadata(),
                                         "exporter": _exporter_note()})  # fmt: skip
        average_bytes = onnx_export.serialize(model)
        session = parity.cpu_session(average_bytes)
        feeds = lambda outputs: {average.member_output_name(i): p for i, p in enumerate(outputs)}  # noqa: E731

        # The averaging graph alone, on the members' onnxruntime outputs, against numpy.
        sizes = self.onnx_outputs[0].keys()
        numpy_mean = {s: average.average_numpy([out[s] for out in self.onnx_outputs], self.weights) for s in sizes}
        graph_mean = {s: session.run(None, feeds([out[s] for out in self.onnx_outputs]))[0] for s in sizes}
        average_report = parity.parity_report(
            numpy_mean, graph_mean, model=plan.average, reference_name="numpy weighted mean of the members' outputs",
            candidate_name=parity.runtime_name(), images=self.images.description,
        )  # fmt: skip
        average_report["weights"] = self.weights
        _refuse_if_failed(average_report)

        # The ensemble as Triton runs it (members, then the average) against the PyTorch members' mean.
        member_sessions = [parity.session_predictor(parity.cpu_session(b)) for b in self.member_bytes]

        def ensemble_predict(images: np.ndarray) -> np.ndarray:
            return session.run(None, feeds([predict(images) for predict in member_sessions]))[0]

        ensemble_report = self._ensemble_parity(plan.ensemble, ensemble_predict, "members then average")
        self._write(plan.average, "average",
                    average_config(plan.average, len(plan.members), len(self.class_names), **self.runtime_options),
                    average_bytes, {PARITY_FILENAME: average_report, **self._weights_files()})  # fmt: skip
        self._write(plan.ensemble, "ensemble",
                    ensemble_config(plan.ensemble, plan.members, plan.average, self.input_shape, len(self.class_names),
                                    max_batch_size=self.runtime_options["max_batch_size"]),
                    None, {PARITY_FILENAME: ensemble_report})  # fmt: skip

    def _ensemble_parity(self, model_name: str, predict, how: str) -> dict:
        reference = {s: average.average_numpy([out[s] for out in self.torch_outputs], self.weights)
                     for s in self.torch_outputs[0]}  # fmt: skip
        report = parity.parity_report(
            reference, parity.run_at_batch_sizes(predict, self.images.images), model=model_name,
            reference_name=f"weighted mean of the PyTorch {torch.__version__} members",
            candidate_name=f"{parity.runtime_name()} ({how})", images=self.images.description,
        )  # fmt: skip
        report["members"] = self.plan.members
        report["weights"] = self.weights
        _refuse_if_failed(report)
        return report

    # ----------------------------------------------------------------- fused

    def _export_fused(self) -> None:
        name = self.plan.fused
        self.progress.step(f"{name}: exporting all members and the mean as one graph")
        fused = WeightedEnsemble([member.module for member in self.members], self.weights).eval()
        model = onnx_export.export_module(fused, self.input_shape)
        self.progress.step(f"{name}: parity vs the PyTorch members' mean")
        predict = parity.session_predictor(parity.cpu_session(onnx_export.serialize(model)))
        report = self._ensemble_parity(name, predict, "one fused graph")
        onnx_export.set_metadata(model, {
            "dataset": self.members[0].dataset, "class_names": self.class_names,
            "source_runs": [str(member.run_dir.resolve()) for member in self.members],
            "weights": self.weights, **self._weights_metadata(), "parity": _parity_summary(report),
            "exporter": _exporter_note(),
        })  # fmt: skip
        config = member_config(name, self.input_shape, len(self.class_names), **self.runtime_options)
        reports = {PARITY_FILENAME: report, **self._weights_files()}
        self._write(name, "fused", config, onnx_export.serialize(model), reports)

    # ----------------------------------------------------------------- int8

    def _export_int8(self, max_accuracy_drop: float) -> None:
        self.progress.step("int8: reading calibration (training) and evaluation (validation or test) images")
        data = quantization.quantization_data(self.members[0].config, self.data_dir)
        float_probs, int8_probs = [], []
        for index, name in enumerate(self.plan.int8_members):
            self.progress.step(f"{name}: static QDQ quantization")
            int8_bytes = quantization.quantize_int8(self.member_bytes[index], data.calibration)
            self.progress.step(f"{name}: accuracy and speed vs fp32")
            report, member_float, member_int8 = quantization.evaluate_int8(
                self.member_bytes[index], int8_bytes, data, max_accuracy_drop, name
            )
            quantization.refuse_if_too_inaccurate(report)
            report["source_run"] = str(self.members[index].run_dir.resolve())
            float_probs.append(member_float)
            int8_probs.append(member_int8)
            model = _load_model(int8_bytes)
            onnx_export.set_metadata(model, {
                **self._member_metadata(self.members[index], "not applicable: int8 is checked by accuracy, see quantization"),
                "quantization": _quantization_summary(report),
            })  # fmt: skip
            config = member_config(name, self.input_shape, len(self.class_names), **self.runtime_options)
            self._write(name, "int8", config, onnx_export.serialize(model), {QUANTIZATION_FILENAME: report})
        if self.plan.int8_ensemble:
            self._write_int8_ensemble(data, float_probs, int8_probs, max_accuracy_drop)

    def _write_int8_ensemble(self, data, float_probs, int8_probs, max_accuracy_drop: float) -> None:
        name = self.plan.int8_ensemble
        self.progress.step(f"{name}: ensemble accuracy, int8 vs fp32")
        report = quantization.accuracy_report(
            name, average.average_numpy(float_probs, self.weights), average.average_numpy(int8_probs, self.weights),
            data, max_accuracy_drop,
        )  # fmt: skip
        report["members"] = self.plan.int8_members
        quantization.refuse_if_too_inaccurate(report)
        config = ensemble_config(name, self.plan.int8_members, self.plan.average, self.input_shape,
                                 len(self.class_names), max_batch_size=self.runtime_options["max_batch_size"])  # fmt: skip
        self._write(name, "int8-ensemble", config, None, {QUANTIZATION_FILENAME: report})

    # ----------------------------------------------------------------- staging

    def _write(self, name: str, kind: str, config, model_bytes: bytes | None, reports: dict[str, dict]) -> None:
        path = self.staged.write_model(name, config, self.class_names, model_bytes=model_bytes, reports=reports)
        platform = ENSEMBLE_PLATFORM if model_bytes is None else ONNX_PLATFORM
        self.written.append(WrittenModel(name, kind, platform, path, reports))


def _refuse_if_failed(report: dict) -> None:
    if not report["passed"]:
        raise ParityError(parity.failure_summary(report))


def _parity_summary(report: dict) -> dict:
    return {
        "max_abs_diff": report["max_abs_diff"],
        "argmax_agreement": report["argmax_agreement"],
        "by_batch_size": {size: {"max_abs_diff": entry["max_abs_diff"], "argmax_agreement": entry["argmax_agreement"],
                                 "images": entry["images"]} for size, entry in report["batch_sizes"].items()},
        "images": report["images"]["source"],
        "tolerance": report["tolerance"],
        "runtime": report["candidate"],
    }  # fmt: skip


def _quantization_summary(report: dict) -> dict:
    keep = ("accuracy_fp32", "accuracy_int8", "accuracy_change_points", "evaluated_on", "method")
    return {key: report[key] for key in keep} | {"timing": report.get("timing")}


def _exporter_note() -> str:
    return f"ensemble-serving exporter (torch.onnx dynamo exporter, torch {torch.__version__}, opset {onnx_export.OPSET})"


def _load_model(model_bytes: bytes):
    import onnx

    return onnx.load_from_string(model_bytes)
