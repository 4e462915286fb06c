"""Running a bundle with jump exits (MuE's encoder–decoder exits): a sample that fires at a jump exit continues at
a later segment with the exit's head output standing in for the jump tensor (the encoder output), and may leave
at a later (decoder) exit too.

    runner = JumpRunner("mue.eebundle")
    res = runner.run({"src": src, "tgt": tgt}, thresholds=[0.9, 0.9, 0.8])
    res.outputs["logits"], res.exit_index, res.jumped       # jumped: the jump exit each sample took, or -1

Policies:

- ``compact``: the rows that jump leave the batch and wait; when the chain reaches the segment they jump to, they
  are merged back with the rows that arrive there (in input order), so the decoder runs once on both. Rows that end
  at an exit leave for good, as in :class:`~eecompile.runtimes.chain.EarlyExitRunner`.
- ``wait-all``: every segment runs on the whole batch; a row that jumped has the jump tensor replaced by its exit's
  output when its target segment starts, and gates only count rows still running (same results).
- ``never`` (calibration): as ``wait-all``, but a row goes on past the exit where it ends, so every exit on its path
  records its outputs and gate score (``all_exits``, ``gate_scores``, ``gate_masks``; NaN, 0 or False for the rows
  whose path skips that segment). Jumps still follow their gates: force a path with ``"always"``/``"never"``.

``manifest.jumps`` lists ``{exit, tensor, to}``; the segment before ``to`` is a boundary without a gate. Backends
are the runner's (:func:`~eecompile.runtimes.chain.make_backend`); the merge happens on host arrays. Imports numpy,
the bundle module and the runtime's own modules only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from eecompile.bundle import Bundle, TensorInfo
from eecompile.errors import BackendError, BundleError, SpecError
from eecompile.runtimes.base import (
    ResolvedThresholds,
    SegmentBackend,
    Threshold,
    check_feeds,
    resolve_thresholds,
)
from eecompile.runtimes.chain import RunResult, concat_results, make_backend

__all__ = ["JumpResult", "JumpRunner", "exit_shares"]


def exit_shares(manifest: Any, counts: np.ndarray, jumped: np.ndarray, n: int) -> str:
    """``"exit 3 10.0%, final 90.0%; jumped at exit 0 40.0%, exit 1 0.0%"``: the share of ``n`` samples ending at
    each exit a sample can end at (``counts``: per segment), then, for a bundle with jump exits, the share that
    jumped at each (``jumped``: per segment). A jump exit or the boundary before a jump target ends no sample."""
    k_final = len(manifest.segments) - 1
    jump_exits = sorted(int(j["exit"]) for j in manifest.jumps or ())
    ends = [k for k, s in enumerate(manifest.segments)
            if k == k_final or (k not in jump_exits and s.exit.gate is not None)]
    shares = ", ".join(f"{'final' if k == k_final else f'exit {k}'} {100.0 * counts[k] / n:.1f}%" for k in ends)
    if jump_exits:
        shares += "; jumped at " + ", ".join(f"exit {k} {100.0 * jumped[k] / n:.1f}%" for k in jump_exits)
    return shares


@dataclass
class JumpResult(RunResult):
    """:class:`~eecompile.runtimes.chain.RunResult` plus ``jumped``: int64 [B], the jump exit (segment index) each
    sample took, -1 for none. ``exit_index`` is the exit where the sample ended."""

    jumped: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


@dataclass(frozen=True)
class _Seg:
    index: int
    inputs: tuple[str, ...]
    gate: str | None
    outputs: tuple[tuple[str, str], ...]  # final output name -> tensor (ending exits) ; () for jumps/targets
    jump: tuple[str, str, int] | None  # (jump tensor, this segment's tensor giving it, target segment)
    keep: tuple[str, ...]  # names later segments read (kept after this segment)


class JumpRunner:
    """Runs a bundle whose manifest has ``jumps``. ``backend`` and ``options`` as for
    :class:`~eecompile.runtimes.chain.EarlyExitRunner`. Raises :class:`BundleError` for a bundle without jumps."""

    def __init__(self, bundle_or_path: Bundle | str | Path, backend: str | SegmentBackend = "onnxruntime",
                 **options: Any) -> None:
        self.bundle = bundle_or_path if isinstance(bundle_or_path, Bundle) else Bundle.load(bundle_or_path)
        m = self.manifest = self.bundle.manifest
        if not m.jumps:
            raise BundleError(f"{self.bundle.path}: no jump exits in the manifest; run it with eecompile.load(...)")
        self.inputs: list[TensorInfo] = list(m.inputs)
        self.output_names = [t.name for t in m.outputs]
        self.n_exits = len(m.segments)
        jumps = {int(j["exit"]): (str(j["tensor"]), int(j["to"])) for j in m.jumps}
        reads_after: list[set[str]] = [set() for _ in m.segments]
        for k in range(len(m.segments) - 2, -1, -1):
            reads_after[k] = reads_after[k + 1] | {t.name for t in m.segments[k + 1].inputs}
        self._segs = []
        for k, seg in enumerate(m.segments):
            gate = seg.exit.gate
            jump = None
            if k in jumps:
                tensor, to = jumps[k]
                jump = (tensor, seg.exit.outputs[tensor], to)
            outputs = () if jump is not None or not seg.exit.outputs else tuple(
                (n, seg.exit.outputs[n]) for n in self.output_names)
            self._segs.append(_Seg(k, tuple(t.name for t in seg.inputs), gate.output if gate else None, outputs,
                                   jump, tuple(sorted(reads_after[k]))))
        self._targets = {to: tensor for tensor, to in jumps.values()}
        self._axis: dict[str, int | None] = {t.name: t.batch_axis for t in m.inputs}
        for seg in m.segments:
            self._axis.update({t.name: t.batch_axis for t in seg.outputs if t.name not in self._axis})
        self._out_axes = {t.name: (t.batch_axis or 0) for t in m.outputs}
        self.backend = make_backend(self.bundle, backend, options)
        self._closed = False

    def resolve(self, thresholds: None | Threshold | Sequence[Threshold | None] | ResolvedThresholds = None
                ) -> ResolvedThresholds:
        """Thresholds of the gated exits (jump exits included, in segment order); see
        :func:`~eecompile.runtimes.base.resolve_thresholds`."""
        return resolve_thresholds(self.manifest.exits, thresholds)

    def run(self, feeds: Mapping[str, np.ndarray],
            thresholds: None | Threshold | Sequence[Threshold | None] | ResolvedThresholds = None,
            policy: str = "compact") -> JumpResult:
        """Run one batch. ``feeds`` and ``thresholds`` as for :meth:`EarlyExitRunner.run`; ``policy``: ``compact``,
        ``wait-all`` or ``never`` (see the module docstring). Raises :class:`~eecompile.errors.DataError`, :class:`~eecompile.errors.ThresholdError`,
        :class:`SpecError` (another policy), :class:`BackendError` (closed, or a segment failed)."""
        if self._closed:
            raise BackendError(f"this runner for {self.bundle.path} was closed; load the bundle again")
        if policy not in ("compact", "wait-all", "never"):
            raise SpecError(f"policy '{policy}': a bundle with jump exits runs with policy compact, wait-all or never")
        thr = self.resolve(thresholds)
        arrays, n = check_feeds(self.inputs, feeds)
        settings = iter(thr)
        per_seg = {s.index: next(settings) for s in self._segs if s.gate is not None}
        run = self._compact if policy == "compact" else self._record if policy == "never" else self._wait_all
        # Batches larger than the backend takes (engines' max batch; per_sample bundles: 1) run in chunks.
        chunk = 1 if self.manifest.batch_mode == "per_sample" else self.backend.max_batch
        if chunk is None or n <= chunk:
            return run(arrays, n, per_seg)
        parts = []
        for lo in range(0, n, chunk):
            rows = np.arange(lo, min(lo + chunk, n))
            part = {t.name: (a if t.batch_axis is None else np.take(a, rows, axis=t.batch_axis))
                    for t, a in zip(self.inputs, arrays.values(), strict=True)}
            parts.append(run(part, len(rows), per_seg))
        whole = concat_results(parts, self._out_axes)
        return JumpResult(**{f.name: getattr(whole, f.name) for f in fields(RunResult)},
                          jumped=np.concatenate([p.jumped for p in parts]))

    def _fire(self, outs: dict[str, Any], seg: _Seg, setting: Any, m: int) -> np.ndarray:
        if seg.gate is None:
            # The final segment ends every row; a jump target's boundary lets every row through.
            return np.ones(m, dtype=bool) if seg.outputs else np.zeros(m, dtype=bool)
        if setting.override is not None:
            return np.full(m, setting.override == "always")
        mask = self.backend.read_mask(outs[seg.gate]).astype(bool, copy=False)
        if mask.shape != (m,):
            raise BackendError(f"segment {seg.index}: gate '{seg.gate}' has shape {list(mask.shape)}, expected [{m}]")
        return mask

    def _result(self, results: dict[str, np.ndarray], outs: dict[str, Any], seg: _Seg, rows: np.ndarray,
                dest: np.ndarray, n: int) -> None:
        be = self.backend
        for name, t in seg.outputs:
            x = be.to_host(outs[t])
            axis = self._out_axes[name]
            xb = np.moveaxis(x, axis, 0) if axis else x
            if name not in results:
                results[name] = np.zeros((n, *xb.shape[1:]), dtype=xb.dtype)
            results[name][dest] = xb[rows]

    def _finish(self, results: dict[str, np.ndarray], exit_index: np.ndarray, jumped: np.ndarray,
                timings: np.ndarray, sizes: list[int]) -> JumpResult:
        counts = np.bincount(exit_index, minlength=self.n_exits).astype(np.int64)
        outputs = {name: (np.ascontiguousarray(np.moveaxis(a, 0, self._out_axes[name])) if self._out_axes[name]
                          else a) for name, a in results.items()}
        return JumpResult(outputs, exit_index, counts, timings, np.zeros(self.n_exits, dtype=np.int64),
                          batch_sizes=[sizes], jumped=jumped)

    def _start(self, arrays: dict[str, np.ndarray], n: int) -> tuple[dict[str, Any], dict[str, np.ndarray],
                                                                     np.ndarray, np.ndarray, np.ndarray, list[int]]:
        """A call's starting state: the uploaded inputs, results, exit index, jump taken, timings, batch sizes."""
        return (self.backend.upload(arrays), {}, np.full(n, self.n_exits - 1, dtype=np.int64),
                np.full(n, -1, dtype=np.int64), np.zeros(self.n_exits), [])

    def _compact(self, arrays: dict[str, np.ndarray], n: int, per_seg: dict[int, Any]) -> JumpResult:
        be = self.backend
        env, results, exit_index, jumped, timings, sizes = self._start(arrays, n)
        active = np.arange(n)
        waiting: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}  # target segment -> (rows, jump tensor rows)
        for seg in self._segs:
            t0 = time.perf_counter()
            k = seg.index
            if waiting.get(k):
                env, active = self._merge(env, active, waiting.pop(k), self._targets[k], arrays, seg)
            sizes.append(len(active))
            if not len(active):
                if any(waiting.values()):
                    continue
                break
            setting = per_seg.get(k)
            outs = be.run_segment(k, {name: env[name] for name in seg.inputs},
                                  setting.value if setting is not None else None)
            fire = self._fire(outs, seg, setting, len(active))
            rows = np.flatnonzero(fire)
            if rows.size and seg.jump is not None:
                tensor, t, to = seg.jump
                waiting.setdefault(to, []).append((active[rows], be.to_host(be.gather(outs[t], rows, 0))))
                jumped[active[rows]] = k
            elif rows.size:
                self._result(results, outs, seg, rows, active[rows], n)
                exit_index[active[rows]] = k
            env = {name: outs[name] if name in outs else env[name] for name in seg.keep if name in outs or name in env}
            if rows.size:
                keep = np.flatnonzero(~fire)
                active = active[keep]
                env = {name: (x if self._axis.get(name, 0) is None else be.gather(x, keep, self._axis.get(name) or 0))
                       for name, x in env.items()}
            timings[k] = time.perf_counter() - t0
        be.synchronize()
        return self._finish(results, exit_index, jumped, timings, sizes)

    def _merge(self, env: dict[str, Any], active: np.ndarray, groups: list[tuple[np.ndarray, np.ndarray]],
               tensor: str, arrays: dict[str, np.ndarray], seg: _Seg) -> tuple[dict[str, Any], np.ndarray]:
        """The rows arriving at target segment ``seg`` and the rows that jumped to it, in input order: the jump
        tensor from each row's own source, model inputs from the call's inputs (nothing else crosses a target)."""
        be = self.backend
        rows = np.concatenate([active, *(g[0] for g in groups)])
        parts = ([be.to_host(env[tensor])] if len(active) else []) + [g[1] for g in groups]
        order = np.argsort(rows, kind="stable")
        merged: dict[str, Any] = {tensor: be.from_host(np.ascontiguousarray(np.concatenate(parts)[order]))}
        rows = rows[order]
        for name, a in arrays.items():
            axis = self._axis.get(name)
            merged[name] = be.from_host(a if axis is None else np.ascontiguousarray(np.take(a, rows, axis=axis)))
        return merged, rows

    def _record(self, arrays: dict[str, np.ndarray], n: int, per_seg: dict[int, Any]) -> JumpResult:
        return self._wait_all(arrays, n, per_seg, record=True)

    def _wait_all(self, arrays: dict[str, np.ndarray], n: int, per_seg: dict[int, Any],
                  record: bool = False) -> JumpResult:
        be = self.backend
        env, results, exit_index, jumped, timings, sizes = self._start(arrays, n)
        running = np.ones(n, dtype=bool)  # on its path at this segment (and, unless recording, not ended)
        ended = np.zeros(n, dtype=bool)
        k_all = len(self._segs)
        all_exits: list[dict[str, np.ndarray]] = [{} for _ in self._segs]
        scores = np.full((k_all - 1, n), np.nan, np.float32)
        masks = np.zeros((k_all - 1, n), dtype=bool)
        stored: dict[int, np.ndarray] = {}  # target segment -> jump tensor rows (host, batch first, all n rows)
        to_of = np.full(n, -1, dtype=np.int64)
        for seg in self._segs:
            t0 = time.perf_counter()
            k = seg.index
            arriving = np.flatnonzero(to_of == k)
            if arriving.size:
                tensor = self._targets[k]
                x = be.to_host(env[tensor]).copy()
                x[arriving] = stored[k][arriving]
                env[tensor] = be.from_host(x)
                running[arriving] = True
                to_of[arriving] = -1
            if not running.any() and not (to_of > k).any():
                break
            sizes.append(n)
            setting = per_seg.get(k)
            outs = be.run_segment(k, {name: env[name] for name in seg.inputs},
                                  setting.value if setting is not None else None)
            fire = self._fire(outs, seg, setting, n) & running
            if record:
                self._record_exit(all_exits, scores, masks, outs, seg, running)
            rows = np.flatnonzero(fire)
            if rows.size and seg.jump is not None:
                tensor, t, to = seg.jump
                host = be.to_host(outs[t])
                buf = stored.setdefault(to, np.zeros_like(host))
                buf[rows] = host[rows]
                to_of[rows], jumped[rows] = to, k
                running &= ~fire
            elif rows.size:
                rows = np.flatnonzero(fire & ~ended)
                self._result(results, outs, seg, rows, rows, n)
                exit_index[rows] = k
                ended |= fire
                if not record:
                    running &= ~fire
            env = {name: outs[name] if name in outs else env[name] for name in seg.keep if name in outs or name in env}
            timings[k] = time.perf_counter() - t0
        be.synchronize()
        res = self._finish(results, exit_index, jumped, timings, sizes)
        if record:
            res.all_exits, res.gate_scores, res.gate_masks = all_exits, scores, masks
        return res

    def _record_exit(self, all_exits: list[dict[str, np.ndarray]], scores: np.ndarray, masks: np.ndarray,
                     outs: dict[str, Any], seg: _Seg, on_path: np.ndarray) -> None:
        """Policy ``never``: segment ``seg``'s exit outputs (model layout), gate score and own gate decision for
        the rows on their path here; the others get NaN (0 for integer outputs), NaN and False."""
        be, k = self.backend, seg.index
        gate = self.manifest.segments[k].exit.gate
        if gate is not None and seg.gate is not None:
            if gate.score_output and gate.score_output in outs:
                scores[k] = np.where(on_path, be.to_host(outs[gate.score_output]).reshape(-1), np.nan)
            masks[k] = be.read_mask(outs[seg.gate]).astype(bool) & on_path
        for name, t in seg.outputs:
            axis = self._out_axes[name]
            x = np.moveaxis(be.to_host(outs[t]), axis, 0).copy() if axis else be.to_host(outs[t]).copy()
            x[~on_path] = np.nan if x.dtype.kind in "fc" else 0
            all_exits[k][name] = np.moveaxis(x, 0, axis) if axis else x

    def close(self) -> None:
        """Release the backend; later :meth:`run` calls raise :class:`BackendError`."""
        self._closed = True
        self.backend.close()

    def __enter__(self) -> JumpRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
