"""``eecompile bench`` on the full install: the runtime's timing (:mod:`eecompile.runtimes.bench`) with the
compiler's help for the unsplit reference (a fixed-batch source model is made batch-dynamic first).

The timing helpers (:func:`paired_blocks`, :func:`ratio_stats`, :func:`block_calls`) are shared with
``benchmarks/``; they live in the runtime so a device can time a bundle without the compiler.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eecompile.bundle import Bundle
from eecompile.errors import BackendError
from eecompile.runtimes import bench as _bench
from eecompile.runtimes.bench import (
    PERCENTILES,
    BenchReport,
    Blocks,
    block_calls,
    paired_blocks,
    ratio_stats,
    reference_session,
    summary,
)

__all__ = ["PERCENTILES", "BenchReport", "Blocks", "bench_bundle", "block_calls", "dynamic_reference",
           "paired_blocks", "print_report", "ratio_stats", "reference_session", "summary"]


def dynamic_reference(source: Path, cache_dir: Path) -> Path:
    """The source model with a dynamic batch (made the way the compiler makes it), saved in ``cache_dir``.

    Returns ``source`` itself when its inputs are already batch-dynamic."""
    import onnx
    import onnx_ir as ir

    from eecompile.passes.batch_dynamic import infer_shapes, make_batch_dynamic
    from eecompile.passes.load import load_model

    proto = onnx.load(str(source), load_external_data=False)
    init = {t.name for t in proto.graph.initializer}
    fixed = any(i.type.tensor_type.shape.dim and i.type.tensor_type.shape.dim[0].HasField("dim_value")
                for i in proto.graph.input if i.name not in init)
    if not fixed:
        return source
    res = make_batch_dynamic(infer_shapes(load_model(source)))
    if res.mode != "dynamic":
        raise BackendError(f"{source}: the unsplit model only runs at batch 1 ({res.reason})")
    out = cache_dir / f"{source.stem}.dynamic.onnx"
    ir.save(res.model, out)
    return out


def bench_bundle(bundle: str | Path | Bundle, data: str | Path, **kwargs: Any) -> BenchReport:
    """:func:`eecompile.runtimes.bench.bench_bundle` with :func:`dynamic_reference` preparing the unsplit model."""
    kwargs.setdefault("prepare_reference", dynamic_reference)
    return _bench.bench_bundle(bundle, data, **kwargs)


def print_report(report: BenchReport) -> None:
    """``eecompile bench``'s tables (rich) for a :class:`BenchReport`."""
    from rich.table import Table
    from rich.text import Text

    from eecompile.console import report_console

    c = report_console()
    c.print(Text.assemble((str(report.bundle), "bold"), f" on {report.data}: {report.n_samples} samples, batch "
                          f"{report.batch_size}, {report.backend}, {report.repeats} rounds"))
    lat = report.latency_ms
    c.print(f"latency per batch: p50 {lat['p50']:.3f} ms, p90 {lat['p90']:.3f} ms, p99 {lat['p99']:.3f} ms; "
            f"throughput {report.throughput:.1f} samples/s")
    if report.loop is not None:
        c.print(report.loop_line())
    jumps = any("jumped" in e for e in report.exit_histogram)  # a bundle with jump exits: who jumped where
    t = Table("exit", "name", "samples", "share", *(["jumped"] if jumps else []))
    for e in report.exit_histogram:
        t.add_row(str(e["index"]), str(e["name"] or ""), str(e["count"]), f"{e['share']:.1%}",
                  *([str(e.get("jumped", "-"))] if jumps else []))
    c.print(t)
    t = Table("reference", "p50 ms / batch", "speedup (median)", "min-max")
    for r in report.references:
        s = r["speedup"]
        t.add_row(r["name"] + (" *" if r["name"] == report.reference else ""), f"{r['latency_ms_p50']:.3f}",
                  f"{s['median']:.2f}x", f"{s['min']:.2f}-{s['max']:.2f}x")
    c.print(t)
    c.print("* headline reference; speedups are per-round ratios of the reference's time to the chain's")
    for note in report.notes:
        c.print(f"note: {note}")
