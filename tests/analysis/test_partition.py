"""Partition analysis on small graphs from ONNX text: which tensors each cut carries, what is recomputed."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest

from eecompile.analysis.partition import carried_across, index_graph, plan_segments
from eecompile.passes.load import normalise

RESIDUAL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] out) <float[4, 4] w1 = {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1},
                                         float[4, 4] w2 = {2,0,0,0, 0,2,0,0, 0,0,2,0, 0,0,0,2}> {
    a = MatMul(x, w1)
    r1 = Relu(a)
    b = MatMul(r1, w2)
    out = Add(r1, b)
}
"""

MASKED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, T, 4] x, int64[N, T] mask) => (float[N, T, 4] out) <float[4, 4] w = {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1},
                                                                  float one = {1.0}, float big = {-10000.0}> {
    mf = Cast<to = 1>(mask)
    inv = Sub(one, mf)
    bias0 = Mul(inv, big)
    ax = Constant<value_ints = [2]>()
    bias = Unsqueeze(bias0, ax)
    h1 = MatMul(x, w)
    a1 = Add(h1, bias)
    h2 = MatMul(a1, w)
    a2 = Add(h2, bias)
    h3 = MatMul(a2, w)
    out = Add(h3, bias)
}
"""


def _model(text: str) -> ir.Model:
    return normalise(ir.from_proto(onnx.parser.parse_model(text)))


def _cut(idx, name: str):
    v = idx.values[name]
    i = idx.producer_index(v)
    before = idx.anc[i]
    after = ((1 << len(idx.nodes)) - 1) & ~before
    return carried_across(idx, before, after)


def test_residual_cut_carries_the_skip_connection() -> None:
    idx = index_graph(_model(RESIDUAL))
    carried, inputs = _cut(idx, "r1")
    assert [v.name for v in carried] == ["r1"]
    # Cutting after the second MatMul: the skip connection r1 rides along with b.
    carried, _ = _cut(idx, "b")
    assert sorted(v.name for v in carried) == ["b", "r1"]
    assert inputs == []


def test_input_only_mask_is_recomputed_not_carried() -> None:
    idx = index_graph(_model(MASKED))
    rec = {n.outputs[0].name for n, r in zip(idx.nodes, idx.recomputable, strict=True) if r}
    assert {"mf", "inv", "bias0", "bias"} <= rec
    assert "h1" not in rec and "a1" not in rec
    carried, inputs = _cut(idx, "a1")
    # Only the hidden state crosses; the mask input is read after the cut (to recompute the bias).
    assert [v.name for v in carried] == ["a1"]
    assert [v.name for v in inputs] == ["mask"]


def test_plan_segments_assigns_each_node_once() -> None:
    idx = index_graph(_model(MASKED))
    v = idx.values
    plans = plan_segments(idx, [[v["a1"]], [v["a2"]], [v["out"]]])
    assert [p.node_count() for p in plans] == [2, 2, 2]  # MatMul + Add per segment; mask nodes recomputed
    assert [[x.name for x in p.carried_out] for p in plans] == [["a1"], ["a2"], []]
    assert [[x.name for x in p.carried_in] for p in plans] == [[], ["a1"], ["a2"]]
    total = 0
    for p in plans:
        assert total & p.nodes == 0
        total |= p.nodes


IF_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x, bool cond) => (float[N, 4] out) <float[4, 4] w = {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1}> {
    h = MatMul(x, w)
    r = Relu(h)
    out = If(cond) <
        then_branch = t () => (float[N, 4] y1) { y1 = Add(r, h) },
        else_branch = e () => (float[N, 4] y2) { inner = Mul(r, h)
                                                 y2 = Identity(inner) }
    >
}
"""


def test_outer_scope_reads_of_subgraphs_count_as_inputs() -> None:
    idx = index_graph(_model(IF_MODEL))
    # The If node reads r and h from the outer scope: a cut at r carries both.
    carried, _ = _cut(idx, "r")
    assert sorted(v.name for v in carried) == ["h", "r"]
    assert "inner" in idx.subgraph_values and idx.subgraph_values["inner"].op_type == "If"
    assert "inner" not in idx.values  # never a cut point


@pytest.mark.parametrize("name", ["resnet50", "squeezenet"])
def test_old_ir_zoo_models_have_no_initializer_inputs(name: str) -> None:
    from conftest import zoo_model

    from eecompile.passes.load import load_model

    model = load_model(zoo_model(name))
    assert len(model.graph.inputs) == 1
    idx = index_graph(model)
    # ConstantOfShape weight nodes are recomputable (copied into each segment that uses them).
    cos = [r for n, r in zip(idx.nodes, idx.recomputable, strict=True) if n.op_type == "ConstantOfShape"]
    assert cos and all(cos)


def test_worked_example_in_the_docstring_holds():
    import doctest

    from eecompile.analysis import partition

    res = doctest.testmod(partition, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted >= 6 and res.failed == 0
