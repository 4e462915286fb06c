"""The five figures of benchmarks/README.md. Each returns a JSON-ready dict.

Every time is a median over rounds of warmed-up blocks, every comparison a per-round ratio of functions timed
in the same rounds (``eecompile.benchmark.paired_blocks``), reported as median with min-max spread.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import models
from eecompile.benchmark import block_calls, paired_blocks, ratio_stats, reference_session, summary

ROOT = Path(__file__).resolve().parent.parent
DIGITS_OUT = ROOT / "examples" / "digits" / "out"
NEVER_FIRES = math.inf  # a threshold no sample reaches (+inf): every gate runs and is read, none fires


@dataclass
class Context:
    quick: bool
    cache: Path
    threads: int
    say: Callable[[str], None]

    def rounds(self, full: int) -> int:
        return 3 if self.quick else full

    def block_s(self, full: float) -> float:
        return 0.02 if self.quick else full


def _runner(bundle: Path, threads: int, engines: bool = False, no_exit_path: bool = False) -> Any:
    """The chain on ORT CPU: the portable segments, or (``engines=True``) the bundle's ORT CPU engines. The
    segments always run (``no_exit_path=False``) unless asked: the figures measure the chain with its gates."""
    from eecompile.runtimes.chain import EarlyExitRunner

    runner = EarlyExitRunner(bundle, threads=threads, engines=engines, no_exit_path=no_exit_path)
    if engines and getattr(runner.backend, "engine_target", None) is None:
        raise RuntimeError(f"{bundle}: no ONNX Runtime engines for this machine were loaded")
    return runner


def _ort_engines(bundle: Path, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Build the bundle's ORT CPU engines for this machine unless it has them; return their rewrite summaries."""
    from eecompile.build import build_engines
    from eecompile.bundle import Bundle
    from eecompile.runtimes.onnxruntime import cpu_target
    from eecompile.runtimes.records import engine_records

    target = cpu_target()
    recs = engine_records(Bundle.load(bundle).manifest, "onnxruntime", target)
    if not recs:
        say(f"overhead: building ORT engines ({target}) for {bundle.name}")
        recs = build_engines(bundle, "onnxruntime").records
    seen: dict[str, dict[str, Any]] = {}
    for r in recs:
        for c in r.flags.get("rewritten", []):
            seen[c["tensor"]] = c
    return list(seen.values())


def _times(b: Any) -> dict[str, float]:
    return summary(b.wall)


# ------------------------------------------------------------------------------------------- overhead


