"""The loop driver: a loop bundle's chain run N times on its own state, each sample stopping on its own.

    runner = LoopRunner("sampler.eebundle")                 # chain sessions and the step graph loaded once
    res = runner.run({"x": noise}, steps=20)                 # N chosen at run time (default: the manifest's)
    res.outputs["x_next"], res.steps, res.step_counts, res.exit_counts

One step is the bundle's segment chain (:class:`~eecompile.runtimes.chain.EarlyExitRunner`, with its layer exits
and compaction), then the step graph (``manifest.loop.file``: the user's update and the loop gate). After each
step the loop gate says, per sample, that its loop ends: that sample's result is the step's ``commit`` output
when the loop has one, else its fed-back outputs, and with policy ``compact`` it leaves the batch (every tensor
of the next step is gathered to the rows still running, exactly as between segments). A sample that never
stops ends after step N. Fed-back outputs become the next step's inputs; per-step inputs are filled from their
source (``step``: i, ``steps``: N, ``linspace``: ``start + (end - start) * (i + offset) / N``, ``table``: a
schedule stored in the manifest, read at the same position). The weights are
those of the one chain whatever N.

Policies: ``compact`` (stopped samples leave; the chain inside compacts too), ``wait-all`` (the batch stays whole
until every sample has stopped; results are taken at each sample's own stop; the chain runs wait-all), ``never``
(every sample runs N steps; the loop gate is recorded per step in ``gate_scores``/``gate_masks`` and every step's
results in ``all_steps``, as calibration needs them; results as ``compact`` would give them). The step graph runs on
ONNX Runtime (CPU); the chain on the runner's backend.

The loop gate's threshold is one number, or a *staged* threshold: S numbers, step i of N comparing with stage
:func:`stage_of` ``(i, N, S)`` (the steps split evenly into S stages: Prophet's stricter threshold early in
decoding and looser one late, Li et al. 2025), fed per step as the step graph's threshold input.
Imports numpy, the bundle module and the runtime's own modules only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from eecompile.bundle import Bundle, TensorInfo
from eecompile.errors import BackendError, BundleError, DataError
from eecompile.runtimes.base import (
    ResolvedThresholds,
    Threshold,
    check_feeds,
    check_policy,
    check_threshold,
    resolve_thresholds,
)
from eecompile.runtimes.chain import EarlyExitRunner, SegmentBackend

__all__ = ["LoopResult", "LoopRunner", "parse_loop_threshold", "parse_stages", "run_loop_npz", "stage_of",
           "step_value"]

LoopThreshold = Threshold | Sequence[float]
"""A loop gate setting: a number, ``"never"``, ``"always"``, or a staged threshold (one number per stage)."""


@dataclass
class LoopResult:
    """The outcome of one :meth:`LoopRunner.run` call (B samples, N steps, K exits in the chain)."""

    outputs: dict[str, np.ndarray]
    """``manifest.loop.results`` name -> one row per sample (input order): the fed-back outputs (and the commit
    output) of the step at which the sample stopped."""
    steps: np.ndarray
    """int64 [B]: the steps each sample ran (1..N)."""
    step_counts: np.ndarray
    """int64 [N]: samples whose loop ended after step i."""
    exit_counts: np.ndarray
    """int64 [N, K]: per step, the samples that left the chain at each of its exits."""
    batch_sizes: list[int]
    """Rows each step ran (compaction makes them shrink)."""
    gate_masks: np.ndarray | None = None
    """Policy ``never``: bool [N, B], the loop gate's own decision after each step."""
    gate_scores: np.ndarray | None = None
    """Policy ``never``: float32 [N, B], the loop gate's score after each step."""
    all_steps: list[dict[str, np.ndarray]] | None = None
    """Policy ``never``: per step, the results (``manifest.loop.results``, every sample, input order) a sample
    stopping after that step would return."""

    @property
    def n_samples(self) -> int:
        """B, the number of samples of the call."""
        return int(self.steps.shape[0])


def step_value(source: Mapping[str, Any], i: int, n: int) -> float:
    """The value of per-step input ``source`` (a ``manifest.loop.step_inputs`` record) at step ``i`` of ``n``."""
    kind = source["source"]
    if kind == "step":
        return float(i)
    if kind == "steps":
        return float(n)
    position = (i + int(source.get("offset", 0))) / n  # 0 at the first step, 1 after the last
    if kind == "table":
        values = source["values"]
        return float(values[int(round(position * (len(values) - 1)))])
    start, end = float(source.get("start", 0.0)), float(source.get("end", 0.0))
    return start + (end - start) * position


