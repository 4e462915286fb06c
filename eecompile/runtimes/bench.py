"""Timing a bundle (``eecompile bench``, ``eecompile-device bench``): latency percentiles, throughput,
exit histogram and speedup against the unsplit model. Part of the runtime: numpy, onnxruntime and the bundle only.

Method (the machines we run on are shared and noisy, so no figure is a single timing):
  * every function is warmed up first, then timed in *blocks* of back-to-back calls (never alternating single
    calls: a sleeping thread pool or a cold cache would be charged to whichever call comes next);
  * the functions compared take turns, one block each per *round*, the order reversed every other round, so
    slow drift (a neighbour starting a job) hits all of them alike;
  * a ratio is computed per round from the blocks of that round (paired), then summarised as the median with
    the min-max spread over rounds.

The unsplit model is not in the bundle. Two references are timed side by side with the chain:
  * ``gates-never``: the same runner with every gate overridden to "never" (every sample runs the whole chain:
    on the no-exit engine when the bundle has ORT CPU engines for this machine); always available;
  * ``unsplit-model``: an ONNX Runtime session on the source model (``reference_model=``, or
    ``manifest.source_model.file`` when it lies inside the bundle: a manifest never opens a file outside it),
    with the chain's thread settings. A model exported with a
    fixed batch of 1 is made batch-dynamic the way the compiler does it (``prepare_reference``, which
    :func:`eecompile.benchmark.bench_bundle` passes; on a device without the compiler such a model is timed at
    batch 1 only, and skipped with a note at larger batches), so it runs at ``batch_size``.
The report says which reference the headline speedup uses (the unsplit model when found).

The timing helpers (:func:`paired_blocks`, :func:`ratio_stats`, :func:`block_calls`) are shared with
``benchmarks/`` and calibration's latency model.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from eecompile.bundle import Bundle, sha256_file
from eecompile.errors import BackendError, BundleError, DataError
from eecompile.runtimes.sessions import default_threads, import_onnxruntime, session_options

log = logging.getLogger(__name__)

PERCENTILES = (50, 90, 99)


# ------------------------------------------------------------------------------------------- timing


@dataclass
class Blocks:
    """Per-call seconds of one function, one value per round (wall clock and process CPU time)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    samples: list[float] = field(default_factory=list)  # single-call wall seconds, when kept

    @property
    def median(self) -> float:
        """Median wall seconds per call over the rounds."""
        return statistics.median(self.wall)


