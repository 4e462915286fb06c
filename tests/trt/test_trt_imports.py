"""The embedded runtime must import on a Jetson with only numpy, pyyaml, tensorrt and cuda-python."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
import eecompile.runtimes.tensorrt, eecompile.runtimes.records
heavy = sorted(m for m in ("onnx", "onnx_ir", "onnxruntime", "torch", "polygraphy", "tensorrt", "cuda")
               if m in sys.modules)
print(",".join(heavy))
"""


def test_runtime_imports_neither_onnx_nor_torch() -> None:
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True)
    # tensorrt and cuda-python are imported lazily too: only when a runtime is created.
    assert out.stdout.strip() == "", f"imported at module load: {out.stdout.strip()}"
