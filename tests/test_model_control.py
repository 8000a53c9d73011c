"""Model control (server/models/control.py): versions published into a live repository,
picked up by poll mode or an explicit load, old versions unloaded, failed loads, while
client threads infer without pause; every answer is checked.

Poll and explicit are separate server runs: like Triton, a server in poll mode refuses
load and unload calls.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ensemble_serving.model_config import load_model_config
from ensemble_serving.protocol import grpc_service_pb2 as pb
from server.models.repository import read_model
from server.models.warmup import warmup_inputs
from server.scheduling.steps import run_blocking
from tests.support.metrics import metric, scrape
from tests.support.requests import infer_request, probabilities
from tests.support.tiny_models import (
    member_model_bytes,
    publish_member_version,
    write_member_model,
    write_tiny_repository,
)

MODEL = "digits"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
class ContinuousLoad:
    """Client threads inferring on `model` without pause, for as long as the block runs.
    Each answer must equal, to float tolerance, what the version it names computes;
    anything else (an error included) is a failure."""

    def __init__(self, server, model: str, images: np.ndarray, expected: dict[str, np.ndarray], threads: int = 3):
        self.server, self.model, self.images, self.expected = server, model, images, expected
        self.versions: list[list[str]] = [[] for _ in range(threads)]  # per thread, in answer order
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> "ContinuousLoad":
        for thread in self._threads:
            thread.start()
        self.wait_for(min(self.expected, key=int))
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self, index: int) -> None:
        stub = self.server.stub()
        while not self._stop.is_set():
            try:
                response = stub.ModelInfer(infer_request(self.model, self.images), timeout=30)
            except grpc.RpcError as error:
                self.failures.append(f"{error.code()}: {error.details()}")
                continue
            version = response.model_version
            expected = self.expected.get(version)
            if expected is None or not np.allclose(probabilities(response), expected, rtol=1e-5, atol=1e-6):
                self.failures.append(f"version {version}: wrong answer")
            self.versions[index].append(version)

    @property
    def answered(self) -> int:
        return sum(len(versions) for versions in self.versions)

    def wait_for(self, version: str, timeout: float = 30.0) -> None:
        """Until every thread has had an answer from `version`."""
        deadline = time.monotonic() + timeout
        while not all(version in versions[-50:] for versions in self.versions):
            assert time.monotonic() < deadline, f"no answer from version {version} after {timeout} s"
            assert not self.failures, self.failures[:3]
            time.sleep(0.05)

    def keep_going(self, answers: int = 30) -> None:
        """Let every thread get `answers` more answers."""
        target = [len(versions) + answers for versions in self.versions]
        while any(len(versions) < goal for versions, goal in zip(self.versions, target)):
            assert not self.failures, self.failures[:3]
            time.sleep(0.02)

    def assert_switched_once(self, old: str, new: str) -> None:
        """No failure; each thread's answers: old ones, then new ones, never back."""
        assert self.failures == []
        for versions in self.versions:
            assert versions[0] == old and versions[-1] == new
            switch = versions.index(new)
            assert set(versions[:switch]) == {old} and set(versions[switch:]) == {new}


def expected_outputs(seeds: dict[str, int], images: np.ndarray) -> dict[str, np.ndarray]:
    """{version: what member_graph(seed) answers for `images`}, computed in this process."""
    return {version: ort.InferenceSession(member_model_bytes(seed), providers=["CPUExecutionProvider"])
            .run(None, {"images": images})[0] for version, seed in seeds.items()}  # fmt: skip


def index(stub) -> dict[tuple[str, str], tuple[str, str]]:
    return {(row.name, row.version): (row.state, row.reason)
            for row in stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models}  # fmt: skip


def load_request(name: str, config=None) -> pb.RepositoryModelLoadRequest:
    request = pb.RepositoryModelLoadRequest(model_name=name)
    if config is not None:
        request.parameters["config"].string_param = json_format.MessageToJson(config)
    return request


def with_version_policy(directory: Path, policy_text: str):
    """The model's config.pbtxt with another version_policy (a load request's override)."""
    config = load_model_config(directory)
    config.ClearField("version_policy")
    json_format.Parse(policy_text, config.version_policy)
    return config


@pytest.fixture
def repository(tmp_path) -> Path:
    root = tmp_path / "repository"
    write_member_model(root, MODEL, seed=0)
    return root


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)


