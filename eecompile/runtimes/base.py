"""The segment-backend protocol the chain runner drives.

A backend owns one executable per segment (an ONNX Runtime session, a TensorRT engine + context) and
the memory its tensors live in. The chain (``chain.py``) is backend-agnostic: it asks the backend to run a
segment, to copy the gate mask to the host, and to gather rows along a batch axis. Tensors handed between
these calls are backend-native ("device arrays": numpy on ORT CPU, OrtValues or device buffers elsewhere),
so activations never leave the device except for the rows that exit.

Like Polygraphy's runners: the state checks live here, the backend specifics in small methods.
Imports: numpy and the bundle module only (no onnx, no torch): this runs on a Jetson.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from eecompile.bundle import Bundle


class SegmentBackend(ABC):
    """Runs the segments of one bundle. Create once (sessions/engines load here), call many times."""

    name: str = "abstract"

    def __init__(self, bundle: Bundle, **options: Any) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.options = options

    # --- what each backend implements -------------------------------------------------------------
    @abstractmethod
    def run_segment(self, index: int, feeds: dict[str, Any], threshold: float | None) -> dict[str, Any]:
        """Run segment ``index`` on backend-native tensors; return every output of the segment by name.

        ``threshold`` is the gate threshold fed to the segment's threshold input (None for the final
        segment, which has no gate)."""

    @abstractmethod
    def to_host(self, x: Any) -> np.ndarray:
        """Copy a backend-native tensor to a numpy array."""

    @abstractmethod
    def from_host(self, x: np.ndarray) -> Any:
        """Make a backend-native tensor from a numpy array."""

    @abstractmethod
    def gather(self, x: Any, rows: np.ndarray, axis: int) -> Any:
        """Take ``rows`` (int64 indices, on the host) along ``axis``; stays on the backend's device."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release sessions, contexts and device memory."""

    # --- context manager ----------------------------------------------------------------------------
    def __enter__(self) -> SegmentBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
