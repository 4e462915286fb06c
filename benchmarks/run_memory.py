"""Peak memory of ``eecompile run`` against the number of rows: ``python -m benchmarks.run_memory``.

A small CNN (1x16x16 images, three conv blocks, 10 classes, exits after the first two blocks) is compiled
once; ``eecompile run`` then processes 1k, 10k and 100k rows, each in a fresh process whose peak resident
set size is reported (``VmHWM``; ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` beside it). ``run`` reads, runs and writes batch by
batch, so the peak should not grow with the rows: the figure is the ratio of each peak to the 1k-row peak
(target: within 1.10). Input data is an uncompressed .npz (1 kB per row).

``--rows`` changes the row counts, ``--cache DIR`` where the model, bundle and data files go (default
``$TMPDIR/eecompile-bench/run-memory``), ``--json PATH`` writes the results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

# The child reports VmHWM (the peak RSS of its own address space, which starts at exec) and ru_maxrss.
# ru_maxrss survives exec on Linux, so it can include the parent's footprint at fork time: the data files are
# written in blocks to keep the parent small, and VmHWM is the figure.
CHILD = """
import resource, sys
from eecompile.cli import cli
try:
    cli(sys.argv[1:], standalone_mode=False)
finally:
    hwm = next((l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")), "0")
    print("MAXRSS_KB", hwm, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def small_cnn(path: Path, classes: int = 10) -> Path:
    """x[N,1,16,16] -> 3 x (Conv 3x3, Relu) with 16/32/32 channels (block outputs b0, b1, b2) -> pool -> logits."""
    import onnx
    from onnx import TensorProto
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    nodes, inits, cur, cin = [], [], "x", 1
    for i, (cout, stride) in enumerate([(16, 1), (32, 2), (32, 2)]):
        w = (rng.standard_normal((cout, cin, 3, 3)) * (2.0 / (9 * cin)) ** 0.5).astype(np.float32)
        inits += [nh.from_array(w, f"W{i}"), nh.from_array(np.zeros(cout, np.float32), f"B{i}")]
        nodes += [oh.make_node("Conv", [cur, f"W{i}", f"B{i}"], [f"c{i}"], pads=[1, 1, 1, 1], strides=[stride] * 2),
                  oh.make_node("Relu", [f"c{i}"], [f"b{i}"])]
        cur, cin = f"b{i}", cout
    inits.append(nh.from_array((rng.standard_normal((classes, cin)) * 0.1).astype(np.float32), "Wo"))
    inits.append(nh.from_array(np.zeros(classes, np.float32), "Bo"))
    nodes += [oh.make_node("GlobalAveragePool", [cur], ["p"]), oh.make_node("Flatten", ["p"], ["f"]),
              oh.make_node("Gemm", ["f", "Wo", "Bo"], ["logits"], transB=1)]
    g = oh.make_graph(nodes, "small_cnn", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 16, 16])],
                      [oh.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, path)
    return path


def measure(bundle: Path, data: Path, out: Path, batch: int) -> tuple[int, int]:
    """(VmHWM, ru_maxrss) in bytes of one ``eecompile run`` in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", CHILD, "run", str(bundle), "--data", str(data), "-o", str(out),
                        "--batch", str(batch), "--threads", "1"], capture_output=True, text=True, env=env,
                       check=False)
    line = next((ln for ln in r.stderr.splitlines() if ln.startswith("MAXRSS_KB")), None)
    if r.returncode != 0 or line is None:
        raise RuntimeError(f"eecompile run failed ({r.returncode}): {r.stderr[-2000:]}")
    hwm, maxrss = (int(v) * 1024 for v in line.split()[1:3])
    return hwm or maxrss, maxrss


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "eecompile-bench" / "run-memory")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from benchmarks.models import compile_with_exits
    from eecompile.runtimes.data import NpzWriter

    args.cache.mkdir(parents=True, exist_ok=True)
    model = small_cnn(args.cache / "small_cnn.onnx")
    bundle = compile_with_exits(model, ["b0", "b1"], args.cache / "small_cnn.eebundle", n_classes=10, opset=17,
                                shapes={"b0": ["N", 16, 16, 16], "b1": ["N", 32, 8, 8]})
    rng = np.random.default_rng(0)
    rows_out = []
    for n in args.rows:
        data = args.cache / f"x{n}.npz"
        if not data.is_file():
            writer = NpzWriter(data, n)
            for s in range(0, n, 4096):
                writer.append("x", rng.standard_normal((min(4096, n - s), 1, 16, 16)).astype(np.float32))
            writer.commit()
        out = args.cache / f"y{n}.npz"
        peak, maxrss = measure(bundle, data, out, args.batch)
        with np.load(out) as z:
            assert z["logits"].shape == (n, 10) and z["exit_index"].shape == (n,)
        out.unlink()
        rows_out.append({"rows": n, "input_mb": data.stat().st_size / 2**20, "max_rss_mb": peak / 2**20,
                         "ru_maxrss_mb": maxrss / 2**20})
        print(f"{n:>7} rows  input {rows_out[-1]['input_mb']:7.1f} MB  max RSS {rows_out[-1]['max_rss_mb']:7.1f} MB",
              flush=True)
    base = rows_out[0]["max_rss_mb"]
    for r in rows_out:
        r["ratio_to_first"] = r["max_rss_mb"] / base
    worst = max(r["ratio_to_first"] for r in rows_out)
    result = {"rows": rows_out, "batch": args.batch, "worst_ratio": worst, "target": 1.10, "meets": worst <= 1.10}
    print(f"worst ratio to {rows_out[0]['rows']} rows: {worst:.3f}x (target <= 1.10: "
          f"{'meets' if result['meets'] else 'misses'})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
