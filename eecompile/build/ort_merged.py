"""ONNX Runtime CPU engines cut from ONE optimised graph of the whole chain.

Optimising each segment on its own loses what ORT's CPU optimisers do across a cut. The costly case is the
residual join of a ResNet: ORT runs Conv in the blocked NCHWc layout and folds ``Sum(+Relu)`` into the Conv
(``com.microsoft.nchwc`` Conv with a ``Sum`` operand) only when every operand comes from a blocked op; a segment
input is a plain graph input, so the Sum it feeds, and with it each later join of that stage, stays an unfused
``Sum`` + ``Relu`` with a ReorderInput/ReorderOutput pair around it. Measured on the zoo ResNet-50 with exits at
``r35 r67 r99 r139``: the unsplit model has 16 fused Conv+Sum+Relu, the per-segment engines 11 (plus 5 plain
Sum, 5 Relu, 8 ReorderInput).

Here the segments are put back together into one graph (the manifest's tensor names join them; every exit, gate
and carried tensor stays a graph output), ORT optimises it once (``SessionOptions.optimized_model_filepath``), and
the optimised graph is cut again at the same tensors:

* a carried tensor that ORT holds blocked (it is made by a ``ReorderOutput`` of a blocked tensor) crosses the
  cut blocked, named ``{tensor}.nchwc{block}``; a later segment that still reads it plain converts it itself;
* every other carried tensor (and every exit, gate and model output) crosses plain, as in the portable bundle;
* each segment is the backward slice of its outputs that stops at its own inputs: it can only compute from
  what the runtime hands it. A slice that would reach past its cut (ORT merged work across segments) or would
  recompute heavy work of another segment is refused, and the caller falls back to per-segment engines.

Imports onnx: build time only. The records written from these engines have the same format as
:mod:`eecompile.build.ort_layout`'s, so the runtime binds them the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper as oh

from eecompile.build.ort_layout import NCHWC_DOMAIN, Carried, Skipped, count_reorders
from eecompile.build.ort_layout import _rename as rename
from eecompile.bundle import SegmentInfo

log = logging.getLogger(__name__)

# Ops a segment must never recompute for another one (their cost is the model's cost).
HEAVY_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm",
                       "MatMulInteger", "QLinearConv", "QLinearMatMul", "Attention", "MultiHeadAttention",
                       "LSTM", "GRU", "RNN", "Einsum"})
# Past this much weight in all segments together the merged graph would not fit one protobuf.
MERGED_MAX_BYTES = 1_800_000_000


@dataclass
class MergedEngines:
    """Per-segment engine graphs cut from one optimised graph of the chain."""

    graphs: dict[int, onnx.ModelProto]
    carried: list[Carried]
    skipped: list[Skipped]
    duplicated: dict[int, list[str]] = field(default_factory=dict)  # segment -> op types it recomputes (cheap)
    fused: dict[str, int] = field(default_factory=dict)  # transformer fusions applied (op type -> count)
    no_exit: onnx.ModelProto | None = None  # ORT's optimised graph of the chain without heads and gates
    no_exit_outputs: dict[str, str] = field(default_factory=dict)  # model output name -> tensor in no_exit


class MergeRefused(Exception):
    """The chain cannot be optimised as one graph (the reason is the message); use per-segment engines."""


# ----------------------------------------------------------------------------------------- merge


def _subgraph_refs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read from the enclosing scope (over-approximated: every
    name a body mentions that it does not define)."""
    refs: set[str] = set()

    def walk(g: onnx.GraphProto) -> None:
        defined = {i.name for i in g.input} | {t.name for t in g.initializer}
        for n in g.node:
            defined.update(n.output)
        for n in g.node:
            refs.update(x for x in n.input if x and x not in defined)
            for a in n.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    walk(sub)

    for a in node.attribute:
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            walk(sub)
    return refs


def _has_subgraphs(model: onnx.ModelProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for n in model.graph.node for a in n.attribute)


