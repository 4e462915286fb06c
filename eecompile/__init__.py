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
                  dims: dict[str, int] | None = None, tolerance: float | None = None,
                  engines: bool = False) -> Bundle:
    """Compile ``spec`` (a :class:`Spec`, or the path of its YAML file) into a bundle directory at ``output``,
    written atomically, and return it loaded.

    ``force`` replaces a bundle already at ``output``; ``verify=False`` skips the check that the chain with no
    exit taken equals the source model; ``dims`` sizes symbolic input dims for probing (``{"seq": 128}``;
    default 8); ``tolerance`` is verify's allowed error relative to the final output's scale (default: from the
    graph's precision); ``engines=True`` also builds this machine's ONNX Runtime CPU engines into the bundle
    (what ``eecompile compile`` does). Raises SpecError (the spec, or an exit that does not fit the graph),
    GraphError (a model that cannot be read, run, split or verified) or BundleError (the destination). The
    stages are listed in :mod:`eecompile.compiler`."""
    from eecompile.compiler import compile_model as _compile

    return _compile(spec, output, force=force, verify=verify, dims=dims, tolerance=tolerance,
                    engines=engines)


def load(bundle: Any, backend: str = "onnxruntime", public_key: Any = None, **options: Any) -> EarlyExitRunner:
    """Load a bundle (a path or a :class:`Bundle`) for inference; sessions (or engines) are created once, here.

    Returns an :class:`~eecompile.runtimes.chain.EarlyExitRunner` whose ``run(feeds, thresholds=None,
    policy="compact")`` takes numpy arrays named after the model inputs (rows along each input's batch axis)
    and returns every sample's final outputs and the exit it left at. ``options`` go to the runner (e.g.
    ``threads``). ``backend="tensorrt"`` returns the device-resident
    :class:`~eecompile.runtimes.tensorrt.TensorRTChain` (same ``run`` contract): activations stay on the GPU
    and only the gate masks and exited rows cross. ``public_key``: a PEM public key file; the bundle must
    carry a signature (``eecompile sign``) made with its private half over exactly these files, checked before
    anything in the bundle is used. Raises BundleError for a missing, damaged or tampered bundle
    (SignatureError, a BundleError, for an unsigned or altered one with ``public_key``) and BackendError when
    the backend cannot load its segments. A loop bundle (compiled from a spec with ``loop:``) gives a
    :class:`~eecompile.runtimes.loop.LoopRunner`: ``run(feeds, steps=N, thresholds=None, loop_threshold=None)``;
    one with jump exits a :class:`~eecompile.runtimes.jumps.JumpRunner` (same ``run`` as the chain's); both take
    ``backend="tensorrt"`` for their segments."""
    if public_key is not None:
        bundle = Bundle.load(bundle.path if isinstance(bundle, Bundle) else bundle, public_key=public_key)
    loaded = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    if loaded.manifest.loop is not None:  # an iterative model: run(feeds, steps=N, ...) drives the loop
        from eecompile.runtimes.loop import LoopRunner

        return LoopRunner(loaded, backend=backend, **options)  # type: ignore[return-value]  # same run() shape
    if loaded.manifest.jumps:  # jump exits (MuE): a sample that fires at one continues at a later segment
        from eecompile.runtimes.jumps import JumpRunner

        return JumpRunner(loaded, backend=backend, **options)  # type: ignore[return-value]  # same run() shape
    if backend == "tensorrt":
        from eecompile.runtimes.tensorrt import TensorRTChain

        return TensorRTChain(loaded, **options)
    from eecompile.runtimes.chain import EarlyExitRunner

    return EarlyExitRunner(loaded, backend=backend, **options)


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
