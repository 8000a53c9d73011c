"""System shared memory (Triton's extension), in the protocol's own terms and through
tritonclient.utils.shared_memory as a Triton user drives it.

Regions are real POSIX shared memory (multiprocessing.shared_memory here, shm_open in
tritonclient); the server maps them at registration (its /proc/PID/maps shows the
mapping), reads inputs from them, writes outputs into them, and unmaps them at
unregistration. Every bound is checked with a message naming the region and numbers,
and the server keeps serving after each refusal. With --workers 2, a region registered
on one connection serves requests that the kernel hands to either worker.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import uuid
from multiprocessing import shared_memory
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest

from ensemble_serving.protocol import grpc_service_pb2 as pb
from ensemble_serving.tensors import deserialize_bytes, serialize_bytes
from tests.support import datatype_models as models
from tests.support.http import HEADER_LENGTH, call

SCRIPTS = Path(__file__).parent / "tritonclient_scripts"
FP32 = models.identity_name("FP32")
BYTES = models.identity_name("BYTES")


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    return models.write_repository(tmp_path_factory.mktemp("shm_models"))


@pytest.fixture(scope="module")
def shm_server(start_server, repository):
    return start_server(repository)


@pytest.fixture(scope="module")
def stub(shm_server):
    return shm_server.stub()


@pytest.fixture
def region():
    """A fresh 4 KiB POSIX shared memory object; yields (its shm_open key, the object)."""
    memory = shared_memory.SharedMemory(name=f"es-test-{uuid.uuid4().hex[:12]}", create=True, size=4096)
    yield "/" + memory.name, memory
    memory.close()
    memory.unlink()


def register(stub, name: str, key: str, byte_size: int, offset: int = 0) -> None:
    stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(name=name, key=key, offset=offset,
                                                                          byte_size=byte_size))  # fmt: skip


def shm_parameters(parameters, region: str, byte_size: int, offset: int = 0) -> None:
    parameters["shared_memory_region"].string_param = region
    parameters["shared_memory_byte_size"].int64_param = byte_size
    if offset:
        parameters["shared_memory_offset"].int64_param = offset


def shm_request(model: str, datatype: str, shape: list[int], region: str, in_size: int, in_offset: int,
                out_size: int, out_offset: int) -> pb.ModelInferRequest:  # fmt: skip
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="INPUT0", datatype=datatype, shape=shape)
    shm_parameters(tensor.parameters, region, in_size, in_offset)
    output = request.outputs.add(name="OUTPUT0")
    shm_parameters(output.parameters, region, out_size, out_offset)
    return request


def refused(call_, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.RpcError) as error:
        call_()
    assert error.value.code() == code, error.value.details()
    for fragment in fragments:
        assert fragment in error.value.details()
    return error.value.details()


def mapped(pid: int, key: str) -> bool:
    return f"/dev/shm{key}" in Path(f"/proc/{pid}/maps").read_text()


def test_grpc_inputs_and_outputs_by_region(stub, shm_server, region):
    key, memory = region
    values = np.arange(6, dtype=np.float32).reshape(3, 2) - 2.5
    memory.buf[100:124] = values.tobytes()
    register(stub, "grpc-fp32", key, byte_size=1000, offset=64)  # the region: bytes 64..1063 of the object
    try:
        assert mapped(shm_server.process.pid, key)
        status = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name="grpc-fp32")).regions
        assert (status["grpc-fp32"].key, status["grpc-fp32"].offset, status["grpc-fp32"].byte_size) == (key, 64, 1000)
        # input at 36 inside the region (object byte 100); output at 500 (object byte 564)
        response = stub.ModelInfer(shm_request(FP32, "FP32", [3, 2], "grpc-fp32", 24, 36, 24, 500))
        assert response.raw_output_contents == [b""]  # as Triton: one, empty, per output in shared memory
        assert response.outputs[0].parameters["shared_memory_region"].string_param == "grpc-fp32"
        np.testing.assert_array_equal(np.frombuffer(memory.buf[564:588], np.float32).reshape(3, 2), values)
    finally:
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="grpc-fp32"))
    assert not mapped(shm_server.process.pid, key)
    assert "grpc-fp32" not in stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions


def test_bytes_by_region_keep_their_nuls(stub, region):
    key, memory = region
    items = [b"a\x00b", b"", "\u00e9".encode(), b"\x00\x00", b"tail", b"x"]
    raw = serialize_bytes(items)
    memory.buf[: len(raw)] = raw
    register(stub, "grpc-bytes", key, byte_size=4096)
    try:
        stub.ModelInfer(shm_request(BYTES, "BYTES", [3, 2], "grpc-bytes", len(raw), 0, 200, 1000))
        assert deserialize_bytes(bytes(memory.buf[1000:1000 + len(raw)])) == items
    finally:
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="grpc-bytes"))


def test_one_input_by_region_the_output_raw(stub, region):
    key, memory = region
    values = np.ones((1, 2), np.float32) * 7
    memory.buf[:8] = values.tobytes()
    register(stub, "half", key, byte_size=8)
    try:
        request = pb.ModelInferRequest(model_name=FP32)
        shm_parameters(request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 2]).parameters, "half", 8)
        response = stub.ModelInfer(request)
        np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], np.float32), [7, 7])
    finally:
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="half"))


def test_registration_refusals(stub, region):
    key, _ = region
    refused(lambda: register(stub, "r", "/es-test-no-such-object", 16), grpc.StatusCode.INVALID_ARGUMENT,
            "Unable to open shared memory region: '/es-test-no-such-object'")
    refused(lambda: register(stub, "r", key, 4000, offset=200), grpc.StatusCode.INVALID_ARGUMENT,
            "holds 4096 bytes; offset 200 + byte_size 4000 = 4200 runs past its end")
    refused(lambda: register(stub, "r", "/../../etc/passwd", 16), grpc.StatusCode.INVALID_ARGUMENT,
            "is not a POSIX shared memory name")
    register(stub, "r", key, 16)
    try:
        refused(lambda: register(stub, "r", key, 16), grpc.StatusCode.ALREADY_EXISTS, "'r' already in manager")
    finally:
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest())  # all
    refused(lambda: stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name="r")),
            grpc.StatusCode.NOT_FOUND, "Unable to find system shared memory region: 'r'")


def test_inference_refusals_and_the_server_keeps_serving(stub, region):
    key, _ = region
    register(stub, "small", key, byte_size=32)
    try:
        cases = [
            (shm_request(FP32, "FP32", [3, 2], "nope", 24, 0, 24, 0), "Unable to find shared memory region: 'nope'"),
            (shm_request(FP32, "FP32", [3, 2], "small", 24, 16, 8, 0),
             "shared_memory_offset 16 + shared_memory_byte_size 24 = 40 runs past the end of region 'small' (32"),
            (shm_request(FP32, "FP32", [3, 2], "small", 24, 0, 8, 24),
             "for output 'OUTPUT0' (8 bytes) should be at least 24 bytes"),
            (shm_request(FP32, "FP32", [3, 2], "small", 16, 0, 24, 0), "has 16 bytes; shape [3, 2] FP32 needs 24"),
        ]
        for request, message in cases:
            refused(lambda: stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT, message)
        request = pb.ModelInferRequest(model_name=FP32)
        request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 2]).parameters[
            "shared_memory_byte_size"].int64_param = 8
        refused(lambda: stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT,
                "parameter 'shared_memory_byte_size' needs 'shared_memory_region' too")
    finally:
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="small"))
    refused(lambda: stub.ModelInfer(shm_request(FP32, "FP32", [3, 2], "small", 24, 0, 24, 0)),
            grpc.StatusCode.INVALID_ARGUMENT, "Unable to find shared memory region: 'small'")
    assert stub.ServerReady(pb.ServerReadyRequest()).ready


def test_cuda_shared_memory_is_not_supported(stub):
    refused(lambda: stub.CudaSharedMemoryRegister(pb.CudaSharedMemoryRegisterRequest(name="c", byte_size=8)),
            grpc.StatusCode.UNIMPLEMENTED, "CUDA shared memory is not supported on this server")
    assert not stub.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest()).regions
    refused(lambda: stub.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest(name="c")),
            grpc.StatusCode.NOT_FOUND, "Unable to find CUDA shared memory region: 'c'", "not supported")
    # a clean start, as Triton's C++ examples and perf_analyzer make it: unregister everything, CUDA too
    stub.CudaSharedMemoryUnregister(pb.CudaSharedMemoryUnregisterRequest())


def http_infer_shm(port: int, region: str, in_offset: int, out_offset: int) -> dict:
    header = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [3, 2], "parameters": {
                  "shared_memory_region": region, "shared_memory_byte_size": 24, "shared_memory_offset": in_offset}}],
              "outputs": [{"name": "OUTPUT0", "parameters": {
                  "shared_memory_region": region, "shared_memory_byte_size": 24, "shared_memory_offset": out_offset}}]}
    return call(port, "POST", f"/v2/models/{FP32}/infer", json.dumps(header).encode())


def test_http_register_status_infer_unregister(shm_server, region):
    key, memory = region
    port = shm_server.http_port
    values = np.linspace(-1, 1, 6, dtype=np.float32)
    memory.buf[:24] = values.tobytes()
    answer = call(port, "POST", "/v2/systemsharedmemory/region/web/register",
                  json.dumps({"key": key, "offset": 0, "byte_size": 256}).encode())
    assert answer.status == 200, answer.body
    try:
        status = call(port, "GET", "/v2/systemsharedmemory/region/web/status").json()
        assert status == [{"name": "web", "key": key, "offset": 0, "byte_size": 256}]
        answer = http_infer_shm(port, "web", 0, 128)
        assert answer.status == 200, answer.body
        (output,) = answer.json()["outputs"]
        assert "data" not in output and HEADER_LENGTH.lower() not in answer.headers
        assert output == {"name": "OUTPUT0", "datatype": "FP32", "shape": [3, 2]}, output  # as Triton answers
        np.testing.assert_array_equal(np.frombuffer(memory.buf[128:152], np.float32), values)
        again = call(port, "POST", "/v2/systemsharedmemory/region/web/register",
                     json.dumps({"key": key, "byte_size": 256}).encode())
        assert again.status == 409 and "already in manager" in again.error
        assert http_infer_shm(port, "web", 240, 0).status == 400
    finally:
        assert call(port, "POST", "/v2/systemsharedmemory/region/web/unregister").status == 200
    assert call(port, "GET", "/v2/systemsharedmemory/status").json() == []
    answer = call(port, "POST", "/v2/cudasharedmemory/region/c/register", b"{}")
    assert answer.status == 501 and "not supported on this server" in answer.error
    assert call(port, "POST", "/v2/cudasharedmemory/unregister").status == 200
    assert call(port, "GET", "/v2/cudasharedmemory/status").json() == []


def test_regions_are_unmapped_at_shutdown(start_server, repository, region):
    key, _ = region
    server = start_server(repository, "--model", FP32)
    register(server.stub(), "kept", key, 64)
    assert mapped(server.process.pid, key)
    assert server.stop() == 0
    assert "unmapping 1 system shared memory region(s) at shutdown: kept" in server.log()
    assert "Traceback" not in server.log()


def test_workers_each_map_a_region_registered_once(start_server, repository, region):
    key, memory = region
    server = start_server(repository, "--workers", "2", "--model", FP32)
    workers = [child for child in psutil.Process(server.process.pid).children()  # the ones on the gRPC port
               if any(c.laddr.port == server.grpc_port for c in child.net_connections("tcp"))]
    assert len(workers) == 2
    values = np.arange(6, dtype=np.float32)
    memory.buf[:24] = values.tobytes()
    answer = call(server.http_port, "POST", "/v2/systemsharedmemory/region/both/register",
                  json.dumps({"key": key, "byte_size": 256}).encode())
    assert answer.status == 200, answer.body
    assert all(mapped(worker.pid, key) for worker in workers)
    for attempt in range(8):  # fresh connections: the kernel spreads them over the workers
        memory.buf[128:152] = bytes(24)
        assert http_infer_shm(server.http_port, "both", 0, 128).status == 200
        np.testing.assert_array_equal(np.frombuffer(memory.buf[128:152], np.float32), values)
    again = call(server.http_port, "POST", "/v2/systemsharedmemory/region/both/register",
                 json.dumps({"key": key, "byte_size": 256}).encode())
    assert again.status == 409
    assert call(server.http_port, "POST", "/v2/systemsharedmemory/unregister").status == 200
    assert not any(mapped(worker.pid, key) for worker in workers)


@pytest.fixture(scope="module")
def tritonclient_report(shm_server):
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed (the 'test' extra)")
    result = subprocess.run([sys.executable, str(SCRIPTS / "shared_memory.py"), "--grpc", shm_server.grpc_address,
                             "--http", f"127.0.0.1:{shm_server.http_port}", "--fp32", FP32, "--bytes", BYTES],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_tritonclient_shared_memory_utils(tritonclient_report, protocol):
    report = tritonclient_report[protocol]
    assert report["status_names"] == ["input", "output"]
    assert report["fp32_output"] == report["fp32_input"]
    assert report["bytes_output"] == report["bytes_input"]
    assert "already in manager" in report["duplicate_error"]
    assert "Unable to find shared memory region: 'gone'" in report["unknown_region_error"]
    assert report["status_after_unregister"] == []
