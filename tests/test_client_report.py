"""The client's pure parts: the report numbers (known answers), its files, response parsing,
image loading and the dataset/model shape check. No server here; see test_client.py."""

from __future__ import annotations

import csv
import io
import json
import struct
import sys

import numpy as np
import pytest
from rich.console import Console

from client.connection import normalize_url
from client.evaluate import check_dataset_fits, effective_batch_size
from client.inference import image_request, output_array
from client.predict import load_image, parse_classification
from client.report import build_report, confusion_table, print_report, write_report_files
from client.transport import ClientError, ImageModel, ModelMetadata, TensorSpec, image_model_from_metadata
from ensemble_serving.protocol import grpc_service_pb2 as pb
from tests.support import known_answer as known
from tests.support.client_models import MNIST_MODEL



# --------------------------------------------------------------------------- report: known answers


@pytest.fixture(scope="module")
def known_report():
    return build_report(known.probabilities(), known.LABELS, known.CLASS_NAMES, top_k=2,
                        latencies_s=np.array([0.010, 0.020, 0.030, 0.040]), wall_time_s=2.0,
                        context={"model": "known", "dataset": "mnist", "split": "test"})  # fmt: skip


def test_report_matches_the_hand_computed_answers(known_report):
    assert known_report["num_images"] == 20
    assert known_report["accuracy"] == pytest.approx(known.EXPECTED_ACCURACY, abs=1e-12)
    assert known_report["top_k"] == {"k": 2, "accuracy": pytest.approx(known.EXPECTED_TOP2, abs=1e-12)}
    assert known_report["mean_confidence"] == pytest.approx(known.EXPECTED_CONFIDENCE, abs=1e-6)
    assert known_report["ece"] == pytest.approx(known.EXPECTED_ECE, abs=1e-6)
    np.testing.assert_array_equal(known_report["confusion_matrix"], known.EXPECTED_CONFUSION)
    rows = {int(row["class"]): row for row in known_report["per_class"]}
    for cls, precision in known.EXPECTED_PRECISION.items():
        assert rows[cls]["precision"] == pytest.approx(precision)
        assert rows[cls]["recall"] == pytest.approx(known.EXPECTED_RECALL[cls])
        assert rows[cls]["f1"] == pytest.approx(known.EXPECTED_F1[cls])
    assert all(row["support"] == 2 for row in rows.values())


def test_report_speed_numbers(known_report):
    perf = known_report["performance"]
    assert perf["throughput_images_per_s"] == pytest.approx(10.0)  # 20 images in 2 s
    assert perf["requests"] == 4
    assert perf["latency_ms"]["p50"] == pytest.approx(25.0)
    assert perf["latency_ms"]["max"] == pytest.approx(40.0)


def test_top_k_is_capped_at_the_number_of_classes():
    report = build_report(known.probabilities(), known.LABELS, known.CLASS_NAMES, top_k=50)
    assert report["top_k"] == {"k": 10, "accuracy": 1.0}


def test_report_rejects_probabilities_that_do_not_match_the_classes():
    with pytest.raises(ValueError, match="do not match"):
        build_report(known.probabilities()[:, :9], known.LABELS, known.CLASS_NAMES)