def overhead(ctx: Context) -> dict[str, Any]:
    """The chain with no gate firing vs the unsplit model, ORT CPU, batch 1 and 32 (target <= 1.02)."""
    if ctx.quick:
        loads = [models.quick_resnet(ctx.cache), models.bert(ctx.cache, quick=True)]
    else:
        # The second ResNet-50 row cuts only at stage boundaries (no residual Sum reads a segment input), which
        # keeps ORT's NCHWc Conv+Sum+Relu fusion intact: the graph choice that removes most of the overhead.
        zoo = models.ZOO / "light_resnet50.onnx"
        loads = [models.resnet50(ctx.cache),
                 models.resnet50(ctx.cache, cuts=models.conv_only_cuts(zoo), tag="-stage-cuts"),
                 models.bert(ctx.cache)]
    rows = []
    engines_info: dict[str, Any] = {}
    for w in loads:
        # ResNets also run on ORT CPU engines (eecompile build --backend onnxruntime: ORT's optimised graphs with
        # NCHWc tensors carried across the cuts), paired in the same rounds as the portable chain.
        with_engines = "resnet" in w.name
        if with_engines:
            engines_info[w.name] = _ort_engines(w.bundle, ctx.say)
        runner = _runner(w.bundle, ctx.threads)
        eng = _runner(w.bundle, ctx.threads, engines=True) if with_engines else None
        sess = reference_session(w.reference, ctx.threads)
        n_early = runner.manifest.n_early_exits
        for batch in (1, 32):
            ctx.say(f"overhead: {w.name} batch {batch}")
            x = w.make_inputs(batch, 0)
            thr = [NEVER_FIRES] * n_early
            fns: dict[str, Callable[[], object]] = {
                "unsplit": functools.partial(sess.run, None, x),
                "chain": functools.partial(runner.run, x, thresholds=thr),
            }
            if eng is not None:
                fns["engines"] = functools.partial(eng.run, x, thresholds=thr)
            calls = block_calls(fns["unsplit"], ctx.block_s(0.4 if batch == 1 else 0.0))
            big = batch > 1 and not ctx.quick
            rounds = ctx.rounds((3 if "bert" in w.name else 5) if big else 10)
            t = paired_blocks(fns, calls=calls, rounds=rounds, warmup=1 if big else 3)
            for key, label in (("chain", w.name), ("engines", f"{w.name} + ORT engines")):
                if key not in t:
                    continue
                ratio = ratio_stats(t[key].wall, t["unsplit"].wall)
                row = {"model": label, "batch": batch, "exits": n_early, "calls_per_block": calls,
                       "unsplit_ms": _times(t["unsplit"]), "chain_ms": _times(t[key]), "ratio": ratio,
                       "cpu_ratio": ratio_stats(t[key].cpu, t["unsplit"].cpu),
                       "target": 1.02, "holds": ratio["median"] <= 1.02}
                if key == "engines":
                    row["engines"] = True
                    row["vs_portable"] = ratio_stats(t["engines"].wall, t["chain"].wall)
                    row["cpu_vs_portable"] = ratio_stats(t["engines"].cpu, t["chain"].cpu)
                rows.append(row)
        runner.close()
        if eng is not None:
            eng.close()
    return {"rows": rows, "thresholds": f"max_prob {NEVER_FIRES} (gates run and are read, none fires)",
            "ort_engines": {"target": _cpu_target(), "carried": engines_info}}


def _cpu_target() -> str:
    from eecompile.runtimes.onnxruntime import cpu_target

    return cpu_target()


# ------------------------------------------------------------------------------------------- speedup


def digits_copy(ctx: Context, name: str) -> Path | None:
    """A private copy of the digits demo's output (bundle, source model, test split) in the cache, or None when
    ``make demo`` has not written it. The demo may rewrite its output while we run: figures time the copy."""
    bundle_dir, test, source = DIGITS_OUT / "digits.eebundle", DIGITS_OUT / "test.npz", DIGITS_OUT / "digits.onnx"
    if not (bundle_dir / "manifest.yaml").is_file() or not test.is_file() or not source.is_file():
        return None
    local = ctx.cache / name
    shutil.rmtree(local, ignore_errors=True)
    shutil.copytree(DIGITS_OUT, local, ignore=shutil.ignore_patterns("*.png", "train.npz", "cal.npz"))
    return local


def each_row(rows: list[np.ndarray], call: Callable[[np.ndarray], object]) -> Callable[[], object]:
    """A function that calls ``call`` on every row in turn (batch 1): one timed pass over a test set."""
    def one_pass() -> None:
        for r in rows:
            call(r)
    return one_pass


