"""Faults: clients that cancel, disconnect, overload or run out of time, and repositories
with broken models. The server must answer each with the right status, keep serving
everyone else correctly, and leak nothing (the pending-requests gauge returns to 0).

All against real server subprocesses (tests/conftest.py) on the tiny repository. The
per-model queue bound (RESOURCE_EXHAUSTED) and deadlines dropped before compute are
batcher behaviour, tested in test_server_batching.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request

import grpc
import numpy as np
import pytest

from ensemble_serving.protocol import grpc_service_pb2 as pb
from tests.support.metrics import metric, scrape, wait_for_no_pending
from tests.support.requests import infer_request, probabilities

# A long max queue delay keeps requests queued long enough to cancel them reliably,
# and makes every concurrent request of one model land in the same batch.
SLOW_BATCHING = ("--max-queue-delay-us", "400000")


# --------------------------------------------------------------------------- helpers


def executions(stub, model: str) -> int:
    return stub.ModelStatistics(pb.ModelStatisticsRequest(name=model)).model_stats[0].execution_count


@pytest.fixture(scope="module")
def cancel_window_server(start_server, tiny_repository):
    """Requests wait 400 ms in the queue: time enough to cancel them, or to drop their client."""
    return start_server(tiny_repository, *SLOW_BATCHING)


# --------------------------------------------------------------------------- cancel / disconnect


@pytest.mark.parametrize("target", ["member", "ensemble"])
def test_cancelled_requests_do_not_disturb_the_rest_of_their_batch(cancel_window_server, tiny_repository, target):
    server = cancel_window_server
    model = tiny_repository.members[0] if target == "member" else tiny_repository.ensemble
    stub = server.stub()
    member = tiny_repository.members[0]
    executions_before = executions(stub, member)
    cancelled_before = metric(scrape(server), "ensemble_server_requests_total", model=model, outcome="cancelled")

    # 10 requests, 15 images: under max_batch_size 16, so they wait together for the batch delay.
    images = [tiny_repository.images(1 + i % 2, seed=i) for i in range(10)]
    calls = [stub.ModelInfer.future(infer_request(model, batch), timeout=30) for batch in images]
    time.sleep(0.1)  # all queued, waiting for the batch to fill (400 ms delay)
    for call in calls[::2]:
        assert call.cancel()
    for index, call in enumerate(calls):
        if index % 2 == 0:
            assert call.cancelled()
            continue
        expected = tiny_repository.expected_probabilities(model, images[index])
        np.testing.assert_allclose(probabilities(call.result()), expected, rtol=1e-5, atol=1e-6)

    assert wait_for_no_pending(server) == 0
    # The five survivors shared one execution of the member (the cancelled ones were dropped).
    assert executions(stub, member) - executions_before == 1
    cancelled = metric(scrape(server), "ensemble_server_requests_total", model=model, outcome="cancelled")
    assert cancelled - cancelled_before == 5
    # And the server carries on answering.
    single = tiny_repository.images(2, seed=99)
    np.testing.assert_allclose(probabilities(stub.ModelInfer(infer_request(model, single), timeout=30)),
                               tiny_repository.expected_probabilities(model, single), rtol=1e-5, atol=1e-6)


CLIENT_THAT_DIES = textwrap.dedent("""
    import os, sys, time
    import grpc, numpy as np
    from ensemble_serving.protocol import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pb_grpc
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(sys.argv[1]))
    calls = []
    for i in range(8):
        request = pb.ModelInferRequest(model_name=sys.argv[2])
        request.inputs.add(name="images", datatype="UINT8", shape=[1, *map(int, sys.argv[3:6])])
        request.raw_input_contents.append(np.full([int(a) for a in sys.argv[3:6]], i, np.uint8).tobytes())
        calls.append(stub.ModelInfer.future(request, timeout=30))
    time.sleep(0.1)
    print("sent", flush=True)
    time.sleep(60)
