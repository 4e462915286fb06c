#!/usr/bin/env bash
# GPU check for the TensorRT backend and the CUDA paths: versions first, then the `gpu` tests, then a short
# TensorRT benchmark. Installs nothing from a network by default (GPU machines are often offline): it runs with
# the interpreter's own packages, and with the repository on PYTHONPATH (no `pip install -e`, so no torch pull).
#
#   bash scripts/gpu_check.sh                 PYTHON=python3.12 to choose the interpreter
#   GPU_CHECK_PIP="tensorrt-cu13 onnxruntime-gpu" bash scripts/gpu_check.sh   also pip-install these first (online;
#       `tensorrt-cuXX-libs` on PyPI is a stub that downloads the libraries from NVIDIA's own index)
#   wheels in .whl/ (e.g. carried to an offline machine) are installed first with --no-index into a scratch dir.
#
# What runs depends on what is importable, and the summary says which checks were skipped and why:
#   cuda-python + GPU          -> tests/trt/test_cuda_layer.py (buffers, row copies, events, stream handles)
#   + tensorrt                 -> tests/trt/test_trt_gpu.py (build fp32/fp16, verify, chain) and the benchmark
#   onnxruntime with CUDA EP   -> tests/runtimes/test_onnxruntime.py::test_cuda_matches_cpu
# Every step has a timeout; the whole script stays under 5 minutes. Results go to $OUT (when set) or to
# ${GPU_CHECK_DIR:-/tmp/eecompile-gpu-check}: summary.txt, versions.txt, gpu_check.log, junit.xml.
# Exit status: 0 all run checks passed, 1 a check failed, 2 no GPU visible, 3 every gpu test was skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
RES=${OUT:-${GPU_CHECK_DIR:-/tmp/eecompile-gpu-check}}
mkdir -p "$RES"
LOG="$RES/gpu_check.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
SUMMARY=()
FAILED=0

note() { echo "$*" | tee -a "$LOG"; }
record() {  # record STATUS NAME DETAIL
  SUMMARY+=("$(printf '%-7s %-28s %s' "$1" "$2" "$3")")
  [ "$1" = FAIL ] && FAILED=1
  return 0
}
run_step() {  # run_step NAME SECONDS CMD...: runs CMD with a timeout, output to the terminal and the log
  local name=$1 secs=$2 t0 rc
  shift 2
  note ""
  note "=== $name (timeout ${secs}s) ==="
  t0=$(date +%s)
  timeout --kill-after=10 "$secs" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    record FAIL "$name" "timed out after ${secs}s"
  elif [ "$rc" = 0 ]; then
    record ok "$name" "$(( $(date +%s) - t0 )) s"
  elif [ "$rc" = 5 ]; then  # pytest: nothing collected/selected
    record skip "$name" "no test selected"
  else
    record FAIL "$name" "exit status $rc"
  fi
  return 0
}

# --- 1. the GPU and the driver ----------------------------------------------------------------------------
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  note "gpu_check: no NVIDIA GPU visible (nvidia-smi failed); nothing to check"
  exit 2
fi
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>/dev/null \
    | sed 's/^/gpu: /'
  nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9.]*' | head -1 | sed 's/^/driver supports /'
} | tee "$RES/versions.txt" | tee -a "$LOG"

