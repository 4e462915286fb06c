"""ONNX Runtime CPU "engines": each segment's graph as ORT optimises it on this machine.

``engines/seg{k}.onnxruntime.{target}.onnx``: the segment optimised at ORT_ENABLE_ALL (saved with
``optimized_model_filepath``), with the cuts edited (:mod:`eecompile.build.ort_layout`) so that a tensor ORT
holds in its blocked NCHWc layout crosses the cut blocked instead of through a ReorderOutput / ReorderInput pair.
``target`` is ORT major.minor and the NCHWc block size (``ort1.32-nchwc16``): such a graph is only valid on that
ORT and that kind of CPU. The record names the blocked tensors each engine takes and gives (``flags.inputs`` /
``flags.outputs``: engine name, shape, dtype, batch axis, block, channels) so the runtime binds them; on another
target the runtime runs the portable segments and logs a warning.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from eecompile.build.report import BuildReport
from eecompile.bundle import Bundle, Manifest, sha256_bytes, update_bundle
from eecompile.errors import BackendError
from eecompile.runtimes.records import EngineRecord, ort_engine_file, replace_engine_records

# An optimised graph is one protobuf; past this size it would need external data, which engines do not use yet.
ORT_ENGINE_MAX_BYTES = 1_900_000_000


def build_onnxruntime(path: Path, max_batch: int) -> BuildReport:
    """ORT CPU engines: each segment's ORT-optimised graph (this machine), boundaries edited to carry NCHWc."""
    import tempfile

    import onnx
    import onnxruntime as ort

    from eecompile.build.ort_layout import carry_blocked, count_reorders, optimise_with_ort
    from eecompile.runtimes.onnxruntime import (
        DEFAULT_CPU_DISABLED_OPTIMIZERS,
        ENGINE_LOAD_LEVEL,
        cpu_target,
        nchwc_block_size,
    )

    b = Bundle.load(path)
    m = b.manifest
    target = cpu_target()
    block = nchwc_block_size()
    disabled = list(DEFAULT_CPU_DISABLED_OPTIMIZERS)
    seconds: list[float] = []
    graphs: dict[int, onnx.ModelProto] = {}
    before: dict[int, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="eecompile-ort-") as scratch:
        for seg in m.segments:
            t0 = time.perf_counter()
            src = b.verify_file(seg.file)
            dst = Path(scratch) / f"seg{seg.index}.opt.onnx"
            try:
                optimise_with_ort(src, dst, disabled)
            except Exception as e:  # ORT raises its own exception types; name the file instead
                raise BackendError(f"{src}: ONNX Runtime cannot load this segment ({e}); recompile the bundle") from e
            if dst.stat().st_size > ORT_ENGINE_MAX_BYTES:
                raise BackendError(f"{src}: ONNX Runtime's optimised graph is {dst.stat().st_size / 2**30:.1f} GB, "
                                   f"over what one ONNX file holds; run this bundle on its portable segments")
            graphs[seg.index] = onnx.load(str(dst))
            before[seg.index] = count_reorders(graphs[seg.index])
            seconds.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    carried, skipped = carry_blocked(graphs, m.segments, [t.name for t in m.inputs], block)
    edit_s = (time.perf_counter() - t0) / max(len(m.segments), 1)
    blobs = {k: g.SerializeToString() for k, g in graphs.items()}

    # Every engine must load the way the runtime loads it (no optimisers) before it is recorded.
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ENGINE_LOAD_LEVEL)
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    for k, blob in blobs.items():
        try:
            ort.InferenceSession(blob, sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise BackendError(f"segment {k}: ONNX Runtime refuses its edited optimised graph ({e}); this is a bug "
                               f"in eecompile's layout pass: report it; the portable segments still run") from e

    built_at = time.strftime("%Y-%m-%dT%H:%M:%S")
    records: list[EngineRecord] = []
    for seg in m.segments:
        k = seg.index
        after = count_reorders(graphs[k])
        flags: dict[str, Any] = {
            "max_batch": max_batch, "providers": ["CPUExecutionProvider"], "graph_optimization": "ORT_ENABLE_ALL",
            "load_optimization": ENGINE_LOAD_LEVEL, "disabled_optimizers": disabled, "nchwc_block": block,
            "inputs": {c.tensor: c.io_entry() for c in carried if k in c.consumers},
            "outputs": {c.tensor: c.io_entry() for c in carried if c.producer == k},
            "rewritten": [c.summary() for c in carried if k == c.producer or k in c.consumers],
            "reorders_before": before[k], "reorders_after": after,
        }
        rel = ort_engine_file(k, target)
        records.append(EngineRecord(segment=k, backend="onnxruntime", target=target, file=rel,
                                    sha256=sha256_bytes(blobs[k]), backend_version=ort.__version__, flags=flags,
                                    built_at=built_at))
    seconds = [s_ + edit_s for s_ in seconds]

    def change(tmp: Path, manifest: Manifest) -> None:
        (tmp / "engines").mkdir(exist_ok=True)
        for r in records:
            assert r.file is not None
            (tmp / r.file).write_bytes(blobs[r.segment])
        # The old file-less "check" records go too.
        replace_engine_records(tmp, manifest, records, "onnxruntime", target, drop_fileless=True)

    update_bundle(path, change)
    notes = [f"ONNX Runtime {ort.__version__}, NCHWc block {block}: "
             f"{len(carried)} boundary tensor(s) carried in blocked layout"]
    notes += [f"  {c.tensor}: segment {c.producer} -> {c.consumers} as {c.engine_name}" for c in carried]
    notes += [f"  kept plain: {s_.tensor} ({s_.reason})" for s_ in skipped]
    return BuildReport(path, "onnxruntime", target, records, seconds, [len(blobs[r.segment]) for r in records],
                       notes=notes)
