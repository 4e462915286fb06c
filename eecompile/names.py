"""Names the compiler gives to the tensors and nodes it adds, defined once.

Every name the compiler adds to a segment starts with ``ee{k}`` (``k``: the exit index, 0 for the first
exit), so it cannot be mistaken for a tensor of the source model's own:

- ``ee{k}.out.{final}``: segment output, exit k's stand-in for the final output ``final``
- ``ee{k}.score``: segment output, float32 [B], the gate's per-sample score
- ``ee{k}.gate``: segment output, bool [B], True where the sample exits at k
- ``ee{k}.threshold``: segment input, float32 scalar, the gate threshold (fed at run time)
- ``ee{k}.state.argmax``: int64 [B, P], patience gates: the exit's argmax per position
- ``ee{k}.state.count``: float32 [B], patience gates: how many consecutive exits agree
- ``ee{k}.state.hidden``: float32 [B, P, D], saturation gates: the pooled cut tensor
- ``ee{k}.state.output``: float32 [B, N], change gates: the exit output, flattened per sample
- ``ee{k}.state.survival``: float32 [B], Q-exit gates: prod_{j<=k} (1 - lambda_j), the chance of not having halted
- ``ee{k}.logits``: exit k's logits when the model ends in an activation (the exit output is that activation
  of them, the gate reads them); ``ee{k}.act/...``: the nodes applying it
- ``ee{k}.head/...``: nodes and initializers of the exit head spliced into the segment
- ``ee{k}.gate/...``: nodes of the gate subgraph (fp16 builds keep them in fp32)

State tensors are outputs of segment k and inputs of segment k+1 (they carry one gate's facts to the next).
The bundle manifest records every name it uses (``GateInfo``), so runtimes read names from the manifest;
the predicates below are for the compiler and the build step, which meet graphs before a manifest exists.

This module imports only the standard library: the runtime on a device may use it.
"""

from __future__ import annotations

import re

PREFIX = "ee"
"""The prefix of every tensor and node name the compiler adds."""

STATE_ARGMAX = "argmax"
STATE_COUNT = "count"
STATE_HIDDEN = "hidden"
STATE_OUTPUT = "output"
STATE_SURVIVAL = "survival"
STATE_KINDS = (STATE_ARGMAX, STATE_COUNT, STATE_HIDDEN, STATE_OUTPUT, STATE_SURVIVAL)
"""The state tensors a gate can hand to the next exit (``ee{k}.state.{kind}``)."""

GATE_KINDS = ("max_prob", "entropy", "margin", "patience", "saturation", "score", "change", "q_exit")
"""Every gate kind a manifest may name: the values of :class:`eecompile.spec.GateKind` (a test keeps the two
equal). A bundle naming another kind is refused on load: its runtime would not know the threshold's range."""

GATE_NODE_MARKER = ".gate/"
"""Part of the name of every node of a gate subgraph (``ee{k}.gate/Softmax_1``)."""

STATE_MARKER = ".state."
"""Part of the name of every state tensor (``ee{k}.state.count``)."""

_THRESHOLD = re.compile(rf"^{PREFIX}\d+\.threshold$")
_STATE = re.compile(rf"^{PREFIX}\d+\.state\.")
_EXIT_OUTPUT = re.compile(rf"^{PREFIX}\d+\.out\.")
_EXIT_TENSOR = re.compile(rf"^{PREFIX}\d+\.(gate|score|state\.|out\.)")


def exit_prefix(k: int) -> str:
    """``ee{k}``: the stem of every name added for exit ``k``."""
    return f"{PREFIX}{k}"


def gate_output(k: int) -> str:
    """The gate output of exit ``k`` (bool [B]): ``ee{k}.gate``."""
    return f"{exit_prefix(k)}.gate"


def score_output(k: int) -> str:
    """The gate's score output of exit ``k`` (float32 [B]): ``ee{k}.score``."""
    return f"{exit_prefix(k)}.score"


def threshold_input(k: int) -> str:
    """The threshold input of exit ``k`` (float32 scalar): ``ee{k}.threshold``."""
    return f"{exit_prefix(k)}.threshold"


