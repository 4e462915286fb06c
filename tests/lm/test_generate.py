"""Decoding with a decoder bundle: speculative and exit modes against the plain model, batches, sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from scipy import stats

from eecompile.cli import cli
from eecompile.runtimes.lm import DecoderRunner, sampled_verification, softmax, speculative_accept

PROMPTS = [[5, 17, 33], [90, 2, 41, 7, 7, 63, 12], [11], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]]
N_NEW = 16


@pytest.fixture(scope="module")
def plain(runner: DecoderRunner) -> list[list[int]]:
    return [r["token_ids"] for r in runner.generate(PROMPTS, N_NEW, mode="none").results]


def _source_logits(lm_dir: Path, ids: list[int]) -> np.ndarray:
    sess = ort.InferenceSession(str(lm_dir / "tiny.onnx"), providers=["CPUExecutionProvider"])
    x = np.array([ids], np.int64)
    feeds = {"input_ids": x, "attention_mask": np.ones_like(x), "position_ids": np.arange(len(ids))[None]}
    for i in range(4):
        for t in ("key", "value"):
            feeds[f"past_key_values.{i}.{t}"] = np.zeros((1, 2, 0, 16), np.float32)
    return sess.run(["logits"], feeds)[0][0]


def test_plain_generation_is_the_source_models_greedy_decoding(runner: DecoderRunner, lm_dir: Path,
                                                               plain: list[list[int]]) -> None:
    ids = list(PROMPTS[1])
    for _ in range(N_NEW):
        ids.append(int(np.argmax(_source_logits(lm_dir, ids)[-1])))
    assert plain[1] == ids[len(PROMPTS[1]):]


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.6])
def test_greedy_speculative_equals_none_at_batch_1_and_4(runner: DecoderRunner, plain: list[list[int]],
                                                         threshold: float) -> None:
    batch = runner.generate(PROMPTS, N_NEW, mode="speculative", thresholds=threshold, draft_tokens=4)
    assert [r["token_ids"] for r in batch.results] == plain
    for i, p in enumerate(PROMPTS):
        one = runner.generate([p], N_NEW, mode="speculative", thresholds=threshold, draft_tokens=3)
        assert one.results[0]["token_ids"] == plain[i]
    assert batch.acceptance_rate is not None and batch.mean_accepted_length is not None


def test_speculative_accepts_and_rejects_drafts(runner: DecoderRunner, plain: list[list[int]]) -> None:
    # drafting always (threshold 0): some drafts agree with the verifier, some do not, and output is unchanged
    res = runner.generate(PROMPTS, N_NEW, mode="speculative", thresholds="always", draft_tokens=4)
    assert [r["token_ids"] for r in res.results] == plain
    assert 0.0 < res.acceptance_rate < 1.0  # type: ignore[operator]
    assert res.mean_accepted_length > 1.0  # type: ignore[operator]
    assert res.stats["drafted"] > 0


def test_exit_mode_never_is_none_and_always_exits_first(runner: DecoderRunner, plain: list[list[int]]) -> None:
    never = runner.generate(PROMPTS, N_NEW, mode="exit", thresholds="never")
    assert [r["token_ids"] for r in never.results] == plain
    assert never.exit_shares == [0.0, 1.0]
    always = runner.generate(PROMPTS, N_NEW, mode="exit", thresholds="always")
    assert always.exit_shares == [1.0, 0.0]
    assert all(len(r["token_ids"]) == N_NEW for r in always.results)


def test_exit_mode_fills_deep_caches_of_exited_positions(runner: DecoderRunner, plain: list[list[int]]) -> None:
    # mixed exits: tokens exited early are later run through the deep layers with the next deep token
    res = runner.generate(PROMPTS, N_NEW, mode="exit", thresholds=0.3)
    assert 0.0 < res.exit_shares[0] < 1.0  # type: ignore[index]
    agree = np.mean([a == b for r, p in zip(res.results, plain, strict=False) for a, b in zip(r["token_ids"], p, strict=False)])
    assert agree > 0.2
    one = runner.generate([PROMPTS[1]], N_NEW, mode="exit", thresholds=0.3)
    assert one.results[0]["token_ids"] == res.results[1]["token_ids"]  # a row's tokens do not depend on the batch


@pytest.mark.parametrize("mode", ["none", "speculative", "exit"])
def test_rows_finish_at_different_steps(runner: DecoderRunner, plain: list[list[int]], mode: str) -> None:
    eos = plain[0][3]
    want = []
    for p in plain:
        cut = p.index(eos) + 1 if eos in p else len(p)
        want.append(p[:cut])
    assert len({len(w) for w in want}) > 1
    thr = "never" if mode == "exit" else "always"
    res = runner.generate(PROMPTS, N_NEW, mode=mode, thresholds=thr, eos_token_id=eos)
    assert [r["token_ids"] for r in res.results] == want
    res = runner.generate(PROMPTS, N_NEW, mode=mode, thresholds=thr, eos_token_id=eos, batch=3)
    assert [r["token_ids"] for r in res.results] == want


def test_max_new_tokens_is_respected_with_long_drafts(runner: DecoderRunner, plain: list[list[int]]) -> None:
    for n in (1, 2, 5):
        res = runner.generate(PROMPTS, n, mode="speculative", thresholds="always", draft_tokens=6)
        assert [r["token_ids"] for r in res.results] == [p[:n] for p in plain]


def test_accept_resample_rule_follows_its_formula() -> None:
    p = np.array([0.5, 0.2, 0.2, 0.1])
    q = np.array([0.1, 0.6, 0.2, 0.1])
    for seed in range(50):
        for draft in range(4):
            tok, ok = speculative_accept(p, q, draft, np.random.default_rng(seed))
            ref = np.random.default_rng(seed)
            accept = ref.random() < min(1.0, p[draft] / q[draft])
            assert ok == accept
            if accept:
                assert tok == draft
            else:
                residual = np.maximum(p - q, 0)
                assert tok == ref.choice(4, p=residual / residual.sum())
    # over many draws, drawing from q then accepting/resampling gives p
    rng = np.random.default_rng(0)
    draws = [speculative_accept(p, q, int(rng.choice(4, p=q)), rng)[0] for _ in range(20000)]
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, p, atol=0.015)


def _chi2_pvalue(tokens: np.ndarray, p: np.ndarray) -> float:
    n = len(tokens)
    counts = np.bincount(tokens, minlength=len(p)).astype(float)
    expected = p * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float(stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue)


def test_speculative_sampling_first_token_follows_the_full_model(runner: DecoderRunner, lm_dir: Path) -> None:
    prompt, temperature, n = [5, 17, 33], 1.5, 3000
    p = softmax(_source_logits(lm_dir, prompt)[-1], temperature)
    res = runner.generate([prompt] * n, 2, mode="speculative", thresholds="always", draft_tokens=1, sample=True,
                          temperature=temperature, seed=0, batch=250)
    first = np.array([r["token_ids"][0] for r in res.results])
    assert 0.0 < res.acceptance_rate < 1.0  # type: ignore[operator]
    assert _chi2_pvalue(first, p) > 1e-3
    # the test can fail: the draft distribution itself is far from p
    rows = [runner._new_row(0, prompt)]
    h = runner._stack(rows, 0, 0)[0]
    q = softmax(runner._run_head(h[None, -1:], 2.0, True)["logits"][0, 0], temperature)
    drafts = np.random.default_rng(0).choice(len(q), size=n, p=q)
    assert _chi2_pvalue(drafts, p) < 1e-6


def test_sampling_is_reproducible_with_a_seed(runner: DecoderRunner) -> None:
    a = runner.generate(PROMPTS, 8, mode="speculative", sample=True, seed=3, thresholds="always")
    b = runner.generate(PROMPTS, 8, mode="speculative", sample=True, seed=3, thresholds="always")
    assert [r["token_ids"] for r in a.results] == [r["token_ids"] for r in b.results]


def test_cli_generate_json(lm_bundle: Path, runner: DecoderRunner) -> None:
    res = CliRunner().invoke(cli, ["generate", str(lm_bundle), "--prompt", "Hello", "--prompt", "A longer prompt",
                                   "--max-new-tokens", "6", "--mode", "speculative", "--json", "--threads", "1"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert set(out) == {"results", "tokens_per_s", "acceptance_rate", "mean_accepted_length", "exit_shares"}
    assert [r["prompt"] for r in out["results"]] == ["Hello", "A longer prompt"]
    assert all(len(r["token_ids"]) == 6 and isinstance(r["text"], str) for r in out["results"])
    assert out["tokens_per_s"] > 0
    plain = runner.generate(["Hello", "A longer prompt"], 6)
    assert [r["token_ids"] for r in out["results"]] == [r["token_ids"] for r in plain.results]
    assert [r["text"] for r in out["results"]] == [r["text"] for r in plain.results]


@pytest.mark.parametrize("mode", ["speculative", "exit"])
def test_sampling_without_drafts_or_exits_is_plain_sampling(runner: DecoderRunner, mode: str) -> None:
    # no gate fires: the same draws from the same generator, so the same tokens as mode none
    plain = runner.generate(PROMPTS, 10, mode="none", sample=True, temperature=0.8, seed=5)
    other = runner.generate(PROMPTS, 10, mode=mode, thresholds="never", sample=True, temperature=0.8, seed=5)
    assert [r["token_ids"] for r in other.results] == [r["token_ids"] for r in plain.results]


def test_greedy_acceptance_is_computed_in_the_head(lm_bundle: Path, runner: DecoderRunner,
                                                  plain: list[list[int]]) -> None:
    assert runner.in_graph_acceptance
    rng = np.random.default_rng(0)
    h = rng.normal(size=(3, 5, runner.hidden_size)).astype(np.float32)
    tok = runner._run_head(h, 2.0, False)["token"]
    drafts = np.full((3, 5), -1, np.int64)
    drafts[0, :2] = tok[0, :2]  # 2 agree, then a different one
    drafts[0, 2] = (tok[0, 2] + 1) % runner.vocab
    drafts[1, :4] = tok[1, :4]  # all 4 drafts agree: the verifier's token after them comes next
    drafts[2, :5] = tok[2, :5]  # all 5 agree and 5 positions fed: nothing after them
    out = runner._run_head(h, 2.0, False, drafts=drafts, n_fed=np.array([5, 5, 5], np.int64))
    assert out["accepted"].tolist() == [2, 4, 5]
    assert out["next_token"].tolist() == [tok[0, 2], tok[1, 4], -1]
    host = DecoderRunner(lm_bundle, threads=1)
    host.in_graph_acceptance = False  # the host comparison gives the same tokens
    res = host.generate(PROMPTS, N_NEW, mode="speculative", thresholds="always", draft_tokens=4)
    assert [r["token_ids"] for r in res.results] == plain


def test_sampled_acceptance_in_the_head_is_the_host_rule(runner: DecoderRunner) -> None:
    """With fixed draws, the head's graph (speculative rejection sampling, eecompile.decoder.acceptance) gives the
    accepted length and next token of the host formula, row by row, greedy rows included."""
    assert runner.in_graph_sampling
    rng = np.random.default_rng(0)
    b, n, v = 6, 5, runner.vocab
    temperature = np.array([0.7, 1.0, 1.5, 1.0, 0.0, 2.0], np.float32)  # row 4 is greedy
    n_fed = np.array([5, 5, 3, 5, 5, 1], np.int64)
    n_drafts = [4, 5, 2, 0, 3, 0]  # row 1: the last draft was not fed (no token after it when all are kept)
    seen = {"rejected": 0, "all kept + next": 0, "all kept, none after": 0}
    for _ in range(40):
        h = (rng.normal(size=(b, n, runner.hidden_size)) * 3).astype(np.float32)
        logits = runner._run_head(h, 2.0, True)["logits"].astype(np.float64)
        drafts = np.full((b, n), -1, np.int64)
        q = np.zeros((b, n, v), np.float32)
        for i in range(b):
            t = temperature[i] if temperature[i] > 0 else 1.0
            for j in range(n_drafts[i]):
                mix = rng.uniform(0.0, 1.0)  # from q = p (always kept) to an unrelated q (often rejected)
                q[i, j] = (1 - mix) * softmax(logits[i, j], t) + mix * rng.dirichlet(np.full(v, 0.3))
                drafts[i, j] = rng.choice(v, p=q[i, j] / q[i, j].sum())
        u_accept = rng.random((b, n)).astype(np.float32)
        u_sample = rng.random(b).astype(np.float32)
        feeds = {"temperature": temperature, "draft_probs": q, "u_accept": u_accept, "u_sample": u_sample}
        out = runner._run_head(h, 2.0, False, drafts=drafts, n_fed=n_fed, sampling=feeds)
        greedy = runner._run_head(h, 2.0, False, drafts=drafts, n_fed=n_fed)
        for i in range(b):
            got = (int(out["accepted"][i]), int(out["next_token"][i]))
            if temperature[i] <= 0:
                assert got == (int(greedy["accepted"][i]), int(greedy["next_token"][i]))
                continue
            p = np.stack([softmax(logits[i, j], temperature[i]) for j in range(n_fed[i])])
            want = sampled_verification(p, q[i, :n_drafts[i]].astype(np.float64), list(drafts[i, :n_drafts[i]]),
                                        u_accept[i, :n_drafts[i]].astype(np.float64), float(u_sample[i]))
            assert got == want, (i, got, want)
            seen["rejected" if want[0] < n_drafts[i] else
                 "all kept + next" if want[1] >= 0 else "all kept, none after"] += 1
    assert all(c > 0 for c in seen.values()), seen  # every branch of the rule was compared


def test_sampled_verification_in_the_graph_and_on_the_host_give_the_same_tokens(lm_bundle: Path,
                                                                                runner: DecoderRunner) -> None:
    # the same seeded draws feed both: a bundle whose head lacks the sampling inputs decodes to the same tokens
    host = DecoderRunner(lm_bundle, threads=1)
    host.in_graph_sampling = False
    kw = {"mode": "speculative", "thresholds": "always", "draft_tokens": 3, "sample": True, "temperature": 1.2,
          "seed": 7}
    a = runner.generate(PROMPTS, 12, **kw)  # type: ignore[arg-type]
    b = host.generate(PROMPTS, 12, **kw)  # type: ignore[arg-type]
    assert [r["token_ids"] for r in a.results] == [r["token_ids"] for r in b.results]
    assert 0.0 < a.acceptance_rate < 1.0 and a.acceptance_rate == b.acceptance_rate  # type: ignore[operator]


def test_cli_says_when_speculative_mode_drafted_nothing(lm_bundle: Path) -> None:
    """With no draft (threshold never reached, or drafting off at this batch size after calibration) the summary
    line said "acceptance 0.0%, 0.00 tokens per verification", as if drafts had been rejected."""
    args = ["generate", str(lm_bundle), "--prompt", "Hello", "--max-new-tokens", "4", "--mode", "speculative",
            "--threads", "1", "--thresholds"]
    res = CliRunner().invoke(cli, [*args, "never"])
    assert res.exit_code == 0, res.output
    assert "no token drafted" in res.stderr and "acceptance" not in res.stderr, res.stderr
    res = CliRunner().invoke(cli, [*args, "always"])
    assert res.exit_code == 0 and "tokens per verification" in res.stderr, res.stderr
