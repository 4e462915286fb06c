"""The runner's fixed cost (issue 15, item 2), measured two ways in one figure (``--only fixed``).

1. **Tiny model** (13-layer MLP, 64 wide, batch 1; 2 to 13 segments, gates run and are read, none fires; ONNX
   Runtime on one thread, so that everything runs on the calling thread): per call, the CPU time of the call
   and, inside it, the CPU time spent in ONNX Runtime's compiled ``run`` of each segment (ORT's own time). What
   is left is the runner's Python work: its slope over the segment count is the cost per segment, its intercept
   the cost per call. CPU time (``time.thread_time``), not wall time, is the headline: on a shared machine the
   wall time of a 20 us call mostly measures the neighbours. Wall-time figures are reported beside it, and the
   unsplit model is timed in the same rounds (the older "hop" figure: chain minus unsplit per segment).
2. **Digits demo model** (``examples/digits/out``, written by ``make demo``; ORT CPU engines built for this
   machine into a private copy), batch 1, every gate ``"never"``: the runner (which takes its no-exit path: one
   ORT graph of the chain without heads and gates) against the unsplit model, paired round by round; next to it
   the same call made to run the segments (``no_exit_path=False``), with gates skipped (``"never"``) and with
   gates read (``+inf``), and the portable segments.

Every figure is a median over rounds with the min-max spread; the load average before and after is recorded.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from eecompile.benchmark import block_calls, paired_blocks, ratio_stats, reference_session, summary

NEVER_FIRES = math.inf


def _load() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def _ort_clock(runner: Any) -> list[int]:
    """Wrap the backend's compiled per-segment ``run`` functions so that the nanoseconds spent inside them add up
    in the returned one-element list (ONNX Runtime's own time; two clock reads per segment are charged to it)."""
    acc = [0]
    be = runner.backend
    clock = time.thread_time_ns  # ORT on one thread runs on this one: its CPU time is ORT's own
    for k, fn in enumerate(be._run_fns):  # noqa: SLF001 - the benchmark measures inside the backend on purpose

        def timed(*a: Any, _f: Callable[..., Any] = fn) -> Any:
            t0 = clock()
            try:
                return _f(*a)
            finally:
                acc[0] += clock() - t0

        be._run_fns[k] = timed  # noqa: SLF001
    return acc


def _tiny(ctx: Any) -> dict[str, Any]:
    from benchmarks.suite import MLP_LAYERS, mlp_chains

    sess, x, exit_counts, runners = mlp_chains(ctx, threads=1)
    fns: dict[str, Callable[[], object]] = {"unsplit": lambda: sess.run(None, x)}
    clocks: dict[str, list[int]] = {}
    inside: dict[str, list[float]] = {}
    for n, r in zip(exit_counts, runners, strict=True):
        key = f"{n + 1} segments"
        clocks[key] = _ort_clock(r)
        thr = [NEVER_FIRES] * n  # a list, as a user passes it: parsed once, then a cache hit

        def call(r: Any = r, thr: list[float] = thr) -> None:
            r.run(x, thresholds=thr)

        fns[key] = call
    calls = block_calls(fns["unsplit"], ctx.block_s(0.1))
    # ORT time per call per round: read the accumulators around each block (paired_blocks times the blocks).
    names = [f"{n + 1} segments" for n in exit_counts]
    wrapped: dict[str, Callable[[], object]] = {"unsplit": fns["unsplit"]}
    state = {k: {"calls": 0, "start": 0} for k in names}

    for k in names:
        def counted(k: str = k) -> None:
            st = state[k]
            if st["calls"] == 0:
                st["start"] = clocks[k][0]
            fns[k]()
            st["calls"] += 1
            if st["calls"] == calls:
                inside.setdefault(k, []).append((clocks[k][0] - st["start"]) / calls / 1e9)
                st["calls"] = 0
        wrapped[k] = counted
    t = paired_blocks(wrapped, calls=calls, rounds=ctx.rounds(15), warmup=calls)
    for r in runners:
        r.close()
    rounds = len(t["unsplit"].wall)
    segs = np.array([n + 1 for n in exit_counts], dtype=float)
    # The warm-up block is not a round: keep the last `rounds` ORT readings of each.
    ort_s = {k: v[-rounds:] for k, v in inside.items()}
    per_seg, per_call, hop, hop_icpt = [], [], [], []
    for rnd in range(rounds):
        # paired_blocks' CPU time is the process's: with ORT on one thread, that is this thread's.
        outside = np.array([t[k].cpu[rnd] - ort_s[k][rnd] for k in names])
        slope, icpt = np.polyfit(segs, outside, 1)
        per_seg.append(float(slope))
        per_call.append(float(icpt))
        extra = np.array([t[k].cpu[rnd] - t["unsplit"].cpu[rnd] for k in names])
        s2, i2 = np.polyfit(segs, extra, 1)
        hop.append(float(s2))
        hop_icpt.append(float(i2))
    return {
        "model": f"MLP {MLP_LAYERS} x (MatMul 64x64 + Relu)", "batch": 1, "calls_per_block": calls,
        "rounds": rounds,
        "thresholds": "+inf (gates run and are read, none fires), passed as a list each call", "threads": 1,
        "clock": "CPU time of the calling thread (ORT on one thread)",
        "unsplit_us": summary(t["unsplit"].cpu, 1e6), "unsplit_wall_us": summary(t["unsplit"].wall, 1e6),
        "chain_us": {k: summary(t[k].cpu, 1e6) for k in names},
        "chain_wall_us": {k: summary(t[k].wall, 1e6) for k in names},
        "ort_us": {k: summary(ort_s[k], 1e6) for k in names},
        "outside_ort_us": {k: summary([a - b for a, b in zip(t[k].cpu, ort_s[k], strict=True)], 1e6)
                           for k in names},
        "runner_per_segment_us": summary(per_seg, 1e6), "runner_per_call_us": summary(per_call, 1e6),
        "hop_vs_unsplit_us": summary(hop, 1e6), "hop_intercept_us": summary(hop_icpt, 1e6),
        "targets_us": {"per_segment": 20.0, "per_call": 50.0},
        "holds": statistics.median(per_seg) * 1e6 <= 20.0 and statistics.median(per_call) * 1e6 <= 50.0,
    }


def _digits(ctx: Any) -> dict[str, Any]:
    from benchmarks.suite import DIGITS_OUT, _runner, digits_copy, each_row
    from eecompile.build import build_engines

    local = digits_copy(ctx, "digits-fixed")
    if local is None:
        return {"measured": False, "reason": f"no digits demo output in {DIGITS_OUT}; run `make demo` first"}
    build_engines(local / "digits.eebundle", "onnxruntime")
    with np.load(local / "test.npz") as z:
        x = z["input"][: 16 if ctx.quick else 64]
    rows = [np.ascontiguousarray(x[i:i + 1]) for i in range(len(x))]
    b = local / "digits.eebundle"
    auto = _runner(b, ctx.threads, engines=True, no_exit_path=True)
    if not auto.backend.has_no_exit:
        raise RuntimeError(f"{b}: the ORT engines built here have no no-exit engine")
    eng = _runner(b, ctx.threads, engines=True)
    port = _runner(b, ctx.threads)
    sess = reference_session(local / "digits.onnx", ctx.threads)
    out_name = sess.get_outputs()[0].name
    e = auto.manifest.n_early_exits
    got = np.concatenate([auto.run({"input": r}, thresholds="never").outputs[out_name] for r in rows])
    want = np.concatenate([port.run({"input": r}, thresholds="never").outputs[out_name] for r in rows])
    assert auto.run({"input": rows[0]}, thresholds="never").path == "no-exit"
    inf = [NEVER_FIRES] * e

    per_sample = functools.partial(each_row, rows)
    fns: dict[str, Callable[[], object]] = {
        "unsplit": per_sample(lambda r: sess.run([out_name], {"input": r})),
        "never": per_sample(lambda r: auto.run({"input": r}, thresholds="never")),
        "never, segments (engines)": per_sample(lambda r: eng.run({"input": r}, thresholds="never")),
        "+inf, segments (engines)": per_sample(lambda r: eng.run({"input": r}, thresholds=inf)),
        "never, portable segments": per_sample(lambda r: port.run({"input": r}, thresholds="never")),
    }
    t = paired_blocks(fns, calls=1, rounds=ctx.rounds(21), warmup=2)
    for r in (auto, eng, port):
        r.close()
    n = len(rows)
    return {
        "measured": True, "samples": n, "batch": 1, "rounds": len(t["unsplit"].wall),
        "max_abs_diff_no_exit_vs_segments": float(np.abs(got - want).max()),
        "us_per_sample": {k: summary([v / n for v in b_.wall], 1e6) for k, b_ in t.items()},
        "vs_unsplit": {k: ratio_stats(t[k].wall, t["unsplit"].wall) for k in fns if k != "unsplit"},
        "cpu_vs_unsplit": {k: ratio_stats(t[k].cpu, t["unsplit"].cpu) for k in fns if k != "unsplit"},
        "target": 1.10,
        "holds": ratio_stats(t["never"].wall, t["unsplit"].wall)["median"] <= 1.10,
    }


def fixed_cost(ctx: Any) -> dict[str, Any]:
    """The runner's cost per call and per segment beyond ONNX Runtime's own time (tiny model), and the never-exit
    ratio on the digits demo model (targets: <= 20 us per segment, <= 50 us per call, <= 1.10x)."""
    load0 = _load()
    ctx.say("fixed: tiny MLP, runner time outside ONNX Runtime")
    tiny = _tiny(ctx)
    ctx.say("fixed: digits demo model, every gate never, batch 1")
    digits = _digits(ctx)
    return {"tiny": tiny, "digits": digits, "load_average": {"before": load0, "after": _load()}}
