"""The pass pipeline that turns (model, spec) into a bundle.

    load -> shape inference -> make batch dynamic -> probe (batch axes, FLOPs) -> validate spec against graph
    -> plan + extract segments -> attach exit heads -> fuse gates -> tidy -> write to a staging directory
    -> verify (chain with no exit == original model) -> swap the staging directory into place

A compile that fails anywhere writes nothing and leaves an earlier bundle at the destination untouched.
"""

from __future__ import annotations

import difflib
import gc
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass
from onnx_ir.tape import Tape

from eecompile import __version__
from eecompile.bundle import (
    Bundle,
    ExitInfo,
    GateInfo,
    Manifest,
    SegmentInfo,
    TensorInfo,
    _check_destination,
    sha256_file,
    staged_bundle,
    write_manifest,
)
from eecompile.errors import BundleError, GraphError, SpecError
from eecompile.names import (
    STATE_ARGMAX,
    STATE_COUNT,
    exit_logits,
    exit_output,
    gate_names,
    head_prefix,
    is_exit_tensor,
    is_state_tensor,
    is_threshold_input,
)
from eecompile.passes.attach_heads import (
    apply_activation,
    final_activation,
    fit_exit_output,
    head_activation,
    load_head,
    splice_head,
)
from eecompile.analysis.cut_points import PreparedModel, cut_problem, prepare
from eecompile.passes.extract_segments import Dims, ExtractedSegment, boundary_shape, dims, extract_segments
from eecompile.passes.gates import build_gate
from eecompile.passes.load import opset_of
from eecompile.passes.opset import convert_model, ir_version_for, main_opset, raise_segment
from eecompile.analysis.partition import SegmentPlan, carried_across, plan_segments
from eecompile.passes.verify import Reference, SegmentIO, reference_outputs, verify_chain
from eecompile.spec import ExitSpec, GateKind, Spec, load_spec

log = logging.getLogger(__name__)

EXTERNAL_DATA_BYTES = 1 << 30  # segments with more weights than this are saved with external data
INLINE_EXTERNAL_BYTES = 64 << 20  # segments of external-data models with less than this get their weights inline


@dataclass
class ExitPlan:
    index: int
    spec: ExitSpec
    at: list[ir.Value]
    head_output: ir.Value | None = None  # {output: name} heads
    score_output: ir.Value | None = None


def _n(v: ir.Value | None) -> str:
    """A value's name (values of loaded models always have one)."""
    return (v.name or "") if v is not None else ""


def _suggest(name: str, pm: PreparedModel) -> str:
    close = difflib.get_close_matches(name, list(pm.index.values), n=3, cutoff=0.5)
    return f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""


def _resolve_tensor(pm: PreparedModel, name: str, where: str) -> ir.Value:
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


def _resolve_final(pm: PreparedModel, spec: Spec) -> ir.Value:
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


def _plan_exits(pm: PreparedModel, spec: Spec) -> list[ExitPlan]:
    idx = pm.index
    plans: list[ExitPlan] = []
    prev_pos = -1
    for k, e in enumerate(spec.exits):
        where = f"exits[{k}].at"
        at = [_resolve_tensor(pm, n, where) for n in e.at]
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
        facts = pm.probe.facts.get(_n(v))
        all_nodes = (1 << len(idx.nodes)) - 1
        carried, _ = carried_across(idx, idx.anc[p], all_nodes & ~idx.anc[p])
        problem = cut_problem(pm, v, carried)
        if problem is not None and facts is not None and facts.problem is None and "carry" in problem:
            problem = None  # a carried-tensor problem is judged on the real plan below
        if problem:
            raise SpecError(f"{where}: cannot put an exit at '{v.name}': {problem}; "
                            f"run `eecompile analyze {pm.path}` for tensors that work")
        plan = ExitPlan(k, e, at)
        if e.head.output is not None:
            plan.head_output = _resolve_tensor(pm, e.head.output, f"exits[{k}].head.output")
        if e.head.score_output is not None and e.head.file is None:
            plan.score_output = _resolve_tensor(pm, e.head.score_output, f"exits[{k}].head.score_output")
        if e.gate.kind == GateKind.SCORE and e.head.score_output is None:
            raise SpecError(f"exits[{k}].head: gate kind 'score' needs the head's score output: "
                            f"add score_output: NAME to the head")
        plans.append(plan)
    return plans


