"""``python -m benchmarks [--quick] [--only NAME ...] [--out DIR] [--cache DIR]``: the figures of README.md.

Full mode (the real figures, under ~10 minutes on 2 cores once the models are cached) writes
``benchmarks/results/results.{json,md}`` and PNG plots; ``--quick`` (tiny models, a few seconds, for the tests)
writes ``results-quick.*``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _target() -> str:
    """ORT major.minor and this CPU's NCHWc block (``ort1.32-nchwc16``): what ORT CPU engines are built for."""
    from eecompile.runtimes.onnxruntime import cpu_target

    return cpu_target()


def run(quick: bool, only: list[str] | None = None, out: Path | None = None, cache: Path | None = None,
        threads: int | None = None, quiet: bool = False) -> tuple[dict[str, Any], list[Path]]:
    """Run the figures (all, or ``only``); write and return the results and the files written."""
    import onnxruntime as ort

    from benchmarks import report
    from benchmarks.suite import FIGURES, Context
    from eecompile.runtimes.onnxruntime import default_threads

    names = only or list(FIGURES)
    unknown = set(names) - set(FIGURES)
    if unknown:
        raise SystemExit(f"unknown figure(s) {sorted(unknown)}; choose from {', '.join(FIGURES)}")
    cache = cache or Path(tempfile.gettempdir()) / ("eecompile-bench-quick" if quick else "eecompile-bench")
    cache.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def say(msg: str) -> None:
        if not quiet:
            print(f"[{time.perf_counter() - t_start:6.1f} s] {msg}", file=sys.stderr, flush=True)

    ctx = Context(quick=quick, cache=cache, threads=threads or default_threads(), say=say)
    results: dict[str, Any] = {
        "meta": {"mode": "quick" if quick else "full", "date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "threads": ctx.threads, "onnxruntime": ort.__version__, "cpu": _cpu(), "ort_target": _target(),
                 "python": platform.python_version(), "cache": str(cache)},
        "figures": {}, "errors": {}, "seconds": {},
    }
    for name in names:
        t0 = time.perf_counter()
        try:
            results["figures"][name] = FIGURES[name](ctx)
        except Exception as e:  # noqa: BLE001 - one broken figure must not lose the others
            say(f"{name} failed: {e}")
            results["errors"][name] = f"{type(e).__name__}: {e}"
            if not quiet:
                traceback.print_exc()
        results["seconds"][name] = time.perf_counter() - t0
    stem = "results-quick" if quick else "results"
    out = out or HERE / "results"
    previous = out / f"{stem}.json"
    if only and previous.is_file():
        # A partial run updates its figures and keeps the others (each figure carries its own numbers).
        old = json.loads(previous.read_text())
        for key in ("figures", "errors", "seconds"):
            results[key] = {**{k: v for k, v in old.get(key, {}).items() if k not in names}, **results[key]}
    files = report.write(results, out, stem)
    say(f"wrote {', '.join(str(f) for f in files)}")
    return results, files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, a few seconds (what the tests run)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="overhead, speedup, compaction, compile, hop, papers, auto, fixed")
    ap.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    ap.add_argument("--cache", type=Path, default=None, help="where models and bundles are built (reused)")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results, _ = run(args.quick, args.only, args.out, args.cache, args.threads)
    from benchmarks.report import markdown

    print(markdown(results))
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
