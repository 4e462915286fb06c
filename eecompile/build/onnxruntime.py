"""ONNX Runtime CPU "engines": each segment's graph as ORT optimises it on this machine.

``engines/seg{k}.onnxruntime.{target}.onnx``: preferably cut from ORT's optimised graph of the whole chain
(:mod:`eecompile.build.ort_merged`: ORT's fusions across a cut survive, blocked tensors cross the cut as they are),
else the segment optimised alone at ORT_ENABLE_ALL (saved with ``optimized_model_filepath``), with the cuts edited
(:mod:`eecompile.build.ort_layout`) so that a tensor ORT holds in its blocked NCHWc layout crosses the cut blocked
instead of through a ReorderOutput / ReorderInput pair. ``compile`` builds them for the compiling machine by default;
each record names the sha256 of the segment it was built from, and the runtime ignores it once the segment changes.
``target`` is ORT major.minor and the NCHWc block size (``ort1.32-nchwc16``): such a graph is only valid on that
ORT and that kind of CPU. The record names the blocked tensors each engine takes and gives (``flags.inputs`` /
``flags.outputs``: engine name, shape, dtype, batch axis, block, channels) so the runtime binds them; on another
target the runtime runs the portable segments and logs a warning.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from eecompile.build.report import BuildReport
from eecompile.bundle import Manifest, sha256_bytes, update_bundle
from eecompile.errors import BackendError
from eecompile.runtimes.records import EngineRecord, ort_engine_file, ort_no_exit_file, replace_engine_records
from eecompile.runtimes.sessions import session_options

log = logging.getLogger(__name__)

# An optimised graph is one protobuf; past this size it would need external data, which engines do not use yet.
ORT_ENGINE_MAX_BYTES = 1_900_000_000


def build_onnxruntime(path: Path, max_batch: int) -> BuildReport:
    """ORT CPU engines for this machine, recorded in the bundle (one atomic update; see :func:`stage_cpu_engines`).
    Raises BackendError when ORT cannot load a segment or an engine."""
    reports: list[BuildReport] = []
    update_bundle(path, lambda tmp, manifest: reports.append(stage_cpu_engines(tmp, manifest, max_batch)))
    report = reports[0]
    report.bundle = Path(path)
    return report


def build_onnxruntime_cache(path: Path, max_batch: int) -> BuildReport:
    """This machine's ORT CPU engines for the bundle at ``path``, written into the user's engine cache
    (:func:`eecompile.runtimes.onnxruntime.engine_cache_dir`) instead of the bundle: the bundle (and its signature)
    stays as it is, and the runner finds the engines there, checking each file's sha256 against ``records.json``.
    The cache entry is replaced atomically. Raises BackendError as :func:`stage_cpu_engines` does."""
    import copy
    import json
    import os
    import shutil
    import tempfile

    from eecompile.bundle import Bundle, confined_path
    from eecompile.runtimes.onnxruntime import ENGINE_CACHE_INDEX, cpu_target, engine_cache_dir

    b = Bundle.load(path)  # every file's sha256 checked
    m = copy.deepcopy(b.manifest)
    m.engines = [d for d in m.engines if d.get("backend") != "onnxruntime"]
    dest = engine_cache_dir(m, cpu_target())
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=dest.parent) as tmp:
        stage, out = Path(tmp) / "stage", Path(tmp) / "out"
        for rel in m.files:  # the segments (and their external data) as the bundle holds them
            if not rel.startswith("engines/"):
                (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(confined_path(b.path, rel), stage / rel)
        report = stage_cpu_engines(stage, m, max_batch)
        records = [r.to_dict() for r in report.records]
        (out / "engines").mkdir(parents=True)
        for d in records:
            for built in (d["file"], (d["flags"].get("no_exit") or {}).get("file")):
                if built:
                    os.replace(stage / built, out / built)
        index = {"format": 1, "target": report.target, "bundle": str(b.path),
                 "segments": {s.file: b.manifest.files.get(s.file) for s in m.segments}, "records": records}
        (out / ENGINE_CACHE_INDEX).write_text(json.dumps(index, indent=1))
        if dest.exists():
            os.replace(dest, Path(tmp) / "old")  # the previous entry goes when the temporary directory does
        os.replace(out, dest)
    report.bundle = Path(path)
    report.notes.append(f"engines kept in {dest} (outside the bundle, which is unchanged)")
    return report


def stage_cpu_engines(root: Path, m: Manifest, max_batch: int = 32) -> BuildReport:
    """Build this machine's ORT CPU engines for the bundle staged at ``root`` (its segment files as ``m`` names
    them): write ``engines/seg{k}.onnxruntime.{target}.onnx`` there and swap this target's records in ``m``.

    First choice (:mod:`eecompile.build.ort_merged`): the chain optimised as one graph and cut again, checked
    against the portable chain on random inputs; when that is refused, each segment's ORT-optimised graph with its
    boundaries edited to carry NCHWc (:mod:`eecompile.build.ort_layout`). The caller writes the manifest (and so
    the files' hashes) and commits the staging directory. Raises BackendError."""
    import tempfile

    import onnx
    import onnxruntime as ort

    from eecompile.build.ort_layout import count_reorders
    from eecompile.build.ort_merged import MergeRefused, build_merged, check_no_exit, check_same_outputs
    from eecompile.bundle import sha256_file
    from eecompile.runtimes.onnxruntime import (
        DEFAULT_CPU_DISABLED_OPTIMIZERS,
        ENGINE_LOAD_LEVEL,
        cpu_target,
        nchwc_block_size,
    )

    target = cpu_target()
    block = nchwc_block_size()
    disabled = list(DEFAULT_CPU_DISABLED_OPTIMIZERS)
    files = {seg.index: root / seg.file for seg in m.segments}
    seg_sha = {seg.index: sha256_file(files[seg.index]) for seg in m.segments}
    seconds: list[float] = []
    graphs: dict[int, onnx.ModelProto] = {}
    before: dict[int, dict[str, int]] = {}
    method, why_not_merged = "merged", ""
    duplicated: dict[int, list[str]] = {}
    fused: dict[str, int] = {}
    no_exit: bytes | None = None  # the no-exit engine (merged method only)
    no_exit_outputs: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="eecompile-ort-") as scratch:
        # First choice: the whole chain optimised as one graph and cut again (keeps ORT's fusions across cuts).
        t0 = time.perf_counter()
        try:
            portable = {k: onnx.load(str(f)) for k, f in files.items()}
            before = {k: count_reorders(g) for k, g in portable.items()}
            merged = build_merged(portable, m.segments, [t.name for t in m.inputs], block, disabled, Path(scratch))
            blobs = {k: g.SerializeToString() for k, g in merged.graphs.items()}
            check_same_outputs(blobs, files, m.segments, _check_feeds(m), merged.carried, ENGINE_LOAD_LEVEL)
            graphs, carried, skipped, duplicated = merged.graphs, merged.carried, merged.skipped, merged.duplicated
            fused = merged.fused
            if merged.no_exit is not None:
                blob = merged.no_exit.SerializeToString()
                try:
                    check_no_exit(blob, files, m.segments, _check_feeds(m), merged.no_exit_outputs, ENGINE_LOAD_LEVEL)
                    no_exit, no_exit_outputs = blob, merged.no_exit_outputs
                except MergeRefused as e:
                    log.warning("%s: no no-exit engine (%s)", root, e)
            seconds = [(time.perf_counter() - t0) / max(len(m.segments), 1)] * len(m.segments)
        except MergeRefused as e:
            method, why_not_merged = "per-segment", str(e)
            log.info("%s: per-segment ORT engines (%s)", root, e)
    if method == "per-segment":
        graphs, carried, skipped, before, seconds = _per_segment(files, m, block, disabled)
    blobs = {k: g.SerializeToString() for k, g in graphs.items()}

    # Every engine must load the way the runtime loads it (no optimisers) before it is recorded.
    so = session_options(1, optimization=ENGINE_LOAD_LEVEL)
    for k, blob in blobs.items():
        try:
            ort.InferenceSession(blob, sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise BackendError(f"segment {k}: ONNX Runtime refuses its edited optimised graph ({e}); this is a bug "
                               f"in eecompile's layout pass: report it; the portable segments still run") from e

    no_exit_rel = ort_no_exit_file(target)
    built_at = time.strftime("%Y-%m-%dT%H:%M:%S")
    records: list[EngineRecord] = []
    for seg in m.segments:
        k = seg.index
        flags: dict[str, Any] = {
            "max_batch": max_batch, "providers": ["CPUExecutionProvider"], "graph_optimization": "ORT_ENABLE_ALL",
            "load_optimization": ENGINE_LOAD_LEVEL, "disabled_optimizers": disabled, "nchwc_block": block,
            "inputs": {c.tensor: c.io_entry() for c in carried if k in c.consumers},
            "outputs": {c.tensor: c.io_entry() for c in carried if c.producer == k},
            "rewritten": [c.summary() for c in carried if k == c.producer or k in c.consumers],
            "reorders_before": before[k], "reorders_after": count_reorders(graphs[k]), "method": method,
            "segment_sha256": seg_sha[k],  # the runtime ignores an engine whose segment has changed since
        }
        if duplicated.get(k):
            flags["recomputed_ops"] = list(duplicated[k])
        if fused:
            flags["transformer_fusions"] = dict(fused)  # of the whole chain
        if no_exit is not None and k == m.segments[-1].index:
            # What the runner runs when no gate can fire: the chain without heads and gates, as one graph.
            flags["no_exit"] = {"file": no_exit_rel, "sha256": sha256_bytes(no_exit), "outputs": dict(no_exit_outputs)}
        rel = ort_engine_file(k, target)
        records.append(EngineRecord(segment=k, backend="onnxruntime", target=target, file=rel,
                                    sha256=sha256_bytes(blobs[k]), backend_version=ort.__version__, flags=flags,
                                    built_at=built_at))
    (root / "engines").mkdir(exist_ok=True)
    for r in records:
        assert r.file is not None
        (root / r.file).write_bytes(blobs[r.segment])
    if no_exit is not None:
        (root / no_exit_rel).write_bytes(no_exit)
    # The old file-less "check" records go too.
    replace_engine_records(root, m, records, "onnxruntime", target, drop_fileless=True)
    how = ("the chain optimised as one graph and cut again" if method == "merged" else
           f"each segment optimised on its own (the chain could not be optimised as one: {why_not_merged})")
    if fused:
        how += " after ONNX Runtime's transformer fusions (" + ", ".join(f"{v} {k}" for k, v in fused.items()) + ")"
    notes = [f"ONNX Runtime {ort.__version__}, NCHWc block {block}: {how}; "
             f"{len(carried)} boundary tensor(s) carried in blocked layout"]
    notes += [f"  {c.tensor}: segment {c.producer} -> {c.consumers} as {c.engine_name}" for c in carried]
    notes += [f"  kept plain: {s_.tensor} ({s_.reason})" for s_ in skipped]
    return BuildReport(root, "onnxruntime", target, records, seconds, [len(blobs[r.segment]) for r in records],
                       notes=notes)


def _check_feeds(m: Manifest) -> dict[str, Any]:
    """Random model inputs for the engine check (the compiler's verify inputs: N(0,1) floats, ones for ids)."""
    import numpy as np
    import onnx_ir as ir

    from eecompile.analysis.probe import random_inputs

    values = [ir.Value(name=t.name, type=ir.TensorType(ir.DataType.from_numpy(np.dtype(t.dtype))),
                       shape=ir.Shape(t.shape)) for t in m.inputs]
    return random_inputs(values, 2 if m.batch_mode == "dynamic" else 1, seed=5)


def _per_segment(files: dict[int, Path], m: Manifest, block: int,
                 disabled: list[str]) -> tuple[Any, Any, Any, Any, list[float]]:
    """Each segment optimised by ORT on its own, then the cuts edited to carry NCHWc tensors."""
    import tempfile

    import onnx

    from eecompile.build.ort_layout import carry_blocked, count_reorders, optimise_with_ort

    seconds: list[float] = []
    graphs: dict[int, onnx.ModelProto] = {}
    before: dict[int, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="eecompile-ort-") as scratch:
        for seg in m.segments:
            t0 = time.perf_counter()
            src = files[seg.index]
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
    return graphs, carried, skipped, before, [s_ + edit_s for s_ in seconds]


def restage_cpu_engines(root: Path, m: Manifest, *, build: bool | None = None) -> BuildReport | None:
    """After segments changed in a staged bundle (e.g. a head was replaced): drop every ORT CPU engine record, of
    any target, whose segment is no longer the one it was built from (with its file), then rebuild this machine's
    engines when the bundle had them (``build=None``), or when ``build`` is True. Returns the build report, or
    None when nothing was built. Raises BackendError as :func:`stage_cpu_engines` does."""
    from eecompile.bundle import sha256_file
    from eecompile.runtimes.onnxruntime import cpu_target

    now = {s.index: sha256_file(root / s.file) for s in m.segments}
    had_here = False
    keep = []
    for d in m.engines:
        flags = d.get("flags") or {}
        if d.get("backend") == "onnxruntime" and d.get("file"):
            had_here = had_here or d.get("target") == cpu_target()
            if flags.get("segment_sha256") != now.get(int(d.get("segment", -1))):
                for rel in (d["file"], (flags.get("no_exit") or {}).get("file")):
                    f = root / str(rel) if rel else None
                    if f is not None and f.is_file():
                        f.unlink()
                continue
        keep.append(d)
    dropped = {d.get("target") for d in m.engines if d not in keep}
    for d in keep:  # a no-exit engine is made of every segment: it goes when any of its target's engines went
        no_exit = (d.get("flags") or {}).get("no_exit")
        if d.get("backend") == "onnxruntime" and no_exit and d.get("target") in dropped:
            f = root / str(no_exit.get("file"))
            if f.is_file():
                f.unlink()
            d["flags"] = {k: v for k, v in d["flags"].items() if k != "no_exit"}
    m.engines = keep
    if build is False or (build is None and not had_here):
        return None
    return stage_cpu_engines(root, m)


def stage_engines_noted(root: Path, m: Manifest, build: bool | None) -> None:
    """:func:`restage_cpu_engines` for the compiler's writes: the outcome goes into the manifest's notes, and when
    ONNX Runtime cannot build the engines the portable bundle is still written (with a note saying why)."""
    m.notes = [n for n in m.notes if not n.startswith(("engines (", "no ONNX Runtime CPU engines"))]
    try:
        report = restage_cpu_engines(root, m, build=build)
    except BackendError as e:
        m.notes.append(f"no ONNX Runtime CPU engines ({e}); the portable segments run")
        return
    if report is not None:
        m.notes.append(f"engines ({report.target}): {report.notes[0]}")
