"""The YAML spec: which tensors to cut at, which head and gate each exit gets.

Parsed into frozen dataclasses. Every error names the YAML path (``exits[1].gate.kind``) and, where the
YAML has one, the line, and says what to do.

Example::

    model: resnet50.onnx
    exits:
      - at: layer2_out
        head: heads/exit0.onnx
        gate: {kind: max_prob, threshold: 0.9}
      - at: layer3_out
        head: {output: aux_logits}
        gate: {kind: entropy, threshold: 0.4}
    final: {output: logits, class_axis: -1}   # drop: [other model outputs the bundle leaves out]
    # final: {output: eps, task: regression}  # no class axis: only score and saturation gates
    # final: {outputs: [scores, boxes], gate_on: scores, end_only: [masks]}   # several model outputs
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from eecompile import names, safe_yaml
from eecompile.errors import SpecError
from eecompile.runtimes.base import threshold_problem


class GateKind(str, enum.Enum):
    """How an exit decides, per sample, that it is confident enough; p = softmax of the exit's logits over
    the class axis, C the number of classes. For outputs with several positions (tokens) the least confident
    position decides. Threshold ranges are checked by :meth:`GateSpec.check_threshold`, with the runtime's check
    (:func:`eecompile.runtimes.base.threshold_problem`); the infinity where a gate never fires (+inf; -inf for
    ``entropy`` and ``change``) is accepted too: "never exit here".

    - ``max_prob``: max_c p >= t, t in [0, 1] (the confidence of Shallow-Deep Networks, Kaya et al. 2019).
    - ``entropy``: -sum_c p log p / log C <= t, t in [0, 1] (BranchyNet, Teerapittayanon et al. 2016; DeeBERT,
      Xin et al. 2020), normalised so that t does not depend on C.
    - ``margin``: top-1 minus top-2 probability >= t, t in [0, 1] (CALM's "softmax response", Schuster et
      al. 2022).
    - ``patience``: the argmax has stayed the same for t consecutive exits, t >= 1 (PABEE, Zhou et al. 2020).
    - ``saturation``: cosine(h_prev, h_this) >= t between the pooled cut tensors of consecutive exits,
      any number t (the cosine lies in [-1, 1]; float rounding can put an observed one a hair above 1) (CALM's
      hidden-state saturation; MuE, Tang et al. 2023).
    - ``score``: a head output that is itself the exit score >= t (learned halting or confidence heads such as
      BERxiT, Xin et al. 2021; DeeDiff's uncertainty head, Tang et al. 2023); any real t.
    - ``change``: the relative L2 change of the exit's output from the previous exit's,
      ||y_k - y_{k-1}|| / ||y_k|| <= t, t in [0, inf] (a saturation test on the output itself; needs no class axis).
      The first exit has nothing to compare with and never fires.
    - ``q_exit``: PALBERT's Q-exit (Balagansky and Gavrilov 2022): the head's score output is a halting
      probability lambda_i in [0, 1]; the gate fires when the probability of having halted by this exit,
      1 - prod_{j<=i} (1 - lambda_j), is >= q, t in [0, 1]; the product rides along from exit to exit.
    """

    MAX_PROB = "max_prob"
    ENTROPY = "entropy"
    MARGIN = "margin"
    PATIENCE = "patience"
    SATURATION = "saturation"
    SCORE = "score"
    CHANGE = "change"
    Q_EXIT = "q_exit"

    @property
    def fires_above(self) -> bool:
        """True when a larger gate value means 'more confident' (the gate fires when value >= t)."""
        return self not in (GateKind.ENTROPY, GateKind.CHANGE)


HEAD_KINDS = ("linear", "mlp", "conv", "token", "local", "global")
JUMP_GATES = (GateKind.SATURATION, GateKind.SCORE)  # what a jump exit (no class scores) may gate on
HEAD_OPTIONS = ("hidden", "conv_channels", "pool", "seed", "score", "grid", "kernel")  # eecompile.heads' options
HEAD_SCORES = ("uncertainty", "agreement", "halting")  # the `score` option: a second head output that a gate reads

# Gates that need no class axis: the only ones accepted on a regression output (``final.task: regression``).
REGRESSION_GATES = (GateKind.SCORE, GateKind.SATURATION, GateKind.CHANGE, GateKind.Q_EXIT)
# Gates that read a score output of the head (``score_output``, or a built-in head's ``score`` option).
SCORE_GATES = (GateKind.SCORE, GateKind.Q_EXIT)


@dataclass(frozen=True)
class GateSpec:
    """An exit's gate: its ``kind`` and the ``threshold`` it compares the gate value with (unitless; the
    range depends on the kind, see :class:`GateKind`). The threshold is only the default: it is a graph input,
    and calibration or ``run --thresholds`` replace it."""

    kind: GateKind
    threshold: float
    # saturation: the tensor the first exit compares its cut tensor with (MuE: the embedding output), where
    # there is no earlier exit to compare with
    against: str | None = None

    def check_threshold(self, value: float, where: str) -> None:
        """Raise SpecError (naming ``where``) when ``value`` is not a threshold of the kind: NaN, outside its range,
        or a non-integer patience (:func:`eecompile.runtimes.base.threshold_problem`, the runtime's own check)."""
        problem = threshold_problem(self.kind.value, value)
        if problem is not None:
            raise SpecError(f"{where}: {problem}")


@dataclass(frozen=True)
class HeadSpec:
    """One of: an ONNX file (``file``), a model output computed from the cut (``output``), or a head that
    eecompile makes and trains (``kind`` in linear|mlp|conv|token, with ``options``)."""

    file: Path | None = None
    output: str | None = None
    kind: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    score_output: str | None = None  # for the `score` gate: the head output that is the exit score

    def describe(self) -> str:
        """How the manifest records the head: ``file:NAME``, ``model-output:NAME`` or ``trained:KIND``."""
        if self.file is not None:
            return f"file:{self.file.name}"
        if self.output is not None:
            return f"model-output:{self.output}"
        return f"trained:{self.kind}"


@dataclass(frozen=True)
class ExitSpec:
    """One early exit: the tensors it cuts at (``at``: the cut tensor first, then any extra tensors the head
    reads, such as an attention mask), its head, its gate and an optional display name."""

    at: tuple[str, ...]
    head: HeadSpec
    gate: GateSpec
    name: str | None = None
    # A jump exit (MuE's encoder exits): the head gives this tensor's value (e.g. the encoder output), and a
    # sample that fires continues at the segment that starts from it instead of ending.
    jump: str | None = None

    @property
    def tensor(self) -> str:
        """The cut tensor (``at[0]``)."""
        return self.at[0]


@dataclass(frozen=True)
class FinalSpec:
    """The model outputs the bundle returns: ``output``, the one every exit stands in for and its gate reads
    (with the axis that holds its classes, counted with the batch as axis 0; negative from the end), then
    ``others``: further model outputs (YAML ``outputs: [scores, boxes, classes]`` with ``gate_on: scores``,
    default the first). An exit gives each of ``others`` from its head file (an output named after it) unless
    it is in ``end_only``: computed for the samples that reach the final exit and absent for the others."""

    output: str | None = None  # default: the model's only output
    class_axis: int | None = None  # default: the last axis longer than 1 ([N, C, 1, 1] -> 1, [N, T, C] -> -1)
    # Model outputs the bundle leaves out (no exit gives them a value). Every other model output must be a
    # final output or an exit head's output inside the model: compile refuses a spec that leaves one undefined.
    drop: tuple[str, ...] = ()
    others: tuple[str, ...] = ()  # further final outputs, in the order given (end_only ones included)
    end_only: tuple[str, ...] = ()  # final outputs that only the final exit gives (absent for early exits)
    # "classification" (an axis of class scores) or "regression" (no class axis: predicted noise, a depth map,
    # an embedding): there only gates that need no classes are accepted (see REGRESSION_GATES).
    task: str = "classification"


TASKS = ("classification", "regression")


@dataclass(frozen=True)
class Spec:
    """A parsed spec: the ONNX ``model`` (resolved against the spec's folder), the early ``exits`` in graph
    order, the ``final`` output, and the spec file it came from (None when parsed from text)."""

    model: Path
    exits: tuple[ExitSpec, ...]
    final: FinalSpec = FinalSpec()
    source: Path | None = None  # the spec file, when loaded from one
    loop: LoopSpec | None = None  # an iterative model: the chain run repeatedly on its own state

    @property
    def thresholds(self) -> list[float]:
        """The default threshold of each early exit, in order."""
        return [e.gate.threshold for e in self.exits]


# --------------------------------------------------------------------------------------------- loops

LOOP_GATE_KINDS = names.LOOP_GATE_KINDS
"""Gates that end a sample's loop after a step (see :class:`LoopGateSpec`)."""

STEP_SOURCES = ("step", "steps", "linspace", "table")
"""Where the runtime takes a per-step input from (see :class:`StepInputSpec`)."""


@dataclass(frozen=True)
class StepInputSpec:
    """A model (or step graph) input the runtime feeds at every step ``i`` of ``N`` (``N`` chosen at run time):

    - ``step``: ``i`` (0-based);
    - ``steps``: ``N``;
    - ``linspace``: ``start + (end - start) * (i + offset) / N`` (``offset`` 0: the step's own time, 1: the next
      step's), e.g. a diffusion time that goes from ``start`` at the first step to ``end`` after the last;
    - ``table``: a schedule stored in the bundle, read at the same position: ``values[round((i + offset) / N *
      (len(values) - 1))]`` (a table of N + 1 entries is read entry by entry; another N resamples it).

    Integer inputs get the value rounded to the nearest integer; an input with a batch axis gets the same value
    in every row."""

    input: str
    source: str
    start: float = 0.0
    end: float = 0.0
    offset: int = 0
    values: tuple[float, ...] = ()


@dataclass(frozen=True)
class LoopGateSpec:
    """The gate after each step that ends a sample's loop (one bool per sample, threshold a graph input):

    - ``logit_gap`` (Prophet, Li et al. 2025, "Diffusion language models know the answer before decoding"): the
      gap between the top-2 *logits* (not probabilities) of ``logits`` [B, T, V], averaged (``reduce: mean``,
      default) or its minimum taken (``reduce: min``) over the positions still masked (``tokens`` [B, T] equal
      to ``mask_id``) >= t; a sample with no masked position left always stops. t >= 0.
    - ``change``: relative change of a fed-back state, ||new - old|| / ||old|| (L2 over each sample, ``of``
      names the step output) <= t: the sampler has converged. t >= 0.
    - ``score``: a step output (``output``, [B] or [B, 1]) that is itself the stopping score >= t.

    NaN scores never stop a sample. ``threshold``: one number for every step, or a tuple of S numbers, a *staged*
    threshold (Prophet's: a stricter one early in decoding, a looser one late): step i of N uses stage
    ``min(S - 1, i * S // N)`` (the steps split evenly into S stages; :func:`eecompile.runtimes.loop.stage_of`)."""

    kind: str
    threshold: float | tuple[float, ...]
    logits: str | None = None
    tokens: str | None = None
    mask_id: int | None = None
    reduce: str = "mean"
    of: str | None = None
    output: str | None = None

    @property
    def fires_above(self) -> bool:
        """True when the gate stops a sample whose score is >= the threshold (``change`` stops at <=)."""
        return self.kind != "change"


@dataclass(frozen=True)
class LoopSpec:
    """An iterative model: the chain compiled from ``model`` (with its layer exits) runs ``steps`` times (the
    default; chosen at run time), each step feeding ``feedback`` outputs back as inputs (output name -> input
    name). ``step`` is an optional ONNX graph run after the chain at every step (a sampler's update, a diffusion
    LM's unmasking), reading chain inputs, chain outputs and step inputs by name. ``inputs`` are fed by the
    runtime at every step; ``gate`` (optional) ends a sample's loop early; its result is then the ``commit``
    output of that step when given (e.g. every still-masked token filled at once), else the fed-back outputs."""

    feedback: tuple[tuple[str, str], ...]
    steps: int
    step: Path | None = None
    inputs: tuple[StepInputSpec, ...] = ()
    gate: LoopGateSpec | None = None
    commit: str | None = None


def _choice(node: _Node, choices: tuple[str, ...], path: str, what: str) -> str:
    """A string that must be one of ``choices``; SpecError naming ``path`` with the closest one otherwise."""
    value = _string(node, path)
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(choices)}"
        raise SpecError(f"{_at(path, node)}: unknown {what} '{_show(value)}'; {hint}")
    return value


