"""Ensemble weights (`exporter to-onnx --weights uniform|fit|W1,W2,...`): the optimiser, the export, the refusals.

The optimiser is checked on synthetic probabilities (a planted best member, a known
interior optimum, a brute-force grid). The export is real, on tiny generated data: one
one-epoch trainer run is the good member, and copies of it whose output layer is rolled
(so they name the wrong class) are the planted bad ones; all of them share the run's
validation split.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from ensemble_serving.datasets import load_dataset
from exporter import weights as ensemble_weights
from exporter.cli import main
from exporter.errors import ExportError
from exporter.export import export_repository
from tests.support.tiny_pipeline import train_tiny_run, write_digit_like_data

pytestmark = [
    pytest.mark.filterwarnings("ignore::ensemble_serving.datasets.DatasetChecksumWarning"),
    pytest.mark.usefixtures("few_threads"),
    pytest.mark.torch_threads(1),
]


# --------------------------------------------------------------------------- the optimiser, on synthetic probabilities


def _random_probabilities(rng, images: int, classes: int, concentration: float = 1.0) -> np.ndarray:
    return rng.dirichlet(np.full(classes, concentration), size=images).astype(np.float32)


def _confident(labels: np.ndarray, classes: int, right: float) -> np.ndarray:
    probabilities = np.full((len(labels), classes), (1 - right) / (classes - 1), dtype=np.float32)
    probabilities[np.arange(len(labels)), labels] = right
    return probabilities


def test_fit_puts_the_weight_on_a_planted_best_member():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 500)
    members = [_random_probabilities(rng, 500, 10), _confident(labels, 10, 0.8), _random_probabilities(rng, 500, 10)]
    fit = ensemble_weights.fit_weights(members, labels)
    assert fit.converged and fit.gap <= ensemble_weights.GAP_TOLERANCE
    assert fit.weights[1] > 0.99 and min(fit.weights) >= 0 and sum(fit.weights) == pytest.approx(1.0)
    true_class = ensemble_weights.true_class_probabilities(members, labels)
    assert fit.nll <= ensemble_weights.mixture_nll(true_class, [1 / 3] * 3)
    assert fit.nll == pytest.approx(-np.log(0.8), abs=1e-4)


def test_fit_finds_an_interior_optimum_of_complementary_members():
    # Each member is right on its own half of the images and uniform elsewhere: neither alone, but half each.
    labels = np.arange(400) % 4
    first = np.where(np.arange(400)[:, None] < 200, _confident(labels, 4, 0.97), 0.25).astype(np.float32)
    second = np.where(np.arange(400)[:, None] >= 200, _confident(labels, 4, 0.97), 0.25).astype(np.float32)
    fit = ensemble_weights.fit_weights([first, second], labels)
    assert fit.converged
    np.testing.assert_allclose(fit.weights, [0.5, 0.5], atol=1e-4)
    true_class = ensemble_weights.true_class_probabilities([first, second], labels)
    assert fit.nll < min(ensemble_weights.mixture_nll(true_class, w) for w in ([1, 0], [0, 1]))


def test_fit_is_no_worse_than_any_point_of_a_grid_on_the_simplex():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, 300)
    members = [_random_probabilities(rng, 300, 5, concentration) for concentration in (0.3, 1.0, 3.0)]
    members[0][np.arange(150), labels[:150]] += 1.0  # make the problem less symmetric
    members[0] /= members[0].sum(axis=1, keepdims=True)
    fit = ensemble_weights.fit_weights(members, labels)
    true_class = ensemble_weights.true_class_probabilities(members, labels)
    steps = np.linspace(0, 1, 51)
    grid = min(ensemble_weights.mixture_nll(true_class, [a, b, 1 - a - b]) for a in steps for b in steps if a + b <= 1)
    assert fit.nll <= grid + 1e-9
    assert fit.nll >= grid - fit.gap - 0.05  # the gap bounds the distance to the optimum; the grid is coarse


def test_fit_survives_probabilities_that_underflow_to_zero():
    labels = np.array([0, 1, 2, 0])
    members = [np.eye(3, dtype=np.float32)[[1, 2, 0, 1]], np.eye(3, dtype=np.float32)[labels]]
    fit = ensemble_weights.fit_weights(members, labels)
    assert np.isfinite(fit.nll) and fit.weights[1] > 0.999


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("uniform", "uniform"), ("FIT", "fit"), (" 0.3, 0.7", [0.3, 0.7]), ("1,3", [1.0, 3.0])],
)
def test_parse_option(text, parsed):
    assert ensemble_weights.parse_option(text) == parsed


def test_choose_normalizes_given_weights_and_refuses_fit_for_one_run_dir():
    assert ensemble_weights.choose(None, 4) == ensemble_weights.WeightsChoice("uniform", [0.25] * 4)
    assert ensemble_weights.choose("uniform", 2).weights == [0.5, 0.5]
    assert ensemble_weights.choose([1, 3], 2) == ensemble_weights.WeightsChoice("given", [0.25, 0.75])
    assert ensemble_weights.choose("fit", 2) == ensemble_weights.WeightsChoice("fit", None)
    with pytest.raises(ExportError, match="--weights fit needs at least two run dirs"):
        ensemble_weights.choose("fit", 1)


# --------------------------------------------------------------------------- tiny runs: one good member, planted bad ones


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_digit_like_data(tmp_path_factory.mktemp("data"))


def _rolled_copy(run_dir: Path, target: Path, shift: int) -> Path:
    """The same network with its output layer's rows rolled: it names class c+shift where the original names c."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(run_dir, target)
    state = load_file(run_dir / "model.safetensors")
    last = max((key for key in state if key.startswith("classifier.") and key.endswith(".weight")),
               key=lambda key: int(key.split(".")[1]))  # fmt: skip
    for key in (last, last.replace(".weight", ".bias")):
        state[key] = torch.roll(state[key], shift, dims=0).contiguous()
    save_file(state, target / "model.safetensors")
    return target


