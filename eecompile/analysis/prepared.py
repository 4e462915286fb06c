"""The facts the splitter works from: a model's graph index, its probe and its per-node FLOPs.

:func:`probe_prepared` is the *probe* stage of the pipeline: it runs on the model after the rewrites that make
the batch dynamic (:mod:`eecompile.passes.batch_dynamic`) and changes nothing in it. Everything later
(validating the spec, planning segments, extraction, the manifest) reads a :class:`PreparedModel`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from eecompile.analysis.flops import node_flops
from eecompile.analysis.partition import GraphIndex, index_graph
from eecompile.analysis.probe import PROBE_BATCHES, ProbeResult, probe_model
from eecompile.errors import GraphError
from eecompile.passes.shape_reads import share_shape_reads

Dims = list[int | str | None]
"""A shape as plain Python: ints for fixed axes, the symbol's name for symbolic ones, None for unknown."""


def batch_index(shape: Dims) -> int:
    """The batch axis of a boundary shape: where ``"batch"`` is (the probe put it on the measured axis),
    else 0 (per-sample mode, where every shape starts with the batch of 1)."""
    return shape.index("batch") if "batch" in shape else 0


def dims(shape: ir.Shape | None) -> Dims:
    """An onnx-ir shape as plain ints and strings (symbolic dims by name); ``[]`` for None."""
    if shape is None:
        return []
    return [d if isinstance(d, int) else (None if d.value is None else str(d.value)) for d in shape]


@dataclass
class PreparedModel:
    """A loaded model with the batch made dynamic (where safe), indexed and probed.

    Attributes:
        path: the source ``.onnx`` file.
        model: the (rewritten) model; its weights may still be memory-mapped from ``path``'s data file.
        index: dependency facts of the main graph (:class:`~eecompile.analysis.partition.GraphIndex`).
        probe: batch axes, dtypes and concrete shapes read off ONNX Runtime runs.
        batch_mode: ``"dynamic"`` (segments take any batch) or ``"per_sample"`` (batch fixed at 1).
        batch_note: one line for the manifest saying how the batch mode came about.
        node_flops: FLOPs per sample of each node of ``index.nodes`` (a multiply-add counts 2).
        cum_flops: FLOPs per sample of each node's ancestors, itself included.
        total_flops: FLOPs per sample of the whole graph.
        input_axes: each model input's batch axis as :class:`~eecompile.passes.batch_dynamic.BatchDynamicPass`
            measured it (None: fed as given); empty: guessed from the shapes.
    """

    path: Path
    model: ir.Model
    index: GraphIndex
    probe: ProbeResult
    batch_mode: str
    batch_note: str
    node_flops: list[int]
    cum_flops: list[int]
    total_flops: int
    input_axes: dict[str, int | None] = field(default_factory=dict)

    def boundary_shape(self, name: str | None) -> tuple[ir.DataType, ir.Shape, int | None]:
        """Element type, shape and batch axis of the probed tensor ``name``, as a segment boundary declares
        it: the batch axis is the symbol ``batch`` in dynamic mode, axes that follow a symbolic input dim
        (sequence length) keep that symbol, every other axis has its probed size.

        Raises:
            GraphError: ``name`` was not probed (ONNX Runtime did not expose it).
        """
        facts = self.probe.facts.get(name or "")
        if facts is None:
            raise GraphError(f"tensor '{name}' could not be probed (ONNX Runtime did not expose it)")
        shape: list[int | str] = list(facts.shapes[self.probe.batches[0]])
        for i, sym in facts.symbolic.items():
            shape[i] = sym
        axis = facts.batch_axis
        if self.batch_mode == "dynamic" and axis is not None:
            shape[axis] = "batch"
        return ir.DataType.from_numpy(np.dtype(facts.dtype)), ir.Shape(shape), axis

    def shape_of(self, name: str | None) -> Dims:
        """:meth:`boundary_shape`'s shape as plain :data:`Dims`."""
        return dims(self.boundary_shape(name)[1])

    def flops_of(self, bits: int) -> int:
        """FLOPs per sample of the node set ``bits`` (a bitset over ``index.nodes``)."""
        return _sum_bits(bits, self.node_flops)


def _sum_bits(bits: int, values: list[int]) -> int:
    total, i = 0, 0
    while bits:
        if bits & 1:
            total += values[i]
        bits >>= 1
        i += 1
    return total


