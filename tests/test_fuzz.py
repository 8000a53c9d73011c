"""Property-based fuzzing of ModelInfer against the real server subprocess.

Hypothesis builds requests two ways: from scratch (random names, versions, datatypes,
shapes, byte lengths, parameters) and by mutating a valid request a few times (a
wrong byte count, a batch size past the maximum, NaN in a float input, a typed field
that does not match the datatype, a huge dimension, ...), because near-valid requests
reach deeper into the server than noise does. BYTES tensors travel too (an identity
model over strings with NULs, non-UTF-8 and broken length prefixes among them), and
system shared-memory parameters (a real registered region, unknown ones, windows past
its end, raw contents left or not beside them). Properties:

- every answer is OK, INVALID_ARGUMENT, NOT_FOUND or RESOURCE_EXHAUSTED (an oversized
  message) with a message; never INTERNAL, UNKNOWN or a dropped connection;
- every OK answer is the right answer (onnxruntime in this process on the same files);
- after each fuzzed request a valid request still gets the right answer;
- the server process is alive at the end.

The default run tries FUZZ_EXAMPLES=100 requests (well under a minute). A long run on
purpose: `FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py -s`.
"""

from __future__ import annotations

import collections
import os
import shutil
import time
import uuid
from multiprocessing import shared_memory

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ensemble_serving.protocol import grpc_service_pb2 as pb
from ensemble_serving.tensors import deserialize_bytes, serialize_bytes
from tests.support import datatype_models

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))
# The default run draws the same requests every time, so a failure in CI reproduces;
# a run with FUZZ_EXAMPLES set explores new ones.
DERANDOMIZE = "FUZZ_EXAMPLES" not in os.environ
MAX_MESSAGE_SIZE = 1 << 20  # the fuzz server's limit, so oversized messages are cheap to send
ALLOWED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"}
DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BYTES", "BF16")  # fmt: skip
CONTENT_FIELDS = ("bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
                  "fp32_contents", "fp64_contents", "bytes_contents")  # fmt: skip
HUGE_DIMS = (2**31, 2**32 + 1, 2**62, 2**63 - 1, -(2**63))
BYTES_MODEL = datatype_models.identity_name("BYTES")  # INPUT0 BYTES [-1, 2] -> OUTPUT0, unchanged
REGION, REGION_SIZE = "fuzz", 4096  # the shared-memory region registered for the whole run
SHM_KEYS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
BYTES_ITEMS = (b"", b"a", b"\x00", b"a\x00b", "\u00e9\u4e2d".encode(), b"\xff\xfe", b"x" * 300)


class Reference:
    """The right answers, computed with onnxruntime in this process on the repository's files."""

    def __init__(self, repository):
        self.repository = repository
        self.region = b""  # the shared-memory region's bytes as the request was sent (see fuzz_region)
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self.sessions = {
            name: ort.InferenceSession(str(repository.path / name / "1" / "model.onnx"), options,
                                       providers=["CPUExecutionProvider"])
            for name in (*repository.members, repository.average)
        }  # fmt: skip

    def images_model(self, name: str, images: np.ndarray) -> np.ndarray:
        if name == self.repository.ensemble:
            return np.mean([self.images_model(member, images) for member in self.repository.members], axis=0)
        return self.sessions[name].run(["probabilities"], {"images": images})[0]

    def average(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.sessions[self.repository.average].run(["probabilities"], inputs)[0]


@pytest.fixture(scope="module")
def fuzz_server(start_server, tiny_repository, tmp_path_factory):
    """The tiny repository plus the BYTES identity model."""
    root = tmp_path_factory.mktemp("fuzz_repository") / "models"
    shutil.copytree(tiny_repository.path, root)
    datatype_models.write_identity_model(root, "BYTES")
    return start_server(root, "--max-message-size", str(MAX_MESSAGE_SIZE))


@pytest.fixture(scope="module")
def fuzz_region(fuzz_server):
    """A real POSIX shared-memory region registered as REGION: random bytes, and valid
    BYTES contents at its start (so that a BYTES input read from it may decode)."""
    memory = shared_memory.SharedMemory(name=f"es-fuzz-{uuid.uuid4().hex[:12]}", create=True, size=REGION_SIZE)
    content = serialize_bytes(list(BYTES_ITEMS[:4])) + _bytes(REGION_SIZE, 7)
    memory.buf[:REGION_SIZE] = content[:REGION_SIZE]
    stub = fuzz_server.stub()
    stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(name=REGION, key="/" + memory.name,
                                                                          byte_size=REGION_SIZE))  # fmt: skip
    yield memory
    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=REGION))
    memory.close()
    memory.unlink()


