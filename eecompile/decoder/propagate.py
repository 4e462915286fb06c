"""CALM's state propagation for exit mode: a deep segment's key/values computed from an exit's hidden state alone.

In exit mode a token that leaves at an exit skips the deeper layers, whose caches still need its keys and values.
CALM (Schuster et al. 2022, "Confident Adaptive Language Modeling", sec. 3.4) propagates the exit layer's state:
every skipped layer takes the exit hidden state h_E as its input for that position, so its key/value are its
own projections of h_E. ``propagation_graph`` derives that graph from a segment: the segment with every layer's
input rewired to the segment's input hidden state, keeping only the cache updates (``present.{i}.key|value``);
the attention cores, MLPs and the output hidden state drop out as dead code. So per exited position and layer
it computes one norm, the key and value projections and the rotary embedding, ~6% of a SmolLM2 layer's
multiply-adds, and writes the segment's own cache (in place, as the segment does).

The runner's default instead runs the exited positions' exit states through the deep segments with the next
token that goes deep (``exit_fill="later"``): the deep layers' keys/values are then exactly what the full model
computes from the exit state. ``exit_fill="propagate"`` uses these graphs (``decoder.segments[s].propagate``).

Case: a segment whose layer outputs are not named ``layers.{i}.output`` (eecompile's export names them so) gets
no propagation graph (None; exit_fill "propagate" then says to recompile).
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

log = logging.getLogger(__name__)


def propagation_graph(segment: ir.Graph, first: int, last: int, hidden: str) -> ir.Graph | None:
    """A copy of ``segment`` (layers ``first..last-1``, input hidden state named ``hidden``) whose layers all read
    ``hidden``, with the presents as its only outputs; None when a layer output is not found by name."""
    from eecompile.models.lm import layer_output_name

    g = ir.serde.deserialize_graph(ir.serde.serialize_graph(segment))
    values = {v.name: v for node in g for v in node.outputs if v.name}
    h = next((v for v in g.inputs if v.name == hidden), None)
    if h is None:
        return None
    for i in range(first, last - 1):  # the inputs of layers first+1 .. last-1
        v = values.get(layer_output_name(i))
        if v is None:
            log.info("segment layers %d..%d: no tensor %s; no state propagation graph", first, last - 1,
                     layer_output_name(i))
            return None
        v.replace_all_uses_with(h)
    presents = [o for o in g.outputs if (o.name or "").startswith("present.")]
    g.outputs.clear()
    g.outputs.extend(presents)
    RemoveUnusedNodesPass()(ir.Model(g, ir_version=10))
    for v in list(g.inputs):
        if not v.uses() and not (v.name or "").startswith("past_key_values."):
            g.inputs.remove(v)
    g.name = f"{segment.name}_propagate"
    return g
