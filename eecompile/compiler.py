"""The pipeline that turns (model, spec) into a bundle, stage by stage.

    load                  passes/load.py            read the file (external weights memory-mapped), old-IR fixes
    shape inference       passes/batch_dynamic.py   InferShapesPass
    batch dynamic         passes/batch_dynamic.py   BatchDynamicPass (or per-sample mode where unsafe)
    probe                 analysis/prepared.py      graph index, ORT probe (batch axes, shapes), FLOPs per node
    validate spec         analysis/exits.py         exits resolved against the graph, every cut checked
    jumps                 passes/jumps.py           jump exits: a boundary at each jump tensor, forward only
    partition             analysis/partition.py     one SegmentPlan per segment: nodes, inputs, outputs, deps
    extract segments      passes/extract_segments.py one graph per segment
    batch-first views     passes/attach_heads.py    BatchFirstPass      } per segment, run as one list:
    attach heads          passes/attach_heads.py    AttachHeadPass      }
    fuse gates            passes/gates.py           FuseGatePass        } segment_passes()
    tidy                  passes/tidy.py            outputs, unused nodes, topological order, unread inputs
    describe              analysis/records.py       the manifest records
    loop (spec.loop)      passes/loop.py            the step graph after the chain, with the loop gate
    verify                passes/verify.py          the chain with no exit equals the source model
    write atomically      write.py                  staging directory swapped into place

Rewrites of a whole model are onnx-ir passes (``call(model) -> PassResult``) run by :class:`Pipeline`, in
:func:`prepare` for the source model and in :func:`segment_passes` for each segment. Adding a stage is adding
a line there. A compile that fails anywhere writes nothing and leaves an earlier bundle untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir

from eecompile import __version__
from eecompile.analysis.cut_points import AnalysisReport, report_cut_points
from eecompile.analysis.exits import (
    ExitPlan,
    check_outputs,
    check_segments,
    class_axis,
    plan_exits,
    resolve_final,
    resolve_others,
)
from eecompile.analysis.partition import plan_segments
from eecompile.analysis.prepared import Dims, PreparedModel, probe_prepared
from eecompile.analysis.records import ExitRecord, exit_info, manifest_for, segment_info
from eecompile.bundle import Bundle, ExitInfo, check_output_bundle
from eecompile.errors import EECompileError, SpecError
from eecompile.heads import SCORE
from eecompile.passes.attach_heads import (
    AttachHeadPass,
    BatchFirstPass,
    FinalActivation,
    exit_activation,
    final_activation,
    head_for,
    head_views,
)
from eecompile.passes.batch_dynamic import BatchDynamicPass, InferShapesPass
from eecompile.passes.extract_segments import ExtractedSegment, extract_segments
from eecompile.passes.gates import FuseGatePass
from eecompile.passes.jumps import JumpTarget, check_jump_reads, plan_jumps, target_info
from eecompile.passes.load import load_model, opset_of
from eecompile.passes.loop import LOOP_FILE, plan_loop
from eecompile.passes.opset import ir_version_for, main_opset, raise_segment
from eecompile.passes.tidy import SegmentOutputsPass, tidy_passes
from eecompile.passes.verify import graph_tolerance, reference_outputs
from eecompile.spec import GateKind, Spec, load_spec
from eecompile.write import BundlePlan, write_bundle


class Pipeline(ir.passes.Sequential):
    """onnx-ir's ``Sequential``, except that our own errors pass through unchanged (they already name the
    tensor and the fix); any other exception gets a note naming the pass and the passes that ran before it."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for i, p in enumerate(self.passes):
            try:
                result = p(model)
            except EECompileError:
                raise
            except Exception as e:
                e.add_note(f"in pass {type(p).__name__}, after {[type(q).__name__ for q in self.passes[:i]]}")
                raise
            model, modified = result.model, modified or result.modified
        return ir.passes.PassResult(model, modified)


def check_dim_names(model: ir.Model, dims: dict[str, int] | None, path: str | Path) -> None:
    """Raise SpecError naming each ``dims`` key (``--dim NAME=SIZE``) that is not a symbolic dim of a model input."""
    names = sorted({d.value for v in model.graph.inputs if v.shape is not None for d in v.shape
                    if isinstance(d, ir.SymbolicDim) and d.value})
    unknown = [k for k in (dims or {}) if k not in names]
    if unknown:
        have = f"its inputs' symbolic dims are {', '.join(names)}" if names else "its inputs have no named symbolic dim"
        raise SpecError(f"--dim {', '.join(unknown)}: {Path(path).name} has no input dimension named so; {have}")


