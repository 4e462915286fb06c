"""Shared fixtures: third-party graphs (the model-zoo graphs the onnx package ships, PyTorch exports),
head files, and spec writing."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

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
    """A linear head ONNX file for a cut tensor: [B,C,H,W] -> pool; [B,T,D] -> first token; [B,D] -> as is."""
    rng = np.random.default_rng(seed)
    rank = len(feature_shape)
    width = feature_shape[1] if rank in (2, 4) else feature_shape[2]
    w = nh.from_array((rng.standard_normal((n_classes, width)) * scale).astype(np.float32), "W")
    b = nh.from_array(np.zeros(n_classes, np.float32), "B")
    inits = [w, b]
    nodes = []
    if rank == 4:
        nodes += [oh.make_node("GlobalAveragePool", ["x"], ["p"]), oh.make_node("Flatten", ["p"], ["f"])]
    elif rank == 3:
        inits.append(nh.from_array(np.array(0, dtype=np.int64), "zero"))
        nodes.append(oh.make_node("Gather", ["x", "zero"], ["f"], axis=1))
    else:
        nodes.append(oh.make_node("Identity", ["x"], ["f"]))
    nodes.append(oh.make_node("Gemm", ["f", "W", "B"], ["y"], transB=1))
    in_shape = ["N", *feature_shape[1:]] if rank != 4 else ["N", feature_shape[1], "H", "W"]
    g = oh.make_graph(nodes, "head", [oh.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                      [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_classes])], inits)
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.save(m, path)
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
