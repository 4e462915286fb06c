"""Exit mode's two ways to give skipped layers an exited token's keys/values: later (the default) and CALM's
state propagation (exit_fill="propagate")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from eecompile.cli import cli
from eecompile.errors import DataError
from eecompile.runtimes.lm import DecoderRunner
from tests.lm.test_generate import PROMPTS


def test_propagation_graphs_are_the_deep_segments_key_value_paths(lm_bundle: Path, runner: DecoderRunner) -> None:
    assert [s.get("propagate") for s in runner.segments] == [None, "propagate1.onnx"]
    g = onnx.load(str(lm_bundle / "propagate1.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in g.node]
    assert [o.name for o in g.output] == [f"present.{i}.{t}" for i in (2, 3) for t in ("key", "value")]
    assert ops.count("TensorScatter") == 4 and "Attention" not in ops and "Softmax" not in ops  # no attention core
    assert "hidden" in [i.name for i in g.input] and "layers.2.output" not in {o for n in g.node for o in n.output}


def test_propagated_keys_values_are_each_layers_projection_of_the_exit_state(lm_bundle: Path) -> None:
    r = DecoderRunner(lm_bundle, threads=1)
    batch = r.open_batch("exit", thresholds="always", exit_fill="propagate")
    batch.add(PROMPTS[1], 8)
    for _ in range(5):
        batch.step()
    row = batch._active[0]
    n = row.lengths[0]
    assert row.lengths[1] == n and not row.pending[1]  # nothing waits for the deep segment
    deep = [b[row.slot, :, :n] for b in row.pool.buffers[1]]  # type: ignore[union-attr]
    # reference: the deep segment run as the model runs it, over every position's exit state
    ref = DecoderRunner(lm_bundle, threads=1)
    fresh = ref._new_rows([row.seq[:n]])[0]
    ref._stack([fresh], 0, 1)
    want = [b[fresh.slot, :, :n] for b in fresh.pool.buffers[1]]  # type: ignore[union-attr]
    exited = slice(len(PROMPTS[1]) - 1, n)  # the positions whose tokens exited (prompt positions ran deep)
    for j in (0, 1):  # layer 2 reads the exit state in both: the same keys/values everywhere
        np.testing.assert_allclose(deep[j], want[j], atol=1e-5)
    for j in (2, 3):  # layer 3: the model feeds it layer 2's output, propagation the exit state
        np.testing.assert_allclose(deep[j][:, :exited.start], want[j][:, :exited.start], atol=1e-5)
        assert np.abs(deep[j][:, exited] - want[j][:, exited]).max() > 1e-3


def test_propagate_with_no_exit_is_none_and_mixed_exits_run(runner: DecoderRunner) -> None:
    plain = [x["token_ids"] for x in runner.generate(PROMPTS, 12).results]
    never = runner.generate(PROMPTS, 12, mode="exit", thresholds="never", exit_fill="propagate")
    assert [x["token_ids"] for x in never.results] == plain
    runner.calls["propagate"] = [0, 0]
    mixed = runner.generate(PROMPTS, 12, mode="exit", thresholds=0.3, exit_fill="propagate", batch=3)
    assert 0.0 < mixed.exit_shares[0] < 1.0 and runner.calls["propagate"][1] > 0  # type: ignore[index]
    one = runner.generate([PROMPTS[1]], 12, mode="exit", thresholds=0.3, exit_fill="propagate")
    assert one.results[0]["token_ids"] == mixed.results[1]["token_ids"]  # a row's tokens do not depend on the batch


def test_exit_fill_errors(runner: DecoderRunner) -> None:
    with pytest.raises(DataError, match="exit_fill: 'soon'"):
        runner.generate(PROMPTS, 2, mode="exit", exit_fill="soon")
    with pytest.raises(DataError, match="applies to mode 'exit'"):
        runner.generate(PROMPTS, 2, mode="speculative", exit_fill="propagate")
    saved = runner._propagate
    runner._propagate = {}
    try:
        with pytest.raises(DataError, match=r"segments \[1\] have no state-propagation graph.*recompile"):
            runner.generate(PROMPTS, 2, mode="exit", exit_fill="propagate")
    finally:
        runner._propagate = saved


def test_cli_generate_exit_fill(lm_bundle: Path) -> None:
    res = CliRunner().invoke(cli, ["generate", str(lm_bundle), "--prompt", "Hello", "--max-new-tokens", "5",
                                   "--mode", "exit", "--thresholds", "always", "--exit-fill", "propagate", "--json",
                                   "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["exit_shares"] == [1.0, 0.0]


def test_inspect_lists_the_propagation_graphs(lm_bundle: Path) -> None:
    res = CliRunner().invoke(cli, ["inspect", str(lm_bundle)])
    assert res.exit_code == 0, res.output
    assert "state propagation (--exit-fill propagate): propagate1.onnx" in res.output
    res = CliRunner().invoke(cli, ["inspect", "--json", str(lm_bundle)])
    segs = json.loads(res.stdout)["decoder"]["segments"]
    assert [s["propagate"] for s in segs] == [None, "propagate1.onnx"]