def merge_chain(models: Mapping[int, onnx.ModelProto], segments: Sequence[SegmentInfo],
                model_inputs: Sequence[str]) -> onnx.ModelProto:
    """One graph computing every segment's outputs from the model inputs and the thresholds.

    Segments were cut from one graph, so their tensor names join them. A name two segments both compute inside
    (not a manifest tensor), and an initializer name two segments use with different values, are renamed in the
    later segment. Raises :class:`MergeRefused` when the segments cannot be joined (different opsets, or a
    rename would have to reach into a subgraph)."""
    opsets = {tuple(sorted((o.domain, o.version) for o in m.opset_import if o.domain in ("", "ai.onnx")))
              for m in models.values()}
    if len(opsets) > 1:
        raise MergeRefused(f"the segments use different ONNX opsets ({sorted(opsets)})")
    manifest_names = set(model_inputs)
    for seg in segments:
        manifest_names.update(t.name for t in seg.inputs)
        manifest_names.update(t.name for t in seg.outputs)
        if seg.exit.gate is not None:
            manifest_names.add(seg.exit.gate.threshold_input)
    g = onnx.GraphProto(name="eecompile_chain")
    produced: set[str] = set()
    inits: dict[str, bytes] = {}
    node_names: set[str] = set()
    infos: dict[str, onnx.ValueInfoProto] = {}
    inputs: dict[str, onnx.ValueInfoProto] = {}
    outputs: dict[str, onnx.ValueInfoProto] = {}
    domains: dict[str, int] = {}
    for seg in segments:
        m = models[seg.index]
        sg = m.graph
        renames: dict[str, str] = {}
        for t in sg.initializer:
            blob = t.SerializeToString()
            if t.name in inits and inits[t.name] != blob:
                renames[t.name] = f"{t.name}.s{seg.index}"
        own = {o for n in sg.node for o in n.output if o}
        for name in own:
            if name not in manifest_names and (name in produced or name in inits):
                renames[name] = f"{name}.s{seg.index}"
        if renames and _has_subgraphs(m):
            raise MergeRefused(f"segment {seg.index} shares tensor names with an earlier segment and has subgraphs")
        for t in sg.initializer:
            blob = t.SerializeToString()
            name = renames.get(t.name, t.name)
            if name not in inits:
                t2 = g.initializer.add()
                t2.CopyFrom(t)
                t2.name = name
                inits[name] = blob
        for n in sg.node:
            n2 = g.node.add()
            n2.CopyFrom(n)
            for i, x in enumerate(n2.input):
                n2.input[i] = renames.get(x, x)
            for i, x in enumerate(n2.output):
                n2.output[i] = renames.get(x, x)
            if n2.name:
                base, j = n2.name, 1
                while n2.name in node_names:
                    n2.name = f"{base}.s{seg.index}" if j == 1 else f"{base}.s{seg.index}.{j}"
                    j += 1
                node_names.add(n2.name)
            produced.update(o for o in n2.output if o)
        for v in sg.value_info:
            name = renames.get(v.name, v.name)
            if name not in infos:
                infos[name] = onnx.ValueInfoProto()
                infos[name].CopyFrom(v)
                infos[name].name = name
        for v in sg.input:
            if v.name not in produced and v.name not in inits and v.name not in inputs:
                inputs[v.name] = v
        for v in sg.output:
            if v.name not in outputs:
                outputs[v.name] = v
        for o in m.opset_import:
            domains[o.domain] = max(domains.get(o.domain, 0), o.version)
    missing = [t for t in inputs if t not in set(model_inputs)
               and not any(seg.exit.gate is not None and seg.exit.gate.threshold_input == t for seg in segments)]
    if missing:
        raise MergeRefused(f"segment inputs {missing} are made by no earlier segment")
    g.input.extend(inputs.values())
    g.output.extend(outputs.values())
    g.value_info.extend(v for k, v in infos.items() if k not in inputs and k not in outputs)
    merged = oh.make_model(g, opset_imports=[oh.make_opsetid(d, v) for d, v in sorted(domains.items())])
    merged.ir_version = max(m.ir_version for m in models.values())
    return merged


