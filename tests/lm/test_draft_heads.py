"""Draft heads trained by self-distillation: an adapter + a sub-vocabulary head per exit, spliced into the bundle."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from eecompile.bundle import Bundle
from eecompile.cli import cli
from eecompile.runtimes.lm import DecoderRunner, softmax
from tests.lm.test_generate import PROMPTS, _chi2_pvalue, _source_logits


@pytest.fixture(scope="module")
def trained(lm_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from eecompile.decoder.train import train_draft_heads

    dest = tmp_path_factory.mktemp("draft") / "tiny.eebundle"
    shutil.copytree(lm_bundle, dest)
    rep = train_draft_heads(dest, vocab=48, hidden=64, epochs=4, max_tokens=900, generate_tokens=0, threads=1)
    assert len(rep.exits) == 1 and rep.exits[0]["vocab"] == 48
    assert 0.0 < rep.exits[0]["coverage"] <= 1.0
    return dest


def test_draft_head_is_in_the_bundle(trained: Path) -> None:
    dec = Bundle.load(trained).manifest.decoder
    info = dec["exits"][0]["draft_head"]  # type: ignore[index]
    assert info["file"] == "draft0.onnx" and (trained / "draft0.onnx").is_file()
    assert info["agreement"] >= info["agreement_before"] - 0.05


def test_inspect_shows_the_draft_head(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from eecompile.inspect import describe_bundle, print_bundle

    (e,) = describe_bundle(trained)["decoder"]["exits"]
    assert e["draft_head"]["file"] == "draft0.onnx" and e["draft_head"]["vocab"] == 48
    print_bundle(trained)
    assert "draft0.onnx: 48 tokens, agreement" in capsys.readouterr().out


def test_greedy_speculative_with_a_draft_head_equals_none(trained: Path) -> None:
    r = DecoderRunner(trained, threads=1)
    plain = [x["token_ids"] for x in r.generate(PROMPTS, 12).results]
    for thr in ("always", 0.3):
        res = r.generate(PROMPTS, 12, mode="speculative", thresholds=thr, draft_tokens=3)
        assert [x["token_ids"] for x in res.results] == plain
        assert r.calls.get("draft_head", 0) > 0
    never = r.generate(PROMPTS, 12, mode="exit", thresholds="never")
    assert [x["token_ids"] for x in never.results] == plain


def test_sampling_with_a_sub_vocabulary_draft_follows_the_full_model(trained: Path, lm_dir: Path) -> None:
    # the draft proposes only 48 of 128 tokens (q = 0 elsewhere); resampling from max(0, p - q) restores the rest
    r = DecoderRunner(trained, threads=1)
    prompt, temperature, n = [5, 17, 33], 1.5, 3000
    p = softmax(_source_logits(lm_dir, prompt)[-1], temperature)
    res = r.generate([prompt] * n, 2, mode="speculative", thresholds="always", draft_tokens=1, sample=True,
                     temperature=temperature, seed=1)
    first = np.array([x["token_ids"][0] for x in res.results])
    assert _chi2_pvalue(first, p) > 1e-3
    outside = np.setdiff1d(np.arange(128), r._draft_ids[0])
    assert np.isin(first, outside).any()  # tokens the draft cannot propose still come out


def test_cli_train_heads_on_a_decoder_bundle(lm_bundle: Path, tmp_path: Path) -> None:
    dest = tmp_path / "b.eebundle"
    shutil.copytree(lm_bundle, dest)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    res = CliRunner().invoke(cli, ["train-heads", str(dest), "--text", str(text), "--draft-vocab", "32",
                                   "--epochs", "1", "--max-tokens", "400"])
    assert res.exit_code == 0, res.output
    assert "trained 1 draft head(s)" in res.output
    assert Bundle.load(dest).manifest.decoder["exits"][0]["draft_head"]["vocab"] == 32  # type: ignore[index]
