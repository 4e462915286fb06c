"""Loops: the step graph that runs after the chain at every step, with the loop gate fused into it.

A spec with ``loop:`` compiles its ``model`` into the usual chain of segments (one step of the iterative model,
its layer exits included) and this pass makes ``segments/loop.onnx``, the *step graph*:

1. the user's ``loop.step`` graph when given (a sampler's update ``x_next = f(x, eps, t)``, a diffusion LM's
   unmasking), whose inputs are named after model inputs, the chain's final output or per-step inputs;
2. the loop gate (``loop.gate``) reading tensors of the step by name: ``logit_gap`` (Prophet's top-2 logit gap
   over the still-masked positions, :func:`eecompile.passes.gates.logit_gap_score`), ``change`` (relative L2
   change of a fed-back state) or ``score`` (a step output that is the score); a chain tensor the gate reads
   becomes a graph input. Outputs ``ee.loop.gate`` (bool [B]) and ``ee.loop.score`` (float32 [B]); input
   ``ee.loop.threshold`` (float32 scalar).

The graph is probed with ONNX Runtime at two batch sizes, which gives every output's dtype, shape and batch
axis; a fed-back output whose dtype, rank, fixed sizes or batch axis differ from the input it feeds is refused
(one SpecError naming ``loop.feedback``). Weights are stored once whatever the step count: the chain is the
same file for every step. :func:`plan_loop` returns the graph and the manifest's ``loop:`` record.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.tape import Tape

from eecompile.bundle import TensorInfo, feedback_mismatch
from eecompile.errors import GraphError, SpecError
from eecompile.names import LOOP_GATE, LOOP_NODE_PREFIX, LOOP_SCORE, LOOP_THRESHOLD
from eecompile.passes.gates import Ops, logit_gap_score
from eecompile.spec import LoopSpec

LOOP_FILE = "segments/loop.onnx"
_GATE_OPSET = 17  # a step graph made only for the gate


@dataclass
class LoopPlan:
    """The step graph (None when the loop has neither a step graph nor a gate) and the manifest record."""

    model: ir.Model | None
    record: dict[str, Any]


def plan_loop(loop: LoopSpec, inputs: list[TensorInfo], outputs: list[TensorInfo]) -> LoopPlan:
    """The step graph and ``manifest.loop`` for ``loop``, given the chain's model ``inputs`` and final
    ``outputs`` (the manifest's records).

    Raises:
        SpecError: a name the loop uses is not a model input, chain output, step graph tensor or step input; a
            fed-back output does not match its input (dtype, rank, fixed sizes, batch axis); a step input has a
            symbolic size other than the batch; a gate operand has the wrong rank.
        GraphError: the step graph cannot be read or run.
    """
    chain = {t.name: t for t in [*inputs, *outputs]}
    model_inputs = {t.name: t for t in inputs}
    step_names = {s.input for s in loop.inputs}
    model = _load_step(loop.step) if loop.step is not None else None
    if model is not None:
        _check_step_io(model, loop, chain, step_names)
    for out, inp in loop.feedback:
        if inp not in model_inputs:
            raise SpecError(f"loop.feedback.{out}: '{inp}' is not a model input; the model's inputs are "
                            f"{sorted(model_inputs)}")
    # The user's step graph first: a fed-back output that does not fit is refused before the gate reads it.
    records = _probe(model, chain) if model is not None else {}
    produced = {**{t.name: t for t in outputs}, **records.get("outputs", {})}
    for out, inp in loop.feedback:
        if out not in produced:
            raise SpecError(f"loop.feedback.{out}: '{out}' is neither the chain's output {[t.name for t in outputs]} "
                            f"nor an output of the step graph {sorted(records.get('outputs', {}))}")
        problem = feedback_mismatch(asdict(produced[out]), asdict(model_inputs[inp]))
        if problem:
            raise SpecError(f"loop.feedback.{out}: the fed-back output '{out}' does not fit the input '{inp}' it "
                            f"feeds at the next step ({problem}); make the step give '{inp}' back with its "
                            f"dtype and shape")
    if loop.gate is not None:
        if model is None:
            model = ir.Model(ir.Graph([], [], nodes=[], opset_imports={"": _GATE_OPSET}, name="loop"),
                             ir_version=8, producer_name="eecompile")
        _fuse_loop_gate(model, loop, chain)
        records = _probe(model, chain)
        produced.update(records["outputs"])
    if loop.commit is not None and loop.commit not in produced:
        raise SpecError(f"loop.commit: '{loop.commit}' is neither the chain's output nor an output of the step graph")
    for s in loop.inputs:
        t = model_inputs.get(s.input) or records.get("inputs", {}).get(s.input)
        if t is None:
            raise SpecError(f"loop.inputs.{s.input}: '{s.input}' is neither a model input nor a step graph input")
        odd = [d for i, d in enumerate(t.shape) if i != t.batch_axis and not isinstance(d, int)]
        if odd:
            raise SpecError(f"loop.inputs.{s.input}: shape {t.shape} has sizes other than the batch that are not "
                            f"fixed ({odd}); the runtime fills a per-step input, so export it with fixed sizes")
    results = [produced[out] for out, _ in loop.feedback]
    if loop.commit is not None and loop.commit not in [t.name for t in results]:
        results.append(produced[loop.commit])
    gate = None
    if loop.gate is not None:
        gate = {"kind": loop.gate.kind, "threshold": (float(loop.gate.threshold) if isinstance(loop.gate.threshold, (int, float))
                                                 else [float(v) for v in loop.gate.threshold]), "output": LOOP_GATE,
                "threshold_input": LOOP_THRESHOLD, "score_output": LOOP_SCORE}
    record = {
        "steps": loop.steps,
        "file": LOOP_FILE if model is not None else None,
        "inputs": [asdict(t) for t in records.get("inputs", {}).values()],
        "outputs": [asdict(t) for t in records.get("outputs", {}).values()],
        "feedback": [{"output": out, "input": inp} for out, inp in loop.feedback],
        "step_inputs": [{"input": s.input, "source": s.source,
                         **({"start": s.start, "end": s.end, "offset": s.offset} if s.source == "linspace" else {}),
                         **({"values": list(s.values), "offset": s.offset} if s.source == "table" else {})}
                        for s in loop.inputs],
        "gate": gate,
        "commit": loop.commit,
        "results": [asdict(t) for t in results],
    }
    return LoopPlan(model, record)


def _load_step(path: Path) -> ir.Model:
    from eecompile.passes.load import load_model

    try:
        return load_model(path)
    except GraphError as e:
        raise GraphError(f"loop.step: {e}") from e


def _check_step_io(model: ir.Model, loop: LoopSpec, chain: dict[str, TensorInfo], step_names: set[str]) -> None:
    g = model.graph
    for v in g.inputs:
        if v.name not in chain and v.name not in step_names:
            raise SpecError(f"loop.step: input '{v.name}' of {loop.step} is neither a model input, the chain's "
                            f"output ({', '.join(sorted(chain))}) nor a step input (loop.inputs); name it after "
                            f"the tensor it reads")
    for v in g.outputs:
        if v.name in chain:
            raise SpecError(f"loop.step: output '{v.name}' of {loop.step} has the name of a model input or the "
                            f"chain's output; give it its own name (e.g. '{v.name}_next')")


def _value(g: ir.Graph, name: str, chain: dict[str, TensorInfo], where: str) -> ir.Value:
    """The step graph's value named ``name``: a graph input, a node output, or a chain tensor made an input."""
    for v in g.inputs:
        if v.name == name:
            return v
    for node in g:
        for v in node.outputs:
            if v.name == name:
                return v
    t = chain.get(name)
    if t is None:
        raise SpecError(f"{where}: '{name}' is neither a model input, the chain's output nor a tensor of the step "
                        f"graph")
    v = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(np.dtype(t.dtype))),
                 shape=ir.Shape([d if d is not None else None for d in t.shape]))
    g.inputs.append(v)
    return v


