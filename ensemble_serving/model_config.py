"""Read and write Triton `config.pbtxt` files through the generated ModelConfig proto.

A config.pbtxt is a `inference.ModelConfig` message in protobuf text format
(docs/design.md §3). Parsing goes through protobuf's text_format, never by hand, so a
file that Triton would reject is rejected here too, with protobuf's line:column
message wrapped in a `ModelConfigError` that names the file.
"""

from __future__ import annotations

import os
from pathlib import Path

from google.protobuf import text_format

from ensemble_serving.protocol import model_config_pb2

ModelConfig = model_config_pb2.ModelConfig
CONFIG_FILENAME = "config.pbtxt"

# Protocol datatype names (as in ModelMetadata and ModelInfer) <-> config enum values.
_DATATYPE_BY_ENUM = {
    model_config_pb2.TYPE_BOOL: "BOOL",
    model_config_pb2.TYPE_UINT8: "UINT8",
    model_config_pb2.TYPE_UINT16: "UINT16",
    model_config_pb2.TYPE_UINT32: "UINT32",
    model_config_pb2.TYPE_UINT64: "UINT64",
    model_config_pb2.TYPE_INT8: "INT8",
    model_config_pb2.TYPE_INT16: "INT16",
    model_config_pb2.TYPE_INT32: "INT32",
    model_config_pb2.TYPE_INT64: "INT64",
    model_config_pb2.TYPE_FP16: "FP16",
    model_config_pb2.TYPE_FP32: "FP32",
    model_config_pb2.TYPE_FP64: "FP64",
    model_config_pb2.TYPE_STRING: "BYTES",
    model_config_pb2.TYPE_BF16: "BF16",
}
_ENUM_BY_DATATYPE = {name: enum for enum, name in _DATATYPE_BY_ENUM.items()}


class ModelConfigError(ValueError):
    """A config.pbtxt that is missing, unreadable or not a valid ModelConfig."""


def datatype_name(data_type: int) -> str:
    """Config enum (TYPE_FP32) -> protocol datatype name ("FP32")."""
    try:
        return _DATATYPE_BY_ENUM[data_type]
    except KeyError:
        raise ModelConfigError(f"unsupported data_type {model_config_pb2.DataType.Name(data_type)}") from None


def datatype_enum(name: str) -> int:
    """Protocol datatype name ("FP32") -> config enum (TYPE_FP32)."""
    try:
        return _ENUM_BY_DATATYPE[name]
    except KeyError:
        raise ModelConfigError(
            f"unknown datatype {name!r}; expected one of {', '.join(sorted(_ENUM_BY_DATATYPE))}"
        ) from None


def parse_model_config(text: str, source: str = "<string>") -> ModelConfig:
    config = ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise ModelConfigError(f"{source}: not a valid Triton ModelConfig: {error}") from None
    return config


def load_model_config(path: str | os.PathLike) -> ModelConfig:
    """Parse `path` (a config.pbtxt, or a model directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILENAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelConfigError(f"{path}: no such file (every model directory needs a {CONFIG_FILENAME})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ModelConfigError(f"{path}: cannot read: {error}") from None
    return parse_model_config(text, source=str(path))


def format_model_config(config: ModelConfig) -> str:
    return text_format.MessageToString(config)


def save_model_config(config: ModelConfig, path: str | os.PathLike) -> Path:
    """Write `config` as text format to `path` (a file, or a model directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILENAME
    path.write_text(format_model_config(config), encoding="utf-8")
    return path
