"""Tidy a segment once its head and gate are in: the last rewrites before it is written.

Cases:
1. Graph outputs: the segment hands on exactly what :class:`SegmentOutputsPass` names (the carried tensors,
   or the final output), then what the head and gate passes append; extraction's other targets (the cut
   tensor, an in-model head output) stay inside the graph.
2. Nodes nothing reads any more are removed and the rest sorted topologically (onnx-ir's own passes).
3. Inputs nothing reads are dropped, except the threshold and state inputs: a runtime feeds those to every
   segment with a gate, read or not.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from eecompile.errors import GraphError
from eecompile.names import is_state_tensor, is_threshold_input


class SegmentOutputsPass(ir.passes.InPlacePass):
    """Make ``names`` (values of the segment) its only graph outputs, in that order (case 1).

    Raises:
        GraphError: a name is not a value of the segment (a bug in the split).
    """

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        self.names = list(names)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        g = model.graph
        values = {v.name: v for n in g for v in n.outputs if v.name}
        values.update({v.name: v for v in g.inputs if v.name})
        missing = [n for n in self.names if n not in values]
        if missing:
            raise GraphError(f"{g.name}: the segment does not compute {missing}; this is a bug in the split, "
                             f"please report it with the model")
        g.outputs.clear()
        g.outputs.extend(values[n] for n in self.names)
        return ir.passes.PassResult(model, modified=True)


class DropUnreadInputsPass(ir.passes.InPlacePass):
    """Remove graph inputs no node reads, keeping threshold and state inputs (case 3)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        g = model.graph
        unread = [v for v in g.inputs if not v.uses() and v.name and v not in g.outputs
                  and not is_threshold_input(v.name) and not is_state_tensor(v.name)]
        for v in unread:
            g.inputs.remove(v)
        return ir.passes.PassResult(model, modified=bool(unread))


def tidy_passes() -> list[ir.passes.PassBase]:
    """Case 2 then case 3."""
    return [RemoveUnusedNodesPass(), TopologicalSortPass(), DropUnreadInputsPass()]
