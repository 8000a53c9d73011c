"""Ensemble weights (`exporter to-onnx --weights`): uniform, given, or fitted on validation images.

    uniform    1/N each (the default)
    0.3,0.7    given: one non-negative number per run dir, normalized to sum 1
    fit        the weights w >= 0, sum_k w_k = 1, that minimise the negative log-likelihood of
               the weighted mean sum_k w_k p_k on the validation images the members held out

The fit. With p_ik member k's probability of the true class of validation image i,
NLL(w) = -mean_i log(sum_k w_k p_ik) is convex in w, so its local minimum on the simplex
is the global one. We use the EM update of the weights of a mixture with fixed
components, w_k <- w_k * r_k with r_k = mean_i p_ik / sum_j w_j p_ij: it keeps w on the
simplex, never increases the NLL (so, starting from uniform, the fit is never worse than
uniform on these images) and needs no step size. It stops when the Frank-Wolfe gap
max_k r_k - 1, an upper bound on NLL(w) - min NLL, is below GAP_TOLERANCE.

The validation images are the trainer's split (exporter.validation), and every member
must have held out the same one: weights fitted on images a member trained on would
favour that member. The member probabilities are those of the exported ONNX members in
onnxruntime, the graphs the served ensemble runs (parity ties them to PyTorch anyway).
The figures are in-sample for `fit`: the weights were chosen on these very images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exporter.errors import ExportError

WEIGHTS_FILENAME = "weights.json"
UNIFORM, FIT, GIVEN = "uniform", "fit", "given"
EPSILON = 1e-12  # floor for a probability before its log (float32 softmax can underflow to 0)
GAP_TOLERANCE = 1e-7  # nats: the fit is within this of the minimum NLL
MAX_ITERATIONS = 20_000


# --------------------------------------------------------------------------- which weights


@dataclass(frozen=True)
class WeightsChoice:
    mode: str  # UNIFORM | FIT | GIVEN
    weights: list[float] | None  # normalized; None for FIT until fitted


def parse_option(text: str) -> str | list[float]:
    """--weights text -> 'uniform', 'fit' or the numbers (ValueError says what is wrong)."""
    word = text.strip().lower()
    if word in (UNIFORM, FIT):
        return word
    values = []
    for part in text.split(","):
        try:
            values.append(float(part))
        except ValueError:
            raise ValueError(f"{part.strip()!r} is not a number; expected 'uniform', 'fit' or comma-separated "
                             f"non-negative numbers, one per run dir (e.g. 0.3,0.7)") from None  # fmt: skip
    return values


def weights_problem(values: list[float], num_members: int) -> str | None:
    """What is wrong with given weights (a phrase that follows them), or None."""
    if len(values) != num_members:
        return f"has {len(values)} values for {num_members} run dirs (expected one weight per run dir, in their order)"
    if any(not math.isfinite(value) for value in values):
        return "has a value that is not a finite number (expected non-negative numbers with a positive sum)"
    negative = [value for value in values if value < 0]
    if negative:
        return f"has a negative weight {negative[0]:g} (expected non-negative numbers with a positive sum)"
    if sum(values) <= 0:
        return "sums to 0 (expected non-negative numbers with a positive sum)"
    return None


def normalize_weights(weights: list[float] | None, num_members: int) -> list[float]:
    """None -> equal weights; otherwise check count and sign, and scale to sum 1."""
    if weights is None:
        return [1.0 / num_members] * num_members
    values = [float(value) for value in weights]
    problem = weights_problem(values, num_members)
    if problem:
        raise ExportError(f"--weights {problem}")
    total = math.fsum(values)
    return [value / total for value in values]


def choose(weights: str | list[float] | None, num_members: int) -> WeightsChoice:
    """export_repository's `weights`: None / 'uniform', 'fit', or the numbers."""
    if weights is None or (isinstance(weights, str) and weights.strip().lower() == UNIFORM):
        return WeightsChoice(UNIFORM, normalize_weights(None, num_members))
    if isinstance(weights, str):
        try:
            weights = parse_option(weights)
        except ValueError as error:
            raise ExportError(f"--weights {error}") from None
        if weights == FIT:
            if num_members < 2:
                raise ExportError("--weights fit needs at least two run dirs (a single model has no ensemble weights)")
            return WeightsChoice(FIT, None)
    return WeightsChoice(GIVEN, normalize_weights(list(weights), num_members))


# --------------------------------------------------------------------------- the validation images


@dataclass(frozen=True)
class ValidationSet:
    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray
    description: dict


def validation_set(runs: list[tuple[Path, dict]], data_dir=None) -> ValidationSet:
    """The validation split every member held out (ExportError if they differ or have none)."""
    from exporter.validation import split_settings, trainer_split

    first_dir, first = runs[0]
    for run_dir, config in runs:
        val_fraction, split_seed = split_settings(config)
        if val_fraction <= 0:
            raise ExportError(
                f"{run_dir} was trained without a validation split (val_fraction 0), so there are no held-out images "
                "to fit or judge ensemble weights on; retrain the members with the same --val-fraction > 0 and --split-seed"
            )
        if (val_fraction, split_seed) != split_settings(first):
            raise ExportError(
                f"{run_dir} held out val_fraction {val_fraction} with split_seed {split_seed}, {first_dir} "
                f"val_fraction {split_settings(first)[0]} with split_seed {split_settings(first)[1]}: the members "
                "must share one validation split (the same --val-fraction and --split-seed), or some would have "
                "trained on the images their weights are judged on"
            )
    split = trainer_split(first, data_dir, needed_by="the validation split")
    return ValidationSet(
        images=split.train.images[split.val_idx],
        labels=split.train.labels[split.val_idx],
        description={
            "dataset": first["dataset"], "split": "validation part of the training set",
            "val_fraction": split.val_fraction, "split_seed": split.split_seed,
            "images": len(split.val_idx), "data_dir": str(split.data_dir),
        },
    )  # fmt: skip


