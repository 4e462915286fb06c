"""Write a compiled bundle: the *verify* and *write atomically* stages of the pipeline.

Segments are saved into a staging directory beside the destination, checked with ``onnx.checker``,
verified (the chain with no exit taken must equal the unsplit model, :mod:`eecompile.passes.verify`), and
the staging directory then replaces the destination in one step (:func:`eecompile.bundle.staged_bundle`).
A failure anywhere leaves an earlier bundle at the destination untouched.
"""

from __future__ import annotations

import gc
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir

from eecompile.bundle import Manifest, SegmentInfo, staged_bundle, write_manifest
from eecompile.errors import GraphError
from eecompile.passes.verify import Reference, SegmentIO, verify_chain

EXTERNAL_DATA_BYTES = 1 << 30  # segments with more weights than this are saved with external data
INLINE_EXTERNAL_BYTES = 64 << 20  # segments of external-data models with less than this get their weights inline


def save_segment(model: ir.Model, path: Path) -> None:
    """Save a segment; weights go to ``seg{k}.onnx.data`` beside it when they are large (over 1 GiB) or came
    from external data and are over 64 MiB (a segment must never point back at the source model's data file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    inits = [v for v in model.graph.initializers.values() if v.const_value is not None]
    size = sum(int(v.const_value.nbytes) for v in inits if v.const_value is not None)
    external = [v for v in inits if isinstance(v.const_value, ir.ExternalTensor)]
    if external and size <= INLINE_EXTERNAL_BYTES:
        # torch's dynamo exporter writes even tiny weights to a .data file; a small segment is simpler inline.
        for v in external:
            v.const_value = ir.tensor(v.const_value.numpy(), name=v.name)  # type: ignore[union-attr]
        external = []
    if size > EXTERNAL_DATA_BYTES or external:
        ir.save(model, path, external_data=path.name + ".data")
    else:
        ir.save(model, path)


def segment_ios(root: Path, segments: list[SegmentInfo]) -> list[SegmentIO]:
    """What the verifier needs of each segment file under ``root``."""
    return [SegmentIO(root / s.file, [t.name for t in s.inputs],
                      s.exit.gate.threshold_input if s.exit.gate else None, [t.name for t in s.outputs])
            for s in segments]


@dataclass
class BundlePlan:
    """Everything a bundle is written from."""

    manifest: Manifest
    models: list[ir.Model]  # one per segment, in order
    head_sources: list[Path | None]  # head files to keep in heads/exit{k}.onnx
    reference: Reference | None  # the unsplit model's outputs, for verify (None: --no-verify)


def write_bundle(output: Path, plan: BundlePlan, engines: bool = False) -> None:
    """Write ``plan`` to ``output`` atomically (replacing a bundle there); ``engines``: with this machine's ONNX
    Runtime CPU engines in the same write (:func:`eecompile.build.onnxruntime.stage_engines_noted`).

    Raises:
        GraphError: a segment is not valid ONNX, or the chain differs from the source model (nothing written).
        BundleError: the destination cannot be written.
    """
    with staged_bundle(output) as tmp:
        for k, model in enumerate(plan.models):
            path = tmp / plan.manifest.segments[k].file
            save_segment(model, path)
            try:
                onnx.checker.check_model(str(path))
            except onnx.checker.ValidationError as e:
                raise GraphError(f"segment {k} is not a valid ONNX model ({str(e).splitlines()[0]}); "
                                 f"this is a bug in the split, please report it with the model") from e
        # The in-memory graphs hold (memory-mapped) source weights: release them before the segments load.
        plan.models.clear()
        gc.collect()
        for k, src in enumerate(plan.head_sources):
            if src is not None:
                (tmp / "heads").mkdir(exist_ok=True)
                shutil.copyfile(src, tmp / "heads" / f"exit{k}.onnx")
        if plan.reference is not None:
            ios = segment_ios(tmp, plan.manifest.segments)
            worst = verify_chain(plan.reference, ios, [t.name for t in plan.manifest.outputs],
                                 class_axis=plan.manifest.class_axis)
            plan.manifest.notes.append(f"verified: no-exit chain equals the source model (max rel. error {worst:.1e}; "
                                       f"allowed {plan.reference.tolerance.describe()})")
        if engines:
            from eecompile.build.onnxruntime import stage_engines_noted

            stage_engines_noted(tmp, plan.manifest, build=True)
        write_manifest(tmp, plan.manifest)
