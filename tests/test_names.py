"""The naming conventions: what the compiler writes is what the predicates recognise."""

import pytest

from eecompile import names


def test_gate_names_of_an_exit():
    assert names.gate_names(2) == {
        "gate": "ee2.gate", "score": "ee2.score", "threshold": "ee2.threshold",
        "argmax": "ee2.state.argmax", "count": "ee2.state.count", "hidden": "ee2.state.hidden",
        "output": "ee2.state.output", "survival": "ee2.state.survival",
    }
    assert names.exit_output(0, "logits") == "ee0.out.logits"
    assert names.head_prefix(1) == "ee1.head/"
    assert names.is_gate_node(names.gate_node_prefix(3) + "Softmax_1")


def test_predicates_accept_compiler_names_only():
    assert names.is_threshold_input("ee0.threshold")
    assert not names.is_threshold_input("layer.threshold")  # a model's own tensor keeps its place
    assert names.is_state_tensor("ee1.state.count") and not names.is_state_tensor("x.state.count")
    for n in ("ee0.gate", "ee0.score", "ee0.out.logits", "ee4.state.hidden"):
        assert names.is_exit_tensor(n), n
    for n in ("eeg.gate", "encoder.score", "ee0.threshold", "", None):
        assert not names.is_exit_tensor(n), n


def test_unknown_state_kind_is_refused():
    with pytest.raises(ValueError, match="unknown state kind"):
        names.state_tensor(0, "logits")