def speedup(ctx: Context) -> dict[str, Any]:
    """Digits demo at its calibrated thresholds (<= 1% drop), batch 1: measured vs oracle speedup."""
    import onnxruntime as ort  # noqa: F401 - imported here so a missing ORT fails loudly, not as "not measured"

    from eecompile.bundle import Bundle
    from eecompile.calibrate import collect_exit_table, oracle_exits

    local = digits_copy(ctx, "digits")
    if local is None:
        return {"measured": False, "reason": f"no digits demo output in {DIGITS_OUT}; run `make demo` first"}
    b = Bundle.load(local / "digits.eebundle")
    m = b.manifest
    cal = m.calibration or {}
    if not cal or cal.get("max_drop") is None:
        return {"measured": False, "reason": "the digits bundle is not calibrated; run `make demo` to the end first"}
    with np.load(local / "test.npz") as z:
        x, y = z["input"], z["labels"]
    if ctx.quick:
        x, y = x[:48], y[:48]
    runner = _runner(b.path, ctx.threads)
    sess = reference_session(local / "digits.onnx", ctx.threads)
    out_name = sess.get_outputs()[0].name
    e = m.n_early_exits
    ctx.say(f"speedup: digits, {len(y)} test samples, batch 1")
    rows = [x[i:i + 1] for i in range(len(x))]
    per_sample = functools.partial(each_row, rows)
    fns: dict[str, Callable[[], object]] = {
        "unsplit": per_sample(lambda r: sess.run([out_name], {"input": r})),
        "chain": per_sample(lambda r: runner.run({"input": r})),
    }
    for k in range(e + 1):  # leaving at exit k: earlier gates "never", gate k "always"
        forced: list[float | str] = ["never" if j < k else "always" for j in range(e)]
        fns[f"exit{k}"] = per_sample(functools.partial(_forced_call, runner, forced))
    t = paired_blocks(fns, calls=1, rounds=ctx.rounds(7), warmup=1)
    n = len(rows)
    table = collect_exit_table(b, {"input": x}, y, quiet=True)
    oracle = oracle_exits(table)
    res = runner.run({"input": x})
    acc_full = float((sess.run([out_name], {"input": x})[0].argmax(1) == y).mean())
    acc_chain = float((res.outputs[out_name].argmax(1) == y).mean())
    runner.close()
    oracle_round = [t["unsplit"].wall[r] / float(np.mean([t[f"exit{k}"].wall[r] for k in oracle]))
                    for r in range(len(t["unsplit"].wall))]
    return {
        "measured": True, "samples": n, "batch": 1, "thresholds": m.thresholds,
        "accuracy_unsplit": acc_full, "accuracy_chain": acc_chain, "drop": acc_full - acc_chain,
        "max_drop": cal.get("max_drop"),
        "exit_share": (res.exit_counts / n).tolist(),
        "oracle_share": (np.bincount(oracle, minlength=e + 1) / n).tolist(),
        "unsplit_us_per_sample": summary([v / n for v in t["unsplit"].wall], 1e6),
        "chain_us_per_sample": summary([v / n for v in t["chain"].wall], 1e6),
        "exit_us_per_sample": [summary([v / n for v in t[f"exit{k}"].wall], 1e6) for k in range(e + 1)],
        "speedup": ratio_stats(t["unsplit"].wall, t["chain"].wall),
        "oracle_speedup": {"median": statistics.median(oracle_round), "min": min(oracle_round),
                           "max": max(oracle_round), "rounds": len(oracle_round)},
        "calibration_estimate": cal.get("expected_speedup"),
    }


def _forced_call(runner: Any, thresholds: list[float | str], row: np.ndarray) -> object:
    return runner.run({"input": row}, thresholds=thresholds)


# ------------------------------------------------------------------------------------------- compaction


