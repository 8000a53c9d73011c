"""Triton's own Python clients, unmodified, against our server: tritonclient.grpc and
tritonclient.http, the same calls and the same assertions for both.

tritonclient cannot be imported next to our protocol modules (duplicate protobuf
symbols, see the team brief), so a script runs it in a subprocess and prints JSON.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

SCRIPTS = Path(__file__).parent / "tritonclient_scripts"


def run_script(name: str, *args: str, timeout: float = 120) -> dict:
    result = subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


# How each client reports an unknown model: a gRPC status, an HTTP status code.
NOT_FOUND = {"grpc": "StatusCode.NOT_FOUND", "http": "404"}


@pytest.fixture(scope="module", params=["grpc", "http"])
def report(request, server, tiny_repository, tmp_path_factory):
    if importlib.util.find_spec("tritonclient") is None:  # never import it here: see the module docstring
        pytest.skip("tritonclient is not installed (the 'test' extra)")
    images = tiny_repository.images(3, seed=5)
    path = tmp_path_factory.mktemp("tritonclient") / "images.npy"
    np.save(path, images)
    url = server.grpc_address if request.param == "grpc" else f"127.0.0.1:{server.http_port}"
    report = run_script("check_server.py", "--protocol", request.param, "--url", url, "--images", str(path),
                        "--model", tiny_repository.ensemble, "--model", tiny_repository.members[0])
    report["images"] = images
    report["protocol"] = request.param
    return report


def test_server_calls(report):
    assert report["live"] is True and report["ready"] is True
    assert report["server_metadata"]["name"] == "ensemble-serving"
    assert {"classification", "model_configuration", "statistics"} <= set(report["server_metadata"]["extensions"])
    assert report["unknown_model_ready"] is False
    assert report["unknown_model_error"]["status"] == NOT_FOUND[report["protocol"]]
    # Triton's own examples test that the message starts so (simple_http_infer_client.py).
    assert report["unknown_model_error"]["message"].startswith("Request for unknown model: 'no-such-model' is not found")


def test_model_metadata_and_config(report, tiny_repository):
    for model in (tiny_repository.ensemble, tiny_repository.members[0]):
        answer = report["models"][model]
        assert answer["ready"] is True
        (tensor,) = answer["metadata"]["inputs"]
        assert (tensor["name"], tensor["datatype"]) == ("images", "UINT8")
        # gRPC's JSON writes int64 as strings, HTTP (as Triton) as numbers
        assert [int(d) for d in tensor["shape"]] == [-1, *tiny_repository.image_shape]
        assert answer["config"]["max_batch_size"] == tiny_repository.max_batch_size
    assert report["models"][tiny_repository.ensemble]["config"]["platform"] == "ensemble"


def test_infer_raw_and_typed(report, tiny_repository):
    images = report["images"]
    for model in (tiny_repository.ensemble, tiny_repository.members[0]):
        answer = report["models"][model]
        raw = np.array(answer["raw_probabilities"], np.float32)
        assert raw.shape == (3, len(tiny_repository.class_names))
        np.testing.assert_allclose(answer["typed_probabilities"], raw, rtol=1e-6)
        assert answer["raw_response_id"] == "req-1" and answer["raw_response_version"] == "1"
    member = tiny_repository.members[0]
    session = ort.InferenceSession(str(tiny_repository.path / member / "1" / "model.onnx"))
    np.testing.assert_allclose(report["models"][member]["raw_probabilities"],
                               session.run(None, {"images": images})[0], rtol=1e-5, atol=1e-6)


def test_classification(report, tiny_repository):
    answer = report["models"][tiny_repository.ensemble]
    probabilities = np.array(answer["raw_probabilities"])
    for row, scores in zip(answer["top3"], probabilities):
        best = np.argsort(-scores)[:3]
        assert row == [f"{scores[i]:f}:{i}:{tiny_repository.class_names[i]}" for i in best]


def test_inference_statistics(report, tiny_repository):
    stats = report["models"][tiny_repository.members[0]]["statistics"]["model_stats"]
    assert [(entry["name"], entry["version"]) for entry in stats] == [(tiny_repository.members[0], "1")]
    entry = stats[0]
    # Each model was asked three times (raw, typed, classification) with three images.
    assert int(entry["inference_count"]) >= 9
    assert int(entry["execution_count"]) >= 1
    assert int(entry["inference_stats"]["success"]["count"]) >= 3
