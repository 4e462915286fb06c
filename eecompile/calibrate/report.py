"""The calibration report: what is written into ``manifest.calibration`` and printed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class CalibrationReport:
    """What :func:`~eecompile.calibrate.calibrate_bundle` chose, measured and could promise.

    Rates are fractions of the ``n_samples`` calibration samples; times are milliseconds per call of
    ``batch_size`` rows on ``backend``. ``exits``: per exit ``index, name, gate, threshold, share, accuracy``
    (of the samples leaving there) and ``cumulative_ms`` (to leave there); a bundle with jump exits adds
    ``jump_to`` and ``jumped`` (share that jumped) to its jump exits (:func:`eecompile.calibrate.jumps.jump_exit_rows`).
    ``drop``: final accuracy minus the
    chain's; ``loss``/``errors``: the samples the final exit gets right and the chain wrong, with their
    two-sided Clopper-Pearson ``loss_interval`` at ``confidence``; ``drop_upper``: the one-sided bound at
    ``confidence`` (the drop is at most the loss). ``deployed``: the thresholds were written into the bundle;
    when False, the figures describe the best setting found, *not* deployed (the bundle kept its thresholds)
    and ``samples_needed`` / ``samples_needed_best`` say how many calibration samples the budget needs (with
    zero errors / at the loss rate of that setting). ``certified``, ``ltt``: Learn-then-Test only.
    """

    method: str
    max_drop: float
    delta: float | None
    reference: str  # "labels" or "final exit"
    n_samples: int
    backend: str
    batch_size: int
    exits: list[dict[str, Any]]  # per exit: index, name, gate, threshold, share, accuracy, cumulative_ms
    full_accuracy: float
    accuracy: float
    drop: float
    expected_ms: float
    baseline_ms: float
    baseline: str  # "unsplit model" or "whole chain"
    expected_speedup: float
    oracle_speedup: float
    certified: bool | None = None  # ltt only
    ltt: dict[str, Any] | None = None
    curve: list[dict[str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    confidence: float | None = None
    deployed: bool = True
    errors: int | None = None
    loss: float | None = None
    loss_interval: list[float] | None = None
    drop_upper: float | None = None
    allowed_errors: int | None = None  # search only
    samples_needed: int | None = None
    samples_needed_best: int | None = None
    error_budget: float | None = None  # regression: the relative L2 error to the final output a sample may have
    model_speedup: float | None = None  # the cost model's: baseline_ms / expected_ms
    measured: dict[str, Any] | None = None  # StreamTiming.to_dict(): the chosen thresholds timed on the data

    @property
    def what(self) -> str:
        """What the accuracy figures measure: accuracy (labels), agreement with the final exit, or (with an error
        budget) the share of samples within it."""
        if self.error_budget is not None:
            return f"share within the error budget (rel. L2 error <= {self.error_budget:g} of the final output)"
        return "accuracy" if self.reference == "labels" else "agreement with the final exit"

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-safe types, for ``manifest.calibration``."""
        from dataclasses import asdict

        return _plain(asdict(self))

    def summary_lines(self) -> list[str]:
        """The report's conclusions as plain text lines (the table of exits aside)."""
        if self.error_budget is not None:
            out = [f"{self.what}: full model {self.full_accuracy:.4f}, early-exit chain {self.accuracy:.4f} "
                   f"({1 - self.accuracy:.4f} over budget, at most {self.max_drop:g} allowed)"]
        else:
            out = [f"{self.what}: full model {self.full_accuracy:.4f}, early-exit chain {self.accuracy:.4f} "
                   f"(drop {self.drop:+.4f}, budget {self.max_drop:g})"]
        errs = "samples over the error budget" if self.error_budget is not None else "errors vs the final exit"
        if self.confidence is not None and self.loss_interval is not None and self.drop_upper is not None:
            out.append(f"{errs}: {self.errors} of {self.n_samples} ({self.loss:.4f}, "
                       f"{self.confidence:.0%} interval [{self.loss_interval[0]:.4f}, {self.loss_interval[1]:.4f}]"
                       f"); drop <= {self.drop_upper:.4f} at {self.confidence:.0%} confidence (Clopper-Pearson)"
                       + (f"; a budget of {self.max_drop:g} needs >= {self.samples_needed} samples even with zero "
                          f"errors" if self.samples_needed else ""))
        m = self.measured
        if m and m.get("never_deployed"):
            ref = (f"unsplit model {m['unsplit_ms']:.4f} ms" if m.get("unsplit_ms") is not None else
                   "the segments run to the end")
            out.append(f"measured on the calibration data, {self.backend} at batch {self.batch_size}: every gate "
                       f"never (the chosen thresholds ran at {m['never_speedup']['median']:.2f}x its speed): "
                       f"{m['never_ms']:.4f} ms vs {ref} per call: speedup {self.expected_speedup:.2f}x")
            out.append(f"cost model (each exit's path timed alone, every segment to the end): {self.expected_ms:.4f} "
                       f"ms vs {self.baseline} {self.baseline_ms:.4f} ms: {self.model_speedup or 0:.2f}x")
        elif m:
            ref = (f"unsplit model {m['unsplit_ms']:.4f} ms" if m.get("unsplit_ms") is not None else
                   f"never exiting {m['never_ms']:.4f} ms")
            sp = m.get("speedup") or m["never_speedup"]
            out.append(f"measured on the calibration data, {self.backend} at batch {self.batch_size}: "
                       f"{m['chain_ms']:.4f} ms vs {ref} per call: speedup {self.expected_speedup:.2f}x "
                       f"(the median of per-round ratios, {sp['min']:.2f}-{sp['max']:.2f}x over {sp['rounds']} paired rounds of {m['n_batches']} "
                       f"batches, timed as `eecompile bench` times it)")
            out.append(f"cost model (each exit's path timed alone): expected {self.expected_ms:.4f} ms vs "
                       f"{self.baseline} {self.baseline_ms:.4f} ms: {self.model_speedup or 0:.2f}x "
                       f"(oracle {self.oracle_speedup:.2f}x)")
        else:
            out.append(f"expected {self.expected_ms:.4f} ms vs {self.baseline} {self.baseline_ms:.4f} ms on "
                       f"{self.backend} at batch {self.batch_size}: speedup {self.expected_speedup:.2f}x "
                       f"(oracle {self.oracle_speedup:.2f}x)")
        if self.method == "ltt" and self.ltt is not None and self.certified:
            out.append(f"certified by Learn-then-Test: {'share over the error budget' if self.error_budget else 'drop'} <= {self.max_drop:g} on new data with probability "
                       f">= {1 - (self.delta or 0):.0%} ({self.ltt['certified_candidates']} of "
                       f"{self.ltt['candidates']} settings on the path certified; p = {self.ltt['p_value']:.3g})")
        if not self.deployed:
            out.append(f"NOT DEPLOYED: nothing meets {'a share over the error budget' if self.error_budget else 'drop'} <= {self.max_drop:g} at {self.confidence or 0:.0%} "
                       f"confidence with {self.n_samples} samples; the figures above are for the best setting "
                       f"found, which was not written. Samples needed: {self.samples_needed} with zero errors"
                       + (f", about {self.samples_needed_best} at this setting's error rate"
                          if self.samples_needed_best else ""))
        out.extend(f"note: {note}" for note in self.notes)
        return out

    def columns(self) -> tuple[str, ...]:
        """The headers of the printed table (one row per exit)."""
        what = ("within error budget" if self.error_budget is not None
                else "accuracy" if self.reference == "labels" else "agreement w/ final")
        return ("exit", "gate", "threshold", "share exiting", f"{what} of those exiting", "cumulative ms")

    def print(self) -> None:
        """Print the table of exits and the conclusions (rich when installed, plain text otherwise)."""
        cols = self.columns()
        rows = []
        for e in self.exits:
            acc = "-" if e["accuracy"] is None else f"{e['accuracy']:.4f}"
            thr = "never" if e["threshold"] is None or not math.isfinite(e["threshold"]) else f"{e['threshold']:.4g}"
            final = e is self.exits[-1]  # a segment without a gate elsewhere: the boundary before a jump target
            gate = e["gate"] or ("final" if final else "-")
            if "jump_to" in e:
                gate += f" (jump -> {e['jump_to']}: {e['jumped']:.3f})"
            rows.append((str(e["name"] or (e["index"] if e["gate"] or not final else "final")), gate,
                         thr if e["gate"] else "-", f"{e['share']:.3f}", acc, f"{e['cumulative_ms']:.4f}"))
        budget = (f"error budget {self.error_budget:g}, max share over it {self.max_drop:g}"
                  if self.error_budget is not None else f"max drop {self.max_drop:g}")
        title = (f"calibration ({self.method}, {budget}"
                 + (f", confidence {self.confidence:g}" if self.confidence is not None else "")
                 + f", {self.n_samples} samples)" + ("" if self.deployed else " - NOT DEPLOYED"))
        try:
            from rich.table import Table

            from eecompile.console import report_console
        except ImportError:
            print(title)
            for r in [cols, *rows]:
                print("  ".join(f"{c:>14}" for c in r))
            for line in self.summary_lines():
                print(line)
            return
        t = Table(title=title)
        for col in cols:
            t.add_column(col, justify="right")
        for r in rows:
            t.add_row(*r)
        c = report_console()
        c.print(t)
        for line in self.summary_lines():
            c.print(line, style="bold red" if line.startswith("NOT DEPLOYED") else None)


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x)
    if isinstance(x, (np.integer, int)) and not isinstance(x, bool):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x