def prepare(path: str | Path, dims: dict[str, int] | None = None) -> PreparedModel:
    """Stages load, shape inference, batch dynamic and probe: the front half that ``analyze`` shares.

    ``dims`` gives sizes to symbolic non-batch input dims (e.g. ``{"seq": 128}``) for probing; unnamed ones
    take 8. Raises GraphError for a file that is missing, not ONNX, has missing external data, or that ONNX
    Runtime cannot run; SpecError for a ``dims`` name that no model input's shape has (a typo would otherwise be
    ignored silently)."""
    model = load_model(path)
    check_dim_names(model, dims, path)
    batch = BatchDynamicPass(dims)
    model = Pipeline(InferShapesPass(), batch)(model).model
    assert batch.result is not None
    return probe_prepared(path, model, batch.result.mode, batch.result.note, dims, batch.result.axes)


def analyze_model(path: str | Path, dims: dict[str, int] | None = None) -> AnalysisReport:
    """Analyse an ONNX model file for ``eecompile analyze``: every tensor it can be cut at, with its shape
    (``"batch"`` on the batch axis), the FLOPs per sample before it (a multiply-add counts 2) and as a
    fraction of the whole, what the cut carries, and up to four suggested cuts spread over the FLOPs.

    Raises GraphError like :func:`prepare`."""
    return report_cut_points(prepare(path, dims))


def compile_model(spec: Spec | str | Path, output: str | Path, *, force: bool = False, verify: bool = True,
                  dims: dict[str, int] | None = None, tolerance: float | None = None,
                  engines: bool = False) -> Bundle:
    """Compile ``spec`` (a :class:`~eecompile.spec.Spec`, or the path of its YAML file) into a bundle directory
    at ``output``, written atomically; returns the loaded :class:`~eecompile.bundle.Bundle`.

    ``force`` replaces an existing bundle at ``output``; ``verify=False`` skips the check that the chain with
    no exit taken equals the source model (not recommended); ``dims`` sizes symbolic input dims for probing;
    ``tolerance`` is verify's allowed error relative to each final output's scale, instead of the one the
    graph's precision calls for (:func:`eecompile.passes.verify.graph_tolerance`); ``engines=True`` also builds
    this machine's ONNX Runtime CPU engines in the same write (``eecompile compile`` does by default; a failure
    to build them leaves a note, not an error).

    Raises:
        SpecError: the spec is invalid or does not fit the graph (the message names the YAML path).
        GraphError: the model cannot be read, run or split, or the split fails verification.
        BundleError: ``output`` exists (without ``force``) or is not a bundle directory.

    A spec with ``kind: decoder`` (a decoder-only LM with a key/value cache) goes to
    :func:`eecompile.decoder.compile.compile_decoder`.
    """
    from eecompile.decoder.compile import compile_decoder, is_decoder_spec

    if not isinstance(spec, Spec) and is_decoder_spec(spec):
        return compile_decoder(spec, output, force=force, verify=verify)
    if not isinstance(spec, Spec):
        spec = load_spec(spec)
    output = Path(output)
    check_output_bundle(output, force)
    if spec.model.suffix == ".eebundle" or spec.model.is_dir():
        raise SpecError(f"model: '{spec.model}' is a directory; give the path of an .onnx file")
    write_bundle(output, plan_bundle(spec, dims, verify, tolerance), engines=engines)
    return Bundle.load(output)


