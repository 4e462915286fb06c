"""Convert a segment graph to float16 for strongly typed TensorRT (11.x), keeping the gate in float32.

TensorRT 11 removed ``BuilderFlag.FP16``: a network's precision is its ONNX dtypes. ``eecompile build
--fp16`` on TensorRT 11 therefore converts each segment to fp16 first. This module does it with
ONNX Runtime's converter (``onnxruntime.transformers.float16``, a maintained fork of onnxconverter-common's,
shipped with onnxruntime) and then tidies what that converter leaves behind.

Kept in float32 (cases):
  1. every node of a gate subgraph: its name contains ``.gate/`` (the compiler names gate nodes
     ``ee{k}.gate/...``), so the exit decision is computed exactly as in the fp32 graph;
  2. numerically fragile ops anywhere: Softmax, LogSoftmax, LayerNormalization, the Reduce* family,
     Exp, Log, Pow, Sqrt (fp16 overflows in sums of exponentials and squares), plus the converter's own
     block list (TopK, Min, Max, Range, CumSum, ...);
  3. the graph's inputs and outputs (``keep_io_types``): a Cast sits at each edge, so the runtime's
     contract (the dtypes in the manifest) is unchanged and segments still chain with one another.

Fixed after conversion:
  4. round trips ``fp32 -> Cast(fp16) -> Cast(fp32)`` between two fp32 regions (the converter inserts one
     at every blocked-node boundary and after every float graph input). They would round the gate's
     threshold (0.9 -> 0.89990234) and the softmax fed to the gate, flipping exit decisions near the
     threshold; each is replaced by the original fp32 tensor;
  5. nodes are re-sorted topologically (the converter appends its Casts at the end; the TensorRT ONNX
     parser and ``onnx.checker`` need topological order).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import onnx
from onnx import TensorProto

from eecompile.errors import GraphError

log = logging.getLogger(__name__)

GATE_MARKER = ".gate/"

FP32_OP_TYPES: frozenset[str] = frozenset({
    "Softmax", "LogSoftmax", "LayerNormalization",
    "ReduceMax", "ReduceMin", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceProd",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceL1", "ReduceL2",
    "Exp", "Log", "Pow", "Sqrt",
})


def is_gate_node(node: onnx.NodeProto) -> bool:
    """True for nodes of a gate subgraph (named ``ee{k}.gate/...`` by the compiler)."""
    return GATE_MARKER in node.name


def fp32_node_names(model: onnx.ModelProto) -> list[str]:
    """Names of the main-graph nodes that must stay float32 (gate nodes; case 1)."""
    return [n.name for n in model.graph.node if is_gate_node(n)]


def convert_segment_to_fp16(model: onnx.ModelProto,
                            extra_fp32_ops: Iterable[str] = ()) -> onnx.ModelProto:
    """Return a float16 copy of a segment graph with the gate, fragile ops and I/O kept float32."""
    try:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    except ImportError as e:  # pragma: no cover - onnxruntime is a core dependency
        raise GraphError(f"fp16 conversion needs onnxruntime's float16 converter ({e}); "
                         f"reinstall onnxruntime") from e

    source = onnx.ModelProto()
    source.CopyFrom(model)
    op_block = sorted(set(DEFAULT_OP_BLOCK_LIST) | FP32_OP_TYPES | set(extra_fp32_ops))
    try:
        converted = convert_float_to_float16(source, keep_io_types=True, op_block_list=op_block,
                                             node_block_list=fp32_node_names(source))
    except Exception as e:  # the converter raises assorted errors (AssertionError, ValueError, protobuf)
        raise GraphError(f"{model.graph.name or 'segment'}: fp16 conversion failed ({e!r}); "
                         f"build without --fp16 or report the graph") from e

    _fold_round_trip_casts(converted)
    _remove_dead_nodes(converted)
    _topological_sort(converted)
    _check(converted, model.graph.name)
    return converted


def convert_segment_file_to_fp16(src: str | Path, dst: str | Path) -> Path:
    """Convert the segment ONNX file ``src`` and write it to ``dst`` (weights external when > 1.8 GB)."""
    src, dst = Path(src), Path(dst)
    try:
        model = onnx.load(src)
    except Exception as e:
        raise GraphError(f"{src}: cannot load the segment ({e}); recompile the bundle") from e
    fp16 = convert_segment_to_fp16(model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    large = fp16.ByteSize() > 1_800_000_000
    onnx.save(fp16, dst, save_as_external_data=large, location=dst.name + ".data" if large else None)
    return dst


# --------------------------------------------------------------------------------------------- helpers

def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every main-graph value we can name (after type inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.input, *g.output, *g.value_info]}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def _cast_to(node: onnx.NodeProto) -> int | None:
    if node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
        return None
    for a in node.attribute:
        if a.name == "to":
            return int(a.i)
    return None


def _fold_round_trip_casts(model: onnx.ModelProto) -> None:
    """Case 4: ``x(fp32) -> Cast(fp16) -> Cast(fp32) -> z`` becomes ``x`` (or ``Identity(x)`` for an output)."""
    g = model.graph
    types = _elem_types(model)
    producer = {out: n for n in g.node for out in n.output}
    graph_outputs = {o.name for o in g.output}
    rename: dict[str, str] = {}
    for node in g.node:
        if _cast_to(node) != TensorProto.FLOAT:
            continue
        first = producer.get(node.input[0])
        if first is None or _cast_to(first) != TensorProto.FLOAT16:
            continue
        src = first.input[0]
        if types.get(src) != TensorProto.FLOAT:
            continue
        z = node.output[0]
        if z in graph_outputs:
            # An output keeps its name: an Identity costs nothing (TensorRT and ORT both drop it).
            node.op_type = "Identity"
            del node.attribute[:]
            node.input[0] = src
        else:
            rename[z] = src
    if not rename:
        return
    for node in g.node:
        for i, name in enumerate(node.input):
            while name in rename:
                name = rename[name]
            node.input[i] = name
    log.debug("fp16: folded %d fp32->fp16->fp32 cast pairs", len(rename))


def _remove_dead_nodes(model: onnx.ModelProto) -> None:
    g = model.graph
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        keep = [n for n in g.node if any(o in used for o in n.output if o)]
        if len(keep) == len(g.node):
            return
        del g.node[:]
        g.node.extend(keep)


def _topological_sort(model: onnx.ModelProto) -> None:
    """Case 5: Kahn's algorithm, stable (keeps the original order among ready nodes)."""
    g = model.graph
    available = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    nodes = list(g.node)
    ordered: list[onnx.NodeProto] = []
    pending = nodes
    while pending:
        rest = []
        progressed = False
        for n in pending:
            # Inputs of subgraphs (If/Loop bodies) may come from the outer scope; only direct inputs order.
            if all(i in available for i in n.input):
                ordered.append(n)
                available.update(n.output)
                progressed = True
            else:
                rest.append(n)
        if not progressed:
            missing = sorted({i for n in rest for i in n.input if i not in available})
            raise GraphError(f"{g.name or 'segment'}: after fp16 conversion, node '{rest[0].name}' reads "
                             f"{missing[:3]} which nothing produces; build without --fp16 and report the graph")
        pending = rest
    del g.node[:]
    g.node.extend(ordered)


def _check(model: onnx.ModelProto, name: str) -> None:
    try:
        onnx.checker.check_model(model)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:
        raise GraphError(f"{name or 'segment'}: the fp16 graph does not type-check ({e}); "
                         f"build without --fp16 and report the graph") from e