# ---------------------------------------------------------------------------------------
# Must-show 1: new versions under continuous load, zero failed requests
# ---------------------------------------------------------------------------------------
def test_poll_mode_serves_a_published_version_with_no_failed_request(start_server, repository, images):
    server = start_server(repository, "--model-control-mode", "poll", "--repository-poll-secs", "0.2")
    stub = server.stub()
    expected = expected_outputs({"1": 0, "2": 1}, images)
    with ContinuousLoad(server, MODEL, images, expected) as load:
        load.keep_going()
        publish_member_version(repository, MODEL, 2, seed=1)  # one rename, as the exporter does
        load.wait_for("2")
        load.keep_going()
    load.assert_switched_once("1", "2")
    print(f"poll mode: {load.answered} answers, {len(load.failures)} failed")
    # version_policy latest 1 (Triton's default): version 1 was unloaded once 2 served.
    rows = index(stub)
    assert rows[(MODEL, "2")] == ("READY", "") and rows[(MODEL, "1")] == ("UNAVAILABLE", "unloaded")
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(infer_request(MODEL, images, version="1"), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and "versions served: 2" in error.value.details()
    samples = scrape(server)
    assert metric(samples, "ensemble_server_model_loaded_versions", model=MODEL) == 1
    assert metric(samples, "ensemble_server_model_loads_total", model=MODEL, outcome="success") == 2
    assert metric(samples, "ensemble_server_requests_total", model=MODEL, version="1") == 0  # series removed
    assert metric(samples, "ensemble_server_requests_total", model=MODEL, version="2", outcome="success") > 0
    # Poll mode refuses load and unload calls, as Triton does.
    with pytest.raises(grpc.RpcError) as error:
        stub.RepositoryModelLoad(load_request(MODEL), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "model control mode 'poll'" in error.value.details()


def test_explicit_load_then_old_version_unloaded_with_no_failed_request(start_server, repository, images):
    server = start_server(repository, "--model-control-mode", "explicit", "--load-model", MODEL)
    stub = server.stub()
    publish_member_version(repository, MODEL, 2, seed=1)
    expected = expected_outputs({"1": 0, "2": 1}, images)
    with ContinuousLoad(server, MODEL, images, expected) as load:
        load.keep_going()  # explicit mode: a new version folder alone changes nothing
        assert {version for versions in load.versions for version in versions} == {"1"}
        # Load with both versions served: requests without a version go to the highest.
        stub.RepositoryModelLoad(load_request(MODEL, with_version_policy(repository / MODEL, '{"all": {}}')),
                                 timeout=60)  # fmt: skip
        load.wait_for("2")
        assert [row[0] for key, row in index(stub).items() if key[0] == MODEL] == ["READY", "READY"]
        assert stub.ModelInfer(infer_request(MODEL, images, version="1"), timeout=10).model_version == "1"
        # Then serve version 2 only: version 1 retires after its last request.
        stub.RepositoryModelLoad(load_request(MODEL, with_version_policy(repository / MODEL,
                                                                         '{"specific": {"versions": [2]}}')),
                                 timeout=60)  # fmt: skip
        load.keep_going()
    load.assert_switched_once("1", "2")
    print(f"explicit mode: {load.answered} answers, {len(load.failures)} failed")
    rows = index(stub)
    assert rows[(MODEL, "1")] == ("UNAVAILABLE", "unloaded") and rows[(MODEL, "2")] == ("READY", "")
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(infer_request(MODEL, images, version="1"), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert error.value.details() == f"Request for unknown model: {MODEL!r} version 1 is not found (versions served: 2)"


# ---------------------------------------------------------------------------------------
# Must-show 2: a failed load leaves the old version serving
# ---------------------------------------------------------------------------------------
def test_corrupt_new_version_keeps_the_old_one_serving(start_server, repository, images):
    server = start_server(repository, "--model-control-mode", "explicit", "--load-model", MODEL)
    stub = server.stub()
    expected = expected_outputs({"1": 0}, images)
    publish_member_version(repository, MODEL, 2, model_bytes=b"not an onnx file")
    with ContinuousLoad(server, MODEL, images, expected) as load:
        with pytest.raises(grpc.RpcError) as error:
            stub.RepositoryModelLoad(load_request(MODEL), timeout=60)
        load.keep_going()
    assert error.value.code() == grpc.StatusCode.INTERNAL
    assert "failed to load 'digits'" in error.value.details() and "onnxruntime cannot load" in error.value.details()
    assert load.failures == [] and {v for versions in load.versions for v in versions} == {"1"}
    rows = index(stub)
    assert rows[(MODEL, "2")][0] == "UNAVAILABLE" and "onnxruntime cannot load" in rows[(MODEL, "2")][1]
    assert rows[(MODEL, "1")][0] == "READY" and "the last load failed" in rows[(MODEL, "1")][1]
    assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL), timeout=10).ready
    samples = scrape(server)
    assert metric(samples, "ensemble_server_model_loads_total", model=MODEL, outcome="failure") == 1
    assert metric(samples, "ensemble_server_model_load_failures_total", model=MODEL) == 1
    assert metric(samples, "ensemble_server_model_loaded_versions", model=MODEL) == 1
    assert metric(samples, "ensemble_server_pending_requests", model=MODEL, version="2") == 0
    assert ("ensemble_server_pending_requests", (("model", MODEL), ("version", "2"))) not in samples
    log = server.log()
    assert "model digits failed to load (the versions loaded before keep serving)" in log


def test_poll_mode_failed_version_then_removed(start_server, repository, images):
    """Poll mode: a corrupt version is reported and the old one serves; removing the
    corrupt folder clears the report; a changed config.pbtxt reloads the model. With
    --model, a model folder added meanwhile is not watched."""
    server = start_server(repository, "--model-control-mode", "poll", "--repository-poll-secs", "0.2",
                          "--model", MODEL)  # fmt: skip
    stub = server.stub()
    write_member_model(repository, "other", seed=2)
    with ContinuousLoad(server, MODEL, images, expected_outputs({"1": 0}, images)) as load:
        publish_member_version(repository, MODEL, 2, model_bytes=b"corrupt")
        wait_for_row(stub, (MODEL, "2"), "UNAVAILABLE")
        load.keep_going()
        (repository / MODEL / "2").rename(repository / f".{MODEL}-2-corrupt")
        wait_for_row(stub, (MODEL, "1"), "READY", reason="")
        config = repository / MODEL / "config.pbtxt"
        config.write_text(config.read_text().replace("max_queue_delay_microseconds: 1000",
                                                     "max_queue_delay_microseconds: 500"))
        deadline = time.monotonic() + 30
        while stub.ModelConfig(pb.ModelConfigRequest(name=MODEL), timeout=10).config.dynamic_batching \
                .max_queue_delay_microseconds != 500:  # fmt: skip
            assert time.monotonic() < deadline, "config.pbtxt change not picked up"
            time.sleep(0.1)
        load.keep_going()
    assert load.failures == []
    assert MODEL not in {key[0] for key in index(stub) if key[1] == "2"}
    assert index(stub)[("other", "")] == ("UNAVAILABLE", "not loaded (not selected with --model)")
    assert metric(scrape(server), "ensemble_server_model_loads_total", model=MODEL, outcome="failure") == 1


def wait_for_row(stub, key: tuple[str, str], state: str, reason: str | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        row = index(stub).get(key)
        if row is not None and row[0] == state and (reason is None or row[1] == reason):
            return
        assert time.monotonic() < deadline, f"{key}: {row}, expected {state}"
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------
# Ensembles, unload, mode none, warm-up
# ---------------------------------------------------------------------------------------
def test_ensemble_follows_its_members_and_says_why_it_is_not_ready(start_server, tmp_path):
    tiny = write_tiny_repository(tmp_path / "tiny")
    server = start_server(tiny["path"], "--model-control-mode", "explicit", "--load-model", "tiny")
    stub = server.stub()
    member = tiny["members"][0]
    assert {key: row for key, row in index(stub).items() if key[0] == "tiny"} == {("tiny", "1"): ("READY", "")}
    health = health_pb2_grpc.HealthStub(server.channel())
    stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=member), timeout=30)
    assert not stub.ModelReady(pb.ModelReadyRequest(name="tiny"), timeout=10).ready
    assert health.Check(health_pb2.HealthCheckRequest(service=member), timeout=10).status == NOT_SERVING
    state, reason = index(stub)[("tiny", "1")]
    assert state == "UNAVAILABLE" and f"needs model {member!r}" in reason
    images = np.zeros((1, 28, 28, 1), np.uint8)
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(infer_request("tiny", images), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "ensemble 'tiny' is not ready" in error.value.details()
    stub.RepositoryModelLoad(load_request(member), timeout=60)  # back: the ensemble serves again
    assert health.Check(health_pb2.HealthCheckRequest(service=member), timeout=10).status == SERVING
    assert stub.ModelReady(pb.ModelReadyRequest(name="tiny"), timeout=10).ready
    assert probabilities(stub.ModelInfer(infer_request("tiny", images), timeout=30)).shape == (1, 10)
    unload_dependents = pb.RepositoryModelUnloadRequest(model_name=member)
    unload_dependents.parameters["unload_dependents"].bool_param = True
    stub.RepositoryModelUnload(unload_dependents, timeout=30)
    rows = index(stub)
    assert rows[("tiny", "1")] == ("UNAVAILABLE", "unloaded") and rows[(member, "1")] == ("UNAVAILABLE", "unloaded")
    assert rows[(tiny["members"][1], "1")] == ("READY", "")
    with pytest.raises(grpc.RpcError) as error:
        stub.RepositoryModelLoad(load_request("no-such-model"), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and "failed to load 'no-such-model'" in error.value.details()
    for name in ("..", "../tiny", "/etc"):  # never a path out of the repository
        for call, request in ((stub.RepositoryModelLoad, load_request(name)),
                              (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=name))):
            with pytest.raises(grpc.RpcError) as error:
                call(request, timeout=10)
            assert error.value.code() == grpc.StatusCode.NOT_FOUND, name


def test_mode_none_refuses_load_and_unload(server, inference_stub, tiny_repository):
    for call, request in ((inference_stub.RepositoryModelLoad, load_request(tiny_repository.members[0])),
                          (inference_stub.RepositoryModelUnload,
                           pb.RepositoryModelUnloadRequest(model_name=tiny_repository.members[0]))):  # fmt: skip
        with pytest.raises(grpc.RpcError) as error:
            call(request, timeout=10)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "not allowed in model control mode 'none'" in error.value.details()
        assert "--model-control-mode explicit" in error.value.details()
    assert inference_stub.ModelReady(pb.ModelReadyRequest(name=tiny_repository.members[0]), timeout=10).ready


WARMUP = """
model_warmup { name: "zeros" batch_size: 4 count: 2
               inputs { key: "images" value: { data_type: TYPE_UINT8 dims: [28, 28, 1] zero_data: true } } }
model_warmup { name: "from-file" batch_size: 1
               inputs { key: "images" value: { data_type: TYPE_UINT8 dims: [28, 28, 1] input_data_file: "img" } } }
"""


def test_model_warmup_runs_before_ready(start_server, tmp_path):
    root = tmp_path / "repository"
    directory = write_member_model(root, MODEL, seed=0, config_extra=WARMUP)
    (directory / "warmup").mkdir()
    (directory / "warmup" / "img").write_bytes(bytes(range(256)) * 3 + bytes(16))  # 28*28 bytes
    spec = read_model(directory)
    inputs = [warmup_inputs(spec, entry)["images"] for entry in spec.config.model_warmup]
    assert inputs[0].shape == (4, 28, 28, 1) and not inputs[0].any()
    assert inputs[1].shape == (1, 28, 28, 1) and inputs[1].reshape(-1)[255] == 255
    server = start_server(root, "--model-control-mode", "explicit", "--load-model", MODEL)
    log = server.log()
    assert "warm-up 'zeros' ran 2 time(s)" in log and "warm-up 'from-file' ran 1 time(s)" in log

    # A warm-up that cannot run fails the (re)load; the version loaded before serves on.
    (directory / "warmup" / "img").write_bytes(b"short")
    stub = server.stub()
    with pytest.raises(grpc.RpcError) as error:
        stub.RepositoryModelLoad(load_request(MODEL), timeout=60)
    assert "warm-up" in error.value.details() and "holds 5 values" in error.value.details()
    assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL), timeout=10).ready


