"""A model folder's files, as model control sees them: what a load request brings, and
fingerprints that tell a poll what changed since the last one.

A fingerprint hashes each file's path, size and modification time, not its bytes: a poll
every few seconds must not read every model.onnx of the repository again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
from google.protobuf import json_format

from ensemble_serving.model_config import CONFIG_FILENAME, ModelConfig, save_model_config
from server.errors import InferenceError
from server.models.repository import RepositoryError, inside_model_folder


def check_name(name: str, action: str) -> None:
    """A model name is one folder of the repository: never a path out of it."""
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise InferenceError(grpc.StatusCode.NOT_FOUND, f"failed to {action} {name!r}: not a model name")


def parse_config(name: str, text: str) -> ModelConfig:
    """A load request's `config` parameter: a ModelConfig in JSON, as Triton takes it."""
    config = ModelConfig()
    try:
        json_format.Parse(text, config)
    except json_format.ParseError as error:
        raise InferenceError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"failed to load {name!r}: the 'config' parameter is not a ModelConfig in JSON: "
                             f"{error}") from None
    return config


def write_files(directory: Path, files: dict[str, bytes], config: ModelConfig) -> Path:
    """A load request's model files, in a scratch model folder (with its config)."""
    directory.mkdir(parents=True)
    for relative, data in files.items():
        path = directory / relative
        try:
            inside_model_folder(path, directory, "file", directory.name)
        except RepositoryError as error:
            raise InferenceError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        except OSError as error:  # a name too long for the file system, a path through a file, ...
            # Triton's status and wording for a load whose files cannot be laid out (its client
            # example matches on both); the OS's reason after it.
            raise InferenceError(grpc.StatusCode.INTERNAL,
                                 f"failed to load {directory.name!r}, failed to poll from model repository: "
                                 f"cannot write the model file {relative[:80]!r}: {error.strerror}") from None
    save_model_config(config, directory / CONFIG_FILENAME)
    return directory


def files_fingerprint(paths: list[Path], root: Path) -> str:
    digest = hashlib.sha1()
    for path in sorted(paths):
        try:
            stat = path.stat()
        except OSError:
            continue
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def shared_files(directory: Path) -> list[Path]:
    """The model folder's files outside its version folders (config.pbtxt, labels, warmup/)."""
    return [path for path in directory.rglob("*") if path.is_file()
            and not path.relative_to(directory).parts[0].isdigit()]  # fmt: skip


def version_fingerprint(directory: Path, version: str) -> str:
    """What a loaded version depends on: the shared files and its own version folder."""
    version_files = [path for path in (directory / version).rglob("*") if path.is_file()]
    return files_fingerprint(shared_files(directory) + version_files, directory)


def folder_fingerprint(directory: Path) -> str:
    return files_fingerprint([path for path in directory.rglob("*") if path.is_file()], directory)
