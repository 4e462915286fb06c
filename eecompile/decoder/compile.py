"""Compile a decoder spec (``kind: decoder``) into a decoding bundle.

Example spec::

    kind: decoder
    model: smollm2.onnx
    max_length: 512            # positions the cache holds (prompt + generated)
    exits:
      - after_layer: 8         # or at: TENSOR (a layer's output)
        gate: {kind: max_prob, threshold: 0.6}
        draft_tokens: 6        # k: speculative drafting stops after this many tokens
    final: {hidden: layers.29.output}   # the final norm's input (default: eecompile's export name)

The bundle holds ``segment{k}.onnx`` (layers between cuts, each with its own cache), ``head.onnx`` (final
norm + LM head + gate, shared by every exit and the final output) and ``weights.bin``: every weight of every
file, stored once (the tied embedding is read by segment 0's Gather and the head's Gemm from the same bytes).
After writing, the chain is checked against the source model (prefill and one decode step, batch 2).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from eecompile import __version__
from eecompile.bundle import (
    Bundle,
    Manifest,
    TensorInfo,
    check_output_bundle,
    sha256_file,
    staged_bundle,
    write_manifest,
)
from eecompile.errors import GraphError, SpecError

log = logging.getLogger(__name__)

WEIGHTS = "weights.bin"
TOKENIZER = "tokenizer.json"
INLINE_BYTES = 1024  # smaller initializers stay inside their graph
GATE_KINDS = ("max_prob",)
KV_CACHE = ("in_place", "concat")  # a preallocated cache written in place (TensorScatter), or the export's Concat


@dataclass(frozen=True)
class DecoderExitSpec:
    at: str
    threshold: float
    draft_tokens: int


@dataclass(frozen=True)
class DecoderSpec:
    model: Path
    exits: tuple[DecoderExitSpec, ...]
    final_hidden: str | None
    max_length: int | None
    tokenizer: Path | None = None
    eos_token_id: int | None = None
    kv_cache: str = "in_place"


def is_decoder_spec(path: str | Path) -> bool:
    """True when the YAML at ``path`` says ``kind: decoder`` (unreadable files are left to the normal parser)."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and raw.get("kind") == "decoder"


