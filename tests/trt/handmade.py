"""Hand-made two-segment bundles (onnx.helper), used until the compiler writes real ones.

Segment 0: x[N,3,8,8] -> Conv -> Relu -> ``act`` (carried) -> GAP -> Gemm -> ``ee0.out.logits``, and a
max-prob gate named like the compiler's (``ee0.gate/...``): Softmax -> ReduceMax -> GreaterOrEqual(thr).
Segment 1: act -> Conv -> Relu -> GAP -> Gemm -> ``logits`` (the final exit).
The layout follows docs/bundle-format.md, so the tests exercise the same contract as compiled bundles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from eecompile.bundle import (
    Bundle,
    ExitInfo,
    GateInfo,
    Manifest,
    SegmentInfo,
    TensorInfo,
    staged_bundle,
    write_manifest,
)

OPSET = 17
C_IN, C_MID, HW, N_CLASSES = 3, 4, 8, 5


def _init(rng: np.random.Generator, name: str, shape: tuple[int, ...], scale: float = 0.5) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _head(prefix: str, src: str, out: str, rng: np.random.Generator) -> tuple[list[Any], list[Any]]:
    nodes = [
        helper.make_node("GlobalAveragePool", [src], [f"{prefix}/gap"], name=f"{prefix}/gap"),
        helper.make_node("Flatten", [f"{prefix}/gap"], [f"{prefix}/flat"], name=f"{prefix}/flatten", axis=1),
        helper.make_node("Gemm", [f"{prefix}/flat", f"{prefix}/W", f"{prefix}/b"], [out], name=f"{prefix}/gemm",
                         transB=1),
    ]
    inits = [_init(rng, f"{prefix}/W", (N_CLASSES, C_MID), 0.6), _init(rng, f"{prefix}/b", (N_CLASSES,))]
    return nodes, inits


def make_gated_segment(seed: int = 0, sym_hw: bool = False) -> onnx.ModelProto:
    """Segment 0 of the hand-made bundle (conv + head + max-prob gate)."""
    rng = np.random.default_rng(seed)
    hw: Any = "H" if sym_hw else HW
    nodes = [
        helper.make_node("Conv", ["x", "seg0/W", "seg0/b"], ["seg0/conv"], name="seg0/conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["seg0/conv"], ["act"], name="seg0/relu"),
    ]
    inits = [_init(rng, "seg0/W", (C_MID, C_IN, 3, 3)), _init(rng, "seg0/b", (C_MID,))]
    hn, hi = _head("ee0.head", "act", "ee0.out.logits", rng)
    nodes += hn
    inits += hi
    nodes += [
        helper.make_node("Softmax", ["ee0.out.logits"], ["ee0.gate/p"], name="ee0.gate/softmax", axis=-1),
        helper.make_node("ReduceMax", ["ee0.gate/p"], ["ee0.score"], name="ee0.gate/max", axes=[1], keepdims=0),
        helper.make_node("GreaterOrEqual", ["ee0.score", "ee0.threshold"], ["ee0.gate"], name="ee0.gate/ge"),
    ]
    graph = helper.make_graph(
        nodes, "seg0",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C_IN, hw, hw]),
         helper.make_tensor_value_info("ee0.threshold", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("act", TensorProto.FLOAT, ["N", C_MID, hw, hw]),
         helper.make_tensor_value_info("ee0.out.logits", TensorProto.FLOAT, ["N", N_CLASSES]),
         helper.make_tensor_value_info("ee0.score", TensorProto.FLOAT, ["N"]),
         helper.make_tensor_value_info("ee0.gate", TensorProto.BOOL, ["N"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def make_final_segment(seed: int = 1, sym_hw: bool = False) -> onnx.ModelProto:
    """Segment 1 (the final exit)."""
    rng = np.random.default_rng(seed)
    hw: Any = "H" if sym_hw else HW
    nodes = [
        helper.make_node("Conv", ["act", "seg1/W", "seg1/b"], ["seg1/conv"], name="seg1/conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["seg1/conv"], ["seg1/act"], name="seg1/relu"),
    ]
    inits = [_init(rng, "seg1/W", (C_MID, C_MID, 3, 3)), _init(rng, "seg1/b", (C_MID,))]
    hn, hi = _head("seg1.head", "seg1/act", "logits", rng)
    graph = helper.make_graph(
        nodes + hn, "seg1",
        [helper.make_tensor_value_info("act", TensorProto.FLOAT, ["N", C_MID, hw, hw])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", N_CLASSES])],
        inits + hi,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def make_manifest(sym_hw: bool = False) -> Manifest:
    """The manifest that describes the two segments above."""
    hw: Any = "H" if sym_hw else HW
    x = TensorInfo("x", "float32", ["N", C_IN, hw, hw], 0)
    act = TensorInfo("act", "float32", ["N", C_MID, hw, hw], 0)
    gate = GateInfo(kind="max_prob", threshold=0.9, output="ee0.gate", threshold_input="ee0.threshold")
    gate.score_output = "ee0.score"
    seg0 = SegmentInfo(
        index=0, file="segments/seg0.onnx", inputs=[x],
        outputs=[act, TensorInfo("ee0.out.logits", "float32", ["N", N_CLASSES], 0),
                 TensorInfo("ee0.score", "float32", ["N"], 0), TensorInfo("ee0.gate", "bool", ["N"], 0)],
        exit=ExitInfo(index=0, at=["act"], head="trained:linear", outputs={"logits": "ee0.out.logits"}, gate=gate),
        carried_out=["act"],
    )
    seg1 = SegmentInfo(
        index=1, file="segments/seg1.onnx", inputs=[act],
        outputs=[TensorInfo("logits", "float32", ["N", N_CLASSES], 0)],
        exit=ExitInfo(index=1, at=["logits"], head="model-output:logits", outputs={"logits": "logits"}),
    )
    return Manifest(
        source_model={"file": "handmade.onnx", "sha256": "0" * 64},
        inputs=[x], outputs=[TensorInfo("logits", "float32", ["N", N_CLASSES], 0)],
        segments=[seg0, seg1], eecompile_version="test",
    )


def write_bundle(dest: str | Path, sym_hw: bool = False) -> Bundle:
    """Write the hand-made bundle to ``dest`` atomically, as the compiler would."""
    with staged_bundle(dest) as tmp:
        (tmp / "segments").mkdir()
        onnx.save(make_gated_segment(sym_hw=sym_hw), tmp / "segments" / "seg0.onnx")
        onnx.save(make_final_segment(sym_hw=sym_hw), tmp / "segments" / "seg1.onnx")
        write_manifest(tmp, make_manifest(sym_hw=sym_hw))
    return Bundle.load(dest)


def random_inputs(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, C_IN, HW, HW)).astype(np.float32)}