def _rank(v: ir.Value, chain: dict[str, TensorInfo]) -> int | None:
    if v.name in chain:
        return len(chain[v.name or ""].shape)
    return len(v.shape) if v.shape is not None else None


def _fuse_loop_gate(model: ir.Model, loop: LoopSpec, chain: dict[str, TensorInfo]) -> None:
    gate = loop.gate
    assert gate is not None
    g = model.graph
    opset = g.opset_imports.get("", _GATE_OPSET)
    tape = Tape(g)
    ops = Ops(tape, opset, prefix=LOOP_NODE_PREFIX)
    where = "loop.gate"
    if gate.kind == "logit_gap":
        assert gate.logits is not None and gate.tokens is not None and gate.mask_id is not None
        logits = _value(g, gate.logits, chain, f"{where}.logits")
        tokens = _value(g, gate.tokens, chain, f"{where}.tokens")
        if _rank(logits, chain) not in (3, None) or _rank(tokens, chain) not in (2, None):
            raise SpecError(f"{where}: logit_gap reads logits [B, T, V] and tokens [B, T]; '{gate.logits}' has rank "
                            f"{_rank(logits, chain)} and '{gate.tokens}' rank {_rank(tokens, chain)}")
        mask_id = ops.const(np.array(gate.mask_id, dtype=np.int64))
        masked = ops.op("Equal", [ops.op("Cast", [tokens], {"to": ir.DataType.INT64}), mask_id])
        raw = logit_gap_score(ops, logits, masked, gate.reduce)
    elif gate.kind == "change":
        assert gate.of is not None
        inp = dict((o, i) for o, i in loop.feedback).get(gate.of)
        if inp is None:
            raise SpecError(f"{where}.of: '{gate.of}' is not a fed-back output (loop.feedback); the change gate "
                            f"compares a state with the state it replaces")
        new = ops.cast_float(_value(g, gate.of, chain, f"{where}.of"))
        old = ops.cast_float(_value(g, inp, chain, f"{where}.of"))
        flat = np.array([0, -1], dtype=np.int64)
        d = ops.op("Reshape", [ops.op("Sub", [new, old]), ops.const(flat)])
        o = ops.op("Reshape", [old, ops.const(flat)])
        num = ops.op("Sqrt", [ops.reduce("ReduceSum", ops.op("Mul", [d, d]), [1])])
        den = ops.op("Sqrt", [ops.reduce("ReduceSum", ops.op("Mul", [o, o]), [1])])
        raw = ops.op("Div", [num, ops.op("Add", [den, ops.const(np.array(1e-12, dtype=np.float32))])])
    else:
        assert gate.output is not None
        raw = ops.cast_float(ops.op("Reshape", [_value(g, gate.output, chain, f"{where}.output"),
                                                ops.const(np.array([-1], dtype=np.int64))]))
    score = ops.op("Identity", [raw], out_name=LOOP_SCORE)
    thr = ir.Value(name=LOOP_THRESHOLD, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT))
    fired = ops.ge(score, thr, LOOP_GATE) if gate.fires_above else ops.le(score, thr, LOOP_GATE)
    g.extend(tape.nodes)
    fired.dtype, fired.shape = ir.DataType.BOOL, ir.Shape(["batch"])
    score.dtype, score.shape = ir.DataType.FLOAT, ir.Shape(["batch"])
    g.inputs.append(thr)
    g.outputs.extend([fired, score])


