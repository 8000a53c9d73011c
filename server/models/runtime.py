"""onnxruntime sessions: which execution provider, which optimizations, which threads.

`choose_providers` turns `--device auto|cpu|cuda` into onnxruntime's provider list
(`--device cuda` without a usable CUDA provider is a start-up error). `OnnxModel`
wraps one InferenceSession of one model version: it checks that the graph matches the
model's config.pbtxt, records the provider the session really runs on (onnxruntime
silently drops CUDA when its libraries are missing; we notice and say so), and runs
inference. `run` is called from worker threads: onnxruntime releases the GIL while it
computes, and one session may be run from several threads at once.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ensemble_serving.tensors import ONNX_TYPES
from server.models.repository import ModelSpec, RepositoryError, TensorSpec

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

class DeviceError(Exception):
    """The requested device cannot be used (a start-up error)."""


@dataclass(frozen=True)
class SessionSettings:
    device: str = "auto"  # auto | cpu | cuda
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    # onnxruntime's worker threads busy-wait for work by default. On a server whose cores
    # are shared (several models, the gRPC loop, other processes) that burns the CPU the
    # others need; measured here it made a CPU-bound model slower, so it is off by default.
    spinning: bool = False
    # One intra-op thread pool for every session of the process instead of one per session:
    # the members of an ensemble then share the cores instead of oversubscribing them.
    global_thread_pool: bool = False


_global_pool_sizes: tuple[int, int] | None = None


def _use_global_thread_pool(settings: SessionSettings) -> None:
    """Create onnxruntime's process-wide thread pools (once, before the first session)."""
    global _global_pool_sizes
    sizes = (settings.intra_op_threads, settings.inter_op_threads)
    if _global_pool_sizes is None:
        ort.capi._pybind_state.set_global_thread_pool_sizes(*sizes)
        _global_pool_sizes = sizes
    elif _global_pool_sizes != sizes:
        raise DeviceError(f"onnxruntime's global thread pool exists with sizes {_global_pool_sizes}; "
                          f"cannot make it {sizes} in the same process")


def cuda_available() -> bool:
    return CUDA in ort.get_available_providers()


def choose_providers(device: str, instance_kind: str = "KIND_AUTO") -> list[str]:
    """Provider list for a session. `--device` decides; with `auto` a config.pbtxt
    instance_group of KIND_CPU keeps that model on the CPU."""
    if device == "cpu" or (device == "auto" and instance_kind == "KIND_CPU"):
        return [CPU]
    if device == "cuda":
        if not cuda_available():
            raise DeviceError(
                f"--device cuda, but onnxruntime {ort.__version__} has no {CUDA} "
                f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu "
                f"(the 'gpu' extra) on a machine with a CUDA driver, or use --device auto or cpu"
            )
        return [CUDA, CPU]
    if device != "auto":
        raise DeviceError(f"unknown device {device!r}; expected auto, cpu or cuda")
    return [CUDA, CPU] if cuda_available() else [CPU]


# config.pbtxt `parameters` that tune a model's session, as Triton's onnxruntime backend
# reads them (string values), plus onnxruntime's own spinning keys (our extension: Triton
# leaves spinning at onnxruntime's default, on). A model's parameter wins over the flag.
_THREAD_PARAMETERS = {"intra_op_thread_count": "intra_op_num_threads", "inter_op_thread_count": "inter_op_num_threads"}
_SWITCH_PARAMETERS = {"enable_mem_arena": "enable_cpu_mem_arena", "enable_mem_pattern": "enable_mem_pattern"}
_SPINNING_PARAMETERS = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")
SESSION_PARAMETERS = (*_THREAD_PARAMETERS, "execution_mode", *_SWITCH_PARAMETERS, *_SPINNING_PARAMETERS)
_TRUE, _FALSE = ("true", "on", "yes", "1"), ("false", "off", "no", "0")


def session_parameters(spec: ModelSpec) -> dict[str, str]:
    """The model's config.pbtxt parameters that tune its session: {key: value}."""
    return {key: value.string_value.strip() for key, value in spec.config.parameters.items()
            if key in SESSION_PARAMETERS}  # fmt: skip