""")


def test_a_client_that_dies_mid_request_leaks_nothing(cancel_window_server, tiny_repository):
    server = cancel_window_server
    model = tiny_repository.ensemble
    survivor_images = tiny_repository.images(3, seed=5)
    stub = server.stub()
    survivor = stub.ModelInfer.future(infer_request(model, survivor_images), timeout=30)
    client = subprocess.Popen([sys.executable, "-c", CLIENT_THAT_DIES, server.grpc_address, model,
                               *map(str, tiny_repository.image_shape)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert client.stdout.readline().strip() == "sent"
        client.kill()  # no goodbye: the TCP connection just drops
        client.wait(10)
    finally:
        if client.poll() is None:
            client.kill()
    np.testing.assert_allclose(probabilities(survivor.result()),
                               tiny_repository.expected_probabilities(model, survivor_images), rtol=1e-5, atol=1e-6)
    assert wait_for_no_pending(server) == 0
    assert server.process.poll() is None


# --------------------------------------------------------------------------- overload, size


def test_an_oversized_message_is_refused_and_the_server_carries_on(start_server, tiny_repository):
    server = start_server(tiny_repository, "--max-message-size", "65536")
    stub = server.stub()
    member = tiny_repository.members[0]
    too_big = infer_request(member, tiny_repository.images(16))
    too_big.raw_input_contents[0] += b"\x00" * 70_000
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(too_big, timeout=30)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    images = tiny_repository.images(2)
    np.testing.assert_allclose(probabilities(stub.ModelInfer(infer_request(member, images), timeout=30)),
                               tiny_repository.expected_probabilities(member, images), rtol=1e-5, atol=1e-6)


def test_concurrent_rpc_limit_answers_resource_exhausted(start_server, tiny_repository):
    server = start_server(tiny_repository, *SLOW_BATCHING, "--max-concurrent-rpcs", "3")
    stub = server.stub()
    member = tiny_repository.members[0]
    images = tiny_repository.images(1)
    calls = [stub.ModelInfer.future(infer_request(member, images), timeout=30) for _ in range(8)]
    codes = []
    for call in calls:
        try:
            call.result()
            codes.append("OK")
        except grpc.RpcError as error:
            codes.append(error.code().name)
    assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"} and codes.count("OK") <= 3, codes
    assert wait_for_no_pending(server) == 0


# --------------------------------------------------------------------------- broken models


def _copy_member(repository, source: str, name: str):
    """A copy of model `source` under `name` (config renamed to match the folder)."""
    target = repository / name
    shutil.copytree(repository / source, target, symlinks=True)
    config = target / "config.pbtxt"
    config.write_text(config.read_text().replace(f'name: "{source}"', f'name: "{name}"'))
    return target


def _set_config_field(model_dir, field: str, value: str, after: str = 'platform: "onnxruntime_onnx"') -> None:
    config = model_dir / "config.pbtxt"
    text = config.read_text()
    assert after in text
    config.write_text(text.replace(after, f'{after}\n{field}: "{value}"', 1))


@pytest.fixture(scope="module")
def broken_repository(tiny_repository, tmp_path_factory):
    """The tiny repository plus one model for each way a model can be broken or escape.

    Serving: the first member and the average. Broken: the rest (the ensemble because
    it needs the second member, whose model.onnx is corrupt)."""
    root = tmp_path_factory.mktemp("broken")
    repository = root / "repository"
    shutil.copytree(tiny_repository.path, repository)
    member = tiny_repository.members[0]
    outside = root / "outside"  # a perfectly good model and a secret, outside the repository
    shutil.copytree(repository / member, outside)
    (root / "secret.txt").write_text("do not serve me\n")

    (repository / tiny_repository.members[1] / "1" / "model.onnx").write_bytes(b"\x08\x07 this is not protobuf" * 50)
    shutil.rmtree(_copy_member(repository, member, "no-version") / "1")
    (_copy_member(repository, member, "bad-config") / "config.pbtxt").write_text('name: "bad-config"\nmax_batch: 4\n')
    _set_config_field(_copy_member(repository, member, "escape-model"), "default_model_filename",
                      "../../outside/1/model.onnx")  # fmt: skip
    _set_config_field(_copy_member(repository, member, "absolute-model"), "default_model_filename",
                      str(outside / "1" / "model.onnx"))  # fmt: skip
    escape_labels = _copy_member(repository, member, "escape-labels")
    text = (escape_labels / "config.pbtxt").read_text()
    text = text.replace('label_filename: "labels.txt"', 'label_filename: "../../secret.txt"')
    (escape_labels / "config.pbtxt").write_text(text)
    link_model = _copy_member(repository, member, "link-model")
    (link_model / "1" / "model.onnx").unlink()
    (link_model / "1" / "model.onnx").symlink_to(outside / "1" / "model.onnx")
    linked_folder = root / "linked-folder"
    _copy_member(repository, member, "linked-folder")
    shutil.move(repository / "linked-folder", linked_folder)
    (repository / "linked-folder").symlink_to(linked_folder, target_is_directory=True)
    return repository


def broken_models(tiny_repository) -> dict[str, str]:
    """Each broken model of `broken_repository` and what its reason must say."""
    corrupt = tiny_repository.members[1]
    return {
        corrupt: "onnxruntime cannot load",
        tiny_repository.ensemble: f"needs model {corrupt!r}, which failed to load",
        **BROKEN_EXTRAS,
    }


BROKEN_EXTRAS = {
    "no-version": "no numbered version folder",
    "bad-config": "config.pbtxt",
    "escape-model": "outside",
    "absolute-model": "outside",
    "escape-labels": "outside",
    "link-model": "outside",
    "linked-folder": "outside",
}


def test_broken_models_fail_alone_with_one_log_line_and_a_metric(start_server, broken_repository, tiny_repository):
    server = start_server(broken_repository)
    stub = server.stub()
    member, average = tiny_repository.members[0], tiny_repository.average
    # The healthy models serve, and serve right.
    images = tiny_repository.images(3)
    np.testing.assert_allclose(probabilities(stub.ModelInfer(infer_request(member, images), timeout=30)),
                               tiny_repository.expected_probabilities(member, images), rtol=1e-5, atol=1e-6)
    assert stub.ModelReady(pb.ModelReadyRequest(name=average)).ready

    index = {model.name: model for model in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
    samples = scrape(server)
    log = server.log()
    for name, reason in broken_models(tiny_repository).items():
        assert not stub.ModelReady(pb.ModelReadyRequest(name=name)).ready, name
        assert index[name].state == "UNAVAILABLE" and reason in index[name].reason, (name, index[name])
        lines = [line for line in log.splitlines() if f"model {name} failed to load" in line]
        assert len(lines) == 1 and reason in lines[0] and "ERROR" in lines[0], (name, lines)
        assert metric(samples, "ensemble_server_model_load_failures_total", model=name) == 1, name
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(infer_request(name, images), timeout=30)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert metric(samples, "ensemble_server_model_load_failures_total", model=member) == 0
    assert "do not serve me" not in log  # the secret outside the repository was never read into a message


def test_strict_makes_a_broken_model_a_startup_failure(broken_repository, tiny_repository):
    from tests.support.servers import free_port, server_command

    command = server_command(broken_repository, free_port(), free_port(), "--strict")
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("server: error:")]
    assert len(errors) == 1 and "model '" in errors[0], result.stderr[-2000:]


def test_strict_server_with_a_sound_repository_serves(start_server, tiny_repository):
    server = start_server(tiny_repository, "--strict")
    assert server.stub().ModelReady(pb.ModelReadyRequest(name=tiny_repository.ensemble)).ready


# --------------------------------------------------------------------------- metrics bound apart


def test_metrics_can_listen_on_another_address_than_grpc(start_server, tiny_repository):
    psutil = pytest.importorskip("psutil")
    # Two loopback addresses stand for "the network" (gRPC) and "this host only" (metrics).
    server = start_server(tiny_repository, "--metrics-host", "127.0.0.2")
    connections = psutil.Process(server.process.pid).net_connections("tcp")
    listening = {conn.laddr.port: conn.laddr.ip.removeprefix("::ffff:")  # gRPC listens IPv4-mapped on IPv6
                 for conn in connections if conn.status == psutil.CONN_LISTEN}  # fmt: skip
    assert listening[server.metrics_port] == "127.0.0.2"
    assert listening[server.grpc_port] == "127.0.0.1"
    text = urllib.request.urlopen(f"http://127.0.0.2:{server.metrics_port}/metrics", timeout=10).read().decode()
    assert "ensemble_server_ready 1.0" in text
    with pytest.raises(OSError):
        urllib.request.urlopen(server.metrics_url, timeout=5)  # 127.0.0.1: nothing listens there
