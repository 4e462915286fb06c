"""Accuracy-speedup plot of a calibration (matplotlib, imported when called)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eecompile.calibrate.report import CalibrationReport
from eecompile.errors import CalibrationError, DataError


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise CalibrationError("--plot needs matplotlib: pip install 'eecompile[plot]'") from e
    return plt


def check_plot_path(path: str | Path, data: str | Path | None = None) -> Path:
    """Check ``--plot PATH`` before a calibration runs: matplotlib importable, an existing directory, a file name
    whose suffix matplotlib writes, not the ``data`` file. Raises DataError (CalibrationError without matplotlib)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise DataError(f"--plot {path}: directory {path.parent} does not exist; create it or choose another "
                        f"--plot path")
    if path.is_dir():
        raise DataError(f"--plot {path}: is a directory; give a file name for the plot (e.g. pareto.png)")
    if data is not None and path.exists() and Path(data).exists() and path.samefile(data):
        raise DataError(f"--plot {path}: is the --data file; choose another --plot path")
    formats = _pyplot().figure().canvas.get_supported_filetypes()
    _pyplot().close("all")
    if path.suffix.lstrip(".").lower() not in formats:
        raise DataError(f"--plot {path}: cannot write a '{path.suffix}' image; end the name in one of "
                        f"{', '.join('.' + f for f in sorted(formats))} (e.g. pareto.png)")
    return path


def plot_report(report: CalibrationReport, path: str | Path) -> Path:
    """Accuracy against speedup (cheapest thresholds per budget) and the exit histogram, in one PNG; with an
    error budget (regression) the share of samples within it instead of accuracy."""
    plt = _pyplot()
    path = Path(path)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [p["speedup"] for p in report.curve]
    ys = [p["accuracy"] for p in report.curve]
    ax1.plot(xs, ys, "o-", label="cheapest thresholds per budget")
    # The curve is the cost model's; so is the chosen point on it. The measured speedup is marked beside it.
    model = report.model_speedup if report.model_speedup is not None else report.expected_speedup
    ax1.plot([model], [report.accuracy], "r*", markersize=14, label="chosen")
    if report.measured:
        ax1.plot([report.expected_speedup], [report.accuracy], "kx", markersize=10,
                 label="chosen, measured on the data")
    ax1.axhline(report.full_accuracy - report.max_drop, color="gray", ls="--", lw=1,
                label="max share over the error budget" if report.error_budget is not None else "budget")
    ax1.axvline(report.oracle_speedup, color="green", ls=":", lw=1, label="oracle speedup")
    what = ("share within the error budget" if report.error_budget is not None
            else "accuracy" if report.reference == "labels" else "agreement with final exit")
    ax1.set_xlabel(f"speedup vs {report.baseline} ({report.backend}, batch {report.batch_size})")
    ax1.set_ylabel(what)
    ax1.set_title("error budget - speedup" if report.error_budget is not None else "accuracy - speedup")
    ax1.legend(fontsize=8)
    names = [str(e["name"] or (e["index"] if e["gate"] else "final")) for e in report.exits]
    ax2.bar(names, [e["share"] for e in report.exits], color="tab:blue")
    ax2.set_xlabel("exit")
    ax2.set_ylabel("share of samples")
    ax2.set_title("where samples exit")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