def _parse_step_input(name: str, node: _Node, path: str) -> StepInputSpec:
    if isinstance(node.value, str):
        node = _Node({"source": node}, node.line)
    m = _mapping(node, path)
    _check_keys(node, ("source", "start", "end", "offset", "values"), path)
    if "source" not in m:
        raise SpecError(f"{_at(path, node)}: missing 'source' (one of {', '.join(STEP_SOURCES)})")
    source = _choice(m["source"], STEP_SOURCES, f"{path}.source", "step input source")
    if source == "linspace":
        for k in ("start", "end"):
            if k not in m:
                raise SpecError(f"{_at(path, node)}: source 'linspace' needs '{k}'")
    elif any(k in m for k in ("start", "end")) or ("offset" in m and source != "table"):
        raise SpecError(f"{_at(path, node)}: 'start', 'end' and 'offset' belong to source 'linspace' ('offset' to "
                        f"'table' too), not '{source}'")
    values: tuple[float, ...] = ()
    if source == "table":
        vn = m.get("values")
        if vn is None or not isinstance(vn.value, list) or not vn.value:
            raise SpecError(f"{_at(path, vn or node)}: source 'table' needs 'values', a non-empty list of numbers")
        values = tuple(_number(v, f"{path}.values[{j}]") for j, v in enumerate(vn.value))
    elif "values" in m:
        raise SpecError(f"{_at(path + '.values', m['values'])}: 'values' belongs to source 'table', not '{source}'")
    offset = 0
    if "offset" in m:
        v = m["offset"].value
        if isinstance(v, bool) or v not in (0, 1):
            raise SpecError(f"{_at(path + '.offset', m['offset'])}: offset is 0 (this step) or 1 (the next step), "
                            f"got {_plain(v)!r}")
        offset = int(v)
    return StepInputSpec(name, source, _number(m["start"], f"{path}.start") if "start" in m else 0.0,
                         _number(m["end"], f"{path}.end") if "end" in m else 0.0, offset, values)


