"""The early-exit runner: the one loop over a bundle's segments, for every backend and every caller.

    runner = EarlyExitRunner("model.eebundle")              # sessions/engines created once, here
    result = runner.run({"input": x}, thresholds=[0.9, "never"], policy="compact")
    result.outputs["logits"], result.exit_index, result.exit_counts

The runner, calibration's data collection (policy ``never``, with ``extra_outputs``), the compiler's verify pass,
the backend parity check and the benchmarks all run segments through :meth:`EarlyExitRunner.run`; backends
(:mod:`~eecompile.runtimes.onnxruntime`, :mod:`~eecompile.runtimes.tensorrt`) only run one segment and move
tensors (:class:`~eecompile.runtimes.base.SegmentBackend`). Policies, thresholds and feed checks come from
:mod:`~eecompile.runtimes.base`.

Everything that follows from the manifest (which tensors each segment reads, what to keep in the environment after
each segment and along which axis to gather it) is planned once in ``__init__``; the per-segment loop only runs,
reads the gate mask, scatters exited rows into the result and gathers the rest. Batches larger than the backend's
``max_batch`` (TensorRT engines) run in chunks; ``batch_mode: per_sample`` bundles run one sample at a time.

Thread-safe on backends whose ``run_segment`` is (ONNX Runtime): a call keeps all its state in locals.
Imports numpy, the bundle module and the runtime's own modules only (no onnx, no torch): this runs on a Jetson.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eecompile.bundle import Bundle, TensorInfo
from eecompile.errors import BackendError, BundleError, SpecError
from eecompile.runtimes.base import (
    BACKENDS,
    POLICIES,
    GateSetting,
    ResolvedThresholds,
    SegmentBackend,
    Threshold,
    check_classifier_bundle,
    check_feeds,
    check_policy,
    resolve_thresholds,
)

__all__ = ["POLICIES", "EarlyExitRunner", "OnExit", "RunResult", "Threshold", "concat_results", "make_backend"]

_NO_ROWS = np.zeros(0, dtype=np.int64)  # read-only: the rows that exit when none does
_NO_ROWS.flags.writeable = False
_THRESHOLD_CACHE_SIZE = 64  # distinct thresholds arguments a runner remembers parsed (EarlyExitRunner.resolve)
_ARANGES: dict[int, np.ndarray] = {}
_sum = np.add.reduce  # the ufunc itself: ndarray.sum() adds a Python layer, measurable on [1, C] exit outputs
OnExit = Callable[[int, np.ndarray, dict[str, np.ndarray]], None]
ExtraOutputs = Mapping[int, Sequence[str]]


@dataclass
class RunResult:
    """The outcome of one :meth:`EarlyExitRunner.run` call (B samples, K segments = K exits, K-1 gates).

    Arrays of final outputs have the batch on the axis the model's output has it (``TensorInfo.batch_axis``)."""

    outputs: dict[str, np.ndarray]
    """Final output name -> one row per sample (in input order), from the exit that sample took."""
    exit_index: np.ndarray
    """int64 [B]: the exit each sample took, 0-based; the final exit is K - 1."""
    exit_counts: np.ndarray
    """int64 [K]: samples that left at each exit."""
    timings: np.ndarray
    """float64 [K], seconds: host wall time of each segment's step (run, gate read-back, scatter, gather); 0 for
    segments not reached. On an asynchronous backend (TensorRT) a step includes waiting for its gate mask, and the
    last step includes the final synchronisation. Summed over chunks."""
    nonfinite_counts: np.ndarray
    """int64 [K]: samples with a NaN/Inf in an exit output (host backends: every sample that reached the exit;
    device backends: the samples that left there)."""
    all_exits: list[dict[str, np.ndarray]] | None = None
    """Policy ``never``: every exit's outputs for every sample (list of K dicts like ``outputs``)."""
    gate_masks: np.ndarray | None = None
    """Policy ``never``: bool [K-1, B], each gate's own decision (before overrides)."""
    gate_scores: np.ndarray | None = None
    """Policy ``never``: float32 [K-1, B], the value each gate compared with its threshold (NaN without one)."""
    extra: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    """Policy ``never`` with ``extra_outputs``: segment -> tensor name -> array, every sample in input order,
    batch on axis 0 as the graph has it."""
    batch_sizes: list[list[int]] = field(default_factory=list)
    """Rows each segment ran, one list per chunk (compaction makes them shrink)."""
    present: dict[str, np.ndarray] = field(default_factory=dict)
    """End-only final outputs (``manifest.end_only``): name -> bool [B], True for the samples that reached the
    final exit and so have a row; the other rows of ``outputs[name]`` are NaN (0 for non-float outputs)."""
    path: str = "chain"
    """``"chain"``: the segments ran one after another; ``"no-exit"``: no gate could fire, so the backend's no-exit
    graph ran instead (the chain without heads and gates, one session; see :meth:`EarlyExitRunner.run`)."""

    @property
    def n_samples(self) -> int:
        """B, the number of samples of the call."""
        return int(self.exit_index.shape[0])