def _check_carried(pm: PreparedModel, plans: list[SegmentPlan], exits: list[ExitPlan]) -> None:
    if pm.batch_mode != "dynamic":
        return
    for plan in plans[:-1]:
        for v in plan.carried_out:
            facts = pm.probe.facts.get(_n(v))
            problem = "ONNX Runtime could not expose it" if facts is None else facts.problem
            if problem:
                at = exits[plan.index].at[0].name
                raise SpecError(
                    f"exits[{plan.index}].at: cutting at '{at}' would carry '{v.name}' to a later segment, and "
                    f"{problem}; choose another cut (`eecompile analyze {pm.path}` lists the clean ones)")


def _tensor_info(v: ir.Value, batch_axis: int | None) -> TensorInfo:
    shape: Dims = []
    if v.shape is not None:
        shape = [d if isinstance(d, int) else (str(d) if d is not None and str(d) != "None" else None)
                 for d in v.shape]
    dtype = str(np.dtype(v.dtype.numpy())) if v.dtype is not None else "float32"
    return TensorInfo(name=v.name or "", dtype=dtype, shape=shape, batch_axis=batch_axis)


def _final_shape(pm: PreparedModel, final: ir.Value) -> Dims:
    _, shape, _ = boundary_shape(pm, final.name)
    return dims(shape)


def _class_axis(spec: Spec, final_shape: Dims) -> int:
    """The spec's class axis, or the last non-batch axis longer than 1 (so [N, C, 1, 1] classifiers work
    without saying so; a softmax over a size-1 axis would make every gate fire)."""
    rank = len(final_shape)
    axis = spec.final.class_axis
    if axis is None:
        longer = [i for i in range(1, rank) if not isinstance(final_shape[i], int) or final_shape[i] != 1]
        axis = longer[-1] if longer else rank - 1
        return axis - rank  # negative: counts from the end, like the default -1
    if not -rank <= axis < rank or axis % rank == 0:
        raise SpecError(f"final.class_axis: {axis} is not a class axis of the final output shape {final_shape} "
                        f"(axis 0 is the batch)")
    if final_shape[axis] == 1:
        raise SpecError(f"final.class_axis: axis {axis} of the final output {final_shape} has size 1; a gate over one "
                        f"class always fires; give the axis that holds the classes")
    return axis


def _make_trained_head(pm: PreparedModel, e: ExitPlan, final_shape: Dims, class_axis: int,
                       opset: int) -> tuple[ir.Model, dict]:
    try:
        from eecompile.heads import head_onnx, least_opset
    except ImportError as err:
        raise SpecError(f"exits[{e.index}].head.kind: trained heads need eecompile.heads ({err})") from err
    _, fshape, _ = boundary_shape(pm, e.at[0].name)
    feature_shape = dims(fshape)
    n_classes = final_shape[class_axis % len(final_shape)]
    if not isinstance(n_classes, int):
        raise SpecError(f"exits[{e.index}].head.kind: the final output's class axis has no fixed size")
    mask_dtype = onnx.TensorProto.INT64
    if len(e.at) > 1:  # e.g. pool: masked_mean reads the attention mask listed second in `at`
        facts = pm.probe.facts.get(_n(e.at[1]))
        if facts is not None:
            mask_dtype = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(facts.dtype))
    opset = max(opset, least_opset(e.spec.head.kind or "linear", feature_shape, dict(e.spec.head.options)))
    proto = head_onnx(e.spec.head.kind or "linear", feature_shape, n_classes, dict(e.spec.head.options), None, opset,
                      mask_dtype=mask_dtype)
    head_spec = {"kind": e.spec.head.kind, "options": dict(e.spec.head.options),
                 "feature_shape": [d if isinstance(d, int) else str(d) for d in feature_shape],
                 "n_classes": n_classes, "trained": False}
    return ir.from_proto(proto), head_spec


