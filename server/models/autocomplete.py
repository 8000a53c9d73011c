"""Config auto-complete, as Triton does it for ONNX models: fill in from the ONNX graph
what a model's config.pbtxt leaves out, or all of it when there is no config.pbtxt.

Two steps, in Triton's order:

- `complete_backend_fields` (Triton's server side, always on): with neither platform nor
  backend, a version folder holding model.onnx makes the model `onnxruntime`; then an
  onnxruntime model gets platform `onnxruntime_onnx` and default_model_filename
  `model.onnx` where they are empty.
- `complete_from_graph` (Triton's onnxruntime backend; off with
  --disable-auto-complete-config): only when the config lacks inputs or outputs.
  max_batch_size: when every graph input and output has a dynamic first dimension, the
  model can batch; an unset max_batch_size then becomes the default-max-batch-size (4
  unless --backend-config says otherwise), and a max_batch_size above 1 turns dynamic
  batching on unless the config chose a batcher. A model that cannot batch but whose
  config asks for a max_batch_size fails. The missing side (inputs, outputs or both) is
  then filled from the graph: names, datatypes and dims (without the batch dimension when
  the model batches; a dynamic dimension is -1; a rank-0 tensor gets dims [1], and an
  empty reshape when batching, as Triton writes it).

A config that gives both inputs and outputs is left as it is, and checked against the
graph when the session loads (server/models/runtime.py), as Triton's backend does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from ensemble_serving.model_config import ModelConfig, datatype_enum
from ensemble_serving.tensors import ONNX_TYPES
from server.config import TRITON_DEFAULT_MAX_BATCH_SIZE, ServerSettings

ONNX_BACKEND = "onnxruntime"
ONNX_PLATFORM = "onnxruntime_onnx"
ONNX_FILENAME = "model.onnx"


class AutoCompleteError(Exception):
    """The graph cannot complete the config, or contradicts what the config says."""


@dataclass(frozen=True)
class AutoComplete:
    """What auto-complete may do: on or off, and the max_batch_size it gives a batching model."""

    enabled: bool = True
    default_max_batch_size: int = TRITON_DEFAULT_MAX_BATCH_SIZE

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> AutoComplete:
        return cls(not settings.disable_auto_complete_config, settings.default_max_batch_size)


@dataclass(frozen=True)
class GraphTensor:
    name: str
    onnx_type: str  # onnxruntime's type string: "tensor(float)"
    dims: tuple[int, ...]  # -1 where the graph's dimension is symbolic or unknown


def complete_backend_fields(config: ModelConfig, version_folders: list[Path]) -> None:
    """platform / backend / default_model_filename, from the files (Triton's server side:
    it looks at the first version folder)."""
    if not config.backend:
        if config.platform == ONNX_PLATFORM or config.default_model_filename == ONNX_FILENAME:
            config.backend = ONNX_BACKEND
        elif not config.platform and not config.default_model_filename and version_folders:
            if (version_folders[0] / ONNX_FILENAME).exists():  # a file, or a folder for a large model
                config.backend = ONNX_BACKEND
    if config.backend == ONNX_BACKEND:
        config.platform = config.platform or ONNX_PLATFORM
        config.default_model_filename = config.default_model_filename or ONNX_FILENAME


def needs_graph(config: ModelConfig) -> bool:
    return not config.input or not config.output


def complete_from_graph(config: ModelConfig, model_file: Path, default_max_batch_size: int) -> None:
    """Fill max_batch_size, dynamic batching and the missing inputs or outputs from the graph
    in `model_file`; AutoCompleteError where the graph cannot (or the config contradicts it)."""
    inputs, outputs = read_graph(model_file)
    _complete_max_batch_size(config, inputs, outputs, default_max_batch_size)
    batching = config.max_batch_size > 0
    if not config.input:
        _add_tensors(config.input, inputs, batching, "input")
    if not config.output:
        _add_tensors(config.output, outputs, batching, "output")


def read_graph(model_file: Path) -> tuple[list[GraphTensor], list[GraphTensor]]:
    """The graph's inputs and outputs, read through an onnxruntime session (as Triton's
    backend does: the server never imports onnx). No optimization, one thread: the
    session only answers what the graph declares."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(model_file), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types for bad files
        raise AutoCompleteError(f"onnxruntime cannot read {model_file} to auto-complete the config: {error}") from None

    def tensors(nodes) -> list[GraphTensor]:
        return [GraphTensor(node.name, node.type, tuple(_dim(dim) for dim in node.shape)) for node in nodes]

    return tensors(session.get_inputs()), tensors(session.get_outputs())


def _dim(dim) -> int:
    """A graph dimension as Triton writes it: its size, or -1 when symbolic ("batch") or unknown."""
    return dim if isinstance(dim, int) and dim >= 0 else -1


def _complete_max_batch_size(config: ModelConfig, inputs: list[GraphTensor], outputs: list[GraphTensor],
                             default_max_batch_size: int) -> None:  # fmt: skip
    fixed = [tensor for tensor in (*inputs, *outputs) if not tensor.dims or tensor.dims[0] != -1]
    if fixed:
        if config.max_batch_size != 0:
            tensor = fixed[0]
            first = f"a first dimension of {tensor.dims[0]}" if tensor.dims else "no dimensions"
            raise AutoCompleteError(
                f"autofill failed: model does not support batching while non-zero max_batch_size is specified "
                f"(max_batch_size {config.max_batch_size}, but {tensor.name!r} has {first} in the ONNX graph; "
                f"batching needs every input and output to have a dynamic first dimension)")
        return
    if config.max_batch_size == 0:
        config.max_batch_size = max(default_max_batch_size, 0)
    has_batcher = config.WhichOneof("scheduling_choice") is not None
    if config.max_batch_size > 1 and not has_batcher:
        config.dynamic_batching.SetInParent()


def _add_tensors(target, tensors: list[GraphTensor], batching: bool, kind: str) -> None:
    for tensor in tensors:
        datatype = ONNX_TYPES.get(tensor.onnx_type)
        if datatype is None:
            raise AutoCompleteError(f"{kind} {tensor.name!r} has ONNX type {tensor.onnx_type}, which has no "
                                    f"Triton datatype served here (known: {', '.join(sorted(ONNX_TYPES))})")
        entry = target.add(name=tensor.name, data_type=datatype_enum(datatype))
        entry.dims.extend(tensor.dims[1:] if batching else tensor.dims)
        if not entry.dims:  # Triton's spelling of a scalar (per batch item when batching)
            entry.dims.append(1)
            if batching:
                entry.reshape.SetInParent()
