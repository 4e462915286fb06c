"""Verify a chain of segment files against the source model: with no gate firing, the chain's final outputs
must equal the unsplit model's (ONNX Runtime CPU, max abs error <= tolerance x the output's scale, the
tolerance following the precision the graph computes in: see :func:`graph_tolerance`), and every gate output
must have shape ``[B]``, one bool per sample (:func:`check_gate_shapes`).

The check drives ONNX Runtime sessions directly rather than through the runtime package: it has to run
before the bundle exists, and it reports which segment diverged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from eecompile.analysis.probe import random_inputs
from eecompile.errors import GraphError

TOLERANCE = 1e-5


@dataclass
class SegmentIO:
    """What verification needs of one segment file: its data inputs, its threshold input (None for the final
    segment) and its outputs, by name."""

    file: Path
    inputs: list[str]  # data inputs (model inputs, carried tensors, state)
    threshold_input: str | None
    outputs: list[str]
    gate_output: str | None = None  # bool [B]: checked to hold one value per sample


def _session(path: Path) -> Any:
    import onnxruntime as ort

    from eecompile.runtimes.sessions import session_options

    so = session_options(threads=0, optimization="all", log_severity=3)  # ORT's own thread default, as before
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise GraphError(f"ONNX Runtime cannot load {path.name}: {str(e).splitlines()[0]}; this is a bug in the "
                         f"split, please report it with the model; nothing was written") from e


def run_chain_no_exit(segments: list[SegmentIO], feeds: dict[str, np.ndarray],
                      sessions: list | None = None) -> dict[str, np.ndarray]:
    """Run every segment in order with thresholds that never fire; returns everything produced."""
    env = dict(feeds)
    never = np.array(np.inf, dtype=np.float32)
    for k, seg in enumerate(segments):
        sess = sessions[k] if sessions is not None else _session(seg.file)
        f = {n: env[n] for n in seg.inputs}
        if seg.threshold_input:
            f[seg.threshold_input] = never
        try:
            outs = sess.run(seg.outputs, f)
        except Exception as e:
            raise GraphError(f"segment {k} ({seg.file.name}) fails to run: {str(e).splitlines()[0]}") from e
        env.update(zip(seg.outputs, outs, strict=True))
    return env


# One rounding step (2 ** -mantissa bits) of the precision a graph computes in, relative to an output's scale.
FLOAT16_STEP = 2.0 ** -10
BFLOAT16_STEP = 2.0 ** -7
_QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                            "MatMulInteger", "DynamicQuantizeLinear"})


@dataclass
class Tolerance:
    """What verify allows: ``|chain - model| <= max(relative x scale, absolute)`` per final output, where
    scale is the output's max magnitude. ``precision`` names where it comes from."""

    relative: float = TOLERANCE
    absolute: float = 0.0
    precision: str = "float32"

    def allowed(self, scale: float) -> float:
        return max(self.relative * scale, self.absolute)

    def describe(self) -> str:
        abs_part = f" or {self.absolute:.2e} absolute" if self.absolute else ""
        return f"{self.relative:.1e} of the scale{abs_part}, {self.precision}"


def graph_tolerance(model: ir.Model, n_boundaries: int, override: float | None = None) -> Tolerance:
    """The tolerance the graph's own precision calls for (``override``: a relative tolerance the user gave).

    1. float32 graphs: 1e-5 of the output's scale (ORT fuses ops differently in a segment than in the whole
       graph; float32 reassociation stays far below this).
    2. float16 / bfloat16 computation (fp16 weights or Casts, e.g. a converter's ``keep_io_types`` output with
       fp32 edges): each boundary rounds the carried tensors to the compute precision once where the whole graph
       may have kept them in float32 (ORT CPU computes many fp16 ops in float32 and drops the Casts between
       them), so one rounding step (2^-10 for fp16, 2^-7 for bf16) of the scale per boundary.
    3. quantized graphs (QDQ or integer ops): in addition, one quantization step absolute: the largest scale of
       the QuantizeLinear nearest the final outputs (a value on a rounding edge may land one step apart).
    """
    if override is not None:
        return Tolerance(float(override), 0.0, "given by --tolerance")
    dtypes: set[ir.DataType] = set()
    quant_scales: list[float] = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for v in node.outputs:
            if v.dtype is not None:
                dtypes.add(v.dtype)
        if node.op_type == "Cast":
            dtypes.add(ir.DataType(node.attributes.get_int("to", 1)))
        if node.op_type == "QuantizeLinear" and len(node.inputs) > 1 and node.inputs[1] is not None:
            scale = node.inputs[1].const_value
            if scale is not None:
                quant_scales.append(float(np.max(np.abs(scale.numpy()))))
        if node.op_type in _QUANTIZED_OPS:
            dtypes.add(ir.DataType.UINT8)
    dtypes |= {v.dtype for v in model.graph.initializers.values() if v.dtype is not None}
    k = max(n_boundaries, 1)
    if ir.DataType.FLOAT16 in dtypes:
        tol = Tolerance(max(TOLERANCE, k * FLOAT16_STEP), 0.0, f"float16 compute, {k} boundar{'y' if k == 1 else 'ies'}")
    elif ir.DataType.BFLOAT16 in dtypes:
        tol = Tolerance(max(TOLERANCE, k * BFLOAT16_STEP), 0.0, f"bfloat16 compute, {k} boundar{'y' if k == 1 else 'ies'}")
    else:
        tol = Tolerance()
    if quant_scales:
        tol.absolute = quant_scales[-1]
        tol.precision += ", quantized (one quantization step)"
    return tol


