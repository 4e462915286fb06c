"""Shared weights stored once: ``python -m benchmarks.shared_weights``.

An ALBERT-style encoder (one feed-forward layer's weights reused across 12 layers, width 768, exported with
the TorchScript exporter) is compiled with five exits. Reported, as ratios to the unsplit model in the same run:

* bundle bytes (segments + ``weights.bin``, heads excluded) / the model file's bytes (target <= 1.05);
* loaded memory: growth of the proportional set size (PSS, ``/proc/self/smaps_rollup``; a file page mapped by
  several sessions counts once) after loading the runner and running one batch / the same after loading the
  unsplit model in one ONNX Runtime session and running that batch, each in a fresh process; and the same for
  the segments in plain sessions with ONNX Runtime's weight prepacking off (``session.disable_prepacking``):
  prepacking makes a packed copy of each MatMul weight in every session that uses it.

Speed of turning prepacking off (``--speed``): the segment chain (policy never: every segment runs) in plain
sessions, one thread, with ``session.disable_prepacking=1`` on the segments that read ``weights.bin`` (the only
ones holding a weight twice), against the same sessions with prepacking on; interleaved rounds of process CPU
time (one intra-op thread), the median per-round ratio (and its 10th-90th percentile spread), at batch 1 and 8.

``--cache DIR`` (default ``$TMPDIR/eecompile-bench/shared-weights``), ``--json PATH`` writes the results.
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

WIDTH, LAYERS, TOKENS, FEATURES, CLASSES = 768, 12, 16, 64, 5
EXIT_LAYERS = (1, 3, 5, 7, 9)

CHILD = """
import glob, sys, numpy as np
def pss():  # proportional set size: a page mapped twice (two sessions reading one file) counts once
    d = {}
    for line in open("/proc/self/smaps_rollup"):
        k, _, v = line.partition(":")
        d[k] = int(v.split()[0]) * 1024 if v.strip() else 0
    return d["Pss"], d.get("Pss_Anon", 0)
import onnxruntime as ort, eecompile
x = np.random.default_rng(0).standard_normal((8, TOKENS, FEATURES)).astype(np.float32)
base, base_anon = pss()
so = ort.SessionOptions(); so.intra_op_num_threads = 1
if sys.argv[1] == "model":
    s = ort.InferenceSession(sys.argv[2], so, providers=["CPUExecutionProvider"]); s.run(None, {"x": x})
elif sys.argv[1] == "runner":
    r = eecompile.load(sys.argv[2]); r.run({"x": x}, thresholds="never")
else:  # the segments in plain sessions without MLAS weight prepacking (a packed copy per session otherwise)
    so.add_session_config_entry("session.disable_prepacking", "1")
    feeds = {"x": x}
    for f in sorted(glob.glob(sys.argv[2] + "/segments/seg*.onnx")):
        s = ort.InferenceSession(f, so, providers=["CPUExecutionProvider"])
        ins = {i.name: feeds.get(i.name, np.array(np.inf, np.float32)) for i in s.get_inputs()}
        feeds.update(zip([o.name for o in s.get_outputs()], s.run(None, ins)))
