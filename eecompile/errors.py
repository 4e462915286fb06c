"""The exceptions eecompile raises. Each message names the culprit and says what to do."""

from __future__ import annotations


class EECompileError(Exception):
    """Base class: a user-facing error. The CLI prints it as one line and exits with status 1."""

    exit_code = 1


class SpecError(EECompileError):
    """The YAML spec is malformed or does not fit the model (the message names the YAML path)."""


class GraphError(EECompileError):
    """The ONNX model cannot be loaded, cut, or verified (the message names the tensor or node)."""


class BundleError(EECompileError):
    """A bundle is missing, damaged, tampered with, or from an unknown format version."""


class DataError(EECompileError):
    """An input .npz does not fit the model (names the array, expected and actual dtype/shape)."""


class BackendError(EECompileError):
    """A backend (ONNX Runtime, TensorRT) is missing, unsupported, or failed."""


class CalibrationError(EECompileError):
    """Calibration cannot meet what was asked (budget, guarantee, sample count)."""


class SignatureError(BundleError):
    """A bundle's signature is missing, from another signer, or does not match its files."""


class ThresholdError(SpecError, DataError):
    """A run-time threshold is malformed or outside its gate kind's range (names the entry and the range).

    Both a :class:`SpecError` and a :class:`DataError`, so code that caught either for thresholds keeps working."""