def stage_of(i: int, n: int, stages: int) -> int:
    """The stage of step ``i`` (0-based) of ``n`` under a staged threshold of ``stages`` values:
    ``min(stages - 1, i * stages // n)``, i.e. the steps split evenly (the first ``n / stages`` steps take stage 0).
    With ``stages`` > ``n`` the later stages are not reached."""
    return min(stages - 1, i * stages // n)


def parse_loop_threshold(text: str | None, option: str = "--loop-threshold") -> LoopThreshold | None:
    """``--loop-threshold`` as text: ``"never"``, ``"always"``, a number, or comma-separated numbers (a staged
    threshold, ``"7.5,5,2.5"``). Values are checked later, per gate kind; raises :class:`DataError` naming
    ``option`` for a list holding something other than numbers."""
    if text is None or "," not in text:
        return text
    return parse_stages(text, option)


def parse_stages(text: str | None, option: str = "--stages") -> list[float] | None:
    """Comma-separated stage values as text (``"7.5,5,2.5"``; one value is a list of one), None when not given;
    raises :class:`DataError` naming ``option`` for something other than numbers."""
    if text is None:
        return None
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise DataError(f"{option} {text!r}: a staged threshold is comma-separated numbers, one per stage "
                        f"(e.g. 7.5,5,2.5)") from None


class LoopRunner:
    """Runs a loop bundle (``manifest.loop``). Create once, call :meth:`run` many times.

    ``bundle_or_path``: a :class:`~eecompile.bundle.Bundle` or a bundle path. ``backend`` and ``options`` go to
    the chain's :class:`~eecompile.runtimes.chain.EarlyExitRunner` (``threads`` also sizes the step graph's
    session). Raises :class:`BundleError` for a bundle without a loop, :class:`BackendError` when a session
    cannot be made."""

    def __init__(self, bundle_or_path: Bundle | str | Path, backend: str | SegmentBackend = "onnxruntime",
                 **options: Any) -> None:
        self.bundle = bundle_or_path if isinstance(bundle_or_path, Bundle) else Bundle.load(bundle_or_path)
        m = self.manifest = self.bundle.manifest
        if m.loop is None:
            raise BundleError(f"{self.bundle.path}: not a loop bundle (no 'loop' in the manifest); run it with "
                              f"eecompile.load(...).run")
        lp = self.loop = m.loop
        # The chain is one step: the segment runner sees the bundle without its loop (it refuses loop bundles, so
        # that bench, calibrate and serve do not run one step as if it were the model).
        self.chain = EarlyExitRunner(Bundle(self.bundle.path, replace(m, loop=None)), backend=backend, **options)
        self.default_steps = int(lp["steps"])
        self.step_inputs = list(lp.get("step_inputs") or [])
        fed_by_step = self._fed_by_step = {s["input"] for s in self.step_inputs}
        self.feedback = [(p["output"], p["input"]) for p in lp["feedback"]]
        self.inputs: list[TensorInfo] = [t for t in m.inputs if t.name not in fed_by_step]
        """The inputs a caller gives: model inputs not fed per step (fed-back inputs take their first value)."""
        self.results = [TensorInfo.from_dict(t) for t in lp.get("results") or []]
        self.commit: str | None = lp.get("commit")
        self.gate = lp.get("gate")
        self._axis: dict[str, int | None] = {t.name: t.batch_axis for t in m.inputs}
        self._axis.update({t.name: (t.batch_axis or 0) for t in m.outputs})
        self._step_info = {t["name"]: TensorInfo.from_dict(t) for t in lp.get("inputs") or []}
        for t in lp.get("outputs") or []:
            self._axis[t["name"]] = t.get("batch_axis")
        self._axis.update({name: t.batch_axis for name, t in self._step_info.items()})
        self._step_outputs: list[str] = [t["name"] for t in lp.get("outputs") or []]
        # Per-step inputs: dtype, shape (fixed sizes; the batch axis filled per call) and batch axis, found once.
        infos = {**self._step_info, **{t.name: t for t in m.inputs}}
        self._fills = {s["input"]: (np.dtype(infos[s["input"]].dtype),
                                    [d if isinstance(d, int) else 0 for d in infos[s["input"]].shape],
                                    infos[s["input"]].batch_axis) for s in self.step_inputs}
        seg0 = m.segments[0]
        self._single = (tuple((t.name, seg0.exit.outputs[t.name]) for t in m.outputs)
                        if len(m.segments) == 1 and m.batch_mode == "dynamic" and self.chain.backend.max_batch is None
                        else None)
        self._session = None
        if lp.get("file"):
            from eecompile.runtimes.sessions import import_onnxruntime, session_options

            ort = import_onnxruntime()
            path = self.bundle.verify_file(lp["file"])
            try:
                self._session = ort.InferenceSession(str(path), session_options(options.get("threads")),
                                                     providers=["CPUExecutionProvider"])
            except Exception as e:
                raise BackendError(f"{path}: ONNX Runtime cannot load the loop's step graph "
                                   f"({str(e).splitlines()[0]}); recompile the bundle") from e
            self._session_inputs = [i.name for i in self._session.get_inputs()]

    # --- arguments ------------------------------------------------------------------------------------
    @property
    def loop_threshold(self) -> list[float] | None:
        """The bundle's loop gate threshold as stages (one value: the same at every step); None without a gate."""
        if self.gate is None:
            return None
        t = self.gate["threshold"]
        return [float(v) for v in t] if isinstance(t, list) else [float(t)]

    def _loop_setting(self, loop_threshold: LoopThreshold | None) -> tuple[tuple[float, ...], str | None]:
        """The stage values fed as the gate's threshold, and the override (None, ``never``, ``always``)."""
        if self.gate is None:
            if loop_threshold not in (None, "never"):
                raise DataError("loop_threshold: this loop has no gate (every sample runs every step); leave it "
                                "unset")
            return (0.0,), "never"
        bundle_values = tuple(self.loop_threshold or ())
        if loop_threshold is None:
            return bundle_values, None
        if isinstance(loop_threshold, str) and loop_threshold in ("never", "always"):
            return bundle_values, loop_threshold
        staged = isinstance(loop_threshold, (list, tuple, np.ndarray))
        values: list[Any] = list(loop_threshold) if isinstance(loop_threshold, (list, tuple, np.ndarray)) else [
            loop_threshold]
        if not values:
            raise DataError("loop_threshold: a staged threshold needs at least one value (one per stage)")
        out = []
        for j, v in enumerate(values):
            where = f"loop_threshold[{j}]" if staged else "loop_threshold"
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise DataError(f"{where}: {v!r} is neither a number nor 'never'/'always'") from None
            out.append(check_threshold(self.gate["kind"], f, where))
        return tuple(out), None

    def refuse_step_inputs(self, names: Sequence[str], where: str) -> None:
        """Raise :class:`DataError` when ``names`` (a call's feeds, a data file's arrays) hold a per-step input:
        the runtime fills it at every step from its source, so a value given with the data would be ignored."""
        for s in self.step_inputs:
            if s["input"] in names:
                raise DataError(f"{where}: '{s['input']}' is a per-step input of the loop (loop.inputs."
                                f"{s['input']}, source '{s['source']}'): the runtime fills it at every step, so the "
                                f"value given would be ignored; leave it out (give only "
                                f"{', '.join(repr(t.name) for t in self.inputs)}) or change its source in the spec")

    def _steps(self, steps: int | None) -> int:
        n = self.default_steps if steps is None else steps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise DataError(f"steps: expected a positive integer (the number of loop steps), got {steps!r}")
        return int(n)

    def _fill(self, source: Mapping[str, Any], i: int, n: int, m: int) -> np.ndarray:
        dtype, shape, axis = self._fills[source["input"]]
        v = step_value(source, i, n)
        if dtype.kind in "iu":
            v = float(np.rint(v))
        if axis is not None:
            shape = [*shape[:axis], m, *shape[axis + 1:]]
        return np.full(shape, v, dtype=dtype)

    # --- running --------------------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, np.ndarray], steps: int | None = None,
            thresholds: None | Threshold | Sequence[Threshold | None] | ResolvedThresholds = None,
            loop_threshold: LoopThreshold | None = None, policy: str = "compact") -> LoopResult:
        """Run the loop on one batch.

        ``feeds``: the inputs of :attr:`inputs` (the model inputs not fed per step; a fed-back input gets its
        first step's value, e.g. the initial noise or the all-mask sequence). ``steps``: N (default: the
        manifest's ``loop.steps``). ``thresholds``: the chain's layer exits, as
        :meth:`EarlyExitRunner.run` takes them (the same at every step). ``loop_threshold``: None (the bundle's),
        a number, a staged threshold (a sequence of S numbers; step i compares with stage :func:`stage_of`),
        ``"never"`` (no sample stops before step N) or ``"always"`` (every sample stops after step 1).
        ``policy``: ``compact``, ``wait-all`` or ``never`` (see the module docstring).

        Returns a :class:`LoopResult`. Raises :class:`DataError` (feeds, a per-step input among them, steps,
        loop_threshold), :class:`~eecompile.errors.ThresholdError` (thresholds), :class:`SpecError` (policy),
        :class:`BackendError` (a session failed)."""
        check_policy(policy)
        n_steps = self._steps(steps)
        thr = self.chain.resolve(thresholds)
        values, override = self._loop_setting(loop_threshold)
        if isinstance(feeds, Mapping) and not self._fed_by_step.isdisjoint(feeds):
            self.refuse_step_inputs(list(feeds), "feeds")
        state, b = check_feeds(self.inputs, feeds)
        state = dict(state)
        k_all = self.chain.n_exits
        inner = "wait-all" if policy == "wait-all" else "compact"
        compact = policy == "compact"
        record = policy == "never"
        active = np.arange(b)
        done = np.zeros(b, dtype=bool)
        taken = np.full(b, n_steps, dtype=np.int64)
        step_counts = np.zeros(n_steps, dtype=np.int64)
        exit_counts = np.zeros((n_steps, k_all), dtype=np.int64)
        masks = np.zeros((n_steps, b), dtype=bool) if record else None
        scores = np.full((n_steps, b), np.nan, dtype=np.float32) if record else None
        results: dict[str, np.ndarray] = {}
        all_steps: list[dict[str, np.ndarray]] | None = [] if record else None
        sizes: list[int] = []
        for i in range(n_steps):
            m = len(active) if compact else b
            sizes.append(m)
            per_step = {s["input"]: self._fill(s, i, n_steps, m) for s in self.step_inputs}
            chain_feeds = {t.name: (per_step[t.name] if t.name in per_step else state[t.name])
                           for t in self.manifest.inputs}
            chain_out, counts = self._run_chain(chain_feeds, thr, inner)
            tensors: dict[str, np.ndarray] = {**chain_feeds, **per_step, **chain_out}
            exit_counts[i] = counts if counts is not None else m
            fire = self._run_step_graph(tensors, values[stage_of(i, n_steps, len(values))], m)
            if all_steps is not None:
                all_steps.append({t.name: np.array(tensors[t.name]) for t in self.results})
            if record and fire is not None:
                assert masks is not None and scores is not None
                masks[i] = fire
                scores[i] = tensors[self.gate["score_output"]]  # type: ignore[index]
            if override == "never" or fire is None:
                fire = np.zeros(m, dtype=bool)
            elif override == "always":
                fire = np.ones(m, dtype=bool)
            if i == n_steps - 1:
                fire = np.ones(m, dtype=bool)
            if not compact:
                fire = fire & ~done
            rows = np.flatnonzero(fire)
            if rows.size:
                dest = active[rows] if compact else rows
                self._scatter(tensors, rows, dest, b, results)
                taken[dest] = i + 1
                step_counts[i] = rows.size
                done[dest] = True
            if done.all() and not record:
                break
            nxt = {inp: tensors[out] for out, inp in self.feedback}
            state.update(nxt)
            if compact and rows.size:
                keep = np.flatnonzero(~fire)
                active = active[keep]
                state = {name: (a if self._axis.get(name) is None else np.take(a, keep, axis=self._axis[name]))
                         for name, a in state.items()}
        outputs = {t.name: results[t.name] for t in self.results}
        return LoopResult(outputs, taken, step_counts, exit_counts, sizes, gate_masks=masks, gate_scores=scores,
                          all_steps=all_steps)

    def _run_chain(self, feeds: dict[str, np.ndarray], thr: ResolvedThresholds, policy: str
                   ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """One step's chain: its final outputs (host arrays) for the rows in ``feeds`` and its exit counts (None:
        every row took the final exit). A chain of one segment (no layer exits) runs on the backend directly:
        nothing to gate, scatter or compact, and the feeds were checked at the loop's start."""
        if self._single is not None:
            be = self.chain.backend
            outs = be.run_segment(0, feeds, None)
            return {name: be.to_host(outs[t]) for name, t in self._single}, None
        r = self.chain.run(feeds, thresholds=thr, policy=policy)
        return r.outputs, r.exit_counts

    def _run_step_graph(self, tensors: dict[str, np.ndarray], value: float, m: int) -> np.ndarray | None:
        """Run the step graph on this step's tensors (adding its outputs to ``tensors``); the loop gate's mask."""
        if self._session is None:
            return None
        feeds = {name: (np.array(value, dtype=np.float32) if self.gate is not None
                        and name == self.gate["threshold_input"] else tensors[name])
                 for name in self._session_inputs}
        try:
            outs = self._session.run(self._step_outputs, feeds)
        except Exception as e:
            raise BackendError(f"{self.loop['file']}: the loop's step graph failed ({str(e).splitlines()[0]})") from e
        tensors.update(zip(self._step_outputs, outs, strict=True))
        if self.gate is None:
            return None
        mask = np.asarray(tensors[self.gate["output"]]).astype(bool, copy=False)
        if mask.shape != (m,):
            raise BackendError(f"{self.loop['file']}: the loop gate has shape {list(mask.shape)}, expected [{m}]; "
                               f"recompile the bundle")
        return mask

    def _scatter(self, tensors: dict[str, np.ndarray], rows: np.ndarray, dest: np.ndarray, b: int,
                 results: dict[str, np.ndarray]) -> None:
        """The stopping rows' results into ``results[name][dest]`` (each on its own batch axis)."""
        for t in self.results:
            x = tensors[t.name]
            axis = t.batch_axis or 0
            out = results.get(t.name)
            if out is None:
                shape = list(x.shape)
                shape[axis] = b
                out = results[t.name] = np.zeros(shape, dtype=x.dtype)
            index: list[Any] = [slice(None)] * x.ndim
            index[axis] = dest
            out[tuple(index)] = np.take(x, rows, axis=axis)

    def close(self) -> None:
        """Release the chain's backend; later :meth:`run` calls raise :class:`BackendError`."""
        self.chain.close()
        self._session = None

    def __enter__(self) -> LoopRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_loop_npz(bundle: Bundle, data: str | Path, output: str | Path, policy: str = "compact",
                 thresholds: str | None = None, batch_size: int = 32, backend: str = "onnxruntime",
                 progress: Any = None, max_input_bytes: int | None = None, steps: int | None = None,
                 loop_threshold: str | None = None, **options: Any) -> str:
    """``eecompile run`` on a loop bundle: OUT.npz holds each of ``manifest.loop.results`` (one row per sample)
    and ``steps`` (int64 [N], the steps each sample ran); batch by batch, written atomically. ``loop_threshold``:
    a number, comma-separated numbers (staged), ``never`` or ``always`` (text, as the CLI gives it). Returns the
    one-line summary. Raises what :meth:`LoopRunner.run` and :class:`~eecompile.runtimes.data.NpzBatches` raise,
    and :class:`DataError` when the file holds an array named after a per-step input."""
    from contextlib import nullcontext

    from eecompile.runtimes.data import NpzWriter
    from eecompile.runtimes.files import parse_threshold_list

    output = Path(output)
    with LoopRunner(bundle, backend=backend, **options) as runner:
        thr = runner.chain.resolve(None) if thresholds is None else resolve_thresholds(
            runner.manifest.exits, parse_threshold_list(thresholds), where="--thresholds")  # as run_npz names it
        n_steps = runner._steps(steps)
        setting = parse_loop_threshold(loop_threshold)
        with open_loop_data(runner, data, max_input_bytes) as dataset:
            n = len(dataset)
            taken = np.zeros(n_steps + 1, dtype=np.int64)
            writer = NpzWriter(output, n)
            try:
                ctx = progress(-(-n // batch_size)) if progress is not None else nullcontext(lambda: None)
                with ctx as advance:
                    for feeds in dataset.batches(batch_size):
                        r = runner.run(feeds, steps=n_steps, thresholds=thr, loop_threshold=setting,
                                       policy=policy)
                        for t in runner.results:
                            writer.append(t.name, r.outputs[t.name], t.batch_axis or 0)
                        writer.append("steps", r.steps)
                        taken += np.bincount(r.steps, minlength=n_steps + 1)
                        advance()
                writer.commit()
            except BaseException:
                writer.abort()
                raise
    mean = float((np.arange(n_steps + 1) * taken).sum()) / max(n, 1)
    return (f"{n} samples -> {output}: {mean:.2f} of {n_steps} steps on average, "
            f"{100.0 * taken[n_steps] / max(n, 1):.1f}% ran every step")


def open_loop_data(runner: LoopRunner, data: str | Path, max_input_bytes: int | None = None) -> Any:
    """The loop inputs of an .npz, batch by batch (:class:`~eecompile.runtimes.data.NpzBatches` over
    :attr:`LoopRunner.inputs`). Raises :class:`DataError` for a missing input (naming it) and for an array named
    after a per-step input (:meth:`LoopRunner.refuse_step_inputs`), which would otherwise be ignored."""
    from eecompile.runtimes.data import NpzBatches, open_npz

    zf, members = open_npz(data, runner.inputs)
    zf.close()
    runner.refuse_step_inputs(list(members), str(data))
    return NpzBatches(data, runner.inputs, max_bytes=max_input_bytes)
