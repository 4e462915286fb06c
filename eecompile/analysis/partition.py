"""Where a graph can be cut, and what each cut carries: the dependency analysis behind analyze and compile.

Cutting at tensor T means: segment 1 holds T's ancestors, the rest follows. Every tensor produced before the
cut and read after it is *carried* across. Like torch.fx's ``split_module`` a :class:`SegmentPlan` tracks the
nodes of a segment, the tensors it takes in and the tensors it hands on.

Worked example (a residual block, exit at ``r1``)::

    x -> Conv(a) -> Relu(r1) -> Conv(b) -> Add(r1, b) -> out

    cut at r1: segment 0 = {Conv a, Relu}; segment 1 = {Conv b, Add}; carried = {r1}
    cut at b:  segment 0 = {Conv a, Relu, Conv b}; carried = {r1, b}  (the skip connection rides along)

Cases this module handles (each has a test in tests/analysis/test_partition.py):
1. Cheap tensors computed from the model inputs alone (attention masks, position ids, shape arithmetic,
   ConstantOfShape weights of old-IR models) are *recomputable*: never carried, recomputed inside each
   segment that reads them. Without this a BERT has almost no clean cut (the mask is read by every layer).
2. Nodes with subgraphs (If/Loop/Scan) read outer-scope tensors implicitly; those count as inputs, and
   tensors inside a subgraph are never cut points.
3. Graph inputs read after the cut are reported as carried (the runtime keeps them alive).
4. Quantized (QDQ) graphs: a DequantizeLinear output read after the cut is carried as the 8-bit tensor it
   dequantizes, and the segment after the cut holds its own copy of the DequantizeLinear.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import onnx_ir as ir

# Ops whose cost is real compute: counted in FLOPs, and never recomputed in a later segment.
HEAVY_OPS = frozenset({
    "Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "MatMul", "MatMulInteger", "QLinearMatMul",
    "Gemm", "Einsum", "Attention", "MultiHeadAttention", "GroupQueryAttention", "LSTM", "GRU", "RNN",
    "FusedConv", "FusedGemm", "FusedMatMul",
})
# Ops whose value must not be recomputed (random) or whose cost is unknown (control flow).
_NEVER_RECOMPUTE = frozenset({"If", "Loop", "Scan", "RandomNormal", "RandomUniform", "RandomNormalLike",
                              "RandomUniformLike", "Multinomial", "Bernoulli"})


def _subgraphs(node: ir.Node) -> Iterable[ir.Graph]:
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            yield attr.as_graph()
        elif attr.type == ir.AttributeType.GRAPHS:
            yield from attr.as_graphs()


@dataclass
class GraphIndex:
    """The main graph's nodes in topological order with dependency facts."""

    model: ir.Model
    nodes: list[ir.Node]
    pos: dict[ir.Node, int]
    deps: list[list[ir.Value]]  # per node: inputs incl. outer-scope reads of its subgraphs
    consumers: dict[ir.Value, set[int]]  # value -> indices of main-graph nodes that read it
    anc: list[int]  # per node: bitset of ancestor nodes (itself included)
    recomputable: list[bool]  # per node: cheap and computed from inputs/constants alone
    graph_inputs: list[ir.Value]
    graph_outputs: list[ir.Value]
    values: dict[str, ir.Value]  # main-graph values by name (node outputs and inputs)
    subgraph_values: dict[str, ir.Node] = field(default_factory=dict)  # name -> owning If/Loop node
    input_anc: list[frozenset[ir.Value]] = field(default_factory=list)  # per node: graph inputs it depends on

    def producer_index(self, v: ir.Value) -> int | None:
        """The position in ``nodes`` of the node producing ``v`` (None for inputs and initializers)."""
        p = v.producer()
        return self.pos.get(p) if p is not None else None

    def is_recomputable_value(self, v: ir.Value) -> bool:
        """Graph inputs, initializers and outputs of recomputable nodes."""
        i = self.producer_index(v)
        return i is None or self.recomputable[i]

    def ancestors_of(self, values: Iterable[ir.Value]) -> int:
        """The bitset of nodes ``values`` depend on (their producers included)."""
        bits = 0
        for v in values:
            i = self.producer_index(v)
            if i is not None:
                bits |= self.anc[i]
        return bits


