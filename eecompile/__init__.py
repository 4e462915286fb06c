"""eecompile: a deployment compiler for early-exit neural networks.

    import eecompile
    bundle = eecompile.compile_model("spec.yaml", "model.eebundle")
    runner = eecompile.load("model.eebundle", backend="onnxruntime")
    result = runner.run({"input": x}, thresholds=[0.9, "never"])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from eecompile.bundle import Bundle
from eecompile.errors import (
    BackendError,
    BundleError,
    CalibrationError,
    DataError,
    EECompileError,
    GraphError,
    SpecError,
)
from eecompile.spec import Spec, load_spec

__version__ = "0.1.0"

if TYPE_CHECKING:
    from eecompile.runtimes.chain import EarlyExitRunner


def compile_model(spec: Any, output: Any, *, force: bool = False, verify: bool = True,
                  tolerance: float | None = None) -> Bundle:
    """Compile a spec (a path or a :class:`Spec`) into a bundle directory; see :mod:`eecompile.compiler`.
    ``tolerance``: verify's allowed error relative to the final output's scale (default: from the graph's
    precision)."""
    from eecompile.compiler import compile_model as _compile

    return _compile(spec, output, force=force, verify=verify, tolerance=tolerance)


def load(bundle: Any, backend: str = "onnxruntime", **options: Any) -> EarlyExitRunner:
    """Load a bundle for inference; sessions (or engines) are created once, here.

    ``backend="tensorrt"`` returns the device-resident :class:`~eecompile.runtimes.tensorrt.TensorRTChain`
    (same ``run`` contract): activations stay on the GPU and only the gate masks and exited rows cross."""
    if backend == "tensorrt":
        from eecompile.runtimes.tensorrt import TensorRTChain

        return TensorRTChain(bundle, **options)  # type: ignore[return-value]
    from eecompile.runtimes.chain import EarlyExitRunner

    return EarlyExitRunner(bundle, backend=backend, **options)


__all__ = [
    "BackendError",
    "Bundle",
    "BundleError",
    "CalibrationError",
    "DataError",
    "EECompileError",
    "GraphError",
    "Spec",
    "SpecError",
    "compile_model",
    "load",
    "load_spec",
]
