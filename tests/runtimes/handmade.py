"""Small bundles written by hand (onnx.helper + the bundle writer), so the runtime can be tested without
the compiler.

The chain is a tiny MLP cut into three segments::

    seg0: x[B,4] -> h0[B,8] -> exit 0 (logits [B,3], max_prob gate)
          carries out h0 (batch axis 0), hT = h0 as [2,B,4] (batch axis 1), pos [1,2] (no batch axis)
    seg1: hT, pos -> h1[B,8] -> exit 1 (max_prob gate); carries out h1
    seg2: h1, ids (int64 model input carried through from the start) -> logits[B,3] (final exit)

Gates are computed in the graph (Softmax, ReduceMax, GreaterOrEqual) and never fire on NaN/Inf logits.
:class:`Handmade` also holds the weights and a numpy reference of every exit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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

OPSET = 18
D_IN, HIDDEN, CLASSES, T = 4, 8, 3, 2


@dataclass
class Handmade:
    path: Path
    weights: dict[str, np.ndarray]

    def exits(self, x: np.ndarray, ids: np.ndarray) -> list[np.ndarray]:
        """Every exit's logits for every sample (numpy reference)."""
        w = self.weights
        h0 = np.maximum(x @ w["W0"] + w["b0"], 0)
        l0 = h0 @ w["Wh0"] + w["bh0"]
        pos = w["pos"].reshape(T, 1, 1)
        u = (h0.reshape(-1, T, HIDDEN // T).transpose(1, 0, 2) + pos).transpose(1, 0, 2).reshape(-1, HIDDEN)
        h1 = np.maximum(u @ w["W1"] + w["b1"], 0)
        l1 = h1 @ w["Wh1"] + w["bh1"]
        l2 = (h1 + ids.astype(np.float32) @ w["Wi"]) @ w["W2"] + w["b2"]
        return [l0.astype(np.float32), l1.astype(np.float32), l2.astype(np.float32)]

    def inputs(self, n: int, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {"x": rng.normal(size=(n, D_IN)).astype(np.float32),
                "ids": rng.integers(0, 5, size=(n, T)).astype(np.int64)}


def _init(name: str, a: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(a, name)


def _vi(t: TensorInfo) -> onnx.ValueInfoProto:
    elem = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64, "bool": TensorProto.BOOL}[t.dtype]
    return helper.make_tensor_value_info(t.name, elem, t.shape)


def _gate(k: int, logits: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """max softmax >= threshold, and never on a row with NaN/Inf logits."""
    p = f"ee{k}"
    nodes = [
        helper.make_node("Softmax", [logits], [f"{p}.prob"], axis=-1),
        helper.make_node("ReduceMax", [f"{p}.prob", f"{p}.axes"], [f"{p}.maxp"], keepdims=0),
        helper.make_node("GreaterOrEqual", [f"{p}.maxp", f"{p}.threshold"], [f"{p}.ge"]),
        helper.make_node("ReduceSum", [logits, f"{p}.axes"], [f"{p}.sum"], keepdims=0),
        helper.make_node("IsNaN", [f"{p}.sum"], [f"{p}.nan"]),
        helper.make_node("IsInf", [f"{p}.sum"], [f"{p}.inf"]),
        helper.make_node("Or", [f"{p}.nan", f"{p}.inf"], [f"{p}.bad"]),
        helper.make_node("Not", [f"{p}.bad"], [f"{p}.ok"]),
        helper.make_node("And", [f"{p}.ge", f"{p}.ok"], [f"{p}.gate"]),
    ]
    return nodes, [_init(f"{p}.axes", np.array([-1], np.int64))]


def _save(root: Path, rel: str, nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto],
          inputs: list[TensorInfo], outputs: list[TensorInfo], threshold: str | None) -> None:
    graph_inputs = [_vi(t) for t in inputs]
    if threshold is not None:
        graph_inputs.append(helper.make_tensor_value_info(threshold, TensorProto.FLOAT, []))
    graph = helper.make_graph(nodes, rel, graph_inputs, [_vi(t) for t in outputs], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, root / rel)


def make_bundle(dest: Path, *, thresholds: tuple[float, float] = (0.6, 0.7), per_sample: bool = False,
                seed: int = 0) -> Handmade:
    """Write the three-segment handmade bundle to ``dest``. ``per_sample`` fixes the batch dim at 1 in
    every graph and marks the bundle ``batch_mode: per_sample`` (ORT then refuses any other batch size)."""
    rng = np.random.default_rng(seed)

    def w(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (rng.normal(size=shape) * scale).astype(np.float32)

    weights = {
        "W0": w(D_IN, HIDDEN, scale=0.8), "b0": w(HIDDEN, scale=0.1),
        "Wh0": w(HIDDEN, CLASSES, scale=0.7), "bh0": w(CLASSES, scale=0.1),
        "pos": w(1, T, scale=0.5),
        "W1": w(HIDDEN, HIDDEN, scale=0.6), "b1": w(HIDDEN, scale=0.1),
        "Wh1": w(HIDDEN, CLASSES, scale=0.8), "bh1": w(CLASSES, scale=0.1),
        "Wi": w(T, HIDDEN, scale=0.3),
        "W2": w(HIDDEN, CLASSES, scale=0.9), "b2": w(CLASSES, scale=0.1),
    }
    B: int | str = 1 if per_sample else "B"

    def ti(name: str, dtype: str, shape: list[int | str | None], axis: int | None = 0) -> TensorInfo:
        return TensorInfo(name=name, dtype=dtype, shape=shape, batch_axis=axis)

    x, ids = ti("x", "float32", [B, D_IN]), ti("ids", "int64", [B, T])
    h0, h_t = ti("h0", "float32", [B, HIDDEN]), ti("hT", "float32", [T, B, HIDDEN // T], 1)
    pos, h1 = ti("pos", "float32", [1, T], None), ti("h1", "float32", [B, HIDDEN])

    with staged_bundle(dest) as root:
        # --- seg0
        g0, gi0 = _gate(0, "ee0.out.logits")
        nodes0 = [
            helper.make_node("MatMul", ["x", "W0"], ["mm0"]),
            helper.make_node("Add", ["mm0", "b0"], ["pre0"]),
            helper.make_node("Relu", ["pre0"], ["h0"]),
            helper.make_node("Reshape", ["h0", "split_shape"], ["h0r"]),
            helper.make_node("Transpose", ["h0r"], ["hT"], perm=[1, 0, 2]),
            helper.make_node("Identity", ["pos_const"], ["pos"]),
            helper.make_node("MatMul", ["h0", "Wh0"], ["ee0.mm"]),
            helper.make_node("Add", ["ee0.mm", "bh0"], ["ee0.out.logits"]),
            *g0,
        ]
        inits0 = [_init(n, weights[n]) for n in ("W0", "b0", "Wh0", "bh0")] + gi0 + [
            _init("split_shape", np.array([0, T, HIDDEN // T], np.int64)),  # 0 copies the batch dim
            _init("pos_const", weights["pos"]),
        ]
        out0 = [h0, h_t, pos, ti("ee0.out.logits", "float32", [B, CLASSES]), ti("ee0.gate", "bool", [B])]
        _save(root, "segments/seg0.onnx", nodes0, inits0, [x], out0, "ee0.threshold")

        # --- seg1
        g1, gi1 = _gate(1, "ee1.out.logits")
        nodes1 = [
            helper.make_node("Reshape", ["pos", "pos_shape"], ["pos3"]),
            helper.make_node("Add", ["hT", "pos3"], ["u0"]),
            helper.make_node("Transpose", ["u0"], ["u1"], perm=[1, 0, 2]),
            helper.make_node("Reshape", ["u1", "flat_shape"], ["u"]),
            helper.make_node("MatMul", ["u", "W1"], ["mm1"]),
            helper.make_node("Add", ["mm1", "b1"], ["pre1"]),
            helper.make_node("Relu", ["pre1"], ["h1"]),
            helper.make_node("MatMul", ["h1", "Wh1"], ["ee1.mm"]),
            helper.make_node("Add", ["ee1.mm", "bh1"], ["ee1.out.logits"]),
            *g1,
        ]
        inits1 = [_init(n, weights[n]) for n in ("W1", "b1", "Wh1", "bh1")] + gi1 + [
            _init("pos_shape", np.array([T, 1, 1], np.int64)),
            _init("flat_shape", np.array([0, HIDDEN], np.int64)),
        ]
        out1 = [h1, ti("ee1.out.logits", "float32", [B, CLASSES]), ti("ee1.gate", "bool", [B])]
        _save(root, "segments/seg1.onnx", nodes1, inits1, [h_t, pos], out1, "ee1.threshold")

        # --- seg2 (final)
        nodes2 = [
            helper.make_node("Cast", ["ids"], ["idsf"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["idsf", "Wi"], ["emb"]),
            helper.make_node("Add", ["h1", "emb"], ["h2"]),
            helper.make_node("MatMul", ["h2", "W2"], ["mm2"]),
            helper.make_node("Add", ["mm2", "b2"], ["logits"]),
        ]
        inits2 = [_init(n, weights[n]) for n in ("Wi", "W2", "b2")]
        logits = ti("logits", "float32", [B, CLASSES])
        _save(root, "segments/seg2.onnx", nodes2, inits2, [h1, ids], [logits], None)

        def gate(k: int) -> GateInfo:
            return GateInfo(kind="max_prob", threshold=thresholds[k], output=f"ee{k}.gate",
                            threshold_input=f"ee{k}.threshold")

        segments = [
            SegmentInfo(index=0, file="segments/seg0.onnx", inputs=[x], outputs=out0,
                        exit=ExitInfo(index=0, at=["h0"], head="trained:linear",
                                      outputs={"logits": "ee0.out.logits"}, gate=gate(0)),
                        carried_out=["hT", "pos"], flops=100, flops_fraction=0.4),
            SegmentInfo(index=1, file="segments/seg1.onnx", inputs=[h_t, pos], outputs=out1,
                        exit=ExitInfo(index=1, at=["h1"], head="trained:linear",
                                      outputs={"logits": "ee1.out.logits"}, gate=gate(1)),
                        carried_out=["h1"], flops=100, flops_fraction=0.4),
            SegmentInfo(index=2, file="segments/seg2.onnx", inputs=[h1, ids], outputs=[logits],
                        exit=ExitInfo(index=2, at=["logits"], head="model-output:logits",
                                      outputs={"logits": "logits"}),
                        flops=50, flops_fraction=0.2),
        ]
        manifest = Manifest(
            source_model={"file": "handmade.onnx", "sha256": "0" * 64},
            inputs=[x, ids], outputs=[logits], segments=segments,
            batch_mode="per_sample" if per_sample else "dynamic", eecompile_version="test",
        )
        write_manifest(root, manifest)
    return Handmade(path=Path(dest), weights=weights)


def load(dest: Path) -> Bundle:
    return Bundle.load(dest)
