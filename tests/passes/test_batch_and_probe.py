"""Making the batch dynamic, and what probing at two batch sizes finds out about each tensor."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from eecompile.analysis.probe import probe_model
from eecompile.passes.batch_dynamic import make_batch_dynamic
from eecompile.passes.load import normalise

FIXED_BATCH = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 2, 2, 2] x) => (float[1, 3] y) <float[8, 3] w = {1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24},
                                           int64[2] target = {1, 8}> {
    r = Relu(x)
    f = Reshape(r, target)
    y = MatMul(f, w)
}
"""

MIXES_SAMPLES = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[1, 4] x) => (float[1, 4] y) <int64[2] target = {1, 4}, int64[1] ax = {0}> {
    m = ReduceMean<keepdims = 1>(x, ax)
    s = Sub(x, m)
    y = Reshape(s, target)
}
"""


def _model(text: str) -> ir.Model:
    return normalise(ir.from_proto(onnx.parser.parse_model(text)))


def test_fixed_batch_reshape_target_becomes_dynamic() -> None:
    res = make_batch_dynamic(_model(FIXED_BATCH))
    assert res.mode == "dynamic" and res.rewritten
    sess = ort.InferenceSession(ir.to_proto(res.model).SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((5, 2, 2, 2)).astype(np.float32)
    y = sess.run(None, {"x": x})[0]
    w = np.arange(1, 25, dtype=np.float32).reshape(8, 3)
    np.testing.assert_allclose(y, np.maximum(x, 0).reshape(5, 8) @ w, rtol=1e-5)


def test_graph_that_mixes_samples_keeps_batch_one() -> None:
    # ReduceMean over axis 0 mixes the samples: made dynamic it would change results, so per-sample mode.
    res = make_batch_dynamic(_model(MIXES_SAMPLES))
    assert res.mode == "per_sample"
    assert "differs" in res.reason


PROBE = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3, 4] x) => (float[N, 3, 4] y) <float[4, 4] w = {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1},
                                             float[1, 3, 4] pos = {1,2,3,4,5,6,7,8,9,10,11,12},
                                             int64[2] flat = {-1, 4}> {
    t = Transpose<perm = [1, 0, 2]>(x)
    shp = Shape(x)
    folded = Reshape(x, flat)
    mm = MatMul(folded, w)
    p2 = Mul(pos, pos)
    back = Reshape(mm, shp)
    t2 = Transpose<perm = [1, 0, 2]>(t)
    s = Add(back, t2)
    y = Add(s, p2)
}
"""


def test_probe_classifies_batch_axes() -> None:
    model = _model(PROBE)
    names = [v.name for n in model.graph for v in n.outputs]
    res = probe_model(model, names)
    f = res.facts
    assert f["t"].batch_axis == 1 and f["t"].problem is None  # [3, B, 4]
    assert f["p2"].batch_axis is None and f["p2"].problem is None  # [1, 3, 4]: no batch, fixed value
    assert f["shp"].problem and "value changes" in f["shp"].problem  # a Shape output
    assert f["folded"].problem and "folds the batch" in f["folded"].problem  # [B*3, 4]
    assert f["s"].batch_axis == 0


def test_rejected_rewrite_is_undone_in_place() -> None:
    from eecompile.passes.batch_dynamic import BatchDynamicPass

    model = _model(MIXES_SAMPLES)
    before = {v.name: v.shape for v in [*model.graph.inputs, *model.graph.outputs]}
    target = model.graph.initializers["target"]
    p = BatchDynamicPass()
    result = p(model)
    assert result.model is model and not result.modified
    assert p.result is not None and p.result.mode == "per_sample" and "batch fixed at 1" in p.result.note
    # Expected: the graph as it was (batch 1 everywhere, the Reshape target's leading 1 back).
    assert {v.name: v.shape for v in [*model.graph.inputs, *model.graph.outputs]} == before
    assert target.const_value is not None and target.const_value.numpy().tolist() == [1, 4]
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([[1, 2, 3, 6]], np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], np.zeros_like(x))  # x minus its mean over the batch


def test_already_dynamic_model_is_left_alone() -> None:
    from eecompile.passes.batch_dynamic import BatchDynamicPass

    model = _model(PROBE)
    p = BatchDynamicPass()
    assert not p(model).modified and p.result is not None and p.result.note == "batch-dynamic"
