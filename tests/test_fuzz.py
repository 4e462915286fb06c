"""Fuzzing with hypothesis.

1. Spec parsing: whatever the text or the YAML structure, ``parse_spec`` returns a Spec or raises SpecError
   (never a raw KeyError/TypeError/yaml traceback).
2. The runtime invariant on random small graphs (chains of MatMul/Add/Relu with residual connections), random
   cut points and thresholds: each sample's output under ``compact`` equals its output under ``wait-all`` and
   its output when forced out at the exit it took (``never`` before, ``always`` there), run alone.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

from eecompile.errors import SpecError
from eecompile.spec import Spec, parse_spec
from tests.bad_inputs.util import linear_head

KEYS = ["model", "exits", "final", "at", "head", "gate", "kind", "threshold", "name", "file", "output",
        "options", "score_output", "class_axis", "modle", "treshold", "max_prob", "entropy", "patience"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(["h0", "model.onnx", "max_prob", "entropy", "margin", "patience", "score",
                                     "linear", "", "logits", "0.9", "heads/a.onnx"]), st.text(max_size=8))
yaml_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=5)), inner,
                                            max_size=5)),
    max_leaves=20,
)


def _parse(text: str) -> None:
    try:
        spec = parse_spec(text, base="/nonexistent")
    except SpecError as e:
        assert str(e) and "\n" not in str(e).strip(), f"not one line: {e!r}"
        return
    assert isinstance(spec, Spec) and spec.exits


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(max_size=200))
def test_any_text_parses_or_gives_a_spec_error(text: str) -> None:
    _parse(text)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(yaml_values)
def test_any_yaml_structure_parses_or_gives_a_spec_error(value: object) -> None:
    _parse(yaml.safe_dump(value))


exit_docs = st.fixed_dictionaries({
    "at": st.one_of(st.sampled_from(["h0", "h1"]), st.lists(st.sampled_from(["h0", "h1", 3]), max_size=2), scalars),
    "head": st.one_of(st.sampled_from(["head.onnx"]), st.dictionaries(
        st.sampled_from(["file", "output", "kind", "options", "score_output", "x"]), scalars, max_size=3), scalars),
    "gate": st.one_of(st.fixed_dictionaries({"kind": st.sampled_from(["max_prob", "entropy", "margin",
                                                                       "patience", "saturation", "score", "x"]),
                                             "threshold": scalars}), scalars),
})


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(exit_docs, max_size=3), st.one_of(st.none(), st.dictionaries(
    st.sampled_from(["output", "class_axis", "axis"]), scalars, max_size=2)))
def test_near_valid_specs_parse_or_give_a_spec_error(exits: list, final: dict | None) -> None:
    doc: dict = {"model": "m.onnx", "exits": exits}
    if final is not None:
        doc["final"] = final
    _parse(yaml.safe_dump(doc))


# ------------------------------------------------------------------------------ runtime invariant

D, C = 6, 3


@st.composite
def graphs(draw: st.DrawFn) -> tuple[list[tuple[int | None]], list[int], list[float], int]:
    """(residual source per layer, cut layers, thresholds, seed)."""
    n = draw(st.integers(3, 6))
    residual = [draw(st.one_of(st.none(), st.integers(0, i - 1))) if i > 0 else None for i in range(n)]
    cuts = sorted(draw(st.sets(st.integers(0, n - 2), min_size=1, max_size=min(3, n - 1))))
    thresholds = [draw(st.floats(0.34, 1.0)) for _ in cuts]
    return residual, cuts, thresholds, draw(st.integers(0, 1000))


def _model(path: Path, residual: list[int | None], seed: int) -> None:
    rng = np.random.default_rng(seed)
    nodes, inits, cur = [], [], "x"
    for i, src in enumerate(residual):
        inits += [nh.from_array((rng.standard_normal((D, D)) * 0.6).astype(np.float32), f"W{i}"),
                  nh.from_array((rng.standard_normal(D) * 0.1).astype(np.float32), f"b{i}")]
        nodes += [oh.make_node("MatMul", [cur, f"W{i}"], [f"m{i}"]), oh.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        if src is None:
            nodes.append(oh.make_node("Relu", [f"a{i}"], [f"h{i}"]))
        else:
            nodes += [oh.make_node("Relu", [f"a{i}"], [f"r{i}"]), oh.make_node("Add", [f"r{i}", f"h{src}"], [f"h{i}"])]
        cur = f"h{i}"
    inits.append(nh.from_array(rng.standard_normal((D, C)).astype(np.float32), "Wo"))
    nodes.append(oh.make_node("MatMul", [cur, "Wo"], ["logits"]))
    g = oh.make_graph(nodes, "fuzz", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
                      [oh.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", C])], inits)
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, path)


def _forced(k: int, n_early: int) -> list[float | str]:
    return ["never"] * k + (["always"] + ["never"] * (n_early - k - 1) if k < n_early else [])


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@pytest.mark.slow
@given(graphs())
def test_compact_equals_forced_exit_equals_wait_all(g: tuple) -> None:
    from eecompile.compiler import compile_model
    from eecompile.runtimes.chain import EarlyExitRunner

    residual, cuts, thresholds, seed = g
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        _model(root / "model.onnx", residual, seed)
        exits = []
        for j, c in enumerate(cuts):
            linear_head(root / f"head{j}.onnx", width=D, classes=C, seed=seed + j)
            exits.append({"at": f"h{c}", "head": f"head{j}.onnx",
                          "gate": {"kind": "max_prob", "threshold": thresholds[j]}})
        (root / "spec.yaml").write_text(yaml.safe_dump({"model": "model.onnx", "exits": exits}))
        compile_model(root / "spec.yaml", root / "b.eebundle")
        runner = EarlyExitRunner(root / "b.eebundle", threads=1)
        x = np.random.default_rng(seed).standard_normal((9, D)).astype(np.float32) * 2
        compact = runner.run({"x": x}, policy="compact")
        wait_all = runner.run({"x": x}, policy="wait-all")
        n_early = len(cuts)
        np.testing.assert_array_equal(compact.exit_index, wait_all.exit_index)
        np.testing.assert_allclose(compact.outputs["logits"], wait_all.outputs["logits"], rtol=1e-5, atol=1e-6)
        assert compact.exit_counts.sum() == len(x)
        for i in range(len(x)):
            k = int(compact.exit_index[i])
            alone = runner.run({"x": x[i:i + 1]}, thresholds=_forced(k, n_early) or None, policy="compact")
            assert int(alone.exit_index[0]) == k
            np.testing.assert_allclose(alone.outputs["logits"][0], compact.outputs["logits"][i], rtol=1e-5,
                                       atol=1e-6)
        runner.close()
    assert not math.isnan(sum(thresholds))