@pytest.fixture(scope="module")
def planted_runs(tmp_path_factory, data_dir) -> list[Path]:
    """[wrong, good, wrong]: the good member in the middle, so the fit cannot win by favouring the first."""
    root = tmp_path_factory.mktemp("runs")
    good = train_tiny_run(root / "good", data_dir, seed=0)
    return [_rolled_copy(good, root / "wrong-a", 1), good, _rolled_copy(good, root / "wrong-b", 3)]


def _validation(run_dir: Path, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The validation split recomputed the trainer's way, independently of the exporter."""
    from trainer.data import split_train_validation

    config = json.loads((run_dir / "config.json").read_text())
    train = load_dataset("mnist", "train", data_dir)
    _, val_idx = split_train_validation(train.labels, config["val_fraction"], config["split_seed"])
    return train.images[val_idx], train.labels[val_idx]


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _member_outputs(repository: Path, names: list[str], images: np.ndarray) -> list[np.ndarray]:
    return [_session(repository / name / "1" / "model.onnx").run(None, {"images": images})[0] for name in names]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, planted_runs, data_dir):
    """`exporter to-onnx --weights fit --fused` on the planted members, through the CLI."""
    repository = tmp_path_factory.mktemp("fit") / "model_repository"
    result = CliRunner().invoke(main, ["to-onnx", *map(str, planted_runs), "--repository", str(repository),
                                       "--name", "planted", "--weights", "fit", "--fused", "--data-dir", str(data_dir)])  # fmt: skip
    assert result.exit_code == 0, result.output
    return repository, result.output


def test_fit_recovers_the_planted_best_member(fitted, planted_runs, data_dir):
    repository, output = fitted
    report = json.loads((repository / "planted-average" / "weights.json").read_text())
    assert report["mode"] == "fit" and report["fit"]["converged"]
    weights = report["weights"]
    assert weights[1] > 0.9 and sum(weights) == pytest.approx(1.0) and min(weights) >= 0
    assert [member["source_run"] for member in report["members"]] == [str(run.resolve()) for run in planted_runs]
    accuracies = [member["val_accuracy"] for member in report["members"]]
    assert accuracies[1] > max(accuracies[0], accuracies[2])  # the plant: the middle member is clearly the best
    assert report["chosen"]["val_nll"] <= report["uniform"]["val_nll"]
    assert report["chosen"]["val_nll"] <= min(member["val_nll"] for member in report["members"]) + 1e-6
    assert report["chosen"]["val_accuracy"] >= report["uniform"]["val_accuracy"]

    # The figures are the exported members' on the trainer's validation split, recomputed here independently.
    images, labels = _validation(planted_runs[1], data_dir)
    assert report["validation"]["images"] == len(labels) == 80
    members = _member_outputs(repository, ["planted-m0", "planted-m1", "planted-m2"], images)
    mean = sum(w * p.astype(np.float64) for w, p in zip(weights, members))
    assert report["chosen"]["val_nll"] == pytest.approx(-np.log(np.maximum(mean[np.arange(80), labels], 1e-12)).mean(),
                                                        abs=1e-6)  # fmt: skip
    assert report["chosen"]["val_accuracy"] == pytest.approx((mean.argmax(axis=1) == labels).mean())

    # The served models hold the fitted weights: the averaging graph, its parity report, the fused graph.
    average = _session(repository / "planted-average" / "1" / "model.onnx")
    got = average.run(None, {f"probabilities_{i}": p for i, p in enumerate(members)})[0]
    np.testing.assert_allclose(got, mean, atol=1e-6)
    assert json.loads((repository / "planted" / "parity.json").read_text())["weights"] == weights
    fused = _session(repository / "planted-fused" / "1" / "model.onnx").run(None, {"images": images})[0]
    np.testing.assert_allclose(fused, mean, atol=1e-5)
    assert json.loads((repository / "planted-fused" / "weights.json").read_text()) == report

    assert "Ensemble weights: fit, on 80 mnist validation images" in output
    assert "ensemble, uniform" in output and "ensemble, fit" in output