def no_exit_graph(merged: onnx.ModelProto, outputs: Sequence[str]) -> onnx.ModelProto:
    """The joined chain reduced to what ``outputs`` (the final exit's tensors) need: heads, gates and every exit
    before the last are dropped, with the inputs (thresholds) and initializers nothing left reads. ORT optimises
    this graph as it would the unsplit model (no tensor has to stay visible at a cut)."""
    g = merged.graph
    producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    need: set[str] = set(outputs)
    keep: set[int] = set()
    stack = list(outputs)
    while stack:
        i = producer.get(stack.pop())
        if i is None or i in keep:
            continue
        keep.add(i)
        n = g.node[i]
        for x in [*n.input, *_subgraph_refs(n)]:
            if x and x not in need:
                need.add(x)
                stack.append(x)
    out_info = {v.name: v for v in g.output}
    missing = [o for o in outputs if o not in out_info]
    if missing:
        raise MergeRefused(f"the joined chain does not output {missing}")
    ng = onnx.GraphProto(name="eecompile_no_exit")
    ng.node.extend(n for i, n in enumerate(g.node) if i in keep)
    ng.initializer.extend(t for t in g.initializer if t.name in need)
    ng.input.extend(v for v in g.input if v.name in need)
    ng.output.extend(out_info[o] for o in outputs)
    ng.value_info.extend(v for v in g.value_info if v.name in need)
    m = oh.make_model(ng, opset_imports=list(merged.opset_import))
    m.ir_version = merged.ir_version
    return m


# ----------------------------------------------------------------------------------------- cut


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return oh.get_attribute_value(a)
    return default


def _dims(vi: onnx.ValueInfoProto) -> list[int | str | None]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in vi.type.tensor_type.shape.dim]


def _special(seg: SegmentInfo) -> set[str]:
    gate = seg.exit.gate
    out = set(seg.exit.outputs.values())
    if gate is not None:
        out |= {gate.output, *(gate.state_outputs or [])}
        if gate.score_output:
            out.add(gate.score_output)
    return out