def compaction(ctx: Context) -> dict[str, Any]:
    """Batch 32, half the samples exit at the first exit, the rest at the final one: compact vs wait-all vs
    unsplit (target: compact >= 1.6x wait-all). The same policies also run on the bundle's ORT CPU engines
    (``eecompile build --backend onnxruntime``), timed in the same rounds."""
    w = models.quick_resnet(ctx.cache) if ctx.quick else models.torch_resnet50(ctx.cache)
    _ort_engines(w.bundle, ctx.say)
    runner = _runner(w.bundle, ctx.threads)
    eng = _runner(w.bundle, ctx.threads, engines=True)
    sess = reference_session(w.reference, ctx.threads)
    m = runner.manifest
    batch = 32
    x = w.make_inputs(batch, 1)
    # "Easy" = the half of the batch with the highest exit-0 gate score: exit 0's threshold sits between the
    # 16th and 17th score, later gates never fire (hard samples run to the end).
    scores = np.sort(runner.run(x, policy="never").gate_scores[0])
    thr0 = float((scores[batch // 2 - 1] + scores[batch // 2]) / 2)
    thresholds: list[float | str] = [thr0] + ["never"] * (m.n_early_exits - 1)
    counts = runner.run(x, thresholds=thresholds).exit_counts.tolist()
    if eng.run(x, thresholds=thresholds).exit_counts.tolist() != counts:
        raise RuntimeError(f"{w.bundle}: the ORT engines route the batch differently from the portable segments")
    ctx.say(f"compaction: {w.name} batch {batch}, exits {counts}")
    seg_ms: dict[str, list[np.ndarray]] = {}

    def policy_run(r: Any, key: str, policy: str) -> Callable[[], object]:
        def call() -> None:  # RunResult.timings: seconds per segment step (exit bookkeeping and gather included)
            seg_ms.setdefault(key, []).append(r.run(x, thresholds=thresholds, policy=policy).timings)
        return call

    fns: dict[str, Callable[[], object]] = {
        "unsplit": lambda: sess.run(None, x),
        "compact": policy_run(runner, "compact", "compact"),
        "wait-all": policy_run(runner, "wait-all", "wait-all"),
        "engines compact": policy_run(eng, "engines compact", "compact"),
        "engines wait-all": policy_run(eng, "engines wait-all", "wait-all"),
    }
    calls = block_calls(fns["unsplit"], ctx.block_s(0.0))
    seg_ms.clear()
    t = paired_blocks(fns, calls=calls, rounds=ctx.rounds(9), warmup=1)
    runner.close()
    eng.close()
    f0 = m.segments[0].flops_fraction
    ideal = 1.0 / (f0 + (1.0 - f0) * (batch - counts[0]) / batch) if f0 else None
    ratio = ratio_stats(t["wait-all"].wall, t["compact"].wall)
    return {
        "model": w.name, "batch": batch, "exit_counts": counts, "first_segment_flops_fraction": f0,
        "rounds": len(t["unsplit"].wall), "calls_per_block": calls,
        "ms": {k: _times(v) for k, v in t.items()},
        "segment_ms": {k: np.round(np.median(np.array(v[1:] or v), axis=0) * 1e3, 2).tolist() for k, v in seg_ms.items()},
        "throughput": {k: batch / statistics.median(t[k].wall) for k in ("unsplit", "compact", "wait-all")},
        "compact_vs_wait_all": ratio,
        "compact_vs_wait_all_cpu": ratio_stats(t["wait-all"].cpu, t["compact"].cpu),
        "compact_vs_unsplit": ratio_stats(t["unsplit"].wall, t["compact"].wall),
        "wait_all_vs_unsplit": ratio_stats(t["unsplit"].wall, t["wait-all"].wall),
        "engines": {
            "target": _cpu_target(),
            "throughput": {k: batch / statistics.median(t[f"engines {k}"].wall) for k in ("compact", "wait-all")},
            "compact_vs_wait_all": ratio_stats(t["engines wait-all"].wall, t["engines compact"].wall),
            "compact_vs_wait_all_cpu": ratio_stats(t["engines wait-all"].cpu, t["engines compact"].cpu),
            "compact_vs_unsplit": ratio_stats(t["unsplit"].wall, t["engines compact"].wall),
            "compact_vs_portable_compact": ratio_stats(t["compact"].wall, t["engines compact"].wall),
        },
        "ideal_compact_vs_wait_all": ideal, "target": 1.6, "holds": ratio["median"] >= 1.6,
    }


# ------------------------------------------------------------------------------------------- compile


def _compile_in_child(spec: Path, out: Path, verify: bool = True) -> dict[str, float]:
    """Compile in a fresh process: wall seconds and peak RSS (VmHWM, Linux) above the post-import baseline."""
    code = (
        "import json, sys, time\n"
        "import eecompile.compiler as c\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a child reports its parent's peak.
        "hwm = lambda: int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
        "base = hwm()\n"
        "t0 = time.perf_counter()\n"
        "c.compile_model(sys.argv[1], sys.argv[2], force=True, verify=sys.argv[3] == '1')\n"
        "dt = time.perf_counter() - t0\n"
        "print(json.dumps({'seconds': dt, 'peak_rss_mb': hwm() / 1024, 'base_rss_mb': base / 1024}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, str(spec), str(out), "1" if verify else "0"],
                          capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"compile of {spec} failed: {proc.stderr.strip().splitlines()[-1:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["delta_rss_mb"] = res["peak_rss_mb"] - res["base_rss_mb"]
    shutil.rmtree(out, ignore_errors=True)
    return res


def _spec_for(model: Path, cuts: list[str], work: Path, opset: int, final: dict[str, Any] | None) -> Path:
    import yaml

    work.mkdir(parents=True, exist_ok=True)
    shapes = models.tensor_shapes(model, cuts)
    exits = [{"at": c, "head": str(models.linear_head(work / f"head{k}.onnx", shapes[c], 1000, opset, seed=k)),
              "gate": {"kind": "max_prob", "threshold": 0.9}} for k, c in enumerate(cuts)]
    spec = {"model": str(model), "exits": exits, **({"final": final} if final else {})}
    (work / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return work / "spec.yaml"


def compile_cost(ctx: Context) -> dict[str, Any]:
    """Compile time and peak memory: ResNet-50 with 4 exits (target <= 5 s), then 1 -> 12 exits and model size."""
    if ctx.quick:
        base, opset, final = models.torch_resnet(ctx.cache, (1, 1, 2, 1), 8, 32, "resnet-quick"), 17, None
        cuts_all = models.block_outputs(base)[:-1]
        exit_counts = [1, 2, 4]
        headline_cuts = cuts_all[:4]
    else:
        base, opset, final = models.ZOO / "light_resnet50.onnx", 9, {"class_axis": 1}
        cuts_all = models.block_outputs(base)[:-1]
        exit_counts = [1, 2, 4, 8, 12]
        headline_cuts = list(models.RESNET50_EXITS)
    work = ctx.cache / "compile"
    ctx.say(f"compile: {base.name} with 4 exits")
    spec = _spec_for(base, headline_cuts, work / "headline", opset, final)
    runs = 1 if ctx.quick else 3
    head = [_compile_in_child(spec, work / "headline.eebundle") for _ in range(runs)]
    noverify = _compile_in_child(spec, work / "headline.eebundle", verify=False)
    sweep = []
    for n in exit_counts:
        idx = np.unique(np.linspace(0, len(cuts_all) - 1, n).round().astype(int))
        ctx.say(f"compile: {base.name} with {len(idx)} exits")
        spec = _spec_for(base, [cuts_all[i] for i in idx], work / f"exits{n}", opset, final)
        sweep.append({"exits": len(idx), **_compile_in_child(spec, work / f"exits{n}.eebundle")})
    sizes = []
    for name, model, params, cuts in models.resnet_family(ctx.cache, 4, quick=ctx.quick):
        ctx.say(f"compile: {name} ({params / 1e6:.1f} M parameters) with 4 exits")
        spec = _spec_for(model, cuts, work / name, 17, None)
        sizes.append({"model": name, "parameters": params, "onnx_mb": model.stat().st_size / 2**20,
                      **_compile_in_child(spec, work / f"{name}.eebundle")})
    secs = [h["seconds"] for h in head]
    return {
        "model": base.name, "exits": 4, "runs": runs,
        "seconds": {"median": statistics.median(secs), "min": min(secs), "max": max(secs)},
        "peak_rss_mb": statistics.median(h["peak_rss_mb"] for h in head),
        "delta_rss_mb": statistics.median(h["delta_rss_mb"] for h in head),
        "seconds_without_verify": noverify["seconds"],
        "target_seconds": 5.0, "holds": statistics.median(secs) <= 5.0,
        "by_exits": sweep, "by_size": sizes,
    }


# ------------------------------------------------------------------------------------------- hop


MLP_LAYERS = 13


def mlp_chains(ctx: Context, threads: int | None = None) -> tuple[Any, dict[str, np.ndarray], list[int], list[Any]]:
    """The tiny model of the fixed-cost figures: a 13-layer MLP (64 wide) and chains of it with 1..12 exits.
    Returns (unsplit session, a batch-1 input, exit counts, one runner per count; the segments always run).
    ``threads``: ONNX Runtime intra-op threads (default: the context's)."""
    threads = threads or ctx.threads
    src = models.mlp(ctx.cache / "mlp13.onnx", MLP_LAYERS)
    exit_counts = [1, 2, 4] if ctx.quick else [1, 2, 4, 8, 12]
    sess = reference_session(src, threads)
    x = {"x": np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)}
    runners = []
    for n in exit_counts:
        idx = np.unique(np.linspace(0, MLP_LAYERS - 2, n).round().astype(int))
        cuts = [f"h{i}" for i in idx]
        bundle = models.compile_with_exits(src, cuts, ctx.cache / f"mlp13-{n}x.eebundle", n_classes=10, opset=17,
                                           shapes={c: ["batch", 64] for c in cuts})
        runners.append(_runner(bundle, threads))
    return sess, x, exit_counts, runners


def hop_cost(ctx: Context) -> dict[str, Any]:
    """Fixed cost of one segment hop at batch 1 (session call, gate read, bookkeeping) on a tiny MLP: the slope
    of chain time over segment count, against the unsplit model timed in the same rounds."""
    sess, x, exit_counts, runners = mlp_chains(ctx)
    fns: dict[str, Callable[[], object]] = {"unsplit": lambda: sess.run(None, x)}
    for n, r in zip(exit_counts, runners, strict=True):
        fns[f"{n + 1} segments"] = functools.partial(r.run, x, thresholds=[NEVER_FIRES] * n)
    ctx.say(f"hop: tiny MLP, {exit_counts} exits")
    calls = block_calls(fns["unsplit"], ctx.block_s(0.1))
    t = paired_blocks(fns, calls=calls, rounds=ctx.rounds(9), warmup=50)
    for r in runners:
        r.close()
    segs = np.array([n + 1 for n in exit_counts], dtype=float)
    names = [f"{n + 1} segments" for n in exit_counts]
    slopes, intercepts = [], []
    for rnd in range(len(t["unsplit"].wall)):
        extra = np.array([t[k].wall[rnd] - t["unsplit"].wall[rnd] for k in names])
        slope, icpt = np.polyfit(segs, extra, 1)
        slopes.append(float(slope))
        intercepts.append(float(icpt))
    return {
        "model": f"MLP {MLP_LAYERS} x (MatMul 64x64 + Relu)", "batch": 1, "calls_per_block": calls,
        "unsplit_us": summary(t["unsplit"].wall, 1e6),
        "chain_us": {k: summary(t[k].wall, 1e6) for k in names},
        "per_hop_us": summary(slopes, 1e6), "fixed_us": summary(intercepts, 1e6),
    }


def _papers(ctx: Context) -> dict[str, Any]:
    from benchmarks.papers import papers

    return papers(ctx)


def _fixed(ctx: Context) -> dict[str, Any]:
    from benchmarks.fixed_cost import fixed_cost

    return fixed_cost(ctx)


def _auto(ctx: Context) -> dict[str, Any]:
    from benchmarks.auto_digits import auto_digits

    return auto_digits(ctx)


FIGURES: dict[str, Callable[[Context], dict[str, Any]]] = {
    "overhead": overhead, "speedup": speedup, "compaction": compaction, "compile": compile_cost, "hop": hop_cost,
    "papers": _papers, "auto": _auto, "fixed": _fixed,
}
