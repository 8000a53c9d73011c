"""PyTorch serving module -> one self-contained ONNX graph with a dynamic batch.

We use torch.onnx's dynamo exporter (torch.export + onnxscript), the default since
torch 2.9: the TorchScript exporter is deprecated and warns on every call. For our
modules the dynamo path gives a clean opset-18 graph (BatchNorm folded into Conv,
no local functions, a symbolic "batch" dimension on input and output). Its only cost
is a few seconds of tracing per model.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings

import onnx
import torch

from exporter.errors import ExportError, one_line

OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
BATCH_DIM = "batch"


def export_module(module: torch.nn.Module, input_shape: tuple[int, int, int], opset: int = OPSET) -> onnx.ModelProto:
    """Export `module` (uint8 [N, H, W, C] -> float32 [N, classes]) and check the result.

    The example batch has 2 images: torch.export specializes a dimension whose example
    size is 1, which would fix the batch.
    """
    example = torch.zeros((2, *input_shape), dtype=torch.uint8)
    # The exporter narrates each phase on stdout and warns about internals; a failure
    # still raises, and we report that.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module.eval(),
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim(BATCH_DIM)},),
                external_data=False,
                optimize=True,
                verbose=False,
            )
        except Exception as error:  # noqa: BLE001 - torch.export raises many kinds
            raise ExportError(f"torch.onnx.export failed: {one_line(error)}") from None
    model = program.model_proto
    name_batch_dimension(model)
    check_model(model, input_shape)
    return model


def name_batch_dimension(model: onnx.ModelProto) -> None:
    """Call the symbolic first dimension of every graph input and output "batch"."""
    for value in [*model.graph.input, *model.graph.output]:
        first = value.type.tensor_type.shape.dim[0]
        if not first.HasField("dim_value"):
            first.dim_param = BATCH_DIM


def check_model(model: onnx.ModelProto, input_shape: tuple[int, int, int] | None = None) -> None:
    """onnx.checker full check, the opset, and (for image models) the serving signature."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ExportError(f"the exported ONNX graph is invalid: {one_line(error)}") from None
    opset = max((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), default=0)
    if opset < OPSET:
        raise ExportError(f"the exported ONNX graph uses opset {opset}, expected >= {OPSET}")
    if any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in model.graph.initializer):
        raise ExportError("the exported ONNX graph refers to external data; expected one self-contained file")
    if input_shape is not None:
        _check_signature(model, input_shape)


def _check_signature(model: onnx.ModelProto, input_shape: tuple[int, int, int]) -> None:
    graph = model.graph
    want_in = (INPUT_NAME, onnx.TensorProto.UINT8, [BATCH_DIM, *input_shape])
    want_out_name, want_out_type = OUTPUT_NAME, onnx.TensorProto.FLOAT
    if len(graph.input) != 1 or _describe(graph.input[0]) != want_in:
        got = [_describe(value) for value in graph.input]
        raise ExportError(f"the ONNX graph's inputs are {got}, expected one {want_in}")
    if len(graph.output) != 1:
        raise ExportError(f"the ONNX graph has {len(graph.output)} outputs, expected 1 ({OUTPUT_NAME})")
    name, elem_type, dims = _describe(graph.output[0])
    if name != want_out_name or elem_type != want_out_type or len(dims) != 2 or dims[0] != BATCH_DIM:
        raise ExportError(f"the ONNX graph's output is {(name, elem_type, dims)}, expected ({OUTPUT_NAME!r}, FLOAT, [batch, classes])")


def _describe(value: onnx.ValueInfoProto) -> tuple[str, int, list]:
    tensor = value.type.tensor_type
    dims = [dim.dim_value if dim.HasField("dim_value") else dim.dim_param for dim in tensor.shape.dim]
    return value.name, tensor.elem_type, dims


def set_metadata(model: onnx.ModelProto, metadata: dict[str, object]) -> None:
    """Replace model-level metadata_props; non-string values are stored as JSON."""
    existing = {entry.key: entry.value for entry in model.metadata_props}
    for key, value in metadata.items():
        existing[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, existing)


def serialize(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()
