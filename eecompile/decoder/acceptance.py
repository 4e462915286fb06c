"""A verification's acceptance in the shared head's graph: greedy, and speculative rejection sampling.

The head verifies the positions a row fed (its last confirmed token and the drafts after it). Given the drafts
it returns per row only ``accepted`` (how many leading drafts are kept) and ``next_token`` (the token emitted
after them, -1 when there is none), so a verification reads back two integers per row, not the logits.

Inputs (int64 unless said): ``drafts`` [B, S] (the draft fed after position j, -1 where the row has none),
``n_fed`` [B] (positions the row fed), and for sampling ``temperature`` [B] float32 (<= 0: a greedy row),
``draft_probs`` [B, S, V] float32 (q: the distribution each draft was drawn from), ``u_accept`` [B, S] and
``u_sample`` [B] float32 (uniform draws in [0, 1) from the row's own generator on the host, so results stay
seeded and reproducible).

Cases:
1. Greedy: ``accepted`` = the longest prefix of drafts equal to the head's argmax tokens; ``next_token`` = the
   argmax after them (-1 when every fed position was accepted).
2. Sampling (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023): with p = softmax(logits / T) at each fed
   position, draft j is kept when q_j(x_j) <= 0 or u_accept[j] < p_j(x_j) / q_j(x_j) (i.e. with probability
   min(1, p/q)) or the residual max(0, p_j - q_j) sums to 0 (p == q: a rejection is impossible in exact
   arithmetic); at the first rejection m the next token is drawn from max(0, p_m - q_m) normalised, and when
   every draft was kept and a position after them was fed (no draft there), from p there: both by the inverse
   CDF, the count of normalised cumulative probabilities <= ``u_sample`` (numpy's ``Generator.choice``).
   Greedy rows of a sampled call keep case 1's result. The sampling ops sit in the ``then`` branch of an
   ``If`` on max(temperature) > 0, so a greedy call does not compute them (ONNX Runtime runs every node of a
   graph whatever outputs are asked for; an ``If`` runs one branch).

``eecompile.runtimes.lm.sampled_verification`` is the same rule on the host (bundles compiled before this).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

DRAFTS = "drafts"
N_FED = "n_fed"
TEMPERATURE = "temperature"
DRAFT_PROBS = "draft_probs"
U_ACCEPT = "u_accept"
U_SAMPLE = "u_sample"
SAMPLING_INPUTS = [TEMPERATURE, DRAFT_PROBS, U_ACCEPT, U_SAMPLE]

_I64, _F32, _BOOL = ir.DataType.INT64, ir.DataType.FLOAT, ir.DataType.BOOL


def _input(name: str, dtype: ir.DataType, shape: list[int | str]) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))


def add_acceptance(head: ir.Graph, logits: ir.Value, token: ir.Value, vocab: int) -> tuple[ir.Value, ir.Value]:
    """Append both acceptance rules to ``head`` (its ``logits`` [B, S, V] and argmax ``token`` [B, S]); add their
    inputs to the graph and return (``accepted``, ``next_token``), both [B] int64, named so."""
    t = ir.tape.Tape()

    def const(name: str, value: np.ndarray) -> ir.Value:
        return t.initializer(ir.tensor(value, name=f"accept.{name}"))

    drafts, n_fed = _input(DRAFTS, _I64, ["batch", "seq"]), _input(N_FED, _I64, ["batch"])
    temperature = _input(TEMPERATURE, _F32, ["batch"])
    q = _input(DRAFT_PROBS, _F32, ["batch", "seq", vocab])
    u_accept, u_sample = _input(U_ACCEPT, _F32, ["batch", "seq"]), _input(U_SAMPLE, _F32, ["batch"])
    one, zero = const("one", np.array(1, np.int64)), const("zero", np.array(0, np.int64))
    minus = const("minus_one", np.array(-1, np.int64))
    last_axis, axis1 = const("axis_last", np.array([-1], np.int64)), const("axis1", np.array([1], np.int64))

    def prefix_length(ok: ir.Value, tape: ir.tape.Tape) -> ir.Value:
        """Leading True entries of ok [B, S] per row: [B] int64."""
        miss = tape.op("Cast", [tape.op("Not", [ok])], attributes={"to": _I64})
        prefix = tape.op("Equal", [tape.op("CumSum", [miss, one]), zero])
        return tape.op("ReduceSum", [tape.op("Cast", [prefix], attributes={"to": _I64}), last_axis],
                       attributes={"keepdims": 0})

    def at_row(x: ir.Value, at: ir.Value, tape: ir.tape.Tape) -> ir.Value:
        """x[b, at[b]] for x [B, S]: [B]."""
        idx = tape.op("Unsqueeze", [at, last_axis])
        return tape.op("Squeeze", [tape.op("GatherElements", [x, idx], attributes={"axis": 1}), last_axis])

    # case 1: greedy
    last = t.op("Sub", [t.op("Shape", [token], attributes={"start": 1, "end": 2}), one])
    accepted_g = prefix_length(t.op("Equal", [token, drafts]), t)
    next_g = t.op("Where", [t.op("Less", [accepted_g, n_fed]), at_row(token, t.op("Min", [accepted_g, last]), t),
                            minus])

    # case 2: sampling, in the then-branch (its nodes read the head's values from the enclosing scope)
    b = ir.tape.Tape()
    f_zero, f_one = const("f_zero", np.array(0.0, np.float32)), const("f_one", np.array(1.0, np.float32))
    greedy_row = b.op("LessOrEqual", [temperature, f_zero])
    axes12, one1 = const("axes12", np.array([1, 2], np.int64)), const("one1", np.array([1], np.int64))
    temp = b.op("Unsqueeze", [b.op("Where", [greedy_row, f_one, temperature]), axes12])
    p = b.op("Softmax", [b.op("Div", [logits, temp])], attributes={"axis": -1})
    valid = b.op("GreaterOrEqual", [drafts, zero])
    d = b.op("Unsqueeze", [b.op("Where", [valid, drafts, zero]), last_axis])

    def gather_draft(x: ir.Value) -> ir.Value:  # x[b, j, drafts[b, j]]: [B, S]
        return b.op("Squeeze", [b.op("GatherElements", [x, d], attributes={"axis": 2}), last_axis])

    pd, qd = gather_draft(p), gather_draft(q)
    residual = b.op("Relu", [b.op("Sub", [p, q])])
    no_residual = b.op("LessOrEqual", [b.op("ReduceSum", [residual, last_axis], attributes={"keepdims": 0}), f_zero])
    keep = b.op("Or", [b.op("Or", [b.op("LessOrEqual", [qd, f_zero]), b.op("Less", [u_accept, b.op("Div", [pd, qd])])]),
                       no_residual])
    accepted_s = prefix_length(b.op("And", [keep, valid]), b)
    n_drafts = b.op("ReduceSum", [b.op("Cast", [valid], attributes={"to": _I64}), last_axis],
                    attributes={"keepdims": 0})
    rejected = b.op("Less", [accepted_s, n_drafts])
    # the distribution at position min(accepted, S - 1): the residual there after a rejection, else p
    seq_last = b.op("Sub", [b.op("Shape", [drafts], attributes={"start": 1, "end": 2}), one])
    at = b.op("Unsqueeze", [b.op("Min", [accepted_s, seq_last]), axes12])
    rows_vocab = b.op("Concat", [b.op("Shape", [p], attributes={"start": 0, "end": 1}), one1,
                                 b.op("Shape", [p], attributes={"start": 2, "end": 3})], attributes={"axis": 0})
    at = b.op("Expand", [at, rows_vocab])  # [B, 1, V]

    def row_at(x: ir.Value) -> ir.Value:  # x[b, at[b], :]: [B, V]
        return b.op("Squeeze", [b.op("GatherElements", [x, at], attributes={"axis": 1}), axis1])

    dist = b.op("Where", [b.op("Unsqueeze", [rejected, last_axis]), row_at(residual), row_at(p)])
    cdf = b.op("CumSum", [dist, const("axis_last0", np.array(-1, np.int64))])
    total = b.op("ReduceMax", [cdf, last_axis], attributes={"keepdims": 1})  # the last entry (cdf is nondecreasing)
    below = b.op("LessOrEqual", [b.op("Div", [cdf, total]), b.op("Unsqueeze", [u_sample, last_axis])])
    drawn = b.op("ReduceSum", [b.op("Cast", [below], attributes={"to": _I64}), last_axis], attributes={"keepdims": 0})
    drawn = b.op("Min", [drawn, const("vocab_last", np.array(vocab - 1, np.int64))])
    emits = b.op("Or", [rejected, b.op("Less", [n_drafts, n_fed])])
    next_s = b.op("Where", [emits, drawn, minus])
    acc_out = b.op("Where", [greedy_row, accepted_g, accepted_s])
    next_out = b.op("Where", [greedy_row, next_g, next_s])
    then_branch = ir.Graph([], [acc_out, next_out], nodes=b.nodes, name="sampled_acceptance")
    e = ir.tape.Tape()
    else_branch = ir.Graph([], [e.op("Identity", [accepted_g]), e.op("Identity", [next_g])], nodes=e.nodes,
                           name="greedy_acceptance")
    for g in (then_branch, else_branch):
        for v in g.outputs:
            v.dtype, v.shape = _I64, ir.Shape(["batch"])
    sampling = t.op("Greater", [t.op("ReduceMax", [temperature], attributes={"keepdims": 0}), f_zero])
    accepted, next_token = t.op_multi_out("If", [sampling], attributes={"then_branch": then_branch,
                                                                         "else_branch": else_branch}, num_outputs=2)
    # names unique across the graph and its branches (each tape names its values val_0, val_1, ...)
    for prefix, tape in (("accept", t), ("accept.sampled", b), ("accept.greedy", e)):
        for i, v in enumerate(v for node in tape.nodes for v in node.outputs):
            v.name = f"{prefix}.{i}"
    for node in t.nodes:
        head.append(node)
    for init in t.initializers:
        head.register_initializer(init)
    head.inputs.extend([drafts, n_fed, temperature, q, u_accept, u_sample])
    for v, name in ((accepted, "accepted"), (next_token, "next_token")):
        v.name, v.dtype, v.shape = name, _I64, ir.Shape(["batch"])
    return accepted, next_token
