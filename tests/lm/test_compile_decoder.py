"""Compiling a decoder: segments own their layers' caches, the tied head is stored once, the chain is verified."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import yaml
from click.testing import CliRunner

from eecompile.bundle import Bundle
from eecompile.cli import cli


def _external(path: Path) -> dict[str, tuple[str, int, int]]:
    proto = onnx.load(str(path), load_external_data=False)
    out = {}
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            kv = {e.key: e.value for e in t.external_data}
            out[t.name] = (kv["location"], int(kv["offset"]), int(kv["length"]))
    return out


def test_segments_own_their_layers_cache(lm_bundle: Path) -> None:
    dec = Bundle.load(lm_bundle).manifest.decoder
    assert dec is not None
    assert [s["layers"] for s in dec["segments"]] == [[0, 2], [2, 4]]
    assert dec["exits"][0]["after_layer"] == 1
    for seg, layers in zip(dec["segments"], ([0, 1], [2, 3]), strict=False):
        g = onnx.load(str(lm_bundle / seg["file"]), load_external_data=False).graph
        past = sorted(i.name for i in g.input if i.name.startswith("past_key_values"))
        present = sorted(o.name for o in g.output if o.name.startswith("present"))
        assert past == sorted(f"past_key_values.{i}.{t}" for i in layers for t in ("key", "value"))
        assert present == sorted(f"present.{i}.{t}" for i in layers for t in ("key", "value"))


def test_tied_embedding_is_stored_once(lm_bundle: Path, lm_dir: Path) -> None:
    src = onnx.load(str(lm_dir / "tiny.onnx"))
    emb = next(t for t in src.graph.initializer if t.name.endswith("embed_tokens.weight"))
    raw = onnx.numpy_helper.to_array(emb).tobytes()
    weights = (lm_bundle / "weights.bin").read_bytes()
    assert weights.count(raw) == 1
    seg0 = _external(lm_bundle / "segment0.onnx")
    head = _external(lm_bundle / "head.onnx")
    assert seg0[emb.name] == head[emb.name]  # the same bytes, read by the Gather and the head's Gemm
    head_ops = [n.op_type for n in onnx.load(str(lm_bundle / "head.onnx"), load_external_data=False).graph.node]
    assert "Gemm" in head_ops and "MatMul" not in head_ops
    # the bundle holds no more weight bytes than the source model (which stores the head's transpose as well)
    src_bytes = sum(len(t.raw_data) for t in src.graph.initializer)
    assert len(weights) < src_bytes - len(raw) * 0.9
    seg1 = _external(lm_bundle / "segment1.onnx")
    assert emb.name not in seg1  # the deep segment takes the embeddings' shape from its hidden input


def test_head_gate_is_in_the_graph(runner) -> None:  # type: ignore[no-untyped-def]
    rows = [runner._new_row(0, [1, 2, 3])]
    h = runner._stack(rows, 0, 0)[0][None]
    lo = runner._run_head(h, 0.0, True)
    hi = runner._run_head(h, 1.0, True)
    probs = np.exp(lo["logits"] - lo["logits"].max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(lo["max_prob"], probs.max(-1), rtol=1e-5)
    assert (lo["token"] == lo["logits"].argmax(-1)).all()
    assert lo["gate"].all() and not hi["gate"].any()


def test_cli_compile_prints_the_decoder_summary(lm_dir: Path, tmp_path: Path) -> None:
    spec = yaml.safe_load((lm_dir / "spec.yaml").read_text())
    spec["model"] = str(lm_dir / "tiny.onnx")
    spec["tokenizer"] = str(lm_dir / "tokenizer.json")
    spec["exits"] = [{"after_layer": 0}, {"after_layer": 2}]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    res = CliRunner().invoke(cli, ["compile", str(tmp_path / "spec.yaml"), "-o", str(tmp_path / "b.eebundle")])
    assert res.exit_code == 0, res.output
    assert "decoder, 4 layers in 3 segments" in res.output
    assert "segment 1: layers 1..2" in res.output
    res = CliRunner().invoke(cli, ["compile", str(tmp_path / "spec.yaml"), "-o", str(tmp_path / "b.eebundle")])
    assert res.exit_code == 1 and "already exists" in res.output
    # two exits: speculative drafts with either; greedy output is the plain model's
    from eecompile.runtimes.lm import DecoderRunner

    r = DecoderRunner(tmp_path / "b.eebundle", threads=1)
    prompts = [[1, 2, 3], [7] * 9]
    plain = [x["token_ids"] for x in r.generate(prompts, 10).results]
    for e in (0, 1):
        res2 = r.generate(prompts, 10, mode="speculative", exit=e, thresholds="always")
        assert [x["token_ids"] for x in res2.results] == plain
    never = r.generate(prompts, 10, mode="exit", thresholds="never")
    assert [x["token_ids"] for x in never.results] == plain
    mixed = r.generate(prompts, 10, mode="exit", thresholds=[0.5, 0.3])
    assert len(mixed.exit_shares) == 3 and abs(sum(mixed.exit_shares) - 1) < 1e-9  # type: ignore[arg-type]