# ---------------------------------------------------------------------------------------
# Must-show 4: tritonclient, unmodified
# ---------------------------------------------------------------------------------------
TRITONCLIENT_SCRIPT = Path(__file__).parent / "tritonclient_scripts" / "model_control.py"


# How each client reports an error's kind: a gRPC status, an HTTP status code.
STATUS = {"grpc": {"NOT_FOUND": "StatusCode.NOT_FOUND", "UNAVAILABLE": "StatusCode.UNAVAILABLE"},
          "http": {"NOT_FOUND": "404", "UNAVAILABLE": "503"}}


def tritonclient_report(server, tiny: dict, protocol: str) -> dict:
    """tritonclient in its own process (its protobuf symbols clash with ours)."""
    if importlib.util.find_spec("tritonclient") is None:  # never import it here
        pytest.skip("tritonclient is not installed (the 'test' extra)")
    member = tiny["members"][0]
    url = server.grpc_address if protocol == "grpc" else f"127.0.0.1:{server.http_port}"
    result = subprocess.run([sys.executable, str(TRITONCLIENT_SCRIPT), "--protocol", protocol, "--url", url,
                             "--model", member, "--ensemble", tiny["ensemble"],
                             "--onnx", str(tiny["path"] / tiny["members"][1] / "1" / "model.onnx")],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def rows(answer: dict) -> dict[tuple[str, str], tuple[str, str]]:
    return {(row["name"], row.get("version", "")): (row.get("state", ""), row.get("reason", ""))
            for row in answer["answer"].get("models", [])}  # fmt: skip


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_tritonclient_load_unload_and_index_in_explicit_mode(start_server, tmp_path, protocol):
    tiny = write_tiny_repository(tmp_path / "tiny")
    member, ensemble = tiny["members"][0], tiny["ensemble"]
    server = start_server(tiny["path"], "--model-control-mode", "explicit")  # nothing loaded at start
    report = tritonclient_report(server, tiny, protocol)
    assert set(rows(report["index_before"]).values()) == {("UNAVAILABLE", "not loaded (load it with RepositoryModelLoad)")}
    for step in ("load", "load_ensemble", "load_with_config", "load_with_files", "unload", "load_again",
                 "unload_dependents"):  # fmt: skip
        assert report[step]["ok"], (step, report[step])
    assert report["ready_after_load"] is True
    assert report["config_after_load"]["version_policy"] == {"all": {}}  # config= replaced config.pbtxt
    assert report["versions_after_files"] == ["5"]  # files= replaced the model folder
    assert report["ensemble_ready_after_member_unload"] is False
    after_unload = rows(report["index_after_unload"])
    assert after_unload[(member, "5")] == ("UNAVAILABLE", "unloaded")
    assert after_unload[(ensemble, "1")][0] == "UNAVAILABLE" and f"needs model {member!r}" in after_unload[(ensemble, "1")][1]
    final = rows(report["index_final"])
    assert final[(member, "1")] == ("UNAVAILABLE", "unloaded") and final[(ensemble, "1")] == ("UNAVAILABLE", "unloaded")
    assert final[(tiny["members"][1], "1")] == ("READY", "")
    assert report["load_unknown"]["status"] == STATUS[protocol]["NOT_FOUND"]
    assert "failed to load 'no-such-model'" in report["load_unknown"]["message"]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_tritonclient_gets_clear_errors_in_mode_none(start_server, tmp_path, protocol):
    tiny = write_tiny_repository(tmp_path / "tiny")
    report = tritonclient_report(start_server(tiny["path"]), tiny, protocol)
    for step in ("load", "load_ensemble", "load_with_config", "load_with_files", "unload", "unload_dependents"):
        assert report[step]["status"] == STATUS[protocol]["UNAVAILABLE"], step
        assert "not allowed in model control mode 'none'" in report[step]["message"], step
    assert report["ready_after_load"] is True and report["ensemble_ready_after_member_unload"] is True
    assert set(rows(report["index_final"]).values()) == {("READY", "")}


# ---------------------------------------------------------------------------------------
# Must-show 3: unloaded versions are really released
# ---------------------------------------------------------------------------------------
def test_unload_releases_the_session_batcher_and_threads(repository):
    """In-process: after unload nothing (registry, ensembles, metrics callbacks, stats,
    threads) keeps the version's objects alive."""
    from server.config import ServerSettings
    from server.models.control import ModelController
    from server.models.registry import ModelRegistry
    from server.models.repository import scan_repository
    from server.observability.metrics import ServerMetrics

    settings = ServerSettings(model_repository=repository, model_control_mode="explicit",
                              intra_op_threads=1, inter_op_threads=1)  # fmt: skip
    registry, metrics = ModelRegistry(), ServerMetrics()
    controller = ModelController(settings, scan_repository(repository), registry, metrics)
    controller.started(scan_repository(repository), {})
    references = []
    for _ in range(3):
        controller.load(MODEL)
        model = registry.get(MODEL)
        run_blocking(model.scheduler.steps({"images": np.zeros((1, 28, 28, 1), np.uint8)}, 1, None))
        onnx_model = model.scheduler._run.__self__
        references += [weakref.ref(model), weakref.ref(model.scheduler), weakref.ref(onnx_model),
                       weakref.ref(onnx_model.session)]
        del model, onnx_model
        controller.unload(MODEL)
    gc.collect()
    assert [reference for reference in references if reference() is not None] == []
    assert not [thread.name for thread in threading.enumerate() if thread.name.startswith(f"{MODEL}-v")]
    assert not [sample for family in metrics.registry.collect() for sample in family.samples
                if sample.labels.get("model") == MODEL and "version" in sample.labels]  # fmt: skip


@pytest.mark.slow
def test_fifty_load_unload_cycles_of_a_cifar_size_model_settle(tmp_path, capsys):
    """benchmarks/model_control_memory.py: RSS after cycle 5 and 50 (printed), loose bound."""
    real = Path("/work/bench/repo/cifar10-m0")  # the exported airbench member, where this machine has it
    report_path = tmp_path / "memory.json"
    command = [sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "model_control_memory.py"),
               "--cycles", "50", "--json", str(report_path), *(["--model-dir", str(real)] if real.is_dir() else [])]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    with capsys.disabled():
        print("\n" + result.stdout[-2000:] + result.stderr[-2000:])
    assert result.returncode == 0
    report = json.loads(report_path.read_text())
    rss = report["rss_mib_after_cycle"]
    # A leak of the model (8 MB) per cycle would add ~350 MiB over 45 cycles; measured: within +-10.
    assert rss["50"] - rss["5"] < 32, rss
    assert report["metrics_series_left"] == []


