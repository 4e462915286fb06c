"""Shared fixtures: third-party graphs (the model-zoo graphs the onnx package ships, PyTorch exports),
head files, and spec writing."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

ZOO = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def zoo_model(name: str) -> Path:
    """A model-zoo graph shipped in the onnx package (IR 3, opset 9, weights made by ConstantOfShape)."""
    path = ZOO / f"light_{name}.onnx"
    if not path.exists():
        pytest.skip(f"onnx package does not ship {path.name}")
    return path


@pytest.fixture(scope="session")
def torch_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("torch_models")


@pytest.fixture(scope="session")
def torch_model(torch_model_dir: Path) -> Callable[[str], Path]:
    pytest.importorskip("torch")
    from torch_models import export

    return lambda name: export(name, torch_model_dir)


def make_head(path: Path, feature_shape: list, n_classes: int, opset: int = 17, seed: int = 0,
              scale: float = 0.05) -> Path:
    """A linear head ONNX file for a cut tensor ([B,C,H,W] -> pool; [B,T,D] -> first token; [B,D] -> as is),
    built with eecompile's own head template and random weights (an untrained head would never fire)."""
    from eecompile.heads import head_onnx, weight_shapes

    shape = list(feature_shape)
    if len(shape) == 4:
        shape[2:] = ["H", "W"]  # any spatial size
    options = {"pool": "first"} if len(shape) == 3 else None
    rng = np.random.default_rng(seed)
    weights = {name: (np.zeros(s, np.float32) if name.endswith(".bias")
                      else (rng.standard_normal(s) * scale).astype(np.float32))
               for name, s in weight_shapes("linear", shape, n_classes, options).items()}
    onnx.save(head_onnx("linear", shape, n_classes, options, weights, opset), path)
    return path


def write_spec(directory: Path, model: Path, exits: list[dict], final: dict | None = None,
               name: str = "spec.yaml") -> Path:
    import yaml

    doc: dict = {"model": str(model), "exits": exits}
    if final:
        doc["final"] = final
    path = directory / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def ray_serve():
    """One local Ray instance (2 CPUs, no dashboard) with Serve's proxy on a free loopback port, for this test
    process; at the end Serve and Ray shut down and none of the processes they started is left. Defined here, once
    for every test package: a second definition (a module importing it) is a second session fixture, and its
    ``ray.init`` fails in a worker that already ran the first."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.serve")
    import time

    from ray import serve

    from tests.serve.client import own_descendants
    from tests.serve.conftest import free_ports

    before = set(own_descendants())
    metrics_port, port = free_ports(2)
    ray.init(num_cpus=2, include_dashboard=False, _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 500})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield {"port": port, "metrics_port": metrics_port}
    finally:
        serve.shutdown()
        ray.shutdown()
    deadline = time.time() + 20
    while time.time() < deadline and set(own_descendants()) - before:
        time.sleep(0.25)
    assert not set(own_descendants()) - before, "Ray left processes behind"
