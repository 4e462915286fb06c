"""Loops and jump exits: ``python -m benchmarks.loops [--repeats 15] [--json PATH]``.

The models are the tests' (``tests/loops/models.py``: a DDIM sampler around a small conv denoiser with a layer exit
inside each step; a three-layer encoder and two-layer decoder with MuE's jump exits). Reported as ratios of medians
over interleaved rounds in the same run of the process's CPU time (ONNX Runtime CPU, one thread: on a shared
machine wall time measures the other processes too):

* loop driver overhead: ``LoopRunner`` on the loop without the layer exit (the chain is the unsplit denoiser), every
  gate off (20 steps for every sample) / the same 20 steps written by hand in Python on the unsplit denoiser and
  update (two plain sessions), batch 1 and 16; and the same with the layer exit (two segments, gate off);
* per-sample stopping: the loop gate at the median of the step-6 scores, ``compact`` / the gate off, ``wait-all``
  / the gate off, with the mean steps run;
* jump exits: thresholds at the 60% quantile of each gate's score, ``compact`` and ``wait-all`` / every gate off.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def _median_times(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    for f in fns.values():  # warm-up
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):  # interleaved: load changes hit every configuration alike
        for k, f in fns.items():
            t0 = time.process_time()  # CPU time: one thread, so other processes' load does not count
            f()
            times[k].append(time.process_time() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def loops(work: Path, repeats: int) -> dict[str, Any]:
    import onnxruntime as ort
    import yaml

    import eecompile
    from eecompile.runtimes.loop import LoopRunner
    from tests.loops.models import export_ddim_step, export_denoiser
    from tests.loops.test_denoiser_loop import START, loop_spec

    den, step = export_denoiser(work / "denoiser.onnx"), export_ddim_step(work / "ddim.onnx")
    spec = loop_spec(work, den, step, steps=20)
    runner = LoopRunner(eecompile.compile_model(spec, work / "ddim.eebundle", force=True), threads=1)
    # Without the layer exit the chain is the one unsplit denoiser: the same ONNX Runtime calls as the hand loop.
    plain = LoopRunner(eecompile.compile_model(loop_spec(work, den, step, steps=20, exits=False, name="plain.yaml"),
                                               work / "plain.eebundle", force=True), threads=1)
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    d_s = ort.InferenceSession(str(den), so, providers=["CPUExecutionProvider"])
    u_s = ort.InferenceSession(str(step), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"spec": yaml.safe_load(spec.read_text())["loop"]}
    off = {"thresholds": "never", "loop_threshold": "never"}
    for b in (1, 16):
        x = (rng.standard_normal((b, 3, 8, 8)) * np.linspace(0.3, 3.0, b)[:, None, None, None]).astype(np.float32)

        def by_hand(x: np.ndarray = x) -> np.ndarray:
            n = len(x)
            for i in range(20):
                t = np.full(n, START * (1 - i / 20), np.float32)
                t_next = np.full(n, START * (1 - (i + 1) / 20), np.float32)
                eps = d_s.run(["eps"], {"x": x, "t": t})[0]
                x, _ = u_s.run(None, {"x": x, "eps": eps, "t": t, "t_next": t_next})
            return x

        t = _median_times({"hand": by_hand, "runner": lambda x=x: plain.run({"x": x}, **off),
                           "with_exit": lambda x=x: runner.run({"x": x}, **off)}, repeats)
        out[f"driver_overhead_b{b}"] = t["runner"] / t["hand"]
        out[f"with_layer_exit_b{b}"] = t["with_exit"] / t["hand"]
        out[f"hand_ms_b{b}"] = 1e3 * t["hand"]
    x = (rng.standard_normal((16, 3, 8, 8)) * np.linspace(0.3, 3.0, 16)[:, None, None, None]).astype(np.float32)
    scores = runner.run({"x": x}, thresholds="never", policy="never").gate_scores
    thr = float(np.median(scores[5]))
    kw = {"thresholds": "never", "loop_threshold": thr}
    res = runner.run({"x": x}, **kw)
    t = _median_times({"off": lambda: runner.run({"x": x}, thresholds="never", loop_threshold="never"),
                       "compact": lambda: runner.run({"x": x}, **kw),
                       "wait-all": lambda: runner.run({"x": x}, policy="wait-all", **kw)}, repeats)
    out["stopping"] = {"loop_threshold": thr, "mean_steps": float(res.steps.mean()), "of_steps": 20,
                       "compact_vs_off": t["compact"] / t["off"], "wait_all_vs_off": t["wait-all"] / t["off"],
                       "step_fraction": float(res.steps.mean()) / 20}
    return out


def jumps(work: Path, repeats: int) -> dict[str, Any]:
    import eecompile
    from eecompile.runtimes.jumps import JumpRunner
    from tests.loops.models import SEQ, VOCAB, export_encoder_decoder
    from tests.loops.test_jumps import _mixed, mue_spec

    model, _, names = export_encoder_decoder(work / "encdec.onnx")
    runner = JumpRunner(eecompile.compile_model(mue_spec(work, model, names, name="mue.yaml"), work / "mue.eebundle",
                                                force=True), threads=1)
    rng = np.random.default_rng(0)
    feeds = {"src": rng.integers(0, VOCAB, (32, SEQ)).astype(np.int64),
             "tgt": rng.integers(0, VOCAB, (32, 6)).astype(np.int64)}
    thr = _mixed(runner, feeds)
    res = runner.run(feeds, thresholds=thr)
    t = _median_times({"off": lambda: runner.run(feeds, thresholds="never"),
                       "compact": lambda: runner.run(feeds, thresholds=thr),
                       "wait-all": lambda: runner.run(feeds, thresholds=thr, policy="wait-all")}, repeats)
    return {"thresholds": thr, "jumped": {str(k): int((res.jumped == k).sum()) for k in (-1, 0, 1)},
            "decoder_exit": int((res.exit_index == 3).sum()), "batch_sizes": res.batch_sizes[0],
            "compact_vs_off": t["compact"] / t["off"], "wait_all_vs_off": t["wait-all"] / t["off"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        result = {"load_average": os.getloadavg()[0], "loops": loops(Path(tmp), args.repeats),
                  "jumps": jumps(Path(tmp), args.repeats)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
