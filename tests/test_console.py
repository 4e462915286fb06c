"""Every rich report prints user strings literally: bracketed tensor names and shapes survive.

With rich's console markup on, ``[time, B, 6]`` is read as a style tag and vanishes, and a name such as
``out[/x]`` raises a MarkupError; the reports below all carry such strings in titles, cells and notes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

NAME = "enc[time]"          # an exit / tensor name that is also a valid-looking style tag
SHAPE = "[time, B, 6]"      # a shape as the reports write it
CLOSER = "out[/x]"          # a closing tag that opens nothing: a MarkupError with markup on
NOTE = f"note on {NAME} {SHAPE} and {CLOSER}"


def _analysis() -> None:
    from eecompile.analysis.cut_points import AnalysisReport, CutPoint

    cut = CutPoint(tensor=NAME, shape=["time", "batch", 6], dtype="float32", batch_axis=1, carried=[CLOSER],
                   inputs_after=[], flops_before=10, fraction=0.5, order=1)
    AnalysisReport(model=f"m{SHAPE}.onnx", inputs=[], outputs=[], total_flops=20, batch_mode="dynamic",
                   batch_note=NOTE, cut_points=[cut], suggested=[NAME]).print()


def _calibration() -> None:
    from eecompile.calibrate.report import CalibrationReport

    exits = [{"index": 0, "name": NAME, "gate": "max_prob", "threshold": 0.9, "share": 0.5, "accuracy": 1.0,
              "cumulative_ms": 0.1},
             {"index": 1, "name": CLOSER, "gate": None, "threshold": None, "share": 0.5, "accuracy": 0.9,
              "cumulative_ms": 0.2}]
    CalibrationReport(method="search", max_drop=0.01, delta=None, reference="labels", n_samples=10,
                      backend="onnxruntime", batch_size=1, exits=exits, full_accuracy=0.9, accuracy=0.9, drop=0.0,
                      expected_ms=0.15, baseline_ms=0.2, baseline="unsplit model", expected_speedup=1.3,
                      oracle_speedup=1.5, notes=[NOTE]).print()


def _build() -> None:
    from eecompile.build.report import BuildReport
    from eecompile.runtimes.records import EngineRecord

    rec = EngineRecord(segment=0, backend="onnxruntime", target="cpu", file=f"engines/{NAME}.ort", sha256=None,
                       backend_version="1", flags={"note": SHAPE})
    BuildReport(bundle=Path("b.eebundle"), backend="onnxruntime", target="cpu", records=[rec], seconds=[0.1],
                sizes=[0], notes=[NOTE]).print()


def _verify() -> None:
    from eecompile.build.report import VerifyReport, VerifyRow

    VerifyReport(bundle=Path("b.eebundle"), backend="tensorrt", batch=2,
                 rows=[VerifyRow(0, NAME, "value", 1.0, 1e-3, SHAPE), VerifyRow(0, CLOSER, "value", 0.0, 1e-3)],
                 notes=[NOTE]).print()


def _auto() -> None:
    from eecompile.auto import AutoReport, Configuration

    cfg = Configuration(exits=[NAME, CLOSER], predicted_speedup=1.5, predicted_drop=0.0, exit_shares=[0.5])
    AutoReport(bundle="b.eebundle", max_drop=0.01, candidates=[{"tensor": NAME, "fraction": 0.5, "agreement": 0.9}],
               ranking=[cfg], verified=[cfg], chosen=cfg, notes=[NOTE]).print()


def _train() -> None:
    from eecompile.train import HeadResult, TrainReport

    head = HeadResult(index=0, name=NAME, kind=CLOSER, agree_before=0.5, agree_after=0.9, acc_before=None,
                      acc_after=None, train_agree=0.95, loss=0.1)
    TrainReport(bundle="b.eebundle", n_train=10, n_val=5, epochs=1, temperature=1.0, used_labels=False,
                final_accuracy=None, heads=[head], skipped=[NOTE]).print()


def _bench() -> None:
    from eecompile.benchmark import print_report
    from eecompile.runtimes.bench import BenchReport

    speed = {"median": 1.2, "min": 1.1, "max": 1.3, "rounds": 3}
    print_report(BenchReport(bundle=f"b{SHAPE}", data="in.npz", backend="onnxruntime", batch_size=1, n_samples=4,
                             n_batches=4, repeats=3, threads=1, latency_ms={"p50": 1.0, "p90": 1.0, "p99": 1.0},
                             throughput=10.0, exit_histogram=[{"index": 0, "name": NAME, "count": 4, "share": 1.0}],
                             references=[{"name": CLOSER, "latency_ms_p50": 1.2, "speedup": speed}],
                             reference=CLOSER, speedup=speed, notes=[NOTE]))


@pytest.mark.parametrize("report", [_analysis, _calibration, _build, _verify, _auto, _train, _bench],
                         ids=lambda f: f.__name__.strip("_"))
def test_report_prints_brackets_literally(report: Callable[[], None], capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # one line per row: the names are not wrapped inside their cells
    report()
    out = capsys.readouterr().out
    assert NOTE in out
    assert NAME in out and CLOSER in out
