"""Spec parsing: the contract's examples parse; every error names the YAML path (and line) and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from eecompile.errors import SpecError
from eecompile.spec import GateKind, load_spec, parse_spec, parse_thresholds

GOOD = """
model: resnet50.onnx
exits:
  - at: layer2_out
    head: heads/exit0.onnx
    gate: {kind: max_prob, threshold: 0.9}
  - at: [layer3_out, mask]
    head: {output: aux_logits}
    gate: {kind: entropy, threshold: 0.4}
  - at: layer4_out
    head: {kind: mlp, options: {hidden: 64}}
    gate: {kind: patience, threshold: 2}
final: {output: logits, class_axis: 1}
"""


def test_contract_example_parses(tmp_path: Path) -> None:
    spec = parse_spec(GOOD, base=tmp_path)
    assert spec.model == tmp_path / "resnet50.onnx"
    assert [e.tensor for e in spec.exits] == ["layer2_out", "layer3_out", "layer4_out"]
    assert spec.exits[1].at == ("layer3_out", "mask")
    assert spec.exits[0].head.file == tmp_path / "heads/exit0.onnx"
    assert spec.exits[1].head.output == "aux_logits"
    assert spec.exits[2].head.kind == "mlp" and spec.exits[2].head.options == {"hidden": 64}
    assert spec.exits[1].gate.kind is GateKind.ENTROPY
    assert spec.thresholds == [0.9, 0.4, 2.0]
    assert spec.final.output == "logits" and spec.final.class_axis == 1


@pytest.mark.parametrize("text, expect", [
    ("model: m.onnx\nexits:\n  - at: x\n    head: h.onnx\n    gate: {kind: max_prb, threshold: 0.9}\n",
     ["exits[0].gate.kind", "line 5", "did you mean 'max_prob'"]),
    ("model: m.onnx\nexits:\n  - at: x\n    haed: h.onnx\n    gate: {kind: max_prob, threshold: 0.9}\n",
     ["exits[0].haed", "line 4", "did you mean 'head'"]),
    ("model: m.onnx\nexits:\n  - at: x\n    head: h.onnx\n    gate: {kind: max_prob, threshold: 1.5}\n",
     ["exits[0].gate.threshold", "outside [0, 1]"]),
    ("model: m.onnx\nexits:\n  - at: x\n    head: h.onnx\n    gate: {kind: max_prob, threshold: high}\n",
     ["exits[0].gate.threshold", "expected a number"]),
    ("model: m.onnx\nexits: [\n", ["YAML syntax error", "line"]),
    ("model: m.onnx\n", ["exits", "non-empty list"]),
    ("exits: []\n", ["missing 'model'"]),
    ("model: m.onnx\nexits:\n  - {at: x, head: h.onnx, gate: {kind: max_prob, threshold: 0.5}}\n"
     "  - {at: x, head: h.onnx, gate: {kind: max_prob, threshold: 0.5}}\n", ["exits[1].at", "already the cut"]),
    ("model: m.onnx\nexits:\n  - {at: x, head: {file: a.onnx, output: y}, gate: {kind: max_prob, threshold: 0.5}}\n",
     ["exits[0].head", "exactly one of"]),
    ("model: m.onnx\nexits:\n  - {at: x, head: {kind: lstm}, gate: {kind: max_prob, threshold: 0.5}}\n",
     ["exits[0].head.kind", "unknown head kind"]),
    ("model: m.onnx\nexits:\n  - {at: x, head: h.onnx, gate: {kind: max_prob, threshold: 0.5}}\nfinal: {class_axis: one}\n",
     ["final.class_axis", "integer"]),
    ("model: m.onnx\nexits:\n  - {at: x, head: h.onnx, gate: {kind: patience, threshold: 0}}\n",
     ["threshold 0 is outside [1, inf]"]),
    ("model: m.onnx\nexits:\n"
     "  - {at: a, head: {kind: linear, options: {score: halting}}, gate: {kind: q_exit, threshold: 0.5}}\n"
     "  - {at: b, head: {kind: linear}, gate: {kind: max_prob, threshold: 0.5}}\n"
     "  - {at: c, head: {kind: linear, options: {score: halting}}, gate: {kind: q_exit, threshold: 0.5}}\n",
     ["exits[1] (line 4)", "between exits with score: halting ([0, 2])", "one run of exits"]),  # was train-heads'
])
def test_bad_specs_name_the_path(text: str, expect: list[str]) -> None:
    with pytest.raises(SpecError) as e:
        parse_spec(text)
    for piece in expect:
        assert piece in str(e.value), str(e.value)


def test_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.yaml")


def test_cli_thresholds() -> None:
    assert parse_thresholds("0.9, never,always", 3) == [0.9, "never", "always"]
    with pytest.raises(SpecError, match="one per exit"):
        parse_thresholds("0.9", 2)
    with pytest.raises(SpecError, match="neither a number"):
        parse_thresholds("0.9,sometimes", 2)