def state_tensor(k: int, kind: str) -> str:
    """State tensor ``kind`` (one of :data:`STATE_KINDS`) written by exit ``k``: ``ee{k}.state.{kind}``."""
    if kind not in STATE_KINDS:
        raise ValueError(f"unknown state kind {kind!r}; one of {STATE_KINDS}")
    return f"{exit_prefix(k)}{STATE_MARKER}{kind}"


def exit_output(k: int, final_name: str) -> str:
    """Exit ``k``'s output standing in for the final output ``final_name``: ``ee{k}.out.{final_name}``."""
    return f"{exit_prefix(k)}.out.{final_name}"


def exit_logits(k: int) -> str:
    """Exit ``k``'s logits before the final output's activation (a Softmax/LogSoftmax/Sigmoid the model ends
    in, applied to the exit output too): the tensor the gate reads, ``ee{k}.logits``."""
    return f"{exit_prefix(k)}.logits"


def head_input(k: int, i: int) -> str:
    """The batch-first view of exit ``k``'s ``i``-th ``at`` tensor, made where that tensor's batch axis is not 0
    (a time-major ``[T, B, D]`` cut): ``ee{k}.head_in.{i}``. Heads and trained-head features read it."""
    return f"{exit_prefix(k)}.head_in.{i}"


def head_prefix(k: int) -> str:
    """The prefix of exit ``k``'s head nodes and initializers once spliced into a segment: ``ee{k}.head/``."""
    return f"{exit_prefix(k)}.head/"


def gate_node_prefix(k: int) -> str:
    """The prefix of the node names of exit ``k``'s gate subgraph: ``ee{k}.gate/``."""
    return f"{exit_prefix(k)}{GATE_NODE_MARKER}"


def gate_names(k: int) -> dict[str, str]:
    """Every tensor name of exit ``k``'s gate: keys ``gate``, ``score``, ``threshold`` and the state kinds."""
    return {"gate": gate_output(k), "score": score_output(k), "threshold": threshold_input(k),
            **{s: state_tensor(k, s) for s in STATE_KINDS}}


def is_gate_node(node_name: str | None) -> bool:
    """True for the name of a node in a gate subgraph (``ee{k}.gate/...``)."""
    return GATE_NODE_MARKER in (node_name or "")


def is_threshold_input(name: str | None) -> bool:
    """True for a threshold input name (``ee{k}.threshold``)."""
    return bool(name) and _THRESHOLD.match(name or "") is not None


def is_state_tensor(name: str | None) -> bool:
    """True for a state tensor name (``ee{k}.state.*``)."""
    return bool(name) and _STATE.match(name or "") is not None


def is_exit_output(name: str | None) -> bool:
    """True for an exit's stand-in for a final output (``ee{k}.out.{final}``)."""
    return bool(name) and _EXIT_OUTPUT.match(name or "") is not None


def is_exit_tensor(name: str | None) -> bool:
    """True for a tensor the compiler adds per sample at an exit: its output, score, gate or state
    (``ee{k}.out.*``, ``ee{k}.score``, ``ee{k}.gate``, ``ee{k}.state.*``; batch axis 0)."""
    return bool(name) and _EXIT_TENSOR.match(name or "") is not None


LOOP_GATE_KINDS = ("logit_gap", "change", "score")
"""Every loop gate kind a manifest's ``loop.gate`` may name (the spec's ``loop.gate.kind``; eecompile.spec)."""

LOOP_GATE = f"{PREFIX}.loop.gate"
"""Loop bundles: the step graph's output, bool [B], True where the sample's loop ends after this step."""

LOOP_SCORE = f"{PREFIX}.loop.score"
"""Loop bundles: the step graph's output, float32 [B], the value the loop gate compares with its threshold."""

LOOP_THRESHOLD = f"{PREFIX}.loop.threshold"
"""Loop bundles: the step graph's input, float32 scalar, the loop gate's threshold (fed at run time)."""

LOOP_NODE_PREFIX = f"{PREFIX}.loop.gate/"
"""The prefix of the node names of the loop gate in the step graph."""
