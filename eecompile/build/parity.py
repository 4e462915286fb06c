"""``eecompile verify``: every segment on a backend against ONNX Runtime CPU, fed identical inputs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from eecompile.build.report import VerifyReport, VerifyRow
from eecompile.bundle import Bundle
from eecompile.errors import BackendError, DataError
from eecompile.runtimes.base import check_classifier_bundle
from eecompile.runtimes.chain import EarlyExitRunner, make_backend
from eecompile.runtimes.records import engine_records, rebuild_command

__all__ = ["verify_backend"]


# Max |backend - reference| / max(|reference|, 1e-6). TensorRT uses TF32 for fp32 matmuls/convs by default
# (10-bit mantissa, like fp16), so fp32 engines get a tolerance of the same order.
# ORT CPU engines ("ort") run the same kernels as the portable segments: only summation order may differ.
VALUE_TOL = {"fp32": 5e-3, "fp16": 2e-2, "ort": 1e-5}
# Gate flips are expected only for samples whose score sits within this band of the threshold.
SCORE_BAND = {"fp32": 2e-3, "fp16": 1e-2, "ort": 1e-5}
DECISION_TOL_NO_SCORE = 0.01  # without a score output: fraction of rows allowed to disagree


def verify_backend(bundle: str | Path, backend: str = "tensorrt", data: str | Path | None = None,
                   batch: int | None = None, **options: Any) -> VerifyReport:
    """Run every segment on ``backend`` and on ONNX Runtime CPU with identical inputs and compare.

    Segment k's inputs are the reference chain's tensors (all samples run every segment), so an error is
    pinned to the segment that makes it. Values are compared relative to each output's scale, gate decisions
    row by row (a flip counts only when the reference score is not within a band of the threshold).
    We drive our own runtime rather than Polygraphy's ``TrtRunner``: the point is to test the bindings the
    chain uses (``set_tensor_address``, shared scratch memory, our copies), not Polygraphy's.
    """
    b = Bundle.load(bundle)
    check_classifier_bundle(b, "eecompile verify")
    m = b.manifest
    precision = "fp32"
    max_batch = None
    if backend == "tensorrt":
        recs = engine_records(m, "tensorrt")
        if not recs:
            raise BackendError(f"{b.path}: no TensorRT engines; build them with "
                               f"`{rebuild_command(b.path)}`")
        precision = "fp16" if any(r.flags.get("fp16") for r in recs) else "fp32"
        max_batch = min(int(r.flags.get("max_batch", 1)) for r in recs)
    elif backend == "onnxruntime":
        precision = "ort"
    inputs = _verify_inputs(b, data, batch, max_batch)
    n = next(iter(inputs.values())).shape[0]

    # Reference: every segment on every sample, ONNX Runtime CPU, through the runner (policy "never"), every output
    # of every segment returned.
    with EarlyExitRunner(b, engines=False) as reference:
        every = {seg.index: [t.name for t in seg.outputs] for seg in m.segments}
        res = reference.run(inputs, policy="never", extra_outputs=every)
    env: dict[str, np.ndarray] = dict(inputs)
    ref: list[dict[str, np.ndarray]] = []
    feeds_per_seg: list[dict[str, np.ndarray]] = []
    for seg in m.segments:
        feeds = {t.name: env[t.name] for t in seg.inputs}
        if seg.exit.gate is not None:
            feeds[seg.exit.gate.threshold_input] = np.array(seg.exit.gate.threshold, np.float32)
        outs = res.extra[seg.index]
        env.update(outs)
        ref.append(outs)
        feeds_per_seg.append(feeds)

    be = make_backend(b, backend, dict(options))
    notes: list[str] = []
    if backend == "onnxruntime":
        target = getattr(be, "engine_target", None)
        if target:
            notes.append(f"ONNX Runtime CPU engines for {target} against the portable segments "
                         f"(blocked tensors converted to NCHW to compare)")
        else:
            notes.append("no ONNX Runtime engines for this machine (see the warning above, or none built): "
                         "the portable segments were compared with themselves")
    rows: list[VerifyRow] = []
    try:
        for seg, feeds, expected in zip(m.segments, feeds_per_seg, ref, strict=True):
            gate = seg.exit.gate
            dev = {k: be.from_host(v) for k, v in feeds.items() if gate is None or k != gate.threshold_input}
            got = be.run_segment(seg.index, dev, gate.threshold if gate else None)
            for name, want in expected.items():
                if name not in got:
                    rows.append(VerifyRow(seg.index, name, "missing", 1.0, 0.0, "backend did not return it"))
                    continue
                have = be.to_host(got[name])
                rows.append(_compare(seg.index, name, want, have, precision, gate, expected))
    finally:
        be.close()
    return VerifyReport(b.path, backend, n, rows,
                        notes=[*notes, f"precision {precision}; inputs: {'data ' + str(data) if data else 'random'}"])


def _compare(segment: int, name: str, want: np.ndarray, have: np.ndarray, precision: str, gate: Any,
             outs: Mapping[str, np.ndarray]) -> VerifyRow:
    if want.shape != have.shape:
        return VerifyRow(segment, name, "shape", 1.0, 0.0, f"expected {want.shape}, got {have.shape}")
    if want.dtype == np.bool_ or not np.issubdtype(want.dtype, np.floating):
        differ = want != have
        if gate is not None and name == gate.output and getattr(gate, "score_output", None) in outs:
            score = np.asarray(outs[gate.score_output], np.float64)
            near = np.abs(score - gate.threshold) <= SCORE_BAND[precision]
            bad = int((differ & ~near).sum())
            return VerifyRow(segment, name, "decisions", float(bad), 0.0,
                             f"{int(differ.sum())}/{differ.size} differ, {bad} away from the threshold")
        frac = float(differ.mean()) if differ.size else 0.0
        return VerifyRow(segment, name, "decisions", frac, DECISION_TOL_NO_SCORE,
                         f"{int(differ.sum())}/{differ.size} differ")
    w = want.astype(np.float64)
    h = have.astype(np.float64)
    finite = np.isfinite(w)
    if not np.array_equal(finite, np.isfinite(h)):
        return VerifyRow(segment, name, "value", float("inf"), VALUE_TOL[precision], "NaN/Inf pattern differs")
    scale = max(float(np.abs(w[finite]).max()) if finite.any() else 0.0, 1e-6)
    err = float(np.abs(w[finite] - h[finite]).max()) / scale if finite.any() else 0.0
    return VerifyRow(segment, name, "value", err, VALUE_TOL[precision], f"scale {scale:.3g}")


def _verify_inputs(b: Bundle, data: str | Path | None, batch: int | None,
                   max_batch: int | None) -> dict[str, np.ndarray]:
    m = b.manifest
    want = batch or min(8, max_batch or 8)
    if max_batch is not None and want > max_batch:
        raise BackendError(f"verify batch {want} exceeds the engines' --max-batch {max_batch}")
    if data is not None:
        try:
            z = np.load(data)
        except (OSError, ValueError) as e:
            raise DataError(f"{data}: cannot read the .npz ({e})") from e
        out = {}
        for t in m.inputs:
            if t.name not in z.files:
                raise DataError(f"{data}: no array named '{t.name}' (model input); arrays: {', '.join(z.files)}")
            out[t.name] = np.ascontiguousarray(z[t.name][:want]).astype(t.dtype, copy=False)
        return out
    rng = np.random.default_rng(0)
    recs = engine_records(m, "tensorrt")
    opt_shapes: dict[str, list[int]] = {}
    for r in recs:
        for name, prof in r.profiles.items():
            opt_shapes.setdefault(name, prof[1])
    out = {}
    for t in m.inputs:
        shape = []
        for axis, dim in enumerate(t.shape):
            if axis == t.batch_axis:
                shape.append(want)
            elif isinstance(dim, int) and dim > 0:
                shape.append(dim)
            elif t.name in opt_shapes:
                shape.append(int(opt_shapes[t.name][axis]))
            else:
                raise DataError(f"model input '{t.name}' has a symbolic dim ({dim}) at axis {axis}: "
                                f"pass --data with sample inputs")
        dtype = np.dtype(t.dtype)
        if np.issubdtype(dtype, np.floating):
            out[t.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            out[t.name] = np.ones(shape, dtype)
        else:
            out[t.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return out
