"""Thresholds for an accuracy budget, from latencies measured on the backend.

Two layers:

* **Core** (numpy only, testable on synthetic arrays): an :class:`ExitTable` (:mod:`.collect`) holds every early exit's gate
  score and whether every exit's prediction matches the reference (the labels, or the final exit's answer
  when there are none). :func:`assign_exits`, :func:`evaluate`, :func:`search_thresholds` (cheapest
  expected cost with the drop within budget on the calibration data) and :func:`ltt_thresholds`
  (Learn-then-Test, as in CALM: thresholds whose risk on new data is within budget with probability
  >= 1 - delta).
* **Bundle** (:func:`calibrate_bundle`): runs the chain with every exit recorded, measures each segment's
  latency on the backend, picks thresholds, writes them and the report into the manifest atomically.

Conventions: a gate fires when ``score >= t`` (``score <= t`` for ``entropy``; see ``GateKind.fires_above``);
a NaN score never fires; a threshold of +inf (-inf for entropy) means "never exit here".
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from eecompile.bundle import Bundle, Manifest, update_bundle
from eecompile.calibrate.collect import (
    ChainProbe,
    ExitTable,
    collect_exit_table,
    correctness,
    final_output,
    iter_batches,
    load_data,
    predictions,
)
from eecompile.calibrate.latency import find_source_model, measure_latency, session_options
from eecompile.calibrate.ltt import LTTResult, ltt_thresholds
from eecompile.calibrate.plot import plot_report
from eecompile.calibrate.report import CalibrationReport
from eecompile.calibrate.search import (
    Costs,
    Evaluation,
    _check_budget,
    assign_exits,
    candidate_thresholds,
    evaluate,
    never_threshold,
    oracle_exits,
    pareto_curve,
    search_thresholds,
)
from eecompile.calibrate.stats import (
    PVALUES,
    binom_cdf,
    binomial_pvalue,
    hoeffding_bentkus_pvalue,
    samples_needed,
)
from eecompile.errors import CalibrationError, DataError

__all__ = [
    "METHODS", "PVALUES", "CalibrationReport", "ChainProbe", "Costs", "Evaluation", "ExitTable", "LTTResult",
    "assign_exits", "binom_cdf", "binomial_pvalue", "calibrate_bundle", "candidate_thresholds",
    "collect_exit_table", "correctness", "evaluate", "final_output", "find_source_model",
    "hoeffding_bentkus_pvalue", "iter_batches", "load_data", "ltt_thresholds", "measure_latency",
    "never_threshold", "oracle_exits", "pareto_curve", "plot_report", "predictions", "samples_needed",
    "search_thresholds", "session_options",
]

log = logging.getLogger(__name__)

METHODS = ("search", "ltt")


def calibrate_bundle(bundle: str | Path | Bundle, data: str | Path, *, max_drop: float, method: str = "search",
                     delta: float = 0.05, backend: str = "onnxruntime", batch_size: int = 1,
                     plot: str | Path | None = None, repeats: int = 100, threads: int | None = None,
                     reference_model: str | Path | None = None, seed: int = 0, quiet: bool = False,
                     costs: Sequence[float] | None = None) -> CalibrationReport:
    """Choose every early exit's threshold for an accuracy budget and write them into the bundle.

    ``costs`` (seconds per segment) skips the latency measurement (for tests and replayed measurements).
    """
    _check_budget(max_drop, delta if method == "ltt" else None)
    if method not in METHODS:
        raise CalibrationError(f"method '{method}' is unknown; use one of {', '.join(METHODS)}")
    if batch_size < 1:
        raise CalibrationError(f"--batch must be >= 1, got {batch_size}")
    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    m = b.manifest
    if len(m.segments) < 2:
        raise CalibrationError(f"{b.path}: the bundle has no early exit; nothing to calibrate")
    inputs, labels = load_data(data, m)
    n = next(iter(inputs.values())).shape[0]
    if n == 0:
        raise DataError(f"{data}: no samples")
    if method == "ltt":
        need = samples_needed(max_drop, delta)
        total = math.ceil(need / 0.7)
        if n < total:  # fail before the slow part
            raise CalibrationError(
                f"{data}: ltt with max drop {max_drop} and delta {delta} needs at least {total} calibration "
                f"samples ({need} to test after 30% kept for learning); got {n}. Give more data, a larger "
                f"--max-drop or --delta, or use --method search"
            )
    table = collect_exit_table(b, inputs, labels, quiet=quiet)
    notes: list[str] = []
    if costs is None:
        cum_s, full_s = measure_latency(b, inputs, backend=backend, batch_size=batch_size, repeats=repeats,
                                        threads=threads, reference_model=reference_model)
    else:
        cum_s, full_s = list(np.cumsum(np.asarray(costs, np.float64))), None
    cum = np.asarray(cum_s, np.float64) * 1e3  # ms to leave at exit k
    if full_s is not None:
        baseline_ms, baseline = full_s * 1e3, "unsplit model"
    else:
        baseline_ms, baseline = float(cum[-1]), "whole chain"
        notes.append("unsplit model not timed (not found where the manifest says, or not an onnxruntime backend): "
                     "speedups are against running every segment")
    ltt: LTTResult | None = None
    if method == "search":
        thresholds = search_thresholds(table, cum, max_drop)
    else:
        ltt = ltt_thresholds(table, cum, max_drop, delta, seed=seed)
        thresholds = ltt.thresholds
        if not ltt.certified:
            notes.append(f"no threshold can be certified for drop <= {max_drop} with probability >= {1 - delta} "
                         f"on {ltt.n_test} test samples; every gate is set to never fire")
    ev = evaluate(table, thresholds, cum)
    oracle = oracle_exits(table)
    ref = "labels" if labels is not None else "final exit"
    exits = []
    for k, seg in enumerate(m.segments):
        here = ev.exit_index == k
        gate = seg.exit.gate
        exits.append({
            "index": k, "name": seg.exit.name, "gate": gate.kind if gate else None,
            "threshold": float(thresholds[k]) if gate else None, "share": float(here.mean()),
            "accuracy": float(table.correct[k, here].mean()) if here.any() else None,
            "cumulative_ms": float(cum[k]),
        })
    report = CalibrationReport(
        method=method, max_drop=max_drop, delta=delta if method == "ltt" else None, reference=ref, n_samples=n,
        backend=backend, batch_size=batch_size, exits=exits, full_accuracy=ev.full_accuracy, accuracy=ev.accuracy,
        drop=ev.drop, expected_ms=ev.expected_cost, baseline_ms=baseline_ms, baseline=baseline,
        expected_speedup=baseline_ms / ev.expected_cost, oracle_speedup=baseline_ms / float(cum[oracle].mean()),
        certified=ltt.certified if ltt else None,
        ltt=None if ltt is None else {"n_learn": ltt.n_learn, "n_test": ltt.n_test, "candidates": ltt.n_candidates,
                                      "certified_candidates": ltt.n_certified, "p_value": ltt.p_value,
                                      "test_loss": ltt.test_loss, "p_value_kind": "binomial"},
        curve=pareto_curve(table, cum, baseline_ms), notes=notes,
    )

    def change(_root: Path, manifest: Manifest) -> None:
        for k, seg in enumerate(manifest.segments):
            if seg.exit.gate is not None:
                seg.exit.gate.threshold = float(thresholds[k])
        manifest.calibration = report.to_dict()

    update_bundle(b.path, change)
    if plot is not None:
        plot_report(report, plot)
    return report