def _int(v: Any, where: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise SpecError(f"{where}: expected an integer >= {lo}, got {v!r}")
    return v


def parse_decoder_spec(path: str | Path) -> DecoderSpec:
    """Parse a ``kind: decoder`` spec; raise ``SpecError`` naming the YAML path of a bad entry."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: spec file not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SpecError(f"{path}: cannot read the spec ({e})") from e
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec is a mapping")
    known = {"kind", "model", "exits", "final", "max_length", "tokenizer", "eos_token_id", "kv_cache"}
    extra = sorted(set(raw) - known)
    if extra:
        raise SpecError(f"{path}: unknown key(s) {extra} in a decoder spec; known: {sorted(known)}")
    if not isinstance(raw.get("model"), str):
        raise SpecError(f"{path}: model: give the path of the decoder's .onnx file")
    exits = []
    for k, item in enumerate(raw.get("exits") or []):
        where = f"exits[{k}]"
        if not isinstance(item, dict):
            raise SpecError(f"{where}: expected a mapping with after_layer or at")
        bad = sorted(set(item) - {"after_layer", "at", "gate", "draft_tokens"})
        if bad:
            raise SpecError(f"{where}: unknown key(s) {bad}; known: after_layer, at, gate, draft_tokens")
        if ("at" in item) == ("after_layer" in item):
            raise SpecError(f"{where}: give exactly one of after_layer: N (a layer index) or at: TENSOR")
        if "at" in item:
            if not isinstance(item["at"], str):
                raise SpecError(f"{where}.at: expected a tensor name")
            at = item["at"]
        else:
            from eecompile.models.lm import layer_output_name

            at = layer_output_name(_int(item["after_layer"], f"{where}.after_layer", 0))
        gate = item.get("gate") or {}
        if not isinstance(gate, dict) or gate.get("kind", "max_prob") not in GATE_KINDS:
            raise SpecError(f"{where}.gate.kind: decoder exits support {list(GATE_KINDS)}")
        t = gate.get("threshold", 0.6)
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= float(t) <= 1.0:
            raise SpecError(f"{where}.gate.threshold: expected a number in [0, 1], got {t!r}")
        exits.append(DecoderExitSpec(at, float(t), _int(item.get("draft_tokens", 6), f"{where}.draft_tokens", 1)))
    if not exits:
        raise SpecError(f"{path}: exits: a decoder spec needs at least one exit (after_layer: N)")
    final = raw.get("final") or {}
    if not isinstance(final, dict) or set(final) - {"hidden"}:
        raise SpecError(f"{path}: final: expected {{hidden: TENSOR}}")
    ml = raw.get("max_length")
    tok = raw.get("tokenizer")
    if tok is not None and not isinstance(tok, str):
        raise SpecError(f"{path}: tokenizer: give the path of a tokenizer.json")
    eos = raw.get("eos_token_id")
    kv_cache = raw.get("kv_cache", "in_place")
    if kv_cache not in KV_CACHE:
        raise SpecError(f"{path}: kv_cache: {kv_cache!r} is not one of {list(KV_CACHE)}")
    return DecoderSpec(model=(path.parent / raw["model"]), exits=tuple(exits), final_hidden=final.get("hidden"),
                       max_length=None if ml is None else _int(ml, "max_length", 2),
                       tokenizer=None if tok is None else path.parent / tok,
                       eos_token_id=None if eos is None else _int(eos, "eos_token_id", 0), kv_cache=kv_cache)


def _write_models(root: Path, graphs: dict[str, Any], opsets: dict[str, int]) -> None:
    """Save each graph as ``root/NAME``; initializers over ``INLINE_BYTES`` go to ``weights.bin``, once each."""
    import onnx
    import onnx_ir as ir
    from onnx.external_data_helper import set_external_data

    offsets: dict[bytes, tuple[int, int]] = {}
    with open(root / WEIGHTS, "wb") as f:
        for name, graph in graphs.items():
            model = ir.Model(graph, ir_version=10)
            for domain, version in opsets.items():  # a segment rewritten for an in-place cache keeps its higher opset
                graph.opset_imports[domain] = max(version, graph.opset_imports.get(domain, 0))
            proto = ir.serde.serialize_model(model)
            for t in proto.graph.initializer:
                raw = t.raw_data
                if len(raw) < INLINE_BYTES:
                    continue
                key = hashlib.sha256(raw).digest() + bytes(str((t.data_type, list(t.dims))), "ascii")
                if key not in offsets:
                    pad = (-f.tell()) % 64
                    f.write(b"\0" * pad)
                    offsets[key] = (f.tell(), len(raw))
                    f.write(raw)
                off, length = offsets[key]
                set_external_data(t, WEIGHTS, offset=off, length=length)
                t.data_location = onnx.TensorProto.EXTERNAL
                t.ClearField("raw_data")
            onnx.save(proto, str(root / name))
    for name in graphs:
        try:
            onnx.checker.check_model(str(root / name))
        except onnx.checker.ValidationError as e:
            raise GraphError(f"{name} is not a valid ONNX model ({str(e).splitlines()[0]}); "
                             f"this is a bug in the decoder split, please report it with the model") from e


def _typed(v: Any, dtype: Any, shape: list[Any]) -> None:
    import onnx_ir as ir

    v.dtype = dtype
    v.shape = ir.Shape(shape)


def compile_decoder(spec: DecoderSpec | str | Path, output: str | Path, *, force: bool = False,
                    verify: bool = True) -> Bundle:
    """Compile a decoder spec into a bundle at ``output`` (atomically); return the loaded bundle.

    A model whose layers carry a recurrent state (``past_state.*`` inputs) is compiled by
    ``eecompile.decoder.recurrent``. Raises ``SpecError`` (bad spec, exit not at a layer output), ``GraphError``
    (neither a KV-cache nor a recurrent-state decoder) and ``BundleError`` (destination exists without
    ``force``; the chain does not reproduce the model).
    """
    import onnx_ir as ir

    from eecompile.decoder.cut import cut_head, cut_segments, embedding_of, inspect_decoder

    if not isinstance(spec, DecoderSpec):
        spec = parse_decoder_spec(spec)
    output = Path(output)
    check_output_bundle(output, force)
    if not spec.model.is_file():
        raise SpecError(f"model: '{spec.model}' not found; give the path of the decoder's .onnx file")
    try:
        model = ir.load(spec.model)
    except Exception as e:  # onnx raises several types for a damaged file
        raise GraphError(f"{spec.model}: cannot load the ONNX model ({e})") from e
    from eecompile.decoder.recurrent import compile_recurrent, is_recurrent

    if is_recurrent(model):  # layers carry a recurrent state (past_state.*) instead of a key/value cache
        return compile_recurrent(spec, model, output, verify=verify)
    dg = inspect_decoder(model, str(spec.model))
    from eecompile.models.lm import layer_output_name

    final_hidden = spec.final_hidden or layer_output_name(dg.n_layers - 1)
    for k, ex in enumerate(spec.exits):
        if ex.at == final_hidden:
            raise SpecError(f"exits[{k}]: '{ex.at}' is the last layer's output; an exit must come before it")
    emb = embedding_of(dg)
    d_emb = emb.shape[1] if emb is not None and emb.shape is not None else None
    hidden_size = d_emb if isinstance(d_emb, int) else None
    segments = cut_segments(dg, [e.at for e in spec.exits], final_hidden)
    head = cut_head(dg, final_hidden, emb)
    if hidden_size is None:
        d = head.inputs[0].shape[-1] if head.inputs[0].shape is not None else None
        if not isinstance(d, int):
            raise GraphError(f"'{final_hidden}': the hidden size is not fixed; export with static hidden size")
        hidden_size = d
    name_hidden(segments, head, hidden_size)
    updates = []
    for s in segments:
        done = False
        if spec.kv_cache == "in_place":
            from eecompile.decoder.kv_inplace import UPDATE, rewrite_segment

            done = rewrite_segment(s.graph, s.first, s.last)
            if done:
                s.model_inputs = [m for m in s.model_inputs if m in {v.name for v in s.graph.inputs}]
        updates.append(UPDATE if done else "concat")
    opsets = dict(model.opset_imports)
    graphs = {f"segment{s.index}.onnx": s.graph for s in segments}
    from eecompile.decoder.cut import HIDDEN
    from eecompile.decoder.propagate import propagation_graph

    for s in segments[1:]:  # exit mode's CALM state propagation into the layers after an exit (opt-in at runtime)
        g = propagation_graph(s.graph, s.first, s.last, HIDDEN)
        if g is not None:
            g.opset_imports.update(s.graph.opset_imports)
            graphs[f"propagate{s.index}.onnx"] = g
    graphs["head.onnx"] = head
    decoder = decoder_section(spec, segments, dg.n_layers, dg.vocab, hidden_size,
                              kv={"heads": dg.kv_heads, "head_dim": dg.head_dim, "dtype": "float32"})
    for k, (seg, u) in enumerate(zip(decoder["segments"], updates, strict=True)):
        seg["kv_update"] = u
        if f"propagate{k}.onnx" in graphs:
            seg["propagate"] = f"propagate{k}.onnx"
    if spec.kv_cache == "in_place" and "concat" in updates:
        log.warning("the key/value cache of segments %s stays the exported Concat (a copy per call): their "
                    "attention does not have the shape the in-place rewrite needs",
                    [i for i, u in enumerate(updates) if u == "concat"])
    del head, segments

    def check(tmp: Path) -> None:
        from eecompile.decoder.verify import verify_decoder

        verify_decoder(tmp, spec.model)

    return write_decoder_bundle(spec, output, graphs, opsets, decoder, check if verify else None)


def name_hidden(segments: list[Any], head: Any, hidden_size: int) -> None:
    """Name and type the hidden states a decoder bundle's files pass on: a segment's input ``hidden`` and
    output ``hidden_out``, the head's input ``hidden``, all float32 [batch, seq, hidden_size]."""
    import onnx_ir as ir

    from eecompile.decoder.cut import HIDDEN

    f32 = ir.DataType.FLOAT
    for s in segments:
        for v in s.graph.inputs:
            if v.name == s.hidden_in:
                v.name = HIDDEN
                _typed(v, f32, ["batch", "seq", hidden_size])
        out = s.graph.outputs[0]
        out.name = HIDDEN + "_out"
        _typed(out, f32, ["batch", "seq", hidden_size])
    _typed(head.inputs[0], f32, ["batch", "seq", hidden_size])


def decoder_section(spec: DecoderSpec, segments: list[Any], n_layers: int, vocab: int, hidden_size: int,
                    **extra: Any) -> dict[str, Any]:
    """The manifest's ``decoder`` section for ``segments`` (``segment{k}.onnx``) and the shared ``head.onnx``;
    ``extra`` entries (the cache layout) are added as given. Raises ``SpecError`` for a missing tokenizer file
    or an ``eos_token_id`` outside the vocabulary."""
    from eecompile.decoder.acceptance import SAMPLING_INPUTS
    from eecompile.decoder.cut import HIDDEN

    decoder: dict[str, Any] = {
        "layers": n_layers, "vocab": vocab, "hidden_size": hidden_size, **extra,
        "max_length": spec.max_length or 2048,
        "segments": [{"file": f"segment{s.index}.onnx", "layers": [s.first, s.last],
                      "hidden_in": HIDDEN if s.hidden_in else None, "hidden_out": HIDDEN + "_out",
                      "inputs": s.model_inputs} for s in segments],
        "head": {"file": "head.onnx", "input": HIDDEN, "threshold_input": "threshold",
                 "acceptance_inputs": ["drafts", "n_fed"], "sampling_inputs": SAMPLING_INPUTS,
                 "outputs": ["logits", "token", "max_prob", "gate", "accepted", "next_token"]},
        "exits": [{"after_layer": segments[k].last - 1, "at": e.at, "segment": k,
                   "gate": {"kind": "max_prob", "threshold": e.threshold}, "draft_tokens": e.draft_tokens}
                  for k, e in enumerate(spec.exits)],
        "weights": WEIGHTS,
        "eos_token_id": spec.eos_token_id,
    }
    if spec.tokenizer is not None:
        if not spec.tokenizer.is_file():
            raise SpecError(f"tokenizer: '{spec.tokenizer}' not found; give the path of the model's tokenizer.json")
        decoder["tokenizer"] = TOKENIZER
    if spec.eos_token_id is not None and not 0 <= spec.eos_token_id < vocab:
        raise SpecError(f"eos_token_id: {spec.eos_token_id} is outside the vocabulary (0..{vocab - 1})")
    return decoder


def write_decoder_bundle(spec: DecoderSpec, output: Path, graphs: dict[str, Any], opsets: dict[str, int],
                         decoder: dict[str, Any], verify: Any = None) -> Bundle:
    """Write ``graphs`` (file name -> onnx-ir graph), the tokenizer and the manifest to ``output`` atomically;
    ``verify(tmp_dir)`` (raising ``BundleError``) checks the staged bundle before it is moved into place.
    ``graphs`` is emptied once written (the graphs' memory is freed before the check)."""
    n_seg = len(decoder["segments"])
    manifest = Manifest(source_model={"file": spec.model.name, "sha256": sha256_file(spec.model)},
                        inputs=[TensorInfo(name="input_ids", dtype="int64", shape=["batch", "seq"], batch_axis=0)],
                        outputs=[TensorInfo(name="logits", dtype="float32", shape=["batch", "seq", decoder["vocab"]],
                                            batch_axis=0)],
                        segments=[], eecompile_version=__version__, decoder=decoder,
                        notes=[f"decoder: {n_seg} segments at layers "
                               f"{[s['layers'][1] - 1 for s in decoder['segments'][:-1]]}; "
                               f"generate with `eecompile generate`"])
    with staged_bundle(output) as tmp:
        _write_models(tmp, graphs, opsets)
        if spec.tokenizer is not None:
            shutil.copyfile(spec.tokenizer, tmp / TOKENIZER)
        graphs.clear()
        write_manifest(tmp, manifest)
        if verify is not None:
            verify(tmp)
    log.info("wrote decoder bundle %s", output)
    return Bundle.load(output)
