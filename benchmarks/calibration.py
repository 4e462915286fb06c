"""``python -m benchmarks.calibration [--splits 20] [--quick]``: do calibrated thresholds keep their promise on
data they have not seen, and what speed do they buy?

Two datasets that ship with scikit-learn (no download): the handwritten digits (the demo's CNN, three exits) and
the Wisconsin breast-cancer table (an MLP, two exits). Each model is trained on 40% of its dataset, its exit
heads are trained on the same 40%, and the other 60% (the *pool*) is run once through the bundle with policy
``never`` (every exit's score and correctness, :func:`eecompile.calibrate.collect_exit_table`). The latency of
leaving at each exit and of the unsplit model is measured once at batch 1 (interleaved rounds, medians,
:func:`eecompile.calibrate.measure_latency`), and again to see how much the expected speedup of the same
thresholds moves from one measurement to the next.

Then, for each of ``--splits`` random halvings of the pool into a calibration and a test half, and for each
budget, every method picks thresholds on the calibration half only:

* ``empirical``: the cheapest thresholds whose drop *on the calibration half* is within budget (what
  ``calibrate --method search`` did before it accounted for sampling noise);
* ``search``: the cheapest thresholds whose Clopper-Pearson upper bound on the drop at 95% is within budget
  (:func:`eecompile.calibrate.bounded_search`, today's default);
* ``ltt``: Learn-then-Test at delta 0.05 on a 50-200 point path (:func:`eecompile.calibrate.ltt_thresholds`).

On the test half: the drop (full-model accuracy minus chain accuracy, against the labels) and whether it stays
within budget, and the speedup (unsplit-model ms / expected ms of the chain at the test half's exits). A method
that cannot meet the budget deploys nothing (the bundle keeps its thresholds); it is counted apart. Writes
``results/calibration.json`` and prints the Markdown table that README.md shows.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIDENCE = 0.95
BUDGETS = {"digits": (0.01, 0.02), "breast_cancer": (0.02, 0.05)}

BC_SPEC = """\
model: bc.onnx
exits:
  - at: feat1
    name: early
    head: {kind: linear}
    gate: {kind: max_prob, threshold: 0.99}
  - at: feat2
    name: middle
    head: {kind: linear}
    gate: {kind: max_prob, threshold: 0.99}
final: {output: logits}
"""


def _demo() -> Any:
    spec = importlib.util.spec_from_file_location("digits_demo", ROOT / "examples" / "digits" / "demo.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bc_backbone(width: int = 1024) -> Any:
    import torch
    from torch import nn

    class BCNet(nn.Module):
        exit_taps = ("feat1", "feat2")

        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Linear(30, 64), nn.ReLU())
            self.b = nn.Sequential(nn.Linear(64, 128), nn.ReLU())
            self.c = nn.Sequential(nn.Linear(128, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                   nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
            self.top = nn.Linear(width, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            f1 = self.a(x)
            f2 = self.b(f1)
            return self.top(self.c(f2)), f1, f2

    return BCNet()


def _dataset(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train x, train y, pool x, pool y): 40% / 60%, stratified, seed 0."""
    from sklearn.datasets import load_breast_cancer, load_digits
    from sklearn.model_selection import train_test_split

    if name == "digits":
        d = load_digits()
        x = (d.images / 16.0).astype(np.float32)[:, None]
    else:
        d = load_breast_cancer()
        x = d.data.astype(np.float32)
    y = d.target.astype(np.int64)
    x_tr, x_pool, y_tr, y_pool = train_test_split(x, y, train_size=0.4, stratify=y, random_state=0)
    if name != "digits":  # standardise with the training statistics
        mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
        x_tr, x_pool = (x_tr - mu) / sd, (x_pool - mu) / sd
    return x_tr.astype(np.float32), y_tr, x_pool.astype(np.float32), y_pool


