"""Shape reads that need no carried tensor: ``Shape(h)`` where only some axes of ``h``'s shape are used and a
model input has the same size on those axes (typically the batch: exporters write ``Shape(h)[0]`` for a
feature map ``h``, often one Shape node shared by reads before and after a cut).

Left as it is, such a read forces ``h`` across the cut only for its shape (a whole feature map carried to the
next segment), or, when the Shape output is shared, carries a batch-dependent int64 tensor that compaction
would make stale (the cut is refused). Rewritten to ``Shape(input)``, it is computed from the model inputs
alone, so every segment that needs it recomputes it (analysis/partition.py: recomputable) and nothing is
carried for it. ``analyze`` and ``compile`` both see the rewritten graph, so they agree on every cut.

A read is rewritten only when the probe measured the same sizes on the axes used at every probe batch size
(and, on symbolic axes, the same input dimension), in batch-dynamic mode (at batch 1 alone equal sizes prove
nothing). The axes used are those picked by constant-index Gathers of the Shape output (or the Shape's own
``start``/``end``); any other reader means every axis.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from eecompile.analysis.probe import ProbeResult, TensorFacts


def _const(v: ir.Value | None) -> np.ndarray | None:
    if v is None:
        return None
    if v.const_value is not None:
        return v.const_value.numpy()
    p = v.producer()
    if p is not None and p.op_type == "Constant" and "value" in p.attributes:
        return p.attributes["value"].as_tensor().numpy()
    return None


def _axes_used(node: ir.Node, rank: int) -> set[int] | None:
    """Axes of the Shape node's input whose sizes its readers use (None: all of them, or unknown)."""
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", rank)
    start, end = (start % rank if start < 0 else min(start, rank)), (end % rank if end < 0 else min(end, rank))
    window = list(range(start, end))
    used: set[int] = set()
    for reader, _ in node.outputs[0].uses():
        idx = _const(reader.inputs[1]) if reader.op_type == "Gather" and len(reader.inputs) > 1 else None
        if idx is None or reader.attributes.get_int("axis", 0) != 0 or idx.dtype.kind not in "iu":
            return None
        for i in idx.reshape(-1).tolist():
            if not 0 <= i < len(window):  # negative indices count from the end: rank-dependent
                return None
            used.add(window[i])
    return used if node.outputs[0].uses() else set()


def _same_sizes(a: TensorFacts, b: TensorFacts, axes: set[int]) -> bool:
    for batch, shape in a.shapes.items():
        other = b.shapes.get(batch)
        if other is None or any(ax >= len(shape) or ax >= len(other) or shape[ax] != other[ax] for ax in axes):
            return False
    for ax in axes:
        if (a.batch_axis == ax) != (b.batch_axis == ax) or a.symbolic.get(ax) != b.symbolic.get(ax):
            return False
    return True


def share_shape_reads(model: ir.Model, probe: ProbeResult) -> int:
    """Rewrite ``Shape(h)`` to ``Shape(x)`` for a model input ``x`` with the same sizes on the axes used;
    returns how many Shape nodes were rewritten (the graph changes in place)."""
    if len(probe.batches) < 2:
        return 0
    inputs = [(v, probe.facts[v.name]) for v in model.graph.inputs if v.name in probe.facts]
    changed = 0
    for node in model.graph:
        if node.op_type != "Shape" or not node.inputs or node.inputs[0] is None:
            continue
        h = node.inputs[0]
        facts = probe.facts.get(h.name or "")
        if h in model.graph.inputs or h.producer() is None or facts is None or facts.problem:
            continue
        rank = len(facts.shapes[probe.batches[0]])
        axes = _axes_used(node, rank) if rank else None
        if not axes:
            continue
        windowed = "start" in node.attributes or "end" in node.attributes
        for x, xf in inputs:
            # Position i of Shape(x) is axis i of x (non-negative indices, no window): any rank will do.
            if windowed and len(xf.shapes[probe.batches[0]]) != rank:
                continue
            if _same_sizes(facts, xf, axes):
                node.replace_input_with(0, x)
                changed += 1
                break
    return changed