now, anon = pss()
print("PSS", now - base, anon - base_anon)
""".replace("TOKENS, FEATURES", f"{TOKENS}, {FEATURES}")


def export_albert(path: Path, width: int = WIDTH, layers: int = LAYERS) -> Path:
    """x[B, 16, 64] -> Linear to ``width`` -> ``layers`` x the same layer (Linear width->4 width, Relu, Linear
    back, residual, LayerNorm; ALBERT's cross-layer sharing) -> mean over tokens -> logits[B, 5]. TorchScript
    exporter, opset 17: the export holds each shared weight once; the LayerNorm outputs are named
    ``/layer/ln/...``, ``/layer/ln_1/...``, ... (see :func:`layer_output`)."""
    import torch

    torch.manual_seed(0)
    nn = torch.nn

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.ln = nn.Linear(width, 4 * width), nn.Linear(4 * width, width), nn.LayerNorm(width)

        def forward(self, x):
            return self.ln(x + self.b(torch.relu(self.a(x))))

    class Albert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.layer, self.fc = nn.Linear(FEATURES, width), Layer(), nn.Linear(width, CLASSES)

        def forward(self, x):
            h = self.emb(x)
            for _ in range(layers):
                h = self.layer(h)
            return self.fc(h.mean(1))

    torch.onnx.export(Albert().eval(), (torch.randn(2, TOKENS, FEATURES),), str(path), input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)
    return path


def layer_output(k: int) -> str:
    """The exported name of layer ``k``'s output (0-based)."""
    return f"/layer/ln{'' if k == 0 else f'_{k}'}/LayerNormalization_output_0"


def compile_bundle(d: Path, model: Path) -> Path:
    import numpy as np
    import onnx
    import yaml

    from eecompile.compiler import compile_model
    from eecompile.heads import head_onnx, weight_shapes

    exits = []
    shape = [1, TOKENS, WIDTH]
    for i, layer in enumerate(EXIT_LAYERS):
        rng = np.random.default_rng(i)
        w = {n: (rng.standard_normal(s) * 0.05).astype(np.float32)
             for n, s in weight_shapes("linear", shape, CLASSES, {"pool": "first"}).items()}
        head = d / f"head{i}.onnx"
        onnx.save(head_onnx("linear", shape, CLASSES, {"pool": "first"}, w, 17), head)
        exits.append({"at": layer_output(layer),
                      "head": str(head), "gate": {"kind": "max_prob", "threshold": 0.9}})
    (d / "spec.yaml").write_text(yaml.safe_dump({"model": str(model), "exits": exits}))
    return compile_model(d / "spec.yaml", d / "b.eebundle", force=True).path


def loaded_memory(kind: str, path: Path) -> tuple[int, int]:
    """(PSS growth, anonymous PSS growth) in bytes of a fresh process that loads and runs ``path``."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(path)], capture_output=True, text=True, env=env,
                         check=True).stdout
    _, total, anon = next(line for line in out.splitlines() if line.startswith("PSS")).split()
    return int(total), int(anon)


def shared_segments(bundle: Path) -> list[int]:
    """The segments whose ONNX file reads ``segments/weights.bin`` (the weights stored once)."""
    from eecompile.bundle import Bundle, external_data_files

    m = Bundle.load(bundle).manifest
    return [s.index for s in m.segments if "segments/weights.bin" in external_data_files(bundle, s.file)]


def prepack_speed(bundle: Path, batch: int, rounds: int = 40) -> dict[str, float]:
    """Median and spread (10th-90th percentile) over ``rounds`` of (chain time with prepacking off on the shared
    segments) / (chain time with it on), one thread, the chain run with every segment (policy never)."""
    import time

    import numpy as np
    import onnxruntime as ort

    from eecompile.runtimes.sessions import session_options

    shared = set(shared_segments(bundle))
    files = sorted((bundle / "segments").glob("seg*.onnx"), key=lambda p: int(p.stem[3:]))

    def chain(off: bool) -> list[Any]:
        sessions = []
        for k, f in enumerate(files):
            so = session_options(1)
            if off and k in shared:
                so.add_session_config_entry("session.disable_prepacking", "1")
            sessions.append(ort.InferenceSession(str(f), so, providers=["CPUExecutionProvider"]))
        return sessions

    x = np.random.default_rng(0).standard_normal((batch, TOKENS, FEATURES)).astype(np.float32)

    def run(sessions: list[Any]) -> float:
        feeds: dict[str, Any] = {"x": x}
        t0 = time.process_time()  # CPU time: one thread, so a busy machine's waiting does not count
        for s in sessions:
            ins = {i.name: feeds.get(i.name, np.array(np.inf, np.float32)) for i in s.get_inputs()}
            feeds.update(zip([o.name for o in s.get_outputs()], s.run(None, ins), strict=True))
        return time.process_time() - t0

    on, off = chain(False), chain(True)
    for _ in range(3):  # warm-up
        run(on), run(off)
    ratios = []
    for r in range(rounds):
        if r % 2:  # alternate which goes first
            a, b = run(on), run(off)
        else:
            b, a = run(off), run(on)
        ratios.append(b / a)
    q = np.quantile(ratios, [0.1, 0.5, 0.9])
    return {"batch": batch, "shared_segments": len(shared), "segments": len(files), "median": float(q[1]),
            "p10": float(q[0]), "p90": float(q[2])}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "eecompile-bench" / "shared-weights")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--speed", action="store_true", help="also time prepacking off vs on (shared segments)")
    args = ap.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    model = args.cache / "albert.onnx"
    if not model.exists():
        export_albert(model)
    bundle = compile_bundle(args.cache, model)
    seg_bytes = sum(p.stat().st_size for p in (bundle / "segments").rglob("*") if p.is_file())
    model_bytes = model.stat().st_size
    res: dict[str, Any] = {"model_bytes": model_bytes, "segment_bytes": seg_bytes,
                           "bundle_over_model": seg_bytes / model_bytes, "segments": len(EXIT_LAYERS) + 1}
    print(f"model {model_bytes / 2**20:.1f} MiB; segments {seg_bytes / 2**20:.1f} MiB "
          f"({res['bundle_over_model']:.3f}x the model)")
    ref, _ = loaded_memory("model", model)
    res["pss_model"] = ref
    for kind in ("runner", "no-prepack"):
        total, anon = loaded_memory(kind, bundle)
        res[f"pss_{kind}"], res[f"pss_anon_{kind}"], res[f"pss_{kind}_over_model"] = total, anon, total / ref
        print(f"loaded PSS, {kind}: {total / 2**20:.1f} MiB ({total / ref:.2f}x the unsplit model's "
              f"{ref / 2**20:.1f} MiB; anonymous {anon / 2**20:.1f} MiB)")
    if args.speed:
        res["prepack_off_speed"] = []
        for batch in (1, 8):
            sp = prepack_speed(bundle, batch)
            res["prepack_off_speed"].append(sp)
            print(f"prepacking off on {sp['shared_segments']} of {sp['segments']} segments, batch {batch}: chain time "
                  f"{sp['median']:.3f}x with it on (p10-p90 {sp['p10']:.3f}-{sp['p90']:.3f})")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
