"""Write a compiled bundle: the *verify* and *write atomically* stages of the pipeline.

Segments are saved into a staging directory beside the destination, checked with ``onnx.checker``,
verified (the chain with no exit taken must equal the unsplit model, :mod:`eecompile.passes.verify`), and
the staging directory then replaces the destination in one step (:func:`eecompile.bundle.staged_bundle`).
A failure anywhere leaves an earlier bundle at the destination untouched.
"""

from __future__ import annotations

import gc
import hashlib
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import onnx
import onnx_ir as ir

from eecompile.bundle import Manifest, SegmentInfo, staged_bundle, write_manifest
from eecompile.errors import GraphError
from eecompile.passes.verify import Reference, SegmentIO, verify_chain

EXTERNAL_DATA_BYTES = 1 << 30  # segments with more weights than this are saved with external data
INLINE_EXTERNAL_BYTES = 64 << 20  # segments of external-data models with less than this get their weights inline
SHARED_WEIGHTS = "weights.bin"  # beside the segments: every initializer used by more than one segment, once
SHARE_MIN_BYTES = 1024  # smaller initializers stay inside each segment that uses them


def _meta(t: ir.TensorProtocol) -> tuple[str, tuple[int, ...], int]:
    return (str(t.dtype), tuple(int(d) for d in t.shape.numpy()), int(t.nbytes))