@dataclass(frozen=True)
class _Step:
    """What the loop needs for one segment, computed once from the manifest."""

    index: int
    inputs: tuple[str, ...]
    gate: str | None  # gate output name; None for the final segment
    score: str | None  # gate score output name (the value compared with the threshold), if any
    exits: tuple[tuple[str, str, int, str], ...]  # (final output name, this segment's tensor, batch axis, dtype)
    keep: tuple[tuple[str, bool, int | None], ...]  # env after this step: (name, from outputs?, batch axis)


def make_backend(bundle: Bundle, backend: str | SegmentBackend, options: dict[str, Any]) -> SegmentBackend:
    """The one backend factory: ``"onnxruntime"``, ``"tensorrt"`` (imported lazily), or a ready backend object.

    Raises :class:`BackendError` for an unknown name, a backend library that cannot be imported (saying what to
    install), or options given with a ready backend."""
    if isinstance(backend, SegmentBackend):
        if options:
            raise BackendError(f"backend options {sorted(options)} given with a ready backend object; pass them "
                               f"when creating the backend")
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
        if options.get("expose"):
            raise BackendError("expose= (extra outputs) needs the onnxruntime backend: TensorRT engines only have "
                               "the outputs they were built with")
        options.pop("expose", None)
        return TensorRTBackend(bundle, **options)
    raise BackendError(f"unknown backend '{backend}'; use {' or '.join(BACKENDS)}")


