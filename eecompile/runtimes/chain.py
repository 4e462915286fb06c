"""The early-exit runner: chains a bundle's segments, drops the samples that exited, stops when none is left.

    runner = EarlyExitRunner("model.eebundle")              # sessions/engines created once, here
    result = runner.run({"input": x}, thresholds=[0.9, "never"], policy="compact")
    result.outputs["logits"], result.exit_index, result.exit_counts

Everything that follows from the manifest (which tensors each segment reads, what to keep in the
environment after each segment and along which axis to gather it) is planned once in ``__init__``; the
per-segment loop only runs, reads the gate mask, scatters exited rows and gathers the rest.

Thread-safe: a call keeps all its state in locals (backends are thread-safe for ``run_segment``).
Imports numpy, the bundle module and the backends only (no onnx, no torch): this runs on a Jetson.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eecompile.bundle import Bundle, TensorInfo
from eecompile.errors import BackendError, BundleError, DataError, SpecError
from eecompile.runtimes.base import SegmentBackend
from eecompile.runtimes.data import batch_size_of, check_array

POLICIES = ("compact", "wait-all", "never")
_NO_ROWS = np.zeros(0, dtype=np.int64)  # read-only by convention: the rows that exit when none does
Threshold = float | str  # a number, "never" or "always"


@dataclass
class RunResult:
    """The outcome of one :meth:`EarlyExitRunner.run` call (B samples, K segments = K exits)."""

    outputs: dict[str, np.ndarray]  # final output name -> one row per sample, from the exit it took
    exit_index: np.ndarray  # int64 [B], 0-based; the final exit is K - 1
    exit_counts: np.ndarray  # int64 [K]: samples that left at each exit
    timings: np.ndarray  # float64 [K]: seconds spent in each segment's step (0 for segments not reached)
    nonfinite_counts: np.ndarray  # int64 [K]: samples reaching the exit whose outputs had NaN/Inf
    all_exits: list[dict[str, np.ndarray]] | None = None  # policy "never": every exit's outputs, all samples
    gate_masks: np.ndarray | None = None  # policy "never": bool [K-1, B], each gate's own decision
    gate_scores: np.ndarray | None = None  # policy "never": float32 [K-1, B], the value each gate compared

    @property
    def n_samples(self) -> int:
        return int(self.exit_index.shape[0])


@dataclass(frozen=True)
class _Step:
    """What the loop needs for one segment, computed once from the manifest."""

    index: int
    inputs: tuple[str, ...]
    gate: str | None  # gate output name; None for the final segment
    score: str | None  # gate score output name (the value compared with the threshold), if any
    exits: tuple[tuple[str, str], ...]  # (final output name, this segment's tensor)
    keep: tuple[tuple[str, bool, int | None], ...]  # env after this step: (name, from outputs?, batch axis)


def _make_backend(bundle: Bundle, backend: str | SegmentBackend, options: dict[str, Any]) -> SegmentBackend:
    if isinstance(backend, SegmentBackend):
        return backend
    if backend == "onnxruntime":
        from eecompile.runtimes.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(bundle, **options)
    if backend == "tensorrt":
        try:
            from eecompile.runtimes.tensorrt import TensorRTBackend
        except ImportError as e:
            raise BackendError(
                f"the tensorrt backend cannot be loaded ({e}); install the GPU extras "
                f"(`pip install eecompile[gpu]`) on a machine with an NVIDIA GPU, or use --backend onnxruntime"
            ) from e
        return TensorRTBackend(bundle, **options)
    raise BackendError(f"unknown backend '{backend}'; use onnxruntime or tensorrt")


class EarlyExitRunner:
    """Runs an early-exit bundle. Create once (loads every segment), then call :meth:`run` many times."""

    def __init__(self, bundle_or_path: Bundle | str | Path, backend: str | SegmentBackend = "onnxruntime",
                 **options: Any) -> None:
        self.bundle = bundle_or_path if isinstance(bundle_or_path, Bundle) else Bundle.load(bundle_or_path)
        m = self.manifest = self.bundle.manifest
        if not m.segments:
            raise BundleError(f"{self.bundle.path}: the manifest lists no segments; recompile the bundle")
        if m.batch_mode not in ("dynamic", "per_sample"):
            raise BundleError(f"{self.bundle.path}: unknown batch_mode '{m.batch_mode}'; upgrade eecompile")
        self.inputs: list[TensorInfo] = list(m.inputs)
        self._input_names = frozenset(t.name for t in m.inputs)
        self._batched_inputs = [t for t in m.inputs if t.batch_axis is not None]
        if not self._batched_inputs:
            raise BundleError(f"{self.bundle.path}: no model input has a batch axis; recompile the bundle")
        self.output_names = [t.name for t in m.outputs]
        self._out_axes = {t.name: (t.batch_axis or 0) for t in m.outputs}
        self.n_exits = len(m.segments)
        self.per_sample = m.batch_mode == "per_sample"
        self._steps = self._plan()
        self.backend = _make_backend(self.bundle, backend, options)

    # --- planning (once) ------------------------------------------------------------------------------
    def _plan(self) -> tuple[_Step, ...]:
        m = self.manifest
        where = str(self.bundle.path / "manifest.yaml")
        axis_of: dict[str, int | None] = {t.name: t.batch_axis for t in m.inputs}
        reads_after: list[set[str]] = [set() for _ in m.segments]  # names read by segments after k
        for k in range(len(m.segments) - 2, -1, -1):
            reads_after[k] = reads_after[k + 1] | {t.name for t in m.segments[k + 1].inputs}
        available = set(axis_of)
        steps = []
        for k, seg in enumerate(m.segments):
            missing = [t.name for t in seg.inputs if t.name not in available]
            if missing:
                raise BundleError(f"{where}: segment {k} reads {missing}, which no model input or earlier "
                                  f"segment provides; recompile the bundle")
            is_last = k == len(m.segments) - 1
            gate = seg.exit.gate
            if (gate is None) != is_last:
                raise BundleError(f"{where}: segment {k} {'has' if gate else 'lacks'} a gate; only the final "
                                  f"segment has none. Recompile the bundle")
            produced = {t.name: t for t in seg.outputs}
            for name in seg.exit.outputs.values():
                if name not in produced:
                    raise BundleError(f"{where}: segment {k} exit output '{name}' is not among its outputs")
            unknown = set(seg.exit.outputs) ^ set(self.output_names)
            if unknown:
                raise BundleError(f"{where}: exit {k} produces {sorted(seg.exit.outputs)}, the model's outputs "
                                  f"are {self.output_names}; recompile the bundle")
            carried = set(seg.carried_out) | set(gate.state_outputs if gate else ())
            keep = []
            for name in sorted(reads_after[k]):
                if name in carried and name in produced:
                    keep.append((name, True, produced[name].batch_axis))
                    axis_of[name] = produced[name].batch_axis
                elif name in available:
                    keep.append((name, False, axis_of[name]))
            available = {n for n, _, _ in keep} | set(produced)
            steps.append(_Step(index=k, inputs=tuple(t.name for t in seg.inputs),
                               gate=gate.output if gate else None,
                               score=gate.score_output if gate else None,
                               exits=tuple((n, seg.exit.outputs[n]) for n in self.output_names),
                               keep=tuple(keep)))
        return tuple(steps)

    # --- argument checks ------------------------------------------------------------------------------
    def _thresholds(self, thresholds: None | str | Sequence[Threshold]) -> list[tuple[float, str | None]]:
        """Per early exit: (value fed to the gate, override "never"/"always"/None)."""
        bundle_thr = self.manifest.thresholds
        n = len(bundle_thr)
        if thresholds is None:
            return [(t, None) for t in bundle_thr]
        if isinstance(thresholds, str):
            thresholds = [thresholds] * n
        if len(thresholds) != n:
            raise SpecError(f"thresholds: got {len(thresholds)} values for {n} early exits; give one per exit")
        out: list[tuple[float, str | None]] = []
        for i, t in enumerate(thresholds):
            if isinstance(t, str):
                if t not in ("never", "always"):
                    raise SpecError(f"thresholds[{i}]: '{t}' is neither a number nor 'never'/'always'")
                out.append((bundle_thr[i], t))  # the gate still runs (its mask is recorded); we override it
            else:
                v = float(t)
                if math.isnan(v):
                    raise SpecError(f"thresholds[{i}]: NaN is not a threshold")
                out.append((v, None))
        return out

    def _check_feeds(self, feeds: dict[str, Any]) -> tuple[dict[str, np.ndarray], int]:
        if not isinstance(feeds, dict):
            raise DataError(f"feeds must be a dict of arrays named {sorted(self._input_names)}")
        missing = [n for n in self._input_names if n not in feeds]
        extra = [n for n in feeds if n not in self._input_names]
        if missing or extra:
            what = f"missing {sorted(missing)}" if missing else f"unexpected {sorted(extra)}"
            raise DataError(f"feeds: {what}; the model's inputs are {[t.name for t in self.inputs]}")
        arrays = {t.name: check_array(t, np.asarray(feeds[t.name]), "feeds") for t in self.inputs}
        return arrays, batch_size_of(arrays, self.inputs, "feeds")

    # --- running --------------------------------------------------------------------------------------
    def run(self, feeds: dict[str, np.ndarray], thresholds: None | str | Sequence[Threshold] = None,
            policy: str = "compact") -> RunResult:
        """Run a batch. ``thresholds``: None (the bundle's), "never"/"always", or one per early exit (number,
        "never", "always"). ``policy``: compact | wait-all | never (see the module docs)."""
        if policy not in POLICIES:
            raise SpecError(f"policy '{policy}' is not one of {', '.join(POLICIES)}")
        thr = self._thresholds(thresholds)
        arrays, n = self._check_feeds(feeds)
        if not self.per_sample or n == 1:
            return self._run_batch(arrays, n, thr, policy)
        # The graphs only run at batch 1: one sample at a time, then stitch the results together.
        parts = []
        for i in range(n):
            one = {t.name: (a if t.batch_axis is None else _take(a, i, t.batch_axis))
                   for t, a in zip(self.inputs, arrays.values(), strict=True)}
            parts.append(self._run_batch(one, 1, thr, policy))
        return _concat(parts, self._out_axes)

    def _run_batch(self, feeds: dict[str, np.ndarray], n: int, thr: list[tuple[float, str | None]],
                   policy: str) -> RunResult:
        be = self.backend
        k_all = self.n_exits
        env = {name: be.from_host(a) for name, a in feeds.items()}
        exit_index = np.full(n, k_all - 1, dtype=np.int64)
        counts = np.zeros(k_all, dtype=np.int64)
        nonfinite = np.zeros(k_all, dtype=np.int64)
        timings = np.zeros(k_all, dtype=np.float64)
        results: dict[str, np.ndarray] = {}  # batch on axis 0 here; moved back at the end
        if policy == "never":
            return self._run_never(env, n, thr, exit_index, counts, nonfinite, timings)
        compact = policy == "compact"
        active = np.arange(n)  # compact: original row of each row still running
        done = np.zeros(n, dtype=bool)  # wait-all: rows that already exited
        for step in self._steps:
            t0 = time.perf_counter()
            k = step.index
            outs = be.run_segment(k, {name: env[name] for name in step.inputs},
                                  thr[k][0] if step.gate is not None else None)
            m = len(active) if compact else n
            fire = self._fire(outs, step, thr, m)
            if not compact:
                fire &= ~done
            rows = np.flatnonzero(fire) if fire.any() else _NO_ROWS
            taken, nonfinite[k] = self._exit_rows(outs, step, rows, slice(None) if compact else ~done)
            if rows.size:
                dest = active[rows] if compact else rows
                for name, arr in taken.items():
                    if name not in results:
                        results[name] = np.empty((n, *arr.shape[1:]), dtype=arr.dtype)
                    results[name][dest] = arr
                exit_index[dest] = k
                counts[k] = rows.size
            if compact:
                finished = rows.size == m
            else:
                done |= fire
                finished = bool(done.all())
            if finished:
                timings[k] = time.perf_counter() - t0
                break
            env = {name: (outs[name] if from_out else env[name]) for name, from_out, _ in step.keep}
            if compact and rows.size:
                # Drop the rows that exited from everything later segments read (no gather when none did).
                keep = np.flatnonzero(~fire)
                active = active[keep]
                for name, _, axis in step.keep:
                    if axis is not None:
                        env[name] = be.gather(env[name], keep, axis)
            timings[k] = time.perf_counter() - t0
        outputs = {name: _batch_back(results[name], self._out_axes[name]) for name in self.output_names}
        return RunResult(outputs, exit_index, counts, timings, nonfinite)

    def _run_never(self, env: dict[str, Any], n: int, thr: list[tuple[float, str | None]],
                   exit_index: np.ndarray, counts: np.ndarray, nonfinite: np.ndarray,
                   timings: np.ndarray) -> RunResult:
        """Run every segment on every sample and record every exit (calibration needs them)."""
        be = self.backend
        masks = np.zeros((self.n_exits - 1, n), dtype=bool)
        scores = np.full((self.n_exits - 1, n), np.nan, dtype=np.float32)
        decided = np.zeros(n, dtype=bool)
        all_host: list[dict[str, np.ndarray]] = []
        for step in self._steps:
            t0 = time.perf_counter()
            k = step.index
            outs = be.run_segment(k, {name: env[name] for name in step.inputs},
                                  thr[k][0] if step.gate is not None else None)
            if step.gate is not None:
                masks[k] = self._gate_mask(outs, step, n)
                if step.score is not None:
                    scores[k] = be.to_host(outs[step.score]).reshape(-1)
            fire = self._fire(outs, step, thr, n, raw=masks[k] if step.gate is not None else None)
            host = {name: _batch_first(be.to_host(outs[t]), self._out_axes[name]) for name, t in step.exits}
            all_host.append(host)
            nonfinite[k] = _count_nonfinite(host, slice(None))
            first = fire & ~decided
            exit_index[first] = k
            decided |= fire
            env = {name: (outs[name] if from_out else env[name]) for name, from_out, _ in step.keep}
            timings[k] = time.perf_counter() - t0
        counts[:] = np.bincount(exit_index, minlength=self.n_exits)
        outputs = {}
        for name in self.output_names:
            res = all_host[-1][name].copy()
            for k in range(self.n_exits - 1):
                rows = exit_index == k
                res[rows] = all_host[k][name][rows]
            outputs[name] = _batch_back(res, self._out_axes[name])
        all_exits = [{name: _batch_back(a, self._out_axes[name]) for name, a in h.items()} for h in all_host]
        return RunResult(outputs, exit_index, counts, timings, nonfinite, all_exits=all_exits, gate_masks=masks,
                         gate_scores=scores)

    def _exit_rows(self, outs: dict[str, Any], step: _Step, rows: np.ndarray,
                   reached: slice | np.ndarray) -> tuple[dict[str, np.ndarray], int]:
        """The exit outputs of the exiting ``rows`` on the host (batch first), and the non-finite count.

        Only exiting rows need to reach the host. Host-resident outputs (numpy: ORT CPU) cost nothing to read,
        so every row that ``reached`` the exit is checked for NaN/Inf (one reduction when all is finite, which
        is the common case); device outputs are gathered on the device first, so only the exiting rows cross
        (and only they are checked)."""
        be = self.backend
        taken: dict[str, np.ndarray] = {}
        on_host: dict[str, np.ndarray] = {}
        for name, t in step.exits:
            x = outs[t]
            axis = self._out_axes[name]
            if isinstance(x, np.ndarray):
                a = _batch_first(x, axis)
                on_host[name] = a
                if rows.size:
                    taken[name] = a[rows]
            elif rows.size:
                taken[name] = _batch_first(be.to_host(be.gather(x, rows, axis)), axis)
        if len(on_host) == len(step.exits):
            return taken, _count_nonfinite(on_host, reached)
        return taken, _count_nonfinite(taken, slice(None))

    def _gate_mask(self, outs: dict[str, Any], step: _Step, m: int) -> np.ndarray:
        assert step.gate is not None
        mask = self.backend.to_host(outs[step.gate])
        if mask.shape != (m,):
            raise BackendError(f"segment {step.index}: gate '{step.gate}' has shape {list(mask.shape)}, "
                               f"expected [{m}] (one bool per sample); recompile the bundle")
        return mask.astype(bool, copy=False)

    def _fire(self, outs: dict[str, Any], step: _Step, thr: list[tuple[float, str | None]], m: int,
              raw: np.ndarray | None = None) -> np.ndarray:
        """Which of the ``m`` rows exit here (a fresh array the caller may modify)."""
        if step.gate is None:
            return np.ones(m, dtype=bool)
        override = thr[step.index][1]
        if override == "never":
            return np.zeros(m, dtype=bool)
        if override == "always":
            return np.ones(m, dtype=bool)
        mask = self._gate_mask(outs, step, m) if raw is None else raw
        return mask.copy()

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> EarlyExitRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------ helpers


def _take(a: np.ndarray, i: int, axis: int) -> np.ndarray:
    index: list[Any] = [slice(None)] * a.ndim
    index[axis] = slice(i, i + 1)
    return a[tuple(index)]


def _batch_first(a: np.ndarray, axis: int) -> np.ndarray:
    return a if axis == 0 else np.moveaxis(a, axis, 0)


def _batch_back(a: np.ndarray, axis: int) -> np.ndarray:
    return a if axis == 0 else np.ascontiguousarray(np.moveaxis(a, 0, axis))


def _count_nonfinite(host: dict[str, np.ndarray], rows: slice | np.ndarray) -> int:
    """Samples (among ``rows``) with a NaN/Inf in any float exit output (batch on axis 0)."""
    bad: np.ndarray | None = None
    for a in host.values():
        if a.dtype.kind != "f" or a.size == 0 or math.isfinite(a.sum()):
            continue  # a finite sum means every value is finite (NaN/Inf propagate; overflow lands below)
        sel = a[rows]
        b = ~np.isfinite(sel).reshape(sel.shape[0], -1).all(axis=1)
        bad = b if bad is None else bad | b
    return 0 if bad is None else int(bad.sum())


def _concat(parts: list[RunResult], out_axes: dict[str, int]) -> RunResult:
    """Stitch per-sample results back into one batch."""
    first = parts[0]
    outputs = {name: np.concatenate([p.outputs[name] for p in parts], axis=out_axes[name])
               for name in first.outputs}
    all_exits = None
    if first.all_exits is not None:
        all_exits = [{name: np.concatenate([p.all_exits[k][name] for p in parts if p.all_exits], axis=out_axes[name])
                      for name in first.all_exits[k]} for k in range(len(first.all_exits))]
    gate_masks = None
    if first.gate_masks is not None:
        gate_masks = np.concatenate([p.gate_masks for p in parts if p.gate_masks is not None], axis=1)
    gate_scores = None
    if first.gate_scores is not None:
        gate_scores = np.concatenate([p.gate_scores for p in parts if p.gate_scores is not None], axis=1)
    return RunResult(
        outputs=outputs,
        exit_index=np.concatenate([p.exit_index for p in parts]),
        exit_counts=np.sum([p.exit_counts for p in parts], axis=0),
        timings=np.sum([p.timings for p in parts], axis=0),
        nonfinite_counts=np.sum([p.nonfinite_counts for p in parts], axis=0),
        all_exits=all_exits, gate_masks=gate_masks, gate_scores=gate_scores,
    )


# ------------------------------------------------------------------------------------------------ files


def run_file(bundle: str | Path, data: str | Path, output: str | Path, policy: str = "compact",
             thresholds: str | None = None, batch_size: int = 32, backend: str = "onnxruntime",
             threads: int | None = None, **backend_options: Any) -> str:
    """Run a bundle on an .npz and write OUT.npz (each final output + ``exit_index``; with policy
    ``never`` also ``exit{k}.{name}`` for every exit and ``gate_masks``). Returns a one-line summary."""
    from eecompile.runtimes.data import load_npz
    from eecompile.spec import parse_thresholds

    options: dict[str, Any] = dict(backend_options) if threads is None else {**backend_options, "threads": threads}
    runner = EarlyExitRunner(bundle, backend=backend, **options)
    thr = None if thresholds is None else parse_thresholds(thresholds, runner.manifest.n_early_exits)
    dataset = load_npz(data, runner.inputs)
    if batch_size < 1:
        raise DataError(f"--batch must be >= 1, got {batch_size}")
    output = Path(output)
    if not output.parent.is_dir():
        raise DataError(f"{output.parent}: directory does not exist; create it or choose another -o path")
    if output.is_dir():
        raise DataError(f"{output}: is a directory; give a file name for the output .npz")
    if not os.access(output.parent, os.W_OK):  # say so before running every batch, not after
        raise DataError(f"{output}: cannot write there ({output.parent} is not writable); choose another -o path")

    results = []
    n_batches = -(-len(dataset) // batch_size)
    batches = dataset.batches(batch_size)
    with _progress(n_batches) as advance:
        for feeds in batches:
            results.append(runner.run(feeds, thresholds=thr, policy=policy))
            advance()
    runner.close()
    merged = _concat(results, runner._out_axes) if len(results) > 1 else results[0]

    arrays: dict[str, np.ndarray] = {**merged.outputs, "exit_index": merged.exit_index}
    if merged.all_exits is not None and merged.gate_masks is not None:
        for k, exits in enumerate(merged.all_exits):
            arrays.update({f"exit{k}.{name}": a for name, a in exits.items()})
        arrays["gate_masks"] = merged.gate_masks
    _save_npz_atomic(output, arrays)

    n = merged.n_samples
    shares = ", ".join(
        f"{'final' if k == runner.n_exits - 1 else f'exit {k}'} {100.0 * c / n:.1f}%"
        for k, c in enumerate(merged.exit_counts)
    )
    return f"{n} samples -> {output}: {shares}"


class _progress:
    """A rich progress bar on stderr when there are many batches and a terminal to draw on."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._bar: Any = None

    def __enter__(self) -> Any:
        from rich.console import Console

        console = Console(stderr=True)
        if self.total < 8 or not console.is_terminal:
            return lambda: None
        from rich.progress import Progress

        self._bar = Progress(console=console, transient=True)
        self._bar.start()
        task = self._bar.add_task("running", total=self.total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def _save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write to a temporary file beside ``path``, then rename it into place (no half-written output)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise DataError(f"{path}: cannot write the output ({e.strerror or e}); choose another -o path") from e
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise DataError(f"{path}: cannot write the output ({e.strerror or e}); choose another -o path") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