def build(name: str, work: Path, epochs: int, head_epochs: int) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """Train, export, compile and train the heads of one dataset's model; (bundle, onnx, pool x, pool y)."""
    import torch

    import eecompile
    from eecompile.models.export import export_onnx
    from eecompile.train import train_heads

    demo = _demo()
    x_tr, y_tr, x_pool, y_pool = _dataset(name)
    onnx_name = "digits.onnx" if name == "digits" else "bc.onnx"
    bundle = work / "model.eebundle"
    if (work / "built").is_file():  # --work DIR of an earlier run: the same models, trained once
        return bundle, work / onnx_name, x_pool, y_pool
    work.mkdir(parents=True, exist_ok=True)
    np.savez(work / "train.npz", input=x_tr, labels=y_tr)
    torch.manual_seed(0)
    model = demo.build_backbone() if name == "digits" else _bc_backbone()
    demo.train_backbone(model, x_tr, y_tr, epochs=epochs)
    onnx_path = export_onnx(model, (torch.from_numpy(x_tr[:2]),), work / onnx_name, input_names=["input"],
                            output_names=["logits"], exit_taps=model.exit_taps)
    spec = work / "spec.yaml"
    spec.write_text(demo.SPEC if name == "digits" else BC_SPEC)
    eecompile.compile_model(spec, bundle, force=True)
    train_heads(bundle, work / "train.npz", epochs=head_epochs, quiet=True)
    (work / "built").write_text("")
    return bundle, onnx_path, x_pool, y_pool