def test_given_weights_go_into_the_average_model(tmp_path, planted_runs, data_dir):
    repository = tmp_path / "model_repository"
    runs = planted_runs[:2]
    result = CliRunner().invoke(main, ["to-onnx", *map(str, runs), "--repository", str(repository), "--name", "given",
                                       "--weights", "1,3", "--data-dir", str(data_dir)])  # fmt: skip
    assert result.exit_code == 0, result.output

    rng = np.random.default_rng(1)
    inputs = [_random_probabilities(rng, 7, 10) for _ in range(2)]
    average = _session(repository / "given-average" / "1" / "model.onnx")
    got = average.run(None, {"probabilities_0": inputs[0], "probabilities_1": inputs[1]})[0]
    np.testing.assert_allclose(got, 0.25 * inputs[0] + 0.75 * inputs[1], rtol=1e-6, atol=1e-7)
    assert np.abs(got - (inputs[0] + inputs[1]) / 2).max() > 1e-2  # not the uniform mean

    # As served: the members, then the averaging model, on the validation images.
    images, labels = _validation(runs[0], data_dir)
    members = _member_outputs(repository, ["given-m0", "given-m1"], images)
    served = average.run(None, {"probabilities_0": members[0], "probabilities_1": members[1]})[0]
    np.testing.assert_allclose(served, 0.25 * members[0] + 0.75 * members[1], atol=1e-6)

    report = json.loads((repository / "given-average" / "weights.json").read_text())
    assert report["mode"] == "given" and report["weights"] == [0.25, 0.75] and "fit" not in report
    assert report["uniform"]["weights"] == [0.5, 0.5]
    assert report["chosen"]["val_accuracy"] == pytest.approx((served.argmax(axis=1) == labels).mean())
    assert "Ensemble weights: given, on 80 mnist validation images" in result.output


# --------------------------------------------------------------------------- refusals: nothing written


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ("1,abc", r"'1,abc': 'abc' is not a number; expected 'uniform', 'fit' or comma-separated non-negative numbers"),
        ("fitted", r"'fitted' is not a number; expected 'uniform', 'fit'"),
        ("1,2,3", r"'1,2,3' has 3 values for 2 run dirs \(expected one weight per run dir"),
        ("-1,2", r"'-1,2' has a negative weight -1 \(expected non-negative numbers"),
        ("0,0", r"'0,0' sums to 0 \(expected non-negative numbers with a positive sum\)"),
        ("nan,1", r"'nan,1' has a value that is not a finite number"),
        ("", r"'': '' is not a number"),
    ],
)
def test_cli_bad_weights_are_a_usage_error_and_write_nothing(tmp_path, weights, message):
    repository = tmp_path / "repo"
    result = CliRunner().invoke(main, ["to-onnx", str(tmp_path / "a"), str(tmp_path / "b"), "--repository",
                                       str(repository), "--name", "x", f"--weights={weights}"])  # fmt: skip
    assert result.exit_code == 2
    assert "Invalid value for '--weights'" in result.output
    assert re.search(message, " ".join(result.output.split())), result.output
    assert not repository.exists() and not list(tmp_path.glob(".repo.exporter-staging-*"))


def test_cli_fit_needs_two_run_dirs(tmp_path):
    result = CliRunner().invoke(main, ["to-onnx", str(tmp_path / "a"), "--repository", str(tmp_path / "repo"),
                                       "--name", "x", "--weights", "fit"])  # fmt: skip
    assert result.exit_code == 2 and "'fit' needs at least two run dirs" in result.output


def _edited_copy(run_dir: Path, target: Path, **changes) -> Path:
    shutil.copytree(run_dir, target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"val_fraction": 0.0, "val_samples": 0},
            r"--weights fit: .*no-split was trained without a validation split \(val_fraction 0\), so there are no",
        ),
        (
            {"split_seed": 7},
            r"--weights fit: .*no-split held out val_fraction 0.25 with split_seed 7, .* with split_seed 0: the members",
        ),
    ],
)
def test_fit_refuses_members_without_one_shared_validation_split(tmp_path, planted_runs, data_dir, changes, message):
    other = _edited_copy(planted_runs[1], tmp_path / "no-split", **changes)
    with pytest.raises(ExportError, match=message) as raised:
        export_repository([planted_runs[1], other], tmp_path / "repo", "x", weights="fit", data_dir=data_dir)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "repo").exists()


def test_fit_needs_the_training_images(tmp_path, planted_runs):
    empty = tmp_path / "empty-data"
    empty.mkdir()
    with pytest.raises(ExportError, match=r"--weights fit: the validation split needs the real mnist train images"):
        export_repository(planted_runs[:2], tmp_path / "repo", "x", weights="fit", data_dir=empty)
    assert not (tmp_path / "repo").exists()


def test_given_weights_without_a_validation_split_still_export(tmp_path, planted_runs):
    """Given weights need no validation images: weights.json then says why it has no figures."""
    empty = tmp_path / "empty-data"
    empty.mkdir()
    result = export_repository(planted_runs[:2], tmp_path / "repo", "x", weights=[2, 2], data_dir=empty)
    report = result["x-average"].reports["weights.json"]
    assert report["weights"] == [0.5, 0.5] and report["validation"] is None
    assert "needs the real mnist train images" in report["why_no_validation"]
