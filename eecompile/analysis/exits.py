"""Validate a spec against the graph: the *validate spec* stage of the pipeline.

Each exit's ``at`` tensors, in-model head outputs and score outputs are resolved to values of the prepared
model, and every cut is checked before anything is extracted. Cases refused, each with a :class:`SpecError`
naming the YAML path and what to do:

1. a tensor the model does not have (with close names suggested), or one inside an If/Loop body;
2. a model input, a model output, or a tensor computed from the inputs alone (no features yet);
3. exits out of graph order;
4. a cut that would carry a tensor that cannot be compacted (:func:`~eecompile.analysis.cut_points.cut_problem`);
5. a ``score`` gate without the head's score output;
6. a final output that is ambiguous or missing, and a class axis that does not exist or has size 1;
7. a model output with no value at an exit (:func:`check_outputs`): neither a final output a head gives (or
   one the spec declares end-only), nor an in-model head, nor dropped.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import onnx_ir as ir

from eecompile.analysis.cut_points import cut_problem
from eecompile.analysis.partition import SegmentPlan, carried_across
from eecompile.analysis.prepared import Dims, PreparedModel, batch_index
from eecompile.errors import SpecError
from eecompile.spec import SCORE_GATES, ExitSpec, GateKind, Spec


@dataclass
class ExitPlan:
    """Exit ``index`` of the spec with its tensors resolved to values of the prepared model.

    ``at``: the cut tensor first, then any extra tensors a head reads (e.g. an attention mask);
    ``head_output`` / ``score_output``: in-model head outputs (``head: {output: ...}``), else None."""

    index: int
    spec: ExitSpec
    at: list[ir.Value]
    head_output: ir.Value | None = None
    score_output: ir.Value | None = None
    against: ir.Value | None = None  # saturation gates: the tensor the first exit compares with
    # The exit's index in the spec where ``index`` counts segments instead (after a jump target's boundary segment,
    # passes/jumps.py); messages name the spec's.
    spec_index: int | None = None

    @property
    def number(self) -> int:
        """The exit's index in the spec (``exits[number]``)."""
        return self.index if self.spec_index is None else self.spec_index

    @property
    def where(self) -> str:
        """The exit's path in the spec, for messages: ``exits[i]``."""
        return f"exits[{self.number}]"

    def targets(self) -> list[ir.Value]:
        """What the segment ending at this exit must compute: the ``at`` tensors, in-model head outputs and
        the tensor a saturation gate compares with."""
        t = list(self.at)
        for extra in (self.head_output, self.score_output, self.against):
            if extra is not None and extra not in t:
                t.append(extra)
        return t


def value_name(v: ir.Value | None) -> str:
    """A value's name (values of loaded models always have one)."""
    return (v.name or "") if v is not None else ""


def _suggest(name: str, pm: PreparedModel) -> str:
    close = difflib.get_close_matches(name, list(pm.index.values), n=3, cutoff=0.5)
    return f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""


def resolve_tensor(pm: PreparedModel, name: str, where: str) -> ir.Value:
    """The main-graph value called ``name`` (case 1); ``where`` is the YAML path named in errors."""
    idx = pm.index
    if name in idx.subgraph_values:
        owner = idx.subgraph_values[name]
        raise SpecError(f"{where}: tensor '{name}' is inside the body of {owner.op_type} node '{owner.name}'; "
                        f"exits cannot cut inside a subgraph: cut before or after that node")
    v = idx.values.get(name)
    if v is None:
        raise SpecError(f"{where}: the model has no tensor '{name}'; {_suggest(name, pm)}"
                        f"run `eecompile analyze {pm.path}` to list the cut points")
    return v


def resolve_final(pm: PreparedModel, spec: Spec) -> ir.Value:
    """The model output the exits stand in for: ``final.output``, or the only output (case 6)."""
    outs = pm.index.graph_outputs
    names = [o.name for o in outs]
    if spec.final.output is None:
        if len(outs) != 1:
            raise SpecError(f"final.output: the model has {len(outs)} outputs {names}; name the one the exits "
                            f"stand in for (final: {{output: NAME}})")
        return outs[0]
    for o in outs:
        if o.name == spec.final.output:
            return o
    raise SpecError(f"final.output: '{spec.final.output}' is not a model output; outputs: {names}")