def cut_chain(optimised: onnx.ModelProto, segments: Sequence[SegmentInfo], model_inputs: Sequence[str],
              portable: Mapping[int, onnx.ModelProto], block: int) -> MergedEngines:
    """Cut ORT's optimised graph of the whole chain back into one graph per segment (see the module docstring).

    ``portable``: the bundle's segment graphs (their I/O value infos are reused); ``block``: the NCHWc block size
    of this CPU (1: nothing is carried blocked). Raises :class:`MergeRefused` when a segment cannot be sliced."""
    g = optimised.graph
    producer: dict[str, int] = {}
    for i, n in enumerate(g.node):
        for o in n.output:
            if o:
                producer[o] = i
    inits = {t.name: t for t in g.initializer}
    all_names = set(producer) | set(inits) | {v.name for v in g.input}
    refs = {i: _subgraph_refs(n) for i, n in enumerate(g.node)}
    inputs = set(model_inputs)

    # How each carried tensor crosses its cut.
    rep: dict[str, str] = {}  # manifest name -> name in the engine graphs
    carried: list[Carried] = []
    skipped: list[Skipped] = []
    readers: dict[str, list[int]] = {}
    for seg in segments:
        for t in seg.inputs:
            readers.setdefault(t.name, []).append(seg.index)
    for seg in segments:
        special = _special(seg)
        outs = {t.name: t for t in seg.outputs}
        for name in seg.carried_out:
            info = outs.get(name)
            consumers = [j for j in readers.get(name, []) if j > seg.index]
            if name in inputs or info is None or not consumers:
                continue
            why = None
            p = producer.get(name)
            node = g.node[p] if p is not None else None
            if block <= 1:
                why = "this CPU's ONNX Runtime does not use NCHWc"
            elif name in special:
                why = "also an exit or gate output (must stay plain)"
            elif info.dtype != "float32" or len(info.shape) != 4 or info.batch_axis != 0:
                why = "not a float32 rank-4 tensor with its batch on axis 0"
            elif not isinstance(info.shape[1], int):
                why = f"channel count {info.shape[1]!r} is not fixed"
            elif node is None or node.op_type != "ReorderOutput" or node.domain != NCHWC_DOMAIN:
                why = f"ORT makes it with {node.op_type if node is not None else 'nothing'} (kept in plain layout)"
            elif int(_attr(node, "channels_last", 0)) != 0 or int(_attr(node, "channels", -1)) != info.shape[1]:
                why = "ORT's ReorderOutput does not match the tensor (channels or channels_last)"
            if why is not None:
                skipped.append(Skipped(name, why))
                rep[name] = name
                continue
            assert node is not None
            engine_name = f"{name}.nchwc{block}"
            if engine_name in all_names:
                skipped.append(Skipped(name, f"the name '{engine_name}' is taken"))
                rep[name] = name
                continue
            blocked = node.input[0]
            rename(g, blocked, engine_name)  # one blocked tensor, one name, throughout the optimised graph
            producer[engine_name] = producer.pop(blocked)
            all_names.add(engine_name)
            channels = info.shape[1]
            assert isinstance(channels, int)
            padded = -(-channels // block) * block
            shape: list[int | str | None] = [info.shape[0], padded, *info.shape[2:]]
            rep[name] = engine_name
            carried.append(Carried(tensor=name, engine_name=engine_name, producer=seg.index, consumers=consumers,
                                   channels=channels, padded_channels=padded, block=block, shape=shape))

    by_name = {c.tensor: c for c in carried}
    graphs: dict[int, onnx.ModelProto] = {}
    owner: dict[int, int] = {}  # node -> the first segment that computes it
    duplicated: dict[int, list[str]] = {}
    for seg in segments:
        k = seg.index
        thr = [seg.exit.gate.threshold_input] if seg.exit.gate is not None else []
        feed = [rep.get(t.name, t.name) for t in seg.inputs] + thr
        available = set(feed)
        want = [rep.get(t.name, t.name) if t.name in seg.carried_out else t.name for t in seg.outputs]
        nodes: set[int] = set()
        used_inits: set[str] = set()
        stack = list(want)
        seen: set[str] = set()
        while stack:
            x = stack.pop()
            if not x or x in seen:
                continue
            seen.add(x)
            if x in available:
                continue
            if x in inits:
                used_inits.add(x)
                continue
            p = producer.get(x)
            if p is None:
                raise MergeRefused(f"segment {k} needs '{x}', which is computed before its cut "
                                   f"(ORT joined work across segments)")
            if p not in nodes:
                nodes.add(p)
                stack.extend(g.node[p].input)
                stack.extend(refs[p])
        for p in sorted(nodes):
            if p in owner:
                op = g.node[p].op_type
                if op in HEAVY_OPS:
                    raise MergeRefused(f"segment {k} would recompute {op} '{g.node[p].name}' of segment {owner[p]}")
                duplicated.setdefault(k, []).append(op)
            else:
                owner[p] = k
        graphs[k] = _segment_model(optimised, sorted(nodes), used_inits, seg, portable[k], feed, want, by_name,
                                   rep)
    for c in carried:
        c.dropped_reorder_inputs = {j: 0 for j in c.consumers}
        c.added_reorder_output = [j for j in c.consumers
                                  if any(n.op_type == "ReorderOutput" and n.input[0] == c.engine_name
                                         for n in graphs[j].graph.node)]
        c.kept_reorder_output = any(n.op_type == "ReorderOutput" and n.input[0] == c.engine_name
                                    for n in graphs[c.producer].graph.node)
    return MergedEngines(graphs, carried, skipped, duplicated)


def _segment_model(optimised: onnx.ModelProto, nodes: list[int], used_inits: set[str], seg: SegmentInfo,
                   portable: onnx.ModelProto, feed: list[str], want: list[str], carried: Mapping[str, Carried],
                   rep: Mapping[str, str]) -> onnx.ModelProto:
    g = optimised.graph
    pg = portable.graph
    p_in = {v.name: v for v in pg.input}
    p_out = {v.name: v for v in pg.output}
    back = {v: k for k, v in rep.items()}
    vinfo = {v.name: v for v in g.value_info}

    def io(name: str, table: Mapping[str, onnx.ValueInfoProto]) -> onnx.ValueInfoProto:
        plain = back.get(name, name)
        if plain in carried and carried[plain].engine_name == name:
            c = carried[plain]
            src = table.get(plain)
            dims = _dims(src) if src is not None else list(c.shape)
            return oh.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [dims[0] if dims else None,
                                                                            c.padded_channels, *dims[2:]])
        v = onnx.ValueInfoProto()
        v.CopyFrom(table[name] if name in table else vinfo[name])
        return v

    sg = onnx.GraphProto(name=f"{pg.name or 'segment'}.ort")
    sg.node.extend(g.node[i] for i in nodes)
    sg.initializer.extend(t for t in g.initializer if t.name in used_inits)
    sg.input.extend(io(x, p_in) for x in feed)
    sg.output.extend(io(x, p_out) for x in want)
    names = {x for i in nodes for x in [*g.node[i].input, *g.node[i].output]}
    sg.value_info.extend(v for v in g.value_info if v.name in names and v.name not in set(feed) | set(want))
    m = oh.make_model(sg, opset_imports=list(optimised.opset_import))
    m.ir_version = optimised.ir_version
    return m


