"""The exporter: real trainer runs (1 epoch on tiny generated data) -> ONNX -> a Triton repository.

Everything is real: the trainer trains, torch.onnx exports, onnxruntime runs, the
configs go through the ModelConfig proto. The generated data set is written in MNIST's
IDX layout, so parity runs on "real" (data-dir) test images through the same reader as
the genuine data set.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ensemble_serving.datasets import load_dataset
from ensemble_serving.model_config import load_model_config
from ensemble_serving.protocol import model_config_pb2 as pb
from exporter import average, export, onnx_export
from exporter import weights as ensemble_weights
from exporter.errors import ExportError, ParityError, QuantizationError
from exporter.export import export_repository
from tests.support.tiny_pipeline import TEST_IMAGES, write_digit_like_data, train_tiny_run


# The generated IDX files are not the official MNIST release; the reader says so once per file.
pytestmark = [
    pytest.mark.filterwarnings("ignore::ensemble_serving.datasets.DatasetChecksumWarning"),
    pytest.mark.usefixtures("few_threads"),
    pytest.mark.torch_threads(1),
]


# --------------------------------------------------------------------------- tiny data + runs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_digit_like_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    return [train_tiny_run(root / f"tiny-s{seed}", data_dir, seed) for seed in range(2)]


@pytest.fixture(scope="module")
def ensemble_repo(tmp_path_factory, runs, data_dir):
    repository = tmp_path_factory.mktemp("repo") / "model_repository"
    result = export_repository(runs, repository, "tiny", weights=[1, 3], fused=True, data_dir=data_dir)
    return result


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


# --------------------------------------------------------------------------- a single member


def test_single_run_exports_with_parity(tmp_path, runs, data_dir):
    repository = tmp_path / "repo"
    result = export_repository(runs[:1], repository, "digits", data_dir=data_dir, max_batch_size=16)

    assert result.model_names == ["digits"]
    assert _tree(repository) == ["digits", "digits/1", "digits/1/model.onnx", "digits/config.pbtxt",
                                 "digits/labels.txt", "digits/parity.json"]  # fmt: skip
    report = json.loads((repository / "digits" / "parity.json").read_text())
    assert report["passed"] and report["images"]["source"] == "real"
    assert set(report["batch_sizes"]) == {"1", "64"}
    assert report["batch_sizes"]["64"]["images"] == TEST_IMAGES
    assert report["max_abs_diff"] <= 1e-4 and report["argmax_agreement"] == 1.0

    model = onnx.load(repository / "digits" / "1" / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["batch", 28, 28, 1]
    assert out.name == "probabilities" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    metadata = {p.key: p.value for p in model.metadata_props}
    assert metadata["dataset"] == "mnist"
    assert json.loads(metadata["class_names"]) == [str(i) for i in range(10)]
    assert metadata["source_run"] == str(runs[0].resolve())
    assert json.loads(metadata["parity"])["max_abs_diff"] == report["max_abs_diff"]

    # The file alone reproduces PyTorch on a batch size parity did not use (dynamic batch).
    from trainer.checkpoint import load_serving_model

    images = load_dataset("mnist", "test", data_dir).images[:7]
    session = ort.InferenceSession(str(repository / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    served = session.run(None, {"images": images})[0]
    with torch.no_grad():
        expected = load_serving_model(runs[0])[0](torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-5)

    config = load_model_config(repository / "digits")
    assert (config.name, config.platform, config.max_batch_size) == ("digits", "onnxruntime_onnx", 16)
    assert list(config.input[0].dims) == [28, 28, 1] and config.input[0].format == pb.ModelInput.FORMAT_NHWC
    assert config.input[0].data_type == pb.TYPE_UINT8
    assert list(config.output[0].dims) == [10] and config.output[0].label_filename == "labels.txt"
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    assert (repository / "digits" / "labels.txt").read_text().splitlines() == [str(i) for i in range(10)]


def test_synthetic_parity_images_when_the_data_dir_has_none(tmp_path, runs):
    result = export_repository(runs[:1], tmp_path / "repo", "digits", data_dir=tmp_path / "empty")
    images = result["digits"].reports["parity.json"]["images"]
    assert images["source"] == "synthetic" and images["count"] == 512


# --------------------------------------------------------------------------- ensembles


def test_ensemble_layout_and_every_config_parses(ensemble_repo):
    repository = ensemble_repo.repository
    names = ["tiny-m0", "tiny-m1", "tiny-average", "tiny", "tiny-fused"]
    assert ensemble_repo.model_names == names
    assert sorted(p.name for p in repository.iterdir()) == sorted(names)
    for name in names:
        config = load_model_config(repository / name / "config.pbtxt")
        assert config.name == name and config.max_batch_size == 64
        assert (repository / name / "labels.txt").read_text().splitlines() == [str(i) for i in range(10)]
        assert json.loads((repository / name / "parity.json").read_text())["passed"]
        assert (repository / name / "1").is_dir()

    ensemble = load_model_config(repository / "tiny")
    assert ensemble.platform == "ensemble"
    assert [(i.name, list(i.dims)) for i in ensemble.input] == [("images", [28, 28, 1])]
    assert [(o.name, list(o.dims)) for o in ensemble.output] == [("probabilities", [10])]
    steps = ensemble.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["tiny-m0", "tiny-m1", "tiny-average"]
    assert dict(steps[1].input_map) == {"images": "images"}
    assert dict(steps[1].output_map) == {"probabilities": "probabilities_1"}
    assert dict(steps[2].input_map) == {"probabilities_0": "probabilities_0", "probabilities_1": "probabilities_1"}
    assert dict(steps[2].output_map) == {"probabilities": "probabilities"}
    assert not any((repository / "tiny" / "1").iterdir())  # ensembles have an empty version dir

    averaging = load_model_config(repository / "tiny-average")
    assert [(i.name, i.data_type, list(i.dims)) for i in averaging.input] == [
        ("probabilities_0", pb.TYPE_FP32, [10]), ("probabilities_1", pb.TYPE_FP32, [10])]  # fmt: skip


def test_ensemble_and_fused_match_the_weighted_pytorch_mean(ensemble_repo, runs, data_dir):
    repository = ensemble_repo.repository
    for name in ("tiny", "tiny-fused"):
        report = json.loads((repository / name / "parity.json").read_text())
        assert report["passed"] and report["weights"] == [0.25, 0.75]
        assert report["max_abs_diff"] <= 1e-4 and report["argmax_agreement"] == 1.0

    from trainer.checkpoint import load_serving_model

    images = load_dataset("mnist", "test", data_dir).images[:33]
    with torch.no_grad():
        members = [load_serving_model(run)[0](torch.from_numpy(images)).numpy() for run in runs]
    expected = 0.25 * members[0] + 0.75 * members[1]
    fused = ort.InferenceSession(str(repository / "tiny-fused" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(fused.run(None, {"images": images})[0], expected, atol=1e-5)


def test_averaging_model_against_numpy(ensemble_repo):
    session = ort.InferenceSession(str(ensemble_repo.repository / "tiny-average" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    rng = np.random.default_rng(1)
    inputs = [rng.dirichlet(np.ones(10), size=5).astype(np.float32) for _ in range(2)]
    got = session.run(None, {"probabilities_0": inputs[0], "probabilities_1": inputs[1]})[0]
    np.testing.assert_allclose(got, 0.25 * inputs[0] + 0.75 * inputs[1], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)


def test_averaging_graph_any_member_count_equal_weights():
    weights = ensemble_weights.normalize_weights(None, 3)
    model = average.build_average_model(weights, num_classes=4)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(2)
    inputs = [rng.random((64, 4), dtype=np.float32) for _ in range(3)]
    got = session.run(None, {f"probabilities_{i}": p for i, p in enumerate(inputs)})[0]
    np.testing.assert_allclose(got, np.mean(inputs, axis=0), rtol=1e-6)


# --------------------------------------------------------------------------- refusals: nothing written


def _perturb_first_weight(real_export):
    def export_then_perturb(module, input_shape, opset=onnx_export.OPSET):
        model = real_export(module, input_shape, opset)
        initializer = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        values = onnx.numpy_helper.to_array(initializer).copy()
        values.flat[: values.size // 4] += 0.5  # a deliberately different model
        initializer.CopyFrom(onnx.numpy_helper.from_array(values, initializer.name))
        return model

    return export_then_perturb


def test_parity_failure_refuses_and_writes_nothing(tmp_path, runs, data_dir, monkeypatch):
    repository = tmp_path / "repo"
    repository.mkdir()
    (repository / "keep-me").mkdir()
    monkeypatch.setattr(onnx_export, "export_module", _perturb_first_weight(onnx_export.export_module))
    with pytest.raises(ParityError, match=r"tiny-m0: onnxruntime differs from PyTorch.*max \|diff\|"):
        export_repository(runs, repository, "tiny", data_dir=data_dir)
    assert _tree(repository) == ["keep-me"]
    assert _tree(tmp_path) == ["repo", "repo/keep-me"]  # no staging dir left behind


def test_cli_parity_failure_exit_code_and_nothing_written(tmp_path, runs, data_dir):
    """The command line, in a subprocess, with the ONNX writer perturbed by a sitecustomize hook."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import exporter.onnx_export as o, numpy as np, onnx\n"
        "real = o.export_module\n"
        "def perturbed(module, shape, opset=o.OPSET):\n"
        "    model = real(module, shape, opset)\n"
        "    t = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))\n"
        "    a = onnx.numpy_helper.to_array(t).copy(); a.flat[::3] *= -1\n"
        "    t.CopyFrom(onnx.numpy_helper.from_array(a, t.name)); return model\n"
        "o.export_module = perturbed\n"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(hook), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "exporter", "to-onnx", str(runs[0]), "--repository", str(tmp_path / "repo"),
         "--name", "digits", "--data-dir", str(data_dir)],
        capture_output=True, text=True, env=env, timeout=240,
    )  # fmt: skip
    assert completed.returncode == 1, completed.stderr
    error_lines = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "digits: onnxruntime differs from PyTorch" in error_lines[0]
    assert not (tmp_path / "repo").exists()