def _stats(xs: list[float]) -> dict[str, float] | None:
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def evaluate_splits(table: Any, cum_ms: np.ndarray, full_ms: float, budget: float, splits: int) -> dict[str, Any]:
    """Per method: deployed / held counts and test drops and speedups over ``splits`` random halvings."""
    from eecompile.calibrate import bounded_search, evaluate, ltt_thresholds, never_setting, search_thresholds
    from eecompile.errors import CalibrationError

    n = table.n_samples
    out: dict[str, Any] = {}
    rows: dict[str, list[dict[str, Any]]] = {"empirical": [], "search": [], "ltt": []}
    for seed in range(splits):
        perm = np.random.default_rng(1000 + seed).permutation(n)
        cal, test = table.subset(perm[: n // 2]), table.subset(perm[n // 2:])
        never = never_setting(cal)
        picks: dict[str, tuple[list[float] | None, str | None]] = {}
        emp = search_thresholds(cal, cum_ms, budget)
        picks["empirical"] = (emp if emp != never else None, None)
        sr = bounded_search(cal, cum_ms, budget, CONFIDENCE)
        picks["search"] = (sr.thresholds if sr.feasible else None,
                           None if sr.feasible else f"needs {sr.samples_needed_best or sr.samples_needed} samples")
        try:
            lt = ltt_thresholds(cal, cum_ms, budget, 1 - CONFIDENCE, seed=seed)
            picks["ltt"] = (lt.thresholds if lt.certified else None,
                            None if lt.certified else f"needs {lt.samples_needed_best or lt.samples_needed} samples")
        except CalibrationError as e:
            picks["ltt"] = (None, str(e).split(" (even")[0])
        for method, (thr, why) in picks.items():
            if thr is None:
                rows[method].append({"deployed": False, "why": why})
                continue
            ev = evaluate(test, thr, cum_ms)
            rows[method].append({"deployed": True, "test_drop": ev.drop, "held": ev.drop <= budget + 1e-12,
                                 "speedup": full_ms / ev.expected_cost,
                                 "cal_speedup": full_ms / evaluate(cal, thr, cum_ms).expected_cost})
    for method, rs in rows.items():
        dep = [r for r in rs if r["deployed"]]
        out[method] = {
            "splits": len(rs), "deployed": len(dep), "held": sum(r["held"] for r in dep),
            "held_share_of_deployed": (sum(r["held"] for r in dep) / len(dep)) if dep else None,
            "test_drop": _stats([r["test_drop"] for r in dep]),
            "worst_test_drop": max((r["test_drop"] for r in dep), default=None),
            "speedup": _stats([r["speedup"] for r in dep]),
            "not_deployed_because": sorted({r["why"] for r in rs if not r["deployed"] and r["why"]}),
        }
    return out


def bench_agreement(bundle_path: Path, onnx_path: Path, table: Any, cum_ms: np.ndarray, full_ms: float,
                    x_pool: np.ndarray, budget: float, work: Path, quick: bool) -> dict[str, Any]:
    """The calibration estimate next to what ``eecompile bench`` measures, for the thresholds ``search`` picks on
    the first split's calibration half, run over its test half at batch 1."""
    import shutil

    from eecompile.benchmark import bench_bundle
    from eecompile.bundle import update_bundle
    from eecompile.calibrate import bounded_search, evaluate

    n = table.n_samples
    perm = np.random.default_rng(1000).permutation(n)
    cal_rows, test_rows = perm[: n // 2], perm[n // 2:]
    sr = bounded_search(table.subset(cal_rows), cum_ms, budget, CONFIDENCE)
    estimate = full_ms / evaluate(table.subset(test_rows), sr.thresholds, cum_ms).expected_cost
    copy = work / "bench.eebundle"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(bundle_path, copy)

    def change(_root: Path, manifest: Any) -> None:
        for k, seg in enumerate(manifest.segments[:-1]):
            seg.exit.gate.threshold = float(sr.thresholds[k])

    update_bundle(copy, change)
    data = work / "bench_test.npz"
    np.savez(data, input=x_pool[test_rows])
    rep = bench_bundle(copy, data, batch_size=1, repeats=3 if quick else 7, reference_model=onnx_path,
                       max_batches=len(test_rows))
    measured = float(rep.speedup["median"]) if rep.reference == "unsplit-model" else None
    # What `eecompile calibrate` now reports: the chosen thresholds timed on its own (calibration) half.
    chosen = _timed_on(bundle_path, onnx_path, table.subset(cal_rows), x_pool[cal_rows], sr.thresholds, cum_ms)
    return {"budget": budget, "calibration_estimate": estimate, "calibration_measured": chosen,
            "bench_speedup": measured,
            "bench_min_max": [rep.speedup.get("min"), rep.speedup.get("max")], "bench_reference": rep.reference}


def _timed_on(bundle_path: Path, onnx_path: Path, table: Any, x: np.ndarray, thresholds: Any,
              cum_ms: np.ndarray) -> float:
    """calibrate's measured speedup of ``thresholds`` on the samples ``x`` (rows of ``table``)."""
    from eecompile.bundle import Bundle
    from eecompile.calibrate import STREAM_ROWS, evaluate, time_chosen
    from eecompile.runtimes.bench import stratified_rows

    rows = stratified_rows(evaluate(table, thresholds, cum_ms).exit_index, STREAM_ROWS)
    t = time_chosen(Bundle.load(bundle_path), {"input": x}, list(thresholds), reference_model=onnx_path, rows=rows,
                    max_batches=STREAM_ROWS)
    assert t.speedup is not None
    return float(t.speedup["median"])


def run_dataset(name: str, work: Path, splits: int, quick: bool) -> dict[str, Any]:
    from eecompile.bundle import Bundle
    from eecompile.calibrate import bounded_search, collect_exit_table, evaluate, measure_latency

    bundle_path, onnx_path, x_pool, y_pool = build(name, work, epochs=5 if quick else 25,
                                                   head_epochs=10 if quick else 40)
    b = Bundle.load(bundle_path)
    table = collect_exit_table(b, {"input": x_pool}, y_pool, quiet=True)
    feeds = {"input": x_pool}
    repeats = 30 if quick else 100
    measured = [measure_latency(b, feeds, batch_size=1, repeats=repeats, reference_model=onnx_path)
                for _ in range(2)]
    (cum_s, full_s), (cum2_s, full2_s) = measured
    assert full_s is not None and full2_s is not None
    cum_ms, full_ms = np.asarray(cum_s) * 1e3, full_s * 1e3
    cum2_ms, full2_ms = np.asarray(cum2_s) * 1e3, full2_s * 1e3
    # Run to run: the same thresholds' expected speedup under the two measurements.
    ref = bounded_search(table, cum_ms, BUDGETS[name][-1], CONFIDENCE).thresholds
    sp1 = full_ms / evaluate(table, ref, cum_ms).expected_cost
    sp2 = full2_ms / evaluate(table, ref, cum2_ms).expected_cost
    timed = [_timed_on(bundle_path, onnx_path, table, x_pool, ref, cum_ms) for _ in range(2)]
    full_acc = float(table.correct[-1].mean())
    return {
        "n_pool": table.n_samples, "n_exits": table.n_early + 1, "full_accuracy": full_acc,
        "latency_ms": {"cumulative": cum_ms.tolist(), "unsplit": full_ms,
                       "second_run": {"cumulative": cum2_ms.tolist(), "unsplit": full2_ms}},
        "run_to_run_speedup": [sp1, sp2],
        "run_to_run_measured": timed,
        "bench_agreement": bench_agreement(bundle_path, onnx_path, table, cum_ms, full_ms, x_pool, BUDGETS[name][0],
                                           work, quick),
        "budgets": {str(budget): evaluate_splits(table, cum_ms, full_ms, budget, splits)
                    for budget in BUDGETS[name]},
    }


def _fmt(s: dict[str, float] | None, unit: str = "x", digits: int = 2) -> str:
    if s is None:
        return "-"
    return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def markdown(res: dict[str, Any]) -> str:
    lines = [f"Run: {res['when']}, {res['cpu']}, onnxruntime {res['onnxruntime']}, batch 1, {res['splits']} random "
             f"calibration/test halvings of each pool, confidence {CONFIDENCE} (search) / delta "
             f"{1 - CONFIDENCE:.2f} (ltt).", "",
             "| dataset (pool) | budget | method | deployed | test drop within budget | test drop, median (min-max) "
             "| worst | speedup vs unsplit, median (min-max) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, d in res["datasets"].items():
        for budget, methods in d["budgets"].items():
            for method, m in methods.items():
                held = (f"{m['held']}/{m['deployed']} ({m['held_share_of_deployed']:.0%})" if m["deployed"]
                        else "-")
                drop = _fmt(m["test_drop"], "", 4)
                worst = "-" if m["worst_test_drop"] is None else f"{m['worst_test_drop']:.4f}"
                why = f" (not deployed: {m['not_deployed_because'][0]})" if m["not_deployed_because"] else ""
                lines.append(f"| {name} ({d['n_pool']}) | {float(budget):g} | {method} | {m['deployed']}/"
                             f"{m['splits']}{why} | {held} | {drop} | {worst} | {_fmt(m['speedup'])} |")
    lines.append("")
    for name, d in res["datasets"].items():
        a, b = d["run_to_run_speedup"]
        lines.append(f"- {name}: unsplit {d['latency_ms']['unsplit']:.3f} ms, leaving at each exit "
                     f"{', '.join(f'{c:.3f}' for c in d['latency_ms']['cumulative'])} ms; the same thresholds' "
                     f"expected speedup in two measurements: {a:.2f}x and {b:.2f}x ({abs(a - b) / max(a, b):.0%} "
                     f"apart).")
        if d.get("run_to_run_measured"):
            a, b = d["run_to_run_measured"]
            lines.append(f"  Measured as `calibrate` now reports it (the thresholds timed on the data): {a:.2f}x and "
                         f"{b:.2f}x ({abs(a - b) / max(a, b):.0%} apart).")
        ba = d.get("bench_agreement")
        if ba and ba["bench_speedup"]:
            lines.append(f"  `search` at {ba['budget']:g} on the first split: calibration estimate "
                         f"{ba['calibration_estimate']:.2f}x, `eecompile bench` on the test half "
                         f"{ba['bench_speedup']:.2f}x ({ba['bench_min_max'][0]:.2f}-{ba['bench_min_max'][1]:.2f}; "
                         f"{abs(ba['calibration_estimate'] - ba['bench_speedup']) / ba['bench_speedup']:.0%} apart).")
            if ba.get("calibration_measured"):
                c = ba["calibration_measured"]
                lines.append(f"  What `calibrate` reports now (the thresholds timed on the calibration half): {c:.2f}x, "
                             f"{abs(c - ba['bench_speedup']) / ba['bench_speedup']:.0%} from `bench`.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--splits", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="fewer epochs and timing rounds (smoke test)")
    ap.add_argument("--only", nargs="*", choices=sorted(BUDGETS), default=None)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "calibration.json")
    ap.add_argument("--work", type=Path, default=None, help="where models are built (reused when already there)")
    args = ap.parse_args(argv)
    import onnxruntime as ort
    import torch

    from benchmarks.__main__ import _cpu
    from eecompile.runtimes.onnxruntime import default_threads

    torch.set_num_threads(default_threads())
    work = args.work or Path(tempfile.mkdtemp(prefix="eecompile-calbench-"))
    res: dict[str, Any] = {
        "when": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": _cpu(),
        "onnxruntime": ort.__version__, "python": platform.python_version(), "threads": default_threads(),
        "splits": args.splits, "quick": args.quick, "datasets": {},
    }
    for name in args.only or list(BUDGETS):
        res["datasets"][name] = run_dataset(name, work / name, args.splits, args.quick)
    text = markdown(res)
    print(text)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
        args.out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
