"""The benchmark code runs, its JSON has every field, and its ratios come from paired runs (no timing asserted)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from eecompile.benchmark import BenchReport, bench_bundle, paired_blocks, ratio_stats
from eecompile.cli import cli

ROOT = Path(__file__).resolve().parent.parent
STATS = {"median", "min", "max"}


# ------------------------------------------------------------------------------------------- helpers


def test_ratio_stats_pairs_rounds() -> None:
    # Per-round ratios [1, 1, 3]: median 1. A ratio of medians (3 / 1) would say 3: rounds must be paired.
    s = ratio_stats([1.0, 10.0, 3.0], [1.0, 10.0, 1.0])
    assert s == {"median": 1.0, "min": 1.0, "max": 3.0, "rounds": 3}
    with pytest.raises(ValueError):
        ratio_stats([1.0, 2.0], [1.0])


def test_paired_blocks_take_turns() -> None:
    order: list[str] = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    t = paired_blocks(fns, calls={"a": 2, "b": 3}, rounds=3, warmup=1)
    assert order[:2] == ["a", "b"]  # warm-up, once each
    # Blocks: round 0 a,b; round 1 reversed b,a; round 2 a,b.
    assert "".join(order[2:]) == "aa" + "bbb" + "bbb" + "aa" + "aa" + "bbb"
    assert all(len(t[k].wall) == 3 and len(t[k].cpu) == 3 for k in fns)


# ------------------------------------------------------------------------------------------- bench_bundle


@pytest.fixture(scope="module")
def mlp_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from benchmarks import models

    d = tmp_path_factory.mktemp("bench")
    src = models.mlp(d / "mlp.onnx", 5, width=16)
    bundle = models.compile_with_exits(src, ["h1", "h3"], d / "mlp.eebundle", n_classes=10, opset=17,
                                       shapes={"h1": ["batch", 16], "h3": ["batch", 16]}, threshold=0.15)
    data = d / "in.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32))
    return bundle, data


def _check_report(js: dict[str, Any], n: int) -> None:
    for key in ("bundle", "data", "backend", "batch_size", "n_samples", "n_batches", "repeats", "latency_ms",
                "throughput", "exit_histogram", "references", "reference", "speedup", "notes"):
        assert key in js, key
    assert set(js["latency_ms"]) == {"p50", "p90", "p99"}
    assert js["latency_ms"]["p50"] <= js["latency_ms"]["p90"] <= js["latency_ms"]["p99"]
    assert sum(e["count"] for e in js["exit_histogram"]) == n == js["n_samples"]
    assert abs(sum(e["share"] for e in js["exit_histogram"]) - 1.0) < 1e-9
    names = {r["name"] for r in js["references"]}
    assert "gates-never" in names and js["reference"] in names
    for r in js["references"]:
        assert STATS <= set(r["speedup"]) and r["speedup"]["rounds"] == js["repeats"]
        assert r["speedup"]["min"] <= r["speedup"]["median"] <= r["speedup"]["max"]


def test_bench_bundle_times_the_unsplit_model_it_is_given(mlp_bundle: tuple[Path, Path]) -> None:
    bundle, data = mlp_bundle
    # mlp.onnx sits beside the bundle, as the manifest says; a model outside the bundle is used only when passed.
    assert bench_bundle(bundle, data, batch_size=8, repeats=1, threads=1).to_json()["reference"] == "gates-never"
    report = bench_bundle(bundle, data, batch_size=8, repeats=3, threads=1,
                          reference_model=bundle.parent / "mlp.onnx")
    assert isinstance(report, BenchReport)
    js = report.to_json()
    _check_report(js, 40)
    assert js["reference"] == "unsplit-model"
    assert js["n_batches"] == 5
    report.print()


def test_bench_cli_json(mlp_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, data = mlp_bundle
    moved = tmp_path / "b.eebundle"  # away from its source model: only the gates-never reference is left
    import shutil

    shutil.copytree(bundle, moved)
    res = CliRunner().invoke(cli, ["bench", str(moved), "--data", str(data), "--batch", "4", "--repeats", "2",
                                   "--json"])
    assert res.exit_code == 0, res.output
    js = json.loads(res.output)
    _check_report(js, 40)
    assert js["reference"] == "gates-never" and any("unsplit model not timed" in n for n in js["notes"])


# ------------------------------------------------------------------------------------------- the suite


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], list[Path]]:
    pytest.importorskip("torch")
    from benchmarks.__main__ import run

    out = tmp_path_factory.mktemp("results")
    return run(quick=True, out=out, cache=tmp_path_factory.mktemp("cache"), quiet=True)


def test_quick_suite_writes_every_figure(quick: tuple[dict[str, Any], list[Path]]) -> None:
    results, files = quick
    assert results["errors"] == {}
    assert set(results["figures"]) == {"overhead", "speedup", "compaction", "compile", "hop", "papers",
                                           "auto", "fixed"}
    names = {f.name for f in files}
    assert {"results-quick.json", "results-quick.md"} <= names
    on_disk = json.loads(next(f for f in files if f.suffix == ".json").read_text())
    assert on_disk["figures"].keys() == results["figures"].keys()
    assert {"mode", "date", "threads", "onnxruntime", "cpu", "ort_target"} <= set(results["meta"])


def test_quick_suite_fields(quick: tuple[dict[str, Any], list[Path]]) -> None:
    f = quick[0]["figures"]
    rows = f["overhead"]["rows"]
    assert {(r["model"].split("-")[0], r["batch"]) for r in rows} == {("resnet", 1), ("resnet", 32), ("bert", 1),
                                                                       ("bert", 32)}
    for r in rows:
        assert STATS <= set(r["ratio"]) and STATS <= set(r["cpu_ratio"]) and isinstance(r["holds"], bool)
        # The ratio is per round: it lies within the per-round extremes, not a ratio of medians.
        assert r["ratio"]["min"] <= r["ratio"]["median"] <= r["ratio"]["max"]

    c = f["compaction"]
    assert c["exit_counts"][0] == c["batch"] // 2 and sum(c["exit_counts"]) == c["batch"]
    assert c["exit_counts"][-1] == c["batch"] // 2  # the hard half runs to the end
    for key in ("compact_vs_wait_all", "compact_vs_unsplit", "wait_all_vs_unsplit"):
        assert STATS <= set(c[key])
    assert set(c["throughput"]) == {"unsplit", "compact", "wait-all"}

    comp = f["compile"]
    assert STATS <= set(comp["seconds"]) and comp["peak_rss_mb"] > 0
    assert [r["exits"] for r in comp["by_exits"]] == [1, 2, 4]
    assert len(comp["by_size"]) == 2 and all(r["parameters"] > 0 for r in comp["by_size"])

    h = f["hop"]
    assert STATS <= set(h["per_hop_us"]) and len(h["chain_us"]) == 3

    p = f["papers"]
    assert {(r["model"].split("-")[0], r["batch"]) for r in p["rows"]} == {("resnet", 1), ("resnet", 32),
                                                                            ("bert", 1), ("bert", 32)}
    for r in p["rows"]:
        assert STATS <= set(r["speedup"]) and r["speedup"]["min"] <= r["speedup"]["median"] <= r["speedup"]["max"]
        # Same thresholds, same exits: the shares follow the pool's profile and torch decides as eecompile does.
        assert len(r["exit_shares"]) == 5 and abs(sum(r["exit_shares"]) - 1) < 1e-9
        assert r["exits_agree"]["torch_if"] >= 0.9 and r["exits_agree"]["torch_wait_all"] >= 0.9
        assert r["final_max_abs_diff"] < 1e-3

    fx = f["fixed"]
    ti = fx["tiny"]
    assert STATS <= set(ti["runner_per_segment_us"]) and STATS <= set(ti["runner_per_call_us"])
    for k, chain in ti["chain_us"].items():  # ORT's own time is part of the call, measured inside it
        assert 0 < ti["ort_us"][k]["median"] < chain["median"]
    d = fx["digits"]
    if d["measured"]:
        assert d["max_abs_diff_no_exit_vs_segments"] < 1e-4 and STATS <= set(d["vs_unsplit"]["never"])
    else:
        assert d["reason"]

    s = f["speedup"]
    if s["measured"]:
        for key in ("speedup", "oracle_speedup", "drop", "exit_share", "oracle_share"):
            assert key in s
    else:
        assert s["reason"]


def test_markdown_lists_every_figure(quick: tuple[dict[str, Any], list[Path]]) -> None:
    from benchmarks.report import markdown

    md = markdown(quick[0])
    for title in ("Overhead", "Speedup", "Compaction", "Compile", "Segment hop cost", "papers' way",
                  "Runner fixed cost"):
        assert title in md