@dataclass
class Reference:
    """The unsplit model's outputs on the verification inputs (computed before the chain is written, so that
    the source model's weights can be released before the segments are loaded), with the carried tensors'
    values (to say at which boundary a difference starts) and the tolerance the graph's precision calls for."""

    cases: list[tuple[int, dict[str, np.ndarray]]]  # (batch size, feeds)
    outputs: list[dict[str, np.ndarray]]
    tolerance: Tolerance = field(default_factory=Tolerance)
    per_sample: bool = False  # each case feeds one sample (of a batch of `batch size`)


def reference_outputs(source: ir.Model, batch_sizes: list[int], per_sample: bool,
                      dims: dict[str, int] | None = None, carried: list[str] | None = None,
                      tolerance: Tolerance | None = None, axes: dict[str, int | None] | None = None) -> Reference:
    """Run ``source`` on random inputs at each batch size (one sample at a time when ``per_sample``);
    ``carried``: tensors crossing a boundary, exposed too; ``axes``: each input's batch axis (default: guessed
    from the declared shapes, :func:`~eecompile.analysis.probe.guess_batch_axes`)."""
    from eecompile.passes.session import session_from_model

    inputs = list(source.graph.inputs)
    cases: list[tuple[int, dict[str, np.ndarray]]] = []
    for b in batch_sizes:
        batched = axes or None
        if per_sample and not axes:
            batched = {v.name or "": 0 if v.shape is not None and len(v.shape) else None for v in inputs}
        assert batched is None or isinstance(batched, dict)
        feeds = random_inputs(inputs, b, dims, seed=100 + b, batched=batched)
        along = batched or {}
        rows = ([{k: v if along.get(k) is None else np.take(v, [i], axis=along[k]) for k, v in feeds.items()}
                 for i in range(b)] if per_sample else [feeds])
        cases += [(b, row) for row in rows]
    sess = session_from_model(source, what="the source model")
    names = [o.name for o in sess.get_outputs()]
    results = [dict(zip(names, sess.run(None, row), strict=True)) for _, row in cases]
    del sess
    values = {v.name: v for node in source.graph for v in node.outputs if v.name}
    extra = [values[n] for n in (carried or []) if n in values and n not in names and values[n].dtype is not None]
    if extra:
        # A second session for the carried tensors (exposing them could change what ORT fuses, so the final
        # outputs above come from the model as it is).
        sess = session_from_model(source, extra, what="the source model")
        want = [v.name or "" for v in extra]
        for (_, row), res in zip(cases, results, strict=True):
            res.update(zip(want, sess.run(want, row), strict=True))
    return Reference(cases, results, tolerance or Tolerance(), per_sample)