def block_calls(fn: Callable[[], object], target_s: float, max_calls: int = 1000) -> int:
    """How many back-to-back calls of ``fn`` fill about ``target_s`` seconds (at least 1); ``fn`` runs twice."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    return int(min(max(1, round(target_s / one)), max_calls))


# Batches run once for the exit histogram (and to choose the timed ones from).
HISTOGRAM_BATCHES = 1024
# Batches run untimed before each timed block (paired_blocks' before_block).
WARM_BATCHES = 8


def stratified_rows(exit_index: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """``k`` sample indices whose exits have the shares ``exit_index`` has (largest remainders; each exit taken
    by some sample keeps at least one row when ``k`` allows), in a seeded random order: a pass over them costs
    what the whole data would per sample, without the binomial noise of its first ``k`` samples (at 4% of
    samples reaching a final exit that costs 5x the first, 64 rows leave the mean cost +-12% off)."""
    idx = np.asarray(exit_index, np.int64)
    n = idx.size
    if k >= n:
        return np.random.default_rng(seed).permutation(n)
    exits, counts = np.unique(idx, return_counts=True)
    want = counts * k / n
    take = np.floor(want).astype(np.int64)
    if len(exits) <= k:  # every exit taken keeps a row
        take[take == 0] = 1
    while take.sum() > k:
        take[np.argmax(take)] -= 1
    for j in np.argsort(-(want - take))[: max(0, k - int(take.sum()))]:
        take[j] += 1
    rng = np.random.default_rng(seed)
    rows = np.concatenate([rng.choice(np.flatnonzero(idx == e), int(t), replace=False)
                           for e, t in zip(exits, take, strict=True)])
    return rng.permutation(rows)


def over_batches(call: Callable[[Any], object], batches: Sequence[Any]) -> Callable[[], None]:
    """A function that makes ``call(batch)`` for each of ``batches`` in turn (one timed block of a pass)."""
    def one_pass() -> None:
        for f in batches:
            call(f)
    return one_pass


def paired_blocks(fns: Mapping[str, Callable[[], object]], *, calls: int | Mapping[str, int], rounds: int,
                  warmup: int = 2, keep_samples: bool = False,
                  before_block: Mapping[str, Callable[[], object]] | None = None) -> dict[str, Blocks]:
    """Time each function in warmed-up blocks of ``calls`` calls, the functions taking turns every round.

    ``calls`` may differ per function (a ratio is per call, so blocks need not be equally long). With
    ``keep_samples`` every single call's wall time is kept too (for percentiles). ``before_block[name]`` runs,
    untimed, before each of that function's blocks: a short pass that brings its weights back into the CPU
    caches after the other functions' blocks evicted them, so a block times the function as it runs alone in a
    deployment (digits at batch 1: a 20 ms block of the chain right after the unsplit model's read 10-40% slow)."""
    names = list(fns)
    per = {n: (calls[n] if isinstance(calls, Mapping) else calls) for n in names}
    for n in names:
        for _ in range(warmup):
            fns[n]()
    out = {n: Blocks() for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            fn, k, b = fns[n], per[n], out[n]
            if before_block is not None and n in before_block:
                before_block[n]()
            c0, t0 = time.process_time(), time.perf_counter()
            if keep_samples:
                last = t0
                for _ in range(k):
                    fn()
                    now = time.perf_counter()
                    b.samples.append(now - last)
                    last = now
            else:
                for _ in range(k):
                    fn()
            b.wall.append((time.perf_counter() - t0) / k)
            b.cpu.append((time.process_time() - c0) / k)
    return out


def ratio_stats(num: Sequence[float], den: Sequence[float]) -> dict[str, float | int]:
    """Median and min-max of the per-round ratios ``num[r] / den[r]`` (paired: same rounds)."""
    if len(num) != len(den) or not num:
        raise ValueError("ratio_stats needs two equally long, non-empty series from the same rounds")
    r = [a / b for a, b in zip(num, den, strict=True)]
    return {"median": statistics.median(r), "min": min(r), "max": max(r), "rounds": len(r)}


def summary(values: Sequence[float], scale: float = 1e3) -> dict[str, float]:
    """Median and min-max of a series (default: seconds shown as milliseconds)."""
    return {"median": statistics.median(values) * scale, "min": min(values) * scale, "max": max(values) * scale}


# ------------------------------------------------------------------------------------------- reference


def reference_session(path: Path, threads: int) -> Any:
    """An ONNX Runtime CPU session on the unsplit model with the chain's thread settings (no spinning)."""
    ort = import_onnxruntime()
    try:
        return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own types; name the file instead
        raise BackendError(f"{path}: ONNX Runtime cannot load the unsplit model ({e})") from e


def find_source_model(bundle: Bundle) -> Path | None:
    """The unsplit model the bundle came from, when the manifest's ``source_model.file`` lies inside the bundle
    (a relative path, no symbolic link, not leaving the bundle) and still has the recorded sha256.

    A source model outside the bundle is never opened because a manifest names it (pass it explicitly,
    e.g. ``--reference-model``); returns None then, or when the file is missing or changed.
    """
    src = bundle.manifest.source_model or {}
    name = src.get("file") or src.get("path")
    if not name or not isinstance(name, str):
        return None
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or "\\" in name:
        return None
    p = bundle.path
    for part in rel.parts:
        p = p / part
        if p.is_symlink():
            return None
    try:
        bundle.file(name)  # the bundle's own confinement rules, where it has them
    except BundleError:
        return None
    if not p.is_file() or (src.get("sha256") and sha256_file(p) != src["sha256"]):
        return None
    return p


# ------------------------------------------------------------------------------------------- report


@dataclass
class BenchReport:
    """What ``eecompile bench`` prints (``to_json`` keys are stable: scripts read them)."""

    bundle: str
    data: str
    backend: str
    batch_size: int
    n_samples: int
    n_batches: int
    repeats: int
    threads: int | None
    latency_ms: dict[str, float]  # p50, p90, p99 of one batch (the chain, bundle thresholds)
    throughput: float  # samples / s (median round)
    exit_histogram: list[dict[str, Any]]  # per exit: index, name, count, share
    references: list[dict[str, Any]]  # name, description, latency_ms_p50, speedup {median, min, max, rounds}
    reference: str  # the reference the headline speedup uses
    speedup: dict[str, float | int]  # chain vs ``reference``: median, min, max, rounds
    notes: list[str] = field(default_factory=list)
    loop: dict[str, Any] | None = None
    """Loop bundles: ``steps`` (N), ``mean_steps``, ``step_histogram`` (samples stopping after each step),
    ``loop_threshold``; the exit histogram then counts sample-steps (eecompile.runtimes.loop_bench)."""

    def loop_line(self) -> str | None:
        """The loop's line of the report (None for a bundle without a loop)."""
        if self.loop is None:
            return None
        lp, n = self.loop, max(self.n_samples, 1)
        t = lp["loop_threshold"]
        shown = ("none" if t is None else "[" + ", ".join(f"{v:.4g}" for v in t) + "] (staged)" if isinstance(t, list)
                 else f"{t:.4g}")
        return (f"loop: {lp['mean_steps']:.2f} of {lp['steps']} steps on average, {lp['step_histogram'][-1] / n:.1%} "
                f"ran every step (loop threshold {shown})")

    def to_json(self) -> dict[str, Any]:
        """The report as plain JSON types (the keys ``eecompile bench --json`` prints)."""
        return json.loads(json.dumps(asdict(self)))  # plain types only

    def lines(self) -> list[str]:
        """The report as plain text lines (what the device entry point prints)."""
        lat = self.latency_ms
        out = [f"{self.bundle} on {self.data}: {self.n_samples} samples, batch {self.batch_size}, {self.backend}, "
               f"{self.repeats} rounds",
               f"latency per batch: p50 {lat['p50']:.3f} ms, p90 {lat['p90']:.3f} ms, p99 {lat['p99']:.3f} ms; "
               f"throughput {self.throughput:.1f} samples/s"]
        out += [line for line in [self.loop_line()] if line]
        out += [f"exit {e['index']} {e['name'] or ''}: {e['count']} samples ({e['share']:.1%})"
                + (f", {e['jumped']} jumped" if "jumped" in e else "") for e in self.exit_histogram]
        for r in self.references:
            s = r["speedup"]
            out.append(f"vs {r['name']}{' *' if r['name'] == self.reference else ''}: p50 {r['latency_ms_p50']:.3f} ms"
                       f" / batch, speedup {s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f}x)")
        out.append("* headline reference; speedups are per-round ratios of the reference's time to the chain's")
        out += [f"note: {note}" for note in self.notes]
        return out

    def print(self) -> None:
        """Print the report as plain text (``eecompile bench`` prints tables: :func:`eecompile.benchmark.print_report`)."""
        print("\n".join(self.lines()))


def _percentiles(samples: Sequence[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1e3
    return {f"p{p}": float(np.percentile(a, p)) for p in PERCENTILES}


def bench_bundle(bundle: str | Path | Bundle, data: str | Path, *, batch_size: int = 1,
                 backend: str = "onnxruntime", repeats: int = 20, threads: int | None = None,
                 reference_model: str | Path | None = None, max_batches: int = 64,
                 thresholds: Any = None, warmup: int = 1,
                 prepare_reference: Callable[[Path, Path], Path] | None = None,
                 steps: int | None = None) -> BenchReport:
    """Benchmark a bundle on the inputs in ``data`` (an .npz with the model inputs; see the module docstring).

    Every batch (up to :data:`HISTOGRAM_BATCHES`, evenly spaced) runs once for the exit histogram; one timed round
    runs ``max_batches`` of them, drawn with the exit mix of all (:func:`stratified_rows` on each batch's deepest
    exit), through the chain (``thresholds``: the bundle's by default; policy compact), then through each reference; ``repeats`` rounds after ``warmup`` rounds.
    ``prepare_reference(source, scratch_dir) -> path``: makes the unsplit model batch-dynamic (the compiler's
    :func:`eecompile.benchmark.dynamic_reference`). Returns a :class:`BenchReport` (times in ms, throughput in
    samples/s). ``steps``: loop bundles only, the loop's step count (default: the bundle's ``loop.steps``). Raises
    :class:`DataError` (data, batch, repeats; ``steps`` on a bundle without a loop, ``reference_model`` on a bundle
    with one) and what the runner raises."""
    from eecompile.runtimes.data import batch_size_of, load_npz

    if batch_size < 1:
        raise DataError(f"--batch must be >= 1, got {batch_size}")
    if repeats < 1:
        raise DataError(f"--repeats must be >= 1, got {repeats}")
    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    m = b.manifest
    if m.loop is not None:  # the loop with its gate against all N steps (eecompile.runtimes.loop_bench)
        from eecompile.runtimes.loop_bench import bench_loop

        if reference_model is not None:  # refused as calibrate refuses it, rather than timed or ignored
            raise DataError(f"--reference-model {reference_model}: a loop bundle is timed against its own loop run for "
                            f"all N steps (the unsplit model is one step of it); leave the option out")

        return bench_loop(b, data, batch_size=batch_size, backend=backend, repeats=repeats, threads=threads,
                          max_batches=max_batches, thresholds=thresholds, warmup=warmup, steps=steps)
    if steps is not None:
        raise DataError(f"{b.path}: --steps is for loop bundles (compiled from a spec with 'loop:'); this bundle runs "
                        f"its chain once")
    n_threads = threads or default_threads()
    options: dict[str, Any] = {"threads": n_threads} if backend == "onnxruntime" else {}
    runner = _load_runner(b, backend, options)
    notes: list[str] = []
    try:
        dataset = load_npz(data, m.inputs)
        batches = [{k: np.ascontiguousarray(v) for k, v in f.items()} for f in dataset.batches(batch_size)]
        if len(batches) > HISTOGRAM_BATCHES:
            notes.append(f"exit shares from {HISTOGRAM_BATCHES} of {len(batches)} batches, evenly spaced over the data")
            pick = np.unique(np.linspace(0, len(batches) - 1, HISTOGRAM_BATCHES).round().astype(np.int64))
            batches = [batches[i] for i in pick]
        n = sum(batch_size_of(f, m.inputs, str(data)) for f in batches)

        hist = np.zeros(len(m.segments), dtype=np.int64)
        jumped = np.zeros(len(m.segments), dtype=np.int64)  # jump exits (MuE): samples that jumped at each
        deepest = np.zeros(len(batches), dtype=np.int64)  # the exit of each batch's last row to leave
        for i, f in enumerate(batches):
            res = runner.run(f, thresholds=thresholds)
            hist += res.exit_counts
            deepest[i] = int(res.exit_index.max())
            if m.jumps:
                jumped += np.bincount(res.jumped[res.jumped >= 0], minlength=len(m.segments))
        exit_histogram = [{"index": k, "name": s.exit.name or ("final" if k == len(m.segments) - 1 else None),
                           "count": int(c), "share": float(c) / n} for k, (s, c) in enumerate(zip(m.segments, hist,
                                                                                            strict=True))]
        if m.jumps:
            from eecompile.runtimes.jumps import exit_shares

            for j in m.jumps:
                exit_histogram[int(j["exit"])]["jumped"] = int(jumped[int(j["exit"])])
            notes.append(f"samples ending at each exit and jumping: {exit_shares(m, hist, jumped, n)}")

        if len(batches) > max_batches:
            notes.append(f"timed {max_batches} of {len(batches)} batches, drawn with the exit mix of all of them (by "
                         f"the exit of each batch's deepest row)")
            batches = [batches[i] for i in stratified_rows(deepest, max_batches)]

        chain_samples: list[float] = []

        def chain_pass() -> None:
            for f in batches:
                t0 = time.perf_counter()
                runner.run(f, thresholds=thresholds)
                chain_samples.append(time.perf_counter() - t0)

        never = "never"  # every gate (a jump bundle has fewer gates than early segments)
        # One call per batch for each function; a timed block is a pass over `batches`, its warm-up one over the
        # first WARM_BATCHES (the chain's pass also records each call's time, for percentiles).
        calls: dict[str, Callable[[dict[str, np.ndarray]], object]] = {
            "chain": lambda f: runner.run(f, thresholds=thresholds),
            "gates-never": lambda f: runner.run(f, thresholds=never),
        }
        descriptions = {"gates-never": "the same runner with every gate overridden to 'never' (its no-exit engine "
                                       "when the bundle has one for this machine, else every segment)"}
        src = Path(reference_model) if reference_model is not None else find_source_model(b)
        if src is None:
            notes.append("unsplit model not timed: pass reference_model= (--reference-model) to compare with it "
                         "(a source model outside the bundle is not opened because the manifest names it)")
        elif backend != "onnxruntime":
            notes.append(f"unsplit model not timed: it runs on ONNX Runtime, the chain on {backend}")
        else:
            with tempfile.TemporaryDirectory(prefix="eecompile-bench-") as tmp:
                dynamic = m.batch_mode == "dynamic" and batch_size > 1
                path = prepare_reference(src, Path(tmp)) if dynamic and prepare_reference is not None else src
                sess = reference_session(path, n_threads)
            in_names = [i.name for i in sess.get_inputs()]
            try:
                sess.run(None, {k: batches[0][k] for k in in_names})
            except Exception as e:  # noqa: BLE001 - a fixed-batch model and no compiler to make it dynamic
                notes.append(f"unsplit model not timed: ONNX Runtime cannot run {src.name} at batch {batch_size} "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); run `eecompile bench` "
                             f"with the full install to make it batch-dynamic")
            else:
                calls["unsplit-model"] = lambda f: sess.run(None, {k: f[k] for k in in_names})
                descriptions["unsplit-model"] = f"ONNX Runtime session on {src.name}, same threads"

        fns: dict[str, Callable[[], object]] = {name: chain_pass if name == "chain" else over_batches(call, batches)
                                                for name, call in calls.items()}
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        chain_samples.clear()
        warm = {name: over_batches(call, batches[:WARM_BATCHES]) for name, call in calls.items()}
        timed = paired_blocks(fns, calls=1, rounds=repeats, warmup=0, before_block=warm)
    finally:
        runner.close()

    chain = timed["chain"].wall
    references: list[dict[str, Any]] = []
    for name in fns:
        if name == "chain":
            continue
        references.append({"name": name, "description": descriptions[name],
                           "latency_ms_p50": statistics.median(timed[name].wall) * 1e3 / len(batches),
                           "speedup": ratio_stats(timed[name].wall, chain)})
    headline = "unsplit-model" if "unsplit-model" in fns else "gates-never"
    return BenchReport(
        bundle=str(b.path), data=str(data), backend=backend, batch_size=batch_size, n_samples=n,
        n_batches=len(batches), repeats=repeats, threads=n_threads if backend == "onnxruntime" else None,
        latency_ms=_percentiles(chain_samples), throughput=n / statistics.median(chain),
        exit_histogram=exit_histogram, references=references, reference=headline,
        speedup=dict(next(r["speedup"] for r in references if r["name"] == headline)), notes=notes)


def _load_runner(b: Bundle, backend: str, options: dict[str, Any]) -> Any:
    if b.manifest.jumps:  # jump exits: the runner that merges the rows that jumped back in at their target
        from eecompile.runtimes.jumps import JumpRunner

        return JumpRunner(b, backend=backend, **options)
    if backend == "tensorrt":
        from eecompile.runtimes.tensorrt import TensorRTChain

        return TensorRTChain(b, **options)
    from eecompile.runtimes.chain import EarlyExitRunner

    return EarlyExitRunner(b, backend=backend, **options)
