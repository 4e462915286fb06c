"""Bring a segment and its exit head to one opset: always the newer of the two (raise, never lower).

A head exported today (opset 17-18: ``LayerNormalization``, ``Flatten`` at 13, Reduce ops with ``axes`` as an
input) often has no equivalent at a model-zoo graph's opset 7-9, and ``onnx.version_converter`` has no
down-conversion adapter for many ops ("No Adapter From Version 13 for Flatten"); up-conversion is what the
converter supports well. So:

1. head opset > model opset: the segment that holds the head (only that one) is up-converted to the head's
   opset; the other segments keep the model's opset. The compile's verify step then checks the whole chain
   against the unsplit model, so a conversion that changed a result is caught before anything is written.
2. head opset < model opset: the head is up-converted to the model's opset.
3. the segment's IR version is at least what its opset needs (opset 21 needs IR 10).

Conversion failures are one SpecError naming the head, both opsets and the converter's reason.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from eecompile.errors import SpecError
from eecompile.passes.extract_segments import ExtractedSegment

# The main-domain opset this module can reason about; newer heads are taken as written.
_DOMAINS = ("", "ai.onnx")


def main_opset(model: ir.Model | onnx.ModelProto) -> int | None:
    """The model's ai.onnx opset (None when it imports none)."""
    if isinstance(model, onnx.ModelProto):
        return next((int(o.version) for o in model.opset_import if o.domain in _DOMAINS), None)
    for d in _DOMAINS:
        if d in model.opset_imports:
            return int(model.opset_imports[d])
    return None


def ir_version_for(opset: int, at_least: int = 8) -> int:
    """The smallest IR version that may hold ``opset`` (and not below ``at_least``)."""
    return max(at_least, onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)]))


def _reason(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[-1].split("failed: ")[-1] if text else type(e).__name__


def convert_model(model: ir.Model, opset: int, what: str, hint: str) -> ir.Model:
    """``model`` up-converted to ``opset`` with ``onnx.version_converter``; SpecError naming ``what`` on failure."""
    src = main_opset(model)
    if src is None or src == opset:
        return model
    proto = ir.to_proto(model)
    proto.ir_version = ir_version_for(src, proto.ir_version)
    try:
        converted = onnx.version_converter.convert_version(proto, opset)
    except Exception as e:  # the converter raises RuntimeError/ValidationError with its adapter's text
        raise SpecError(f"{what}: converting it from opset {src} to {opset} failed ({_reason(e)}); {hint}") from e
    converted.ir_version = ir_version_for(opset, converted.ir_version)
    return ir.from_proto(converted)


def raise_graph(graph: ir.Graph, opset: int, what: str, hint: str) -> ir.Graph:
    """A segment graph up-converted to ``opset`` (a new graph; ``graph`` is left as it was)."""
    src = int(graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", opset)))
    if src >= opset:
        return graph
    model = ir.Model(graph, ir_version=ir_version_for(src))
    return convert_model(model, opset, what, hint).graph


def raise_segment(seg: ExtractedSegment, opset: int, what: str, hint: str) -> None:
    """Up-convert an extracted segment in place (its graph and its name -> value map)."""
    graph = raise_graph(seg.graph, opset, what, hint)
    if graph is seg.graph:
        return
    seg.graph = graph
    seg.values = {v.name: v for node in graph for v in node.outputs if v.name}
    seg.values.update({v.name: v for v in graph.inputs if v.name})
    seg.values.update({v.name: v for v in graph.initializers.values() if v.name})