def _parse_loop_gate(node: _Node, path: str) -> LoopGateSpec:
    m = _mapping(node, path)
    _check_keys(node, ("kind", "threshold", "logits", "tokens", "mask_id", "reduce", "of", "output"), path)
    if "kind" not in m:
        raise SpecError(f"{_at(path, node)}: missing 'kind' (one of {', '.join(LOOP_GATE_KINDS)})")
    kind = _choice(m["kind"], LOOP_GATE_KINDS, f"{path}.kind", "loop gate kind")
    if "threshold" not in m:
        raise SpecError(f"{_at(path, node)}: missing 'threshold'")
    thr: float | tuple[float, ...]
    tn = m["threshold"]
    if isinstance(tn.value, list):  # a staged threshold: one value per stage of the loop's progress
        if not tn.value:
            raise SpecError(f"{_at(f'{path}.threshold', tn)}: a staged threshold needs at least one value "
                            f"(e.g. [7.5, 5.0, 2.5]: early, middle and late steps)")
        thr = tuple(_number(v, f"{path}.threshold[{j}]") for j, v in enumerate(tn.value))
        for j, (v, vn) in enumerate(zip(thr, tn.value, strict=True)):
            check_loop_threshold(kind, v, _at(f"{path}.threshold[{j}]", vn))
    else:
        thr = _number(tn, f"{path}.threshold")
        check_loop_threshold(kind, thr, _at(f"{path}.threshold", tn))
    needs = {"logit_gap": ("logits", "tokens", "mask_id"), "change": ("of",), "score": ("output",)}[kind]
    for k in needs:
        if k not in m:
            raise SpecError(f"{_at(path, node)}: loop gate '{kind}' needs '{k}'")
    extra = [k for k in ("logits", "tokens", "mask_id", "reduce", "of", "output")
             if k in m and k not in needs and not (kind == "logit_gap" and k == "reduce")]
    if extra:
        raise SpecError(f"{_at(path + '.' + extra[0], m[extra[0]])}: '{extra[0]}' is not an option of loop gate "
                        f"'{kind}' (it takes {', '.join(needs)})")
    mask_id = None
    if "mask_id" in m:
        v = m["mask_id"].value
        if isinstance(v, bool) or not isinstance(v, int):
            raise SpecError(f"{_at(path + '.mask_id', m['mask_id'])}: expected the integer id of the mask token, "
                            f"got {_plain(v)!r}")
        mask_id = v
    reduce = _string(m["reduce"], f"{path}.reduce") if "reduce" in m else "mean"
    if reduce not in ("mean", "min"):
        raise SpecError(f"{_at(path + '.reduce', m['reduce'])}: reduce is 'mean' or 'min', got '{_show(reduce)}'")
    names = {k: _string(m[k], f"{path}.{k}") for k in ("logits", "tokens", "of", "output") if k in m}
    return LoopGateSpec(kind, thr, mask_id=mask_id, reduce=reduce, **names)