def test_report_files(known_report, tmp_path):
    paths = write_report_files(known_report, tmp_path / "out")
    assert [p.name for p in paths] == ["report.json", "per_class.csv", "confusion_matrix.png"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["confusion_matrix"] == known.EXPECTED_CONFUSION.tolist()
    with open(tmp_path / "out" / "per_class.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["class"] for r in rows] == known.CLASS_NAMES
    assert float(rows[8]["precision"]) == pytest.approx(0.5) and rows[8]["support"] == "2"
    png = (tmp_path / "out" / "confusion_matrix.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 300 and height > 300


def _render(renderable) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def _render_report(report) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    print_report(report, console)
    return console.file.getvalue()


def test_terminal_summary(known_report):
    text = _render_report(known_report)
    assert "80.00 %  (16 correct)" in text and "top-2 accuracy" in text and "90.00 %" in text
    assert "ECE (15 bins)" in text and "0.0900" in text and "p50 25.0 ms" in text
    assert "per class" in text and "confusion matrix" in text


@pytest.mark.parametrize("normalize, row_9", [
    (False, ["1", "0", "0", "0", "0", "0", "0", "0", "1", "0"]),
    (True, ["0.500", "0.000", "0.000", "0.000", "0.000", "0.000", "0.000", "0.000", "0.500", "0.000"]),
])  # fmt: skip
def test_terminal_confusion_matrix_has_class_names_and_counts_or_fractions(known_report, normalize, row_9):
    lines = _render(confusion_table(known_report, normalize=normalize)).splitlines()
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines if line.startswith("│")]
    header = next(line for line in lines if "true" in line and "pred" in line)
    assert [cell.strip() for cell in header.split("┃")[2:-1]] == known.CLASS_NAMES
    assert [row[0] for row in rows] == known.CLASS_NAMES
    assert rows[9][1:] == row_9


# --------------------------------------------------------------------------- dataset vs model


def test_shape_mismatch_names_both_shapes():
    cifar_images = np.zeros((5, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(ClientError) as caught:
        check_dataset_fits(MNIST_MODEL, cifar_images, [str(i) for i in range(10)], "cifar10 test")
    message = str(caught.value)
    assert "[-1, 28, 28, 1]" in message and "[5, 32, 32, 3]" in message and "cifar10 test" in message


def test_class_count_mismatch_is_explained():
    with pytest.raises(ClientError, match="scores 10 classes but toy has 3"):
        check_dataset_fits(MNIST_MODEL, np.zeros((1, 28, 28, 1), np.uint8), ["a", "b", "c"], "toy")


def test_batches_are_capped_at_the_model_s_max_batch_size():
    import dataclasses

    assert effective_batch_size(MNIST_MODEL, 64) == 64  # no limit known (server without ModelConfig)
    assert effective_batch_size(dataclasses.replace(MNIST_MODEL, max_batch_size=16), 64) == 16
    assert effective_batch_size(dataclasses.replace(MNIST_MODEL, max_batch_size=16), 8) == 8
    unbatched = dataclasses.replace(MNIST_MODEL, image_input=TensorSpec("images", "UINT8", (28, 28, 1)))
    assert effective_batch_size(unbatched, 64) == 1


def test_variable_size_model_accepts_any_image_size():
    any_size = ImageModel("any", "", "onnx", TensorSpec("images", "UINT8", (-1, -1, -1, 3)),
                          TensorSpec("probabilities", "FP32", (-1, 10)))  # fmt: skip
    classes = [str(i) for i in range(10)]
    for height, width in ((32, 32), (28, 28), (224, 160)):
        check_dataset_fits(any_size, np.zeros((1, height, width, 3), np.uint8), classes, "cifar10")  # no error
    # Only height and width are free: the channel count is still checked.
    with pytest.raises(ClientError, match=r"H, W, C = \?x\?x3\).*\[1, 28, 28, 1\]"):
        check_dataset_fits(any_size, np.zeros((1, 28, 28, 1), np.uint8), classes, "mnist")


def _metadata(inputs, outputs):
    return ModelMetadata(
        name="m", platform="onnxruntime_onnx",
        inputs=tuple(TensorSpec(n, d, tuple(s)) for n, d, s in inputs),
        outputs=tuple(TensorSpec(n, d, tuple(s)) for n, d, s in outputs),
    )  # fmt: skip


def test_metadata_must_describe_a_uint8_image_classifier():
    good = image_model_from_metadata(_metadata([("images", "UINT8", [-1, 28, 28, 1])],
                                               [("probabilities", "FP32", [-1, 10])]))  # fmt: skip
    assert good.batched and good.image_shape == (28, 28, 1) and good.num_classes == 10
    unbatched = image_model_from_metadata(_metadata([("x", "UINT8", [28, 28, 1])], [("y", "FP32", [10])]))
    assert not unbatched.batched and unbatched.probabilities_output.name == "y"
    with pytest.raises(ClientError, match="takes FP32"):
        image_model_from_metadata(_metadata([("images", "FP32", [-1, 28, 28, 1])], [("probabilities", "FP32", [-1, 10])]))
    with pytest.raises(ClientError, match="one input"):
        image_model_from_metadata(_metadata([("a", "UINT8", [-1, 4]), ("b", "UINT8", [-1, 4])], []))
    with pytest.raises(ClientError, match="no class-score output"):
        image_model_from_metadata(_metadata([("images", "UINT8", [-1, 28, 28, 1])], [("labels", "INT64", [-1, 1])]))


@pytest.mark.parametrize("url, expected", [("localhost:8001", "localhost:8001"), ("grpc://h:1/", "h:1")])
def test_url_forms(url, expected):
    assert normalize_url(url) == expected


def test_url_without_port_is_refused():
    with pytest.raises(ClientError, match="HOST:PORT"):
        normalize_url("localhost")


# --------------------------------------------------------------------------- wire encoding


def test_request_carries_raw_uint8_bytes_and_the_classification_parameter():
    batch = np.arange(2 * 28 * 28, dtype=np.uint64).astype(np.uint8).reshape(2, 28, 28, 1)
    request = image_request(MNIST_MODEL, batch, class_count=3)
    assert request.model_name == "mnist"
    assert list(request.inputs[0].shape) == [2, 28, 28, 1] and request.inputs[0].datatype == "UINT8"
    assert request.raw_input_contents[0] == batch.tobytes()
    assert request.outputs[0].parameters["classification"].int64_param == 3


def _response(datatype, shape, raw=None, **contents):
    output = pb.ModelInferResponse.InferOutputTensor(name="probabilities", datatype=datatype, shape=shape)
    for field, values in contents.items():
        getattr(output.contents, field).extend(values)
    return pb.ModelInferResponse(outputs=[output], raw_output_contents=[raw] if raw is not None else [])


def test_output_read_from_raw_bytes_or_typed_contents():
    values = np.array([[0.25, 0.75], [1.0, 0.0]], dtype=np.float32)
    from_raw = output_array(_response("FP32", [2, 2], raw=values.tobytes()), "probabilities")
    from_typed = output_array(_response("FP32", [2, 2], fp32_contents=values.ravel().tolist()), "probabilities")
    np.testing.assert_array_equal(from_raw, values)
    np.testing.assert_array_equal(from_typed, values)


def test_output_bytes_tensor_in_raw_length_prefixed_form():
    entries = [b"0.9:7:seven", b"0.1:1"]
    raw = b"".join(struct.pack("<I", len(e)) + e for e in entries)
    array = output_array(_response("BYTES", [1, 2], raw=raw), "probabilities")
    assert array.shape == (1, 2) and list(array.ravel()) == entries


def test_output_errors_are_explained():
    with pytest.raises(ClientError, match="no output 'other'"):
        output_array(_response("FP32", [1], raw=b"\0\0\0\0"), "other")
    with pytest.raises(ClientError, match="shape \\[2, 2\\] but 1 values"):
        output_array(_response("FP32", [2, 2], raw=b"\0\0\0\0"), "probabilities")


def test_parse_classification_strings():
    top = parse_classification(b"0.981000:7:seven")
    assert (top.score, top.class_index, top.label) == (pytest.approx(0.981), 7, "seven")
    assert parse_classification("0.5:3").label == "3"
    assert parse_classification("0.5:3:a:b").label == "a:b"  # a label may itself hold a colon
    with pytest.raises(ClientError, match="malformed"):
        parse_classification(b"seven")


# --------------------------------------------------------------------------- images for predict


def test_image_is_converted_and_resized_to_the_model(tmp_path):
    from PIL import Image

    path = tmp_path / "photo.jpg"
    Image.new("RGB", (64, 48), (200, 100, 50)).save(path)
    pixels, notes = load_image(path, MNIST_MODEL)
    assert pixels.shape == (28, 28, 1) and pixels.dtype == np.uint8
    assert notes == ["converted RGB -> L", "resized 64x48 -> 28x28"]
    assert abs(int(pixels[14, 14, 0]) - round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)) <= 1


def test_image_of_the_right_shape_is_sent_unchanged(tmp_path):
    from PIL import Image

    original = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    path = tmp_path / "digit.png"
    Image.fromarray(original, mode="L").save(path)
    pixels, notes = load_image(path, MNIST_MODEL)
    assert notes == []
    np.testing.assert_array_equal(pixels[..., 0], original)


def test_unreadable_images_are_one_line_errors(tmp_path):
    with pytest.raises(ClientError, match="does not exist"):
        load_image(tmp_path / "missing.png", MNIST_MODEL)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ClientError, match="expected a PNG or JPEG"):
        load_image(tmp_path / "notes.txt", MNIST_MODEL)


def test_client_never_imports_torch():
    import subprocess

    code = ("import sys, client.cli, client.evaluate, client.predict, client.report, client.status; "
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'tritonclient')]; "
            "print(heavy); sys.exit(1 if heavy else 0)")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