# ---------------------------------------------------------------------------------------
# The pieces that make a switch lossless
# ---------------------------------------------------------------------------------------
def _slow_batcher(delay_s: float = 0.05):
    from server.observability.metrics import ServerMetrics
    from server.observability.statistics import ModelStats
    from server.scheduling.batcher import BatchingPolicy, DynamicBatcher

    def run(inputs):
        time.sleep(delay_s)
        return {"y": inputs["x"] + 1}

    policy = BatchingPolicy(max_batch_size=1, max_queue_delay_s=0, max_queue_size=16, dynamic=False)
    batcher = DynamicBatcher("m", "1", run, policy, ModelStats("m", "1"), ServerMetrics().for_model("m", "1"))
    batcher.start()
    return batcher


def test_draining_close_answers_every_queued_request():
    batcher = _slow_batcher()
    tickets = [batcher.submit({"x": np.full((1, 1), i)}, 1, None) for i in range(5)]
    batcher.close(drain=True)  # returns once the queue is empty and the thread has stopped
    assert [int(batcher.result(ticket)["y"][0, 0]) for ticket in tickets] == [1, 2, 3, 4, 5]
    with pytest.raises(Exception, match="shutting down"):
        batcher.submit({"x": np.zeros((1, 1))}, 1, None)


def test_retire_waits_for_the_last_lease_and_lookups_move_on():
    from server.models.registry import LoadedModel, ModelRegistry

    registry = ModelRegistry()
    spec = SimpleNamespace(name="m", is_ensemble=False)
    old, new = (LoadedModel(spec, "1", _slow_batcher(), None, None, "cpu", None) for _ in range(2))
    registry.set_versions("m", {"1": old})
    leased = registry.acquire("m")
    ticket = leased.scheduler.submit({"x": np.zeros((1, 1))}, 1, None)
    registry.set_versions("m", {"1": new})  # the switch: new look-ups get `new`
    retiring = threading.Thread(target=old.retire)
    retiring.start()
    time.sleep(0.1)
    assert retiring.is_alive()  # waits for the lease
    assert not old.lease() and registry.acquire("m") is new
    assert int(leased.scheduler.result(ticket)["y"][0, 0]) == 1  # finished on the old version
    leased.release()
    retiring.join(timeout=10)
    assert not retiring.is_alive()
    new.release()
    new.close()
