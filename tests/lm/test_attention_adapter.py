"""Kangaroo's attention adapter as a draft head: trained by train-heads, its own key/value cache kept like a segment's."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from eecompile.bundle import Bundle
from eecompile.cli import cli
from eecompile.runtimes.lm import DecoderRunner
from tests.lm.test_generate import PROMPTS


@pytest.fixture(scope="module")
def kangaroo(lm_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from eecompile.decoder.train import train_draft_heads

    dest = tmp_path_factory.mktemp("kangaroo") / "tiny.eebundle"
    shutil.copytree(lm_bundle, dest)
    rep = train_draft_heads(dest, vocab=48, epochs=3, max_tokens=900, generate_tokens=0, threads=1,
                            adapter="attention")
    assert rep.exits[0]["adapter"] == "attention"
    return dest


def _from_scratch(runner: DecoderRunner, ids: list[int]) -> np.ndarray:
    """The adapter's output at every position of ``ids``, computed in one call on a fresh cache."""
    row = runner._new_rows([ids])[0]
    outs = runner._stack([row], 0, runner.exits[0]["segment"])
    return runner._adapt(0, [row], outs)[0]


def test_the_adapter_is_a_cache_owning_graph_in_the_bundle(kangaroo: Path) -> None:
    info = Bundle.load(kangaroo).manifest.decoder["exits"][0]["draft_head"]  # type: ignore[index]
    seg = info["adapter_segment"]
    assert seg["file"] == "adapter0.onnx" and seg["layers"] == [4, 5] and seg["kv_update"] == "tensor_scatter"
    assert info["adapter_check"] < 1e-4  # the exported graph, prefill + 2 steps on its cache, equals the torch module
    import onnx

    ops = [n.op_type for n in onnx.load(str(kangaroo / "adapter0.onnx")).graph.node]
    assert ops.count("TensorScatter") == 2 and ops.count("Attention") == 1
    r = DecoderRunner(kangaroo, threads=1)
    assert r.has_attention_adapter(0) and r.in_place
    shown = CliRunner().invoke(cli, ["inspect", str(kangaroo)])
    assert shown.exit_code == 0 and "attention adapter adapter0.onnx (own KV cache)" in shown.output


@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_speculative_with_the_attention_adapter_equals_none(kangaroo: Path, batch: int) -> None:
    r = DecoderRunner(kangaroo, threads=1)
    plain = [x["token_ids"] for x in r.generate(PROMPTS, 12).results]
    for thr in ("always", 0.3):
        r.calls["kv_bytes_copied"] = 0
        res = r.generate(PROMPTS, 12, mode="speculative", thresholds=thr, draft_tokens=3, batch=batch)
        assert [x["token_ids"] for x in res.results] == plain
        assert r.calls["segments"][2] > 0 and r.calls["kv_bytes_copied"] == 0  # the adapter ran, in place
    never = r.generate(PROMPTS, 12, mode="exit", thresholds="never")
    assert [x["token_ids"] for x in never.results] == plain


def test_the_adapter_cache_stays_right_through_rejected_drafts(kangaroo: Path) -> None:
    """Every draft step's adapter output (incremental: its cache, rows of a batch in one call, drafts rejected
    and overwritten) equals the adapter run from scratch over the row's sequence so far."""
    r = DecoderRunner(kangaroo, threads=1)
    ref = DecoderRunner(kangaroo, threads=1)
    checked: list[float] = []
    adapt = r._adapt

    def spy(k: int, rows: list[Any], outs: list[np.ndarray]) -> list[np.ndarray]:
        got = adapt(k, rows, outs)
        for row, g in zip(rows, got, strict=True):
            want = _from_scratch(ref, list(row.seq[:row.lengths[0]]))[-len(g):]
            checked.append(float(np.abs(g - want).max()))
        return got

    r._adapt = spy  # type: ignore[method-assign]
    res = r.generate(PROMPTS, 14, mode="speculative", thresholds="always", draft_tokens=3)
    assert 0.0 < res.acceptance_rate < 1.0  # type: ignore[operator]  (some drafts were rejected)
    assert len(checked) > 20 and max(checked) < 1e-4


def test_exit_mode_tokens_are_the_adapter_head_from_scratch(kangaroo: Path) -> None:
    # every token exits at the adapter's draft head: its cache, filled step by step, gives the tokens a fresh
    # computation over the whole sequence gives
    r = DecoderRunner(kangaroo, threads=1)
    res = r.generate(PROMPTS[:2], 6, mode="exit", thresholds="always", batch=2)
    assert res.exit_shares == [1.0, 0.0]
    ref = DecoderRunner(kangaroo, threads=1)
    for p, out in zip(PROMPTS[:2], res.results, strict=True):
        ids = list(p)
        for _ in range(6):
            h = _from_scratch(ref, ids)
            ids.append(int(ref._exit_head(0, h[None, -1:], 2.0, False)["token"][0, 0]))
        assert out["token_ids"] == ids[len(p):]


def test_cli_train_heads_with_the_attention_adapter(lm_bundle: Path, tmp_path: Path) -> None:
    dest = tmp_path / "b.eebundle"
    shutil.copytree(lm_bundle, dest)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    res = CliRunner().invoke(cli, ["train-heads", str(dest), "--text", str(text), "--draft-vocab", "32",
                                   "--epochs", "1", "--max-tokens", "400", "--adapter", "attention"])
    assert res.exit_code == 0, res.output
    info = Bundle.load(dest).manifest.decoder["exits"][0]["draft_head"]  # type: ignore[index]
    assert info["adapter"] == "attention" and (dest / "adapter0.onnx").is_file()
    # training again with the MLP adapter drops the attention adapter's file
    res = CliRunner().invoke(cli, ["train-heads", str(dest), "--text", str(text), "--draft-vocab", "32",
                                   "--epochs", "1", "--max-tokens", "400"])
    assert res.exit_code == 0, res.output
    assert not (dest / "adapter0.onnx").exists()
    assert "adapter_segment" not in Bundle.load(dest).manifest.decoder["exits"][0]["draft_head"]  # type: ignore[index]