def _session_options(settings: SessionSettings, spec: ModelSpec) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if settings.global_thread_pool:
        _use_global_thread_pool(settings)
        options.use_per_session_threads = False
    else:
        options.intra_op_num_threads = settings.intra_op_threads
        options.inter_op_num_threads = settings.inter_op_threads
    spinning = {key: "1" if settings.spinning else "0" for key in _SPINNING_PARAMETERS}
    for key, value in session_parameters(spec).items():
        _apply_parameter(options, spinning, key, value, spec.name, settings)
    for key, value in spinning.items():
        options.add_session_config_entry(key, value)
    return options


def _apply_parameter(options: ort.SessionOptions, spinning: dict[str, str], key: str, value: str, model: str,
                     settings: SessionSettings) -> None:  # fmt: skip
    """One config.pbtxt session parameter; a bad value fails the model's load, naming it."""
    def bad(expected: str) -> RepositoryError:
        return RepositoryError(f"model {model!r}: config.pbtxt parameter {key!r} must be {expected}, got {value!r}")

    if key in _THREAD_PARAMETERS:
        if not value.isdigit():
            raise bad("a whole number of threads (0: onnxruntime decides)")
        if not settings.global_thread_pool:  # the shared pool's size is the server's (as in Triton)
            setattr(options, _THREAD_PARAMETERS[key], int(value))
    elif key == "execution_mode":
        if value not in ("0", "1"):
            raise bad("0 (sequential) or 1 (parallel)")
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL if value == "1" else ort.ExecutionMode.ORT_SEQUENTIAL
    elif value.lower() not in _TRUE + _FALSE:
        raise bad("true or false")
    elif key in _SWITCH_PARAMETERS:
        setattr(options, _SWITCH_PARAMETERS[key], value.lower() in _TRUE)
    else:
        spinning[key] = "1" if value.lower() in _TRUE else "0"


def _check_tensor(kind: str, spec: TensorSpec, onnx_type: str, onnx_shape: list, batching: bool, model: str) -> None:
    datatype = ONNX_TYPES.get(onnx_type, onnx_type)
    if datatype != spec.datatype:
        raise RepositoryError(f"model {model!r}: {kind} {spec.name!r} is {spec.datatype} in config.pbtxt "
                              f"but {datatype} in the ONNX graph")
    expected = spec.shape(batching)
    # Symbolic or unknown graph dimensions (strings, None) accept anything; a fixed one must
    # match the config, and a fixed batch dimension cannot take the batches we form.
    mismatch = len(onnx_shape) != len(expected) or any(
        isinstance(actual, int) and actual >= 0 and declared != actual
        for declared, actual in zip(expected, onnx_shape)
    )
    if mismatch:
        raise RepositoryError(f"model {model!r}: {kind} {spec.name!r} has shape {expected} in config.pbtxt "
                              f"but {onnx_shape} in the ONNX graph")


