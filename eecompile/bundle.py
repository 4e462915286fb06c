"""Bundle read/write: a directory with ``manifest.yaml``, ``segments/seg{i}.onnx`` and engine files.

Writes are atomic: everything goes to a temporary directory beside the destination, which then replaces
the destination in one step (``renameat2(RENAME_EXCHANGE)`` on Linux, two renames elsewhere). A failed or
killed write leaves any earlier bundle untouched. Every file's sha256 is in the manifest and checked on load.

This module must import with numpy + pyyaml alone (the embedded runtime reads bundles on a Jetson).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from eecompile import names, safe_yaml
from eecompile.errors import BundleError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.yaml"
SIGNATURE = "bundle.sig"  # written by `eecompile sign`; outside the manifest's hashed set (see eecompile.signing)


@dataclass
class TensorInfo:
    """A tensor crossing a segment boundary (or a model input/output): its ``name``, numpy ``dtype`` name
    (``"float32"``, ``"int64"``, ``"bool"``...) and ``shape`` (ints for fixed axes, the symbol's name as a str
    for symbolic ones such as ``"batch"`` or a sequence length, None where unknown). ``batch_axis`` is the axis
    along which samples are stacked (measured by the compiler's probe), or None for a tensor whose value does
    not depend on the batch."""

    name: str
    dtype: str
    shape: list[int | str | None]
    batch_axis: int | None = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorInfo:
        """From the manifest's mapping (KeyError for a missing field)."""
        return cls(name=d["name"], dtype=d["dtype"], shape=list(d["shape"]), batch_axis=d.get("batch_axis"))


@dataclass
class GateInfo:
    """An exit's in-graph gate: its ``kind`` (a :class:`~eecompile.spec.GateKind` value), the ``threshold`` in
    use (set by the spec, then by calibration), and the names of its tensors in the segment graph: ``output``
    (bool [B], True where the sample exits), ``threshold_input`` (float32 scalar, fed at run time),
    ``score_output`` (float32 [B], the value compared with the threshold), and the state it reads from the
    previous exit and hands to the next (patience: argmax and count; saturation: the pooled hidden state).
    Names follow :mod:`eecompile.names`."""

    kind: str
    threshold: float
    output: str  # bool [B] output of the segment graph: True = this sample exits here
    threshold_input: str  # scalar float32 input of the segment graph
    score_output: str | None = None  # float [B] gate value (the thing compared with the threshold)
    state_inputs: list[str] = field(default_factory=list)  # e.g. patience: previous argmax and count
    state_outputs: list[str] = field(default_factory=list)


@dataclass
class ExitInfo:
    """Exit ``index`` (the last one is the model's own final output): the tensors it cuts at (``at``), how its
    head was made (``head``), which segment tensor stands in for each final output (``outputs``), its gate
    (None for the final exit, which always exits), an optional display ``name``, and for heads eecompile
    trains, ``head_spec`` (kind, options, feature shape, class count, whether trained)."""

    index: int
    at: list[str]
    head: str  # how the head was made: file:NAME, model-output:NAME, trained:KIND
    outputs: dict[str, str]  # final output name -> tensor name of this exit's output in the segment
    gate: GateInfo | None = None  # None for the final exit (it always exits)
    name: str | None = None
    head_spec: dict[str, Any] | None = None  # trained heads: kind and options, for train-heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExitInfo:
        """From the manifest's mapping (KeyError/TypeError for a missing or malformed field)."""
        gate = GateInfo(**d["gate"]) if d.get("gate") else None
        return cls(index=d["index"], at=list(d["at"]), head=d["head"], outputs=dict(d["outputs"]),
                   gate=gate, name=d.get("name"), head_spec=d.get("head_spec"))


@dataclass
class SegmentInfo:
    """Segment ``index``: its ONNX ``file`` (relative to the bundle), its data inputs and graph outputs, its
    exit, the outputs later segments read (``carried_out``), and its cost: ``flops`` per sample (a
    multiply-add counts 2; only Conv/MatMul/Gemm/Einsum/attention/recurrent ops are counted) and
    ``flops_fraction`` of the whole model's."""

    index: int
    file: str  # relative to the bundle
    inputs: list[TensorInfo]  # data inputs: model inputs, carried tensors, gate state (not the threshold)
    outputs: list[TensorInfo]  # every graph output: carried tensors, exit outputs, gate, state
    exit: ExitInfo
    carried_out: list[str] = field(default_factory=list)  # outputs later segments read
    flops: int = 0
    flops_fraction: float = 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SegmentInfo:
        """From the manifest's mapping (KeyError/TypeError for a missing or malformed field)."""
        return cls(index=d["index"], file=d["file"],
                   inputs=[TensorInfo.from_dict(t) for t in d["inputs"]],
                   outputs=[TensorInfo.from_dict(t) for t in d["outputs"]],
                   exit=ExitInfo.from_dict(d["exit"]), carried_out=list(d.get("carried_out", [])),
                   flops=int(d.get("flops", 0)), flops_fraction=float(d.get("flops_fraction", 0.0)))


@dataclass
class Manifest:
    """``manifest.yaml``: everything a runtime needs to chain a bundle's segments, and its provenance.

    ``inputs`` are the model's inputs (each with its ``batch_axis``; ``"batch"`` there in dynamic mode) and
    ``outputs`` the final outputs, one row per sample: the first is the one every exit stands in for and the
    gates read; every exit gives every output except those in ``end_only``, which only the final exit gives.
    ``segments`` are in chain order. ``batch_mode`` is
    ``"dynamic"`` or ``"per_sample"`` (the model only runs at batch 1; runtimes feed one sample at a time).
    ``class_axis`` is the final output's class axis (``task``: ``"classification"``, or ``"regression"`` for an
    output without one, where it is unused). ``calibration``, ``engines`` and ``heads`` are written
    by ``calibrate``, ``build`` and ``train-heads``; ``files`` maps each bundle file to its sha256, checked on
    load. Raises nothing itself; :meth:`from_dict` raises BundleError for a manifest it cannot read.
    """

    source_model: dict[str, Any]  # {file, sha256}
    inputs: list[TensorInfo]  # the model's inputs (batch axis 0)
    outputs: list[TensorInfo]  # the final outputs, one row per sample; the first is the one the gates read
    segments: list[SegmentInfo]
    batch_mode: str = "dynamic"  # "dynamic", or "per_sample" when the model only runs at batch 1
    class_axis: int = -1
    format_version: int = FORMAT_VERSION
    eecompile_version: str = ""
    calibration: dict[str, Any] | None = None
    engines: list[dict[str, Any]] = field(default_factory=list)
    heads: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    decoder: dict[str, Any] | None = None  # decoding bundles: segments with KV caches, the shared head, exits
    # "classification" (the final output has a class axis) or "regression" (spec final.task: no class axis;
    # calibrate then counts errors against an error budget). Bundles written before the field: classification.
    task: str = "classification"
    loop: dict[str, Any] | None = None  # iterative bundles: the chain run N times on its own state (see LOOP_KEYS)
    jumps: list[dict[str, Any]] | None = None  # jump exits: [{exit, tensor, to}] (a fired sample continues at `to`)
    # Final outputs only the final exit gives (spec final.end_only): for samples that leave earlier they are
    # absent (the runner's RunResult.present[name] is False there; rows are NaN, or 0 for integer outputs).
    end_only: list[str] = field(default_factory=list)

    @property
    def exits(self) -> list[ExitInfo]:
        """Every exit, the final one last."""
        return [s.exit for s in self.segments]

    @property
    def n_early_exits(self) -> int:
        """How many exits can fire before the final output."""
        return len(self.segments) - 1

    @property
    def thresholds(self) -> list[float]:
        """The threshold in use at each early exit, in order."""
        return [s.exit.gate.threshold for s in self.segments if s.exit.gate is not None]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the YAML file (the format and eecompile versions first)."""
        d = asdict(self)
        # Keep the header first in the YAML for people reading it.
        head = {k: d.pop(k) for k in ("format_version", "eecompile_version")}
        return {**head, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = MANIFEST) -> Manifest:
        """Parse a loaded manifest after :func:`validate_manifest`: BundleError (naming ``where`` and the
        manifest path of the first problem, e.g. ``segments[1].inputs[0].batch_axis``) when it is not one, is
        from a newer format version, or is incomplete or malformed."""
        validate_manifest(d, where)
        version = d["format_version"]
        try:
            return cls(
                source_model=dict(d["source_model"]),
                inputs=[TensorInfo.from_dict(t) for t in d["inputs"]],
                outputs=[TensorInfo.from_dict(t) for t in d["outputs"]],
                segments=[SegmentInfo.from_dict(s) for s in d["segments"]],
                batch_mode=d.get("batch_mode", "dynamic"),
                class_axis=int(d.get("class_axis", -1)),
                format_version=version,
                eecompile_version=d.get("eecompile_version", ""),
                calibration=d.get("calibration"),
                engines=list(d.get("engines") or []),
                heads=dict(d.get("heads") or {}),
                notes=list(d.get("notes") or []),
                files=dict(d.get("files") or {}),
                decoder=d.get("decoder"),
                task=d.get("task", "classification"),
                loop=d.get("loop"),
                jumps=d.get("jumps"),
                end_only=list(d.get("end_only") or []),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{where}: manifest is incomplete or malformed ({e!r}); recompile the bundle") from e


# ------------------------------------------------------------------------------------------ schema

# numpy dtype names a manifest may give a tensor (ONNX's tensor types as numpy / ml_dtypes spell them).
DTYPES = frozenset({
    "bool", "int4", "int8", "int16", "int32", "int64", "uint4", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "bfloat16", "complex64", "complex128", "float4_e2m1fn",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
})
BATCH_MODES = ("dynamic", "per_sample")
TASKS = ("classification", "regression")  # the same as eecompile.spec.TASKS
_SHA256 = re.compile(r"[0-9a-f]{64}")


class _Schema:
    """Checks one parsed manifest; every failure is a BundleError naming ``where`` and the manifest path."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, path: str, problem: str) -> BundleError:
        return BundleError(f"{self.where}: {path}: {problem}; recompile the bundle (or restore its manifest)")

    def mapping(self, v: Any, path: str) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise self.fail(path, f"expected a mapping, got {_kind(v)}")
        return v

    def seq(self, v: Any, path: str) -> list[Any]:
        if not isinstance(v, list):
            raise self.fail(path, f"expected a list, got {_kind(v)}")
        return v

    def key(self, m: dict[str, Any], k: str, path: str) -> Any:
        if k not in m:
            raise self.fail(f"{path}.{k}" if path else k, "missing")
        return m[k]

    def string(self, v: Any, path: str, optional: bool = False) -> None:
        if v is None and optional:
            return
        if not isinstance(v, str):
            raise self.fail(path, f"expected a string, got {_kind(v)}")

    def integer(self, v: Any, path: str, minimum: int | None = None) -> None:
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(path, f"expected an integer, got {_kind(v)}")
        if minimum is not None and v < minimum:
            raise self.fail(path, f"must be >= {minimum}, got {v}")

    def number(self, v: Any, path: str) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.fail(path, f"expected a number, got {_kind(v)}")

    def strings(self, v: Any, path: str) -> None:
        for i, x in enumerate(self.seq(v, path)):
            self.string(x, f"{path}[{i}]")

    def tensor(self, v: Any, path: str) -> None:
        t = self.mapping(v, path)
        self.string(self.key(t, "name", path), f"{path}.name")
        dtype = self.key(t, "dtype", path)
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise self.fail(f"{path}.dtype", f"unknown dtype {dtype!r} (known: {', '.join(sorted(DTYPES))})")
        shape = self.seq(self.key(t, "shape", path), f"{path}.shape")
        for i, d in enumerate(shape):
            if d is None or isinstance(d, str):
                continue
            self.integer(d, f"{path}.shape[{i}]", minimum=0)
        if "batch_axis" not in t:
            # Without it a carried tensor would not be compacted with the samples: rows silently misaligned.
            raise self.fail(f"{path}.batch_axis", "missing (the axis samples are stacked on, or null for a tensor "
                                                  "that does not depend on the batch)")
        axis = t["batch_axis"]
        if axis is not None:
            self.integer(axis, f"{path}.batch_axis", minimum=0)
            if axis >= len(shape):
                raise self.fail(f"{path}.batch_axis", f"axis {axis} is beyond the tensor's rank {len(shape)}")

    def tensors(self, v: Any, path: str) -> None:
        for i, t in enumerate(self.seq(v, path)):
            self.tensor(t, f"{path}[{i}]")

    def gate(self, v: Any, path: str, kinds: tuple[str, ...] = names.GATE_KINDS) -> None:
        g = self.mapping(v, path)
        for k in ("kind", "output", "threshold_input"):
            self.string(self.key(g, k, path), f"{path}.{k}")
        if g["kind"] not in kinds:
            raise self.fail(f"{path}.kind", f"{g['kind']!r} is not a gate kind this runtime knows "
                                            f"({', '.join(kinds)}); recompile the bundle with this "
                                            f"eecompile, or upgrade the runtime")
        threshold = self.key(g, "threshold", path)
        self.number(threshold, f"{path}.threshold")
        if threshold != threshold:
            raise self.fail(f"{path}.threshold", "is NaN")
        self.string(g.get("score_output"), f"{path}.score_output", optional=True)
        for k in ("state_inputs", "state_outputs"):
            if k in g:
                self.strings(g[k], f"{path}.{k}")
        unknown = set(g) - {"kind", "threshold", "output", "threshold_input", "score_output", "state_inputs",
                            "state_outputs"}
        if unknown:
            raise self.fail(path, f"unknown key(s) {', '.join(sorted(map(str, unknown)))}")

    def exit(self, v: Any, path: str) -> None:
        e = self.mapping(v, path)
        self.integer(self.key(e, "index", path), f"{path}.index", minimum=0)
        self.strings(self.key(e, "at", path), f"{path}.at")
        self.string(self.key(e, "head", path), f"{path}.head")
        outs = self.mapping(self.key(e, "outputs", path), f"{path}.outputs")
        for k, name in outs.items():
            self.string(k, f"{path}.outputs (a key)")
            self.string(name, f"{path}.outputs.{k}")
        if e.get("gate") is not None:
            self.gate(e["gate"], f"{path}.gate")
        self.string(e.get("name"), f"{path}.name", optional=True)
        if e.get("head_spec") is not None:
            self.mapping(e["head_spec"], f"{path}.head_spec")

    def segment(self, v: Any, path: str, index: int) -> None:
        seg = self.mapping(v, path)
        self.integer(self.key(seg, "index", path), f"{path}.index")
        if seg["index"] != index:
            raise self.fail(f"{path}.index", f"is {seg['index']}, expected {index} (segments in order)")
        self.relpath(self.key(seg, "file", path), f"{path}.file")
        self.tensors(self.key(seg, "inputs", path), f"{path}.inputs")
        self.tensors(self.key(seg, "outputs", path), f"{path}.outputs")
        self.exit(self.key(seg, "exit", path), f"{path}.exit")
        carried = seg.get("carried_out") or []
        self.strings(carried, f"{path}.carried_out")
        produced = {t["name"] for t in seg["outputs"]}
        for i, name in enumerate(carried):
            if name not in produced:
                raise self.fail(f"{path}.carried_out[{i}]", f"'{name}' is not one of the segment's outputs")
        if "flops" in seg:
            self.integer(seg["flops"], f"{path}.flops", minimum=0)
        if "flops_fraction" in seg:
            self.number(seg["flops_fraction"], f"{path}.flops_fraction")

    def decoder(self, v: Any) -> None:
        """Decoder bundles: the files the decoding loop opens are confined like segment files."""
        dec = self.mapping(v, "decoder")
        for i, seg in enumerate(self.seq(dec.get("segments") or [], "decoder.segments")):
            self.relpath(self.key(self.mapping(seg, f"decoder.segments[{i}]"), "file", f"decoder.segments[{i}]"),
                         f"decoder.segments[{i}].file")
        if dec.get("head") is not None:
            self.relpath(self.key(self.mapping(dec["head"], "decoder.head"), "file", "decoder.head"),
                         "decoder.head.file")
        for k in ("tokenizer", "weights"):
            if dec.get(k) is not None:
                self.relpath(dec[k], f"decoder.{k}")

    def jumps(self, v: Any, segments: list[dict[str, Any]]) -> None:
        """Jump exits: each names a gated segment, goes forward (``to`` > ``exit``: a jump to an earlier segment
        is refused), to a segment right after a boundary without a gate that hands on the jump tensor, and the
        exit gives that tensor."""
        n = len(segments)
        for i, j in enumerate(self.seq(v, "jumps")):
            path = f"jumps[{i}]"
            j = self.mapping(j, path)
            for key in ("exit", "to"):
                self.integer(self.key(j, key, path), f"{path}.{key}", minimum=0)
            tensor = self.key(j, "tensor", path)
            self.string(tensor, f"{path}.tensor")
            k, to = j["exit"], j["to"]
            if k >= n - 1 or not (segments[k]["exit"].get("gate")):
                raise self.fail(f"{path}.exit", f"segment {k} has no early exit to jump from")
            if to <= k:
                raise self.fail(f"{path}.to", f"segment {to} is not after exit {k}: a jump goes to a later segment")
            if to >= n or segments[to - 1]["exit"].get("gate") or tensor not in (segments[to - 1].get("carried_out")
                                                                               or []):
                raise self.fail(f"{path}.to", f"segment {to} does not start at a boundary handing on '{tensor}'")
            if tensor not in segments[k]["exit"]["outputs"]:
                raise self.fail(f"{path}.tensor", f"exit {k} does not give '{tensor}' (its outputs: "
                                                  f"{sorted(segments[k]['exit']['outputs'])})")

    def loop(self, v: Any, d: dict[str, Any]) -> None:
        """Loop bundles (``loop:``): the step graph is confined like a segment; every fed-back output exists and
        has its input's dtype, rank, fixed sizes and batch axis (else a step would feed the next a tensor it
        cannot take); step inputs name an input with a known source; the gate names the step graph's outputs."""
        lp = self.mapping(v, "loop")
        unknown = set(lp) - set(LOOP_KEYS)
        if unknown:
            raise self.fail("loop", f"unknown key(s) {', '.join(sorted(map(str, unknown)))}")
        self.integer(self.key(lp, "steps", "loop"), "loop.steps", minimum=1)
        if lp.get("file") is not None:
            self.relpath(lp["file"], "loop.file")
        for k in ("inputs", "outputs", "results"):
            self.tensors(lp.get(k) or [], f"loop.{k}")
        if lp.get("file") is None and (lp.get("outputs") or lp.get("inputs")):
            raise self.fail("loop.file", "missing, yet the loop lists step graph inputs or outputs")
        model_inputs = {t["name"]: t for t in d["inputs"]}
        produced = {t["name"]: t for t in [*d["outputs"], *(lp.get("outputs") or [])]}
        per_step = {si.get("input") for si in lp.get("step_inputs") or [] if isinstance(si, dict)}
        readable = {**model_inputs, **produced}
        for i, t in enumerate(lp.get("inputs") or []):
            if t["name"] not in readable and t["name"] not in per_step:
                raise self.fail(f"loop.inputs[{i}]", f"'{t['name']}' is neither a model input, a chain output nor "
                                                     f"a step input")
        fed: set[str] = set()
        for i, pair in enumerate(self.seq(self.key(lp, "feedback", "loop"), "loop.feedback")):
            path = f"loop.feedback[{i}]"
            pair = self.mapping(pair, path)
            out, inp = self.key(pair, "output", path), self.key(pair, "input", path)
            self.string(out, f"{path}.output")
            self.string(inp, f"{path}.input")
            if out not in produced:
                raise self.fail(f"{path}.output", f"'{out}' is neither a chain output nor an output of the step graph")
            if inp not in model_inputs:
                raise self.fail(f"{path}.input", f"'{inp}' is not a model input")
            problem = feedback_mismatch(produced[out], model_inputs[inp])
            if problem:
                raise self.fail(path, f"fed-back output '{out}' does not fit input '{inp}' ({problem})")
            fed.add(inp)
        sources = ("step", "steps", "linspace", "table")
        for i, si in enumerate(self.seq(lp.get("step_inputs") or [], "loop.step_inputs")):
            path = f"loop.step_inputs[{i}]"
            si = self.mapping(si, path)
            name = self.key(si, "input", path)
            self.string(name, f"{path}.input")
            if name not in model_inputs and name not in {t["name"] for t in lp.get("inputs") or []}:
                raise self.fail(f"{path}.input", f"'{name}' is neither a model input nor a step graph input")
            if name in fed:
                raise self.fail(f"{path}.input", f"'{name}' is also fed back")
            if si.get("source") not in sources:
                raise self.fail(f"{path}.source", f"{_kind(si.get('source'))} is not one of {', '.join(sources)}")
            for k in ("start", "end"):
                if k in si:
                    self.number(si[k], f"{path}.{k}")
            if si.get("offset", 0) not in (0, 1):
                raise self.fail(f"{path}.offset", f"{_kind(si.get('offset'))} is not 0 or 1")
            if si["source"] == "table":
                values = self.seq(self.key(si, "values", path), f"{path}.values")
                if not values:
                    raise self.fail(f"{path}.values", "is empty")
                for j, x in enumerate(values):
                    self.number(x, f"{path}.values[{j}]")
        if lp.get("gate") is not None:
            gate = self.mapping(lp["gate"], "loop.gate")
            staged = gate.get("threshold")
            if isinstance(staged, list):  # a staged threshold: one number per stage of the loop's progress
                if not staged:
                    raise self.fail("loop.gate.threshold", "is an empty list (a staged threshold needs a value per "
                                                           "stage)")
                for j, x in enumerate(staged):
                    self.number(x, f"loop.gate.threshold[{j}]")
                    if x != x:
                        raise self.fail(f"loop.gate.threshold[{j}]", "is NaN")
                gate = {**gate, "threshold": staged[0]}
            self.gate(gate, "loop.gate", names.LOOP_GATE_KINDS)
            outs = {t["name"] for t in lp.get("outputs") or []}
            for k in ("output", "score_output"):
                name = lp["gate"].get(k)
                if name is not None and name not in outs:
                    raise self.fail(f"loop.gate.{k}", f"'{name}' is not an output of the step graph")
        self.string(lp.get("commit"), "loop.commit", optional=True)
        if lp.get("commit") is not None and lp["commit"] not in produced:
            raise self.fail("loop.commit", f"'{lp['commit']}' is neither a chain output nor an output of the step graph")
        for i, t in enumerate(lp.get("results") or []):
            if t["name"] not in produced:
                raise self.fail(f"loop.results[{i}]", f"'{t['name']}' is neither a chain output nor an output of "
                                                      f"the step graph")

    def references(self, seg: dict[str, Any], path: str, available: set[str]) -> None:
        """Names a segment uses must exist: its inputs come from the model or earlier segments' carried (or
        gate state) outputs, and its exit and gate name its own outputs. Updates ``available``."""
        produced = {t["name"] for t in seg["outputs"]}
        for j, t in enumerate(seg["inputs"]):
            if t["name"] not in available:
                raise self.fail(f"{path}.inputs[{j}]", f"'{t['name']}' is neither a model input nor carried out of "
                                                       f"an earlier segment")
        ex = seg["exit"]
        for k, name in ex["outputs"].items():
            if name not in produced:
                raise self.fail(f"{path}.exit.outputs.{k}", f"'{name}' is not one of the segment's outputs")
        gate = ex.get("gate") or {}
        for k in ("output", "score_output"):
            if gate.get(k) is not None and gate[k] not in produced:
                raise self.fail(f"{path}.exit.gate.{k}", f"'{gate[k]}' is not one of the segment's outputs")
        for j, name in enumerate(gate.get("state_outputs") or []):
            if name not in produced:
                raise self.fail(f"{path}.exit.gate.state_outputs[{j}]", f"'{name}' is not one of the segment's "
                                                                        f"outputs")
        available.update(seg.get("carried_out") or [])
        available.update(gate.get("state_outputs") or [])

    def relpath(self, v: Any, path: str) -> None:
        self.string(v, path)
        problem = path_problem(v)
        if problem:
            raise self.fail(path, f"'{_printable(v)}' {problem}")

    def manifest(self, d: Any) -> None:
        if not isinstance(d, dict) or "format_version" not in d:
            raise BundleError(f"{self.where}: not an eecompile manifest (no format_version)")
        version = d["format_version"]
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            hint = " (a string: write it without quotes)" if isinstance(version, str) else ""
            raise self.fail("format_version", f"must be a positive integer, got {_kind(version)}{hint}")
        if version > FORMAT_VERSION:
            raise BundleError(
                f"{self.where}: format version {version} is newer than this eecompile reads ({FORMAT_VERSION}); "
                f"upgrade eecompile or recompile the bundle with this version"
            )
        self.string(d.get("eecompile_version", ""), "eecompile_version")
        src = self.mapping(self.key(d, "source_model", ""), "source_model")
        for k in ("file", "sha256"):
            self.string(src.get(k), f"source_model.{k}", optional=True)
        self.tensors(self.key(d, "inputs", ""), "inputs")
        self.tensors(self.key(d, "outputs", ""), "outputs")
        self.strings(d.get("end_only") or [], "end_only")
        outs = [t["name"] for t in d["outputs"]]
        for i, name in enumerate(d.get("end_only") or []):
            if name not in outs[1:]:
                raise self.fail(f"end_only[{i}]", f"'{_printable(name)}' is not one of the final outputs after the "
                                                  f"first ({outs[1:]})")
        available = {t["name"] for t in d["inputs"]}
        for i, seg in enumerate(self.seq(self.key(d, "segments", ""), "segments")):
            self.segment(seg, f"segments[{i}]", i)
            self.references(seg, f"segments[{i}]", available)
        mode = d.get("batch_mode", "dynamic")
        if mode not in BATCH_MODES:
            raise self.fail("batch_mode", f"{_kind(mode)} is not one of {', '.join(BATCH_MODES)}")
        if "class_axis" in d:
            self.integer(d["class_axis"], "class_axis")
        if d.get("task", "classification") not in TASKS:
            raise self.fail("task", f"{_kind(d['task'])} is not one of {', '.join(TASKS)}")
        if d.get("calibration") is not None:
            self.mapping(d["calibration"], "calibration")
        for i, rec in enumerate(self.seq(d.get("engines") or [], "engines")):
            r = self.mapping(rec, f"engines[{i}]")
            if r.get("file") is not None:
                self.relpath(r["file"], f"engines[{i}].file")
        if d.get("heads") is not None:
            self.mapping(d["heads"], "heads")
        if d.get("decoder") is not None:
            self.decoder(d["decoder"])
        if d.get("loop") is not None:
            self.loop(d["loop"], d)
        if d.get("jumps") is not None:
            self.jumps(d["jumps"], d["segments"])
        self.strings(d.get("notes") or [], "notes")
        files = self.mapping(d.get("files") or {}, "files")
        for rel, digest in files.items():
            self.relpath(rel, f"files['{_printable(str(rel))}']")
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                raise self.fail(f"files['{_printable(rel)}']", f"expected a sha256 (64 hex digits), got "
                                                               f"{_kind(digest)}")


LOOP_KEYS = ("steps", "file", "inputs", "outputs", "feedback", "step_inputs", "gate", "commit", "results")
"""The keys of a manifest's ``loop:`` (docs/bundle-format.md, "Loops")."""


def feedback_mismatch(out: dict[str, Any], inp: dict[str, Any]) -> str | None:
    """Why tensor record ``out`` (a step output, as a manifest mapping) cannot be fed back as input ``inp``:
    another dtype, rank, fixed size or batch axis; None when it can (symbolic sizes match anything)."""
    if out["dtype"] != inp["dtype"]:
        return f"dtype {out['dtype']} vs {inp['dtype']}"
    a, b = list(out["shape"]), list(inp["shape"])
    if len(a) != len(b):
        return f"shape {a} vs {b}: rank {len(a)} vs {len(b)}"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if isinstance(x, int) and isinstance(y, int) and x != y:
            return f"shape {a} vs {b}: axis {i} is {x} vs {y}"
    if out.get("batch_axis") != inp.get("batch_axis"):
        return f"batch axis {out.get('batch_axis')} vs {inp.get('batch_axis')}"
    return None


def validate_manifest(d: Any, where: str = MANIFEST) -> None:
    """Check a parsed manifest against the format's schema (types, dtypes, batch axes within the rank,
    numeric thresholds, confined relative paths). Raises BundleError naming ``where`` and the path of the
    first problem, e.g. ``segments[1].inputs[0].batch_axis``."""
    _Schema(where).manifest(d)


def _kind(v: Any) -> str:
    """A value as an error message shows it: its repr (shortened) and, for non-scalars, its type."""
    if isinstance(v, (dict, list)):
        return f"a {type(v).__name__}"
    text = repr(v)
    return _printable(text if len(text) <= 60 else text[:57] + "...")


def _printable(text: str) -> str:
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def path_problem(rel: str) -> str | None:
    """Why ``rel`` is not a confined bundle path (relative, '/'-separated, normalised, no '..'), or None."""
    if not rel:
        return "is empty"
    if "\0" in rel or not rel.isprintable():
        return "has control characters"
    if rel.startswith("/") or "\\" in rel or (len(rel) > 1 and rel[1] == ":"):
        return "is not a relative path inside the bundle (absolute paths and backslashes are refused)"
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "is not a normalised path inside the bundle ('..', '.' and empty components are refused)"
    return None


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """The sha256 of ``data`` as 64 lowercase hex digits (the form the manifest's ``files`` map holds)."""
    return hashlib.sha256(data).hexdigest()


class Bundle:
    """A bundle on disk: its directory and its parsed manifest.

    Confinement: every file a manifest names is a relative, normalised path inside the bundle
    (:func:`validate_manifest`), and a bundle holds plain files and directories only: a symbolic link
    anywhere in it is refused on load (it could make the bundle read, hash or copy a file outside itself)."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest

    def file(self, rel: str) -> Path:
        """The path of bundle file ``rel``, refused (BundleError) when it is not confined to the bundle or
        passes through a symbolic link."""
        return confined_path(self.path, rel)

    def verify_file(self, rel: str) -> Path:
        """The path of a bundle file after checking it is listed, confined to the bundle, exists and matches
        its recorded sha256. ONNX files are also checked to keep their external data inside their folder."""
        if rel not in self.manifest.files:
            raise BundleError(f"{self.path}: '{_printable(rel)}' is not listed in the manifest; recompile the bundle")
        p = confined_path(self.path, rel)
        if not p.is_file():
            raise BundleError(f"{p}: file missing from the bundle; recompile or copy the whole bundle again")
        digest = sha256_file(p)
        if digest != self.manifest.files[rel]:
            raise BundleError(
                f"{p}: sha256 does not match the manifest (file changed or damaged); "
                f"copy the bundle again or recompile it"
            )
        if p.suffix == ".onnx":
            for ext in external_data_files(self.path, rel):
                if ext not in self.manifest.files:
                    raise BundleError(f"{p}: its external data '{_printable(ext)}' is not listed in the manifest "
                                      f"(so not checked); recompile the bundle")
        return p

    def verify(self) -> None:
        """Check every file the manifest lists against its sha256 (and confinement: see :meth:`verify_file`).
        Raises :class:`BundleError` naming the first file that is missing, changed or outside the bundle."""
        for rel in self.manifest.files:
            self.verify_file(rel)

    @classmethod
    def load(cls, path: str | Path, verify: bool = True, public_key: str | Path | None = None) -> Bundle:
        """Read a bundle's manifest and (by default) check every file's hash.

        With ``public_key`` (a PEM file), the bundle's signature (``bundle.sig``, made by ``eecompile sign``)
        must hold for that key, checked before the manifest is parsed. Raises BundleError for a missing,
        damaged, unconfined (paths outside the bundle, symbolic links) or, with ``public_key``, unsigned or
        altered bundle."""
        path = Path(path)
        if not path.exists():
            raise BundleError(f"{path}: no such bundle; create one with `eecompile compile SPEC -o {path}`")
        if not path.is_dir():
            raise BundleError(f"{path}: a bundle is a directory, this is a file")
        mpath = path / MANIFEST
        if not mpath.is_file() and not mpath.is_symlink():
            raise BundleError(f"{mpath}: manifest missing; this is not an eecompile bundle")
        refuse_symlinks(path)
        if public_key is not None:
            from eecompile.signing import verify_bundle

            verify_bundle(path, public_key)
        try:
            raw = safe_yaml.load(safe_yaml.read_yaml_text(mpath, BundleError, "manifest"), BundleError, str(mpath),
                                 "manifest")
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or type(e).__name__
            raise BundleError(f"{mpath}: manifest is not valid YAML{at} ({problem}); recompile the bundle") from e
        bundle = cls(path, Manifest.from_dict(raw, str(mpath)))
        if verify:
            bundle.verify()
        return bundle


def confined_path(root: Path, rel: str) -> Path:
    """``root / rel`` after checking ``rel`` is a confined bundle path and no component under ``root`` is a
    symbolic link. Raises BundleError naming the path."""
    problem = path_problem(rel) if isinstance(rel, str) else "is not a string"
    if problem:
        raise BundleError(f"{root}: '{_printable(str(rel))}' {problem}; recompile the bundle")
    p = root
    for part in rel.split("/"):
        p = p / part
        if p.is_symlink():
            raise BundleError(_symlink_message(root, p))
    return p


def _symlink_message(root: Path, link: Path) -> str:
    try:
        target = os.readlink(link)
    except OSError:
        target = "?"
    return (f"{link}: a symbolic link (to {_printable(target)}) inside the bundle {root}; a bundle holds plain "
            f"files only, so links are refused (they could point outside it): replace it with a copy of the "
            f"file (cp -L) or recompile the bundle")


def refuse_symlinks(root: Path) -> None:
    """Raise BundleError when any entry under ``root`` (files and directories, not followed) is a symbolic
    link. ``root`` itself may be one (e.g. ``latest.eebundle -> v3.eebundle``)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            if p.is_symlink():
                raise BundleError(_symlink_message(root, p))


# ------------------------------------------------------------------------------------------ ONNX external data


def _varint(buf: Any, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: Any, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of the protobuf message buf[start:end];
    other wire types are skipped."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field_no, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise ValueError("field runs past its message")
            yield field_no, pos, pos + n
            pos += n
        else:
            raise ValueError(f"wire type {wire}")
    if pos != end:
        raise ValueError("message ends inside a field")


# ONNX protobuf field numbers (onnx/onnx.proto3): for each message kind, the fields holding messages that can
# hold tensors (ModelProto.graph/functions, GraphProto.node/initializer/sparse_initializer, NodeProto.attribute,
# AttributeProto.t/g/tensors/graphs/sparse_tensor/sparse_tensors, SparseTensorProto.values/indices).
_CHILDREN: dict[str, dict[int, str]] = {
    "model": {7: "graph", 25: "function"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attr"},
    "attr": {5: "tensor", 10: "tensor", 6: "graph", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {},
}
_TENSOR_EXTERNAL = 13  # TensorProto.external_data: StringStringEntryProto {key = 1, value = 2}


def external_data_locations(data: Any) -> list[str]:
    """Every external-data ``location`` in a serialised ONNX ModelProto (initializers, constants and
    sparse tensors, in the main graph, subgraphs and functions), read from the protobuf wire format without
    the onnx package (the runtime has none). Raises ValueError for bytes that are not a protobuf message."""
    out: list[str] = []
    stack: list[tuple[str, int, int]] = [("model", 0, len(data))]
    while stack:
        kind, start, end = stack.pop()
        children = _CHILDREN[kind]
        for no, a, b in _fields(data, start, end):
            if no in children:
                stack.append((children[no], a, b))
            elif kind == "tensor" and no == _TENSOR_EXTERNAL:
                entry = {eno: bytes(data[ea:eb]).decode("utf-8", "replace") for eno, ea, eb in _fields(data, a, b)}
                if entry.get(1) == "location" and 2 in entry:
                    out.append(entry[2])
    return out


def external_data_files(root: Path, rel: str) -> list[str]:
    """The bundle paths of the external-data files ONNX file ``rel`` names, each checked to lie in
    ``rel``'s folder (or below it) and to pass through no symbolic link; BundleError otherwise. A file that is
    not a readable protobuf gives [] (the ONNX reader reports it)."""
    import mmap

    path = confined_path(root, rel)
    folder = rel.rsplit("/", 1)[0] if "/" in rel else ""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return []
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                locations = external_data_locations(data)
    except (OSError, ValueError):
        return []
    out: list[str] = []
    for loc in dict.fromkeys(locations):
        problem = path_problem(loc)
        if problem:
            raise BundleError(f"{path}: external data location '{_printable(loc)}' {problem} (it must be a file "
                              f"beside the ONNX file, in its folder); recompile the bundle")
        joined = f"{folder}/{loc}" if folder else loc
        confined_path(root, joined)
        out.append(joined)
    return out


# ------------------------------------------------------------------------------------------ atomic write

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2). Returns False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_destination(dest: Path) -> None:
    if dest.exists() and not dest.is_dir():
        raise BundleError(f"{dest}: exists and is a file, not a bundle directory; choose another -o path")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / MANIFEST).exists():
        raise BundleError(
            f"{dest}: exists and is not an eecompile bundle; refusing to replace it (choose another -o path)"
        )
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.exists():
        raise BundleError(f"{parent}: directory does not exist; create it or choose another -o path")
    if not os.access(parent, os.W_OK):
        raise BundleError(f"{parent}: not writable; choose another -o path")


def check_output_bundle(output: Path, force: bool) -> None:
    """Before compiling into ``output``: refuse a file, a directory that is not a bundle, a missing or read-only
    parent, or an existing bundle without ``force`` (BundleError), so nothing is computed for a write that
    cannot happen."""
    _check_destination(output.absolute())
    if output.exists() and not force:
        raise BundleError(f"{output}: already exists; pass --force to replace it")


@contextmanager
def staged_bundle(dest: str | Path, copy_from: str | Path | None = None) -> Iterator[Path]:
    """Stage a bundle in a temporary directory beside ``dest``; on clean exit it replaces ``dest``.

    With ``copy_from``, the staging directory starts as a copy of that bundle (for in-place updates such as
    train-heads, calibrate, build). On an exception the staging directory is removed and ``dest`` is unchanged.
    """
    dest = Path(dest).absolute()
    _check_destination(dest)
    _remove_stale_staging(dest)
    tmp = dest.parent / f"{_staging_prefix(dest)}{os.getpid()}-never-created"
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(dest)}{os.getpid()}-", dir=dest.parent))
        # mkdtemp makes the directory private (0700); a bundle is read by whoever deploys it, like any file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if copy_from is not None:
            _copy_bundle(Path(copy_from), tmp)
        yield tmp
        _commit(tmp, dest)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        code, text = _os_error(e)
        if code in (errno.ENOSPC, errno.EDQUOT):
            hint = f"free some space on the disk holding {dest.parent} and run it again"
        elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
            hint = "choose a writable -o path"
        else:
            hint = "check the -o path and run it again"
        raise BundleError(f"{dest}: writing the bundle failed ({text}); nothing was changed; {hint}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _copy_bundle(src: Path, dst: Path) -> None:
    """Copy bundle ``src`` into ``dst``: the manifest and the files it lists, nothing else (no symbolic
    links, no unlisted files, no signature: a rewritten bundle must be signed again). Paths are confined
    (:func:`confined_path`); a listed file that is a link, or lies behind one, is refused."""
    bundle = Bundle.load(src, verify=False)
    refuse_symlinks(src)
    for rel in bundle.manifest.files:
        s = confined_path(src, rel)
        if not s.is_file():
            raise BundleError(f"{s}: file missing from the bundle; recompile or copy the whole bundle again")
        d = dst / rel
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(s, d, follow_symlinks=False)
    shutil.copy2(src / MANIFEST, dst / MANIFEST, follow_symlinks=False)
    listed = set(bundle.manifest.files) | {MANIFEST, SIGNATURE}
    dropped = sorted(p.relative_to(src).as_posix() for p in src.rglob("*")
                     if p.is_file() and p.relative_to(src).as_posix() not in listed)
    if dropped:
        log.warning("%s: not carried into the rewritten bundle (not listed in the manifest): %s", src,
                    ", ".join(dropped[:10]) + (f" and {len(dropped) - 10} more" if len(dropped) > 10 else ""))


def _os_error(e: OSError) -> tuple[int | None, str]:
    """(errno, short text) of an OSError; shutil.copytree's Error holds a list of (src, dst, message)."""
    if isinstance(e, shutil.Error) and e.args and isinstance(e.args[0], list) and e.args[0]:
        first = str(e.args[0][0][-1])
        m = re.match(r"\[Errno (\d+)\] ([^:]+)", first)
        return (int(m.group(1)), m.group(2)) if m else (None, first)
    return e.errno, e.strerror or str(e)


def _staging_prefix(dest: Path) -> str:
    return f".eebundle-tmp-{dest.name}-{socket.gethostname()}-"


def _remove_stale_staging(dest: Path) -> None:
    """Remove staging directories left beside ``dest`` by writers on this host that were killed (SIGKILL,
    power loss): their process is gone. A live writer's directory is never touched."""
    prefix = _staging_prefix(dest)
    try:
        entries = list(dest.parent.iterdir())
    except OSError:
        return
    for p in entries:
        if not p.name.startswith(prefix) or not p.is_dir():
            continue
        pid_text = p.name[len(prefix):].split("-", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _commit(tmp: Path, dest: Path) -> None:
    for root, _dirs, _files in os.walk(tmp):
        _fsync_dir(Path(root))
    if dest.exists():
        if _exchange(tmp, dest):
            _fsync_dir(dest.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old bundle
            return
        old = dest.parent / f".eebundle-old-{dest.name}-{uuid.uuid4().hex[:8]}"
        os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dest)
    _fsync_dir(dest.parent)


def write_manifest(root: Path, manifest: Manifest) -> None:
    """Hash every file under ``root`` (except the manifest and a signature) into ``manifest.files`` and
    write it. A symbolic link under ``root`` is refused (BundleError)."""
    refuse_symlinks(root)
    files: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in (MANIFEST, SIGNATURE, MANIFEST + ".tmp"):
            files[rel] = sha256_file(p)
    manifest.files = files
    text = yaml.safe_dump(manifest.to_dict(), sort_keys=False, default_flow_style=None, width=120)
    tmp = root / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)


def update_bundle(path: str | Path, change: Callable[[Path, Manifest], None]) -> Bundle:
    """Apply ``change(staging_dir, manifest)`` to a copy of the bundle and swap it in atomically.

    The copy holds the manifest and the files it lists only (symbolic links are refused: see
    :func:`confined_path`). A signed bundle loses its signature (its files change); this is logged as a
    warning: sign it again with ``eecompile sign``."""
    bundle = Bundle.load(path)
    signed = (bundle.path / SIGNATURE).exists()
    with staged_bundle(bundle.path, copy_from=bundle.path) as tmp:
        change(tmp, bundle.manifest)
        write_manifest(tmp, bundle.manifest)
    if signed:
        log.warning("%s: the bundle was rewritten, so its signature (%s) no longer holds and was removed; sign "
                    "it again with `eecompile sign %s --private-key KEY.pem`", bundle.path, SIGNATURE, bundle.path)
    return Bundle.load(bundle.path)
