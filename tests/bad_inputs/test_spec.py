"""Bad specs: each gives exit 1, one line naming the YAML path (and line) and the fix, and writes nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as oh

from eecompile.errors import SpecError
from tests.bad_inputs.util import expect_error, spec_doc, write_yaml


def _compile(ws: Path, spec: Path) -> list:
    return ["compile", spec, "-o", ws / "out.eebundle"]


def _spec(ws: Path, doc: dict) -> Path:
    return write_yaml(ws / "bad.yaml", doc)


def test_yaml_syntax_error_names_the_line(ws: Path) -> None:
    bad = ws / "bad.yaml"
    bad.write_text("model: model.onnx\nexits:\n  - at: h0\n    gate: {kind: max_prob, threshold: 0.5\n"
                   "    head: head0.onnx\n")
    e = expect_error(_compile(ws, bad), SpecError, "bad.yaml", "line", "YAML syntax", "fix the YAML",
                     workspace=ws)
    assert "line 5" in e.message or "line 4" in e.message, e.message


def test_threshold_of_the_wrong_type(ws: Path) -> None:
    doc = spec_doc()
    doc["exits"][1]["gate"]["threshold"] = "high"
    expect_error(_compile(ws, _spec(ws, doc)), SpecError, "exits[1].gate.threshold", "line", "expected a number",
                 "'high'", workspace=ws)


def test_exits_of_the_wrong_type(ws: Path) -> None:
    doc = spec_doc()
    doc["exits"] = {"at": "h0"}
    expect_error(_compile(ws, _spec(ws, doc)), SpecError, "exits", "non-empty list", workspace=ws)


def test_unknown_key_suggests_the_right_one(ws: Path) -> None:
    doc = spec_doc()
    doc["exits"][0]["gate"] = {"kind": "max_prob", "treshold": 0.5}
    expect_error(_compile(ws, _spec(ws, doc)), SpecError, "exits[0].gate.treshold", "unknown key",
                 "did you mean 'threshold'", workspace=ws)


def test_unknown_top_level_key_suggests_the_right_one(ws: Path) -> None:
    doc = spec_doc()
    doc["modle"] = doc.pop("model")
    expect_error(_compile(ws, _spec(ws, doc)), SpecError, "modle", "did you mean 'model'", workspace=ws)


def test_unknown_gate_kind_suggests_the_right_one(ws: Path) -> None:
    doc = spec_doc()
    doc["exits"][0]["gate"]["kind"] = "maxprob"
    expect_error(_compile(ws, _spec(ws, doc)), SpecError, "exits[0].gate.kind", "maxprob",
                 "did you mean 'max_prob'", workspace=ws)


def test_threshold_out_of_range(ws: Path) -> None:
    doc = spec_doc(thresholds=(0.5, 1.5))
    expect_error(_compile(ws, _spec(ws, doc)), SpecError, "exits[1].gate.threshold", "1.5", "[0, 1]",
                 "give a value in that range", workspace=ws)


def test_patience_threshold_below_one(ws: Path) -> None:
    doc = spec_doc()
    doc["exits"][1]["gate"] = {"kind": "patience", "threshold": 0}
    expect_error(_compile(ws, _spec(ws, doc)), SpecError, "exits[1].gate.threshold", "patience",
                 "give a value in that range", workspace=ws)


def test_exits_out_of_graph_order(ws: Path) -> None:
    doc = spec_doc()
    doc["exits"][0]["at"], doc["exits"][1]["at"] = "h1", "h0"
    expect_error(_compile(ws, _spec(ws, doc)), SpecError, "exits[1].at", "'h0'", "graph order", workspace=ws)


def test_two_exits_at_the_same_tensor(ws: Path) -> None:
    doc = spec_doc()
    doc["exits"][1]["at"] = "h0"
    expect_error(_compile(ws, _spec(ws, doc)), SpecError, "exits[1].at", "'h0'", "already the cut of exits[0]",
                 "its own cut tensor", workspace=ws)


def test_an_exit_after_the_final_output_names_both(ws: Path) -> None:
    """The final output y is computed before the cut r (r feeds only the exit's in-model head z): the message
    names the exit and both tensors, not a segment number or exits[-1]."""
    w = oh.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel().tolist())
    g = oh.make_graph([oh.make_node("MatMul", ["x", "w"], ["y"]), oh.make_node("Relu", ["y"], ["r"]),
                       oh.make_node("MatMul", ["r", "w"], ["z"])], "late",
                      [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                      [oh.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4]) for n in ("y", "z")], [w])
    onnx.save(oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)], ir_version=8), ws / "late.onnx")
    doc = {"model": "late.onnx", "final": {"output": "y"},
           "exits": [{"at": "r", "head": {"output": "z"}, "gate": {"kind": "max_prob", "threshold": 0.9}}]}
    expect_error(_compile(ws, _spec(ws, doc)), SpecError, "exits[0].at", "nothing is left after the last exit",
                 "'y' is computed before 'r'", "cut before", workspace=ws)


def test_cut_tensor_not_in_the_model_suggests_names(ws: Path) -> None:
    doc = spec_doc()
    doc["exits"][1]["at"] = "h_1"
    expect_error(_compile(ws, _spec(ws, doc)), SpecError, "exits[1].at", "'h_1'", "did you mean", "'h1'",
                 "eecompile analyze", workspace=ws)


def test_cut_at_a_model_input(ws: Path) -> None:
    doc = spec_doc()
    doc["exits"][0]["at"] = "x"
    expect_error(_compile(ws, _spec(ws, doc)), SpecError, "exits[0].at", "'x'", "model input", workspace=ws)


def test_head_with_the_wrong_input_shape(ws: Path) -> None:
    from tests.bad_inputs.util import linear_head

    linear_head(ws / "head_w5.onnx", width=5)
    doc = spec_doc()
    doc["exits"][0]["head"] = "head_w5.onnx"
    expect_error(_compile(ws, _spec(ws, doc)), SpecError, "exits[0].head", "'h0'", "5", "8",
                 "make the head take the cut tensor's shape", workspace=ws)


def test_head_with_the_wrong_class_count(ws: Path) -> None:
    from tests.bad_inputs.util import linear_head

    linear_head(ws / "head_c7.onnx", classes=7)
    doc = spec_doc()
    doc["exits"][1]["head"] = "head_c7.onnx"
    expect_error(_compile(ws, _spec(ws, doc)), SpecError, "exits[1].head", "[7]", "[4]", "number of classes",
                 workspace=ws)


def test_head_file_missing(ws: Path) -> None:
    doc = spec_doc()
    doc["exits"][0]["head"] = "heads/nope.onnx"
    expect_error(_compile(ws, _spec(ws, doc)), SpecError, "exits[0].head", "nope.onnx", "not found",
                 workspace=ws)


def test_final_output_that_is_not_a_model_output(ws: Path) -> None:
    doc = spec_doc()
    doc["final"] = {"output": "logit"}
    expect_error(_compile(ws, _spec(ws, doc)), SpecError, "final.output", "'logit'", "logits", workspace=ws)


def test_spec_file_missing(ws: Path) -> None:
    expect_error(_compile(ws, ws / "nope.yaml"), SpecError, "nope.yaml", "not found", workspace=ws)


def test_empty_spec(ws: Path) -> None:
    (ws / "bad.yaml").write_text("# nothing here\n")
    expect_error(_compile(ws, ws / "bad.yaml"), SpecError, "bad.yaml", "empty", "'model' and 'exits'",
                 workspace=ws)


def test_yaml_tag_is_refused_in_one_line(ws: Path) -> None:
    (ws / "bad.yaml").write_text("model: !!python/object/apply:os.system ['true']\nexits: []\n")
    expect_error(_compile(ws, ws / "bad.yaml"), SpecError, "bad.yaml", "without tags", workspace=ws)


def test_control_character_in_the_spec(ws: Path) -> None:
    (ws / "bad.yaml").write_text("model: model.onnx\x1f\nexits: []\n")
    expect_error(_compile(ws, ws / "bad.yaml"), SpecError, "bad.yaml", "'\\x1f'", "not allowed", "fix the YAML",
                 workspace=ws)


def test_key_with_a_newline_gives_one_line(ws: Path) -> None:
    (ws / "bad.yaml").write_text('model: model.onnx\n"exi\\nts": []\n')
    expect_error(_compile(ws, ws / "bad.yaml"), SpecError, "unknown key 'exi\\nts'", workspace=ws)


def test_list_where_a_string_is_expected_shows_the_values(ws: Path) -> None:
    doc = spec_doc()
    doc["model"] = ["a.onnx", "b.onnx"]
    e = expect_error(_compile(ws, _spec(ws, doc)), SpecError, "model", "expected a non-empty string",
                     "['a.onnx', 'b.onnx']", workspace=ws)
    assert "_Node" not in e.message


def test_misspelt_head_option_names_the_yaml_path(ws: Path) -> None:
    """Before: "head option 'hiden' is unknown for kind 'linear'", without the exit or a suggestion."""
    doc = spec_doc()
    doc["exits"][0]["head"] = {"kind": "mlp", "options": {"hiden": 32}}
    expect_error(_compile(ws, _spec(ws, doc)), SpecError, "exits[0].head.options.hiden", "line",
                 "did you mean 'hidden'", workspace=ws)


def test_head_options_of_the_wrong_type(ws: Path) -> None:
    doc = spec_doc()
    doc["exits"][0]["head"] = {"kind": "mlp", "options": [32]}
    expect_error(_compile(ws, _spec(ws, doc)), SpecError, "exits[0].head.options", "expected a mapping",
                 workspace=ws)


def test_spec_head_options_are_the_heads_options() -> None:
    from eecompile.heads import _DEFAULTS
    from eecompile.spec import HEAD_OPTIONS

    assert tuple(_DEFAULTS) == HEAD_OPTIONS


def test_dim_name_the_model_does_not_have(ws: Path) -> None:
    """``--dim sqe=128`` used to be ignored without a word (the model's dim stayed at the probing default)."""
    expect_error([*_compile(ws, ws / "spec.yaml"), "--dim", "sqe=128"], SpecError, "--dim sqe", "model.onnx",
                 "no input dimension named so", workspace=ws)
    expect_error(["analyze", ws / "model.onnx", "--dim", "sqe=128"], SpecError, "--dim sqe", workspace=ws)