def _build_segment_exit(pm: PreparedModel, seg: ExtractedSegment, e: ExitPlan, exits: list[ExitPlan], opset: int,
                        final: ir.Value, class_axis: int, head_model: ir.Model | None) -> tuple[ExitInfo, list[ir.Value]]:
    """Attach exit ``e``'s head and gate to ``seg``; returns the exit record and the outputs it adds."""
    k = e.index
    g = seg.graph
    where = f"exits[{k}].head"
    at = seg.values[_n(e.at[0])]
    final_shape = _final_shape(pm, final)
    score_val: ir.Value | None = None
    if head_model is not None:
        at_values = [seg.values[_n(v)] for v in e.at]
        logits, score_val = splice_head(g, k, at_values, head_model, where, e.spec.head.score_output)
        logits_shape = _infer_head_shape(g, logits, pm, e, final_shape)
    else:
        assert e.head_output is not None
        logits = seg.values[_n(e.head_output)]
        _, s, _ = boundary_shape(pm, e.head_output.name)
        logits_shape = dims(s)
        if e.score_output is not None:
            score_val = seg.values[_n(e.score_output)]
    final_name = _n(final)
    act = final_activation(final, opset_of(pm.model), len(final_shape))
    if act is not None and head_model is None and e.head_output is not None:
        already = head_activation(e.head_output)
        if already is not None and already != act.op:
            raise SpecError(f"{where}.output: '{e.head_output.name}' is the output of a {already}, the final output "
                            f"'{final_name}' of a {act.op}; an exit's rows must mean what the final rows mean: name "
                            f"the head's logits (the tensor before its {already})")
        act = None if already == act.op else act
    name = exit_output(k, final_name)
    logits = fit_exit_output(g, k, logits, logits_shape, final_shape, exit_logits(k) if act else name, where)
    # The exit output is what the final output is (e.g. probabilities); the gate reads the logits.
    out = apply_activation(g, k, logits, act, final_shape, name) if act else logits
    nxt = exits[k + 1] if k + 1 < len(exits) else None
    tape = Tape(g)
    _, at_shape, _ = boundary_shape(pm, e.at[0].name)
    prev_dim = None
    if k > 0:
        _, prev_shape, _ = boundary_shape(pm, exits[k - 1].at[0].name)
        prev_dim = _pooled_dim(dims(prev_shape))
    gate = build_gate(
        tape, k, e.spec.gate.kind, logits, ["batch", *final_shape[1:]], class_axis, opset,
        prev_k=k - 1 if k > 0 else None, hidden=at, hidden_shape=dims(at_shape), prev_hidden_dim=prev_dim,
        score_value=score_val,
        emit_patience_state=nxt is not None and nxt.spec.gate.kind == GateKind.PATIENCE,
        emit_hidden_state=nxt is not None and nxt.spec.gate.kind == GateKind.SATURATION,
    )
    g.extend(tape.nodes)
    gate.gate.dtype, gate.gate.shape = ir.DataType.BOOL, ir.Shape(["batch"])
    gate.score.dtype, gate.score.shape = ir.DataType.FLOAT, ir.Shape(["batch"])
    for v in gate.state_outputs:
        if _n(v).endswith("." + STATE_ARGMAX):
            v.dtype, v.shape = ir.DataType.INT64, ir.Shape(["batch", None])
        else:
            v.dtype = ir.DataType.FLOAT
            v.shape = ir.Shape(["batch"]) if _n(v).endswith("." + STATE_COUNT) else ir.Shape(["batch", None, None])
    g.inputs.extend(gate.state_inputs)
    g.inputs.append(gate.threshold)
    names = gate_names(k)
    info = ExitInfo(
        index=k, at=[_n(v) for v in e.at], head=e.spec.head.describe(), outputs={final_name: _n(out)},
        gate=GateInfo(kind=e.spec.gate.kind.value, threshold=float(e.spec.gate.threshold), output=names["gate"],
                      threshold_input=names["threshold"], score_output=names["score"],
                      state_inputs=[_n(v) for v in gate.state_inputs],
                      state_outputs=[_n(v) for v in gate.state_outputs]),
        name=e.spec.name,
    )
    return info, [out, gate.gate, gate.score, *gate.state_outputs]