def _feed(t: ir.Value, info: TensorInfo | None, b: int, rng: np.random.Generator) -> np.ndarray:
    shape: list[Any]
    if info is not None:
        dtype, shape, axis = np.dtype(info.dtype), list(info.shape), info.batch_axis
    else:
        dtype = np.dtype(t.dtype.numpy()) if t.dtype is not None else np.dtype(np.float32)
        shape = list(t.shape) if t.shape is not None else []
        axis = 0 if shape else None
    dims = [b if i == axis else (d if isinstance(d, int) else 8) for i, d in enumerate(shape)]
    if dtype.kind == "f":
        return rng.standard_normal(dims).astype(dtype)
    if dtype.kind == "b":
        return np.zeros(dims, dtype=bool)
    return np.zeros(dims, dtype=dtype)


def _probe(model: ir.Model, chain: dict[str, TensorInfo]) -> dict[str, dict[str, TensorInfo]]:
    """Run the step graph at batch 2 and 3 (random floats, zero integers): every input's and output's dtype,
    shape (``"batch"`` on the axis that follows the batch) and batch axis."""
    from eecompile.runtimes.sessions import import_onnxruntime, session_options

    ort = import_onnxruntime()
    g = model.graph
    data = ir.serde.serialize_model(model).SerializeToString()
    try:
        sess = ort.InferenceSession(data, session_options(1), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise GraphError(f"loop.step: ONNX Runtime cannot load the step graph ({str(e).splitlines()[0]}); check "
                         f"it runs on its own") from e
    rng = np.random.default_rng(0)
    names = [o.name for o in sess.get_outputs()]
    runs = []
    feeds_by_b = []
    for b in (2, 3):
        feeds = {}
        for v in g.inputs:
            if v.name == LOOP_THRESHOLD:
                feeds[v.name] = np.array(0.5, dtype=np.float32)
            else:
                feeds[v.name or ""] = _feed(v, chain.get(v.name or ""), b, rng)
        try:
            runs.append(dict(zip(names, sess.run(None, feeds), strict=True)))
        except Exception as e:
            raise GraphError(f"loop.step: the step graph fails on inputs shaped like the chain's "
                             f"({str(e).splitlines()[0]}); check its input names and shapes") from e
        feeds_by_b.append(feeds)

    def info(name: str, a2: np.ndarray, a3: np.ndarray) -> TensorInfo:
        axis = next((i for i, (x, y) in enumerate(zip(a2.shape, a3.shape, strict=False)) if (x, y) == (2, 3)), None)
        if a2.ndim != a3.ndim:
            raise GraphError(f"loop.step: output '{name}' changes rank with the batch size")
        shape: list[int | str | None] = [("batch" if i == axis else (x if x == y else None))
                                         for i, (x, y) in enumerate(zip(a2.shape, a3.shape, strict=True))]
        return TensorInfo(name=name, dtype=str(a2.dtype), shape=shape, batch_axis=axis)

    ins = {v.name or "": (chain[v.name or ""] if v.name in chain else
                          info(v.name or "", feeds_by_b[0][v.name or ""], feeds_by_b[1][v.name or ""]))
           for v in g.inputs if v.name != LOOP_THRESHOLD}
    outs = {n: info(n, runs[0][n], runs[1][n]) for n in names}
    return {"inputs": ins, "outputs": outs}


__all__ = ["LOOP_FILE", "LoopPlan", "plan_loop"]