# ----------------------------------------------------------------------------------------- the whole step


def build_merged(portable: Mapping[int, onnx.ModelProto], segments: Sequence[SegmentInfo],
                 model_inputs: Sequence[str], block: int, disabled_optimizers: Sequence[str],
                 scratch: Path) -> MergedEngines:
    """Merge, optimise once with ORT (ORT_ENABLE_ALL on this machine), cut. Raises :class:`MergeRefused`."""
    from eecompile.build.ort_layout import optimise_with_ort

    size = sum(m.ByteSize() for m in portable.values())
    if size > MERGED_MAX_BYTES:
        raise MergeRefused(f"the segments hold {size / 2**30:.1f} GB, more than one ONNX file of the chain holds")
    merged = merge_chain(portable, segments, model_inputs)
    merged, fused = transformer_fusions(merged, disabled_optimizers)
    src, dst = scratch / "chain.onnx", scratch / "chain.opt.onnx"
    onnx.save(merged, str(src))
    try:
        optimise_with_ort(src, dst, disabled_optimizers)
    except Exception as e:  # ORT's own exception types
        raise MergeRefused(f"ONNX Runtime cannot optimise the joined chain ({str(e).strip().splitlines()[0]})") from e
    optimised = onnx.load(str(dst))
    engines = cut_chain(optimised, segments, model_inputs, portable, block)
    engines.fused = fused
    # The no-exit engine: what runs when no gate can fire (the runner picks it by itself). Optional: without
    # it the segments run.
    final = dict(segments[-1].exit.outputs)
    try:
        ne_src, ne_dst = scratch / "no_exit.onnx", scratch / "no_exit.opt.onnx"
        onnx.save(no_exit_graph(merged, list(final.values())), str(ne_src))
        optimise_with_ort(ne_src, ne_dst, disabled_optimizers)
        engines.no_exit = onnx.load(str(ne_dst))
        engines.no_exit_outputs = final
    except Exception as e:  # noqa: BLE001 - MergeRefused or ORT's own exception types: the engines stand alone
        log.info("no no-exit engine (%s)", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    return engines


# The fusions of ONNX Runtime's transformer optimiser that only it makes (ORT's own CPU optimisers already fuse
# BiasGelu and, unless disabled, SkipLayerNormalization): with none of them, its graph is not used.
TRANSFORMER_FUSIONS = ("Attention", "MultiHeadAttention", "GemmFastGelu")


def attention_sizes(model: onnx.ModelProto) -> tuple[int, int]:
    """(heads, hidden size) of an encoder graph, or (0, 0) when not found (the optimiser then guesses itself).

    Hidden size: the length of the first LayerNormalization's scale. Heads: the split of the hidden size in the
    attention's reshape ``[batch, seq, heads, head_dim]`` (heads may be -1), read from the constants its target
    shape is built of (an exported graph builds it with Concat from the dynamic batch and sequence)."""
    from onnx import numpy_helper as nh

    g = model.graph
    consts: dict[str, np.ndarray] = {t.name: nh.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR:
            consts[n.output[0]] = nh.to_array(n.attribute[0].t)
    producer = {o: n for n in g.node for o in n.output}
    hidden = 0
    for n in g.node:
        if n.op_type == "LayerNormalization" and len(n.input) > 1 and n.input[1] in consts:
            hidden = int(consts[n.input[1]].size)
            break
    if not hidden:
        return 0, 0

    def scalar(name: str) -> int | None:
        p = producer.get(name)
        if p is not None and p.op_type == "Unsqueeze":
            name = p.input[0]
        v = consts.get(name)
        return int(v.reshape(-1)[0]) if v is not None and v.size == 1 else None

    for n in g.node:
        if n.op_type != "Reshape" or len(n.input) < 2:
            continue
        shape = consts.get(n.input[1])
        if shape is not None and shape.size == 4:
            values: list[int | None] = [int(v) for v in shape]
        elif n.input[1] in producer and producer[n.input[1]].op_type == "Concat":
            values = [scalar(x) for x in producer[n.input[1]].input]
        else:
            continue
        if len(values) != 4 or not values[3] or values[3] <= 0 or hidden % values[3]:
            continue
        if values[2] in (-1, hidden // values[3]):  # [batch, seq, heads or -1, head_dim]
            return hidden // values[3], hidden
    return 0, hidden


def transformer_fusions(model: onnx.ModelProto, disabled_optimizers: Sequence[str] = ()) -> tuple[onnx.ModelProto,
                                                                                                 dict[str, int]]:
    """ONNX Runtime's transformer optimiser (``onnxruntime.transformers.optimizer``, model type ``bert``) on an
    encoder chain: multi-head attention into one ``Attention`` kernel, Gelu with its bias, LayerNorm with its
    residual Add (unless ``SkipLayerNormFusion`` is in ``disabled_optimizers``). Returns the rewritten graph and
    what it fused, or ``model`` unchanged and ``{}`` when no attention (nor another fusion of its own) was found.

    The embedding fusion (EmbedLayerNormalization) stays off: its mask output would be read by every later
    segment, across the cuts. What this changes is checked against the portable chain like every engine."""
    if not any(n.op_type == "Softmax" for n in model.graph.node) or not any(
            n.op_type in ("MatMul", "Gemm") for n in model.graph.node):
        return model, {}
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    opts = FusionOptions("bert")
    opts.enable_embed_layer_norm = False
    if "SkipLayerNormFusion" in disabled_optimizers:
        opts.enable_skip_layer_norm = False
        opts.enable_bias_skip_layer_norm = False
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it logs every fusion it tries at WARNING/INFO
    heads, hidden = attention_sizes(model)
    try:
        opt = optimizer.optimize_model(copy, model_type="bert", num_heads=heads, hidden_size=hidden,
                                       optimization_options=opts, opt_level=0, use_gpu=False)
    except Exception as e:  # noqa: BLE001 - an optimiser failure only means: no fusion here
        log.info("ONNX Runtime's transformer optimiser did not apply (%s)", e)
        return model, {}
    finally:
        quiet.setLevel(level)
    stats = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
    if not any(stats.get(k) for k in TRANSFORMER_FUSIONS):
        return model, {}
    # Every tensor the chain hands on must survive under its name (the optimiser keeps graph outputs).
    outs = {o.name for o in opt.model.graph.output}
    if not {o.name for o in model.graph.output} <= outs:
        return model, {}
    return opt.model, stats


def reorders(model: onnx.ModelProto) -> dict[str, int]:
    """ReorderInput / ReorderOutput count of an engine graph."""
    return count_reorders(model)


def check_no_exit(blob: bytes, portable_files: Mapping[int, Path], segments: Sequence[SegmentInfo],
                  feeds: Mapping[str, np.ndarray], outputs: Mapping[str, str], load_level: str,
                  rtol: float = 1e-4) -> float:
    """Run the no-exit engine and the portable chain (every segment) on ``feeds`` and compare the final outputs
    (``outputs``: model output name -> tensor). Returns the largest difference relative to each output's scale;
    raises :class:`MergeRefused` when it passes ``rtol``."""
    import onnxruntime as ort

    from eecompile.runtimes.sessions import session_options

    so = session_options(1, optimization="ORT_ENABLE_ALL")
    env: dict[str, Any] = dict(feeds)
    for seg in segments:
        s = ort.InferenceSession(str(portable_files[seg.index]), sess_options=so, providers=["CPUExecutionProvider"])
        run_feeds = {t.name: env[t.name] for t in seg.inputs}
        if seg.exit.gate is not None:
            run_feeds[seg.exit.gate.threshold_input] = np.array(0.5, np.float32)
        out_names = [o.name for o in s.get_outputs()]
        env.update(zip(out_names, s.run(out_names, run_feeds), strict=True))
    ne = ort.InferenceSession(blob, sess_options=session_options(1, optimization=load_level),
                              providers=["CPUExecutionProvider"])
    want = {i.name for i in ne.get_inputs()}
    got = dict(zip(list(outputs.values()), ne.run(list(outputs.values()), {k: v for k, v in feeds.items()
                                                                            if k in want}), strict=True))
    return max([_difference(name, env[t], got[t], "the no-exit engine", rtol) for name, t in outputs.items()],
               default=0.0)


def _difference(name: str, ref: Any, got: Any, what: str, rtol: float) -> float:
    """``got``'s largest difference from ``ref`` relative to ``ref``'s scale (0 for empty or bool tensors); raises
    :class:`MergeRefused` naming ``what`` when the shapes differ or the difference passes ``rtol``."""
    a, b = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if a.shape != b.shape:
        raise MergeRefused(f"'{name}': {what} gives shape {list(b.shape)}, the portable chain {list(a.shape)}")
    if a.size == 0 or np.asarray(ref).dtype == bool:
        return 0.0
    # Non-finite values (a gate score of 0/0, say) must be the same ones in both; the rest is compared to scale.
    finite = np.isfinite(a)
    if not (np.array_equal(finite, np.isfinite(b)) and np.array_equal(a[~finite], b[~finite], equal_nan=True)):
        raise MergeRefused(f"'{name}': {what} gives NaN or Inf where the portable chain does not (or other ones)")
    if not finite.any():
        return 0.0
    scale = max(1.0, float(np.max(np.abs(a[finite]))))
    diff = float(np.max(np.abs(a[finite] - b[finite]))) / scale
    if not diff <= rtol:
        raise MergeRefused(f"'{name}': {what} differs from the portable chain by {diff:.2e} of its scale "
                           f"(allowed {rtol:g})")
    return diff


def check_same_outputs(engine_blobs: Mapping[int, bytes], portable_files: Mapping[int, Path],
                       segments: Sequence[SegmentInfo], feeds: Mapping[str, np.ndarray],
                       carried: Sequence[Carried], load_level: str, rtol: float = 1e-4) -> float:
    """Run the engine chain and the portable chain on ``feeds`` (every segment on every row, threshold 0.5) and
    compare every exit output, gate score and final output. Returns the largest difference relative to each
    output's scale; raises :class:`MergeRefused` when it passes ``rtol``."""
    import onnxruntime as ort

    from eecompile.runtimes.sessions import session_options

    def sessions(srcs: Mapping[int, Any], level: str) -> dict[int, Any]:
        so = session_options(1, optimization=level)
        return {k: ort.InferenceSession(v if isinstance(v, bytes) else str(v), sess_options=so,
                                        providers=["CPUExecutionProvider"]) for k, v in srcs.items()}

    rename = {c.tensor: c.engine_name for c in carried}
    worst = 0.0
    envs: list[dict[str, np.ndarray]] = []
    for sess, names in ((sessions(portable_files, "ORT_ENABLE_ALL"), {}), (sessions(engine_blobs, load_level),
                                                                           rename)):
        env: dict[str, Any] = dict(feeds)
        for seg in segments:
            s = sess[seg.index]
            want = {i.name for i in s.get_inputs()}
            run_feeds = {names.get(t.name, t.name): env[names.get(t.name, t.name)] for t in seg.inputs}
            if seg.exit.gate is not None:
                run_feeds[seg.exit.gate.threshold_input] = np.array(0.5, np.float32)
            out_names = [o.name for o in s.get_outputs()]
            env.update(zip(out_names, s.run(out_names, {k: v for k, v in run_feeds.items() if k in want}),
                           strict=True))
        envs.append(env)
    ref, got = envs
    compare = []
    for seg in segments:
        compare += list(seg.exit.outputs.values())
        if seg.exit.gate is not None and seg.exit.gate.score_output:
            compare.append(seg.exit.gate.score_output)
    compare += [t.name for t in segments[-1].outputs if t.name not in compare]
    for name in dict.fromkeys(compare):
        if name in ref and name in got:
            worst = max(worst, _difference(name, ref[name], got[name], "the engines", rtol))
    return worst
