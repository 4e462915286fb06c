"""Recurrent-state (Mamba-style) decoders: compile with per-segment states, decode in every mode, batches, errors.

A tiny random-weight ``TinyMamba`` (eecompile.models.mamba; nothing downloaded) is exported with its states and
compiled once per module; the torch model run one position at a time (the sequential recurrence) is the
reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
import yaml
from click.testing import CliRunner

from eecompile.cli import cli
from eecompile.decoder.compile import compile_decoder
from eecompile.errors import DataError, GraphError, SpecError
from eecompile.models.lm import char_tokenizer
from eecompile.models.mamba import export_mamba, tiny_mamba
from eecompile.runtimes.lm import DecoderRunner
from eecompile.runtimes.recurrent import RecurrentDecoderRunner

PROMPTS = [[5, 17, 33, 2, 90], [90, 2, 41, 7, 7, 63, 12, 100, 8], [11]]
N_NEW = 16
EXIT_LAYER = 1


def _compile(root: Path, model_file: str, out: str, exits: list[dict] | None = None) -> Path:
    spec = {"kind": "decoder", "model": model_file, "max_length": 128,
            "exits": exits or [{"after_layer": EXIT_LAYER, "gate": {"kind": "max_prob", "threshold": 0.5},
                                "draft_tokens": 4}]}
    (root / f"{out}.yaml").write_text(yaml.safe_dump(spec))
    compile_decoder(root / f"{out}.yaml", root / out)
    return root / out


@pytest.fixture(scope="module")
def mamba() -> torch.nn.Module:
    return tiny_mamba(seed=0)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, mamba: torch.nn.Module) -> Path:
    root = tmp_path_factory.mktemp("mamba")
    export_mamba(mamba, root / "mamba.onnx")
    _compile(root, "mamba.onnx", "mamba.eebundle")
    return root


@pytest.fixture(scope="module")
def runner(root: Path) -> DecoderRunner:
    return DecoderRunner(root / "mamba.eebundle", threads=1)


@pytest.fixture(scope="module")
def plain(runner: DecoderRunner) -> list[list[int]]:
    return [r["token_ids"] for r in runner.generate(PROMPTS, N_NEW, mode="none").results]


def _torch_greedy(model: torch.nn.Module, prompt: list[int], n: int, exit_threshold: float | None = None) -> list[int]:
    """Greedy decoding with the torch model fed one position per call (the sequential recurrence). With
    ``exit_threshold``: a token is the exit head's (final norm + tied head on layer EXIT_LAYER's output) when its
    max-prob reaches the threshold, else the final head's (every layer still runs every position)."""
    states = model.zero_states(1)
    seq, out = list(prompt), []
    with torch.no_grad():
        for t in range(len(prompt) + n - 1):
            res = model(torch.tensor([[seq[t]]]), torch.ones(1, 1, dtype=torch.int64), *states)
            states = list(res[1:1 + len(states)])
            if t < len(prompt) - 1:
                continue
            token = int(res[0][0, -1].argmax())
            if exit_threshold is not None:
                tap = res[1 + len(states) + EXIT_LAYER]
                p = (model.norm_f(tap) @ model.embed.weight.t())[0, -1].softmax(-1)
                if float(p.max()) >= exit_threshold:
                    token = int(p.argmax())
            seq.append(token)
            out.append(token)
    return out