def plan_bundle(spec: Spec, dims: dict[str, int] | None = None, verify: bool = True,
                tolerance: float | None = None) -> BundlePlan:
    """Every stage up to the files: the segment graphs with heads and gates, the manifest, the reference."""
    pm = prepare(spec.model, dims)
    final = resolve_final(pm, spec)
    others = resolve_others(pm, spec)  # further final outputs (a detector's boxes beside its scores)
    exits = plan_exits(pm, spec)
    dropped = check_outputs(pm, spec, final, exits, others)
    exits, jumps = plan_jumps(pm, exits)  # jump exits (MuE): a boundary at each jump tensor (passes/jumps.py)
    plans = plan_segments(pm.index, [*(e.targets() for e in exits), [final, *others]])
    check_segments(pm, plans, exits)
    jump_records = check_jump_reads(pm, plans, exits, jumps)
    final_shape = pm.shape_of(final.name)
    if pm.batch_mode != "dynamic":  # a static export's batch of one need not be axis 0 ([T, 1, C] is time-major):
        b = pm.probe.facts[final.name or ""].batch_axis  # heads and gates find the batch by the symbol, as when dynamic
        if b:
            final_shape = [*final_shape[:b], "batch", *final_shape[b + 1:]]
    axis = class_axis(spec, final_shape)
    opset = opset_of(pm.model)
    # Heads first (they can fail on bad input), then the expensive extraction.
    heads = [head_for(pm, e, final_shape, axis, opset, spec.final.task) for e in exits]
    # A head for a newer opset raises its segment's opset (the model's part is up-converted, never the head down).
    seg_opsets = [max(opset, main_opset(h) or opset) if h is not None else opset for h, _ in heads] + [opset]
    models, infos, notes = [], [], []
    if dropped:
        notes.append(f"model outputs {dropped} are not in the bundle (final.drop)")
    if spec.final.end_only:
        notes.append(f"final outputs {list(spec.final.end_only)} are computed only for samples that reach the final "
                     f"exit; for the others they are absent (present.<name> false, rows NaN or 0)")
    act = final_activation(final, opset, len(final_shape))
    if act is not None and exits:
        notes.append(f"the model ends in a {act.describe()}: exit outputs apply it to the heads' logits "
                     f"(gates read the logits)")
    for seg in extract_segments(pm, plans):
        k, seg_opset = seg.index, seg_opsets[seg.index]
        if seg_opset > opset:
            raise_segment(seg, seg_opset, f"{exits[k].where}.head: segment {k} (raised to the head's opset {seg_opset})",
                          f"export the head with the model's opset {opset}")
            notes.append(f"segment {k} runs at opset {seg_opset} (the model's opset {opset} raised for exit "
                         f"{exits[k].number}'s head)")
        model = _segment_model(pm, seg, seg_opset)
        passes, rec = segment_passes(pm, seg, exits, heads, final, final_shape, axis, seg_opset, act,
                                     others=others, end_only=spec.final.end_only)
        Pipeline(*passes)(model)
        name = final.name or ""
        if seg.index in jumps:
            name = jumps[seg.index].name or ""
        finals = [name, *(v.name or "" for v in others)]
        if seg.index < len(exits) and isinstance(exits[seg.index], JumpTarget):
            info = target_info(seg.index, exits[seg.index].at[0].name or "")
        else:
            info = exit_info(name, rec) if rec else ExitInfo(seg.index, [], "final", {n: n for n in finals})
        models.append(model)
        infos.append(segment_info(pm, seg.index, model, info, seg.carried_out, plans[seg.index].nodes))
    manifest = manifest_for(pm, spec, [final, *others], axis, infos, __version__, notes)
    manifest.jumps = jump_records or None
    extra = {}
    if spec.loop is not None:  # an iterative model: the step graph and the loop record (passes/loop.py)
        loop = plan_loop(spec.loop, manifest.inputs, manifest.outputs)
        manifest.loop = loop.record
        if loop.model is not None:
            extra[LOOP_FILE] = loop.model
    # The reference runs before anything is written, while the source model is loaded anyway.
    carried = list(dict.fromkeys(n for s in infos for n in s.carried_out))
    reference = (reference_outputs(pm.model, [1, 4], per_sample=pm.batch_mode != "dynamic", dims=dims, axes=pm.input_axes,
                                   carried=carried, tolerance=graph_tolerance(pm.model, len(infos) - 1, tolerance))
                 if verify else None)
    return BundlePlan(manifest, models, [e.spec.head.file for e in exits], reference, extra)


