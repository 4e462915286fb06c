"""The device entry point: ``eecompile-device {run,bench,calibrate}`` (or ``python -m eecompile.device``).

argparse, no click, no rich: for a Jetson or a server with the runtime-only install (numpy, pyyaml, onnxruntime;
see docs/install.md). The same library calls as ``eecompile run``, ``eecompile bench`` and ``eecompile calibrate``
(:mod:`eecompile.runtimes` and :mod:`eecompile.calibrate`), printing plain text.

    eecompile-device run model.eebundle --data in.npz -o out.npz [--policy compact] [--thresholds 0.9,never]
    eecompile-device bench model.eebundle --data in.npz [--batch 1] [--repeats 20] [--json] [--steps N]
    eecompile-device calibrate model.eebundle --data cal.npz --max-drop 0.01 [--method search]
        [--steps N] [--stages 7.5,5,2.5]                      # loop bundles: the loop gate

Exit status: 0 on success, 1 with one line on stderr for a user error (an :class:`EECompileError`), 2 for bad
arguments (argparse).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from eecompile.errors import EECompileError
from eecompile.runtimes.base import BACKENDS, POLICIES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eecompile-device",
                                description="Run, time and calibrate an early-exit bundle (runtime-only install).")
    sub = p.add_subparsers(dest="command", required=True)

    def common(q: argparse.ArgumentParser, batch: int) -> None:
        q.add_argument("bundle", help="the .eebundle directory")
        q.add_argument("--data", required=True, help=".npz with one array per model input (and 'labels')")
        q.add_argument("--batch", type=int, default=batch, help=f"samples per call (default {batch})")
        q.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
        q.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")

    r = sub.add_parser("run", help="run the bundle on --data and write the outputs and each sample's exit")
    common(r, 32)
    r.add_argument("-o", "--output", required=True, help="output .npz")
    r.add_argument("--policy", choices=POLICIES, default="compact")
    r.add_argument("--thresholds", default=None, help="per early exit: a number, 'never' or 'always' (0.9,never); one value sets every exit")
    r.add_argument("--steps", type=int, default=None, help="loop bundles: the number of loop steps")
    r.add_argument("--loop-threshold", default=None, help="loop bundles: the loop gate's threshold (comma-separated: staged), 'never' or 'always'")

    b = sub.add_parser("bench", help="latency, throughput, exit histogram, speedup against the unsplit model")
    common(b, 1)
    b.add_argument("--repeats", type=int, default=20, help="timed rounds (default 20)")
    b.add_argument("--reference-model", default=None, help="the unsplit .onnx (default: beside the bundle)")
    b.add_argument("--json", action="store_true", help="print the report as JSON")
    b.add_argument("--steps", type=int, default=None, help="loop bundles: the number of loop steps to time")

    c = sub.add_parser("calibrate", help="choose thresholds for an accuracy budget from latencies measured here")
    common(c, 1)
    c.add_argument("--max-drop", type=float, required=True, help="accuracy budget, e.g. 0.01 for one point")
    c.add_argument("--method", choices=("search", "ltt"), default="search")
    c.add_argument("--delta", type=float, default=0.05, help="ltt: allowed probability of missing the budget")
    c.add_argument("--repeats", type=int, default=100, help="timed calls per exit (default 100)")
    c.add_argument("--reference-model", default=None, help="the unsplit .onnx (default: beside the bundle)")
    c.add_argument("--error-budget", type=float, default=None,
                   help="regression bundles: the relative L2 error to the final output a sample may have where it "
                        "exits (e.g. 0.05); --max-drop bounds the share of samples over it")
    c.add_argument("--steps", type=int, default=None,
                   help="loop bundles: the step count to calibrate the loop gate for (written as the bundle's default)")
    c.add_argument("--stages", default=None,
                   help="loop bundles: a staged profile (e.g. 7.5,5,2.5) whose scale is searched (default: the bundle's)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            from eecompile.runtimes.files import run_npz

            print(run_npz(args.bundle, args.data, args.output, policy=args.policy, thresholds=args.thresholds,
                          batch_size=args.batch, backend=args.backend, threads=args.threads, steps=args.steps,
                          loop_threshold=args.loop_threshold))
        elif args.command == "bench":
            from eecompile.runtimes.bench import bench_bundle

            report = bench_bundle(args.bundle, args.data, batch_size=args.batch, backend=args.backend,
                                  repeats=args.repeats, threads=args.threads, reference_model=args.reference_model,
                                  steps=args.steps)
            print(json.dumps(report.to_json(), indent=2) if args.json else "\n".join(report.lines()))
        else:
            from eecompile.calibrate import calibrate_bundle
            from eecompile.calibrate.loop import LoopCalibrationReport
            from eecompile.runtimes.loop import parse_stages

            cal = calibrate_bundle(args.bundle, args.data, max_drop=args.max_drop, method=args.method,
                                   delta=args.delta, backend=args.backend, batch_size=args.batch,
                                   repeats=args.repeats, threads=args.threads,
                                   reference_model=args.reference_model, quiet=True,
                                   error_budget=args.error_budget, steps=args.steps,
                                   stages=parse_stages(args.stages))
            if not cal.deployed:  # nothing met the budget: the bundle was left as it was
                print("\n".join(cal.summary_lines()), file=sys.stderr)
                return 1
            if isinstance(cal, LoopCalibrationReport):  # one loop threshold (its rows are steps, not exits)
                first, *rest = cal.summary_lines()  # notes included
                print("\n".join([f"{args.bundle}: {first}", *rest]))
                return 0
            thresholds = ", ".join(f"{e['threshold']:g}" for e in cal.exits if e.get("threshold") is not None)
            print(f"{args.bundle}: thresholds {thresholds}; accuracy drop {cal.drop:+.4f} (budget {cal.max_drop}); "
                  f"expected speedup {cal.expected_speedup:.2f}x against the {cal.baseline}")
            for note in cal.notes:
                print(f"note: {note}")
    except EECompileError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