@dataclass
class SharedWeights:
    """Initializers used by several segments (ALBERT-style shared layers, a loop unrolled at export, a tied
    embedding), stored once in ``weights.bin`` beside the segment files; each segment references them by
    ``location``/``offset``/``length`` (ONNX external data, which ONNX Runtime reads from the segment's
    folder). Build it with :meth:`plan` before the segments are saved; :func:`save_segment` writes through it.

    Two in-memory initializers are the same weight when dtype, shape and bytes (sha256) are equal; two
    memory-mapped ones (a source model with external data) when they are read from the same file and offset
    (not compared byte by byte, so the compiler does not page the whole model in). Only tensors of at least
    ``SHARE_MIN_BYTES`` bytes that occur in two segments or more are moved out."""

    digests: dict[tuple[int, str], bytes] = field(default_factory=dict)  # (segment, initializer) -> key
    offsets: dict[bytes, tuple[int, int]] = field(default_factory=dict)  # key -> (offset, length) in the file
    file: BinaryIO | None = None

    @classmethod
    def plan(cls, models: list[ir.Model]) -> SharedWeights:
        """Find the initializers of ``models`` (one per segment) that more than one segment holds. Only
        tensors whose dtype and shape occur in two segments are hashed (each read once)."""
        seen: dict[tuple, set[int]] = defaultdict(set)
        for k, m in enumerate(models):
            for v in m.graph.initializers.values():
                if v.const_value is not None and v.const_value.nbytes >= SHARE_MIN_BYTES:
                    seen[_meta(v.const_value)].add(k)
        candidates = {meta for meta, ks in seen.items() if len(ks) > 1}
        found: dict[tuple[int, str], bytes] = {}
        users: dict[bytes, set[int]] = defaultdict(set)
        for k, m in enumerate(models):
            for v in m.graph.initializers.values():
                t = v.const_value
                if t is None or t.nbytes < SHARE_MIN_BYTES or _meta(t) not in candidates:
                    continue
                if isinstance(t, ir.ExternalTensor):  # memory-mapped source weights: where they lie, unread
                    key = repr((str(Path(t.base_dir, t.location).resolve()), t.offset, _meta(t))).encode()
                else:
                    key = hashlib.sha256(t.tobytes()).digest() + repr(_meta(t)).encode()
                found[(k, v.name or "")] = key
                users[key].add(k)
        return cls({ks: key for ks, key in found.items() if len(users[key]) > 1})

    def __bool__(self) -> bool:
        return bool(self.digests)

    def take(self, k: int, model: ir.Model, folder: Path) -> int:
        """Point segment ``k``'s shared initializers at ``folder/weights.bin`` (written on first use);
        returns how many were moved."""
        moved = 0
        for v in model.graph.initializers.values():
            key = self.digests.get((k, v.name or ""))
            t = v.const_value
            if key is None or t is None:
                continue
            if key not in self.offsets:
                if self.file is None:
                    self.file = open(folder / SHARED_WEIGHTS, "wb")  # noqa: SIM115 (closed by close())
                data = t.tobytes()
                # Page-aligned for large tensors (ONNX Runtime memory-maps external data), 64 bytes otherwise.
                align = 4096 if len(data) >= 65536 else 64
                self.file.write(b"\0" * ((-self.file.tell()) % align))
                self.offsets[key] = (self.file.tell(), len(data))
                self.file.write(data)
                self.file.flush()
            off, length = self.offsets[key]
            v.const_value = ir.ExternalTensor(SHARED_WEIGHTS, off, length, t.dtype,
                                              shape=ir.Shape(list(t.shape)),  # type: ignore[arg-type]
                                              name=v.name or "", base_dir=str(folder))
            moved += 1
        return moved

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def save_segment(model: ir.Model, path: Path, shared: SharedWeights | None = None, index: int = -1) -> None:
    """Save a segment; weights go to ``seg{k}.onnx.data`` beside it when they are large (over 1 GiB) or came
    from external data and are over 64 MiB (a segment must never point back at the source model's data file).
    With ``shared`` (and the segment's ``index``), the initializers it shares with other segments are stored
    once in ``weights.bin`` beside it; a segment that also needs external data for its own weights then puts
    them there too. Without ``shared``, references a segment already holds into ``weights.bin`` in its own folder
    (a segment loaded, edited and saved back in place) are kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if shared:
        if shared.take(index, model, path.parent):
            own = [v for v in model.graph.initializers.values() if v.const_value is not None
                   and not (isinstance(v.const_value, ir.ExternalTensor)
                            and v.const_value.location == SHARED_WEIGHTS)]
            own_size = sum(int(v.const_value.nbytes) for v in own if v.const_value is not None)
            big = own_size > EXTERNAL_DATA_BYTES or (own_size > INLINE_EXTERNAL_BYTES and any(
                isinstance(v.const_value, ir.ExternalTensor) for v in own))
            for v in own:
                t = v.const_value
                if big and t is not None and t.nbytes >= SHARE_MIN_BYTES:
                    shared.digests[(index, v.name or "")] = b"own:" + f"{index}/{v.name}".encode()
                elif isinstance(t, ir.ExternalTensor):
                    v.const_value = ir.tensor(t.numpy(), name=v.name)
            if big:
                shared.take(index, model, path.parent)
            ir.save(model, path)
            return
    inits = [v for v in model.graph.initializers.values() if v.const_value is not None]
    # A segment rewritten in place (replace_heads) keeps its references into weights.bin as they are.
    refs = [v for v in inits if isinstance(v.const_value, ir.ExternalTensor)
            and v.const_value.location == SHARED_WEIGHTS and Path(v.const_value.base_dir) == path.parent]
    inits = [v for v in inits if v not in refs]
    size = sum(int(v.const_value.nbytes) for v in inits if v.const_value is not None)
    external = [v for v in inits if isinstance(v.const_value, ir.ExternalTensor)]
    if external and size <= INLINE_EXTERNAL_BYTES:
        # torch's dynamo exporter writes even tiny weights to a .data file; a small segment is simpler inline.
        for v in external:
            v.const_value = ir.tensor(v.const_value.numpy(), name=v.name)  # type: ignore[union-attr]
        external = []
    if (size > EXTERNAL_DATA_BYTES or external) and not refs:
        ir.save(model, path, external_data=path.name + ".data")
    else:  # (a segment with references into weights.bin and large weights of its own keeps the latter inline)
        for v in external:
            v.const_value = ir.tensor(v.const_value.numpy(), name=v.name)  # type: ignore[union-attr]
        ir.save(model, path)


def segment_ios(root: Path, segments: list[SegmentInfo]) -> list[SegmentIO]:
    """What the verifier needs of each segment file under ``root``."""
    return [SegmentIO(root / s.file, [t.name for t in s.inputs],
                      s.exit.gate.threshold_input if s.exit.gate else None, [t.name for t in s.outputs],
                      s.exit.gate.output if s.exit.gate else None)
            for s in segments]


@dataclass
class BundlePlan:
    """Everything a bundle is written from."""

    manifest: Manifest
    models: list[ir.Model]  # one per segment, in order
    head_sources: list[Path | None]  # head files to keep in heads/exit{k}.onnx
    reference: Reference | None  # the unsplit model's outputs, for verify (None: --no-verify)
    extra: dict[str, ir.Model] = field(default_factory=dict)  # other graphs by bundle path (a loop's step graph)


def write_bundle(output: Path, plan: BundlePlan, engines: bool = False) -> None:
    """Write ``plan`` to ``output`` atomically (replacing a bundle there); ``engines``: with this machine's ONNX
    Runtime CPU engines in the same write (:func:`eecompile.build.onnxruntime.stage_engines_noted`).

    Raises:
        GraphError: a segment is not valid ONNX, or the chain differs from the source model (nothing written).
        BundleError: the destination cannot be written.
    """
    shared = SharedWeights.plan(plan.models)
    with staged_bundle(output) as tmp:
        for k, model in enumerate(plan.models):
            path = tmp / plan.manifest.segments[k].file
            try:
                save_segment(model, path, shared, k)
            except BaseException:
                shared.close()
                raise
            if k == len(plan.models) - 1:
                shared.close()
            try:
                onnx.checker.check_model(str(path))
            except onnx.checker.ValidationError as e:
                raise GraphError(f"segment {k} is not a valid ONNX model ({str(e).splitlines()[0]}); "
                                 f"this is a bug in the split, please report it with the model") from e
        for rel, model in plan.extra.items():
            save_segment(model, tmp / rel)
            try:
                onnx.checker.check_model(str(tmp / rel))
            except onnx.checker.ValidationError as e:
                raise GraphError(f"{rel} is not a valid ONNX model ({str(e).splitlines()[0]}); this is a bug, "
                                 f"please report it with the model") from e
        plan.extra.clear()
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