# --------------------------------------------------------------------------- strategies

parameter_values = st.one_of(
    st.builds(lambda v: pb.InferParameter(bool_param=v), st.booleans()),
    st.builds(lambda v: pb.InferParameter(int64_param=v), st.integers(-(2**63), 2**63 - 1)),
    st.builds(lambda v: pb.InferParameter(uint64_param=v), st.integers(0, 2**64 - 1)),
    st.builds(lambda v: pb.InferParameter(double_param=v), st.floats(allow_nan=True, allow_infinity=True)),
    st.builds(lambda v: pb.InferParameter(string_param=v), st.text(max_size=20)),
    st.just(pb.InferParameter()),
)
parameters = st.dictionaries(st.one_of(st.sampled_from(["class_count", "binary_data", "priority", "timeout", *SHM_KEYS]),
                                       st.text(max_size=12)), parameter_values, max_size=3)  # fmt: skip
dims = st.one_of(st.integers(-3, 20), st.sampled_from(HUGE_DIMS))
shapes = st.lists(dims, max_size=6)
datatypes = st.one_of(st.sampled_from(DATATYPES), st.text(max_size=8))
names = st.one_of(st.sampled_from(["images", "probabilities_0", "probabilities_1", "probabilities", "INPUT0",
                                   "OUTPUT0", ""]),
                  st.text(max_size=30))  # fmt: skip


def _bytes(length: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes()


@st.composite
def typed_contents(draw) -> pb.InferTensorContents:
    contents = pb.InferTensorContents()
    for field in draw(st.lists(st.sampled_from(CONTENT_FIELDS), max_size=2, unique=True)):
        count = draw(st.integers(0, 300))
        seed = draw(st.integers(0, 2**32 - 1))
        values = np.random.default_rng(seed)
        if field == "bool_contents":
            contents.bool_contents.extend(values.integers(0, 2, count).astype(bool).tolist())
        elif field == "int_contents":
            contents.int_contents.extend(values.integers(-(2**31), 2**31, count).tolist())
        elif field == "int64_contents":
            contents.int64_contents.extend(values.integers(-(2**63), 2**63 - 1, count).tolist())
        elif field == "uint_contents":
            contents.uint_contents.extend(values.choice([0, 1, 255, 256, 2**32 - 1], count).tolist())
        elif field == "uint64_contents":
            contents.uint64_contents.extend(values.integers(0, 2**63, count).tolist())
        elif field == "bytes_contents":
            contents.bytes_contents.extend(_bytes(int(n), seed) for n in values.integers(0, 8, count))
        else:
            special = values.choice([0.0, 1.0, -1.0, np.nan, np.inf, -np.inf, 1e38], count)
            getattr(contents, field).extend(special.tolist())
    return contents


@st.composite
def random_requests(draw, model_names: list[str]) -> pb.ModelInferRequest:
    """Anything goes: the server must refuse it cleanly (or, by luck, answer it right)."""
    request = pb.ModelInferRequest(
        model_name=draw(st.one_of(st.sampled_from(model_names), st.text(max_size=40),
                                  st.sampled_from(["", "../tiny", "tiny/../tiny-m0", "tiny\x00", "x" * 5000]))),
        model_version=draw(st.one_of(st.sampled_from(["", "1", "2", "0", "-1", "01", "99999999999999999999"]),
                                     st.text(max_size=8))),
        id=draw(st.text(max_size=20)),
    )  # fmt: skip
    for key, value in draw(parameters).items():
        request.parameters[key].CopyFrom(value)
    use_raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(name=draw(names), datatype=draw(datatypes), shape=draw(shapes))
        for key, value in draw(parameters).items():
            tensor.parameters[key].CopyFrom(value)
        if use_raw:
            request.raw_input_contents.append(_bytes(draw(st.integers(0, 4096)), draw(st.integers(0, 2**32 - 1))))
        else:
            tensor.contents.CopyFrom(draw(typed_contents()))
    if draw(st.booleans()):  # a raw-contents count that disagrees with the inputs
        request.raw_input_contents.append(b"\x00" * draw(st.integers(0, 64)))
    for _ in range(draw(st.integers(0, 2))):
        output = request.outputs.add(name=draw(names))
        for key, value in draw(parameters).items():
            output.parameters[key].CopyFrom(value)
    return request


def valid_image_request(model: str, images: np.ndarray, typed: bool = False) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=list(images.shape))
    if typed:
        tensor.contents.uint_contents.extend(images.ravel().tolist())
    else:
        request.raw_input_contents.append(images.tobytes())
    return request