def check_loop_threshold(kind: str, value: float, where: str) -> None:
    """Raise SpecError (naming ``where``) when ``value`` is not a threshold of loop gate ``kind``
    (:func:`eecompile.runtimes.base.threshold_problem`, the runtime's own check)."""
    problem = threshold_problem(kind, value)
    if problem is not None:
        raise SpecError(f"{where}: {problem}")


def _parse_loop(node: _Node, base: Path) -> LoopSpec:
    m = _mapping(node, "loop")
    _check_keys(node, ("feedback", "steps", "step", "inputs", "gate", "commit"), "loop")
    for k in ("feedback", "steps"):
        if k not in m:
            raise SpecError(f"{_at('loop', node)}: missing '{k}'")
    fb = _mapping(m["feedback"], "loop.feedback")
    if not fb:
        raise SpecError(f"{_at('loop.feedback', m['feedback'])}: name at least one pair 'step output: input it "
                        f"feeds at the next step'")
    feedback = tuple((out, _string(v, f"loop.feedback.{_show(out)}")) for out, v in fb.items())
    seen: dict[str, str] = {}
    for out, inp in feedback:
        if inp in seen:
            raise SpecError(f"{_at(f'loop.feedback.{_show(out)}', fb[out])}: input '{_show(inp)}' is already fed "
                            f"back from '{_show(seen[inp])}'; each input takes one output")
        seen[inp] = out
    steps_v = m["steps"].value
    if isinstance(steps_v, bool) or not isinstance(steps_v, int) or steps_v < 1:
        raise SpecError(f"{_at('loop.steps', m['steps'])}: expected a positive integer (the default step count; "
                        f"`run --steps N` chooses another), got {_plain(steps_v)!r}")
    step = base / _string(m["step"], "loop.step") if "step" in m else None
    inputs: tuple[StepInputSpec, ...] = ()
    if "inputs" in m:
        im = _mapping(m["inputs"], "loop.inputs")
        inputs = tuple(_parse_step_input(name, v, f"loop.inputs.{_show(name)}") for name, v in im.items())
        for si in inputs:
            if si.input in seen:
                raise SpecError(f"{_at(f'loop.inputs.{_show(si.input)}', im[si.input])}: '{_show(si.input)}' is "
                                f"fed back from '{_show(seen[si.input])}'; an input is fed back or fed per step, "
                                f"not both")
    gate = _parse_loop_gate(m["gate"], "loop.gate") if "gate" in m else None
    commit = _string(m["commit"], "loop.commit") if "commit" in m else None
    return LoopSpec(feedback=feedback, steps=int(steps_v), step=step, inputs=inputs, gate=gate, commit=commit)