def test_existing_model_needs_overwrite(tmp_path, runs, data_dir):
    repository = tmp_path / "repo"
    first = export_repository(runs[:1], repository, "digits", data_dir=data_dir)
    before = (repository / "digits" / "1" / "model.onnx").read_bytes()
    with pytest.raises(ExportError, match=r"model\(s\) digits already exist; pass --overwrite"):
        export_repository(runs[1:], repository, "digits", data_dir=data_dir)
    assert (repository / "digits" / "1" / "model.onnx").read_bytes() == before

    export_repository(runs[1:], repository, "digits", data_dir=data_dir, overwrite=True)
    metadata = {p.key: p.value for p in onnx.load(repository / "digits" / "1" / "model.onnx").metadata_props}
    assert metadata["source_run"] == str(runs[1].resolve()) != str(first.models[0].reports["parity.json"]["source_run"])
    assert sorted(p.name for p in repository.iterdir()) == ["digits"]


def test_next_version_adds_a_version_beside_the_others(tmp_path, runs, data_dir):
    repository = tmp_path / "repo"
    export_repository(runs, repository, "tiny", data_dir=data_dir)
    config_before = {name: (repository / name / "config.pbtxt").read_bytes() for name in ("tiny", "tiny-m0")}
    version_1 = (repository / "tiny-m0" / "1" / "model.onnx").read_bytes()
    result = export_repository(list(reversed(runs)), repository, "tiny", data_dir=data_dir, next_version=True)
    for member in ("tiny-m0", "tiny-m1", "tiny-average"):
        assert sorted(p.name for p in (repository / member).iterdir() if p.is_dir()) == ["1", "2"], member
        assert (repository / member / "2" / "parity.json").is_file()
    assert (repository / "tiny-m0" / "1" / "model.onnx").read_bytes() == version_1  # untouched
    assert (repository / "tiny-m0" / "2" / "model.onnx").read_bytes() != version_1
    assert {name: (repository / name / "config.pbtxt").read_bytes() for name in config_before} == config_before
    assert sorted(p.name for p in (repository / "tiny").iterdir()) == ["1", "config.pbtxt", "labels.txt", "parity.json"]
    assert result["tiny-m0"].path == repository / "tiny-m0"
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]  # the staging folder is gone

    export_repository(runs[:1], repository, "tiny-m0", data_dir=data_dir, version=7)
    assert (repository / "tiny-m0" / "7" / "model.onnx").is_file()
    with pytest.raises(ExportError, match="version 7 of tiny-m0 already exists"):
        export_repository(runs[:1], repository, "tiny-m0", data_dir=data_dir, version=7)
    with pytest.raises(ExportError, match="choose one"):
        export_repository(runs[:1], repository, "tiny-m0", data_dir=data_dir, next_version=True, overwrite=True)