def segment_passes(pm: PreparedModel, seg: ExtractedSegment, exits: list[ExitPlan],
                   heads: Sequence[tuple[ir.Model | None, dict | None]], final: ir.Value, final_shape: Dims,
                   class_axis: int, opset: int, final_act: FinalActivation | None = None, *,
                   others: Sequence[ir.Value] = (), end_only: Sequence[str] = (),
                   ) -> tuple[list[ir.passes.PassBase], ExitRecord | None]:
    """The passes that finish segment ``seg``: its outputs, exit head, gate and tidying, in order; and the
    record of the head and gate passes for the manifest (None for the final segment). ``final_act`` is the
    activation the model's final output ends in (the exits apply it too); ``others``: further final outputs,
    which early exits give from their head files unless they are ``end_only``."""
    k = seg.index
    if k == len(exits):  # the final segment: the final outputs are its exit
        return [SegmentOutputsPass([*seg.carried_out, final.name or "", *(v.name or "" for v in others)]),
                *tidy_passes()], None
    e = exits[k]
    if isinstance(e, JumpTarget):  # a boundary at a jump tensor: no head, no gate
        return [SegmentOutputsPass(seg.carried_out), *tidy_passes()], None
    if e.spec.jump is not None:  # a jump exit: the head gives the jump tensor, not the final output
        target = pm.index.values[e.spec.jump]
        final, final_shape, class_axis, final_act = target, pm.shape_of(target.name), -1, None
    head_model, head_spec = heads[k]
    where = e.where  # the spec's exits[i]: after a jump target's boundary segment, i is less than k
    # Heads and gates read the `at` tensors batch-first (a Transpose where the probe measured another batch axis).
    views = head_views(pm, k, [v.name or "" for v in e.at])
    attach = AttachHeadPass(
        k, [v.name for v in views], final.name or "", final_shape, where=f"{where}.head", head=head_model,
        head_output=e.head_output.name if e.head_output is not None else None,
        head_output_shape=pm.shape_of(e.head_output.name) if e.head_output is not None else None,
        # A head file's score_output names one of its outputs; for built-in and in-model heads, a model tensor.
        score_output=(e.spec.head.score_output if e.spec.head.file is not None
                      else SCORE if e.spec.head.kind and e.spec.head.options.get("score") else None),
        score_tensor=e.score_output.name if e.score_output is not None else None,
        activation=exit_activation(final_act, e, head_model, final.name or "", f"{where}.head"),
        others={} if e.spec.jump is not None else
        {v.name or "": pm.shape_of(v.name) for v in others if v.name not in end_only})
    nxt = exits[k + 1].spec.gate.kind if k + 1 < len(exits) else None
    kind = e.spec.gate.kind
    at_shape = views[0].shape
    prev_shape = head_views(pm, k - 1, [exits[k - 1].at[0].name or ""])[0].shape if k > 0 else None
    gate = FuseGatePass(
        k, kind, attach, final_shape if "batch" in final_shape else ["batch", *final_shape[1:]],
        class_axis, opset,
        hidden=views[0].name, hidden_shape=at_shape, prev_k=k - 1 if k > 0 else None,
        prev_hidden_dim=_pooled_dim(prev_shape) if prev_shape is not None else None,
        emit_patience_state=nxt == GateKind.PATIENCE, emit_hidden_state=nxt == GateKind.SATURATION,
        prev_hidden_shape=prev_shape,
        against=e.against.name if e.against is not None else None,
        against_shape=pm.shape_of(e.against.name or "") if e.against is not None else None,
        emit_output_state=nxt == GateKind.CHANGE,
        # Q-exit: the halting product runs over consecutive Q-exit gates
        emit_survival_state=kind == GateKind.Q_EXIT and nxt == GateKind.Q_EXIT, spec_index=e.number,
        prev_survival=k > 0 and kind == GateKind.Q_EXIT and exits[k - 1].spec.gate.kind == GateKind.Q_EXIT)
    passes = [SegmentOutputsPass(seg.carried_out), BatchFirstPass(views), attach, gate, *tidy_passes()]
    return passes, ExitRecord(e, attach, gate, head_spec)


def _segment_model(pm: PreparedModel, seg: ExtractedSegment, opset: int) -> ir.Model:
    seg.graph.opset_imports.setdefault("", opset)
    return ir.Model(seg.graph, ir_version=ir_version_for(opset, max(pm.model.ir_version, 8)),
                    producer_name="eecompile", producer_version=__version__)


def _pooled_dim(shape: Dims) -> int | str | None:
    """The feature width a saturation gate compares: C of [B, C, H, W] or [B, C], D of [B, T, D]."""
    if len(shape) in (4, 2):
        return shape[1]
    if len(shape) == 3:
        return shape[2]
    return None


__all__ = ["Pipeline", "analyze_model", "compile_model", "plan_bundle", "prepare", "segment_passes"]