def valid_average_request(model: str, inputs: dict[str, np.ndarray]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    for name, array in inputs.items():
        request.inputs.add(name=name, datatype="FP32", shape=list(array.shape))
        request.raw_input_contents.append(array.astype("<f4").tobytes())
    return request


def valid_bytes_request(items: list[bytes], typed: bool) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=BYTES_MODEL)
    tensor = request.inputs.add(name="INPUT0", datatype="BYTES", shape=[len(items) // 2, 2])
    if typed:
        tensor.contents.bytes_contents.extend(items)
    else:
        request.raw_input_contents.append(serialize_bytes(items))
    return request


MUTATIONS = ("model_name", "version", "input_name", "datatype", "shape", "batch", "huge_dim", "byte_length",
             "raw_and_typed", "typed_field", "drop_input", "duplicate_input", "extra_input", "outputs",
             "class_count", "parameters", "nan", "raw_count", "shm_input", "shm_output", "bytes_datatype",
             "bytes_prefix")  # fmt: skip


@st.composite
def shm_window(draw, exact: int) -> tuple[str, int, int]:
    """(region, byte_size, offset) for a tensor of `exact` bytes (0: an output, any size
    that fits will do): right more often than not, so that requests get through."""
    region = draw(st.sampled_from([REGION] * 5 + ["nope", ""]))
    sizes = [exact] * 4 if exact else [REGION_SIZE // 2] * 4
    size = draw(st.sampled_from([*sizes, 0, exact + 1, max(exact - 1, 0), REGION_SIZE + 1, 2**62]))
    offset = draw(st.sampled_from([0, 0, 0, 0, 8, REGION_SIZE - 8, REGION_SIZE, 2**62]))
    return region, size, offset


def _set_shm(parameters, window: tuple[str, int, int]) -> None:
    region, size, offset = window
    parameters["shared_memory_region"].string_param = region
    parameters["shared_memory_byte_size"].int64_param = size
    if offset:
        parameters["shared_memory_offset"].int64_param = offset


def _index(request: pb.ModelInferRequest, tensor) -> int | None:
    """Where `tensor` is among the inputs (None: absent, or dropped by an earlier mutation)."""
    if tensor is None:
        return None
    return next((index for index, each in enumerate(request.inputs) if each == tensor), None)


def _mutate_shared_memory(draw, request: pb.ModelInferRequest, tensor, mutation: str) -> None:
    """Move an input or an output into the shared-memory region (or a wrong one)."""
    raw = request.raw_input_contents
    index = _index(request, tensor)
    if mutation == "shm_input" and index is not None:
        tensor = request.inputs[index]
        if index < len(raw):
            exact = len(raw[index])
        else:  # typed contents: the region takes their place
            exact = int(np.prod(np.clip(tensor.shape, 0, 1 << 20))) * (1 if tensor.datatype == "UINT8" else 4)
            tensor.ClearField("contents")
        _set_shm(tensor.parameters, draw(shm_window(exact)))
        if index < len(raw) and draw(st.integers(0, 3)):
            del raw[index]  # as tritonclient sends it: no raw contents for an input in shared memory
    elif mutation == "shm_output":
        name = request.outputs[0].name if request.outputs else draw(st.sampled_from(["probabilities", "OUTPUT0"]))
        output = request.outputs[0] if request.outputs else request.outputs.add(name=name)
        _set_shm(output.parameters, draw(shm_window(0)))


def _mutate_bytes(draw, request: pb.ModelInferRequest, tensor, mutation: str) -> None:
    """BYTES where the model wants numbers, and BYTES contents with a broken length prefix."""
    raw = request.raw_input_contents
    index = _index(request, tensor)
    if index is None:
        return
    tensor = request.inputs[index]
    if mutation == "bytes_datatype":
        tensor.datatype = "BYTES"
        if index < len(raw):
            raw[index] = serialize_bytes(draw(st.lists(st.sampled_from(BYTES_ITEMS), max_size=8)))
    elif mutation == "bytes_prefix" and index < len(raw) and len(raw[index]) >= 4:
        at = draw(st.integers(0, len(raw[index]) - 1))
        raw[index] = raw[index][:at] + bytes([raw[index][at] ^ 0x80]) + raw[index][at + 1:]


def _mutate_request(draw, request: pb.ModelInferRequest, mutation: str) -> None:
    """Mutations of the request itself: model name and version, requested outputs, parameters."""
    if mutation == "model_name":
        request.model_name = draw(st.sampled_from(["", "tiny-m9", request.model_name + " ", request.model_name.upper()]))
    elif mutation == "version":
        request.model_version = draw(st.sampled_from(["2", "0", "-1", "latest", "1.0", "1 "]))
    elif mutation == "outputs":
        request.outputs.add(name=draw(names))
    elif mutation == "class_count":
        output = request.outputs.add(name="probabilities")
        output.parameters["class_count"].CopyFrom(draw(parameter_values))
    elif mutation == "parameters":
        for key, value in draw(parameters).items():
            request.parameters[key].CopyFrom(value)


def _mutate_tensor(draw, request: pb.ModelInferRequest, tensor, mutation: str, repository, seed: int) -> None:
    """Mutations of one input tensor: its name, datatype, shape, batch size, or FP32 values."""
    raw = request.raw_input_contents
    if mutation == "input_name" and tensor is not None:
        tensor.name = draw(names)
    elif mutation == "datatype" and tensor is not None:
        tensor.datatype = draw(datatypes)
    elif mutation == "shape" and tensor is not None:
        tensor.shape[:] = draw(shapes)
    elif mutation == "batch" and tensor is not None and tensor.shape:
        # A batch size that may be 0 or past max_batch_size, with matching raw bytes.
        new_batch = draw(st.sampled_from([0, 1, repository.max_batch_size, repository.max_batch_size + 1, 1000]))
        per_item = int(np.prod(tensor.shape[1:])) * (4 if tensor.datatype == "FP32" else 1)
        tensor.shape[0] = new_batch
        index = list(request.inputs).index(tensor)
        if index < len(raw):  # (an input in shared memory has no raw contents)
            # An earlier mutation may have left negative or huge dims: keep the length sane.
            raw[index] = _bytes(max(0, min(new_batch * per_item, 2 * MAX_MESSAGE_SIZE)), seed)
    elif mutation == "huge_dim" and tensor is not None and tensor.shape:
        tensor.shape[draw(st.integers(0, len(tensor.shape) - 1))] = draw(st.sampled_from(HUGE_DIMS))
    elif (mutation == "nan" and tensor is not None and tensor.datatype == "FP32"
          and list(request.inputs).index(tensor) < len(raw)):  # fmt: skip
        index = list(request.inputs).index(tensor)
        whole = len(raw[index]) // 4 * 4  # an earlier byte_length mutation may have left a ragged end
        values = np.frombuffer(raw[index][:whole], dtype="<f4").copy()
        values[:: max(1, len(values) // 3)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        raw[index] = values.tobytes() + raw[index][whole:]


def _mutate_contents(draw, request: pb.ModelInferRequest, tensor, mutation: str) -> None:
    """Mutations of the inputs list and their contents: raw byte lengths, typed fields, added or dropped inputs."""
    raw = request.raw_input_contents
    if mutation == "byte_length" and raw:
        index = draw(st.integers(0, len(raw) - 1))
        length = draw(st.one_of(st.integers(0, len(raw[index]) + 16), st.just(MAX_MESSAGE_SIZE + 1)))
        raw[index] = (raw[index] * (length // max(len(raw[index]), 1) + 1))[:length]
    elif mutation == "raw_and_typed" and tensor is not None:
        tensor.contents.uint_contents.extend([1, 2, 3])
        if not raw:
            raw.extend(b"" for _ in request.inputs)
    elif mutation == "typed_field" and tensor is not None:
        del raw[:]
        tensor.contents.CopyFrom(draw(typed_contents()))
    elif mutation == "drop_input" and tensor is not None:
        index = list(request.inputs).index(tensor)
        del request.inputs[index]
        if index < len(raw):
            del raw[index]
    elif mutation == "duplicate_input" and tensor is not None:
        request.inputs.add().CopyFrom(tensor)
        if list(request.inputs).index(tensor) < len(raw):
            raw.append(raw[list(request.inputs).index(tensor)])
    elif mutation == "extra_input":
        request.inputs.add(name=draw(names), datatype="UINT8", shape=[1])
        if raw:
            raw.append(b"\x01")
    elif mutation == "raw_count" and raw:
        raw.append(b"")


@st.composite
def mutated_requests(draw, repository) -> pb.ModelInferRequest:
    """A valid request with 0..3 mutations; 0 mutations must be answered correctly."""
    images_models = [repository.ensemble, *repository.members]
    classes = len(repository.class_names)
    batch = draw(st.integers(1, repository.max_batch_size))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.integers(0, 4))
    if kind == 4:
        count = 2 * min(batch, 3)  # few elements: one that is not UTF-8 refuses the whole request
        items = draw(st.lists(st.sampled_from(BYTES_ITEMS), min_size=count, max_size=count))
        request = valid_bytes_request(items, typed=draw(st.booleans()))
    elif kind == 0:
        input_names = [f"probabilities_{i}" for i in range(len(repository.members))]
        inputs = {name: rng.random((batch, classes), dtype=np.float32) for name in input_names}
        request = valid_average_request(repository.average, inputs)
    else:
        images = rng.integers(0, 256, (batch, *repository.image_shape), dtype=np.uint8)
        request = valid_image_request(draw(st.sampled_from(images_models)), images, typed=draw(st.booleans()))
    return _mutations(draw, request, repository, seed, 3)


def _mutations(draw, request: pb.ModelInferRequest, repository, seed: int, most: int) -> pb.ModelInferRequest:
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=most)):
        tensor = request.inputs[draw(st.integers(0, len(request.inputs) - 1))] if request.inputs else None
        _mutate_request(draw, request, mutation)
        _mutate_tensor(draw, request, tensor, mutation, repository, seed)
        _mutate_contents(draw, request, tensor, mutation)
        _mutate_shared_memory(draw, request, tensor, mutation)
        _mutate_bytes(draw, request, tensor, mutation)
    return request


@st.composite
def shm_requests(draw, repository) -> pb.ModelInferRequest:
    """A valid request with its inputs (most of them) and its output in the shared-memory
    region at random offsets, then 0..2 mutations. The region's bytes are the inputs:
    random pixels or floats, and valid BYTES contents at its start."""
    kind = draw(st.sampled_from(["images", "average", "bytes"]))
    batch = draw(st.integers(1, 4))
    if kind == "bytes":
        request = valid_bytes_request(list(BYTES_ITEMS[:4]), typed=False)
        sizes = [len(request.raw_input_contents[0])]
    elif kind == "images":
        images = np.zeros((batch, *repository.image_shape), np.uint8)
        request = valid_image_request(draw(st.sampled_from([repository.ensemble, *repository.members])), images)
        sizes = [images.size]
    else:
        inputs = {f"probabilities_{i}": np.zeros((batch, len(repository.class_names)), np.float32)
                  for i in range(len(repository.members))}  # fmt: skip
        request = valid_average_request(repository.average, inputs)
        sizes = [array.nbytes for array in inputs.values()]
    seed = draw(st.integers(0, 2**32 - 1))
    raw = list(request.raw_input_contents)
    del request.raw_input_contents[:]
    for tensor, size, data in zip(request.inputs, sizes, raw):
        if kind == "bytes" or draw(st.integers(0, 3)):
            offset = 0 if kind == "bytes" else draw(st.integers(0, REGION_SIZE - size))
            _set_shm(tensor.parameters, (REGION, size, offset))
        else:
            request.raw_input_contents.append(_bytes(size, seed) if kind == "images" else data)
    if draw(st.integers(0, 3)):
        offset = draw(st.integers(0, REGION_SIZE // 2))
        name = "OUTPUT0" if kind == "bytes" else "probabilities"
        _set_shm(request.outputs.add(name=name).parameters, (REGION, REGION_SIZE - offset, offset))
    return _mutations(draw, request, repository, seed, 2)



# --------------------------------------------------------------------------- checking answers


def shm_window_of(parameters) -> tuple[str, int, int] | None:
    if "shared_memory_region" not in parameters:
        return None
    offset = parameters["shared_memory_offset"].int64_param if "shared_memory_offset" in parameters else 0
    return (parameters["shared_memory_region"].string_param, parameters["shared_memory_byte_size"].int64_param,
            offset)  # fmt: skip


def decoded_inputs(request: pb.ModelInferRequest, region: bytes = b"") -> dict[str, np.ndarray]:
    """The tensors of a request the server accepted, decoded here independently (those in
    shared memory from `region`, its bytes when the request was sent)."""
    arrays = {}
    raw_inputs = iter(request.raw_input_contents)
    for tensor in request.inputs:
        dtype = np.uint8 if tensor.datatype == "UINT8" else np.dtype("<f4")
        window = shm_window_of(tensor.parameters)
        data = None
        if window is not None:
            data = region[window[2]:window[2] + window[1]]
        elif request.raw_input_contents:
            data = next(raw_inputs)
        if tensor.datatype == "BYTES":
            items = deserialize_bytes(data) if data is not None else list(tensor.contents.bytes_contents)
            arrays[tensor.name] = np.array(items, dtype=object).reshape(list(tensor.shape))
            continue
        if data is not None:
            array = np.frombuffer(data, dtype=dtype)
        elif tensor.datatype == "UINT8":
            array = np.array(tensor.contents.uint_contents, dtype=np.uint8)
        else:
            array = np.array(tensor.contents.fp32_contents, dtype=np.float32)
        arrays[tensor.name] = array.reshape(list(tensor.shape))
    return arrays


def expected_probabilities(request: pb.ModelInferRequest, reference: Reference) -> np.ndarray:
    """What an accepted request must be answered, computed in this process (BYTES_MODEL:
    its input, as a list of elements)."""
    inputs = decoded_inputs(request, reference.region)
    if request.model_name == BYTES_MODEL:
        return inputs["INPUT0"]
    if request.model_name == reference.repository.average:
        return reference.average(inputs)
    return reference.images_model(request.model_name, inputs["images"])


def check_outputs(request, outputs: list[tuple[str, str, list[int], bytes]], reference: Reference,
                  region: memoryview | None = None) -> None:  # fmt: skip
    """An accepted request must get the right numbers, the right strings from BYTES_MODEL,
    (or top-k strings, checked elsewhere); `outputs` as (name, datatype, shape, raw), raw
    None for an output written to the shared-memory region (read back from `region`)."""
    expected = expected_probabilities(request, reference)
    # answered in the order asked (the same output may be asked twice: in shared memory, and not)
    windows = [shm_window_of(output.parameters) for output in request.outputs]
    for index, (name, datatype, shape, raw) in enumerate(outputs):
        assert name == ("OUTPUT0" if request.model_name == BYTES_MODEL else "probabilities")
        if raw is None:
            _, size, offset = windows[index]
            raw = bytes(region[offset:offset + size])
        if request.model_name == BYTES_MODEL:
            assert deserialize_bytes(raw[:len(serialize_bytes(list(expected.flat)))]) == list(expected.flat)
            continue
        if datatype == "BYTES":  # classification: "score:index:label", best first
            continue
        got = np.frombuffer(raw[:int(np.prod(shape)) * 4], dtype="<f4").reshape(shape)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, equal_nan=True)


def check_ok_answer(request, response, reference: Reference, region: memoryview | None = None) -> None:
    outputs = [(output.name, output.datatype, list(output.shape),
                None if "shared_memory_region" in output.parameters else raw)
               for output, raw in zip(response.outputs, response.raw_output_contents)]  # fmt: skip
    check_outputs(request, outputs, reference, region)


class FuzzRecord:
    def __init__(self):
        self.statuses: collections.Counter = collections.Counter()
        self.crashes: list[str] = []
        self.valid_checks = 0
        self.ok_checked = 0
        self.ok_kinds: collections.Counter = collections.Counter()  # OK answers over BYTES, shared memory


def test_fuzz_model_infer(fuzz_server, fuzz_region, tiny_repository, capsys):
    reference = Reference(tiny_repository)
    stub = fuzz_server.stub()
    record = FuzzRecord()
    models = [tiny_repository.ensemble, *tiny_repository.members, tiny_repository.average]
    probe_rng = np.random.default_rng(1)
    started = time.perf_counter()

    def send(request) -> tuple[str, pb.ModelInferResponse | None, str]:
        try:
            return "OK", stub.ModelInfer(request, timeout=20), ""
        except grpc.RpcError as error:
            return error.code().name, None, error.details() or ""

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(request=st.one_of(random_requests([*models, BYTES_MODEL]), mutated_requests(tiny_repository),
                             mutated_requests(tiny_repository), shm_requests(tiny_repository)))
    def one_request(request):
        reference.region = bytes(fuzz_region.buf[:REGION_SIZE])
        status, response, details = send(request)
        record.statuses[status] += 1
        if status not in ALLOWED or (status != "OK" and not details.strip()):
            record.crashes.append(f"{status}: {details!r} for {request.model_name!r}")
        assert status in ALLOWED, f"{status}: {details}"
        assert status == "OK" or details.strip(), f"{status} without a message"
        if status == "OK" and request.inputs:
            check_ok_answer(request, response, reference, fuzz_region.buf)
            record.ok_checked += 1
            record.ok_kinds["BYTES"] += request.model_name == BYTES_MODEL
            record.ok_kinds["shm"] += any(shm_window_of(t.parameters) for t in (*request.inputs, *request.outputs))
        # A valid request right after must still be answered, and right.
        model = models[record.valid_checks % 3]
        images = probe_rng.integers(0, 256, (int(probe_rng.integers(1, 5)), *tiny_repository.image_shape), dtype=np.uint8)
        status, response, details = send(valid_image_request(model, images))
        assert status == "OK", f"valid request after a fuzzed one: {status}: {details}"
        got = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(len(images), -1)
        np.testing.assert_allclose(got, reference.images_model(model, images), rtol=1e-5, atol=1e-6)
        record.valid_checks += 1

    one_request()
    elapsed = time.perf_counter() - started
    assert fuzz_server.process.poll() is None, "the server exited during fuzzing"
    with capsys.disabled():
        print(f"\nfuzz: {sum(record.statuses.values())} requests in {elapsed:.1f} s; statuses "
              + ", ".join(f"{name} {count}" for name, count in record.statuses.most_common())
              + f"; crashes {len(record.crashes)}; OK answers checked {record.ok_checked} "
              f"(BYTES {record.ok_kinds['BYTES']}, shared memory {record.ok_kinds['shm']}); "
              f"valid requests in between {record.valid_checks}, all correct; server alive")
    assert not record.crashes
    assert record.statuses["OK"] > 0 and record.statuses["INVALID_ARGUMENT"] > 0