@pytest.fixture
def broken_runs(tmp_path, runs) -> dict[str, Path]:
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(runs[0] / "config.json", no_weights / "config.json")
    mismatched = tmp_path / "mismatched"
    shutil.copytree(runs[0], mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    config["arch_args"]["hidden"] = 32  # the weights were trained with 16
    (mismatched / "config.json").write_text(json.dumps(config))
    other_classes = tmp_path / "other-classes"
    shutil.copytree(runs[1], other_classes)
    config = json.loads((other_classes / "config.json").read_text())
    config["class_names"] = [f"c{i}" for i in range(10)]
    (other_classes / "config.json").write_text(json.dumps(config))
    return {"no_weights": no_weights, "mismatched": mismatched, "other_classes": other_classes,
            "missing": tmp_path / "does-not-exist"}  # fmt: skip


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_weights", r"no-weights: no model\.safetensors \(the run has no trained weights"),
        ("mismatched", r"model\.safetensors does not match architecture 'lenet'"),
        ("other_classes", r"other-classes: class_names .* differs from"),
        ("missing", r"does-not-exist: not a directory"),
    ],
)
def test_bad_run_dirs_are_refused(tmp_path, runs, broken_runs, case, message):
    repository = tmp_path / "repo"
    with pytest.raises(ExportError, match=message) as raised:
        export_repository([runs[0], broken_runs[case]], repository, "bad")
    assert "\n" not in str(raised.value)
    assert not repository.exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"weights": [1.0]}, r"--weights has 1 values for 2 run dirs"),
        ({"weights": [1.0, -1.0]}, r"non-negative"),
        ({"max_batch_size": 0}, r"--max-batch-size 0"),
        ({"name": "bad/name"}, r"model name 'bad/name'"),
    ],
)
def test_bad_options_are_refused(tmp_path, runs, options, message):
    arguments = {"name": "tiny", **options}
    with pytest.raises(ExportError, match=message):
        export_repository(runs, tmp_path / "repo", **arguments)
    assert not (tmp_path / "repo").exists()