def index_graph(model: ir.Model) -> GraphIndex:
    """Index ``model``'s main graph (kept in its topological order): dependencies including outer-scope reads
    of If/Loop/Scan bodies (case 2), consumers, ancestor bitsets and which nodes are recomputable (case 1)."""
    graph = model.graph
    nodes = list(graph)
    pos = {n: i for i, n in enumerate(nodes)}
    deps: list[list[ir.Value]] = []
    consumers: dict[ir.Value, set[int]] = {}
    subgraph_values: dict[str, ir.Node] = {}
    for i, n in enumerate(nodes):
        d = [v for v in n.inputs if v is not None]
        for sg in _subgraphs(n):
            for inner in ir.traversal.RecursiveGraphIterator(sg):
                for v in inner.inputs:
                    if v is not None and v.graph is graph:
                        d.append(v)
                for out in inner.outputs:
                    if out.name:
                        subgraph_values[out.name] = n
        deps.append(d)
        for v in d:
            consumers.setdefault(v, set()).add(i)
    anc: list[int] = []
    recomputable: list[bool] = []
    for i, n in enumerate(nodes):
        bits = 1 << i
        light = n.op_type not in HEAVY_OPS and n.op_type not in _NEVER_RECOMPUTE and n.domain in ("", "ai.onnx")
        light = light and not any(True for _ in _subgraphs(n))
        for v in deps[i]:
            p = v.producer()
            if p is not None and p in pos:
                j = pos[p]
                bits |= anc[j]
                light = light and recomputable[j]
        anc.append(bits)
        recomputable.append(light)
    input_set = set(graph.inputs)
    input_anc: list[frozenset[ir.Value]] = []
    for i in range(len(nodes)):
        acc: set[ir.Value] = set()
        for v in deps[i]:
            if v in input_set:
                acc.add(v)
            p = v.producer()
            if p is not None and p in pos:
                acc |= input_anc[pos[p]]
        input_anc.append(frozenset(acc))
    values: dict[str, ir.Value] = {}
    for v in graph.inputs:
        if v.name:
            values[v.name] = v
    for n in nodes:
        for v in n.outputs:
            if v.name:
                values[v.name] = v
    return GraphIndex(model, nodes, pos, deps, consumers, anc, recomputable, list(graph.inputs),
                      list(graph.outputs), values, subgraph_values, input_anc)


def carried_across(idx: GraphIndex, before: int, after: int) -> tuple[list[ir.Value], list[ir.Value]]:
    """Tensors produced in node set ``before`` and read by node set ``after`` (bitsets).

    Returns (carried activations, graph inputs read after the cut). Recomputable tensors are left out:
    the segment that reads them recomputes them."""
    carried: list[ir.Value] = []
    seen: set[ir.Value] = set()
    for i, n in enumerate(idx.nodes):
        if not (before >> i) & 1 or idx.recomputable[i]:
            continue
        for v in n.outputs:
            users = idx.consumers.get(v, ())
            if any((after >> j) & 1 for j in users):
                v = _quantized_source(idx, v, before) or v
                if v not in seen:
                    carried.append(v)
                    seen.add(v)
    # Graph inputs read after the cut, directly or through recomputed (input-only) tensors.
    needed: set[ir.Value] = set()
    for j in range(len(idx.nodes)):
        if (after >> j) & 1 and not idx.recomputable[j]:
            for v in idx.deps[j]:
                p = idx.producer_index(v)
                if p is None:
                    needed.add(v)
                else:
                    needed |= idx.input_anc[p] if idx.recomputable[p] else set()
    inputs = [v for v in idx.graph_inputs if v in needed]
    return carried, inputs


_DEQUANTIZE_DOMAINS = ("", "ai.onnx", "com.microsoft")


def _quantized_source(idx: GraphIndex, v: ir.Value, before: int) -> ir.Value | None:
    """For ``v = DequantizeLinear(q, scale, zero_point)`` with constant scale and zero point and ``q`` computed
    before the cut: ``q`` (the 8-bit tensor), which is carried instead; the segment after the cut dequantizes
    it again, so QuantizeLinear/DequantizeLinear groups stay whole on each side (ONNX Runtime fuses them the
    same way as in the whole graph) and a quarter of the bytes crosses the boundary."""
    node = v.producer()
    if node is None or node.op_type != "DequantizeLinear" or node.domain not in _DEQUANTIZE_DOMAINS:
        return None
    q = node.inputs[0] if node.inputs else None
    p = idx.producer_index(q) if q is not None else None
    if q is None or p is None or not (before >> p) & 1 or idx.recomputable[p]:
        return None  # weights (dequantized from an initializer) are recomputed anyway
    if any(s is not None and not idx.is_recomputable_value(s) for s in node.inputs[1:]):
        return None
    return q