# --- 2. optional installs (never the project's dev extras: those pin torch) ----------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
  note "installing $(ls .whl/*.whl | wc -l) wheel(s) from .whl/ into /tmp/eecompile-site (--no-index)"
  timeout 180 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/eecompile-site .whl/*.whl >>"$LOG" 2>&1 && export PYTHONPATH="/tmp/eecompile-site:$PYTHONPATH" \
    && record ok "install .whl/" "" || record FAIL "install .whl/" "see gpu_check.log"
fi
if [ -n "${GPU_CHECK_PIP:-}" ]; then
  # shellcheck disable=SC2086
  run_step "pip install $GPU_CHECK_PIP" 240 "$PY" -m pip install -q $GPU_CHECK_PIP
fi

# --- 3. versions of what this interpreter has ---------------------------------------------------------------
timeout 60 "$PY" - <<'PY' 2>&1 | tee -a "$RES/versions.txt" | tee -a "$LOG"
import importlib, platform, sys, warnings
warnings.simplefilter("ignore")
print(f"python: {platform.python_version()} ({sys.executable})")
def ver(mod):
    try:
        m = importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001 - report whatever breaks the import
        return f"missing ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})"
    return str(getattr(m, "__version__", "?"))
for mod in ("numpy", "onnx", "onnx_ir", "yaml", "click", "rich", "pytest"):
    print(f"{mod}: {ver(mod)}")
print(f"tensorrt: {ver('tensorrt')}")
try:
    import onnxruntime as ort
    print(f"onnxruntime: {ort.__version__} providers={ort.get_available_providers()}")
except Exception as e:  # noqa: BLE001
    print(f"onnxruntime: missing ({e})")
try:
    from cuda.bindings import runtime as rt
    import cuda.bindings
    err, rtv = rt.cudaRuntimeGetVersion()
    err2, drv = rt.cudaDriverGetVersion()
    err3, n = rt.cudaGetDeviceCount()
    print(f"cuda-bindings: {cuda.bindings.__version__} runtime={rtv} driver={drv} devices={n} "
          f"({getattr(err3, 'name', err3)})")
    from eecompile.runtimes.tensorrt import query_gpu
    print(f"eecompile query_gpu: {query_gpu(0)}")
except Exception as e:  # noqa: BLE001
    print(f"cuda-bindings: missing or failing ({type(e).__name__}: {e})")
print(f"torch (info only): {ver('torch')}")
PY
HAVE_TRT=$("$PY" -c "import tensorrt; print(int(hasattr(tensorrt, '__version__')))" 2>/dev/null || echo 0)
HAVE_CUDA=$("$PY" -c "from cuda.bindings import runtime" >/dev/null 2>&1 && echo 1 || echo 0)
HAVE_ORT_CUDA=$("$PY" -c "import onnxruntime as o; print(int('CUDAExecutionProvider' in o.get_available_providers()))" \
  2>/dev/null || echo 0)
[ "$HAVE_CUDA" = 1 ] || record skip "CUDA layer" "cuda-python (cuda.bindings) not importable"
[ "$HAVE_TRT" = 1 ] || record skip "TensorRT build/run" "tensorrt not importable (pip install tensorrt-cu12/cu13 needs NVIDIA's index)"
[ "$HAVE_ORT_CUDA" = 1 ] || record skip "ORT CUDA EP" "onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu)"

# --- 4. the gpu tests -----------------------------------------------------------------------------------------
PYTEST_ARGS=(-q -m gpu -p no:cacheprovider -o addopts= -o filterwarnings= -rA "--junitxml=$RES/junit.xml")
"$PY" -c "import pytest_timeout" >/dev/null 2>&1 && PYTEST_ARGS+=(--timeout=150)
run_step "pytest -m gpu" 210 "$PY" -m pytest "${PYTEST_ARGS[@]}" tests/trt tests/runtimes/test_onnxruntime.py

# --- 5. short benchmark (TensorRT only) -------------------------------------------------------------------------
if [ "$HAVE_TRT" = 1 ] && [ "$HAVE_CUDA" = 1 ]; then
  run_step "benchmark (TensorRT chain)" 120 "$PY" - <<'PY'
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
    t0 = time.perf_counter()
    report = build_engines(path, "tensorrt", max_batch=32, timing_cache=Path(d) / "tc")
    print(f"built {report.target} in {time.perf_counter() - t0:.1f} s")
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
else
  record skip "benchmark (TensorRT chain)" "needs tensorrt and cuda-python"
fi

# --- 6. summary -----------------------------------------------------------------------------------------------
{
  echo ""
  echo "=== gpu_check summary ($(( $(date +%s) - start )) s) ==="
  cat "$RES/versions.txt"
  echo "---"
  printf '%s\n' "${SUMMARY[@]}"
  if [ -f "$RES/junit.xml" ]; then
    "$PY" - "$RES/junit.xml" <<'PY' 2>/dev/null
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
for case in root.iter("testcase"):
    status = "pass"
    for child in case:
        if child.tag in ("failure", "error"):
            status = child.tag.upper()
        elif child.tag == "skipped":
            status = "skip: " + (child.get("message") or "")[:90]
    if "deselected" not in status:
        print(f"  {case.get('classname', '').split('.')[-1]}::{case.get('name')}: {status}")
PY
  fi
  if [ "$FAILED" != 0 ]; then
    echo "result: FAIL"
  elif ! grep -q '<testcase' "$RES/junit.xml" 2>/dev/null \
      || [ "$("$PY" -c "import sys, xml.etree.ElementTree as E
r = E.parse(sys.argv[1]).getroot()
print(sum(1 for c in r.iter('testcase') if not any(x.tag in ('skipped', 'failure', 'error') for x in c)))" \
      "$RES/junit.xml" 2>/dev/null || echo 0)" = 0 ]; then
    echo "result: NOTHING CHECKED (every gpu test was skipped: see the reasons above)"
  else
    echo "result: PASS"
  fi
} | tee "$RES/summary.txt" | tee -a "$LOG"
if [ "$FAILED" != 0 ]; then exit 1; fi
grep -q "NOTHING CHECKED" "$RES/summary.txt" && exit 3
exit 0