def _pooled_dim(shape: list) -> int | str | None:
    if len(shape) in (4, 2):
        return shape[1]
    if len(shape) == 3:
        return shape[2]
    return None


def _infer_head_shape(g: ir.Graph, logits: ir.Value, pm: PreparedModel, e: ExitPlan,
                      final_shape: Dims) -> Dims:
    """The head output's shape, by running shape inference on the head alone when it has none."""
    if logits.shape is not None and len(logits.shape) >= 1:
        return [d if isinstance(d, int) else "batch" for d in logits.shape]
    return ["batch", *final_shape[1:]]


def _tidy(model: ir.Model) -> None:
    RemoveUnusedNodesPass()(model)
    TopologicalSortPass()(model)


def _save(model: ir.Model, path: Path) -> None:
    """Save a segment; weights go to ``seg{k}.onnx.data`` beside it when they are large or came from external
    data (a segment must never point back at the source model's data file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    inits = [v for v in model.graph.initializers.values() if v.const_value is not None]
    size = sum(int(v.const_value.nbytes) for v in inits if v.const_value is not None)
    external = [v for v in inits if isinstance(v.const_value, ir.ExternalTensor)]
    if external and size <= INLINE_EXTERNAL_BYTES:
        # torch's dynamo exporter writes even tiny weights to a .data file; a small segment is simpler inline.
        for v in external:
            v.const_value = ir.tensor(v.const_value.numpy(), name=v.name)  # type: ignore[union-attr]
        external = []
    if size > EXTERNAL_DATA_BYTES or external:
        ir.save(model, path, external_data=path.name + ".data")
    else:
        ir.save(model, path)


def compile_model(spec: Spec | str | Path, output: str | Path, *, force: bool = False, verify: bool = True,
                  dims: dict[str, int] | None = None) -> Bundle:
    """Compile ``spec`` into a bundle at ``output`` (atomically; an existing bundle needs ``force``).

    A spec with ``kind: decoder`` (a decoder-only LM with a key/value cache) goes to
    ``eecompile.decoder.compile.compile_decoder``."""
    from eecompile.decoder.compile import compile_decoder, is_decoder_spec

    if not isinstance(spec, Spec) and is_decoder_spec(spec):
        return compile_decoder(spec, output, force=force, verify=verify)
    if not isinstance(spec, Spec):
        spec = load_spec(spec)
    output = Path(output)
    _check_destination(output.absolute())
    if output.exists() and not force:
        raise BundleError(f"{output}: already exists; pass --force to replace it")
    if spec.model.suffix == ".eebundle" or (spec.model.is_dir()):
        raise SpecError(f"model: '{spec.model}' is a directory; give the path of an .onnx file")
    plan = _plan_bundle(spec, dims, verify)
    with staged_bundle(output) as tmp:
        for k, model in enumerate(plan.models):
            path = tmp / plan.manifest.segments[k].file
            _save(model, path)
            try:
                onnx.checker.check_model(str(path))
            except onnx.checker.ValidationError as e:
                raise GraphError(f"segment {k} is not a valid ONNX model ({str(e).splitlines()[0]}); "
                                 f"this is a bug in the split, please report it with the model") from e
        # The in-memory graphs hold (memory-mapped) source weights: release them before the segments load.
        plan.models.clear()
        gc.collect()
        for k, src in enumerate(plan.head_sources):
            if src is not None:
                (tmp / "heads").mkdir(exist_ok=True)
                shutil.copyfile(src, tmp / "heads" / f"exit{k}.onnx")
        if plan.reference is not None:
            ios = [SegmentIO(tmp / s.file, [t.name for t in s.inputs],
                             s.exit.gate.threshold_input if s.exit.gate else None, [t.name for t in s.outputs])
                   for s in plan.manifest.segments]
            worst = verify_chain(plan.reference, ios, [t.name for t in plan.manifest.outputs])
            plan.manifest.notes.append(f"verified: no-exit chain equals the source model (max rel. error {worst:.1e})")
        write_manifest(tmp, plan.manifest)
    return Bundle.load(output)


@dataclass
class BundlePlan:
    manifest: Manifest
    models: list[ir.Model]  # one per segment, in order
    head_sources: list[Path | None]  # head files to keep in heads/
    reference: Reference | None  # the unsplit model's outputs, for verify


def _plan_bundle(spec: Spec, dims: dict[str, int] | None, verify: bool) -> BundlePlan:
    """Everything up to the files: prepared model, validated spec, segment graphs with heads and gates."""
    pm = prepare(spec.model, dims)
    final = _resolve_final(pm, spec)
    exits = _plan_exits(pm, spec)
    opset = opset_of(pm.model)
    targets: list[Sequence[ir.Value]] = []
    for e in exits:
        t = list(e.at)
        for extra in (e.head_output, e.score_output):
            if extra is not None and extra not in t:
                t.append(extra)
        targets.append(t)
    targets.append([final])
    plans = plan_segments(pm.index, targets)
    for k, plan in enumerate(plans[:-1]):
        if plan.node_count() == 0:
            raise SpecError(f"exits[{k}].at: segment {k} would be empty (its cut adds no computation)")
    if plans[-1].node_count() == 0:
        raise SpecError(f"exits[{len(exits) - 1}].at: nothing is left after the last exit; cut earlier")
    _check_carried(pm, plans, exits)
    final_shape = _final_shape(pm, final)
    class_axis = _class_axis(spec, final_shape)

    # Heads first (they can fail on bad input), then the expensive extraction.
    head_models: list[ir.Model | None] = []
    head_specs: list[dict | None] = []
    head_sources: list[Path | None] = []
    for e in exits:
        h = e.spec.head
        if h.file is not None:
            head_models.append(load_head(h.file, opset, f"exits[{e.index}].head"))
            head_specs.append(None)
            head_sources.append(h.file)
        elif h.kind is not None:
            model, hs = _make_trained_head(pm, e, final_shape, class_axis, opset)
            head_models.append(model)
            head_specs.append(hs)
            head_sources.append(None)
        else:
            head_models.append(None)
            head_specs.append(None)
            head_sources.append(None)

    # A head for a newer opset raises its segment's opset (the model's part is up-converted, never the head down).
    seg_opsets = [max(opset, main_opset(h) or opset) if h is not None else opset for h in head_models] + [opset]
    segs = extract_segments(pm, plans)
    seg_infos: list[SegmentInfo] = []
    notes: list[str] = []
    act = final_activation(final, opset, len(final_shape))
    if act is not None and exits:
        notes.append(f"the model ends in a {act.describe()}: exit outputs apply it to the heads' logits "
                     f"(gates read the logits)")
    seg_models: list[ir.Model] = []
    total = pm.total_flops or 1
    for k, seg in enumerate(segs):
        seg_opset = seg_opsets[k]
        if seg_opset > opset:
            raise_segment(seg, seg_opset, f"exits[{k}].head: segment {k} (raised to the head's opset {seg_opset})",
                          f"export the head with the model's opset {opset}")
            notes.append(f"segment {k} runs at opset {seg_opset} (the model's opset {opset} raised for exit {k}'s head)")
        g = seg.graph
        outputs: list[ir.Value] = [seg.values[n] for n in seg.carried_out]
        info: ExitInfo
        if k < len(exits):
            info, exit_outputs = _build_segment_exit(pm, seg, exits[k], exits, seg_opset, final, class_axis,
                                                     head_models[k])
            info.head_spec = head_specs[k]
            outputs += exit_outputs
        else:
            fv = seg.values[_n(final)]
            outputs.append(fv)
            info = ExitInfo(index=k, at=[], head="final", outputs={_n(final): _n(final)})
        g.outputs.clear()
        g.outputs.extend(outputs)
        g.opset_imports.setdefault("", seg_opset)
        model = ir.Model(g, ir_version=ir_version_for(seg_opset, max(pm.model.ir_version, 8)), producer_name="eecompile",
                         producer_version=__version__)
        _tidy(model)
        for name in [v.name for v in g.inputs]:
            v = next(x for x in g.inputs if x.name == name)
            if not v.uses() and v.name and not is_threshold_input(v.name) and not is_state_tensor(v.name):
                g.inputs.remove(v)
        seg_models.append(model)
        seg_infos.append(SegmentInfo(
            index=k, file=f"segments/seg{k}.onnx",
            inputs=[_tensor_info(v, _batch_axis(pm, v)) for v in g.inputs if not is_threshold_input(_n(v))],
            outputs=[_tensor_info(v, _batch_axis(pm, v)) for v in g.outputs],
            exit=info, carried_out=list(seg.carried_out),
            flops=pm.flops_of(plans[k].nodes), flops_fraction=pm.flops_of(plans[k].nodes) / total,
        ))

    manifest = Manifest(
        source_model={"file": spec.model.name, "sha256": sha256_file(spec.model)},
        inputs=[_tensor_info(v, 0 if v.shape is None or len(v.shape) else None) for v in pm.index.graph_inputs],
        outputs=[_tensor_info(final, 0)],
        segments=seg_infos, batch_mode=pm.batch_mode, class_axis=class_axis,
        eecompile_version=__version__,
        notes=[pm.batch_note, *notes],
    )
    _fix_io_shapes(manifest, pm)
    untrained = [k for k, hs in enumerate(head_specs) if hs is not None]
    if untrained:
        manifest.notes.append(f"exits {untrained} have untrained heads (they never fire): run "
                              f"`eecompile train-heads BUNDLE --data TRAIN.npz`")
    # The reference runs before anything is written, while the source model is loaded anyway.
    reference = (reference_outputs(pm.model, [1, 4], per_sample=pm.batch_mode != "dynamic", dims=dims)
                 if verify else None)
    return BundlePlan(manifest, seg_models, head_sources, reference)


def _batch_axis(pm: PreparedModel, v: ir.Value) -> int | None:
    name = _n(v)
    if is_exit_tensor(name):
        return 0
    facts = pm.probe.facts.get(_n(v))
    if facts is not None:
        return facts.batch_axis
    return 0  # model inputs


def _fix_io_shapes(manifest: Manifest, pm: PreparedModel) -> None:
    """Model inputs/outputs in the manifest: batch axis 0 symbolic as 'batch' in dynamic mode."""
    if pm.batch_mode != "dynamic":
        return
    for t in manifest.inputs + manifest.outputs:
        if t.shape and t.batch_axis == 0:
            t.shape[0] = "batch"


def replace_heads(bundle_path: str | Path, heads: dict[int, onnx.ModelProto], *,
                  head_specs: dict[int, dict] | None = None) -> Bundle:
    """Splice new heads (e.g. trained ones) into a bundle's segments, re-verify, rewrite atomically.

    Each head replaces exit k's head: same input (the cut tensor), same output contract. The final outputs
    of the chain with no exit must be unchanged, and every new exit output must be finite on random inputs."""
    from eecompile.analysis.probe import random_inputs

    bundle = Bundle.load(bundle_path)
    m = bundle.manifest
    for k in heads:
        if not 0 <= k < m.n_early_exits:
            raise SpecError(f"replace_heads: exit {k} does not exist (the bundle has {m.n_early_exits} early exits)")

    def change(tmp: Path, manifest: Manifest) -> None:
        for k, proto in heads.items():
            seg = manifest.segments[k]
            path = tmp / seg.file
            model = ir.load(path)
            opset = opset_of(model)
            head = ir.from_proto(proto)
            head_opset = main_opset(head) or opset
            if head_opset > opset:  # raise the segment, never lower the head (passes/opset.py)
                model = convert_model(model, head_opset, f"replace_heads: segment {k}",
                                      f"export the head with opset {opset}")
                opset = head_opset
            elif head_opset < opset:
                head = convert_model(head, opset, f"replace_heads: exit {k}'s head", f"export it with opset {opset}")
            g = model.graph
            prefix = head_prefix(k)
            final_name = next(iter(seg.exit.outputs))
            old_out = next(v for v in g.outputs if v.name == seg.exit.outputs[final_name])
            # With a final activation the head ends in ee{k}.logits (read by the gate and the activation).
            old_out = next((v for n in g for v in n.outputs if v.name == exit_logits(k)), old_out)
            old_nodes = [n for n in g if (n.name or "").startswith(prefix)]
            g.remove(old_nodes, safe=False)
            for name in [n for n in g.initializers if n.startswith(prefix)]:
                g.initializers.pop(name)
            values = {v.name: v for n in g for v in n.outputs}
            values.update({v.name: v for v in g.inputs})
            logits, _ = splice_head(g, k, [values[n] for n in seg.exit.at], head, f"exits[{k}].head")
            out_shape = [d if isinstance(d, int) else "batch" for d in (old_out.shape or [])]
            lshape = [d if isinstance(d, int) else "batch" for d in (logits.shape or out_shape)]
            old_out.name = f"{old_out.name}.old"
            new_out = fit_exit_output(g, k, logits, lshape, out_shape, old_out.name[:-len(".old")],
                                      f"exits[{k}].head")
            old_out.replace_all_uses_with(new_out, replace_graph_outputs=True)
            _tidy(model)
            _save(model, path)
            (tmp / "heads").mkdir(exist_ok=True)
            onnx.save(proto, tmp / "heads" / f"exit{k}.onnx")
            if head_specs and k in head_specs:
                seg.exit.head_spec = head_specs[k]
        # Re-verify: the no-exit chain's final outputs are untouched, every exit output is finite.
        ios = [SegmentIO(tmp / s.file, [t.name for t in s.inputs],
                         s.exit.gate.threshold_input if s.exit.gate else None, [t.name for t in s.outputs])
               for s in manifest.segments]
        old = [SegmentIO(bundle.path / s.file, i.inputs, i.threshold_input, i.outputs)
               for s, i in zip(m.segments, ios, strict=True)]
        from eecompile.passes.verify import run_chain_no_exit

        inputs = [ir.Value(name=t.name, type=ir.TensorType(ir.DataType.from_numpy(np.dtype(t.dtype))),
                           shape=ir.Shape(t.shape)) for t in manifest.inputs]
        b = 1 if manifest.batch_mode != "dynamic" else 3
        feeds = random_inputs(inputs, b, seed=11)
        new_env, old_env = run_chain_no_exit(ios, feeds), run_chain_no_exit(old, feeds)
        for t in manifest.outputs:
            if not np.allclose(new_env[t.name], old_env[t.name], rtol=1e-6, atol=1e-6):
                raise GraphError(f"replace_heads: final output '{t.name}' changed; this is a bug, nothing was written")
        for k in heads:
            for name in manifest.segments[k].exit.outputs.values():
                if not np.all(np.isfinite(new_env[name])):
                    raise GraphError(f"replace_heads: exit {k}'s new head gives non-finite outputs; "
                                     f"nothing was written")
        manifest.notes = [n for n in manifest.notes if "untrained heads" not in n]
        untrained = [s.index for s in manifest.segments
                     if s.exit.head_spec is not None and not s.exit.head_spec.get("trained")]
        if untrained:
            manifest.notes.append(f"exits {untrained} have untrained heads (they never fire): run "
                                  f"`eecompile train-heads BUNDLE --data TRAIN.npz`")
        manifest.notes.append(f"heads replaced for exits {sorted(heads)}; re-verified")

    from eecompile.bundle import update_bundle as _update

    return _update(bundle.path, change)