def resolve_others(pm: PreparedModel, spec: Spec) -> list[ir.Value]:
    """The further final outputs (``final.outputs`` after the gated one, and ``final.end_only``), in order."""
    outs = {o.name: o for o in pm.index.graph_outputs}
    listed_outputs = [n for n in spec.final.others if n not in spec.final.end_only]
    for key, listed in (("end_only", spec.final.end_only), ("outputs", listed_outputs)):
        missing = [n for n in listed if n not in outs]
        if missing:
            raise SpecError(f"final.{key}: {missing} are not model outputs; outputs: {list(outs)}")
    return [outs[n] for n in spec.final.others]


def check_outputs(pm: PreparedModel, spec: Spec, final: ir.Value, exits: list[ExitPlan],
                  others: list[ir.Value] | None = None) -> list[str]:
    """No model output is dropped without a word: every model output is a final output (``final.output`` or
    ``final.outputs``/``final.end_only``: ``others``), an exit head's output inside the model (``head: {output:
    ...}`` or its ``score_output``), or listed in ``final.drop``; and every exit has a value for every final
    output that is not end-only (a head file gives it, by an output named after it). Returns the dropped names;
    raises SpecError naming the outputs a spec leaves undefined (a model output an exit has no value for would
    be missing from early-exited rows)."""
    others = others or []
    names = [o.name or "" for o in pm.index.graph_outputs]
    heads = {v.name: e.index for e in exits for v in (e.head_output, e.score_output) if v is not None}
    finals = [final.name or "", *(v.name or "" for v in others)]
    used = set(finals) | set(heads)
    unknown = [n for n in spec.final.drop if n not in names]
    if unknown:
        raise SpecError(f"final.drop: {unknown} are not model outputs; outputs: {names}")
    if final.name in spec.final.drop:
        raise SpecError(f"final.drop: '{final.name}' is final.output; the exits stand in for it, it cannot be dropped")
    taken = [n for n in finals[1:] if n in heads]
    if taken:
        raise SpecError(f"final.outputs: {taken} are in-model exit heads (exits {[heads[n] for n in taken]}), not "
                        f"outputs of the final exit; list other model outputs")
    if exits:
        last = exits[-1].targets()
        early = pm.index.ancestors_of(last)
        before = [v.name for v in others if (i := pm.index.producer_index(v)) is not None and (early >> i) & 1]
        if before:
            raise SpecError(f"final.outputs: {before} are computed before the last exit's cut "
                            f"('{exits[-1].at[0].name}'), not by the final segment; cut before them or drop them")
    undefined = [n for n in names if n not in used and n not in spec.final.drop]
    if undefined:
        raise SpecError(
            f"final: the model outputs {undefined} have no value at the exits (each exit gives only "
            f"{finals}); list them in final.outputs (each exit's head file gives them, by output name) or "
            f"final.end_only (returned for the samples that reach the final exit), or in final: "
            f"{{drop: [{', '.join(undefined)}]}} to compile without them")
    required = [n for n in finals[1:] if n not in spec.final.end_only]
    for e in exits:
        if required and e.spec.head.file is None and e.spec.jump is None:  # a jump exit gives its own tensor
            what = "an in-model head" if e.spec.head.output is not None else "a built-in head"
            raise SpecError(
                f"exits[{e.index}].head: the final outputs {required} have no value at this exit ({what} gives only "
                f"'{final.name}'); give a head file with outputs named {required}, or list them in "
                f"final.end_only (returned for the samples that reach the final exit, absent for the others)")
    return [n for n in names if n in spec.final.drop]