# --------------------------------------------------------------------------------------------- parsing


class _Node:
    """A YAML value with the line it came from (1-based), so errors can point at it."""

    __slots__ = ("value", "line")

    def __init__(self, value: Any, line: int | None) -> None:
        self.value = value
        self.line = line


def _convert(node: yaml.Node, memo: dict[int, _Node] | None = None,
             scalars: yaml.constructor.SafeConstructor | None = None) -> _Node:
    """The composed YAML ``node`` as _Node values. A node shared through an alias is converted once
    (``memo``), so the cost is linear in the distinct nodes whatever the aliases expand to."""
    memo = {} if memo is None else memo
    scalars = yaml.constructor.SafeConstructor() if scalars is None else scalars
    if id(node) in memo:
        return memo[id(node)]
    line = node.start_mark.line + 1 if node.start_mark is not None else None
    if node.tag and not node.tag.startswith("tag:yaml.org,2002:"):
        raise SpecError(f"line {line}: unsupported YAML tag '{_show(node.tag)}'; use plain mappings, lists and "
                        f"scalars, without tags")
    if node.tag and node.tag.startswith("tag:yaml.org,2002:python/"):
        raise SpecError(f"line {line}: unsupported YAML tag '{_show(node.tag)}'; use plain mappings, lists and "
                        f"scalars, without tags")
    if isinstance(node, yaml.MappingNode):
        out: dict[str, _Node] = {}
        for k, v in node.value:
            key = scalars.construct_object(k, deep=True) if not isinstance(k, yaml.ScalarNode) else k.value
            out[str(key)] = _convert(v, memo, scalars)
        result = _Node(out, line)
    elif isinstance(node, yaml.SequenceNode):
        result = _Node([_convert(v, memo, scalars) for v in node.value], line)
    else:
        # Scalars: the safe constructor resolves the type (int, float, bool, null, str).
        result = _Node(scalars.construct_object(node), line)
    memo[id(node)] = result
    return result


