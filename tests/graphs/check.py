"""End-to-end checks of a bundle against ONNX Runtime on the original model: no exit taken equals the
model; an exit forced for every sample returns that exit's head rows; with mixed thresholds the compact and
wait-all policies give, per sample, the row of the exit it took (as policy "never", which runs every exit,
records it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

import eecompile


def reference(model: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model's outputs on ``feeds``; one sample at a time when it only runs at batch 1."""
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    n = max((len(v) for v in feeds.values() if np.ndim(v)), default=1)
    # inputs exported with batch 1 that are given one row per sample (a bool[1] flag given once is fed as is)
    fixed = [i.name for i in sess.get_inputs() if i.shape and i.shape[0] == 1 and np.shape(feeds[i.name])[:1] == (n,)]
    if not fixed or n == 1:
        return dict(zip(names, sess.run(None, feeds), strict=True))
    parts = [sess.run(None, {k: v[i:i + 1] if k in fixed else v for k, v in feeds.items()}) for i in range(n)]
    return {nm: np.concatenate([p[j] for p in parts]) for j, nm in enumerate(names)}


def close(got: np.ndarray, want: np.ndarray, rtol: float = 1e-4) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    if got.dtype.kind in "fc":
        scale = max(float(np.max(np.abs(want))) if want.size else 0.0, 1.0)
        assert float(np.max(np.abs(got.astype(np.float64) - want))) <= rtol * scale
    else:
        np.testing.assert_array_equal(got, want)


def check_bundle(model: Path, bundle: Path, feeds: dict[str, np.ndarray], final: str,
                 exit_refs: list[str | None], transform: Callable[[np.ndarray], np.ndarray] | None = None,
                 rtol: float = 1e-4) -> dict[str, np.ndarray]:
    """Assert the three properties above; ``exit_refs[k]`` names the model output (e.g. from
    :func:`builders.with_head_output`) exit k's rows must equal, after ``transform`` (the final activation)."""
    ref = reference(model, feeds)
    runner = eecompile.load(bundle)
    n_exits = runner.manifest.n_early_exits
    res = runner.run(feeds, thresholds=["never"] * n_exits)
    assert (res.exit_index == n_exits).all()
    close(res.outputs[final], ref[final], rtol)
    for k in range(n_exits):
        th: list = ["never"] * n_exits
        th[k] = "always"
        r = runner.run(feeds, thresholds=th)
        assert (r.exit_index == k).all()
        if exit_refs[k] is not None:
            want = ref[exit_refs[k]]
            want = transform(want) if transform is not None else want
            close(r.outputs[final], want.reshape(r.outputs[final].shape), rtol)
    if n_exits:
        probe = runner.run(feeds, thresholds=["never"] * n_exits, policy="never")
        assert probe.gate_scores is not None and np.isfinite(probe.gate_scores).all()
        # Each gate at its median score (about half the samples it sees leave); a gate whose scores are all
        # equal (constant-weight test graphs) is left at "never".
        mixed = [float(np.median(s)) if np.ptp(s) > 0 else "never" for s in probe.gate_scores]
        base = runner.run(feeds, thresholds=mixed, policy="never")
        assert base.all_exits is not None
        assert len(set(base.exit_index.tolist())) > 1, "mixed thresholds should spread the samples over exits"
        axes = {t.name: t.batch_axis or 0 for t in runner.manifest.outputs}
        for pol in ("compact", "wait-all"):
            r = runner.run(feeds, thresholds=mixed, policy=pol)
            np.testing.assert_array_equal(r.exit_index, base.exit_index)
            for name, v in r.outputs.items():
                close(v, base.outputs[name], 1e-6)
                ax = axes.get(name, 0)
                rows = np.stack([np.take(np.asarray(base.all_exits[int(e)][name]), i, axis=ax)
                                 for i, e in enumerate(r.exit_index)], axis=ax)
                close(v, rows, 1e-6)
    return ref
