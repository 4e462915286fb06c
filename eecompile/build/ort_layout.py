"""ONNX Runtime CPU engines: ORT's own optimised segment graphs, with blocked (NCHWc) tensors carried across cuts.

ONNX Runtime's CPU provider runs Conv (and pooling) in a blocked layout, NCHWc: channels are split into blocks
of ``b`` (16 with AVX-512, 8 with AVX2), stored ``[N, C/b, H, W, b]``. Inside one session ORT converts the input
once (``ReorderInput``) and the output once (``ReorderOutput``, domain ``com.microsoft.nchwc``). A chain of
segments pays that pair at every cut: segment k ends in ``ReorderOutput`` (blocked -> NCHW) and segment k+1
starts with ``ReorderInput`` (NCHW -> blocked), both memory-bound copies of the whole activation.

This pass edits the saved optimised graphs (``SessionOptions.optimized_model_filepath``) so that such a tensor
crosses the cut in blocked layout:

* producer (segment k): the tensor ``t`` is made by a ``ReorderOutput`` of a blocked tensor ``tb``. ``tb``
  becomes the segment output, renamed ``{t}.nchwc{b}``; the ``ReorderOutput`` stays only when something inside
  segment k still reads ``t`` in plain layout (e.g. an exit head ORT did not block).
* consumers (every later segment reading ``t``): the graph input becomes the blocked tensor and each leading
  ``ReorderInput(t)`` is dropped (its readers read the blocked input). Readers that need plain layout get one
  ``ReorderOutput`` inside that segment (no worse than before: the conversion moved, the ReorderInput went).

A boundary is rewritten only when both sides agree: a float, rank-4 NCHW tensor with batch axis 0 and a known
channel count equal to the ``ReorderOutput``'s ``channels``, ``channels_last=0`` on both sides, the blocked
channel count (``C`` rounded up to ``b``) consistent with any recorded shape, no reference from inside a
subgraph, and at least one consumer segment that reorders it. Anything else keeps its plain boundary.

The blocked tensor ORT hands over is 4-D ``[N, C_pad, H, W]`` (ORT keeps NCHWc tensors rank 4; the memory is
``[N, C_pad/b, H, W, b]``), so the batch stays on axis 0 and the chain's compaction gather works unchanged.

Imports onnx: build time only. The runtime reads the records this module's caller writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnx import helper as oh

from eecompile.bundle import SegmentInfo, TensorInfo

NCHWC_DOMAIN = "com.microsoft.nchwc"


@dataclass
class Carried:
    """A carried tensor whose engine graphs exchange it in blocked layout."""

    tensor: str  # portable (manifest) name
    engine_name: str  # name in the engine graphs
    producer: int  # segment index
    consumers: list[int]
    channels: int  # C (plain)
    padded_channels: int  # C rounded up to the block size
    block: int
    shape: list[int | str | None]  # engine shape [N, C_pad, H, W]
    dtype: str = "float32"
    batch_axis: int = 0
    kept_reorder_output: bool = False  # the producer still converts for a plain reader inside it
    dropped_reorder_inputs: dict[int, int] = field(default_factory=dict)  # consumer -> ReorderInputs removed
    added_reorder_output: list[int] = field(default_factory=list)  # consumers that convert for plain readers

    def io_entry(self) -> dict[str, Any]:
        """What the runtime needs to bind this tensor (an engine record's ``inputs``/``outputs`` entry)."""
        return {"name": self.engine_name, "dtype": self.dtype, "shape": list(self.shape),
                "batch_axis": self.batch_axis, "layout": f"nchwc{self.block}", "block": self.block,
                "channels": self.channels}

    def summary(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "as": self.engine_name, "from": self.producer, "to": list(self.consumers),
                "channels": self.channels, "block": self.block, "kept_reorder_output": self.kept_reorder_output,
                "dropped_reorder_inputs": {int(k): int(v) for k, v in self.dropped_reorder_inputs.items()},
                "added_reorder_output": list(self.added_reorder_output)}


@dataclass
class Skipped:
    tensor: str
    reason: str


# ----------------------------------------------------------------------------------------- ORT's graph


def optimise_with_ort(src: Path, dst: Path, disabled_optimizers: Sequence[str] = ()) -> None:
    """Save ONNX Runtime's CPU-optimised graph of ``src`` (ORT_ENABLE_ALL, this machine) to ``dst``."""
    import onnxruntime as ort

    from eecompile.runtimes.sessions import session_options

    # Log level 3 (the default): ORT warns that the saved graph is hardware specific: that is the point.
    so = session_options(1, optimization="all", disabled_optimizers=tuple(disabled_optimizers or ()))
    so.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------------------- helpers


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return oh.get_attribute_value(a)
    return default


def _is(node: onnx.NodeProto, op: str) -> bool:
    return node.op_type == op and node.domain == NCHWC_DOMAIN


def _subgraph_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name mentioned inside a subgraph (If/Loop/Scan bodies) of ``graph``'s nodes."""
    names: set[str] = set()

    def walk(g: onnx.GraphProto) -> None:
        for n in g.node:
            names.update(n.input)
            names.update(n.output)
            for a in n.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    walk(sub)

    for n in graph.node:
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                walk(sub)
    return names


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in [*graph.input, *graph.output, *graph.value_info]}
    names.update(t.name for t in graph.initializer)
    for n in graph.node:
        names.update(n.input)
        names.update(n.output)
    return names | _subgraph_names(graph)


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename a tensor of the main graph (node inputs/outputs, value_info, graph outputs)."""
    for n in graph.node:
        for i, x in enumerate(n.input):
            if x == old:
                n.input[i] = new
        for i, x in enumerate(n.output):
            if x == old:
                n.output[i] = new
    for v in [*graph.value_info, *graph.output]:
        if v.name == old:
            v.name = new


def _dims(vi: onnx.ValueInfoProto) -> list[int | str | None]:
    out: list[int | str | None] = []
    for d in vi.type.tensor_type.shape.dim:
        out.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return out


def _value_info(name: str, elem_type: int, dims: Iterable[int | str | None]) -> onnx.ValueInfoProto:
    return oh.make_tensor_value_info(name, elem_type, [d if d is not None else None for d in dims])


def _find(seq: Iterable[onnx.ValueInfoProto], name: str) -> onnx.ValueInfoProto | None:
    return next((v for v in seq if v.name == name), None)


# ----------------------------------------------------------------------------------------- the rewrite


@dataclass
class _Plan:
    tensor: str
    info: TensorInfo
    producer: int
    consumers: list[int]
    channels: int
    padded: int
    engine_name: str
    reorder_out: onnx.NodeProto
    blocked: str  # the producer's blocked tensor


def carry_blocked(graphs: Mapping[int, onnx.ModelProto], segments: Sequence[SegmentInfo], model_inputs: Iterable[str],
                  block: int) -> tuple[list[Carried], list[Skipped]]:
    """Edit ORT-optimised segment graphs (in place) so that carried tensors cross cuts in blocked layout.

    ``graphs``: segment index -> ORT's optimised model of that segment; ``segments``: the manifest's segments
    (carried tensors, shapes, batch axes); ``block``: this machine's NCHWc block size. Returns what was
    rewritten and what was left alone (with the reason).
    """
    carried: list[Carried] = []
    skipped: list[Skipped] = []
    if block <= 1:
        return carried, skipped
    inputs = set(model_inputs)
    for seg in segments:
        gate = seg.exit.gate
        special = set(seg.exit.outputs.values()) | ({gate.output, *(gate.state_outputs or [])} if gate else set())
        if gate is not None and gate.score_output:
            special.add(gate.score_output)
        outs = {t.name: t for t in seg.outputs}
        for name in seg.carried_out:
            if name in inputs:
                continue
            info = outs.get(name)
            if info is None:
                skipped.append(Skipped(name, f"segment {seg.index} lists it as carried but not as an output"))
                continue
            if name in special:
                skipped.append(Skipped(name, "also an exit or gate output (must stay plain)"))
                continue
            consumers = [s.index for s in segments if s.index > seg.index and any(t.name == name for t in s.inputs)]
            plan_or_reason = _plan(graphs, seg.index, info, consumers, block)
            if isinstance(plan_or_reason, str):
                skipped.append(Skipped(name, plan_or_reason))
                continue
            carried.append(_apply(graphs, plan_or_reason, block))
    return carried, skipped


def _plan(graphs: Mapping[int, onnx.ModelProto], k: int, info: TensorInfo, consumers: list[int],
          block: int) -> _Plan | str:
    name = info.name
    if not consumers:
        return "no later segment reads it"
    if info.dtype != "float32":
        return f"dtype {info.dtype} (NCHWc is float32 only)"
    if len(info.shape) != 4:
        return f"rank {len(info.shape)} (NCHWc is rank 4)"
    if info.batch_axis != 0:
        return f"batch axis {info.batch_axis} (must be 0)"
    channels = info.shape[1]
    if not isinstance(channels, int) or channels <= 0:
        return f"channel count {channels!r} is not fixed"
    if k not in graphs or any(j not in graphs for j in consumers):
        return "a segment involved has no optimised graph"
    g = graphs[k].graph
    if name not in {o.name for o in g.output}:
        return f"segment {k}'s optimised graph does not output it"
    if name in _subgraph_names(g):
        return f"segment {k} reads it inside a subgraph"
    producers = [n for n in g.node if name in n.output]
    if len(producers) != 1 or not _is(producers[0], "ReorderOutput"):
        what = producers[0].op_type if producers else "a graph input or initializer"
        return f"segment {k} produces it with {what}, not a ReorderOutput (ORT kept it in plain layout)"
    ro = producers[0]
    if int(_attr(ro, "channels_last", 0)) != 0:
        return f"segment {k}'s ReorderOutput writes channels-last"
    if int(_attr(ro, "channels", -1)) != channels:
        return f"segment {k}'s ReorderOutput has channels={_attr(ro, 'channels')}, the tensor has {channels}"
    blocked = ro.input[0]
    if blocked in {i.name for i in g.input} or blocked in {t.name for t in g.initializer}:
        return f"segment {k}'s blocked tensor is a graph input or initializer"
    if blocked in {o.name for o in g.output} or blocked in _subgraph_names(g):
        return f"segment {k}'s blocked tensor is already an output or read inside a subgraph"
    padded = -(-channels // block) * block
    vi = _find(g.value_info, blocked)
    if vi is not None and len(_dims(vi)) == 4 and isinstance(_dims(vi)[1], int) and _dims(vi)[1] != padded:
        return f"segment {k}'s blocked tensor has {_dims(vi)[1]} channels, block {block} gives {padded}"
    reorders = 0
    for j in consumers:
        h = graphs[j].graph
        if name not in {i.name for i in h.input}:
            return f"segment {j}'s optimised graph does not take it as an input"
        if name in _subgraph_names(h):
            return f"segment {j} reads it inside a subgraph"
        for n in h.node:
            if name in n.input and _is(n, "ReorderInput"):
                if int(_attr(n, "channels_last", 0)) != 0:
                    return f"segment {j}'s ReorderInput reads channels-last"
                if n.output[0] in {o.name for o in h.output}:
                    return f"segment {j} outputs the reordered tensor"
                reorders += 1
        if name in {o.name for o in h.output}:
            return f"segment {j} passes it through as an output"
    if reorders == 0:
        return "no consumer segment converts it to NCHWc (nothing to save)"
    engine_name = f"{name}.nchwc{block}"
    for j in [k, *consumers]:
        if engine_name in _all_names(graphs[j].graph):
            return f"the name '{engine_name}' is taken in segment {j}"
    return _Plan(name, info, k, consumers, channels, padded, engine_name, ro, blocked)


def _apply(graphs: Mapping[int, onnx.ModelProto], p: _Plan, block: int) -> Carried:
    name, new = p.tensor, p.engine_name
    elem = onnx.TensorProto.FLOAT
    # Producer: the blocked tensor becomes the output.
    g = graphs[p.producer].graph
    out_vi = _find(g.output, name)
    assert out_vi is not None
    dims = _dims(out_vi)
    batch_dim = dims[0] if dims else p.info.shape[0]
    spatial = dims[2:] if len(dims) == 4 else p.info.shape[2:]
    shape: list[int | str | None] = [batch_dim, p.padded, *spatial]
    _rename(g, p.blocked, new)
    idx = [o.name for o in g.output].index(name)
    g.output[idx].CopyFrom(_value_info(new, elem, shape))
    keep_ro = any(name in n.input for n in g.node)
    if not keep_ro:
        g.node.remove(p.reorder_out)
    res = Carried(tensor=name, engine_name=new, producer=p.producer, consumers=list(p.consumers),
                  channels=p.channels, padded_channels=p.padded, block=block, shape=shape,
                  batch_axis=0, kept_reorder_output=keep_ro)
    # Consumers: the blocked tensor is the input, leading ReorderInputs go.
    for j in p.consumers:
        h = graphs[j].graph
        dropped = 0
        for n in [n for n in h.node if name in n.input and _is(n, "ReorderInput")]:
            _rename(h, n.output[0], new)
            h.node.remove(n)
            dropped += 1
        in_vi = _find(h.input, name)
        assert in_vi is not None
        in_dims = _dims(in_vi)
        in_shape = [in_dims[0] if in_dims else batch_dim, p.padded, *(in_dims[2:] if len(in_dims) == 4 else spatial)]
        idx = [i.name for i in h.input].index(name)
        h.input[idx].CopyFrom(_value_info(new, elem, in_shape))
        for vi in [v for v in h.value_info if v.name == name]:
            h.value_info.remove(vi)
        if any(name in n.input for n in h.node):
            # Plain readers remain: convert once, here, at the start of the segment.
            ro = oh.make_node("ReorderOutput", [new], [name], name=f"{name}.plain", domain=NCHWC_DOMAIN,
                              channels=p.channels, channels_last=0)
            h.node.insert(0, ro)
            res.added_reorder_output.append(j)
        res.dropped_reorder_inputs[j] = dropped
    return res


def count_reorders(model: onnx.ModelProto) -> dict[str, int]:
    """ReorderInput / ReorderOutput nodes of a graph (for reports and tests)."""
    g = model.graph
    return {"ReorderInput": sum(_is(n, "ReorderInput") for n in g.node),
            "ReorderOutput": sum(_is(n, "ReorderOutput") for n in g.node)}
