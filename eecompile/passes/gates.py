"""Gates computed inside the graph: one boolean per sample, the threshold a graph input.

Every gate first brings the exit's logits to ``[B, P, C]`` (class axis last, all other non-batch axes
flattened into P "positions": 1 for a classifier, T for token outputs), computes a per-position score and
reduces over positions with the *least* confident one. Outputs: ``ee{k}.score`` (float32 [B]) and
``ee{k}.gate`` (bool [B]); input: ``ee{k}.threshold`` (float32 scalar).

Kinds (see GateKind):
1. max_prob:   max softmax >= t                      (min over positions)
2. entropy:    -sum p log p / log C <= t             (max over positions)
3. margin:     top-1 - top-2 probability >= t        (min over positions)
4. patience:   count of consecutive exits with the same argmax >= t (PABEE); the argmax and the count ride
               along as state tensors ``ee{k}.state.argmax`` [B, P] and ``ee{k}.state.count`` [B]
5. saturation: cosine(h_prev, h_this) >= t on the pooled cut tensors (CALM, MuE); ``ee{k}.state.hidden``.
               The first exit compares with the tensor the spec names (``against``: MuE's embedding output);
               without one its score is -1. The two tensors must pool to the same positions and width.
6. score:      a head output that is itself the score >= t (learned halting/confidence heads)
7. change:     ||y_k - y_{k-1}|| / max(||y_k||, 1e-12) <= t on the exit outputs flattened per sample;
               ``ee{k}.state.output`` [B, N]. The first exit's score is +inf (never fires).
8. q_exit:     PALBERT's Q-exit: the head's score is lambda_k (clipped to [0, 1]); the survival
               s_k = s_{k-1} (1 - lambda_k) (s_{-1} = 1) rides along as ``ee{k}.state.survival`` [B] between
               consecutive Q-exit gates; fires when 1 - s_k >= q.

Where the segment already computes the softmax of the exit's logits (the exit output of a model ending in a
Softmax, or an in-model head that is one: ``AttachHeadPass.probs``), gates read it instead of a second Softmax:
max_prob is its max over the class axis; a head that gives only probabilities has its entropy from them
(``p log max(p, 1e-30)``, 0 at p = 0) and its non-finite guard on them.

NaN or Inf anywhere in a sample's logits makes its score NaN, and a NaN score never fires (the comparisons
are written so that NaN is False). Nodes use the segment's opset, valid from opset 7: Reduce* take ``axes`` as
an attribute before opset 18 (ReduceSum before 13), TopK takes ``k`` as an attribute before 10,
GreaterOrEqual needs 12, IsNaN needs 9 (before it a NaN test is ``x < inf or x > -inf``).

:func:`build_gate` records the nodes on a tape; :class:`FuseGatePass` puts a gate into a segment whose exit
output :class:`~eecompile.passes.attach_heads.AttachHeadPass` has made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir
from onnx_ir.tape import Tape

from eecompile.errors import SpecError
from eecompile.names import (
    STATE_ARGMAX,
    STATE_COUNT,
    STATE_OUTPUT,
    STATE_SURVIVAL,
    gate_names,
    gate_node_prefix,
)
from eecompile.spec import GateKind

if TYPE_CHECKING:
    from eecompile.passes.attach_heads import AttachHeadPass


class Ops:
    """Version-aware node builders on an onnx-ir tape."""

    def __init__(self, tape: Tape, opset: int, prefix: str) -> None:
        self.t = tape
        self.opset = opset
        self.prefix = prefix
        self._n = 0

    def _name(self, op: str) -> str:
        self._n += 1
        return f"{self.prefix}{op}_{self._n}"

    def op(self, op: str, inputs: list[ir.Value | None], attrs: dict | None = None,
           out_name: str | None = None) -> ir.Value:
        name = self._name(op)
        out = ir.Value(name=out_name or f"{name}:0")
        return self.t.op(op, inputs, attrs, name=name, output=out)

    def const(self, value: np.ndarray) -> ir.Value:
        name = self._name("const")
        if self.opset < 9 and value.dtype.kind != "f":
            # Constant holds only floats before opset 9: integer constants (shapes, indices) are initializers
            # (registered in the tape's graph).
            return self.t.initializer(ir.tensor(value, name=name), name=f"{name}:0")
        v = ir.Value(name=f"{name}:0")
        return self.t.op("Constant", [], {"value": ir.tensor(value, name=name)}, name=name, output=v)

    def reduce(self, op: str, x: ir.Value, axes: list[int], keepdims: int = 0) -> ir.Value:
        takes_input = self.opset >= (13 if op == "ReduceSum" else 18)
        if takes_input:
            return self.op(op, [x, self.const(np.array(axes, dtype=np.int64))], {"keepdims": keepdims})
        return self.op(op, [x], {"axes": axes, "keepdims": keepdims})

    def topk(self, x: ir.Value, k: int) -> ir.Value:
        name = self._name("TopK")
        vals, idx = ir.Value(name=f"{name}:values"), ir.Value(name=f"{name}:indices")
        if self.opset >= 10:
            inputs: list[ir.Value | None] = [x, self.const(np.array([k], dtype=np.int64))]
            attrs: dict = {"axis": -1}
        else:
            inputs, attrs = [x], {"axis": -1, "k": k}
        self.t.op_multi_out("TopK", inputs, attrs, name=name, outputs=[vals, idx])
        return vals

    def cast_float(self, x: ir.Value) -> ir.Value:
        return self.op("Cast", [x], {"to": ir.DataType.FLOAT})

    def not_nan(self, a: ir.Value) -> ir.Value:
        """True where ``a`` is not NaN, with the ops of this opset: IsNaN exists from opset 9 and Equal takes
        floats from 11, so before 9 it is ``a < +inf or a > -inf`` (both False only for NaN)."""
        if self.opset >= 9:
            return self.op("Not", [self.op("IsNaN", [a])])
        inf = self.const(np.array(np.inf, dtype=np.float32))
        return self.op("Or", [self.op("Less", [a, inf]), self.op("Greater", [a, self.op("Neg", [inf])])])

    def ge(self, a: ir.Value, b: ir.Value, out_name: str) -> ir.Value:
        """a >= b, False when either is NaN."""
        if self.opset >= 12:
            return self.op("GreaterOrEqual", [a, b], out_name=out_name)
        # Before opset 12 there is no GreaterOrEqual: a >= b is not(a < b), and not NaN.
        return self.op("And", [self.op("Not", [self.op("Less", [a, b])]), self.not_nan(a)], out_name=out_name)

    def le(self, a: ir.Value, b: ir.Value, out_name: str) -> ir.Value:
        if self.opset >= 12:
            return self.op("LessOrEqual", [a, b], out_name=out_name)
        return self.op("And", [self.op("Not", [self.op("Greater", [a, b])]), self.not_nan(a)], out_name=out_name)


@dataclass
class GateResult:
    """The values :func:`build_gate` made: ``gate`` (bool [B]), ``score`` (float32 [B]), ``threshold`` (the
    float32 scalar input), the state it reads from the previous exit and the state it hands to the next."""

    gate: ir.Value
    score: ir.Value
    threshold: ir.Value
    state_inputs: list[ir.Value] = field(default_factory=list)
    state_outputs: list[ir.Value] = field(default_factory=list)


def _to_bpc(ops: Ops, logits: ir.Value, shape: list[int | str | None], class_axis: int) -> tuple[ir.Value, int]:
    """Logits of any rank >= 2 as float32 [B, P, C]; returns (value, C)."""
    rank = len(shape)
    if rank < 2:
        raise SpecError(f"exit logits '{logits.name}' have rank {rank}; a gate needs [batch, ..., classes]")
    axis = class_axis % rank
    if axis == 0:
        raise SpecError("final.class_axis points at the batch axis (0); give the axis of the classes")
    c = shape[axis]
    if not isinstance(c, int):
        raise SpecError(f"exit logits '{logits.name}': the class axis {class_axis} has no fixed size ({c})")
    x = logits
    if axis != rank - 1:
        perm = [i for i in range(rank) if i != axis] + [axis]
        x = ops.op("Transpose", [x], {"perm": perm})
    x = ops.op("Reshape", [x, ops.const(np.array([0, -1, c], dtype=np.int64))])
    x = ops.cast_float(x)
    # Non-finite logits poison the score: sum(x * 0) is 0 for finite rows and NaN otherwise.
    return x, c


def _least_max_prob(ops: Ops, probs: ir.Value, rank: int, class_axis: int, cast: bool = True) -> ir.Value:
    """float32 [B]: the max of ``probs`` (batch first, rank ``rank``) over ``class_axis``, then the min over the
    other non-batch axes (the least confident position). ``cast=False``: ``probs`` is known to be float32."""
    axis = class_axis % rank
    top = ops.reduce("ReduceMax", probs, [axis])
    if rank > 2:
        top = ops.reduce("ReduceMin", top, list(range(1, rank - 1)))
    return ops.cast_float(top) if cast else top


def _nonfinite_guard(ops: Ops, x_bpc: ir.Value) -> ir.Value:
    zero = ops.const(np.array(0.0, dtype=np.float32))
    return ops.reduce("ReduceSum", ops.op("Mul", [x_bpc, zero]), [1, 2], keepdims=0)


def _pool_hidden(ops: Ops, h: ir.Value, shape: list[int | str | None]) -> tuple[ir.Value, int | str | None]:
    """A cut tensor as [B, P, D] for the saturation gate: [B,C,H,W] is average-pooled to [B,1,C]."""
    rank = len(shape)
    if rank == 4:
        pooled = ops.op("GlobalAveragePool", [h])
        return ops.cast_float(ops.op("Reshape", [pooled, ops.const(np.array([0, 1, -1], dtype=np.int64))])), shape[1]
    if rank == 3:
        return ops.cast_float(h), shape[2]
    if rank == 2:
        return ops.cast_float(ops.op("Reshape", [h, ops.const(np.array([0, 1, -1], dtype=np.int64))])), shape[1]
    raise SpecError(f"saturation gate: cut tensor '{h.name}' has rank {rank}; supported: 2, 3 or 4")


def pooled_shape(shape: list[int | str | None] | None) -> tuple[int | str | None, int | str | None]:
    """(positions P, width D) a saturation gate compares for a cut tensor shaped ``shape``: [B, C, H, W] and
    [B, D] pool to one position, [B, T, D] keeps its T tokens."""
    if not shape:
        return None, None
    rank = len(shape)
    if rank == 3:
        return shape[1], shape[2]
    if rank in (2, 4):
        return 1, shape[1]
    return None, None


def _check_same_pooled(a: list[int | str | None] | None, b: list[int | str | None] | None, where: str,
                       what_a: str, what_b: str) -> None:
    """SpecError (naming ``where``) when two tensors a saturation gate compares differ in token axis or width."""
    (pa, da), (pb, db) = pooled_shape(a), pooled_shape(b)
    for axis, x, y in (("width", da, db), ("token axis", pa, pb)):
        if isinstance(x, int) and isinstance(y, int) and x != y:
            raise SpecError(
                f"{where}: saturation compares {what_a} {list(a or [])} with {what_b} {list(b or [])}, but their "
                f"{axis} differs ({x} vs {y}); compare tensors of the same tokens and width (transformer layers) "
                f"or choose another gate kind")


def build_gate(
    tape: Tape,
    k: int,
    kind: GateKind,
    logits: ir.Value,
    logits_shape: list[int | str | None],
    class_axis: int,
    opset: int,
    *,
    prev_k: int | None = None,
    hidden: ir.Value | None = None,
    hidden_shape: list[int | str | None] | None = None,
    prev_hidden_dim: int | str | None = None,
    score_value: ir.Value | None = None,
    emit_patience_state: bool = False,
    emit_hidden_state: bool = False,
    prev_hidden_shape: list[int | str | None] | None = None,
    against: ir.Value | None = None,
    against_shape: list[int | str | None] | None = None,
    emit_output_state: bool = False,
    emit_survival_state: bool = False,
    prev_survival: bool = False,
    probs: ir.Value | None = None,
    spec_index: int | None = None,
) -> GateResult:
    """Record exit ``k``'s gate on ``tape``; ``prev_k`` is the previous exit (whose state this gate reads).
    ``spec_index``: the exit's index in the spec, which messages name (segment ``k`` when None; they differ after
    a jump target's boundary segment).

    ``probs``: the softmax of ``logits`` over ``class_axis`` (same layout) where the graph computes it already;
    ``probs is logits`` when the exit gives probabilities only (an in-model head ending in a Softmax).

    ``against`` (saturation, first exit): the tensor to compare the cut tensor with. ``emit_output_state`` /
    ``emit_survival_state``: hand the next exit's change / Q-exit gate its state; ``prev_survival``: the previous
    exit is a Q-exit gate whose survival this Q-exit gate continues (else the product starts here)."""
    names = gate_names(k)
    ops = Ops(tape, opset, prefix=gate_node_prefix(k))
    w = k if spec_index is None else spec_index  # exits[w] in the spec
    pw = w - 1  # the exit before it (a gate after a jump target never reads the exit before: passes/jumps.py)
    thr = ir.Value(name=names["threshold"], shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT))
    res_state_in: list[ir.Value] = []
    res_state_out: list[ir.Value] = []
    x, c = _to_bpc(ops, logits, logits_shape, class_axis)
    guard = _nonfinite_guard(ops, x)
    argmax: ir.Value | None = None
    only_probs = probs is logits  # x holds probabilities: no Softmax of them
    if kind == GateKind.MAX_PROB and probs is not None and not only_probs:
        # max softmax = the max of the exit's own Softmax over the class axis; least confident position
        known = probs.dtype == logits.dtype == ir.DataType.FLOAT
        raw = _least_max_prob(ops, probs, len(logits_shape), class_axis, cast=not known)
    elif kind in (GateKind.MAX_PROB, GateKind.MARGIN, GateKind.ENTROPY):
        p = x if only_probs else ops.op("Softmax", [x], {"axis": -1 if opset >= 13 else 2})
        if kind == GateKind.MAX_PROB:
            per_pos = ops.reduce("ReduceMax", p, [-1 if opset >= 13 else 2])
            raw = ops.reduce("ReduceMin", per_pos, [1])
        elif kind == GateKind.MARGIN:
            if c < 2:
                raise SpecError(f"exits[{w}]: margin gate needs at least 2 classes, the logits have {c}")
            top = ops.topk(p, 2)
            t1 = ops.op("Gather", [top, ops.const(np.array(0, dtype=np.int64))], {"axis": 2})
            t2 = ops.op("Gather", [top, ops.const(np.array(1, dtype=np.int64))], {"axis": 2})
            raw = ops.reduce("ReduceMin", ops.op("Sub", [t1, t2]), [1])
        else:
            if only_probs:  # log p, with p log p = 0 where p = 0
                logp = ops.op("Log", [ops.op("Max", [p, ops.const(np.array(1e-30, dtype=np.float32))])])
            else:
                logp = ops.op("LogSoftmax", [x], {"axis": -1 if opset >= 13 else 2})
            ent = ops.op("Neg", [ops.reduce("ReduceSum", ops.op("Mul", [p, logp]), [2])])
            norm = ops.const(np.array(1.0 / math.log(c) if c > 1 else 1.0, dtype=np.float32))
            raw = ops.reduce("ReduceMax", ops.op("Mul", [ent, norm]), [1])
    elif kind == GateKind.PATIENCE:
        argmax = ops.op("ArgMax", [x], {"axis": 2, "keepdims": 0})
        one = ops.const(np.array(1.0, dtype=np.float32))
        if prev_k is None:
            # No earlier exit: this is the first vote. count = 1 for every sample ([B] from the guard).
            raw = ops.op("Add", [ops.op("Mul", [guard, ops.const(np.array(0.0, dtype=np.float32))]), one])
        else:
            pn = gate_names(prev_k)
            prev_arg = ir.Value(name=pn["argmax"], type=ir.TensorType(ir.DataType.INT64),
                                shape=ir.Shape(["batch", None]))
            prev_cnt = ir.Value(name=pn["count"], type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch"]))
            res_state_in += [prev_arg, prev_cnt]
            same = ops.reduce("ReduceMin", ops.cast_float(ops.op("Equal", [argmax, prev_arg])), [1])
            raw = ops.op("Add", [ops.op("Mul", [same, prev_cnt]), one])
    elif kind == GateKind.SATURATION:
        if hidden is None or hidden_shape is None:
            raise SpecError(f"exits[{w}]: saturation gate needs the cut tensor")
        h, dim = _pool_hidden(ops, hidden, hidden_shape)
        if prev_k is None and against is None:
            raw = ops.op("Sub", [ops.op("Mul", [guard, ops.const(np.array(0.0, dtype=np.float32))]),
                                 ops.const(np.array(1.0, dtype=np.float32))])  # -1: nothing to compare with
        else:
            if prev_k is None:  # the first exit compares with the tensor the spec names (MuE: the embeddings)
                assert against is not None
                _check_same_pooled(against_shape, hidden_shape, f"exits[{w}].gate.against",
                                   f"'{against.name}'", f"the cut tensor '{hidden.name}'")
                prev_h, _ = _pool_hidden(ops, against, against_shape or [])
            else:
                if prev_hidden_dim is not None and dim is not None and prev_hidden_dim != dim:
                    raise SpecError(
                        f"exits[{w}].gate: saturation compares hidden states of consecutive exits, but exit {pw} "
                        f"has width {prev_hidden_dim} and exit {w} has {dim}; use it where the widths match "
                        f"(transformer layers) or choose another gate kind"
                    )
                _check_same_pooled(prev_hidden_shape, hidden_shape, f"exits[{w}].gate",
                                   f"exit {pw}'s cut tensor", f"exit {w}'s")
                prev_h = ir.Value(name=gate_names(prev_k)["hidden"], type=ir.TensorType(ir.DataType.FLOAT),
                                  shape=ir.Shape(["batch", None, dim]))
                res_state_in.append(prev_h)
            dot = ops.reduce("ReduceSum", ops.op("Mul", [h, prev_h]), [2])
            n1 = ops.op("Sqrt", [ops.reduce("ReduceSum", ops.op("Mul", [h, h]), [2])])
            n2 = ops.op("Sqrt", [ops.reduce("ReduceSum", ops.op("Mul", [prev_h, prev_h]), [2])])
            eps = ops.const(np.array(1e-12, dtype=np.float32))
            cos = ops.op("Div", [dot, ops.op("Add", [ops.op("Mul", [n1, n2]), eps])])
            raw = ops.reduce("ReduceMin", cos, [1])
        if emit_hidden_state:
            res_state_out.append(ops.op("Identity", [h], out_name=names["hidden"]))
    elif kind == GateKind.SCORE:
        if score_value is None:
            raise SpecError(f"exits[{w}].head: the score gate needs `score_output` naming the head's score output")
        raw = ops.cast_float(ops.op("Reshape", [score_value, ops.const(np.array([-1], dtype=np.int64))]))
    elif kind == GateKind.CHANGE:
        y = ops.cast_float(ops.op("Reshape", [logits, ops.const(np.array([0, -1], dtype=np.int64))]))
        if prev_k is None:  # nothing to compare with: +inf never fires (<= t is False)
            raw = ops.op("Add", [ops.op("Mul", [guard, ops.const(np.array(0.0, dtype=np.float32))]),
                                 ops.const(np.array(np.inf, dtype=np.float32))])
        else:
            prev_y = ir.Value(name=gate_names(prev_k)["output"], type=ir.TensorType(ir.DataType.FLOAT),
                              shape=ir.Shape(["batch", None]))
            res_state_in.append(prev_y)
            d = ops.op("Sub", [y, prev_y])
            num = ops.op("Sqrt", [ops.reduce("ReduceSum", ops.op("Mul", [d, d]), [1])])
            den = ops.op("Sqrt", [ops.reduce("ReduceSum", ops.op("Mul", [y, y]), [1])])
            raw = ops.op("Div", [num, ops.op("Max", [den, ops.const(np.array(1e-12, dtype=np.float32))])])
    elif kind == GateKind.Q_EXIT:
        if score_value is None:
            raise SpecError(f"exits[{w}].head: a q_exit gate needs the head's halting probability lambda: name it "
                            f"with score_output (a head output in [0, 1], e.g. a Sigmoid) or use a built-in head "
                            f"with options: {{score: halting}} (PALBERT's lambda, trained by train-heads)")
        lam = ops.cast_float(ops.op("Reshape", [score_value, ops.const(np.array([-1], dtype=np.int64))]))
        zero, one = ops.const(np.array(0.0, dtype=np.float32)), ops.const(np.array(1.0, dtype=np.float32))
        lam = ops.op("Min", [ops.op("Max", [lam, zero]), one])
        stay = ops.op("Sub", [one, lam])
        if prev_k is not None and prev_survival:
            prev_s = ir.Value(name=gate_names(prev_k)["survival"], type=ir.TensorType(ir.DataType.FLOAT),
                              shape=ir.Shape(["batch"]))
            res_state_in.append(prev_s)
            stay = ops.op("Mul", [prev_s, stay])
        raw = ops.op("Sub", [one, stay])
        if emit_survival_state:
            res_state_out.append(ops.op("Identity", [stay], out_name=names["survival"]))
    else:  # pragma: no cover - GateKind is closed
        raise SpecError(f"exits[{w}]: unknown gate kind {kind}")
    score = ops.op("Add", [raw, guard], out_name=names["score"])
    if kind.fires_above:
        gate = ops.ge(score, thr, names["gate"])
    else:
        gate = ops.le(score, thr, names["gate"])
    if emit_patience_state:
        if argmax is None:
            argmax = ops.op("ArgMax", [x], {"axis": 2, "keepdims": 0})
        count = score if kind == GateKind.PATIENCE else ops.op(
            "Add", [ops.op("Mul", [guard, ops.const(np.array(0.0, dtype=np.float32))]),
                    ops.const(np.array(1.0, dtype=np.float32))])
        res_state_out.append(ops.op("Identity", [argmax], out_name=names["argmax"]))
        res_state_out.append(ops.op("Identity", [count], out_name=names["count"]))
    if emit_hidden_state and kind != GateKind.SATURATION and hidden is not None and hidden_shape is not None:
        h, _ = _pool_hidden(ops, hidden, hidden_shape)
        res_state_out.append(ops.op("Identity", [h], out_name=names["hidden"]))
    if emit_output_state:
        y_out = ops.cast_float(ops.op("Reshape", [logits, ops.const(np.array([0, -1], dtype=np.int64))]))
        res_state_out.append(ops.op("Identity", [y_out], out_name=names["output"]))
    return GateResult(gate=gate, score=score, threshold=thr, state_inputs=res_state_in, state_outputs=res_state_out)


def logit_gap_score(ops: Ops, logits: ir.Value, masked: ir.Value, reduce: str = "mean") -> ir.Value:
    """Prophet's early-commit score (Li et al. 2025, "Diffusion language models know the answer before
    decoding"): the gap between the top-2 *logits* (not probabilities) at each position of ``logits``
    (float [B, T, V]), reduced over the positions where ``masked`` (bool [B, T]) is True: their mean
    (``reduce="mean"``) or their minimum (``"min"``). Returns float32 [B]; +inf for a sample with no masked
    position left (nothing remains to decide), NaN where a masked position's logits are NaN/Inf (never fires).
    A loop gate (``loop.gate.kind: logit_gap``) compares it with its threshold: >= t commits."""
    x = ops.cast_float(logits)
    top = ops.topk(x, 2)
    gap = ops.op("Sub", [ops.op("Gather", [top, ops.const(np.array(0, dtype=np.int64))], {"axis": 2}),
                         ops.op("Gather", [top, ops.const(np.array(1, dtype=np.int64))], {"axis": 2})])
    # inf - inf is NaN: a position with non-finite logits poisons its sample's score.
    nonfinite = ops.op("Mul", [ops.reduce("ReduceSum", x, [2]), ops.const(np.array(0.0, dtype=np.float32))])
    gap = ops.op("Add", [gap, nonfinite])
    inf = ops.const(np.array(np.inf, dtype=np.float32))
    count = ops.reduce("ReduceSum", ops.cast_float(masked), [1])
    none_left = ops.op("Equal", [count, ops.const(np.array(0.0, dtype=np.float32))])
    if reduce == "min":
        raw = ops.reduce("ReduceMin", ops.op("Where", [masked, gap, inf]), [1])
    else:
        zero = ops.const(np.array(0.0, dtype=np.float32))
        total = ops.reduce("ReduceSum", ops.op("Where", [masked, gap, zero]), [1])
        raw = ops.op("Div", [total, ops.op("Max", [count, ops.const(np.array(1.0, dtype=np.float32))])])
    return ops.op("Where", [none_left, inf, raw])


class FuseGatePass(ir.passes.InPlacePass):
    """Fuse exit ``k``'s gate into its segment, reading the exit logits that ``head`` (the segment's
    :class:`~eecompile.passes.attach_heads.AttachHeadPass`, run before) made.

    Adds the threshold input ``ee{k}.threshold`` and the state inputs this gate reads (from exit ``k - 1``);
    appends the outputs ``ee{k}.gate`` (bool [B]), ``ee{k}.score`` (float32 [B]) and the state this gate hands
    to exit ``k + 1`` (``emit_patience_state``, ``emit_hidden_state``: what the next exit's gate reads).
    ``hidden`` names the cut tensor (saturation gates pool it); the other keyword arguments are
    :func:`build_gate`'s. After the pass, :attr:`result` holds the gate's values.

    Raises:
        SpecError: the gate kind does not fit the exit (see :func:`build_gate`).
    """

    def __init__(self, k: int, kind: GateKind, head: AttachHeadPass, logits_shape: list[int | str | None],
                 class_axis: int, opset: int, *, hidden: str | None = None,
                 hidden_shape: list[int | str | None] | None = None, prev_k: int | None = None,
                 prev_hidden_dim: int | str | None = None, emit_patience_state: bool = False,
                 emit_hidden_state: bool = False, prev_hidden_shape: list[int | str | None] | None = None,
                 against: str | None = None, against_shape: list[int | str | None] | None = None,
                 emit_output_state: bool = False, emit_survival_state: bool = False,
                 prev_survival: bool = False, spec_index: int | None = None) -> None:
        super().__init__()
        self.k, self.kind, self.head, self.logits_shape = k, kind, head, logits_shape
        self.class_axis, self.opset, self.hidden, self.hidden_shape = class_axis, opset, hidden, hidden_shape
        self.prev_k, self.prev_hidden_dim, self.prev_hidden_shape = prev_k, prev_hidden_dim, prev_hidden_shape
        self.emit_patience_state, self.emit_hidden_state = emit_patience_state, emit_hidden_state
        self.against, self.against_shape = against, against_shape
        self.emit_output_state, self.emit_survival_state = emit_output_state, emit_survival_state
        self.prev_survival = prev_survival
        self.spec_index = k if spec_index is None else spec_index
        self.result: GateResult | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        g = model.graph
        assert self.head.logits is not None, "AttachHeadPass must run before FuseGatePass"
        hidden = next((v for n in g for v in n.outputs if v.name == self.hidden), None) if self.hidden else None
        if hidden is None and self.hidden:
            hidden = next((v for v in g.inputs if v.name == self.hidden), None)
        against = next((v for n in g for v in n.outputs if v.name == self.against), None) if self.against else None
        if self.against and against is None:
            against = next((v for v in g.inputs if v.name == self.against), None)
        if self.against and against is None:
            raise SpecError(f"exits[{self.spec_index}].gate.against: segment {self.k} has no tensor '{self.against}'")
        tape = Tape(g)
        logits, shape, axis = self.head.logits, list(self.logits_shape), self.class_axis
        # the exit's own softmax, where it normalises over the class axis the gate reads
        probs = self.head.probs if self.head.probs_axis == axis % len(shape) else None
        b = shape.index("batch") if "batch" in shape else 0
        if b:  # a time-major exit ([T, batch, C]): the gate works batch first
            perm = [b, *(i for i in range(len(shape)) if i != b)]
            only_probs = probs is logits
            logits = tape.op("Transpose", [logits], {"perm": perm}, name=f"{gate_node_prefix(self.k)}batch_first",
                             output=ir.Value(name=f"{gate_node_prefix(self.k)}batch_first:0"))
            if probs is not None:
                probs = logits if only_probs else tape.op(
                    "Transpose", [probs], {"perm": perm}, name=f"{gate_node_prefix(self.k)}probs_batch_first",
                    output=ir.Value(name=f"{gate_node_prefix(self.k)}probs_batch_first:0"))
            c = axis % len(shape)
            axis = perm.index(c) - len(shape)
            shape = [shape[i] for i in perm]
        gate = build_gate(tape, self.k, self.kind, logits, shape, axis,
                          self.opset, prev_k=self.prev_k, hidden=hidden, hidden_shape=self.hidden_shape,
                          prev_hidden_dim=self.prev_hidden_dim, score_value=self.head.score,
                          emit_patience_state=self.emit_patience_state, emit_hidden_state=self.emit_hidden_state,
                          prev_hidden_shape=self.prev_hidden_shape, against=against, against_shape=self.against_shape,
                          emit_output_state=self.emit_output_state, emit_survival_state=self.emit_survival_state,
                          prev_survival=self.prev_survival, probs=probs, spec_index=self.spec_index)
        g.extend(tape.nodes)
        gate.gate.dtype, gate.gate.shape = ir.DataType.BOOL, ir.Shape(["batch"])
        gate.score.dtype, gate.score.shape = ir.DataType.FLOAT, ir.Shape(["batch"])
        for v in gate.state_outputs:
            if (v.name or "").endswith("." + STATE_ARGMAX):
                v.dtype, v.shape = ir.DataType.INT64, ir.Shape(["batch", None])
            else:
                v.dtype = ir.DataType.FLOAT
                name = v.name or ""
                v.shape = (ir.Shape(["batch"]) if name.endswith(("." + STATE_COUNT, "." + STATE_SURVIVAL))
                           else ir.Shape(["batch", None]) if name.endswith("." + STATE_OUTPUT)
                           else ir.Shape(["batch", None, None]))
        g.inputs.extend(gate.state_inputs)
        g.inputs.append(gate.threshold)
        g.outputs.extend([gate.gate, gate.score, *gate.state_outputs])
        self.result = gate
        return ir.passes.PassResult(model, modified=True)
