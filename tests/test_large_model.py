"""Models with external data (the only way to ship > 2 GB): they compile without loading every weight into
memory twice. Tested with small models saved with external data, and one with 200 MB of weights whose peak
memory is measured in a subprocess.

The mechanism: ``passes/load.py`` parses the protobuf without external data and ``ir.load`` memory-maps the
weights (``ir.ExternalTensor``); ONNX Runtime sessions are built from the graph proto with the weights still
external, and segments are written with ``ir.save`` streaming the tensors out.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from eecompile.errors import GraphError
from eecompile.passes.load import load_model
from tests.bad_inputs.util import D, linear_head, spec_doc, tiny_mlp, write_yaml


def _workspace(root: Path, *, d: int = D, layers: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tiny_mlp(root / "model.onnx", d=d, layers=layers, external=True)
    linear_head(root / "head0.onnx", width=d, seed=1)
    linear_head(root / "head1.onnx", width=d, seed=2)
    write_yaml(root / "spec.yaml", spec_doc())
    return root


def test_load_memory_maps_the_weights(tmp_path: Path) -> None:
    ws = _workspace(tmp_path / "ws")
    model = load_model(ws / "model.onnx")
    inits = list(model.graph.initializers.values())
    assert inits and all(isinstance(v.const_value, ir.ExternalTensor) for v in inits), \
        "load_model read the external weights into memory instead of memory-mapping them"


def test_missing_external_data_is_a_clear_error(tmp_path: Path) -> None:
    ws = _workspace(tmp_path / "ws")
    (ws / "model.onnx.data").unlink()
    with pytest.raises(GraphError, match=r"external data file 'model.onnx.data'.*not found beside the model.*"
                                         r"copy it next to the .onnx file"):
        load_model(ws / "model.onnx")


def test_preparing_never_loads_external_data_wholesale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading, shape inference, batch probing: no onnx.load(..., load_external_data=True) on the model."""
    from eecompile.compiler import prepare

    ws = _workspace(tmp_path / "ws")
    wholesale: list[str] = []
    real_load = onnx.load_model

    def spy_load(f, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if kwargs.get("load_external_data", True) and str(f).endswith("model.onnx"):
            wholesale.append(str(f))
        return real_load(f, *args, **kwargs)

    def spy_external(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        wholesale.append("load_external_data_for_model")

    monkeypatch.setattr(onnx, "load", spy_load)
    monkeypatch.setattr(onnx, "load_model", spy_load)
    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_model", spy_external)
    pm = prepare(ws / "model.onnx")
    assert not wholesale, wholesale
    assert all(isinstance(v.const_value, ir.ExternalTensor) for v in pm.model.graph.initializers.values())


def test_external_data_model_compiles_and_runs(tmp_path: Path) -> None:
    from eecompile.compiler import compile_model
    from eecompile.runtimes.chain import EarlyExitRunner

    ws = _workspace(tmp_path / "ws")
    compile_model(ws / "spec.yaml", tmp_path / "b.eebundle")  # the test's cwd is not the model's directory
    x = np.random.default_rng(0).standard_normal((5, D)).astype(np.float32)
    got = EarlyExitRunner(tmp_path / "b.eebundle", threads=1).run({"x": x}, thresholds="never")
    import onnxruntime as ort

    want = ort.InferenceSession(str(ws / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got.outputs["logits"], want, rtol=1e-5, atol=1e-5)


MEASURE = r'''
import json, resource, sys
from pathlib import Path
import onnxruntime, onnx, onnx_ir
import eecompile.compiler
from eecompile.compiler import prepare
def peak():
    # VmHWM: this process's own high-water mark (ru_maxrss would carry the parent's over exec).
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base = peak()
stage, ok, err = sys.argv[1], True, ""
try:
    if stage == "prepare":
        prepare(Path(sys.argv[2]))
    else:
        eecompile.compiler.compile_model(sys.argv[2], sys.argv[3])
except Exception as e:
    ok, err = False, f"{type(e).__name__}: {e}"
print(json.dumps({"baseline": base, "peak": peak(), "ok": ok, "error": err}))
'''


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """About 200 MB of weights in an external data file (12 layers of 2048 x 2048 float32)."""
    ws = tmp_path_factory.mktemp("big")
    d = 2048
    tiny_mlp(ws / "model.onnx", d=d, layers=12, external=True)
    linear_head(ws / "head0.onnx", width=d, seed=1)
    linear_head(ws / "head1.onnx", width=d, seed=2)
    write_yaml(ws / "spec.yaml", spec_doc())
    return ws, (ws / "model.onnx.data").stat().st_size


def _measure(ws: Path, *args: str) -> dict:
    if not Path("/proc/self/status").exists():
        pytest.skip("peak memory is read from /proc (Linux)")
    r = subprocess.run([sys.executable, "-c", MEASURE, *args], cwd=ws, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_preparing_a_200mb_model_stays_under_twice_its_weights(big: tuple[Path, int]) -> None:
    ws, weights = big
    m = _measure(ws, "prepare", str(ws / "model.onnx"))
    assert m["ok"], m["error"]
    extra = m["peak"] - m["baseline"]
    print(f"prepare: weights {weights / 2**20:.0f} MiB, peak {m['peak'] / 2**20:.0f} MiB, "
          f"above imports {extra / 2**20:.0f} MiB ({extra / weights:.2f}x the weights)")
    assert extra < 2 * weights, f"{extra / weights:.2f}x the weights"


@pytest.mark.slow
def test_compiling_a_200mb_model_stays_under_twice_its_weights(big: tuple[Path, int], tmp_path: Path) -> None:
    ws, weights = big
    m = _measure(ws, "compile", str(ws / "spec.yaml"), str(tmp_path / "b.eebundle"))
    assert m["ok"], m["error"]
    extra = m["peak"] - m["baseline"]
    print(f"compile: weights {weights / 2**20:.0f} MiB, above imports {extra / 2**20:.0f} MiB "
          f"({extra / weights:.2f}x)")
    assert extra < 2 * weights, f"{extra / weights:.2f}x the weights"