@dataclass
class SegmentPlan:
    """One segment of a partition: the nodes it runs, what it reads and what it hands on.

    Like torch.fx ``split_module``'s ``Partition``, a plan knows its inputs (``model_inputs`` it reads and
    ``carried_in`` tensors earlier segments computed), its outputs (``targets`` it must compute and the
    ``carried_out`` tensors later segments read) and its dependencies (``depends_on``: the earlier segments
    whose tensors it reads). ``nodes`` is a bitset over :attr:`GraphIndex.nodes`; recomputable nodes are in
    no plan (each segment that reads them recomputes them, case 1 above).

    Worked example, a residual block cut at ``r1``:

    >>> import onnx_ir as ir
    >>> model = ir.from_onnx_text('''
    ...     <ir_version: 8, opset_import: ["" : 17]>
    ...     block (float[N, 2] x) => (float[N, 2] out)
    ...     <float[2, 2] w1 = {1.0, 0.0, 0.0, 1.0}, float[2, 2] w2 = {0.0, 1.0, 1.0, 0.0}>
    ...     { a = MatMul(x, w1)
    ...       r1 = Relu(a)
    ...       b = MatMul(r1, w2)
    ...       out = Add(r1, b) }''')
    >>> idx = index_graph(model)
    >>> first, rest = plan_segments(idx, [[idx.values["r1"]], [idx.values["out"]]])
    >>> [n.op_type for n in first.node_list(idx)], [v.name for v in first.model_inputs]
    (['MatMul', 'Relu'], ['x'])
    >>> [v.name for v in first.carried_out]
    ['r1']
    >>> [n.op_type for n in rest.node_list(idx)], [v.name for v in rest.carried_in], rest.depends_on
    (['MatMul', 'Add'], ['r1'], [0])
    >>> rest.model_inputs
    []

    ``r1`` is carried once although ``rest`` reads it twice (the MatMul and the skip connection's Add).
    """

    index: int
    nodes: int
    targets: list[ir.Value]  # what this segment must produce (cut tensors, in-model head outputs, final)
    carried_in: list[ir.Value] = field(default_factory=list)
    carried_out: list[ir.Value] = field(default_factory=list)
    model_inputs: list[ir.Value] = field(default_factory=list)  # graph inputs it reads (maybe via recomputation)
    depends_on: list[int] = field(default_factory=list)  # earlier segments whose tensors it reads

    def node_count(self) -> int:
        """How many nodes the segment runs (recomputed ones not counted)."""
        return bin(self.nodes).count("1")

    def node_list(self, idx: GraphIndex) -> list[ir.Node]:
        """The segment's nodes in topological order."""
        return [n for i, n in enumerate(idx.nodes) if (self.nodes >> i) & 1]


def plan_segments(idx: GraphIndex, targets: Sequence[Sequence[ir.Value]]) -> list[SegmentPlan]:
    """Partition the graph: assign every needed node to the first segment whose targets need it, and find what
    crosses each boundary (see :class:`SegmentPlan` for a worked example).

    ``targets[k]`` are the values segment k must produce; the last entry holds the final output(s).
    Returns one plan per entry of ``targets``; a plan can be empty (``node_count() == 0``), which the caller
    refuses (:func:`eecompile.analysis.exits.check_segments`)."""
    heavy_mask = sum(1 << i for i, r in enumerate(idx.recomputable) if not r)
    plans: list[SegmentPlan] = []
    done = 0
    for k, tgt in enumerate(targets):
        need = idx.ancestors_of(tgt) & heavy_mask
        plans.append(SegmentPlan(index=k, nodes=need & ~done, targets=list(tgt)))
        done |= need
    for k, plan in enumerate(plans):
        later = 0
        for p in plans[k + 1:]:
            later |= p.nodes
        plan.carried_out, _ = carried_across(idx, plan.nodes, later)
        earlier = 0
        for p in plans[:k]:
            earlier |= p.nodes
        plan.carried_in, plan.model_inputs = carried_across(idx, earlier, plan.nodes)
        owners = {i: p.index for p in plans[:k] for i in range(len(idx.nodes)) if (p.nodes >> i) & 1}
        plan.depends_on = sorted({owners[i] for v in plan.carried_in
                                  if (i := idx.producer_index(v)) is not None and i in owners})
    return plans