class OnnxModel:
    """One loaded ONNX model version."""

    def __init__(self, spec: ModelSpec, version: str, settings: SessionSettings):
        self.spec = spec
        self.version = version
        kind = self._instance_kind(spec)
        self.requested_providers = choose_providers(settings.device, kind)
        path: Path = spec.model_file(version)
        try:
            options = _session_options(settings, spec)
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=self.requested_providers)
        except RepositoryError:
            raise
        except Exception as error:  # onnxruntime raises its own exception types for bad files
            raise RepositoryError(f"model {spec.name!r} version {version}: onnxruntime cannot load "
                                  f"{path}: {error}") from None
        self.provider = self.session.get_providers()[0]
        self.fell_back_to_cpu = self.requested_providers[0] == CUDA and self.provider != CUDA
        if self.fell_back_to_cpu:
            if settings.device == "cuda":
                raise DeviceError(f"model {spec.name!r}: --device cuda, but onnxruntime could not create a "
                                  f"CUDA session (it fell back to {self.provider}); check the CUDA/cuDNN libraries")
            log.warning("model %s version %s: CUDA was available but the session fell back to %s",
                        spec.name, version, self.provider)
        self._check_signature()
        self.output_names = [tensor.name for tensor in spec.outputs]
        # numpy has no bfloat16, so onnxruntime's plain `run` cannot take or give BF16:
        # models with BF16 tensors run through OrtValues (`_run_bf16`).
        self._bf16_inputs = {tensor.name for tensor in spec.inputs if tensor.datatype == "BF16"}
        self._bf16_outputs = {tensor.name for tensor in spec.outputs if tensor.datatype == "BF16"}
        if self._bf16_inputs or self._bf16_outputs:
            self.run = self._run_bf16

    @staticmethod
    def _instance_kind(spec: ModelSpec) -> str:
        groups = spec.config.instance_group
        return groups[0].Kind.Name(groups[0].kind) if groups else "KIND_AUTO"

    def _check_signature(self) -> None:
        """config.pbtxt must describe the graph: every input (all of them), every output it
        declares, with the same datatypes and compatible shapes."""
        name = self.spec.name
        graph_inputs = {node.name: node for node in self.session.get_inputs()}
        graph_outputs = {node.name: node for node in self.session.get_outputs()}
        declared_inputs = {spec.name for spec in self.spec.inputs}
        if declared_inputs != set(graph_inputs):
            raise RepositoryError(f"model {name!r}: config.pbtxt inputs {sorted(declared_inputs)} differ from "
                                  f"the ONNX graph's inputs {sorted(graph_inputs)}")
        for kind, specs, graph in (("input", self.spec.inputs, graph_inputs),
                                   ("output", self.spec.outputs, graph_outputs)):
            for spec in specs:
                if spec.name not in graph:
                    raise RepositoryError(f"model {name!r}: config.pbtxt output {spec.name!r} is not an "
                                          f"output of the ONNX graph (it has {sorted(graph)})")
                node = graph[spec.name]
                _check_tensor(kind, spec, node.type, list(node.shape), self.spec.batching, name)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """BYTES inputs are object arrays of str, which onnxruntime copies with their NULs;
        BYTES outputs come back the same way."""
        return dict(zip(self.output_names, self.session.run(self.output_names, inputs)))

    def _run_bf16(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`run` for a model with BF16 tensors, which the server holds as uint16 bit patterns.
        The outputs are bound to host memory, so that they are readable whatever the provider."""
        binding = self.session.io_binding()
        for name, array in inputs.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, _ONNX_BFLOAT16)
                                        if name in self._bf16_inputs else ort.OrtValue.ortvalue_from_numpy(array))
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return {name: _bf16_bits(value) if name in self._bf16_outputs else value.numpy()
                for name, value in zip(self.output_names, binding.get_outputs())}  # fmt: skip

    def warm_up(self) -> None:
        """One inference on zeros so that the first client request does not pay for
        lazy allocations. Skipped when a dimension other than the batch is variable, and for
        BYTES inputs: zeros are valid for any numeric graph, but no string is for every
        string graph (one that parses numbers refuses ""); a model_warmup entry gives real data."""
        if any(dim < 0 for spec in self.spec.inputs for dim in spec.dims):
            return
        if any(spec.dtype == object for spec in self.spec.inputs):
            return
        batch = [1] if self.spec.batching else []
        self.run({spec.name: np.zeros([*batch, *spec.dims], spec.dtype) for spec in self.spec.inputs})


_ONNX_BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16 (the server does not import onnx)


def _bf16_bits(value: ort.OrtValue) -> np.ndarray:
    """A BF16 OrtValue's elements as uint16 bit patterns. OrtValue.numpy() refuses BF16, so
    its bytes are copied from where onnxruntime holds them (host memory: `_run_bf16` binds
    the outputs there)."""
    if value.device_name().lower() != "cpu":
        raise RuntimeError(f"a BF16 output on device {value.device_name()!r} cannot be read back")
    data = ctypes.string_at(value.data_ptr(), value.tensor_size_in_bytes())
    return np.frombuffer(data, dtype="<u2").reshape(value.shape())
