"""Verify a chain of segment files against the source model: with no gate firing, the chain's final outputs
must equal the unsplit model's (ONNX Runtime CPU, max abs error <= tolerance x the output's scale).

The check drives ONNX Runtime sessions directly rather than through the runtime package: it has to run
before the bundle exists, and it reports which segment diverged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from eecompile.analysis.probe import random_inputs
from eecompile.errors import GraphError

TOLERANCE = 1e-5


@dataclass
class SegmentIO:
    file: Path
    inputs: list[str]  # data inputs (model inputs, carried tensors, state)
    threshold_input: str | None
    outputs: list[str]


def _session(path: Path) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
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


@dataclass
class Reference:
    """The unsplit model's outputs on the verification inputs (computed before the chain is written, so that
    the source model's weights can be released before the segments are loaded)."""

    cases: list[tuple[int, dict[str, np.ndarray]]]  # (batch size, feeds)
    outputs: list[dict[str, np.ndarray]]


def reference_outputs(source: ir.Model, batch_sizes: list[int], per_sample: bool,
                      dims: dict[str, int] | None = None) -> Reference:
    """Run ``source`` on random inputs at each batch size (one sample at a time when ``per_sample``)."""
    from eecompile.passes.session import session_from_model

    inputs = list(source.graph.inputs)
    cases: list[tuple[int, dict[str, np.ndarray]]] = []
    for b in batch_sizes:
        feeds = random_inputs(inputs, b, dims, seed=100 + b)
        rows = [{k: v[i:i + 1] if v.ndim else v for k, v in feeds.items()} for i in range(b)] if per_sample else [feeds]
        cases += [(b, row) for row in rows]
    sess = session_from_model(source, what="the source model")
    names = [o.name for o in sess.get_outputs()]
    return Reference(cases, [dict(zip(names, sess.run(None, row), strict=True)) for _, row in cases])


def verify_chain(reference: Reference, segments: list[SegmentIO], final_outputs: list[str],
                 tolerance: float = TOLERANCE) -> float:
    """Raise GraphError if the chain differs from the reference; return the worst relative error seen."""
    cases, refs = reference.cases, reference.outputs
    sessions = [_session(s.file) for s in segments]
    worst = 0.0
    for (b, row), ref in zip(cases, refs, strict=True):
        got = run_chain_no_exit(segments, row, sessions)
        for name in final_outputs:
            r, g = np.asarray(ref[name]), np.asarray(got[name])
            if r.shape != g.shape:
                raise GraphError(f"verify: final output '{name}' has shape {g.shape} from the chain, "
                                 f"{r.shape} from the model (batch {b})")
            if r.dtype.kind != "f":
                if not np.array_equal(r, g):
                    raise GraphError(f"verify: final output '{name}' differs from the model (batch {b})")
                continue
            scale = max(float(np.max(np.abs(r))) if r.size else 0.0, 1e-12)
            err = float(np.max(np.abs(r.astype(np.float64) - g))) / scale if r.size else 0.0
            if not np.isfinite(err) or err > tolerance:
                raise GraphError(
                    f"verify: with no exit taken, the chain's '{name}' differs from the unsplit model by "
                    f"{err:.2e} of its scale at batch {b} (allowed {tolerance:.0e}); this is a bug in the "
                    f"split, please report it with the model; nothing was written"
                )
            worst = max(worst, err)
    return worst