def _rel_error(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(max abs error, scale) of ``got`` against ``ref``."""
    if not ref.size:
        return 0.0, 0.0
    scale = float(np.max(np.abs(ref.astype(np.float64))))
    return float(np.max(np.abs(ref.astype(np.float64) - got))), scale


def _first_boundary(segments: list[SegmentIO], ref: dict[str, np.ndarray], got: dict[str, np.ndarray],
                    tol: Tolerance) -> str:
    """Where the chain starts to differ: the first boundary whose carried tensors differ beyond ``tol``."""
    for k, seg in enumerate(segments[:-1]):
        for name in seg.outputs:
            if name not in ref or name not in got:
                continue
            r, g = np.asarray(ref[name]), np.asarray(got[name])
            if r.shape != g.shape:
                return f"at boundary {k} (carried '{name}' has shape {g.shape}, the model's {r.shape})"
            if r.dtype.kind not in "fc":
                n = int(np.sum(r != g))
                if n:
                    return f"at boundary {k} (carried '{name}': {n} of {r.size} values differ)"
                continue
            err, scale = _rel_error(r, g)
            if not np.isfinite(err) or err > tol.allowed(scale):
                return f"at boundary {k} (carried '{name}' differs by {err / max(scale, 1e-12):.2e} of its scale)"
    return f"after the last boundary, in segment {len(segments) - 1} (every carried tensor matches)"


def _same_argmax(r: np.ndarray, g: np.ndarray, class_axis: int) -> tuple[int, int]:
    """(samples whose argmax over ``class_axis`` differs, samples)."""
    if r.ndim < 2:
        return int(np.sum(np.sign(r) != np.sign(g))), r.size
    a, b = np.argmax(r, axis=class_axis), np.argmax(g, axis=class_axis)
    differ = (a != b).reshape(a.shape[0], -1).any(axis=1) if a.ndim else np.array([a != b])
    return int(differ.sum()), int(differ.size)


def check_gate_shapes(segments: list[SegmentIO], got: dict[str, np.ndarray], n: int) -> None:
    """Raise GraphError unless every segment's gate output has shape ``[n]`` (one bool per sample of a batch
    of ``n``): a gate reducing over another axis (e.g. time of a ``[T, B, D]`` cut) would exit the wrong rows."""
    for k, seg in enumerate(segments):
        if seg.gate_output is None or seg.gate_output not in got:
            continue
        shape = tuple(np.shape(got[seg.gate_output]))
        if shape != (n,):
            raise GraphError(f"verify: segment {k}'s gate '{seg.gate_output}' has shape {list(shape)} for a batch of "
                             f"{n}, expected [{n}] (one bool per sample); the head or gate does not keep the batch "
                             f"axis: this is a bug in the split, please report it with the model; nothing was written")


def verify_chain(reference: Reference, segments: list[SegmentIO], final_outputs: list[str],
                 tolerance: float | Tolerance | None = None, class_axis: int = -1) -> float:
    """Raise GraphError if the chain differs from the reference; return the worst relative error seen.

    ``tolerance``: a relative tolerance or a :class:`Tolerance` (default: ``reference.tolerance``, from the
    graph's precision). The error names the boundary where the difference starts, the observed and allowed
    error, and whether it looks like numeric noise (the argmax agrees on every sample) or a broken split."""
    tol = (reference.tolerance if tolerance is None else
           tolerance if isinstance(tolerance, Tolerance) else Tolerance(float(tolerance), 0.0, "given"))
    cases, refs = reference.cases, reference.outputs
    sessions = [_session(s.file) for s in segments]
    worst = 0.0
    for (b, row), ref in zip(cases, refs, strict=True):
        got = run_chain_no_exit(segments, row, sessions)
        check_gate_shapes(segments, got, 1 if reference.per_sample else b)
        for name in final_outputs:
            r, g = np.asarray(ref[name]), np.asarray(got[name])
            if r.shape != g.shape:
                raise GraphError(f"verify: final output '{name}' has shape {g.shape} from the chain, "
                                 f"{r.shape} from the model (batch {b}); this is a bug in the split, please report "
                                 f"it with the model; nothing was written")
            if r.dtype.kind != "f":
                if not np.array_equal(r, g):
                    raise GraphError(f"verify: final output '{name}' differs from the model (batch {b}) "
                                     f"{_first_boundary(segments, ref, got, tol)}; this is a bug in the split, "
                                     f"please report it with the model; nothing was written")
                continue
            err, scale = _rel_error(r, g)
            rel = err / max(scale, 1e-12)
            if not np.isfinite(err) or err > tol.allowed(scale):
                where = _first_boundary(segments, ref, got, tol)
                n_diff, n = _same_argmax(r, g, class_axis) if np.isfinite(err) else (-1, 0)
                if n_diff == 0:
                    verdict = (f"it looks like numeric noise (the argmax agrees on all {n} samples): pass "
                               f"--tolerance {10 ** np.ceil(np.log10(rel)):.0e} (compile_model(tolerance=...)) "
                               f"to accept it")
                else:
                    what = "non-finite values" if n_diff < 0 else f"the argmax differs on {n_diff} of {n} samples"
                    verdict = f"{what}: this is a bug in the split, please report it with the model"
                raise GraphError(
                    f"verify: with no exit taken, the chain's '{name}' differs from the unsplit model by "
                    f"{rel:.2e} of its scale ({err:.2e} absolute) at batch {b}, allowed {tol.describe()}; the "
                    f"difference starts {where}; {verdict}; nothing was written"
                )
            worst = max(worst, rel)
    return worst