def _show(text: str) -> str:
    """A user-supplied name, safe to put in a one-line message (newlines and control characters escaped)."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _at(path: str, node: _Node | None) -> str:
    if node is not None and node.line is not None:
        return f"{path} (line {node.line})"
    return path


def _check_keys(node: _Node, allowed: tuple[str, ...], path: str) -> None:
    for key, val in node.value.items():
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"allowed keys: {', '.join(allowed)}"
            shown = _show(key)
            raise SpecError(f"{_at(f'{path}.{shown}' if path else shown, val)}: unknown key '{shown}'; {hint}")


def _mapping(node: _Node, path: str) -> dict[str, _Node]:
    if not isinstance(node.value, dict):
        raise SpecError(f"{_at(path, node)}: expected a mapping, got {type(node.value).__name__}")
    return node.value


def _plain(value: Any) -> Any:
    """A parsed value without the line bookkeeping, for messages."""
    if isinstance(value, _Node):
        return _plain(value.value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _names(m: Mapping[str, _Node], key: str) -> tuple[str, ...]:
    """``final.<key>``: a list of model output names (empty when absent); repeats are refused."""
    if key not in m:
        return ()
    node = m[key]
    if not isinstance(node.value, list):
        raise SpecError(f"{_at(f'final.{key}', node)}: expected a list of model output names, got {_plain(node.value)!r}")
    got = tuple(_string(v, f"final.{key}[{i}]") for i, v in enumerate(node.value))
    twice = sorted({n for n in got if got.count(n) > 1})
    if twice:
        raise SpecError(f"{_at(f'final.{key}', node)}: {twice} listed twice")
    return got


def _string(node: _Node, path: str) -> str:
    if not isinstance(node.value, str) or not node.value:
        raise SpecError(f"{_at(path, node)}: expected a non-empty string, got {_plain(node.value)!r}")
    return node.value


def _number(node: _Node, path: str) -> float:
    v = node.value
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SpecError(f"{_at(path, node)}: expected a number, got {_plain(v)!r}")
    return float(v)


def _parse_gate(node: _Node, path: str) -> GateSpec:
    m = _mapping(node, path)
    _check_keys(node, ("kind", "threshold", "against"), path)
    if "kind" not in m:
        raise SpecError(f"{_at(path, node)}: missing 'kind' (one of {', '.join(k.value for k in GateKind)})")
    kind_s = _string(m["kind"], f"{path}.kind")
    try:
        kind = GateKind(kind_s)
    except ValueError:
        names = [k.value for k in GateKind]
        close = difflib.get_close_matches(kind_s, names, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(names)}"
        raise SpecError(f"{_at(path + '.kind', m['kind'])}: unknown gate kind '{_show(kind_s)}'; {hint}") from None
    if "threshold" not in m:
        raise SpecError(f"{_at(path, node)}: missing 'threshold'")
    thr = _number(m["threshold"], f"{path}.threshold")
    against = None
    if "against" in m:
        against = _string(m["against"], f"{path}.against")
        if kind != GateKind.SATURATION:
            raise SpecError(f"{_at(path + '.against', m['against'])}: 'against' names the tensor a saturation gate "
                            f"compares with; gate kind '{kind.value}' compares nothing: remove it")
    gate = GateSpec(kind, thr, against)
    gate.check_threshold(thr, _at(f"{path}.threshold", m["threshold"]))
    return gate


def _parse_head(node: _Node, path: str, base: Path) -> HeadSpec:
    if isinstance(node.value, str):
        return HeadSpec(file=(base / node.value))
    m = _mapping(node, path)
    _check_keys(node, ("file", "output", "kind", "options", "score_output"), path)
    given = [k for k in ("file", "output", "kind") if k in m]
    if len(given) != 1:
        raise SpecError(
            f"{_at(path, node)}: a head needs exactly one of 'file' (an ONNX head), 'output' (a model output "
            f"computed from the cut) or 'kind' ({'|'.join(HEAD_KINDS)}: a head eecompile trains); got {given or 'none'}"
        )
    score = _string(m["score_output"], f"{path}.score_output") if "score_output" in m else None
    if "file" in m:
        return HeadSpec(file=base / _string(m["file"], f"{path}.file"), score_output=score)
    if "output" in m:
        return HeadSpec(output=_string(m["output"], f"{path}.output"), score_output=score)
    kind = _string(m["kind"], f"{path}.kind")
    if kind not in HEAD_KINDS:
        close = difflib.get_close_matches(kind, HEAD_KINDS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(HEAD_KINDS)}"
        raise SpecError(f"{_at(path + '.kind', m['kind'])}: unknown head kind '{_show(kind)}'; {hint}")
    opts: dict[str, Any] = {}
    if "options" in m:
        _mapping(m["options"], f"{path}.options")
        _check_keys(m["options"], HEAD_OPTIONS, f"{path}.options")
        opts = {k: v.value for k, v in _mapping(m["options"], f"{path}.options").items()}
    return HeadSpec(kind=kind, options=opts, score_output=score)


def _parse_exit(node: _Node, path: str, base: Path) -> ExitSpec:
    m = _mapping(node, path)
    _check_keys(node, ("at", "head", "gate", "name", "jump"), path)
    for key in ("at", "head", "gate"):
        if key not in m:
            raise SpecError(f"{_at(path, node)}: missing '{key}'")
    at_node = m["at"]
    if isinstance(at_node.value, list):
        if not at_node.value:
            raise SpecError(f"{_at(path + '.at', at_node)}: empty list; name the tensor to cut at")
        at = tuple(_string(v, f"{path}.at[{i}]") for i, v in enumerate(at_node.value))
    else:
        at = (_string(at_node, f"{path}.at"),)
    name = _string(m["name"], f"{path}.name") if "name" in m else None
    head, gate = _parse_head(m["head"], f"{path}.head", base), _parse_gate(m["gate"], f"{path}.gate")
    jump = None
    if "jump" in m:
        jump = _string(m["jump"], f"{path}.jump")
        if gate.kind not in JUMP_GATES:
            raise SpecError(f"{_at(path + '.gate.kind', m['gate'])}: a jump exit's head gives '{_show(jump)}', not "
                            f"the final output, so its gate cannot read class scores; use "
                            f"{' or '.join(k.value for k in JUMP_GATES)}")
        if head.kind is not None:
            raise SpecError(f"{_at(path + '.head', m['head'])}: a jump exit takes a head file or an in-model head "
                            f"(head: {{output: ...}}) giving '{_show(jump)}'; trained heads give the final output")
    return ExitSpec(at=at, head=head, gate=gate, name=name, jump=jump)


def parse_spec(text: str, base: Path | str = ".", source: Path | None = None) -> Spec:
    """Parse spec YAML text into a :class:`Spec`; relative paths (model, head files) resolve against ``base``,
    and ``source`` (the spec file) is named in errors.

    Raises:
        SpecError: YAML syntax errors, tags, unknown or missing keys, wrong types, thresholds out of range, two
            exits at one tensor; the message names the YAML path and line and what to do.
    """
    base = Path(base)
    where = str(source) if source is not None else "spec"
    try:
        root = safe_yaml.compose(text, SpecError, where, "spec", max_nodes=safe_yaml.SPEC_MAX_NODES)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
        if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow, e.g. a control character
            char = chr(e.character) if isinstance(e.character, int) else e.character
            problem = f"character {char!r} at position {e.position} is not allowed ({e.reason})"
        else:
            problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
        raise SpecError(f"{where}:{line} YAML syntax error: {problem}; fix the YAML") from e
    if root is None:
        raise SpecError(f"{where}: the spec is empty; it needs 'model' and 'exits'")
    try:
        top = _convert(root)
    except SpecError as e:
        raise SpecError(f"{where}: {e}") from None
    except yaml.YAMLError as e:  # e.g. a tag the safe loader refuses (!!python/object) or cannot serialise
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = f" line {mark.line + 1}:" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
        raise SpecError(f"{where}:{line} unsupported YAML ({_show(problem)}); use plain mappings, lists and "
                        f"scalars, without tags") from e
    m = _mapping(top, "spec")
    _check_keys(top, ("model", "exits", "final", "loop"), "")
    if "model" not in m:
        raise SpecError(f"{where}: missing 'model' (the path of the ONNX model, relative to the spec)")
    model = base / _string(m["model"], "model")
    loop = _parse_loop(m["loop"], base) if "loop" in m else None
    if loop is not None and "exits" not in m:
        m["exits"] = _Node([], top.line)  # a loop needs no layer exits: its gate ends the loop
    if "exits" not in m or not isinstance(m["exits"].value, list) or (not m["exits"].value and loop is None):
        raise SpecError(f"{_at('exits', m.get('exits'))}: 'exits' must be a non-empty list of exits")
    exits = tuple(_parse_exit(node, f"exits[{i}]", base) for i, node in enumerate(m["exits"].value))
    seen: dict[str, int] = {}
    for i, ex in enumerate(exits):
        if ex.tensor in seen:
            raise SpecError(
                f"exits[{i}].at: tensor '{_show(ex.tensor)}' is already the cut of exits[{seen[ex.tensor]}]; "
                f"each exit needs its own cut tensor"
            )
        seen[ex.tensor] = i
    final = FinalSpec()
    if "final" in m:
        fm = _mapping(m["final"], "final")
        _check_keys(m["final"], ("output", "outputs", "gate_on", "end_only", "class_axis", "drop", "task"), "final")
        out = _string(fm["output"], "final.output") if "output" in fm else None
        drop = _names(fm, "drop")
        listed = _names(fm, "outputs")
        end_only = _names(fm, "end_only")
        if "outputs" in fm and "output" in fm:
            raise SpecError(f"{_at('final.outputs', fm['outputs'])}: give final.output (one output) or final.outputs "
                            f"(several, with gate_on naming the one the gates read), not both")
        if "outputs" in fm and not listed:
            raise SpecError(f"{_at('final.outputs', fm['outputs'])}: list at least one model output")
        if "gate_on" in fm:
            if "outputs" not in fm:
                raise SpecError(f"{_at('final.gate_on', fm['gate_on'])}: gate_on picks one of final.outputs; with one "
                                f"output use final.output")
            out = _string(fm["gate_on"], "final.gate_on")
            if out not in listed:
                raise SpecError(f"{_at('final.gate_on', fm['gate_on'])}: '{_show(out)}' is not in final.outputs "
                                f"{list(listed)}")
        elif listed:
            out = listed[0]
        if out is not None and out in end_only:
            raise SpecError(f"{_at('final.end_only', fm['end_only'])}: '{_show(out)}' is the output the gates read; "
                            f"every exit gives it, so it cannot be end-only")
        for key, names_ in (("outputs", listed), ("end_only", end_only)):
            twice = sorted({n for n in names_ if n in drop})
            if twice:
                raise SpecError(f"{_at(f'final.{key}', fm[key])}: {twice} are also in final.drop; an output is either "
                                f"returned or dropped")
        others = tuple(dict.fromkeys(n for n in (*listed, *end_only) if n != out))
        axis: int | None = None
        if "class_axis" in fm:
            v = fm["class_axis"].value
            if isinstance(v, bool) or not isinstance(v, int):
                raise SpecError(f"{_at('final.class_axis', fm['class_axis'])}: expected an integer axis, got {_plain(v)!r}")
            axis = v
        task = "classification"
        if "task" in fm:
            task = _string(fm["task"], "final.task")
            if task not in TASKS:
                raise SpecError(f"{_at('final.task', fm['task'])}: unknown task '{_show(task)}'; one of "
                                f"{', '.join(TASKS)}")
        if task == "regression":
            if axis is not None:
                raise SpecError(f"{_at('final.class_axis', fm['class_axis'])}: a regression output has no class "
                                f"axis; remove class_axis or set task: classification")
            for i, node in enumerate(m["exits"].value):
                kind = exits[i].gate.kind
                if kind not in REGRESSION_GATES:
                    gate = _mapping(node, f"exits[{i}]")["gate"]
                    raise SpecError(
                        f"{_at(f'exits[{i}].gate.kind', gate)}: '{kind.value}' needs a class axis (class "
                        f"probabilities or the argmax), and final.task is regression (the final output has no class axis); use "
                        f"{' or '.join(k.value for k in REGRESSION_GATES)} (a score head's score_output, or the "
                        f"change between consecutive exits' features)")
        final = FinalSpec(output=out, class_axis=axis, drop=drop, task=task, others=others, end_only=end_only)
    _check_head_scores(exits, m["exits"].value, final.task)
    return Spec(model=model, exits=exits, final=final, source=source, loop=loop)


def _check_head_scores(exits: tuple[ExitSpec, ...], nodes: list[_Node], task: str) -> None:
    """A built-in head's ``score`` option fits the task (``uncertainty`` predicts a regression exit's error,
    ``agreement`` whether a classifier exit agrees with the final exit), is not given twice (with
    ``score_output``), and the gates reading a score have one."""
    for i, (e, node) in enumerate(zip(exits, nodes, strict=True)):
        score = e.head.options.get("score") if e.head.kind else None
        head = _mapping(_mapping(node, f"exits[{i}]")["head"], f"exits[{i}].head") if e.head.kind else {}
        where = _at(f"exits[{i}].head.options.score", head["options"].value.get("score")) if score is not None else ""
        if score is not None and score not in HEAD_SCORES:
            raise SpecError(f"{where}: unknown score '{_show(str(score))}'; one of {', '.join(HEAD_SCORES)}")
        want = "uncertainty" if task == "regression" else "agreement"
        if score is not None and score != want and not (score == "halting" and task != "regression"):
            raise SpecError(f"{where}: score '{score}' is for {'regression' if score == 'uncertainty' else 'classification'} "
                            f"outputs and final.task is {task}; use score: {want}")
        if score == "halting" and e.gate.kind != GateKind.Q_EXIT:
            raise SpecError(f"{where}: score 'halting' is PALBERT's halting probability lambda, which a q_exit gate "
                            f"reads; this exit's gate is '{e.gate.kind.value}' (use score: agreement for a learned "
                            f"confidence)")
        if score is not None and e.head.score_output is not None:
            raise SpecError(f"{where}: the head makes its own score; remove score_output or the score option")
    # PALBERT's lambdas share one halting distribution, over one run of Q-exits (the survival product does not
    # cross an exit of another kind): train-heads refused the gap only after the compile.
    halting = [i for i, e in enumerate(exits) if e.head.kind and e.head.options.get("score") == "halting"]
    gap = next((i for i in range(halting[0], halting[-1] + 1) if i not in halting), None) if halting else None
    if gap is not None:
        raise SpecError(f"{_at(f'exits[{gap}]', nodes[gap])}: this exit lies between exits with score: halting "
                        f"({halting}) and has none; PALBERT's lambdas are trained over one run of exits: give it a "
                        f"built-in head with options {{score: halting}} and a q_exit gate, or move it")


def load_spec(path: str | Path) -> Spec:
    """Read and parse the spec file at ``path`` (see :func:`parse_spec`); SpecError if it cannot be read."""
    path = Path(path)
    try:
        text = safe_yaml.read_yaml_text(path, SpecError, "spec")
    except FileNotFoundError:
        raise SpecError(f"{path}: spec file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: cannot read the spec ({e})") from e
    return parse_spec(text, base=path.parent, source=path)


def parse_thresholds(text: str, n_exits: int) -> list[float | str]:
    """Parse a CLI threshold list like ``0.9,never,always`` (one entry per early exit): numbers, or ``never`` /
    ``always``. Raises SpecError for a wrong count or an entry that is neither; ranges are checked later, per
    gate kind, by the runtime."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) != n_exits:
        raise SpecError(f"--thresholds: got {len(parts)} values for {n_exits} early exits; give one per exit")
    out: list[float | str] = []
    for p in parts:
        if p in ("never", "always"):
            out.append(p)
            continue
        try:
            out.append(float(p))
        except ValueError:
            raise SpecError(f"--thresholds: '{p}' is neither a number nor 'never'/'always'") from None
    return out