def probe_prepared(path: str | Path, model: ir.Model, batch_mode: str, batch_note: str,
                   dims: Mapping[str, int] | None = None,
                   input_axes: Mapping[str, int | None] | None = None) -> PreparedModel:
    """Index ``model``, probe every tensor in ONNX Runtime and count FLOPs per node.

    In ``dynamic`` mode the probe runs at batch 2 and 3 (:data:`~eecompile.analysis.probe.PROBE_BATCHES`) and
    a node's FLOPs per sample are the difference between the two runs (so batch-independent work, such as a
    weight transpose, counts zero); in ``per_sample`` mode it runs once at batch 1. ``input_axes``: each
    input's batch axis (default: guessed from the declared shapes), where the probe puts the batch size.

    Raises:
        GraphError: ONNX Runtime cannot load or run the model.
    """
    idx = index_graph(model)
    names = [v.name for n in idx.nodes for v in n.outputs if v.name]
    batches = PROBE_BATCHES if batch_mode == "dynamic" else (1,)
    probe = probe_model(model, names, batches, dims, input_axes)
    if share_shape_reads(model, probe):  # Shape(h)[0] of a feature map -> Shape(input)[0]: nothing carried for it
        idx = index_graph(model)

    def shape_at(b: int):  # noqa: ANN202 - small closure
        def shape_of(v: ir.Value | None) -> tuple[int, ...] | None:
            if v is None:
                return None
            s = probe.shape(v.name, b) if v.name in probe.facts else None
            if s is not None:
                return s
            if v.const_value is not None:
                return tuple(int(d) for d in v.const_value.shape.numpy())
            if v.shape is not None and all(isinstance(d, int) for d in v.shape):
                return tuple(int(d) for d in v.shape)  # type: ignore[arg-type]
            return None
        return shape_of

    inner = {b: inner_shapes(model, probe, b) for b in batches}

    def with_inner(b: int):  # noqa: ANN202 - small closure: body values of Loop/Scan/If nodes too
        outer = shape_at(b)

        def shape_of(v: ir.Value | None) -> tuple[int, ...] | None:
            if v is not None and v.graph is not None and v.graph is not model.graph and v.name in inner[b]:
                return inner[b][v.name]
            return outer(v)
        return shape_of

    if len(batches) == 2:
        lo, hi = with_inner(batches[0]), with_inner(batches[1])
        per_node = [max(node_flops(n, hi) - node_flops(n, lo), 0) // (batches[1] - batches[0]) for n in idx.nodes]
    else:
        one = with_inner(1)
        per_node = [node_flops(n, one) for n in idx.nodes]
    cum = [_sum_bits(idx.anc[i], per_node) for i in range(len(idx.nodes))]
    return PreparedModel(Path(path), model, idx, probe, batch_mode, batch_note, per_node, cum, sum(per_node),
                         dict(input_axes or {}))


def inner_shapes(model: ir.Model, probe: ProbeResult, batch: int) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of the values inside Loop/Scan/If bodies at ``batch`` (ONNX Runtime cannot expose them):
    ONNX shape inference on the model with every main-graph tensor given the shape the probe measured.
    Empty when the model has no such node or inference fails (their FLOPs then count what is known)."""
    import onnx

    if not any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for n in model.graph for a in n.attributes.values()):
        return {}
    proto = ir.to_proto(model)
    g = proto.graph
    del g.value_info[:]
    known = {v.name for v in g.output}
    for name, f in probe.facts.items():
        if batch not in f.shapes:
            continue
        shape = list(f.shapes[batch])
        try:
            elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(f.dtype))
        except (KeyError, TypeError):
            continue
        if name in known:
            continue
        g.value_info.append(onnx.helper.make_tensor_value_info(name, elem, shape))
    for v in g.input:
        fv = probe.facts.get(v.name)
        if fv is not None and batch in fv.shapes:
            v.type.tensor_type.shape.Clear()
            for d in fv.shapes[batch]:
                v.type.tensor_type.shape.dim.add().dim_value = d
    def set_shape(vi: onnx.ValueInfoProto, shape: tuple[int, ...] | None) -> None:
        if shape is None or not vi.type.HasField("tensor_type"):
            return
        vi.type.tensor_type.shape.Clear()
        for d in shape:
            vi.type.tensor_type.shape.dim.add().dim_value = d

    def outer(name: str) -> tuple[int, ...] | None:
        f = probe.facts.get(name)
        return f.shapes.get(batch) if f is not None else None

    # Body inputs declared with symbolic dims take the measured shapes of what the node feeds them, so
    # inference gives the body concrete shapes: Loop state (after iteration number and condition), Scan
    # state and scan-input slices.
    for node in g.node:
        body = next((a.g for a in node.attribute if a.name == "body" and a.type == onnx.AttributeProto.GRAPH), None)
        if body is None:
            continue
        if node.op_type == "Loop":
            for vi, name in zip(body.input[2:], node.input[2:], strict=False):
                set_shape(vi, outer(name))
        elif node.op_type == "Scan":
            n_scan = next((a.i for a in node.attribute if a.name == "num_scan_inputs"), 0)
            axes = next((list(a.ints) for a in node.attribute if a.name == "scan_input_axes"), [0] * n_scan)
            n_state = len(node.input) - n_scan
            for vi, name in zip(body.input[:n_state], node.input[:n_state], strict=False):
                set_shape(vi, outer(name))
            for vi, name, axis in zip(body.input[n_state:], node.input[n_state:], axes, strict=False):
                full = outer(name)
                if full is not None:
                    set_shape(vi, full[:axis % len(full)] + full[axis % len(full) + 1:])
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001 - an optional refinement: FLOPs of bodies then count what is known
        return {}
    out: dict[str, tuple[int, ...]] = {}

    def visit(graph: onnx.GraphProto, top: bool) -> None:
        if not top:
            for vi in [*graph.input, *graph.output, *graph.value_info]:
                dims_ = vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") else []
                if dims_ and all(d.HasField("dim_value") for d in dims_):
                    out[vi.name] = tuple(int(d.dim_value) for d in dims_)
                elif vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape") and not dims_:
                    out[vi.name] = ()
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g, False)
                for sub in attr.graphs:
                    visit(sub, False)

    visit(inferred.graph, True)
    return out