def test_cli_bad_input_one_line_exit_2(tmp_path, runs):
    completed = subprocess.run(
        [sys.executable, "-m", "exporter", "to-onnx", str(tmp_path / "nowhere"), "--repository", str(tmp_path / "repo"),
         "--name", "x"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nowhere'}: not a directory (expected a run dir written by `trainer`)"
    assert not (tmp_path / "repo").exists()


# --------------------------------------------------------------------------- int8


def test_int8_variant_with_accuracy_and_speed(tmp_path, runs, data_dir):
    result = export_repository(runs, tmp_path / "repo", "tiny", data_dir=data_dir, quantize="int8",
                               max_accuracy_drop=100.0)  # fmt: skip
    assert result.model_names == ["tiny-m0", "tiny-m1", "tiny-average", "tiny", "tiny-m0-int8", "tiny-m1-int8", "tiny-int8"]
    report = result["tiny-m0-int8"].reports["quantization.json"]
    assert report["data"]["evaluation_images"] == json.loads((runs[0] / "config.json").read_text())["val_samples"]
    assert report["evaluated_on"].startswith("validation split of the training set (val_fraction 0.25")
    assert report["timing"]["batch_sizes"]["64"]["speedup"] > 0
    model = onnx.load(tmp_path / "repo" / "tiny-m0-int8" / "1" / "model.onnx")
    assert any(node.op_type == "QuantizeLinear" for node in model.graph.node)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    int8_ensemble = load_model_config(tmp_path / "repo" / "tiny-int8")
    assert [s.model_name for s in int8_ensemble.ensemble_scheduling.step] == ["tiny-m0-int8", "tiny-m1-int8", "tiny-average"]


def test_int8_that_loses_accuracy_is_refused(tmp_path, runs, data_dir, monkeypatch):
    from exporter import quantize

    def constant_answer(model_bytes, calibration):  # an "int8 model" that always answers class 0
        model = onnx.load_from_string(model_bytes)
        logits = onnx.numpy_helper.from_array(np.eye(10, dtype=np.float32)[:1], "one_hot_0")
        model.graph.initializer.append(logits)
        output = model.graph.output[0].name
        for node in model.graph.node:
            if output in node.output:
                node.output[list(node.output).index(output)] = "unused"
        model.graph.node.append(onnx.helper.make_node("Shape", ["unused"], ["batch_shape"], start=0, end=1))
        model.graph.node.append(onnx.helper.make_node("Concat", ["batch_shape", "ten"], ["target_shape"], axis=0))
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([10], dtype=np.int64), "ten"))
        model.graph.node.append(onnx.helper.make_node("Expand", ["one_hot_0", "target_shape"], [output]))
        return model.SerializeToString()

    monkeypatch.setattr(quantize, "quantize_int8", constant_answer)
    with pytest.raises(QuantizationError, match=r"digits-int8: int8 loses .* accuracy points on the validation split"):
        export_repository(runs[:1], tmp_path / "repo", "digits", data_dir=data_dir, quantize="int8")
    assert not (tmp_path / "repo").exists()


def test_plan_names():
    assert export.plan_names("m", 1, False, None).all_names == ["m"]
    assert export.plan_names("m", 1, False, "int8").all_names == ["m", "m-int8"]
    assert export.plan_names("m", 3, True, None).all_names == ["m-m0", "m-m1", "m-m2", "m-average", "m", "m-fused"]


@pytest.mark.realdata
def test_parity_on_real_mnist_test_images(tmp_path, runs):
    """With ../shared/data present, parity runs on the genuine MNIST test images."""
    real_data = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not (real_data / "MNIST").is_dir():
        pytest.skip(f"{real_data} has no MNIST")
    result = export_repository(runs, tmp_path / "repo", "tiny", data_dir=real_data)
    for name in ("tiny-m0", "tiny-m1", "tiny"):
        report = result[name].reports["parity.json"]
        assert report["images"] == {"source": "real", "dataset": "mnist", "split": "test", "count": 512,
                                    "data_dir": str(real_data)}  # fmt: skip
        assert report["passed"] and report["max_abs_diff"] <= 1e-4
