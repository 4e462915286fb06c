"""The manifest records of a compiled bundle, read off the segment graphs: the *describe* stage.

Nothing here changes a graph. Each segment's inputs and outputs become :class:`~eecompile.bundle.TensorInfo`
records with the batch axis the probe measured (exit outputs, gates, scores and state: axis 0); each exit
becomes an :class:`~eecompile.bundle.ExitInfo` naming its head, outputs and gate
(:class:`~eecompile.bundle.GateInfo`); :func:`manifest_for` puts them together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from eecompile.analysis.exits import ExitPlan
from eecompile.analysis.prepared import Dims, PreparedModel
from eecompile.bundle import ExitInfo, GateInfo, Manifest, SegmentInfo, TensorInfo, sha256_file
from eecompile.names import gate_names, is_exit_output, is_exit_tensor, is_threshold_input
from eecompile.spec import Spec

if TYPE_CHECKING:  # the records read what these passes made; analyses import no rewrite at run time
    from eecompile.passes.attach_heads import AttachHeadPass
    from eecompile.passes.gates import FuseGatePass


def tensor_info(v: ir.Value, batch_axis: int | None) -> TensorInfo:
    """``v``'s name, numpy dtype name (``"float32"`` if untyped) and shape (symbolic axes by name)."""
    shape: Dims = []
    if v.shape is not None:
        shape = [d if isinstance(d, int) else (str(d) if d is not None and str(d) != "None" else None)
                 for d in v.shape]
    dtype = str(np.dtype(v.dtype.numpy())) if v.dtype is not None else "float32"
    return TensorInfo(name=v.name or "", dtype=dtype, shape=shape, batch_axis=batch_axis)


def batch_axis(pm: PreparedModel, v: ir.Value) -> int | None:
    """The measured batch axis of a boundary tensor: 0 for what the compiler adds at an exit and for model
    inputs the probe did not see, else what the probe found (None: no batch axis)."""
    name = v.name or ""
    if is_exit_output(name):  # the exit's stand-in for a final output: that output's batch axis
        return final_batch_axis(pm, name.split(".out.", 1)[1])
    if is_exit_tensor(name):
        return 0
    facts = pm.probe.facts.get(name)
    return facts.batch_axis if facts is not None else 0


@dataclass
class ExitRecord:
    """What the head and gate passes of one segment made (None for the final segment)."""

    plan: ExitPlan
    head: AttachHeadPass
    gate: FuseGatePass
    head_spec: dict[str, Any] | None = None


def exit_info(final_name: str, rec: ExitRecord) -> ExitInfo:
    """Exit ``rec.plan.index``'s record: where it cuts, how its head was made, its output and its gate."""
    k, e = rec.plan.index, rec.plan.spec
    gate, out = rec.gate.result, rec.head.output
    assert gate is not None and out is not None, "the head and gate passes must have run"
    names = gate_names(k)
    outputs = {final_name: out.name or "", **{n: v.name or "" for n, v in rec.head.other_outputs.items()}}
    return ExitInfo(
        index=k, at=[v.name or "" for v in rec.plan.at], head=e.head.describe(), outputs=outputs,
        gate=GateInfo(kind=e.gate.kind.value, threshold=float(e.gate.threshold), output=names["gate"],
                      threshold_input=names["threshold"], score_output=names["score"],
                      state_inputs=[v.name or "" for v in gate.state_inputs],
                      state_outputs=[v.name or "" for v in gate.state_outputs]),
        name=e.name, head_spec=rec.head_spec,
    )


def segment_info(pm: PreparedModel, k: int, model: ir.Model, exit: ExitInfo, carried_out: list[str],
                 nodes: int) -> SegmentInfo:
    """Segment ``k``'s record; ``nodes`` is its node set (a bitset over ``pm.index.nodes``) for the FLOPs."""
    g = model.graph
    flops = pm.flops_of(nodes)
    return SegmentInfo(
        index=k, file=f"segments/seg{k}.onnx",
        inputs=[tensor_info(v, batch_axis(pm, v)) for v in g.inputs if not is_threshold_input(v.name)],
        outputs=[tensor_info(v, batch_axis(pm, v)) for v in g.outputs],
        exit=exit, carried_out=list(carried_out),
        flops=flops, flops_fraction=flops / (pm.total_flops or 1),
    )


def manifest_for(pm: PreparedModel, spec: Spec, finals: list[ir.Value], class_axis: int,
                 segments: list[SegmentInfo], version: str, notes: list[str] | None = None) -> Manifest:
    """The bundle manifest: source file and hash, model inputs, the final outputs (the one the gates read
    first; ``end_only`` names those early exits do not give), the segments and notes (the batch mode's, then
    ``notes``, then one for untrained heads).

    In dynamic mode axis 0 of the model inputs and of the final output is written as ``"batch"``."""
    m = Manifest(
        source_model={"file": spec.model.name, "sha256": sha256_file(spec.model)},
        inputs=[tensor_info(v, _input_batch_axis(pm, v)) for v in pm.index.graph_inputs],
        outputs=[tensor_info(v, final_batch_axis(pm, v.name or "")) for v in finals],
        end_only=list(spec.final.end_only),
        segments=segments, batch_mode=pm.batch_mode, class_axis=class_axis,
        eecompile_version=version, notes=[pm.batch_note, *(notes or [])], task=spec.final.task,
    )
    if pm.batch_mode == "dynamic":
        for t in m.inputs + m.outputs:
            if t.shape and t.batch_axis is not None and t.batch_axis < len(t.shape):
                t.shape[t.batch_axis] = "batch"
    untrained = [s.index for s in segments if s.exit.head_spec is not None and not s.exit.head_spec.get("trained")]
    if untrained:
        m.notes.append(untrained_note(untrained))
    return m


def final_batch_axis(pm: PreparedModel, name: str) -> int:
    """The batch axis the probe measured on the final output ``name`` (1 for a time-major ``[T, B, C]``);
    0 in per-sample mode or where it was not measured."""
    facts = pm.probe.facts.get(name)
    if facts is None or facts.batch_axis is None:
        return 0
    return facts.batch_axis


def _input_batch_axis(pm: PreparedModel, v: ir.Value) -> int | None:
    """A model input's batch axis as the probe measured it: 0 where its size followed the batch, None for a
    scalar or an input with a fixed axis 0 in dynamic mode (fed as given)."""
    if v.shape is None or not len(v.shape):
        return None
    facts = pm.probe.facts.get(v.name or "")
    if pm.batch_mode != "dynamic":
        return pm.input_axes.get(v.name or "", 0)
    if facts is None:
        return 0
    return facts.batch_axis


def untrained_note(exits: list[int]) -> str:
    """The manifest note for exits whose heads are untrained."""
    return (f"exits {exits} have untrained heads (they never fire): run "
            f"`eecompile train-heads BUNDLE --data TRAIN.npz`")
