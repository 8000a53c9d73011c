"""Start-up and shutdown of the real server process."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest
from click.testing import CliRunner

from ensemble_serving.protocol import grpc_service_pb2 as pb
from server.process import cli
from server.models.runtime import cuda_available
from tests.support.requests import infer_request, probabilities
from tests.support.servers import ROOT, free_port, server_command


def test_sigterm_drains_in_flight_requests_then_exits_zero(start_server, tiny_repository):
    # Requests wait 1.5 s in the batcher, so they are surely in flight when SIGTERM lands.
    server = start_server(tiny_repository, "--max-queue-delay-us", "1500000",
                          env={"ENSEMBLE_SERVER_GRACE_PERIOD": "20"})
    stub = server.stub()
    member = tiny_repository.members[0]
    in_flight = [stub.ModelInfer.future(infer_request(member, tiny_repository.images(1, seed=s)), timeout=30)
                 for s in range(3)]
    time.sleep(0.3)
    server.send_signal(signal.SIGTERM)

    # It turns not-ready at once and refuses new work with UNAVAILABLE...
    deadline = time.monotonic() + 5
    while stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready:
        assert time.monotonic() < deadline, "still ready 5 s after SIGTERM"
        time.sleep(0.02)
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(infer_request(member, tiny_repository.images(1)), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in refused.value.details()

    # ...while the requests it had accepted still complete...
    for future in in_flight:
        assert probabilities(future.result()).shape == (1, len(tiny_repository.class_names))
    # ...and then it exits 0.
    assert server.process.wait(timeout=30) == 0
    log = server.log()
    assert "SIGTERM received" in log and "all in-flight requests finished" in log


def _occupied_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def _start_and_expect_failure(repository, *flags: str) -> str:
    command = server_command(repository, free_port(), free_port(), *flags)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("server: error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


def test_device_cuda_without_cuda_is_a_startup_error(tiny_repository):
    if cuda_available():
        pytest.skip("this machine has CUDA")
    message = _start_and_expect_failure(tiny_repository.path, "--device", "cuda")
    assert "--device cuda" in message and "CUDAExecutionProvider" in message


def test_unknown_model_is_a_startup_error(tiny_repository):
    message = _start_and_expect_failure(tiny_repository.path, "--model", "nope")
    assert "model 'nope' (asked for with --model) is not in" in message and tiny_repository.ensemble in message


def test_broken_model_is_a_startup_error(tiny_repository, tmp_path):
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "config.pbtxt").write_text('name: "broken"\nplatform: "onnxruntime_onnx"\nmax_batch: 4\n')
    message = _start_and_expect_failure(tmp_path)
    assert "model 'broken'" in message and "config.pbtxt" in message


def test_port_in_use_is_a_startup_error(tiny_repository):
    with _occupied_port() as sock:
        port = sock.getsockname()[1]
        command = server_command(tiny_repository.path, port, free_port())
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"cannot listen for gRPC on 127.0.0.1:{port}" in result.stderr


def test_server_never_imports_torch():
    code = "import sys, server.process.cli; sys.exit(any(m == 'torch' or m.startswith('torch.') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0


def test_help_explains_flags_and_environment():
    result = CliRunner().invoke(cli.main, ["--help"], terminal_width=100)
    assert result.exit_code == 0
    for text in ("--model-repository", "--grpc-port", "ENSEMBLE_SERVER_GRPC_PORT", "--device", "--grace-period",
                 "--max-queue-delay-us", "--no-dynamic-batching", "--model", "--intra-op-threads",
                 "--max-message-size", "--log-level", "--metrics-port", "--host"):
        assert text in result.output
