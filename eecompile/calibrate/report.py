"""The calibration report: what is written into ``manifest.calibration`` and printed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class CalibrationReport:
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

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-safe types, for ``manifest.calibration``."""
        from dataclasses import asdict

        return _plain(asdict(self))

    def print(self) -> None:
        from rich.console import Console
        from rich.table import Table

        what = "accuracy" if self.reference == "labels" else "agreement w/ final"
        t = Table(title=f"calibration ({self.method}, max drop {self.max_drop:g}"
                        + (f", delta {self.delta:g}" if self.method == "ltt" else "") + f", {self.n_samples} samples)")
        for col in ("exit", "gate", "threshold", "share exiting", f"{what} of those exiting", "cumulative ms"):
            t.add_column(col, justify="right")
        for e in self.exits:
            acc = "-" if e["accuracy"] is None else f"{e['accuracy']:.4f}"
            thr = "never" if e["threshold"] is None or not math.isfinite(e["threshold"]) else f"{e['threshold']:.4g}"
            t.add_row(str(e["name"] or (e["index"] if e["gate"] else "final")), e["gate"] or "final",
                      thr if e["gate"] else "-", f"{e['share']:.3f}", acc, f"{e['cumulative_ms']:.4f}")
        c = Console()
        c.print(t)
        c.print(f"{what}: full model {self.full_accuracy:.4f}, early-exit chain {self.accuracy:.4f} "
                f"(drop {self.drop:+.4f}, budget {self.max_drop:g})")
        c.print(f"expected {self.expected_ms:.4f} ms vs {self.baseline} {self.baseline_ms:.4f} ms on "
                f"{self.backend} at batch {self.batch_size}: speedup {self.expected_speedup:.2f}x "
                f"(oracle {self.oracle_speedup:.2f}x)")
        if self.certified is False:
            c.print("[bold red]no threshold can be certified[/]: every gate is set to never fire")
        for note in self.notes:
            c.print(f"note: {note}")


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
