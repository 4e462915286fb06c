"""Jump exits (MuE's encoder–decoder exits): an exit whose head gives a later tensor instead of the final output.

A sample that fires at a jump exit does not end: the exit's head output stands in for the tensor named by
``jump`` (e.g. the encoder output), and the sample continues at the segment that starts from that tensor (the
decoder), where it may leave at a decoder exit too. MuE (Tang et al. 2023, "You need multiple exiting") exits the
encoder when consecutive layers' hidden states saturate and then the decoder per its own exits.

What compile does here, before the segments are extracted:

1. each jump tensor is resolved; one that is computed before the exit's cut is a jump to an earlier segment,
   refused (SpecError naming ``exits[k].jump``); so is a tensor with another per-sample shape than the head's
   output, or whose batch is not on axis 0;
2. unless an exit already cuts there, a *jump target* boundary is inserted at the tensor: a segment boundary
   without an exit (a :class:`JumpTarget` in the exit list; every sample that reaches it continues);
3. after extraction, :func:`check_jump_reads` refuses a segment at or after a target that reads a tensor computed
   before the target other than the jump tensor (a sample that jumped never computed it);
4. the first exit after a target must not read a previous exit's gate state (patience, saturation, Q-exit, change:
   a jumped sample has none).

The manifest records ``jumps: [{exit, tensor, to}]`` (``to``: the segment the sample continues at) and a target's
segment has an exit with no gate and no outputs; the runtime's :class:`~eecompile.runtimes.jumps.JumpRunner` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import onnx_ir as ir

from eecompile.analysis.exits import ExitPlan, resolve_tensor, value_name
from eecompile.analysis.partition import SegmentPlan
from eecompile.analysis.prepared import PreparedModel, batch_index
from eecompile.bundle import ExitInfo
from eecompile.errors import SpecError
from eecompile.spec import ExitSpec, GateKind, GateSpec, HeadSpec

TARGET_HEAD = "jump-target"  # ExitInfo.head of a jump target's segment (it has no exit)
_STATEFUL = (GateKind.PATIENCE, GateKind.SATURATION, GateKind.Q_EXIT, GateKind.CHANGE)


@dataclass
class JumpTarget(ExitPlan):
    """A segment boundary at a jump tensor, with no exit: every sample reaching it continues."""

    @property
    def where(self) -> str:
        return f"the boundary at the jump tensor '{self.at[0].name}'"


def plan_jumps(pm: PreparedModel, exits: list[ExitPlan]) -> tuple[list[ExitPlan], dict[int, ir.Value]]:
    """The exit list with a :class:`JumpTarget` inserted at each jump tensor no exit cuts at (cases 1, 2, 4), and
    ``{position in that list: jump tensor}`` of the jump exits. Exits keep their spec index for messages."""
    idx = pm.index
    jump_of: dict[int, ir.Value] = {}
    for e in exits:
        if e.spec.jump is None:
            continue
        where = f"exits[{e.index}].jump"
        t = resolve_tensor(pm, e.spec.jump, where)
        p_at, p_t = idx.producer_index(e.at[0]), idx.producer_index(t)
        if p_t is None or p_at is None or p_t <= p_at:
            raise SpecError(f"{where}: '{t.name}' is computed before exits[{e.index}].at '{e.at[0].name}' (an earlier "
                            f"segment); a jump goes forward only: name a tensor after the cut, e.g. the encoder's "
                            f"output the decoder reads")
        if t in idx.graph_outputs:
            raise SpecError(f"{where}: '{t.name}' is a model output; a jump continues inside the model")
        if pm.probe.facts.get(value_name(t)) is not None and pm.probe.facts[value_name(t)].batch_axis != 0:
            raise SpecError(f"{where}: '{t.name}' has its batch on another axis than 0; jump to a batch-first tensor")
        if e.head_output is not None:
            have, want = pm.shape_of(e.head_output.name), pm.shape_of(t.name)
            if _per_sample(have) != _per_sample(want):
                raise SpecError(f"exits[{e.index}].head.output: '{e.head_output.name}' has shape {have}, the jump "
                                f"tensor '{t.name}' {want}; the head must give the tensor it stands in for")
        jump_of[e.index] = t
    if not jump_of:
        return exits, {}
    cut_at = {value_name(e.at[0]): e.index for e in exits}
    for k, t in jump_of.items():
        if value_name(t) in cut_at:
            raise SpecError(f"exits[{k}].jump: '{t.name}' is the cut of exits[{cut_at[value_name(t)]}]; jump to a "
                            f"tensor no exit cuts at (compile puts a boundary there)")
    out: list[ExitPlan] = []
    targets = {value_name(t): t for t in jump_of.values()}
    pending = sorted(targets.values(), key=lambda t: idx.producer_index(t) or 0)
    for e in exits:
        p = idx.producer_index(e.at[0]) or 0
        while pending and (idx.producer_index(pending[0]) or 0) < p:
            out.append(_target(pending.pop(0)))
        out.append(e)
    out.extend(_target(t) for t in pending)
    positions = {k: jump_of[e.index] for k, e in enumerate(out) if not isinstance(e, JumpTarget) and e.index in jump_of}
    for k, e in enumerate(out):
        prev = out[k - 1] if k else None
        if isinstance(prev, JumpTarget) and not isinstance(e, JumpTarget) and e.spec.gate.kind in _STATEFUL:
            raise SpecError(f"exits[{e.index}].gate.kind: '{e.spec.gate.kind.value}' compares with the exit before "
                            f"it, and samples reach exits[{e.index}] by a jump too (without that exit's state); use "
                            f"a gate that decides alone (max_prob, entropy, margin, score)")
    # From here on an exit's index is its segment's (the names ee{k}.* follow the segments); messages name the
    # spec's (ExitPlan.where).
    return [replace(e, index=k, spec_index=None if isinstance(e, JumpTarget) else e.number)
            for k, e in enumerate(out)], positions


def _per_sample(shape: list[Any]) -> list[Any]:
    b = batch_index(shape)
    return [d for i, d in enumerate(shape) if i != b]


def _target(t: ir.Value) -> JumpTarget:
    name = t.name or ""
    return JumpTarget(index=-1, spec=ExitSpec(at=(name,), head=HeadSpec(), gate=GateSpec(GateKind.SCORE, 0.0)),
                      at=[t])


def check_jump_reads(pm: PreparedModel, plans: list[SegmentPlan], exits: list[ExitPlan],
                     jumps: dict[int, ir.Value]) -> list[dict[str, Any]]:
    """Case 3, and the manifest's ``jumps`` records: ``[{exit, tensor, to}]`` by segment index."""
    inputs = {value_name(v) for v in pm.index.graph_inputs}
    records = []
    for k, t in jumps.items():
        to = next(j for j in range(k + 1, len(plans)) if j > 0 and t in plans[j - 1].targets)
        records.append({"exit": k, "tensor": value_name(t), "to": to})
        for j in range(to, len(plans)):
            later = {value_name(v) for p in plans[to:j] for v in p.carried_out}
            for v in plans[j].carried_in:
                name = value_name(v)
                if name != value_name(t) and name not in inputs and name not in later:
                    raise SpecError(f"{exits[k].where}.jump: segment {j} reads '{name}', computed before "
                                    f"'{t.name}', which a sample that jumped there never computed; jump to a tensor "
                                    f"that carries everything the later layers read (the encoder output)")
    return records


def target_info(k: int, tensor: str) -> ExitInfo:
    """The exit record of a jump target's segment: no head, no gate, no outputs (every sample continues)."""
    return ExitInfo(index=k, at=[tensor], head=TARGET_HEAD, outputs={})


__all__ = ["TARGET_HEAD", "JumpTarget", "check_jump_reads", "plan_jumps", "target_info"]
