"""The exporter's errors: each carries one line a person can act on.

The CLI prints the message and exits non-zero; the Python API raises. Either way
nothing has been written to the model repository when one of these is raised.
"""


class ExportError(Exception):
    """Bad input (run dir, weights, options, existing models): exit code 2."""

    exit_code = 2


class ParityError(ExportError):
    """onnxruntime disagrees with PyTorch beyond tolerance: the model is refused (exit code 1)."""

    exit_code = 1


class QuantizationError(ExportError):
    """The int8 model loses more accuracy than allowed: it is refused (exit code 1)."""

    exit_code = 1


def one_line(error: BaseException, limit: int = 300) -> str:
    """Collapse a (possibly multi-line) library error into one short line."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