def test_closed_form_scan_equals_the_step_by_step_recurrence(mamba: torch.nn.Module) -> None:
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        whole = mamba(ids, mask, *mamba.zero_states(2))
        states, logits = mamba.zero_states(2), []
        for t in range(ids.shape[1]):
            res = mamba(ids[:, t:t + 1], mask[:, t:t + 1], *states)
            states = list(res[1:9])
            logits.append(res[0])
    assert torch.allclose(whole[0], torch.cat(logits, 1), atol=1e-4)
    for a, b in zip(whole[1:9], states, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_segments_own_their_layers_states(root: Path, runner: DecoderRunner) -> None:
    assert isinstance(runner, RecurrentDecoderRunner)
    dec = runner.dec
    assert dec["state"]["parts"] == {"conv": [64, 3], "ssm": [64, 8]} and "kv" not in dec
    assert [s["layers"] for s in dec["segments"]] == [[0, EXIT_LAYER + 1], [EXIT_LAYER + 1, 4]]
    for seg in dec["segments"]:
        proto = onnx.load(str(root / "mamba.eebundle" / seg["file"]), load_external_data=False)
        names = {i.name for i in proto.graph.input}
        outs = {o.name for o in proto.graph.output}
        layers = range(*seg["layers"])
        assert {n for n in names if n.startswith("past_state.")} == {f"past_state.{i}.{p}" for i in layers
                                                                      for p in ("ssm", "conv")}
        assert {n for n in outs if n.startswith("present_state.")} == {f"present_state.{i}.{p}" for i in layers
                                                                        for p in ("ssm", "conv")}
    shown = CliRunner().invoke(cli, ["inspect", str(root / "mamba.eebundle"), "--json"])
    assert shown.exit_code == 0, shown.output
    described = json.loads(shown.output)["decoder"]
    assert described["state"]["parts"] == dec["state"]["parts"]
    assert {s["kv_cache"] for s in described["segments"]} == {"recurrent"}
    # the tied embedding is stored once: segment 0's Gather and the head's Gemm read the same bytes
    emb = 128 * 32 * 4
    assert (root / "mamba.eebundle" / "weights.bin").stat().st_size < 2 * emb + 4 * 64 * 1024


def test_none_is_the_torch_models_step_by_step_greedy_decoding(mamba: torch.nn.Module,
                                                               plain: list[list[int]]) -> None:
    for prompt, got in zip(PROMPTS, plain, strict=True):
        assert got == _torch_greedy(mamba, prompt, N_NEW)


@pytest.mark.parametrize(("threshold", "k"), [("always", 4), ("always", 2), (0.5, 3)])
def test_greedy_speculative_equals_none_at_batch_1_and_3(runner: DecoderRunner, plain: list[list[int]],
                                                         threshold: object, k: int) -> None:
    batch = runner.generate(PROMPTS, N_NEW, mode="speculative", thresholds=threshold, draft_tokens=k)
    assert [r["token_ids"] for r in batch.results] == plain
    for i, p in enumerate(PROMPTS):
        assert runner.generate([p], N_NEW, mode="speculative", thresholds=threshold,
                               draft_tokens=k).results[0]["token_ids"] == plain[i]
    if threshold == "always":  # drafts were both accepted and rejected: the state rewind ran
        assert 0.0 < batch.acceptance_rate < 1.0  # type: ignore[operator]


def test_exit_mode_never_is_none(runner: DecoderRunner, plain: list[list[int]]) -> None:
    res = runner.generate(PROMPTS, N_NEW, mode="exit", thresholds="never")
    assert [r["token_ids"] for r in res.results] == plain
    assert res.exit_shares == [0.0, 1.0]


def test_exit_mode_runs_pending_positions_through_the_deep_segments(runner: DecoderRunner, mamba: torch.nn.Module,
                                                                    plain: list[list[int]]) -> None:
    # a token that exits leaves its exit hidden state pending; the deep layers' states then come from the same
    # hidden states as the full model's, so exit mode equals the torch model with the exit rule applied per token
    res = runner.generate(PROMPTS, N_NEW, mode="exit", thresholds=0.6)
    assert 0.0 < res.exit_shares[0] < 1.0  # type: ignore[index]
    for prompt, r in zip(PROMPTS, res.results, strict=True):
        assert r["token_ids"] == _torch_greedy(mamba, prompt, N_NEW, exit_threshold=0.6)
    assert [r["token_ids"] for r in res.results] != plain


@pytest.mark.parametrize("mode", ["speculative", "exit"])
def test_rows_join_and_finish_at_different_steps(runner: DecoderRunner, plain: list[list[int]], mode: str) -> None:
    batch = runner.open_batch(mode, max_batch=2, thresholds="always" if mode == "speculative" else "never",
                              draft_tokens=3)
    budgets = [3, N_NEW, 7]
    rows = [batch.add(p, n) for p, n in zip(PROMPTS, budgets, strict=True)]
    got: dict[int, list[int]] = {r: [] for r in rows}
    while batch.active or batch.waiting:
        for ev in batch.step():
            got[ev.row] += ev.token_ids
    assert [got[r] for r in rows] == [plain[i][:n] for i, n in enumerate(budgets)]


def test_chunked_calls_give_the_same_tokens(root: Path, plain: list[list[int]]) -> None:
    small = DecoderRunner(root / "mamba.eebundle", threads=1)
    small.chunk = 2  # type: ignore[attr-defined]
    assert [r["token_ids"] for r in small.generate(PROMPTS, N_NEW, mode="speculative",
                                                   thresholds="always").results] == plain


def test_a_model_without_attention_mask_groups_rows_by_length(root: Path, mamba: torch.nn.Module,
                                                              plain: list[list[int]]) -> None:
    export_mamba(mamba, root / "nomask.onnx", with_mask=False)
    run = DecoderRunner(_compile(root, "nomask.onnx", "nomask.eebundle"), threads=1)
    assert not run.dec["state"]["masked"]
    for mode in ("none", "speculative"):
        res = run.generate(PROMPTS, N_NEW, mode=mode, thresholds="always", draft_tokens=3)
        assert [r["token_ids"] for r in res.results] == plain


def test_cli_generate_json(root: Path) -> None:
    tok = char_tokenizer(root / "tokenizer.json", 128)
    want = DecoderRunner(root / "mamba.eebundle", threads=1, tokenizer=tok).generate(["Hello"], N_NEW, mode="none")
    res = CliRunner().invoke(cli, ["generate", str(root / "mamba.eebundle"), "--prompt", "Hello", "--tokenizer",
                                   str(tok), "--max-new-tokens", str(N_NEW), "--mode", "speculative",
                                   "--thresholds", "always", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["results"][0]["token_ids"] == want.results[0]["token_ids"]
    assert out["acceptance_rate"] is not None


def test_state_input_without_matching_output_is_refused(root: Path) -> None:
    proto = onnx.load(str(root / "mamba.onnx"))
    keep = [o for o in proto.graph.output if o.name != "present_state.1.conv"]
    del proto.graph.output[:]
    proto.graph.output.extend(keep)
    onnx.save(proto, str(root / "broken.onnx"))
    with pytest.raises(GraphError, match=r"'past_state\.1\.conv' has no matching output 'present_state\.1\.conv'"):
        _compile(root, "broken.onnx", "broken.eebundle")
    assert not (root / "broken.eebundle").exists()


def test_exit_inside_a_layer_is_refused(root: Path) -> None:
    proto = onnx.load(str(root / "mamba.onnx"), load_external_data=False)
    add = next(n for n in proto.graph.node if "layers.2.output" in n.output)
    inner = next(i for i in add.input if i != "layers.1.output")  # the mixer's output, before the residual sum
    with pytest.raises(SpecError, match="inside a layer"):
        _compile(root, "mamba.onnx", "inner.eebundle", exits=[{"at": inner}])


def test_trained_draft_head_keeps_speculative_lossless(root: Path, tmp_path: Path) -> None:
    from eecompile.decoder.train import train_draft_heads

    char_tokenizer(root / "tokenizer.json", 128)
    spec = yaml.safe_load((root / "mamba.eebundle.yaml").read_text())
    spec["tokenizer"] = "tokenizer.json"
    (root / "tok.yaml").write_text(yaml.safe_dump(spec))
    compile_decoder(root / "tok.yaml", tmp_path / "tok.eebundle")
    train_draft_heads(tmp_path / "tok.eebundle", texts=["The quick brown fox jumps over the lazy dog. " * 8],
                      vocab=64, hidden=64, epochs=1, max_tokens=300, chunk=64, generate_tokens=8, threads=1)
    run = DecoderRunner(tmp_path / "tok.eebundle", threads=1)
    assert run.exits[0].get("draft_head")
    prompts = ["Hello there", "A", "The lazy dog"]
    plain = run.generate(prompts, N_NEW, mode="none")
    spec_res = run.generate(prompts, N_NEW, mode="speculative", thresholds="always", draft_tokens=3)
    assert [r["token_ids"] for r in spec_res.results] == [r["token_ids"] for r in plain.results]
    assert 0.0 < spec_res.acceptance_rate < 1.0  # type: ignore[operator]


def test_positions_fed_again_after_rejected_drafts_stay_within_one_round(runner: DecoderRunner) -> None:
    # after a rejecting round the deep segments feed the accepted positions again as their own scan, so the
    # state at the confirmed tokens is a checkpoint: what runs again never exceeds one round (k + 1 positions)
    k = 4
    batch = runner.open_batch("speculative", thresholds="always", draft_tokens=k)
    for p in PROMPTS:
        batch.add(p, 32)
    worst = 0
    while batch.active or batch.waiting:
        batch.step()
        for r in batch._active:
            worst = max(worst, *(seen - n for seen, n in zip(r.seen, r.lengths, strict=True)))  # type: ignore[attr-defined]
    assert 0 < worst <= k + 1


def test_state_output_without_matching_input_is_refused(root: Path) -> None:
    proto = onnx.load(str(root / "mamba.onnx"))
    proto.graph.node.append(onnx.helper.make_node("Identity", ["present_state.3.ssm"], ["present_state.4.ssm"]))
    proto.graph.output.append(onnx.helper.make_tensor_value_info("present_state.4.ssm", onnx.TensorProto.FLOAT,
                                                                 ["batch", 64, 8]))
    onnx.save(proto, str(root / "extra.onnx"))
    with pytest.raises(GraphError, match=r"'present_state\.4\.ssm' has no matching input 'past_state\.4\.ssm'"):
        _compile(root, "extra.onnx", "extra.eebundle")


def test_the_attention_adapter_is_refused_for_a_recurrent_decoder(root: Path) -> None:
    from eecompile.decoder.train import train_draft_heads
    from eecompile.errors import SpecError

    with pytest.raises(SpecError, match="attention adapter keeps a key/value cache.*--adapter mlp"):
        train_draft_heads(root / "mamba.eebundle", adapter="attention", max_tokens=300, generate_tokens=0)


def test_compile_summary_and_exit_fill_propagate_speak_of_the_recurrent_state(root: Path,
                                                                              runner: DecoderRunner) -> None:
    """`compile` described a recurrent decoder's segments as owning "their key/value cache", and `generate --mode exit
    --exit-fill propagate` said to recompile the bundle, which cannot help: a recurrent state has no cache that
    CALM's propagation could write."""
    from eecompile.cli import decoder_summary

    dec = runner.bundle.manifest.decoder
    assert dec is not None
    lines = decoder_summary(root / "mamba.eebundle", dec)
    assert "recurrent state per layer (no cache)" in lines[0] and "key/value" not in "\n".join(lines), lines
    assert lines[1].endswith("with their recurrent state"), lines
    with pytest.raises(DataError, match="recurrent-state decoder has no cache.*use exit_fill 'later'"):
        runner.generate([PROMPTS[0]], 4, mode="exit", exit_fill="propagate")
