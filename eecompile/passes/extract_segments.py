"""Extract one ONNX graph per segment (via ``onnx_ir.convenience.extract``).

Segment k takes the model inputs it reads and the tensors carried into it, and produces the tensors later
segments read plus its exit's targets. Recomputable tensors (cheap, computed from the inputs alone: masks,
position ids, shape arithmetic, old-IR ``ConstantOfShape`` weights) are not boundaries, so ``extract`` walks
past them back to the model inputs and each segment that needs them gets its own copy.

Cases:
1. Model inputs a segment does not read are dropped from its inputs.
2. Every boundary value gets a type and a shape (symbolic ``batch`` on its batch axis) from the probe,
   because ``onnx.checker`` and TensorRT need typed graph inputs and outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from eecompile.analysis.partition import SegmentPlan
from eecompile.analysis.prepared import PreparedModel
from eecompile.errors import GraphError


@dataclass
class ExtractedSegment:
    """Segment ``index``'s graph (a new :class:`onnx_ir.Graph` sharing the source model's weights), the names
    of the tensors carried into and out of it, the model inputs it reads, and its values by name."""

    index: int
    graph: ir.Graph
    carried_in: list[str]
    carried_out: list[str]
    model_inputs: list[str]
    values: dict[str, ir.Value] = field(default_factory=dict)  # by name, inside this segment's graph


def extract_subgraph(graph: ir.Graph, inputs: list[ir.Value], outputs: list[ir.Value], where: str) -> ir.Graph:
    """``onnx_ir.convenience.extract`` of ``graph`` between ``inputs`` and ``outputs``, keeping only the inputs
    the subgraph reads (or passes through). Raises GraphError naming ``where`` when the cut needs more inputs."""
    try:
        seg = ir.convenience.extract(graph, inputs, outputs)
    except ValueError as e:
        raise GraphError(f"{where}: cannot extract the subgraph ({e})") from e
    used = [v for v in seg.inputs if v.uses() or v in seg.outputs]  # drop model inputs the subgraph does not read
    seg.inputs.clear()
    seg.inputs.extend(used)
    # onnx-ir collects the initializers in a set of values (ordered by object address): put them back in the
    # source graph's order, so a segment's bytes do not change from one process to the next.
    rank = {name: i for i, name in enumerate(graph.initializers)}
    inits = sorted(seg.initializers.values(), key=lambda v: (rank.get(v.name or "", len(rank)), v.name or ""))
    seg.initializers.clear()
    for v in inits:
        seg.initializers.add(v)
    return seg


def extract_segments(pm: PreparedModel, plans: list[SegmentPlan]) -> list[ExtractedSegment]:
    """One graph per plan of :func:`~eecompile.analysis.partition.plan_segments` (cases 1 and 2).

    Each graph's outputs are the plan's carried tensors, then its targets; its inputs the model inputs it
    reads, then the tensors carried into it. Weights are shared with ``pm.model``, not copied (they may be
    memory-mapped external data). Raises GraphError when onnx-ir cannot extract a plan (a bug in the split).
    """
    graph = pm.model.graph
    model_inputs = list(graph.inputs)
    out: list[ExtractedSegment] = []
    for plan in plans:
        outputs: list[ir.Value] = []
        for v in list(plan.carried_out) + list(plan.targets):
            if v not in outputs:
                outputs.append(v)
        inputs = model_inputs + [v for v in plan.carried_in if v not in model_inputs]
        seg = extract_subgraph(graph, inputs, outputs, f"segment {plan.index}")
        used = list(seg.inputs)
        names = {v.name for v in used}
        for v in list(seg.inputs) + list(seg.outputs):
            if v.name in pm.probe.facts:  # measured shapes: symbolic batch and sequence axes, fixed the rest
                dtype, shape, _ = pm.boundary_shape(v.name)
                v.dtype = dtype
                v.shape = shape
        seg.name = f"segment{plan.index}"
        values = {v.name: v for node in seg for v in node.outputs if v.name}
        values.update({v.name: v for v in seg.inputs if v.name})
        out.append(ExtractedSegment(
            index=plan.index,
            graph=seg,
            carried_in=[v.name or "" for v in plan.carried_in],
            carried_out=[v.name or "" for v in plan.carried_out],
            model_inputs=[v.name or "" for v in model_inputs if v.name in names],
            values=values,
        ))
    return out
