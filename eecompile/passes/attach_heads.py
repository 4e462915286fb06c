"""Attach an exit head to a segment graph.

Cases:
1. A head ONNX file (one input: the cut tensor; one output: logits, or two with ``score_output``): its nodes
   and initializers are moved into the segment under the prefix ``ee{k}.head/`` (head files often have empty
   or clashing node names, and ONNX Runtime refuses two nodes with one name). A head written for an older
   opset is up-converted to the model's; for a newer one the segment is raised to the head's (passes/opset.py).
2. A head already in the model (``{output: name}``): the segment already computes it; it is only renamed.
3. Exit outputs mean what the final output means: when the model ends in a Softmax, LogSoftmax or Sigmoid,
   the exit output is that activation of the head's logits, and the gate reads the logits. An in-model head
   that already ends in the same activation is taken as it is; one ending in another activation is refused.
4. Exit outputs take the final output's per-sample shape: a head giving ``[B, C]`` for a final output
   ``[B, C, 1, 1]`` is reshaped; a class count that does not fit is an error naming both shapes.
5. A trained head (``{kind: linear|mlp|conv|token|local|global, ...}``): built by :func:`eecompile.heads.head_onnx` with its
   last layer zero (it never fires until ``eecompile train-heads`` fits it), then spliced as in case 1.
6. Heads read their inputs batch-first. An ``at`` tensor whose measured batch axis is not 0 (an LSTM's
   time-major ``[T, B, D]`` output) is given to the head (and to the gate) through a Transpose moving the batch
   axis to 0, ``ee{k}.head_in.{i}`` (:class:`BatchFirstPass`); trained heads are built for, and trained on,
   that view. An in-model head (case 2) keeps the model's own semantics.
7. Several final outputs (``final.outputs``: a detector's scores, boxes and classes): a head file gives each
   further one by an output named after it, reshaped to that output's per-sample shape and taken as it is (no
   activation is added: it must mean what the model's output means); outputs declared ``final.end_only`` have
   no value at early exits.

:class:`AttachHeadPass` does this to one segment; :func:`head_for` makes the head model of cases 1 and 5.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_ir as ir

from eecompile.analysis.prepared import Dims, PreparedModel, batch_index
from eecompile.errors import SpecError
from eecompile.names import exit_logits, exit_output, exit_prefix, head_input, head_prefix

if TYPE_CHECKING:
    from eecompile.analysis.exits import ExitPlan


@dataclass(frozen=True)
class HeadView:
    """How exit ``k``'s head sees one ``at`` tensor: ``source`` (the tensor), its measured batch ``axis`` (0
    in per-sample mode or where none was measured), ``name`` (``source`` itself when ``axis`` is 0, else the
    batch-first view ``ee{k}.head_in.{i}``) and ``shape``, batch-first."""

    source: str
    axis: int
    name: str
    shape: Dims

    @property
    def perm(self) -> list[int]:
        """The Transpose permutation from ``source`` to the view: the batch axis first, the others in order."""
        return [self.axis, *(i for i in range(len(self.shape)) if i != self.axis)]


def head_views(pm: PreparedModel, k: int, at: Sequence[str]) -> list[HeadView]:
    """One :class:`HeadView` per ``at`` tensor of exit ``k`` (case 6), from the probe's batch axes.

    Raises GraphError for a tensor the probe did not see."""
    views = []
    for i, name in enumerate(at):
        _, _, axis = pm.boundary_shape(name)
        shape = pm.shape_of(name)
        axis = axis if pm.batch_mode == "dynamic" and axis is not None and 0 < axis < len(shape) else 0
        if axis:
            views.append(HeadView(name, axis, head_input(k, i), [shape[axis], *shape[:axis], *shape[axis + 1:]]))
        else:
            views.append(HeadView(name, 0, name, shape))
    return views


class BatchFirstPass(ir.passes.InPlacePass):
    """Add a Transpose ``source -> ee{k}.head_in.{i}`` for each view of ``views`` whose batch axis is not 0
    (case 6). Views of batch axis 0 add nothing. Raises KeyError for a source the segment does not compute."""

    def __init__(self, views: Sequence[HeadView]) -> None:
        super().__init__()
        self.views = list(views)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        g = model.graph
        values = values_by_name(g)
        modified = False
        for v in self.views:
            if not v.axis:
                continue
            src = values[v.source]
            out = ir.Value(name=v.name, type=src.type,
                           shape=ir.Shape(list(v.shape)))
            g.append(ir.node("Transpose", [src], {"perm": v.perm}, outputs=[out], name=f"{v.name}/Transpose"))
            modified = True
        return ir.passes.PassResult(model, modified=modified)


def load_head(path: Path, opset: int, where: str) -> ir.Model:
    """Read a head file; a head written for an older opset than ``opset`` is up-converted to it, a head for a
    newer one is kept as written (the segment holding it is raised to its opset: see passes/opset.py)."""
    from eecompile.passes.opset import convert_model, main_opset

    if not path.is_file():
        raise SpecError(f"{where}: head file '{path}' not found")
    try:
        proto = onnx.load(str(path))
    except Exception as e:
        raise SpecError(f"{where}: '{path}' is not a valid ONNX model ({type(e).__name__})") from e
    head = ir.from_proto(proto)
    head_opset = main_opset(head) or opset
    if head_opset < opset:
        head = convert_model(head, opset, f"{where}: head '{path.name}' (opset {head_opset}, the model {opset})",
                             f"export the head with opset {opset}")
    return head


def splice_head(seg: ir.Graph, k: int, at: Sequence[ir.Value], head: ir.Model, where: str,
                score_output: str | None = None, others: Sequence[str] = (), final_name: str = "",
                ) -> tuple[ir.Value, ir.Value | None, dict[str, ir.Value]]:
    """Move ``head``'s nodes into ``seg``; its inputs read the exit's ``at`` tensors in order (the cut
    tensor first, then e.g. an attention mask). ``others``: further final outputs the head must give, each by an
    output named after it (a detector head's ``boxes`` beside its ``scores``). Returns (logits, score or None,
    {final output name: head output} for ``others``)."""
    hg = head.graph
    if not 1 <= len(hg.inputs) <= len(at):
        raise SpecError(f"{where}: the head has inputs {[v.name for v in hg.inputs]}, the exit's `at` lists "
                        f"{[v.name for v in at]}; a head reads the cut tensor (and, in order, the other `at` "
                        f"tensors): list one `at` tensor per head input")
    outs = list(hg.outputs)
    have = [v.name for v in outs]
    missing = [n for n in others if n not in have]
    if missing:
        raise SpecError(f"{where}: the final outputs {missing} need a value at this exit, and the head file has no "
                        f"output named so (it has {have}); name the head's outputs after the model outputs it "
                        f"gives, or list {missing} in final.end_only (returned only for samples that reach the end)")
    n_out = (2 if score_output else 1) + len(others)
    if len(outs) != n_out:
        extra = f", {', '.join(others)}" if others else ""
        raise SpecError(f"{where}: the head must have {n_out} output(s) (logits{', score' if score_output else ''}"
                        f"{extra}); it has {have}")
    head_inputs = list(hg.inputs)
    _check_head_input(head_inputs[0], at[0], where)
    prefix = head_prefix(k)
    score = next((v for v in outs if v.name == score_output), None) if score_output else None
    if score_output and score is None:
        raise SpecError(f"{where}.score_output: the head has no output '{score_output}' "
                        f"(it has {have})")
    named = {v.name or "": v for v in outs if v.name in others}
    rest = [v for v in outs if v is not score and v.name not in named]
    if len(rest) != 1:
        rest = [v for v in rest if v.name == final_name] or rest
    logits = rest[0]
    # Rename everything first so nothing can clash with the segment's names.
    for i, node in enumerate(hg):
        node.name = prefix + (node.name or f"{node.op_type}_{i}")
        for v in node.outputs:
            v.name = prefix + (v.name or "v")
    for name in list(hg.initializers):
        v = hg.initializers.pop(name)
        v.name = prefix + name
        seg.register_initializer(v)
    hg.outputs.clear()
    for h_in, src in zip(head_inputs, at, strict=False):
        h_in.replace_all_uses_with(src)
    nodes = list(hg)
    hg.remove(nodes, safe=False)
    seg.extend(nodes)
    for out in (logits, score, *named.values()):
        if out is not None and out.dtype is None:
            out.dtype = ir.DataType.FLOAT
    return logits, score, named


def _check_head_input(h_in: ir.Value, at: ir.Value, where: str) -> None:
    if at.dtype is not None and h_in.dtype is not None and at.dtype != h_in.dtype:
        raise SpecError(f"{where}: the head's input '{h_in.name}' is {h_in.dtype}, the cut tensor '{at.name}' is "
                        f"{at.dtype}; export the head with the cut tensor's dtype")
    if at.shape is None or h_in.shape is None:
        return
    hs = [d if isinstance(d, int) else str(d) for d in h_in.shape]
    ts = [d if isinstance(d, int) else str(d) for d in at.shape]
    if len(hs) != len(ts):
        raise SpecError(f"{where}: the head's input '{h_in.name}' has rank {len(hs)} {hs}, the cut tensor "
                        f"'{at.name}' has rank {len(ts)} {ts}; make the head take the cut tensor's shape")
    for i, (a, b) in enumerate(zip(hs, ts, strict=True)):
        if i == 0:
            continue
        if isinstance(a, int) and isinstance(b, int) and a != b:
            raise SpecError(f"{where}: the head's input '{h_in.name}' expects shape {hs}, the cut tensor "
                            f"'{at.name}' has {ts} (axis {i}: {a} vs {b}); make the head take the cut tensor's shape")


def fit_exit_output(seg: ir.Graph, k: int, logits: ir.Value, logits_shape: Sequence[int | str | None],
                    final_shape: Sequence[int | str | None], out_name: str, where: str, tag: str = "",
                    batch_first: bool = False) -> ir.Value:
    """Make the exit output ``out_name`` with the final output's per-sample shape (case 4). The batch axis is
    where ``final_shape`` has ``"batch"`` (a time-major ``[T, batch, C]`` output: axis 1), else 0; the head's
    logits have theirs at the same axis, or at axis 0 when ``batch_first`` (head files and trained heads, which
    read and give batch-first tensors: a Transpose moves it to the final output's axis). ``tag`` tells apart the
    nodes made for several outputs of one exit."""
    b = batch_index(list(final_shape))
    if b and len(logits_shape) != len(final_shape):
        raise SpecError(f"{where}: the head gives shape {list(logits_shape)}, the final output {list(final_shape)} "
                        f"has its batch on axis {b}; the head must give the final output's shape")
    if b and batch_first:  # [B, T, C] from the head -> [T, B, C] like the final output
        perm = [*range(1, b + 1), 0, *range(b + 1, len(logits_shape))]
        moved = ir.Value(name=f"{head_prefix(k)}batch_back{tag}", type=logits.type,
                         shape=ir.Shape([logits_shape[i] for i in perm]))
        seg.append(ir.node("Transpose", [logits], {"perm": perm}, outputs=[moved],
                           name=f"{head_prefix(k)}batch_back{tag}/Transpose"))
        logits, logits_shape = moved, [logits_shape[i] for i in perm]
    per_exit = [d for i, d in enumerate(logits_shape) if i != b]
    per_final = [d for i, d in enumerate(final_shape) if i != b]
    prefix = head_prefix(k)
    known = all(isinstance(d, int) for d in per_exit) and all(isinstance(d, int) for d in per_final)
    if known and int(np.prod(per_exit)) != int(np.prod(per_final)):  # type: ignore[arg-type]
        hint = ("; the final output is per token: use a head that keeps the token axis (head kind 'token')"
                if len(per_final) > len(per_exit) else "")
        raise SpecError(f"{where}: the head gives per-sample shape {per_exit}, the final output has {per_final}; "
                        f"the head must produce the same number of classes as the final output{hint}")
    if not known and len(per_exit) != len(per_final):
        raise SpecError(f"{where}: the head gives per-sample shape {per_exit}, the final output has {per_final}; "
                        f"an exit must produce the final output's per-sample shape"
                        + ("; for per-token outputs use head kind 'token'" if len(per_final) > len(per_exit) else ""))
    out = ir.Value(name=out_name)
    if known and list(per_exit) != list(per_final):
        # An initializer, not a Constant node: Constant holds no int64 before opset 9.
        shape = ir.tensor(np.array([*per_final[:b], -1, *per_final[b:]], dtype=np.int64),
                          name=f"{prefix}fit_shape{tag}")
        target = ir.Value(name=f"{prefix}fit_shape{tag}", shape=ir.Shape([len(per_final) + 1]),
                          type=ir.TensorType(ir.DataType.INT64), const_value=shape)
        seg.register_initializer(target)
        seg.append(ir.node("Reshape", [logits, target], outputs=[out], name=f"{prefix}fit{tag}"))
    else:
        seg.append(ir.node("Identity", [logits], outputs=[out], name=f"{prefix}out{tag}"))
    out.dtype = logits.dtype or ir.DataType.FLOAT
    out.shape = ir.Shape([*per_final[:b], "batch", *per_final[b:]])
    return out


_ACTIVATIONS = ("Softmax", "LogSoftmax", "Sigmoid")


@dataclass(frozen=True)
class FinalActivation:
    """The activation the model applies last to its final output (the exits must apply it too).

    ``axis``: the Softmax/LogSoftmax axis, non-negative (None for Sigmoid); ``flattened``: opset < 13
    semantics, the op normalises over all axes from ``axis`` on (the input coerced to 2-D)."""

    op: str
    axis: int | None = None
    flattened: bool = False

    def describe(self) -> str:
        return self.op if self.axis is None else f"{self.op} over axis {self.axis}{' on' if self.flattened else ''}"

    def per_axis(self, shape: Sequence[int | str | None]) -> bool:
        """Whether the op normalises over ``axis`` alone for a tensor shaped ``shape`` (flattened semantics
        over trailing axes of size 1 amount to the same)."""
        return self.axis is not None and (not self.flattened or all(d == 1 for d in shape[self.axis + 1:]))


def _through_identity(v: ir.Value) -> ir.Node | None:
    node = v.producer()
    while node is not None and node.op_type == "Identity" and node.inputs and node.inputs[0] is not None:
        node = node.inputs[0].producer()
    return node


def final_activation(final: ir.Value, model_opset: int, rank: int) -> FinalActivation | None:
    """The Softmax, LogSoftmax or Sigmoid that produces the final output (through Identity nodes), or None."""
    node = _through_identity(final)
    if node is None or node.op_type not in _ACTIVATIONS or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Sigmoid":
        return FinalActivation("Sigmoid")
    old = model_opset < 13
    axis = node.attributes.get_int("axis", 1 if old else -1) % max(rank, 1)
    return FinalActivation(node.op_type, axis, flattened=old and axis < rank - 1)


def head_activation(head_output: ir.Value) -> str | None:
    """The activation op producing an in-model head's output (through Identity nodes), if it is one."""
    node = _through_identity(head_output)
    return node.op_type if node is not None and node.op_type in _ACTIVATIONS else None


def apply_activation(seg: ir.Graph, k: int, x: ir.Value, act: FinalActivation, shape: Sequence[int | str | None],
                     out_name: str) -> ir.Value:
    """``act`` applied to exit ``k``'s output ``x`` (per-sample shape of the final output), written with ops
    valid at every opset: the opset-13 change of Softmax's meaning is kept by normalising over the flattened
    axes (Flatten, Softmax over axis 1, Reshape back) where the model's opset flattens."""
    prefix = f"{exit_prefix(k)}.act/"
    out = ir.Value(name=out_name)
    if act.op == "Sigmoid":
        seg.append(ir.node("Sigmoid", [x], outputs=[out], name=f"{prefix}Sigmoid"))
    elif not act.per_axis(shape):
        flat, norm, shp = (ir.Value(name=f"{prefix}{n}") for n in ("flat", "norm", "shape"))
        seg.extend([
            ir.node("Flatten", [x], {"axis": act.axis}, outputs=[flat], name=f"{prefix}Flatten"),
            ir.node(act.op, [flat], {"axis": 1}, outputs=[norm], name=f"{prefix}{act.op}"),
            ir.node("Shape", [x], outputs=[shp], name=f"{prefix}Shape"),
            ir.node("Reshape", [norm, shp], outputs=[out], name=f"{prefix}Reshape"),
        ])
    else:
        seg.append(ir.node(act.op, [x], {"axis": act.axis}, outputs=[out], name=f"{prefix}{act.op}"))
    out.dtype, out.shape = x.dtype or ir.DataType.FLOAT, x.shape
    return out


def _same_layout(a: Sequence[int | str | None], b: Sequence[int | str | None]) -> bool:
    """Same rank, and no axis where both sizes are known and differ (the exit output is the head output as is)."""
    return len(a) == len(b) and all(x == y or not isinstance(x, int) or not isinstance(y, int) for x, y in zip(a, b, strict=True))


def values_by_name(g: ir.Graph) -> dict[str, ir.Value]:
    """The named values of ``g``'s main graph: node outputs and graph inputs."""
    values = {v.name: v for n in g for v in n.outputs if v.name}
    values.update({v.name: v for v in g.inputs if v.name})
    return values


class AttachHeadPass(ir.passes.InPlacePass):
    """Attach exit ``k``'s head to its segment and add the exit output ``ee{k}.out.{final}`` (cases 1-3).

    Give ``head`` (a head model: cases 1 and 5) or ``head_output`` (a tensor the segment computes: case 2,
    with its shape ``head_output_shape``), and ``activation``, the final output's activation the exit output
    must apply (case 3; see :func:`exit_activation`). After the pass, :attr:`logits` is what the gate reads,
    :attr:`output` the exit output (appended to the graph outputs; the activation of the logits, or the logits
    themselves) and :attr:`score` the head's score output, if it has one (for ``score`` gates). :attr:`probs` is
    the softmax of :attr:`logits` over axis :attr:`probs_axis` (of the final output's layout) where the segment
    already computes it, else None: the exit output of case 3 with a final Softmax, or an in-model head that
    ends in a Softmax, whose output then is both :attr:`logits` and :attr:`probs` (the gate gets no logits);
    gates read it instead of computing a second Softmax.

    Raises:
        SpecError: the head does not fit the cut tensor or the final output (the message names ``where``).
    """

    def __init__(self, k: int, at: Sequence[str], final_name: str, final_shape: Dims, *, where: str,
                 head: ir.Model | None = None, head_output: str | None = None,
                 head_output_shape: Dims | None = None, score_output: str | None = None,
                 score_tensor: str | None = None, activation: FinalActivation | None = None,
                 others: dict[str, Dims] | None = None) -> None:
        super().__init__()
        self.k, self.at, self.final_name, self.final_shape, self.where = k, list(at), final_name, final_shape, where
        self.head, self.head_output, self.head_output_shape = head, head_output, head_output_shape
        self.score_output, self.score_tensor, self.activation = score_output, score_tensor, activation
        self.others = dict(others or {})  # further final outputs the head file gives, by name -> their shapes
        self.logits: ir.Value | None = None
        self.output: ir.Value | None = None
        self.score: ir.Value | None = None
        self.probs: ir.Value | None = None
        self.probs_axis: int | None = None
        self.other_outputs: dict[str, ir.Value] = {}  # final output name -> this exit's output for it

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        g = model.graph
        values = values_by_name(g)
        named: dict[str, ir.Value] = {}
        if self.head is not None:  # cases 1 and 4
            logits, self.score, named = splice_head(g, self.k, [values[n] for n in self.at], self.head, self.where,
                                                    self.score_output, list(self.others), self.final_name)
            if self.score_tensor is not None:  # a built-in head scored by a model tensor
                self.score = values[self.score_tensor]
            if logits.shape is not None and len(logits.shape) >= 1:
                logits_shape: Dims = [d if isinstance(d, int) else "batch" for d in logits.shape]
            else:
                logits_shape = ["batch", *self.final_shape[1:]]
        else:  # case 2
            assert self.head_output is not None and self.head_output_shape is not None
            logits, logits_shape = values[self.head_output], self.head_output_shape
            self.score = values[self.score_tensor] if self.score_tensor is not None else None
        name, act = exit_output(self.k, self.final_name), self.activation
        self.logits = fit_exit_output(g, self.k, logits, logits_shape, self.final_shape,  # case 4
                                      exit_logits(self.k) if act else name, self.where,
                                      batch_first=self.head is not None)
        # Case 3: the exit output is what the final output is (e.g. probabilities); the gate reads the logits.
        self.output = apply_activation(g, self.k, self.logits, act, self.final_shape, name) if act else self.logits
        softmax = act
        if act is None and self.head_output is not None and _same_layout(logits_shape, self.final_shape):
            # an in-model head that is already a softmax (of logits the segment does not expose)
            softmax = final_activation(values[self.head_output], g.opset_imports.get("", 13), len(logits_shape))
        if softmax is not None and softmax.op == "Softmax" and softmax.per_axis(self.final_shape):
            self.probs, self.probs_axis = self.output, softmax.axis
        g.outputs.append(self.output)
        for other, v in named.items():  # case 7: taken as the head gives them, in the model output's shape
            shape: Dims = ([d if isinstance(d, int) else "batch" for d in v.shape] if v.shape is not None
                           else ["batch", *self.others[other][1:]])
            out = fit_exit_output(g, self.k, v, shape, self.others[other], exit_output(self.k, other),
                                  f"{self.where} (output '{other}')", tag=f".{other}", batch_first=True)
            self.other_outputs[other] = out
            g.outputs.append(out)
        return ir.passes.PassResult(model, modified=True)


def head_for(pm: PreparedModel, e: ExitPlan, final_shape: Dims, class_axis: int,
             opset: int, task: str = "classification") -> tuple[ir.Model | None, dict[str, Any] | None]:
    """Exit ``e``'s head model and, for a trained head, its record for the manifest (``head_spec``).

    ``task: regression``: a trained head gives the final output's per-sample values (a ``conv`` head on
    [B, C, h, w] features maps back to a [B, C', H, W] output; the others give them flat, reshaped by
    :func:`fit_exit_output`). Returns ``(None, None)`` for an in-model head (case 2). Raises SpecError for a
    head file that cannot be read or converted, and for a trained head whose class count (or, regression,
    per-sample output shape) is not fixed."""
    h = e.spec.head
    if h.file is not None:
        return load_head(h.file, opset, f"{e.where}.head"), None
    if h.kind is None:
        return None, None
    try:
        from eecompile.heads import head_onnx, least_opset
    except ImportError as err:
        raise SpecError(f"{e.where}.head.kind: trained heads need eecompile.heads ({err})") from err
    views = head_views(pm, e.index, [v.name or "" for v in e.at])
    feature_shape = views[0].shape
    out_shape: list[int] | None = None
    if task == "regression":
        b = batch_index(list(final_shape))
        per = [d for i, d in enumerate(final_shape) if i != b]
        if not all(isinstance(d, int) for d in per):
            raise SpecError(f"{e.where}.head.kind: a trained head for a regression output needs its "
                            f"per-sample shape fixed; the final output has {list(final_shape)}")
        if h.kind == "conv" and len(per) == 3 and len(feature_shape) == 4:
            out_shape = [int(d) for d in per]  # type: ignore[arg-type]
            n_classes: int | str | None = out_shape[0]
        elif h.kind == "token":
            n_classes = per[-1]
        else:
            n_classes = int(np.prod(per))  # type: ignore[arg-type]
    else:
        n_classes = final_shape[class_axis % len(final_shape)]
    if not isinstance(n_classes, int):
        raise SpecError(f"{e.where}.head.kind: the final output's class axis has no fixed size")
    mask_dtype = onnx.TensorProto.INT64
    if len(e.at) > 1:  # e.g. pool: masked_mean reads the attention mask listed second in `at`
        facts = pm.probe.facts.get(e.at[1].name or "")
        if facts is not None:
            mask_dtype = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(facts.dtype))
    opset = max(opset, least_opset(h.kind, feature_shape, dict(h.options), out_shape))
    proto = head_onnx(h.kind, feature_shape, n_classes, dict(h.options), None, opset, mask_dtype=mask_dtype,
                      out_shape=out_shape)
    head_spec = {"kind": h.kind, "options": dict(h.options),
                 "feature_shape": [d if isinstance(d, int) else str(d) for d in feature_shape],
                 "n_classes": n_classes, "trained": False}
    if out_shape is not None:
        head_spec["out_shape"] = out_shape
    if any(v.axis for v in views):  # the tensors the head reads (and is trained on), batch-first (case 6)
        head_spec["inputs"] = [v.name for v in views]
    return ir.from_proto(proto), head_spec


def exit_activation(final_act: FinalActivation | None, e: ExitPlan, head: ir.Model | None, final_name: str,
                    where: str) -> FinalActivation | None:
    """The activation exit ``e``'s output must apply (case 3): the model's final one, except for an in-model
    head that already ends in it. Raises SpecError for an in-model head ending in another activation."""
    if final_act is None or head is not None or e.head_output is None:
        return final_act
    already = head_activation(e.head_output)
    if already is not None and already != final_act.op:
        raise SpecError(f"{where}.output: '{e.head_output.name}' is the output of a {already}, the final output "
                        f"'{final_name}' of a {final_act.op}; an exit's rows must mean what the final rows mean: "
                        f"name the head's logits (the tensor before its {already})")
    return None if already == final_act.op else final_act
