#!/usr/bin/env bash
# GPU check for the TensorRT backend: install the GPU extras, run the `gpu` tests, then a short benchmark.
# Needs an NVIDIA GPU + driver. Budget: under 5 minutes on a datacenter GPU (most of it is pip).
# Usage: bash scripts/gpu_check.sh        (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
start=$(date +%s)

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU visible (nvidia-smi failed); nothing to check" >&2
  exit 2
fi
nvidia-smi -L

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet -c constraints-dev.txt -e ".[gpu,dev]"
"$PY" - <<'PY'
import tensorrt, onnxruntime
print("tensorrt", tensorrt.__version__, "| onnxruntime", onnxruntime.__version__)
from eecompile.runtimes.tensorrt import query_gpu
print(query_gpu())
PY

# The gpu tests: build fp32/fp16 engines, verify against ORT CPU, run the device-resident chain.
timeout 180 "$PY" -m pytest -q -m gpu tests/trt -p no:cacheprovider

# Short benchmark: the hand-made bundle at batch 32, chain with exits vs no exits (gates forced off).
timeout 90 "$PY" - <<'PY'
import sys, tempfile, time
from pathlib import Path
import numpy as np
sys.path.insert(0, "tests/trt")
from handmade import random_inputs, write_bundle
from eecompile.build import build_engines
from eecompile.runtimes.tensorrt import TensorRTChain

with tempfile.TemporaryDirectory() as d:
    path = Path(d) / "bench.eebundle"
    write_bundle(path)
    build_engines(path, "tensorrt", max_batch=32, timing_cache=Path(d) / "tc")
    x = random_inputs(32 * 64, seed=0)["x"]
    with TensorRTChain(path) as chain:
        for thr in ([0.76], "never"):
            chain.run({"x": x[:256]}, thresholds=thr)  # warm up every batch size that occurs
            t0 = time.perf_counter()
            for _ in range(5):
                res = chain.run({"x": x}, thresholds=thr)
            dt = (time.perf_counter() - t0) / 5
            print(f"thresholds={thr!s:8} {len(x) / dt:10.0f} samples/s  exits={res.exit_counts.tolist()}  "
                  f"gpu ms/segment={np.round(res.timings * 1e3, 2).tolist()}")
PY
echo "gpu_check: done in $(( $(date +%s) - start )) s"
