"""Calibrated loop gates: ``python -m benchmarks.loop_calibration [--repeats 10] [--json PATH]``.

The tests' loops (``tests/loops/models.py``): the 20-step DDIM sampler around the small conv denoiser (a layer exit
inside each step; float result, error budget in relative L2) and Prophet's early commit in the masked diffusion LM
(5 steps, a staged threshold; integer result). Each is calibrated (``eecompile calibrate``, ``--method search``,
95% confidence) on one half of its samples; on the other half it reports the share of samples off the all-steps
result, the mean steps taken, and ``eecompile bench``'s measured speedup against all N steps (``gates-never``:
per-round paired ratios of wall time, ONNX Runtime CPU, one thread) next to calibration's expected one.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def _held_out(runner: Any, feeds: dict[str, np.ndarray], name: str, error_budget: float | None) -> float:
    got, full = runner.run(feeds), runner.run(feeds, loop_threshold="never")
    a, b = got.outputs[name], full.outputs[name]
    if error_budget is None:
        return float((a != b).reshape(len(a), -1).any(axis=1).mean())
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    rel = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-12)
    return float((rel > error_budget).mean())


def calibrated(work: Path, repeats: int) -> dict[str, Any]:
    import eecompile
    from eecompile.benchmark import bench_bundle
    from eecompile.calibrate import calibrate_bundle
    from eecompile.runtimes.loop import LoopRunner
    from tests.loops.models import (
        MASK,
        SEQ,
        VOCAB,
        export_ddim_step,
        export_denoiser,
        export_masked_lm,
        export_unmask_step,
    )
    from tests.loops.test_denoiser_loop import loop_spec
    from tests.loops.test_prophet_loop import prophet_spec

    rng = np.random.default_rng(0)
    n = 160
    x = (rng.standard_normal((n, 3, 8, 8)) * rng.uniform(0.3, 3.0, n)[:, None, None, None]).astype(np.float32)
    tokens = rng.integers(1, VOCAB, size=(n, SEQ)).astype(np.int64)
    tokens[:, 2:] = MASK
    den, ddim = export_denoiser(work / "denoiser.onnx"), export_ddim_step(work / "ddim.onnx")
    lm, unmask = export_masked_lm(work / "mlm.onnx"), export_unmask_step(work / "unmask.onnx")
    cases = {
        "ddim_sampler": (loop_spec(work, den, ddim, name="ddim.yaml"), "x", x, "x0",
                         {"error_budget": 0.02, "max_drop": 0.1}),
        "prophet_staged": (prophet_spec(work, lm, unmask, name="prophet.yaml", threshold=[6.0, 4.0, 2.0]), "tokens",
                           tokens, "committed", {"max_drop": 0.1}),
    }
    out: dict[str, Any] = {}
    for name, (spec, inp, data, result, budget) in cases.items():
        bundle = eecompile.compile_model(spec, work / f"{name}.eebundle", force=True).path
        np.savez(work / f"{name}_cal.npz", **{inp: data[: n // 2]})
        np.savez(work / f"{name}_test.npz", **{inp: data[n // 2:]})
        report = calibrate_bundle(bundle, work / f"{name}_cal.npz", threads=1, quiet=True, **budget)
        runner = LoopRunner(bundle, threads=1)
        test = {inp: data[n // 2:]}
        bench = bench_bundle(bundle, work / f"{name}_test.npz", batch_size=1, repeats=repeats, threads=1,
                             max_batches=32)
        out[name] = {"budget": budget, "deployed": report.deployed, "loop_threshold": report.loop_threshold,
                     "steps": report.steps, "calibration_mean_steps": report.mean_steps,
                     "expected_speedup": report.expected_speedup,
                     "held_out_share_off": _held_out(runner, test, result, budget.get("error_budget")),
                     "held_out_mean_steps": float(runner.run(test).steps.mean()),
                     "bench_mean_steps": bench.loop["mean_steps"] if bench.loop else None,
                     "bench_speedup_vs_all_steps": bench.speedup}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        result = {"load_average": os.getloadavg()[0], "calibrated": calibrated(Path(tmp), args.repeats)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
