"""The runtime stands alone: run, bench and calibrate work where onnx, onnx_ir, torch, click and rich cannot be
imported, and the runtime package imports nothing of the compiler (checked on the source, with ast).

The bundle is compiled here (the compiler needs onnx); each device call runs in a fresh interpreter whose import
system refuses the fenced packages (a meta-path finder raising ImportError), as on a Jetson with the runtime-only
install.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "eecompile"
FENCED = ("onnx", "onnx_ir", "onnxscript", "torch", "click", "rich", "transformers", "polygraphy")
COMPILER = ("eecompile.build", "eecompile.passes", "eecompile.analysis", "eecompile.compiler", "eecompile.cli",
            "eecompile.heads", "eecompile.train", "eecompile.models", "eecompile.benchmark", "eecompile.io",
            "eecompile.inspect", "eecompile.serve")
# What eecompile/runtimes/ may import from eecompile itself.
RUNTIME_MAY_IMPORT = ("eecompile.runtimes", "eecompile.bundle", "eecompile.errors", "eecompile.names")

FENCE = f"""
import importlib.abc, sys
FENCED = {FENCED!r}
COMPILER = {COMPILER!r}
class _Fence(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FENCED or any(name == c or name.startswith(c + ".") for c in COMPILER):
            raise ImportError(f"{{name}} is fenced off: the runtime must work without it")
        return None
sys.meta_path.insert(0, _Fence())
"""

LIBRARY = FENCE + """
import json
from pathlib import Path
import numpy as np
import eecompile
from eecompile.runtimes.bench import bench_bundle
from eecompile.runtimes.files import run_npz

bundle, data, work = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
x = np.load(data)["x"]
with eecompile.load(bundle, threads=1) as runner:
    res = runner.run({"x": x[:8]})
    never = runner.run({"x": x[:8]}, policy="never", extra_outputs={0: ["h1"]})
summary = run_npz(bundle, data, work / "out.npz", batch_size=16, threads=1)
report = bench_bundle(bundle, data, batch_size=4, repeats=2, threads=1, warmup=0)
print(json.dumps({"exits": res.exit_index.tolist(), "extra": list(never.extra[0]["h1"].shape),
                  "summary": summary, "bench": report.to_json()["reference"],
                  "fenced_loaded": sorted(m for m in sys.modules if m.split(".")[0] in FENCED)}))
"""

CALIBRATE = FENCE + """
from pathlib import Path
from eecompile.calibrate import calibrate_bundle

cal = calibrate_bundle(Path(sys.argv[1]), Path(sys.argv[2]), max_drop=0.1, repeats=3, threads=1, quiet=True)
# Whether a setting is deployed depends on the measured latencies (a loaded machine can make early exits look no
# cheaper); the fence is about what calibrating imports, so both outcomes count, each with a complete report.
assert cal.n_samples == 48 and len(cal.exits) == 3 and cal.deployed in (True, False)
print(cal.drop, sorted(m for m in sys.modules if m.split(".")[0] in FENCED))
"""

DEVICE = FENCE + """
import runpy
sys.argv = ["eecompile-device", *sys.argv[1:]]
runpy.run_module("eecompile.device", run_name="__main__")
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A real compiled bundle (a 5-layer MLP, exits after h1 and h3) and an .npz with inputs and labels."""
    from benchmarks import models

    d = tmp_path_factory.mktemp("fence")
    src = models.mlp(d / "mlp.onnx", 5, width=16)
    bundle = models.compile_with_exits(src, ["h1", "h3"], d / "mlp.eebundle", n_classes=10, opset=17,
                                       shapes={"h1": ["batch", 16], "h3": ["batch", 16]}, threshold=0.15)
    rng = np.random.default_rng(0)
    data = d / "in.npz"
    np.savez(data, x=rng.standard_normal((48, 16)).astype(np.float32), labels=rng.integers(0, 10, 48))
    return bundle, data


def _python(code: str, *args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_the_fence_itself_refuses_onnx(tmp_path: Path) -> None:
    out = _python(FENCE + "import onnx\n", cwd=tmp_path)
    assert out.returncode != 0 and "onnx is fenced off" in out.stderr


@pytest.mark.slow
def test_run_and_bench_as_library_calls_without_the_compiler(compiled: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, data = compiled
    out = _python(LIBRARY, bundle, data, tmp_path, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(got["exits"]) == 8 and got["extra"] == [8, 16]
    assert "48 samples" in got["summary"] and got["fenced_loaded"] == []
    assert got["bench"] in ("unsplit-model", "gates-never")
    with np.load(tmp_path / "out.npz") as z:
        assert z["exit_index"].shape == (48,)


@pytest.mark.slow
def test_calibrate_as_a_library_call_without_the_compiler(compiled: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, data = compiled
    copy = shutil.copytree(bundle, tmp_path / "cal.eebundle")
    out = _python(CALIBRATE, copy, data, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    drop, loaded = out.stdout.strip().split(" ", 1)
    assert abs(float(drop)) <= 1.0 and loaded == "[]"


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "bench", "calibrate"])
def test_device_entry_point_without_the_compiler(compiled: tuple[Path, Path], tmp_path: Path, command: str) -> None:
    bundle, data = compiled
    if command == "calibrate":
        bundle = Path(shutil.copytree(bundle, tmp_path / "cal.eebundle"))
    extra = {"run": ["-o", tmp_path / "o.npz", "--thresholds", "0.5,never"],
             "bench": ["--repeats", "2", "--json"],
             "calibrate": ["--max-drop", "0.1", "--repeats", "3"]}[command]
    out = _python(DEVICE, command, bundle, "--data", data, "--threads", "1", *extra, cwd=tmp_path)
    assert "fenced off" not in out.stderr, out.stderr[-3000:]
    # calibrate exits 1 when no setting is deployed (latency-dependent, see CALIBRATE); it still reports
    ok = (0, 1) if command == "calibrate" else (0,)
    assert out.returncode in ok, out.stderr[-3000:]
    if command == "run":
        assert "48 samples" in out.stdout and (tmp_path / "o.npz").is_file()
    elif command == "bench":
        assert json.loads(out.stdout)["n_samples"] == 48
    else:
        assert ("expected speedup" in out.stdout) if out.returncode == 0 else ("NOT DEPLOYED" in out.stderr)


def test_device_entry_point_reports_user_errors_in_one_line(compiled: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, data = compiled
    out = _python(DEVICE, "run", bundle, "--data", data, "-o", tmp_path / "o.npz", "--thresholds", "2,never",
                  cwd=tmp_path)
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert "--thresholds[0]" in out.stderr and "outside [0, 1]" in out.stderr


# ------------------------------------------------------------------------------------------- import graph


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at module level or inside functions (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path) if m in modules and m != name}
    return graph


def _group(module: str) -> str:
    """Runtime side (what a device runs) or compiler side; leaf modules both use count as their own groups."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def test_runtime_imports_nothing_of_the_compiler() -> None:
    bad = []
    for module, deps in _graph().items():
        if not module.startswith("eecompile.runtimes"):
            continue
        for dep in deps:
            if not any(dep == a or dep.startswith(a + ".") for a in RUNTIME_MAY_IMPORT):
                bad.append(f"{module} imports {dep}")
        external = {m.split(".")[0] for m in _imports(_path_of(module))} & set(FENCED)
        bad += [f"{module} imports {m}" for m in sorted(external)]
    assert bad == [], "the runtime must stand alone:\n" + "\n".join(sorted(bad))


def _path_of(module: str) -> Path:
    rel = Path(*module.split("."))
    return ROOT / (rel / "__init__.py" if (ROOT / rel).is_dir() else rel.with_suffix(".py"))


def test_no_import_cycles_between_packages() -> None:
    """Package-level graph (eecompile.runtimes, eecompile.build, eecompile.calibrate, eecompile.bundle, ...): no
    cycle, so the runtime can be installed and reasoned about without what sits above it."""
    edges: dict[str, set[str]] = {}
    for module, deps in _graph().items():
        a = _group(module)
        edges.setdefault(a, set()).update(_group(d) for d in deps if _group(d) != a and _group(d) != "eecompile")
    cycles = []
    for start in edges:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in edges.get(node, ()):
                if nxt == start:
                    cycles.append(" -> ".join([*path, nxt]))
                elif nxt not in path and len(path) < len(edges):
                    stack.append((nxt, [*path, nxt]))
    runtime_cycles = [c for c in cycles if "eecompile.runtimes" in c]
    assert runtime_cycles == [], "import cycles through the runtime:\n" + "\n".join(sorted(set(runtime_cycles)))
