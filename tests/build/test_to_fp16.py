"""fp16 conversion of segments for strongly typed TensorRT: numbers checked with ONNX Runtime on CPU."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from eecompile.build.to_fp16 import convert_segment_to_fp16


def _gated_mlp(seed: int = 0) -> onnx.ModelProto:
    """MLP trunk with a LayerNorm-like ReduceMean, a head, and a max-prob gate named like the compiler's."""
    rng = np.random.default_rng(seed)

    def w(name: str, *shape: int, s: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * s).astype(np.float32), name)

    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="l1/mm"),
        helper.make_node("Relu", ["h"], ["hr"], name="l1/relu"),
        helper.make_node("ReduceMean", ["hr"], ["mu"], name="ln/mean", axes=[-1], keepdims=1),
        helper.make_node("Sub", ["hr", "mu"], ["hc"], name="ln/sub"),
        helper.make_node("MatMul", ["hc", "W2"], ["ee0.out.logits"], name="ee0.head/mm"),
        helper.make_node("Softmax", ["ee0.out.logits"], ["ee0.gate/p"], name="ee0.gate/softmax", axis=-1),
        helper.make_node("ReduceMax", ["ee0.gate/p"], ["ee0.score"], name="ee0.gate/max", axes=[1], keepdims=0),
        helper.make_node("GreaterOrEqual", ["ee0.score", "thr"], ["ee0.gate"], name="ee0.gate/ge"),
    ]
    g = helper.make_graph(
        nodes, "seg0",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16]),
         helper.make_tensor_value_info("thr", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("hc", TensorProto.FLOAT, ["N", 32]),
         helper.make_tensor_value_info("ee0.out.logits", TensorProto.FLOAT, ["N", 10]),
         helper.make_tensor_value_info("ee0.score", TensorProto.FLOAT, ["N"]),
         helper.make_tensor_value_info("ee0.gate", TensorProto.BOOL, ["N"])],
        [w("W1", 16, 32), w("W2", 32, 10)],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


def _run(m: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _types(m: onnx.ModelProto) -> dict[str, int]:
    g = onnx.shape_inference.infer_shapes(m).graph
    t = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    t.update({i.name: i.data_type for i in g.initializer})
    return t


@pytest.fixture
def converted() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    m = _gated_mlp()
    return m, convert_segment_to_fp16(m)


def test_io_dtypes_unchanged(converted: tuple[onnx.ModelProto, onnx.ModelProto]) -> None:
    m, f = converted
    io = lambda model: [(v.name, v.type.tensor_type.elem_type) for v in [*model.graph.input, *model.graph.output]]  # noqa: E731
    assert io(f) == io(m)


def test_trunk_fp16_gate_and_reductions_fp32(converted: tuple[onnx.ModelProto, onnx.ModelProto]) -> None:
    _, f = converted
    types = _types(f)
    nodes = {n.name: n for n in f.graph.node}
    assert types[nodes["l1/mm"].input[1]] == TensorProto.FLOAT16  # trunk weights and matmuls are fp16
    assert types[nodes["l1/mm"].output[0]] == TensorProto.FLOAT16
    for name in ("ee0.gate/softmax", "ee0.gate/max", "ee0.gate/ge", "ln/mean"):
        assert all(types[i] == TensorProto.FLOAT for i in nodes[name].input), name
    # the threshold reaches the comparison unrounded: no fp32 -> fp16 -> fp32 round trip
    assert nodes["ee0.gate/ge"].input[1] == "thr"
    assert not any(n.op_type == "Cast" and n.input[0].endswith("_cast_to_fp16") and n.output[0].endswith("fp32")
                   for n in f.graph.node)


def test_numbers_within_fp16_tolerance(converted: tuple[onnx.ModelProto, onnx.ModelProto]) -> None:
    m, f = converted
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((64, 16)).astype(np.float32), "thr": np.array(0.3, np.float32)}
    ref, got = _run(m, feeds), _run(f, feeds)
    for name, a, b in zip(["hc", "logits", "score"], ref[:3], got[:3], strict=True):
        assert b.dtype == np.float32
        scale = np.abs(a).max()
        assert np.abs(a - b).max() <= 1e-2 * scale, name
    flips = ref[3] != got[3]
    assert (np.abs(ref[2][flips] - 0.3) < 1e-2).all()  # only samples at the threshold may flip


def test_graph_is_valid_and_sorted(converted: tuple[onnx.ModelProto, onnx.ModelProto]) -> None:
    _, f = converted
    onnx.checker.check_model(f, full_check=True)
    seen = {i.name for i in f.graph.input} | {t.name for t in f.graph.initializer}
    for n in f.graph.node:
        assert all(i in seen for i in n.input if i), n.name
        seen.update(n.output)


def test_conv_segment_from_the_handmade_bundle() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "trt"))
    from handmade import make_final_segment, make_gated_segment, random_inputs

    for m, extra in ((make_gated_segment(), {"ee0.threshold": np.array(0.75, np.float32)}),
                     (make_final_segment(), {})):
        f = convert_segment_to_fp16(m)
        feeds = dict(random_inputs(16)) | extra
        if "act" in {i.name for i in m.graph.input}:
            feeds = {"act": np.abs(random_inputs(16)["x"][:, :1].repeat(4, axis=1))}
        for a, b in zip(_run(m, feeds), _run(f, feeds), strict=True):
            assert a.dtype == b.dtype
            if a.dtype == np.float32:
                assert np.abs(a - b).max() <= 1e-2 * max(np.abs(a).max(), 1e-3)