# --------------------------------------------------------------------------- the fit


@dataclass(frozen=True)
class Fit:
    weights: list[float]
    nll: float
    iterations: int
    gap: float  # upper bound on nll - the minimum
    converged: bool


def true_class_probabilities(member_probabilities: list[np.ndarray], labels: np.ndarray) -> np.ndarray:
    """[N, K] float64: member k's probability of image i's true class, floored at EPSILON."""
    rows = np.arange(len(labels))
    columns = [np.asarray(probabilities, dtype=np.float64)[rows, labels] for probabilities in member_probabilities]
    return np.maximum(np.stack(columns, axis=1), EPSILON)


def mixture_nll(true_class: np.ndarray, weights) -> float:
    """Mean negative log-likelihood (nats) of the weighted mean, from true_class_probabilities."""
    return float(-np.log(true_class @ np.asarray(weights, dtype=np.float64)).mean())


def fit_weights(member_probabilities: list[np.ndarray], labels: np.ndarray, *, tolerance: float = GAP_TOLERANCE,
                max_iterations: int = MAX_ITERATIONS) -> Fit:  # fmt: skip
    """Simplex weights minimising the NLL of the weighted mean (EM, see the module docstring)."""
    if len(labels) == 0:
        raise ExportError("no validation images to fit ensemble weights on")
    true_class = true_class_probabilities(member_probabilities, labels)
    weights = np.full(true_class.shape[1], 1.0 / true_class.shape[1])
    iterations = 0
    while True:
        ratios = (true_class / (true_class @ weights)[:, None]).mean(axis=0)
        gap = float(ratios.max() - 1.0)
        if gap <= tolerance or iterations == max_iterations:
            break
        weights = weights * ratios
        weights /= weights.sum()
        iterations += 1
    return Fit(weights.tolist(), mixture_nll(true_class, weights), iterations, max(gap, 0.0), gap <= tolerance)


# --------------------------------------------------------------------------- weights.json

VALIDATION_BATCH = 256


def settle(choice: WeightsChoice, members: list[tuple[str, Path]], member_bytes: list[bytes],
           validation: ValidationSet | None, why_no_validation: str = "") -> tuple[list[float], dict]:  # fmt: skip
    """The weights for the averaging model (fitted for FIT) and weights.json: the exported members
    run in onnxruntime on the validation images, when there are any."""
    if validation is None:
        return choice.weights, weights_report(choice, choice.weights, members, why_no_validation=why_no_validation)
    from exporter.parity import cpu_session, predict_in_batches, runtime_name, session_predictor

    probabilities = [predict_in_batches(session_predictor(cpu_session(model_bytes)), validation.images,
                                        VALIDATION_BATCH) for model_bytes in member_bytes]  # fmt: skip
    fit = fit_weights(probabilities, validation.labels) if choice.mode == FIT else None
    weights = fit.weights if fit else choice.weights
    report = weights_report(choice, weights, members, validation=validation, member_probabilities=probabilities,
                            fit=fit, probabilities_from=f"the exported member models, {runtime_name()}")  # fmt: skip
    return weights, report


def figures(member_probabilities: list[np.ndarray], labels: np.ndarray, weights: list[float]) -> dict:
    """Validation NLL and accuracy of the weighted mean (computed in float64)."""
    mean = sum(w * np.asarray(p, dtype=np.float64) for w, p in zip(weights, member_probabilities))
    true_class = true_class_probabilities(member_probabilities, labels)
    return {"weights": list(weights), "val_nll": mixture_nll(true_class, weights),
            "val_accuracy": float((mean.argmax(axis=1) == labels).mean())}  # fmt: skip


def weights_report(choice: WeightsChoice, weights: list[float], members: list[tuple[str, Path]], *,
                   validation: ValidationSet | None = None, member_probabilities: list[np.ndarray] | None = None,
                   fit: Fit | None = None, probabilities_from: str = "", why_no_validation: str = "") -> dict:  # fmt: skip
    """weights.json: the weights the averaging model holds and, where there is a validation split, its figures."""
    report = {"mode": choice.mode, "weights": list(weights),
              "members": [{"model": name, "source_run": str(Path(run).resolve()), "weight": weight}
                          for (name, run), weight in zip(members, weights)]}  # fmt: skip
    if validation is None:
        return report | {"validation": None, "why_no_validation": why_no_validation}
    labels = validation.labels
    for index, entry in enumerate(report["members"]):
        one_hot = [1.0 if k == index else 0.0 for k in range(len(members))]
        member = figures(member_probabilities, labels, one_hot)
        entry |= {"val_accuracy": member["val_accuracy"], "val_nll": member["val_nll"]}
    report["validation"] = validation.description | {"probabilities_from": probabilities_from}
    report["uniform"] = figures(member_probabilities, labels, normalize_weights(None, len(members)))
    report["chosen"] = figures(member_probabilities, labels, weights)
    if fit is not None:
        report["fit"] = {
            "objective": "mean negative log-likelihood (nats) of the weighted mean of the members' probabilities",
            "method": "EM for mixture weights from uniform (w >= 0, sum 1), stopped on the Frank-Wolfe gap",
            "iterations": fit.iterations, "converged": fit.converged, "suboptimality_bound": fit.gap,
            "note": "in-sample: the weights were fitted on these validation images; judge them on the test split",
        }  # fmt: skip
    return report
