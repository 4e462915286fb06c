"""Thresholds for an accuracy budget, from latencies measured on the backend.

Two layers:

* **Core** (numpy only, testable on synthetic arrays): an :class:`ExitTable` (:mod:`.collect`) holds every
  early exit's gate score and whether every exit's prediction matches the reference (the labels, or the final
  exit's answer when there are none). :mod:`.search`: :func:`evaluate`, :func:`search_thresholds` (cheapest
  expected cost with the empirical drop within budget), :func:`bounded_search` (the default ``search``
  method: the Clopper-Pearson upper bound of the drop within budget); :mod:`.ltt`: :func:`ltt_thresholds`
  (Learn-then-Test, as in CALM: thresholds whose risk on new data is within budget with probability
  >= 1 - delta); :mod:`.stats`: the binomial statistics they rest on.
* **Bundle** (:func:`calibrate_bundle`): runs the runner with policy ``never`` (every exit recorded),
  measures the latency of leaving at each exit on the backend, picks thresholds, writes them and the report
  into the manifest atomically; or, when no setting meets the budget at the stated confidence, leaves the
  bundle as it was and says how many samples the budget needs. A bundle with jump exits (MuE) is calibrated
  over its paths (:mod:`.jumps`: a :class:`~eecompile.calibrate.jumps.JumpTable` whose "exits" are each route's
  ends, timed one by one), through the same searches.

Conventions: a gate fires when ``score >= t`` (``score <= t`` for ``entropy``; see ``GateKind.fires_above``);
a NaN score never fires; a threshold of +inf (-inf for entropy) means "never exit here".
Imports numpy, the bundle reader and the runtime only: calibration runs on a device without onnx or torch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eecompile.bundle import Bundle, Manifest, update_bundle
from eecompile.calibrate.collect import (
    ExitTable,
    collect_exit_table,
    correctness,
    final_output,
    iter_batches,
    load_data,
    predictions,
)
from eecompile.calibrate.jumps import JumpTable, collect_jump_table, end_settings, jump_exit_rows
from eecompile.calibrate.latency import (
    StreamTiming,
    find_source_model,
    measure_latency,
    session_options,
    time_chosen,
    time_interleaved,
)
from eecompile.calibrate.ltt import LTTResult, ltt_thresholds
from eecompile.calibrate.plot import check_plot_path, plot_report
from eecompile.calibrate.report import CalibrationReport
from eecompile.calibrate.search import (
    Costs,
    Evaluation,
    SearchResult,
    _check_budget,
    assign_exits,
    bounded_search,
    candidate_thresholds,
    check_confidence,
    evaluate,
    never_setting,
    never_threshold,
    oracle_exits,
    pareto_curve,
    search_thresholds,
    threshold_path,
)
from eecompile.calibrate.stats import (
    PVALUES,
    binom_cdf,
    binomial_pvalue,
    clopper_pearson_interval,
    clopper_pearson_upper,
    hoeffding_bentkus_pvalue,
    max_certified_errors,
    samples_needed,
    samples_needed_at_rate,
)
from eecompile.errors import CalibrationError, DataError
from eecompile.runtimes.base import check_classifier_bundle
from eecompile.runtimes.bench import stratified_rows
from eecompile.runtimes.data import batch_size_of

__all__ = [
    "DEFAULT_CONFIDENCE", "METHODS", "PVALUES", "CalibrationReport", "Costs", "Evaluation", "ExitTable",
    "LTTResult", "SearchResult", "assign_exits", "binom_cdf", "binomial_pvalue", "bounded_search",
    "calibrate_bundle", "candidate_thresholds", "clopper_pearson_interval", "clopper_pearson_upper",
    "collect_exit_table", "correctness", "evaluate", "final_output", "find_source_model",
    "hoeffding_bentkus_pvalue", "iter_batches", "load_data", "ltt_thresholds", "max_certified_errors",
    "measure_latency", "never_setting", "never_threshold", "oracle_exits", "pareto_curve", "plot_report",
    "predictions", "resolve_confidence", "samples_needed", "samples_needed_at_rate", "search_thresholds",
    "session_options", "threshold_path", "time_interleaved",
]

log = logging.getLogger(__name__)

METHODS = ("search", "ltt")
DEFAULT_CONFIDENCE = 0.95
LTT_LEARN_FRACTION = 0.3
# Batches in the pass that times the chosen thresholds (rows drawn with the calibration data's exit mix).
STREAM_ROWS = 128


def resolve_confidence(confidence: float | None, delta: float | None) -> float:
    """The confidence to calibrate at: ``confidence``, else ``1 - delta``, else 0.95.

    Raises CalibrationError when a value is outside (0, 1) or both are given and disagree."""
    if delta is not None:
        _check_budget(0.5, delta)
    if confidence is not None:
        check_confidence(confidence)
        if delta is not None and abs((1.0 - delta) - confidence) > 1e-12:
            raise CalibrationError(f"--confidence {confidence} and --delta {delta} disagree (confidence = "
                                   f"1 - delta); give one of them")
        return float(confidence)
    return 1.0 - float(delta) if delta is not None else DEFAULT_CONFIDENCE


def calibrate_bundle(bundle: str | Path | Bundle, data: str | Path, *, max_drop: float, method: str = "search",
                     delta: float | None = None, confidence: float | None = None, backend: str = "onnxruntime",
                     batch_size: int = 1, plot: str | Path | None = None, repeats: int = 100,
                     threads: int | None = None, reference_model: str | Path | None = None, seed: int = 0,
                     quiet: bool = False, costs: Sequence[float] | None = None,
                     error_budget: float | None = None, steps: int | None = None,
                     stages: Sequence[float] | None = None) -> CalibrationReport:
    """Choose every early exit's threshold for an accuracy budget and write them into the bundle.

    ``data``: an .npz with the model inputs (N samples) and optionally ``labels`` (class indices; without
    them the reference is the final exit's answer). ``max_drop``: the accuracy drop allowed, a fraction in
    (0, 1) (0.01 = one point). ``confidence`` (or ``delta = 1 - confidence``; default 0.95):

    * ``method="search"``: the cheapest thresholds whose one-sided Clopper-Pearson upper bound of the drop at
      ``confidence`` is within ``max_drop`` (:func:`bounded_search`);
    * ``method="ltt"``: Learn-then-Test (Angelopoulos et al. 2021; CALM): thresholds certified to keep the drop
      within ``max_drop`` on new data with probability >= ``confidence`` (:func:`ltt_thresholds`).

    Latency (``batch_size`` rows per call, ``repeats`` interleaved rounds, medians) is measured on ``backend``
    through the runner, and against the unsplit model when ``reference_model`` is given or the manifest's
    source model lies inside the bundle. ``costs`` (seconds per segment) skips the measurement (for tests and
    replayed measurements).

    ``error_budget``: a sample counts as wrong at an exit when that exit's output is more than ``error_budget``
    relative L2 error from the final output (:func:`collect_exit_table`); ``max_drop`` then bounds the fraction
    of such samples, through the same search or LTT. Labels are ignored. Required for a regression bundle
    (``final.task: regression``, recorded as ``manifest.task``): a budget on agreement means nothing there.

    A loop bundle (``manifest.loop``) gets its loop gate's threshold instead, for a budget against all N steps
    (``steps``: N; ``stages``: a staged profile to scale): :func:`eecompile.calibrate.loop.calibrate_loop`.

    Returns a :class:`CalibrationReport`. When no setting that lets samples exit meets the budget at this
    confidence, nothing is written (the bundle keeps its thresholds), ``report.deployed`` is False and the
    report gives the sample count the budget needs (the CLI then exits with status 1). Raises
    CalibrationError for budgets, confidences or methods out of range, a bundle without early exits, a
    regression bundle without ``error_budget``, or
    (ltt) too few samples to certify anything; DataError for unusable data; BundleError/BackendError from
    loading and running the bundle.
    """
    conf = resolve_confidence(confidence, delta)
    dlt = 1.0 - conf
    _check_budget(max_drop)
    if error_budget is not None and not (math.isfinite(error_budget) and error_budget > 0):
        raise CalibrationError(f"--error-budget must be a positive relative L2 error (0.05 = 5%), got {error_budget}")
    if method not in METHODS:
        raise CalibrationError(f"method '{method}' is unknown; use one of {', '.join(METHODS)}")
    if batch_size < 1:
        raise CalibrationError(f"--batch must be >= 1, got {batch_size}")
    if plot is not None:  # checked before anything runs, like every other output path
        plot = check_plot_path(plot, data)
    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    m = b.manifest
    if m.loop is not None or steps is not None or stages is not None:  # the loop gate (eecompile.calibrate.loop)
        from eecompile.calibrate.loop import calibrate_loop

        if m.loop is None:
            raise CalibrationError(f"{b.path}: --steps and --stages are for loop bundles (compiled from a spec with "
                                   f"'loop:'); this bundle runs its chain once")
        return calibrate_loop(b, data, max_drop=max_drop, confidence=conf, method=method, backend=backend,
                              batch_size=batch_size, repeats=repeats, threads=threads, seed=seed,
                              error_budget=error_budget, steps=steps, stages=stages, plot=plot, costs=costs,
                              reference_model=reference_model)
    check_classifier_bundle(b, "eecompile calibrate", jumps=True)
    if len(m.segments) < 2:
        raise CalibrationError(f"{b.path}: the bundle has no early exit; nothing to calibrate")
    if m.task == "regression" and error_budget is None:
        raise CalibrationError(
            f"{b.path}: the final output '{m.outputs[0].name}' is a regression output (final.task: regression), "
            f"which has no class to agree on: give --error-budget EPS, the relative L2 error to the final output "
            f"a sample may have where it exits (e.g. 0.05); --max-drop then bounds the fraction of samples over it")
    inputs, labels = load_data(data, m)
    n = batch_size_of(inputs, m.inputs, str(data))  # along each input's batch axis (1 for [T, B, F])
    if n == 0:
        raise DataError(f"{data}: no samples")
    if method == "ltt":
        need = samples_needed(max_drop, dlt)
        total = math.ceil(need / (1.0 - LTT_LEARN_FRACTION))
        if n < total:  # fail before the slow part
            raise CalibrationError(
                f"{data}: ltt with max drop {max_drop} at confidence {conf:g} (delta {dlt:g}) needs at least "
                f"{total} calibration samples ({need} to test after {LTT_LEARN_FRACTION:.0%} kept for "
                f"learning); got {n}. Give more data, a larger --max-drop or --delta, or use --method search"
            )
    from eecompile.runtimes.chain import EarlyExitRunner
    from eecompile.runtimes.jumps import JumpRunner

    # One runner (the backend being calibrated) for the scores and the timings.
    options: dict[str, Any] = {"threads": threads} if threads and backend == "onnxruntime" else {}
    runner: Any = (JumpRunner if m.jumps else EarlyExitRunner)(b, backend=backend, **options)
    try:
        collect_batch = 256 if backend == "onnxruntime" else batch_size
        collect = collect_jump_table if m.jumps else collect_exit_table  # jumps: one "exit" per path's end
        table = collect(b, inputs, None if error_budget is not None else labels, quiet=quiet,
                        runner=runner, batch_size=collect_batch, error_budget=error_budget)
        jumps = table if isinstance(table, JumpTable) else None
        if costs is None:
            cum_s, full_s = measure_latency(b, inputs, backend=backend, batch_size=batch_size, repeats=repeats,
                                            threads=threads, reference_model=reference_model, runner=runner,
                                            settings=end_settings(jumps, m) if jumps else None)
        else:
            cum_s = jumps.end_costs(costs) if jumps else list(np.cumsum(np.asarray(costs, np.float64)))
            full_s = None
    finally:
        runner.close()
    notes: list[str] = []
    if batch_size > n:
        notes.append(f"--batch {batch_size} is more than the {n} calibration samples: latency was measured on batches "
                     f"of {n}; give more data to time batch {batch_size}")
    cum = np.asarray(cum_s, np.float64) * 1e3  # ms to leave at exit k
    if full_s is not None:
        baseline_ms, baseline = full_s * 1e3, "unsplit model"
    else:
        baseline_ms, baseline = float(cum[-1]), "whole chain"
        notes.append("unsplit model not timed (pass --reference-model, or keep it inside the bundle as the "
                     "manifest's source_model says; onnxruntime backend only): speedups are against running "
                     "every segment")
    never = never_setting(table)
    if table.shared:
        notes.append("every gate is a Q-exit: one threshold q, shared by all exits, was searched")
    ltt: LTTResult | None = None
    sr: SearchResult | None = None
    uncertified: list[float] | None = None
    if method == "search":
        sr = bounded_search(table, cum, max_drop, conf)
        deployed, thresholds = sr.feasible, sr.thresholds
        need, need_best = sr.samples_needed, sr.samples_needed_best
        if deployed and not sr.exits_pay:
            notes.append(f"exiting does not pay on {backend} at batch {batch_size}: settings within the budget "
                         f"exist, but each is expected to be slower than running every segment, so every gate is "
                         f"set to never (measure with `eecompile bench`; consider fewer or earlier exits)")
        if not deployed:
            uncertified = sr.best_unbounded if sr.best_unbounded != never else None
            why = (f"{n} samples cannot bound any drop below {max_drop} at confidence {conf:g} (even zero errors "
                   f"need {need})" if sr.allowed_errors < 0 else
                   f"no setting that lets samples exit has at most {sr.allowed_errors} errors in {n} samples, "
                   f"which the budget allows at confidence {conf:g}")
            notes.append(f"{why}; the bundle's thresholds are left as they were"
                         + (f"; about {need_best} calibration samples would bound the best setting found"
                            if need_best else ""))
    else:
        ltt = ltt_thresholds(table, cum, max_drop, dlt, seed=seed, learn_fraction=LTT_LEARN_FRACTION)
        deployed, thresholds = ltt.certified, ltt.thresholds
        need, need_best = ltt.samples_needed, ltt.samples_needed_best
        if not deployed:
            uncertified = ltt.best_uncertified
            notes.append(f"no setting on the path of {ltt.n_candidates} can be certified for drop <= {max_drop} "
                         f"with probability >= {conf:g} on {ltt.n_test} test samples; the bundle's thresholds "
                         f"are left as they were"
                         + (f"; about {need_best} calibration samples would certify the next setting"
                            if need_best else ""))
    stream: StreamTiming | None = None
    if deployed and costs is None and jumps is None and list(thresholds) != never:
        # The chosen thresholds on the calibration data, timed as `eecompile bench` times a bundle: the cost model
        # above times each exit's path alone, warm; in use a deep sample follows shallow ones and finds the deep
        # segments' weights out of the CPU caches (digits at batch 1: the final exit's path 1.5x its warm cost).
        rows = stratified_rows(evaluate(table, thresholds, cum).exit_index, STREAM_ROWS * batch_size, seed)
        stream = time_chosen(b, inputs, thresholds, backend=backend, batch_size=batch_size, threads=threads,
                             reference_model=reference_model, rows=rows, max_batches=STREAM_ROWS)
        if stream.never_speedup["median"] < 1.0:
            notes.append(f"measured on the calibration data, the chosen thresholds run at "
                         f"{stream.never_speedup['median']:.2f}x the speed of never exiting at batch {batch_size} "
                         f"(every gate never: {stream.never_ms:.4f} ms, chosen: {stream.chain_ms:.4f} ms per call), "
                         f"so every gate is set to never (consider fewer or earlier exits)")
            thresholds = never
    shown = thresholds if deployed or uncertified is None else uncertified
    ev = evaluate(table, shown, cum)
    lo, hi = clopper_pearson_interval(ev.errors, n, conf)
    drop_upper = clopper_pearson_upper(ev.errors, n, dlt)
    oracle = oracle_exits(table, cum)
    ref = "error budget" if error_budget is not None else "labels" if labels is not None else "final exit"
    exits: list[dict[str, Any]] = []
    if jumps is not None:
        exits, jumped = jump_exit_rows(jumps, m, ev.exit_index, shown, cum)
        notes.append(jumped)
    for k, seg in enumerate(m.segments if jumps is None else ()):
        here = ev.exit_index == k
        gate = seg.exit.gate
        exits.append({
            "index": k, "name": seg.exit.name, "gate": gate.kind if gate else None,
            "threshold": float(shown[k]) if gate else None, "share": float(here.mean()),
            "accuracy": float(table.correct[k, here].mean()) if here.any() else None,
            "cumulative_ms": float(cum[k]),
        })
    model_speedup = baseline_ms / ev.expected_cost
    speedup = model_speedup
    if stream is not None and list(thresholds) != never:
        if stream.speedup is not None:
            speedup = float(stream.speedup["median"])
        else:  # no unsplit model: against the chain run to the end, as the cost model's baseline is
            speedup = float(stream.never_speedup["median"])
    elif stream is not None and stream.unsplit_ms is not None:
        # Switched to never: what runs is the never path just timed (the no-exit engine where there is one), not
        # the segments the cost model sums.
        speedup = stream.unsplit_ms / stream.never_ms
    if deployed and speedup < 1.0:
        notes.append(f"the chosen thresholds are expected to run at {speedup:.2f}x the {baseline} (slower): the "
                     f"exits save less than the split costs at batch {batch_size}; consider fewer exits")
    report = CalibrationReport(
        method=method, max_drop=max_drop, delta=dlt if method == "ltt" else None, reference=ref, n_samples=n,
        backend=backend, batch_size=batch_size, exits=exits, full_accuracy=ev.full_accuracy, accuracy=ev.accuracy,
        drop=ev.drop, expected_ms=ev.expected_cost, baseline_ms=baseline_ms, baseline=baseline,
        expected_speedup=speedup, oracle_speedup=baseline_ms / float(cum[oracle].mean()), model_speedup=model_speedup,
        measured=None if stream is None else {**stream.to_dict(), "never_deployed": list(thresholds) == never},
        certified=ltt.certified if ltt else None,
        ltt=None if ltt is None else {"n_learn": ltt.n_learn, "n_test": ltt.n_test, "candidates": ltt.n_candidates,
                                      "certified_candidates": ltt.n_certified, "p_value": ltt.p_value,
                                      "test_loss": ltt.test_loss, "p_value_kind": "binomial"},
        curve=pareto_curve(table, cum, baseline_ms), notes=notes,
        confidence=conf, deployed=deployed, errors=ev.errors, loss=ev.loss, loss_interval=[lo, hi],
        drop_upper=drop_upper, allowed_errors=sr.allowed_errors if sr else None, samples_needed=need,
        samples_needed_best=need_best, error_budget=error_budget,
    )
    if deployed:
        def change(_root: Path, manifest: Manifest) -> None:
            gated = [seg.exit.gate for seg in manifest.segments if seg.exit.gate is not None]
            for gate, t in zip(gated, thresholds, strict=True):  # one per gated exit (jump bundles: not every one)
                gate.threshold = float(t)
            manifest.calibration = report.to_dict()

        update_bundle(b.path, change)
    if plot is not None:
        plot_report(report, plot)
    return report
