"""What ``eecompile build`` and ``eecompile verify`` did, as data and as the tables the CLI prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from eecompile.runtimes.records import EngineRecord


@dataclass
class BuildReport:
    """What ``build_engines`` did, one row per segment."""

    bundle: Path
    backend: str
    target: str
    records: list[EngineRecord]
    seconds: list[float]
    sizes: list[int]
    timing_cache: Path | None = None
    notes: list[str] = field(default_factory=list)

    def print(self) -> None:
        from rich.table import Table

        from eecompile.console import report_console

        table = Table(title=f"{self.bundle}: {self.backend} engines for {self.target}")
        for col in ("segment", "file", "size", "build s", "flags"):
            table.add_column(col)
        for r, s, n in zip(self.records, self.seconds, self.sizes, strict=True):
            flags = ", ".join(f"{k}={v}" for k, v in r.flags.items() if not isinstance(v, (dict, list)))
            if r.flags.get("rewritten"):
                flags += ", blocked: " + ", ".join(f"{c['tensor']} ({'out' if c['from'] == r.segment else 'in'})"
                                                   for c in r.flags["rewritten"])
            table.add_row(str(r.segment), r.file or "(none stored)", f"{n / 1e6:.1f} MB" if n else "-",
                          f"{s:.1f}", flags)
        console = report_console()
        console.print(table)
        if self.timing_cache:
            console.print(f"timing cache: {self.timing_cache}")
        for note in self.notes:
            console.print(note)


@dataclass
class VerifyRow:
    segment: int
    tensor: str
    kind: str  # "value" (max abs error / output scale) or "decisions" (rows that disagree)
    error: float
    tolerance: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance


@dataclass
class VerifyReport:
    """Each segment's outputs on the backend against ONNX Runtime on CPU, fed the same inputs."""

    bundle: Path
    backend: str
    batch: int
    rows: list[VerifyRow]
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def print(self) -> None:
        from rich.table import Table
        from rich.text import Text

        from eecompile.console import report_console

        table = Table(title=f"{self.bundle}: {self.backend} vs ONNX Runtime CPU, batch {self.batch}")
        for col in ("segment", "output", "check", "error", "tolerance", "", "detail"):
            table.add_column(col)
        for r in self.rows:
            table.add_row(str(r.segment), r.tensor, r.kind, f"{r.error:.3g}", f"{r.tolerance:.3g}",
                          "ok" if r.ok else Text("FAIL", style="red"), r.detail)
        console = report_console()
        console.print(table)
        for note in self.notes:
            console.print(note)
        console.print("parity ok" if self.ok else "parity FAILED", style=None if self.ok else "red")
