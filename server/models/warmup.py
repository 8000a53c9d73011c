"""Warm-up: inferences run on a freshly loaded model version before it turns ready.

A model's config.pbtxt may hold Triton's `model_warmup` entries; each names a batch
size, a count and, per input, its data: `zero_data`, `random_data`, or
`input_data_file` (raw bytes of the input, in the model's `warmup/` folder, as in
Triton). Every entry runs `count` times (at least once). Without entries the model
gets today's single automatic warm-up (`OnnxModel.warm_up`: one batch of zeros).

The first requests after a reload then find the session's lazy allocations done, and a
graph that loads but cannot run fails its load instead of its first requests.
"""

from __future__ import annotations

import logging

import numpy as np

from ensemble_serving.model_config import ModelConfigError, datatype_name
from ensemble_serving.tensors import NUMPY_DTYPES, deserialize_bytes, float32_to_bf16
from server.models.repository import ModelSpec, RepositoryError, inside_model_folder
from server.models.runtime import OnnxModel

log = logging.getLogger(__name__)

WARMUP_FOLDER = "warmup"


def warm_up(model: OnnxModel) -> None:
    """Run the config's model_warmup entries (or the automatic warm-up) on `model`."""
    entries = model.spec.config.model_warmup
    if not entries:
        model.warm_up()
        return
    for entry in entries:
        inputs = warmup_inputs(model.spec, entry)
        for _ in range(max(entry.count, 1)):
            model.run(inputs)
        log.info("model %s version %s: warm-up %r ran %d time(s)", model.spec.name, model.version,
                 entry.name, max(entry.count, 1))


def warmup_inputs(spec: ModelSpec, entry) -> dict[str, np.ndarray]:
    """The inputs of one model_warmup entry, batch dimension included when the model batches."""
    where = f"model {spec.name!r}: model_warmup {entry.name!r}"
    declared = {tensor.name for tensor in spec.inputs}
    if set(entry.inputs) != declared:
        raise RepositoryError(f"{where}: gives inputs {sorted(entry.inputs)}; the model's are {sorted(declared)}")
    batch = [max(entry.batch_size, 1)] if spec.batching else []
    rng = np.random.default_rng(0)
    return {name: _input_data(spec, where, name, entry.inputs[name], batch, rng) for name in entry.inputs}


def _input_data(spec: ModelSpec, where: str, name: str, warmup_input, batch: list[int],
                rng: np.random.Generator) -> np.ndarray:  # fmt: skip
    try:
        datatype = datatype_name(warmup_input.data_type)
        dtype = np.dtype(object) if datatype == "BYTES" else np.dtype(NUMPY_DTYPES[datatype])
    except (ModelConfigError, KeyError):
        raise RepositoryError(f"{where}: input {name!r} has an unsupported data_type") from None
    shape = [*batch, *warmup_input.dims]
    kind = warmup_input.WhichOneof("input_data_type")
    if datatype == "BYTES" and kind != "input_data_file":
        return np.full(shape, "", dtype=object)  # empty strings: random text warms nothing more up
    if datatype == "BF16" and kind == "random_data":
        return float32_to_bf16(rng.random(shape, dtype=np.float32))
    if kind == "random_data":
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            return rng.integers(max(info.min, -128), min(info.max, 127) + 1, shape).astype(dtype)
        return rng.random(shape).astype(dtype)
    if kind == "input_data_file":
        path = inside_model_folder(spec.directory / WARMUP_FOLDER / warmup_input.input_data_file, spec.directory,
                                   "model_warmup input_data_file", spec.name)
        try:
            data = _file_values(path.read_bytes(), dtype)
        except (OSError, ValueError) as error:
            raise RepositoryError(f"{where}: input {name!r}: {error}") from None
        one = int(np.prod(warmup_input.dims))
        if data.size != one:
            raise RepositoryError(f"{where}: input {name!r}: {path} holds {data.size} values; dims "
                                  f"{list(warmup_input.dims)} need {one}")
        return np.broadcast_to(data.reshape(warmup_input.dims), shape).copy()
    return np.zeros(shape, dtype)  # zero_data, or no choice made


def _file_values(data: bytes, dtype: np.dtype) -> np.ndarray:
    """An input_data_file's values: raw little-endian values, or for BYTES length-prefixed
    UTF-8 elements (as Triton reads them)."""
    if dtype != object:
        return np.frombuffer(data, dtype=dtype)
    return np.array([item.decode("utf-8") for item in deserialize_bytes(data)], dtype=object)
