"""Calibrating a loop bundle's gate: the threshold that ends a sample's loop, for a quality budget against all N steps.

A loop bundle (``manifest.loop``, :class:`~eecompile.runtimes.loop.LoopRunner`) stops a sample after step i when its
loop gate fires. Calibration turns the loop into the table the single-pass machinery already searches
(:class:`~eecompile.calibrate.collect.ExitTable`), with *stopping after step k* in place of *leaving at exit k*:

* the loop runs N steps with policy ``never`` (the loop gate recorded at every step, every step's results kept);
* the reference is each sample's result after all N steps (the loop gate "never"; layer exits inside the step keep
  the bundle's thresholds, in the reference and the loop alike);
* ``correct[k, n]``: the result sample n would return when stopping after step k + 1 (the ``commit`` output when
  the loop has one, else the fed-back outputs) is the reference's: equal, for integer results (Prophet's
  committed tokens: the share of samples whose answer changes), or within ``error_budget`` relative L2 error over
  the sample's values, for float results (DeeDiff's sampled image: the share of samples over the budget);
* one threshold for every step (``ExitTable.shared``, as for PALBERT's Q-exits), searched by
  :func:`~eecompile.calibrate.search.bounded_search` or certified by
  :func:`~eecompile.calibrate.ltt.ltt_thresholds` exactly as for exits;
* costs: the measured time of the loop per step count, ``t(k) = t(1) + (k - 1) (t(N) - t(1)) / (N - 1)`` from
  the loop timed at 1 step and at N steps on the backend (:func:`~eecompile.calibrate.latency.time_interleaved`),
  so the expected speedup is against all N steps.

A *staged* threshold (S stage values, step i using stage ``stage_of(i, N, S)``) is searched as a scale ``c`` of its
profile ``p`` (the bundle's stage values, or ``stages``): the thresholds ``c * p`` are a monotone family, and a step
fires at scale c exactly when ``score / p[stage] >= c`` (``<=`` for ``change``), so the table holds the scores
divided by their stage's profile value and the one shared threshold found is the scale. Profile values must be
positive.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eecompile.bundle import Bundle, Manifest, update_bundle
from eecompile.calibrate.collect import ExitTable
from eecompile.calibrate.latency import time_interleaved
from eecompile.calibrate.ltt import ltt_thresholds
from eecompile.calibrate.report import CalibrationReport
from eecompile.calibrate.search import bounded_search, evaluate, oracle_exits, pareto_curve
from eecompile.calibrate.stats import clopper_pearson_interval, clopper_pearson_upper, samples_needed
from eecompile.errors import CalibrationError
from eecompile.runtimes.data import take_samples
from eecompile.runtimes.loop import LoopRunner, open_loop_data, stage_of

__all__ = ["LoopCalibrationReport", "calibrate_loop", "loop_table"]

LEARN_FRACTION = 0.3  # Learn-then-Test: the share of samples that orders the candidates (as for exits)


@dataclass
class LoopCalibrationReport(CalibrationReport):
    """:class:`CalibrationReport` of a loop gate: ``exits`` are the steps (row k: stopping after step k + 1; the
    last, step N, has no gate), ``full_accuracy`` is 1 (the reference is all N steps), ``expected_ms`` and
    ``baseline_ms`` are one call of the loop at ``batch_size`` rows. ``steps``: N; ``mean_steps``: the steps a
    sample is expected to run; ``loop_threshold``: the threshold found (a list for a staged one); ``profile``: the
    staged profile it scales (None: one threshold); ``scale``: that scale."""

    steps: int = 0
    mean_steps: float = 0.0
    loop_threshold: float | list[float] | None = None
    profile: list[float] | None = None
    scale: float | None = None
    gate: str = ""

    @property
    def what(self) -> str:
        if self.error_budget is not None:
            return (f"share within the error budget (rel. L2 error <= {self.error_budget:g} of the result after all "
                    f"{self.steps} steps)")
        return f"agreement with all {self.steps} steps"

    def columns(self) -> tuple[str, ...]:
        what = "within error budget" if self.error_budget is not None else "agreement w/ all steps"
        return ("stop after", "gate", "threshold", "share stopping", f"{what} of those stopping", "cumulative ms")

    def summary_lines(self) -> list[str]:
        thr = self.loop_threshold
        shown = ("never" if thr is None or (isinstance(thr, float) and math.isinf(thr)) else
                 f"{thr:.4g}" if isinstance(thr, float) else
                 "[" + ", ".join(f"{v:.4g}" for v in thr) + f"] (staged: {self.scale:.4g} x profile "
                 f"{', '.join(f'{v:g}' for v in self.profile or [])})")
        off = "over the error budget" if self.error_budget is not None else "whose result differs"
        out = [f"loop gate {self.gate}: threshold {shown}; {self.mean_steps:.2f} of {self.steps} steps on average",
               f"{self.what}: {self.accuracy:.4f}; samples {off}: {self.errors} of {self.n_samples} "
               f"({self.loss or 0:.4f}, {self.confidence or 0:.0%} interval [{(self.loss_interval or [0, 0])[0]:.4f}, "
               f"{(self.loss_interval or [0, 1])[1]:.4f}]), at most {self.drop_upper or 0:.4f} at "
               f"{self.confidence or 0:.0%} confidence (Clopper-Pearson); budget {self.max_drop:g}",
               f"expected {self.expected_ms:.4f} ms vs {self.baseline} {self.baseline_ms:.4f} ms on {self.backend} at "
               f"batch {self.batch_size}: speedup {self.expected_speedup:.2f}x (oracle {self.oracle_speedup:.2f}x)"]
        if self.method == "ltt" and self.ltt is not None and self.certified:
            out.append(f"certified by Learn-then-Test: share {off} <= {self.max_drop:g} on new data with probability "
                       f">= {1 - (self.delta or 0):.0%} ({self.ltt['certified_candidates']} of "
                       f"{self.ltt['candidates']} settings on the path certified; p = {self.ltt['p_value']:.3g})")
        if not self.deployed:
            out.append(f"NOT DEPLOYED: no loop threshold meets a share {off} <= {self.max_drop:g} at "
                       f"{self.confidence or 0:.0%} confidence with {self.n_samples} samples; the figures above are "
                       f"for the best setting found, which was not written. Samples needed: {self.samples_needed} "
                       f"with zero errors" + (f", about {self.samples_needed_best} at this setting's error rate"
                                              if self.samples_needed_best else ""))
        out.extend(f"note: {note}" for note in self.notes)
        return out


def loop_table(scores: np.ndarray, correct: np.ndarray, fires_above: bool,
               profile: Sequence[float] | None = None) -> ExitTable:
    """The :class:`ExitTable` of a loop: ``scores`` float [N, B], the loop gate's score after each step;
    ``correct`` bool [N, B], the result of stopping after step k matches the reference (the last row: all N
    steps); ``profile``: S stage values of a staged threshold (step k's score divided by its stage's value, so one
    shared threshold is the profile's scale), None for one threshold. Raises CalibrationError for N < 2 or a
    profile value that is not positive and finite."""
    scores = np.asarray(scores, np.float64)
    n_steps = scores.shape[0]
    if n_steps < 2:
        raise CalibrationError(f"the loop runs {n_steps} step: there is no step to stop after early; calibrate "
                               f"with --steps N (N >= 2)")
    if profile is not None:
        p = np.asarray(profile, np.float64)
        if p.ndim != 1 or p.size == 0 or not (np.isfinite(p).all() and (p > 0).all()):
            raise CalibrationError(f"a staged loop threshold is calibrated as a scale of its profile; the profile "
                                   f"{list(profile)} must be positive finite numbers (give --stages P1,P2,...)")
        per_step = np.array([p[stage_of(k, n_steps, p.size)] for k in range(n_steps)])
        with np.errstate(invalid="ignore"):
            scores = scores / per_step[:, None]
    return ExitTable(scores[:-1], correct, [fires_above] * (n_steps - 1), has_labels=False, shared=True)


def _matches(results: dict[str, np.ndarray], reference: dict[str, np.ndarray], axes: dict[str, int],
             error_budget: float | None) -> np.ndarray:
    """bool [B]: each sample's results equal the reference (integers) or are within the relative L2 budget."""
    ok: np.ndarray | None = None
    for name, ref in reference.items():
        a = np.moveaxis(results[name], axes[name], 0)
        r = np.moveaxis(ref, axes[name], 0)
        if a.dtype.kind == "f":
            assert error_budget is not None
            a64, r64 = a.reshape(a.shape[0], -1).astype(np.float64), r.reshape(r.shape[0], -1).astype(np.float64)
            here = (np.linalg.norm(a64 - r64, axis=1) / np.maximum(np.linalg.norm(r64, axis=1), 1e-12)
                    <= error_budget)
        else:
            here = (a == r).reshape(a.shape[0], -1).all(axis=1)
        ok = here if ok is None else ok & here
    assert ok is not None
    return ok


def calibrate_loop(bundle: Bundle, data: str | Path, *, max_drop: float, confidence: float, method: str = "search",
                   backend: str = "onnxruntime", batch_size: int = 1, repeats: int = 100, threads: int | None = None,
                   seed: int = 0, error_budget: float | None = None, steps: int | None = None,
                   stages: Sequence[float] | None = None, costs: Sequence[float] | None = None,
                   plot: Path | None = None, collect_batch: int = 64,
                   reference_model: str | Path | None = None) -> LoopCalibrationReport:
    """Choose a loop bundle's gate threshold for a quality budget and write it into the bundle (see the module
    docstring); :func:`eecompile.calibrate.calibrate_bundle` calls it for a loop bundle, after checking the budget,
    confidence, method and batch.

    ``data``: an .npz with the loop's inputs (the model inputs not fed per step; a fed-back input holds its first
    value). ``max_drop``: the share of samples whose result may differ from all N steps' (integer results) or be
    over ``error_budget`` (relative L2, float results). ``steps``: N (default: the bundle's ``loop.steps``; when
    given it is written as the bundle's new default, the threshold being chosen for it). ``stages``: a staged
    profile to scale (default: the bundle's staged threshold, if it has one). ``costs``: seconds per step (N
    values) instead of measuring. The thresholds of layer exits inside the step are kept as they are. A
    ``reference_model`` (the unsplit model to time) is refused: the loop is timed against itself at N steps.

    Returns a :class:`LoopCalibrationReport`; when nothing meets the budget at ``confidence`` the bundle is left as
    it was and ``report.deployed`` is False. Raises CalibrationError (a loop without a gate, N < 2, float results
    without ``error_budget``, an error budget on integer results, a profile that is not positive, too few samples
    for ltt, ``costs`` of the wrong length), DataError (a missing loop input, an array named after a per-step
    input, unusable data) and what :class:`LoopRunner` raises."""
    if reference_model is not None:
        raise CalibrationError(f"--reference-model {reference_model}: a loop bundle's speedup is against its own loop "
                               f"run for all N steps (the unsplit model is one step of it); leave the option out")
    options: dict[str, Any] = {"threads": threads} if threads and backend == "onnxruntime" else {}
    with LoopRunner(bundle, backend=backend, **options) as runner:
        if runner.gate is None:
            raise CalibrationError(f"{bundle.path}: the loop has no gate (loop.gate): every sample runs every step, "
                                   f"so there is no threshold to calibrate")
        n_steps = runner._steps(steps)
        results = ([t for t in runner.results if t.name == runner.commit] if runner.commit else
                   [t for t in runner.results if t.name in {o for o, _ in runner.feedback}])
        floats = [t.name for t in results if np.dtype(t.dtype).kind == "f"]
        names = ", ".join(t.name for t in results)
        if floats and error_budget is None:
            raise CalibrationError(
                f"{bundle.path}: the loop's result {floats[0]!r} is a float tensor, which is never exactly the result "
                f"after all {n_steps} steps: give --error-budget EPS, the relative L2 error to it a sample may have "
                f"where it stops (e.g. 0.05); --max-drop then bounds the share of samples over it")
        if not floats and error_budget is not None:
            raise CalibrationError(f"{bundle.path}: the loop's result ({names}) is integer: a sample's answer either "
                                   f"is the one after all {n_steps} steps or not; leave out --error-budget "
                                   f"(--max-drop bounds the share of samples whose answer changes)")
        staged = runner.loop_threshold if len(runner.loop_threshold or []) > 1 else None
        profile = [float(v) for v in stages] if stages is not None else staged
        kind = str(runner.gate["kind"])
        above = kind != "change"
        layer_exits = runner.chain.n_exits > 1
        axes = {t.name: t.batch_axis or 0 for t in results}
        with open_loop_data(runner, data) as dataset:
            n = len(dataset)
            if method == "ltt" and n - round(LEARN_FRACTION * n) < samples_needed(max_drop, 1.0 - confidence):
                need = math.ceil(samples_needed(max_drop, 1.0 - confidence) / (1.0 - LEARN_FRACTION))
                raise CalibrationError(f"{data}: ltt with max drop {max_drop} at confidence {confidence:g} needs at "
                                       f"least {need} samples ({LEARN_FRACTION:.0%} kept for learning); got {n}. Give "
                                       f"more data, a larger --max-drop, or use --method search")
            scores = np.empty((n_steps, n), np.float64)
            correct = np.empty((n_steps, n), bool)
            first: dict[str, np.ndarray] | None = None
            start = 0
            for feeds in dataset.batches(max(collect_batch, batch_size)):
                r = runner.run(feeds, steps=n_steps, loop_threshold="never", policy="never")
                assert r.all_steps is not None and r.gate_scores is not None
                rows = slice(start, start + r.n_samples)
                ref = {t.name: r.all_steps[-1][t.name] for t in results}
                for k, out in enumerate(r.all_steps):
                    correct[k, rows] = _matches(out, ref, axes, error_budget)
                scores[:, rows] = r.gate_scores
                start += r.n_samples
                first = first if first is not None else feeds
        table = loop_table(scores, correct, above, profile)
        cum: np.ndarray
        if costs is not None:
            c = np.asarray(costs, np.float64)
            if c.shape != (n_steps,):
                raise CalibrationError(f"costs has {c.size} entries; it needs one per step ({n_steps})")
            cum = np.cumsum(c) * 1e3
        else:
            assert first is not None
            timed = {t.name: np.ascontiguousarray(take_samples(first[t.name], slice(0, batch_size), t.batch_axis))
                     for t in runner.inputs}
            one, all_n = time_interleaved(
                [lambda: runner.run(timed, steps=n_steps, loop_threshold="always"),
                 lambda: runner.run(timed, steps=n_steps, loop_threshold="never")], rounds=repeats, reference=1)
            per = max(all_n - one, 0.0) / (n_steps - 1)
            cum = (one + per * np.arange(n_steps)) * 1e3
    conf, dlt = confidence, 1.0 - confidence
    never = [math.inf if above else -math.inf] * table.n_early
    notes: list[str] = []
    if layer_exits:
        kept = ", ".join(f"{s.exit.name or s.exit.index}: {s.exit.gate.threshold:g}"
                         for s in bundle.manifest.segments[:-1] if s.exit.gate is not None)
        notes.append(f"layer exits inside the step keep their thresholds ({kept}), in the reference and the loop "
                     f"alike (calibrate them on a bundle of the step model without 'loop:')")
    if costs is None:
        notes.append(f"costs: the loop timed at 1 and at {n_steps} steps on {backend} at batch {min(batch_size, n)}, "
                     f"linear in between ({(cum[-1] - cum[0]) / (n_steps - 1):.4f} ms per step)")
    uncertified = None
    ltt = None
    if method == "search":
        sr = bounded_search(table, cum, max_drop, conf)
        deployed, chosen, need, need_best = sr.feasible, sr.thresholds, sr.samples_needed, sr.samples_needed_best
        allowed = sr.allowed_errors
        if not deployed:
            uncertified = sr.best_unbounded if sr.best_unbounded != never else None
            why = (f"{n} samples cannot bound the share of samples off below {max_drop} at confidence {conf:g} "
                   f"(even zero samples off need {need} samples)" if allowed < 0 else
                   f"no loop threshold that stops samples early has at most {allowed} samples off in {n}, "
                   f"which the budget allows at confidence {conf:g}")
            notes.append(f"{why}; the bundle's threshold is left as it was")
    else:
        allowed = None
        ltt = ltt_thresholds(table, cum, max_drop, dlt, seed=seed, learn_fraction=LEARN_FRACTION)
        deployed, chosen, need, need_best = ltt.certified, ltt.thresholds, ltt.samples_needed, ltt.samples_needed_best
        if not deployed:
            uncertified = ltt.best_uncertified
            notes.append(f"no loop threshold on the path of {ltt.n_candidates} can be certified on {ltt.n_test} test "
                         f"samples; the bundle's threshold is left as it was")
    shown = chosen if deployed or uncertified is None else uncertified
    ev = evaluate(table, shown, cum)
    scale = float(shown[0])
    value: float | list[float] = [scale * v for v in profile] if profile is not None else scale
    stage_values = [float(v) for v in (value if isinstance(value, list) else [value])]
    exits = []
    for k in range(n_steps):
        here = ev.exit_index == k
        gate = kind if k < n_steps - 1 else None
        exits.append({"index": k, "name": f"step {k + 1}", "gate": gate,
                      "threshold": stage_values[stage_of(k, n_steps, len(stage_values))] if gate else None,
                      "share": float(here.mean()),
                      "accuracy": float(table.correct[k, here].mean()) if here.any() else None,
                      "cumulative_ms": float(cum[k])})
    lo, hi = clopper_pearson_interval(ev.errors, n, conf)
    report = LoopCalibrationReport(
        method=method, max_drop=max_drop, delta=dlt if method == "ltt" else None, reference=f"all {n_steps} steps",
        n_samples=n, backend=backend, batch_size=batch_size, exits=exits, full_accuracy=ev.full_accuracy,
        accuracy=ev.accuracy, drop=ev.drop, expected_ms=ev.expected_cost, baseline_ms=float(cum[-1]),
        baseline=f"all {n_steps} steps", expected_speedup=float(cum[-1]) / ev.expected_cost,
        oracle_speedup=float(cum[-1]) / float(cum[oracle_exits(table)].mean()),
        certified=ltt.certified if ltt else None,
        ltt=None if ltt is None else {"n_learn": ltt.n_learn, "n_test": ltt.n_test, "candidates": ltt.n_candidates,
                                      "certified_candidates": ltt.n_certified, "p_value": ltt.p_value,
                                      "test_loss": ltt.test_loss, "p_value_kind": "binomial"},
        curve=pareto_curve(table, cum, float(cum[-1])), notes=notes, confidence=conf, deployed=deployed,
        errors=ev.errors, loss=ev.loss, loss_interval=[lo, hi], drop_upper=clopper_pearson_upper(ev.errors, n, dlt),
        allowed_errors=allowed, samples_needed=need, samples_needed_best=need_best, error_budget=error_budget,
        steps=n_steps, mean_steps=float((ev.exit_index + 1).mean()), loop_threshold=value, profile=profile,
        scale=scale if profile is not None else None, gate=kind)
    if deployed:
        def change(_root: Path, manifest: Manifest) -> None:
            assert manifest.loop is not None and manifest.loop.get("gate") is not None
            manifest.loop["gate"]["threshold"] = value
            manifest.loop["steps"] = n_steps
            manifest.calibration = report.to_dict()

        update_bundle(bundle.path, change)
    if plot is not None:
        from eecompile.calibrate.plot import plot_report

        plot_report(report, plot)
    return report