def plan_exits(pm: PreparedModel, spec: Spec) -> list[ExitPlan]:
    """Resolve and check every exit of ``spec`` (cases 1-5), in graph order."""
    idx = pm.index
    plans: list[ExitPlan] = []
    prev_pos = -1
    for k, e in enumerate(spec.exits):
        where = f"exits[{k}].at"
        at = [resolve_tensor(pm, n, where) for n in e.at]
        v = at[0]
        p = idx.producer_index(v)
        if p is None:
            raise SpecError(f"{where}: '{v.name}' is a model input; an exit needs some computation before it")
        if idx.recomputable[p]:
            raise SpecError(f"{where}: '{v.name}' is computed from the model inputs alone (no weighted layer "
                            f"before it), so a head there sees no features; cut later")
        if v in idx.graph_outputs:
            raise SpecError(f"{where}: '{v.name}' is a model output; cut at a tensor inside the model")
        if p <= prev_pos:
            raise SpecError(
                f"{where}: '{v.name}' comes before exits[{k - 1}].at '{spec.exits[k - 1].tensor}' in the graph; "
                f"list the exits in graph order (earliest first)")
        prev_pos = p
        facts = pm.probe.facts.get(value_name(v))
        all_nodes = (1 << len(idx.nodes)) - 1
        carried, _ = carried_across(idx, idx.anc[p], all_nodes & ~idx.anc[p])
        problem = cut_problem(pm, v, carried)
        if problem is not None and facts is not None and facts.problem is None and "carry" in problem:
            problem = None  # a carried-tensor problem is judged on the real plan (check_carried)
        if problem:
            raise SpecError(f"{where}: cannot put an exit at '{v.name}': {problem}; "
                            f"run `eecompile analyze {pm.path}` for tensors that work")
        plan = ExitPlan(k, e, at)
        if e.head.output is not None:
            plan.head_output = resolve_tensor(pm, e.head.output, f"exits[{k}].head.output")
        if e.head.score_output is not None and e.head.file is None:
            plan.score_output = resolve_tensor(pm, e.head.score_output, f"exits[{k}].head.score_output")
        own_score = e.head.kind is not None and e.head.options.get("score") is not None
        if e.gate.kind in SCORE_GATES and e.head.score_output is None and not own_score:
            what = ("the head's halting probability lambda (a Q-exit head without a lambda output)"
                    if e.gate.kind == GateKind.Q_EXIT else "the head's score output")
            raise SpecError(f"exits[{k}].head: gate kind '{e.gate.kind.value}' needs {what}: add score_output: NAME "
                            f"to the head (a head output or model tensor), or give a built-in head "
                            f"options: {{score: ...}}")
        if e.gate.against is not None:
            if k > 0:
                raise SpecError(f"exits[{k}].gate.against: only the first exit names what it compares with; "
                                f"exit {k} compares with exit {k - 1}'s cut tensor")
            plan.against = resolve_tensor(pm, e.gate.against, f"exits[{k}].gate.against")
        plans.append(plan)
    return plans


def check_segments(pm: PreparedModel, plans: list[SegmentPlan], exits: list[ExitPlan]) -> None:
    """Refuse empty segments and, in dynamic mode, carried tensors that cannot be compacted (case 4)."""
    for k, plan in enumerate(plans[:-1]):
        if plan.node_count() == 0:
            raise SpecError(f"{exits[k].where}.at: segment {k} would be empty (its cut adds no computation)")
    if exits and plans[-1].node_count() == 0:  # without exits the one segment is the whole model, however cheap
        last = exits[-1]
        raise SpecError(f"{last.where}.at: nothing is left after the last exit: the final output "
                        f"'{plans[-1].targets[0].name}' is computed before '{last.at[0].name}' (no layer is left to run after "
                        f"the exit); cut before the final output's last layer")
    if pm.batch_mode != "dynamic":
        return
    for plan in plans[:-1]:
        for v in plan.carried_out:
            facts = pm.probe.facts.get(value_name(v))
            problem = "ONNX Runtime could not expose it" if facts is None else facts.problem
            if problem:
                at = exits[plan.index].at[0].name
                raise SpecError(
                    f"{exits[plan.index].where}.at: cutting at '{at}' would carry '{v.name}' to a later segment, and "
                    f"{problem}; choose another cut (`eecompile analyze {pm.path}` lists the clean ones)")


def class_axis(spec: Spec, final_shape: Dims) -> int:
    """The spec's class axis, or the last non-batch axis longer than 1 (so [N, C, 1, 1] classifiers work
    without saying so; a softmax over a size-1 axis would make every gate fire). Negative when defaulted."""
    rank = len(final_shape)
    b = batch_index(final_shape)
    axis = spec.final.class_axis
    if axis is None:
        longer = [i for i in range(rank) if i != b and (not isinstance(final_shape[i], int) or final_shape[i] != 1)]
        axis = longer[-1] if longer else rank - 1
        return axis - rank  # negative: counts from the end, like the default -1
    if not -rank <= axis < rank or axis % rank == b:
        raise SpecError(f"final.class_axis: {axis} is not a class axis of the final output shape {final_shape} "
                        f"(axis {b} is the batch)")
    if final_shape[axis] == 1:
        raise SpecError(f"final.class_axis: axis {axis} of the final output {final_shape} has size 1; a gate over one "
                        f"class always fires; give the axis that holds the classes")
    return axis