class EarlyExitRunner:
    """Runs an early-exit bundle. Create once (loads every segment), then call :meth:`run` many times.

    ``bundle_or_path``: a :class:`~eecompile.bundle.Bundle` or the path of a ``.eebundle`` directory (loaded and
    every file's sha256 checked). ``backend``: ``"onnxruntime"`` (default), ``"tensorrt"``, or a ready
    :class:`SegmentBackend`. ``expose``: ``{segment index: [tensor names]}`` of intermediate tensors to return from
    ``run(..., policy="never")`` (ONNX Runtime only; see ``extra_outputs``). ``no_exit_path``: when no gate can
    fire in a call and the backend has a no-exit graph (ONNX Runtime CPU engines built on this machine), run that
    instead of the segments (default True; the outputs are the final exit's either way). Other keyword arguments
    are the backend's options (ONNX Runtime: ``threads``, ``thread_pool``, ``device``, ``engines``, ...).

    Raises :class:`BundleError` for a malformed manifest (segments that do not chain, a missing gate) and
    :class:`BackendError` when the backend cannot be created. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, bundle_or_path: Bundle | str | Path, backend: str | SegmentBackend = "onnxruntime", *,
                 expose: ExtraOutputs | None = None, no_exit_path: bool = True, **options: Any) -> None:
        self.bundle = bundle_or_path if isinstance(bundle_or_path, Bundle) else Bundle.load(bundle_or_path)
        m = self.manifest = self.bundle.manifest
        check_classifier_bundle(self.bundle, "the segment runner (run, bench, calibrate, /v1/predict)")
        if not m.segments:
            raise BundleError(f"{self.bundle.path}: the manifest lists no segments; recompile the bundle")
        if m.batch_mode not in ("dynamic", "per_sample"):
            raise BundleError(f"{self.bundle.path}: unknown batch_mode '{m.batch_mode}'; upgrade eecompile")
        self.inputs: list[TensorInfo] = list(m.inputs)
        if not any(t.batch_axis is not None for t in m.inputs):
            raise BundleError(f"{self.bundle.path}: no model input has a batch axis; recompile the bundle")
        self.output_names = [t.name for t in m.outputs]
        self._out_axes = {t.name: (t.batch_axis or 0) for t in m.outputs}
        self.end_only = [n for n in self.output_names if n in set(m.end_only)]  # only the final exit gives them
        self.n_exits = len(m.segments)
        self.per_sample = m.batch_mode == "per_sample"
        self._steps = self._plan()
        self._default_thresholds: ResolvedThresholds | None = None
        self._thr_cache: dict[Any, ResolvedThresholds] = {}  # hashable thresholds argument -> its resolution
        self._feed_cache: dict[tuple[Any, ...], int] = {}  # feed signatures already checked (check_feeds)
        self.no_exit_path = bool(no_exit_path)
        self._closed = False
        self._expose_lock = threading.Lock()
        if expose:
            self._check_extra(expose)
            options["expose"] = {int(k): list(v) for k, v in expose.items()}
        self.backend = make_backend(self.bundle, backend, options)

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
            want = set(self.output_names) - (set() if is_last else set(self.end_only))
            if set(seg.exit.outputs) != want:
                raise BundleError(f"{where}: exit {k} produces {sorted(seg.exit.outputs)}, the model's outputs "
                                  f"are {self.output_names}"
                                  + (f" ({self.end_only} from the final exit only)" if self.end_only else "")
                                  + "; recompile the bundle")
            carried = set(seg.carried_out) | set(gate.state_outputs if gate else ())
            keep = []
            for name in sorted(reads_after[k]):
                if name in carried and name in produced:
                    keep.append((name, True, produced[name].batch_axis))
                    axis_of[name] = produced[name].batch_axis
                elif name in available:
                    keep.append((name, False, axis_of[name]))
            available = {n for n, _, _ in keep} | set(produced)
            # Each exit tensor's batch lies on its own axis (a time-major exit may differ from the final output).
            exits = []
            for n in self.output_names:
                if n in seg.exit.outputs:
                    t = produced[seg.exit.outputs[n]]
                    exits.append((n, t.name, self._out_axes[n] if t.batch_axis is None else t.batch_axis, t.dtype))
            steps.append(_Step(index=k, inputs=tuple(t.name for t in seg.inputs),
                               gate=gate.output if gate else None,
                               score=gate.score_output if gate else None,
                               exits=tuple(exits), keep=tuple(keep)))
        return tuple(steps)

    # --- argument checks ------------------------------------------------------------------------------
    def resolve(self, thresholds: None | Threshold | Sequence[Threshold | None] | ResolvedThresholds = None
                ) -> ResolvedThresholds:
        """Check ``thresholds`` once (see :func:`~eecompile.runtimes.base.resolve_thresholds`); pass the result
        to :meth:`run` to skip the parsing on every call. Raises :class:`~eecompile.errors.ThresholdError`."""
        if thresholds is None:
            if self._default_thresholds is None:
                self._default_thresholds = resolve_thresholds(self.manifest.exits, None)
            return self._default_thresholds
        if isinstance(thresholds, ResolvedThresholds):
            return thresholds
        # The same thresholds are usually passed on every call: parse each distinct value once. The key keeps the
        # types (True == 1 == 1.0 as dict keys, but only the numbers are thresholds); NaN never hits (it raises).
        try:
            key: Any = (tuple((type(t), t) for t in thresholds) if isinstance(thresholds, (list, tuple))
                        else (type(thresholds), thresholds))
            hit = self._thr_cache.get(key)
        except TypeError:  # unhashable entries: parse every time
            return resolve_thresholds(self.manifest.exits, thresholds)
        if hit is None:
            hit = resolve_thresholds(self.manifest.exits, thresholds)
            if len(self._thr_cache) >= _THRESHOLD_CACHE_SIZE:
                self._thr_cache.clear()
            self._thr_cache[key] = hit
        return hit

    def _check_extra(self, extra: ExtraOutputs) -> dict[int, tuple[str, ...]]:
        if not isinstance(extra, Mapping):
            raise SpecError("extra_outputs must be a dict {segment index: [tensor names]}")
        out: dict[int, tuple[str, ...]] = {}
        for k, names in extra.items():
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= int(k) < self.n_exits:
                raise SpecError(f"extra_outputs: segment {k!r} is not a segment index 0..{self.n_exits - 1}")
            if isinstance(names, str) or not all(isinstance(n, str) for n in names):
                raise SpecError(f"extra_outputs[{k}]: give a list of tensor names, not {names!r}")
            out[int(k)] = tuple(dict.fromkeys(names))
        return out

    # --- running --------------------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, np.ndarray],
            thresholds: None | Threshold | Sequence[Threshold | None] | ResolvedThresholds = None,
            policy: str = "compact", extra_outputs: ExtraOutputs | None = None,
            on_exit: OnExit | None = None, no_exit_path: bool | None = None) -> RunResult:
        """Run one batch through the chain.

        ``feeds``: model input name -> array with the dtype and rank of ``self.inputs`` (batch on each input's
        ``batch_axis``; every batched input the same, non-zero number of samples B). ``thresholds``: None (the
        bundle's), one number or ``"never"``/``"always"`` for all early exits, one entry per early exit, or
        :meth:`resolve`'s result; see :func:`~eecompile.runtimes.base.resolve_thresholds`. ``policy``: ``compact``
        (exited rows are dropped from later segments), ``wait-all`` (the batch never shrinks) or ``never`` (every
        segment runs on every row; every exit's outputs are returned). ``extra_outputs``: policy ``never`` only,
        ``{segment index: [tensor names]}`` of intermediate tensors to return in :attr:`RunResult.extra` (ONNX
        Runtime: the segment's session is re-made once with them as outputs). ``on_exit(k, rows, outputs)``:
        policies ``compact``/``wait-all``, called as soon as rows leave at exit k, with their original indices
        (int64) and their final outputs (host arrays, batch first, those rows only). ``no_exit_path``: override
        the runner's setting for this call (None: the runner's). When no gate can fire (every threshold "never", or
        one no score of its kind reaches, see :attr:`ResolvedThresholds.none_fires`), policy is not ``never``, and
        the backend has a no-exit graph, that graph runs instead of the segments: heads and gates are not
        computed, every sample leaves at the final exit with the outputs the segments would give
        (``RunResult.path`` says which ran).

        Returns a :class:`RunResult`. Raises :class:`~eecompile.errors.DataError` (feeds),
        :class:`~eecompile.errors.ThresholdError` (thresholds), :class:`SpecError` (policy, extra_outputs),
        :class:`BackendError` (the backend failed, or this runner was closed)."""
        if self._closed:
            raise BackendError(f"this runner for {self.bundle.path} was closed; load the bundle again "
                               f"(eecompile.load) to run it")
        if policy not in POLICIES:
            check_policy(policy)
        thr = self.resolve(thresholds)
        arrays, n = check_feeds(self.inputs, feeds, cache=self._feed_cache)
        extra: dict[int, tuple[str, ...]] = {}
        if extra_outputs:
            if policy != "never":
                raise SpecError(f"extra_outputs needs policy 'never' (every segment runs on every row), not "
                                f"'{policy}'")
            extra = self._check_extra(extra_outputs)
            with self._expose_lock:
                self._expose(extra)
        if on_exit is not None and policy == "never":
            raise SpecError("on_exit reports rows as they leave; policy 'never' runs every row to the end")
        whole = (policy != "never" and (self.no_exit_path if no_exit_path is None else no_exit_path)
                 and self.backend.has_no_exit and thr.none_fires)
        chunk = 1 if self.per_sample else self.backend.max_batch
        if chunk is None or n <= chunk:
            if whole:
                return self._run_no_exit(arrays, n, on_exit, 0)
            return self._run_batch(arrays, n, thr, policy, extra, on_exit, 0)
        parts = []
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            part = {t.name: (a if t.batch_axis is None else _rows(a, lo, hi, t.batch_axis))
                    for t, a in zip(self.inputs, arrays.values(), strict=True)}
            parts.append(self._run_no_exit(part, hi - lo, on_exit, lo) if whole
                         else self._run_batch(part, hi - lo, thr, policy, extra, on_exit, lo))
        return concat_results(parts, self._out_axes)

    def _expose(self, extra: Mapping[int, Sequence[str]]) -> None:
        expose = getattr(self.backend, "expose", None)
        if expose is None:
            raise BackendError(f"the {self.backend.name} backend cannot return intermediate tensors "
                               f"(extra_outputs); use the onnxruntime backend")
        expose(extra)

    def _run_batch(self, feeds: dict[str, np.ndarray], n: int, thr: ResolvedThresholds, policy: str,
                   extra: dict[int, tuple[str, ...]], on_exit: OnExit | None, offset: int) -> RunResult:
        be = self.backend
        k_all = self.n_exits
        env = be.upload(feeds)
        exit_index = np.full(n, k_all - 1, dtype=np.int64)
        counts = np.zeros(k_all, dtype=np.int64)
        nonfinite = np.zeros(k_all, dtype=np.int64)
        timings = np.zeros(k_all, dtype=np.float64)
        if policy == "never":
            return self._run_never(env, n, thr, extra, exit_index, counts, nonfinite, timings)
        results: dict[str, np.ndarray] = {}  # batch on axis 0 here; moved back at the end
        deferred: list[int] = []  # exits whose outputs stayed on the device: NaN/Inf counted on the results
        sizes: list[int] = []
        compact = policy == "compact"
        settings = thr.settings
        active: np.ndarray | None = None  # compact: original row of each row still running (None: all, in order)
        done: np.ndarray | None = None  # wait-all: rows that already exited (None: none yet)
        m = n  # rows running now
        last = 0
        clock = time.perf_counter
        for step in self._steps:
            t0 = clock()
            k = last = step.index
            gated = step.gate is not None
            setting = settings[k] if gated else None
            outs = be.run_segment(k, {name: env[name] for name in step.inputs},
                                  setting.value if setting is not None else None)
            sizes.append(m)
            if setting is None:  # the final exit: every row still running leaves here
                fire = None
                rows = _arange(m) if done is None else (~done).nonzero()[0]
            else:
                if setting.override is None:
                    fire = self._gate_mask(outs, step, m)
                    if done is not None:
                        fire = fire & ~done
                    # count_nonzero and .nonzero() are C calls; .any() and flatnonzero go through Python layers
                    rows = fire.nonzero()[0] if np.count_nonzero(fire) else _NO_ROWS
                elif setting.override == "never":
                    fire, rows = None, _NO_ROWS
                else:  # "always"
                    fire = None
                    rows = _arange(m) if done is None else (~done).nonzero()[0]
            host = self._host_exits(outs, step)
            if host is None:
                deferred.append(k)
            else:
                nonfinite[k] = _count_nonfinite(host, slice(None) if done is None else ~done)
            nr = rows.size
            if nr:
                dest = rows if active is None else active[rows]
                if nr == n and host is not None and not results:
                    results.update(host)  # every row leaves here, in order: the outputs are the result
                else:
                    self._scatter(outs, step, rows, dest, n, results)
                exit_index[dest] = k
                counts[k] = nr
                if on_exit is not None:
                    be.synchronize()
                    on_exit(k, dest + offset, {name: (results[name] if nr == n else results[name][dest])
                                               for name, _, _, _ in step.exits})
            if compact:
                finished = nr == m
            else:
                if nr:
                    if done is None:
                        done = np.zeros(n, dtype=bool)
                    done[rows] = True
                finished = bool(done is not None and done.all())
            if finished:
                timings[k] = clock() - t0
                break
            env = {name: (outs[name] if from_out else env[name]) for name, from_out, _ in step.keep}
            if compact and nr:
                # Drop the rows that exited from everything later segments read (no gather when none did).
                stay = np.ones(m, dtype=bool)
                stay[rows] = False
                keep = stay.nonzero()[0]
                active = keep if active is None else active[keep]
                m = keep.size
                for name, _, axis in step.keep:
                    if axis is not None:
                        env[name] = be.gather(env[name], keep, axis)
            timings[k] = clock() - t0
        t0 = clock()
        be.synchronize()  # device backends copy the exited rows asynchronously
        copy = be.reuses_result_buffers
        batch_first = {name: (a.copy() if copy else a) for name, a in results.items()}
        present = self._absent_rows(batch_first, exit_index == k_all - 1, n) if self.end_only else {}
        if deferred:
            bad = _nonfinite_rows({k_: a for k_, a in batch_first.items() if k_ not in present}, n)
            for name in present:  # end-only outputs: their present rows only
                a = batch_first[name]
                if a.dtype.kind == "f" and a.size and not math.isfinite(float(a[present[name]].sum())):
                    rows = ~np.isfinite(a.reshape(n, -1)).all(axis=1) & present[name]
                    bad = rows if bad is None else bad | rows
            if bad is not None:
                per_exit = np.bincount(exit_index[bad], minlength=k_all)
                nonfinite[deferred] = per_exit[deferred]
        timings[last] += clock() - t0
        outputs = {name: _batch_back(batch_first[name], self._out_axes[name]) for name in self.output_names}
        return RunResult(outputs, exit_index, counts, timings, nonfinite, batch_sizes=[sizes], present=present)

    def _absent_rows(self, results: dict[str, np.ndarray], reached: np.ndarray, n: int) -> dict[str, np.ndarray]:
        """End-only outputs: the rows of samples that left early filled with NaN (0 for non-float dtypes; an
        array from the manifest's shape, symbolic axes 0 long, when no sample reached the end); the masks."""
        present: dict[str, np.ndarray] = {}
        for name in self.end_only:
            a = results.get(name)
            if a is None:
                t = next(t for t in self.manifest.outputs if t.name == name)
                per = [d if isinstance(d, int) else 0 for i, d in enumerate(t.shape) if i != self._out_axes[name]]
                a = results[name] = np.empty((n, *per), np.dtype(t.dtype))
            a[~reached] = np.nan if a.dtype.kind in "fc" else 0
            present[name] = reached.copy()
        return present

    def _run_no_exit(self, feeds: dict[str, np.ndarray], n: int, on_exit: OnExit | None,
                     offset: int) -> RunResult:
        """The backend's no-exit graph (the chain without heads and gates) on every row: all leave at the end."""
        be = self.backend
        k_all = self.n_exits
        t0 = time.perf_counter()
        outs = be.run_no_exit(be.upload(feeds))
        final = self._steps[-1]
        host = {}
        for name, _, axis, _ in final.exits:
            if name not in outs:
                raise BackendError(f"the {be.name} backend's no-exit graph did not return '{name}'; rebuild its "
                                   f"engines (`eecompile build {self.bundle.path} --backend {be.name}`)")
            host[name] = _batch_first(be.to_host(outs[name]), axis)
        if be.reuses_result_buffers:
            host = {name: a.copy() for name, a in host.items()}
        exit_index = np.full(n, k_all - 1, dtype=np.int64)
        counts = np.zeros(k_all, dtype=np.int64)
        counts[-1] = n
        nonfinite = np.zeros(k_all, dtype=np.int64)
        nonfinite[-1] = _count_nonfinite(host, slice(None))
        if on_exit is not None:
            on_exit(k_all - 1, _arange(n) + offset, host)
        timings = np.zeros(k_all, dtype=np.float64)
        timings[-1] = time.perf_counter() - t0
        outputs = {name: _batch_back(host[name], self._out_axes[name]) for name in self.output_names}
        return RunResult(outputs, exit_index, counts, timings, nonfinite, batch_sizes=[[n] * k_all],
                         present={name: np.ones(n, dtype=bool) for name in self.end_only}, path="no-exit")

    def _run_never(self, env: dict[str, Any], n: int, thr: ResolvedThresholds, extra: dict[int, tuple[str, ...]],
                   exit_index: np.ndarray, counts: np.ndarray, nonfinite: np.ndarray,
                   timings: np.ndarray) -> RunResult:
        """Run every segment on every sample and record every exit (calibration needs them)."""
        be = self.backend
        masks = np.zeros((self.n_exits - 1, n), dtype=bool)
        scores = np.full((self.n_exits - 1, n), np.nan, dtype=np.float32)
        decided = np.zeros(n, dtype=bool)
        all_host: list[dict[str, np.ndarray]] = []
        extras: dict[int, dict[str, np.ndarray]] = {}
        for step in self._steps:
            t0 = time.perf_counter()
            k = step.index
            setting = thr[k] if step.gate is not None else None
            outs = be.run_segment(k, {name: env[name] for name in step.inputs},
                                  setting.value if setting is not None else None)
            raw = None
            if step.gate is not None:
                raw = masks[k] = self._gate_mask(outs, step, n)
                if step.score is not None:
                    scores[k] = be.to_host(outs[step.score]).reshape(-1)
            fire = self._fire(outs, step, setting, n, raw=raw)
            host = {name: _batch_first(be.to_host(outs[t]), axis) for name, t, axis, _ in step.exits}
            all_host.append(host)
            nonfinite[k] = _count_nonfinite(host, slice(None))
            if k in extra:
                missing = [name for name in extra[k] if name not in outs]
                if missing:
                    raise BackendError(f"segment {k}: the backend did not return {missing} (extra_outputs)")
                extras[k] = {name: be.to_host(outs[name]) for name in extra[k]}
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
                res[rows] = all_host[k][name][rows] if name in all_host[k] else (
                    np.nan if res.dtype.kind in "fc" else 0)
            outputs[name] = _batch_back(res, self._out_axes[name])
        present = {name: exit_index == self.n_exits - 1 for name in self.end_only}
        all_exits = [{name: _batch_back(a, self._out_axes[name]) for name, a in h.items()} for h in all_host]
        return RunResult(outputs, exit_index, counts, timings, nonfinite, all_exits=all_exits, gate_masks=masks,
                         gate_scores=scores, extra=extras, batch_sizes=[[n] * self.n_exits], present=present)

    def _host_exits(self, outs: dict[str, Any], step: _Step) -> dict[str, np.ndarray] | None:
        """This exit's outputs (batch first) when they are host arrays (ORT CPU: reading them costs nothing, so
        every row that reached the exit is checked for NaN/Inf), else None (checked on the exited rows later)."""
        host: dict[str, np.ndarray] = {}
        for name, t, axis, _ in step.exits:
            x = outs[t]
            if not isinstance(x, np.ndarray):
                return None
            host[name] = _batch_first(x, axis)
        return host

    def _scatter(self, outs: dict[str, Any], step: _Step, rows: np.ndarray, dest: np.ndarray, n: int,
                 results: dict[str, np.ndarray]) -> None:
        """Exit outputs of the exiting ``rows`` into ``results[name][dest]`` (host, batch first)."""
        be = self.backend
        for name, t, axis, dtype in step.exits:
            x = outs[t]
            out = results.get(name)
            if out is None:
                shape = be.shape_of(x)
                per_sample = shape[:axis] + shape[axis + 1:]
                dt = x.dtype if isinstance(x, np.ndarray) else np.dtype(dtype)
                out = results[name] = be.result_array(name, (n, *per_sample), dt)
            be.scatter_rows(x, rows, axis, out, dest)

    def _gate_mask(self, outs: dict[str, Any], step: _Step, m: int) -> np.ndarray:
        assert step.gate is not None
        mask = self.backend.read_mask(outs[step.gate])
        if mask.shape != (m,):
            raise BackendError(f"segment {step.index}: gate '{step.gate}' has shape {list(mask.shape)}, "
                               f"expected [{m}] (one bool per sample); recompile the bundle")
        return mask if mask.dtype == np.bool_ else mask.astype(bool)

    def _fire(self, outs: dict[str, Any], step: _Step, setting: GateSetting | None, m: int,
              raw: np.ndarray | None = None) -> np.ndarray:
        """Which of the ``m`` rows exit here (callers must not modify it in place)."""
        if setting is None:
            return np.ones(m, dtype=bool)
        if setting.override == "never":
            return np.zeros(m, dtype=bool)
        if setting.override == "always":
            return np.ones(m, dtype=bool)
        return self._gate_mask(outs, step, m) if raw is None else raw

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def close(self) -> None:
        """Release the backend's sessions/engines; later :meth:`run` calls raise :class:`BackendError`."""
        self._closed = True
        self.backend.close()

    def __enter__(self) -> EarlyExitRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------ helpers


def _arange(n: int) -> np.ndarray:
    """``np.arange(n)`` (int64), shared and read-only for the small batch sizes a server sees again and again."""
    a = _ARANGES.get(n)
    if a is None:
        a = np.arange(n, dtype=np.int64)
        a.flags.writeable = False
        if n <= 4096 and len(_ARANGES) < 256:
            _ARANGES[n] = a
    return a


def _rows(a: np.ndarray, lo: int, hi: int, axis: int) -> np.ndarray:
    index: list[Any] = [slice(None)] * a.ndim
    index[axis] = slice(lo, hi)
    return a[tuple(index)]


def _batch_first(a: np.ndarray, axis: int) -> np.ndarray:
    return a if axis == 0 else np.moveaxis(a, axis, 0)


def _batch_back(a: np.ndarray, axis: int) -> np.ndarray:
    return a if axis == 0 else np.ascontiguousarray(np.moveaxis(a, 0, axis))


def _count_nonfinite(host: dict[str, np.ndarray], rows: slice | np.ndarray) -> int:
    """Samples (among ``rows``) with a NaN/Inf in any float exit output (batch on axis 0)."""
    bad: np.ndarray | None = None
    for a in host.values():
        if a.dtype.kind != "f" or a.size == 0 or math.isfinite(_sum(a, None)):
            continue  # a finite sum means every value is finite (NaN/Inf propagate; overflow lands below)
        sel = a[rows]
        b = ~np.isfinite(sel).reshape(sel.shape[0], -1).all(axis=1)
        bad = b if bad is None else bad | b
    return 0 if bad is None else int(bad.sum())


def _nonfinite_rows(results: dict[str, np.ndarray], n: int) -> np.ndarray | None:
    """bool [n]: rows of the (batch-first) results with a NaN/Inf, or None when every value is finite."""
    bad: np.ndarray | None = None
    for a in results.values():
        if a.dtype.kind != "f" or a.size == 0 or math.isfinite(a.sum()):
            continue
        b = ~np.isfinite(a).reshape(n, -1).all(axis=1)
        bad = b if bad is None else bad | b
    return bad


def concat_results(parts: Sequence[RunResult], out_axes: Mapping[str, int]) -> RunResult:
    """Stitch the results of consecutive chunks of one batch back into one :class:`RunResult` (input order).

    ``out_axes``: final output name -> its batch axis. Extra outputs are joined on axis 0."""
    first = parts[0]
    if len(parts) == 1:
        return first
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
    extra = {k: {name: np.concatenate([p.extra[k][name] for p in parts], axis=0) for name in names}
             for k, names in first.extra.items()}
    return RunResult(
        outputs=outputs,
        exit_index=np.concatenate([p.exit_index for p in parts]),
        exit_counts=np.sum([p.exit_counts for p in parts], axis=0),
        timings=np.sum([p.timings for p in parts], axis=0),
        nonfinite_counts=np.sum([p.nonfinite_counts for p in parts], axis=0),
        all_exits=all_exits, gate_masks=gate_masks, gate_scores=gate_scores, extra=extra,
        batch_sizes=[s for p in parts for s in p.batch_sizes],
        present={name: np.concatenate([p.present[name] for p in parts]) for name in first.present},
        path=first.path if all(p.path == first.path for p in parts) else "chain",
    )
