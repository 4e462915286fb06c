"""Iteration-level decoding (DecoderRunner.open_batch): rows join and leave between steps, and a row's tokens do
not depend on when it joined or on the other rows."""

from __future__ import annotations

import pytest

from eecompile.errors import DataError
from eecompile.runtimes.lm import DecodeBatch, DecoderRunner, StepEvent

PROMPTS = [[5, 17, 33], [90, 2, 41, 7, 7, 63, 12], [11], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]]
N_NEW = 14
MODES = [("none", None), ("speculative", "always"), ("speculative", 0.3), ("exit", "never")]


def _drain(batch: DecodeBatch, tokens: dict[int, list[int]], events: list[StepEvent] | None = None) -> None:
    while batch.active or batch.waiting:
        for ev in batch.step():
            tokens.setdefault(ev.row, []).extend(ev.token_ids)
            if events is not None:
                events.append(ev)


@pytest.fixture(scope="module")
def alone(runner: DecoderRunner) -> list[list[int]]:
    out = []
    for p in PROMPTS:
        b = runner.open_batch("none", max_batch=1)
        b.add(p, N_NEW)
        got: dict[int, list[int]] = {}
        _drain(b, got)
        out.append(got[0])
    return out


@pytest.mark.parametrize(("mode", "thr"), MODES)
def test_a_row_added_at_step_5_gets_the_tokens_it_gets_alone(runner: DecoderRunner, alone: list[list[int]],
                                                             mode: str, thr: object) -> None:
    batch = runner.open_batch(mode, max_batch=8, thresholds=thr, draft_tokens=3)
    tokens: dict[int, list[int]] = {}
    rows = {batch.add(PROMPTS[0], N_NEW): 0, batch.add(PROMPTS[3], N_NEW): 3}
    for _ in range(5):
        for ev in batch.step():
            tokens.setdefault(ev.row, []).extend(ev.token_ids)
    assert batch.active == 2  # nobody finished yet: the late rows join a running batch
    rows[batch.add(PROMPTS[1], N_NEW)] = 1
    rows[batch.add(PROMPTS[2], N_NEW)] = 2
    assert batch.waiting == 2
    _drain(batch, tokens)
    for row, i in rows.items():
        assert tokens[row] == alone[i], (mode, thr, i)


def test_generate_is_the_same_loop(runner: DecoderRunner, alone: list[list[int]]) -> None:
    res = runner.generate(PROMPTS, N_NEW, mode="speculative", thresholds="always", batch=2)
    assert [r["token_ids"] for r in res.results] == alone


def test_events_finish_reasons_and_max_batch(runner: DecoderRunner, alone: list[list[int]]) -> None:
    eos = alone[1][4]
    batch = runner.open_batch("speculative", max_batch=2, thresholds="always", draft_tokens=4)
    ids = [batch.add(p, N_NEW if i != 2 else 3, eos_token_id=eos) for i, p in enumerate(PROMPTS)]
    assert (batch.active, batch.waiting) == (0, 4)
    events: list[StepEvent] = []
    tokens: dict[int, list[int]] = {}
    first = batch.step()
    assert (batch.active, batch.waiting) == (2, 2)  # max_batch: two rows decode, two wait
    events += first
    for ev in first:
        tokens.setdefault(ev.row, []).extend(ev.token_ids)
    while batch.active or batch.waiting:
        assert batch.active <= 2
        for ev in batch.step():
            tokens.setdefault(ev.row, []).extend(ev.token_ids)
            events.append(ev)
    for row in ids:
        mine = [ev for ev in events if ev.row == row]
        assert [ev.finished for ev in mine] == [False] * (len(mine) - 1) + [True]  # finishes once, then leaves
        assert all(ev.finish_reason is None for ev in mine[:-1])
    finished = {ev.row: ev.finish_reason for ev in events if ev.finished}
    for i, row in enumerate(ids):
        want, reason = alone[i][:3 if i == 2 else N_NEW], "length"
        if eos in want:
            want, reason = want[:want.index(eos) + 1], "eos"
        assert tokens[row] == want
        assert finished[row] == reason
    assert finished[ids[1]] == "eos"


def test_text_events_add_up_to_the_decoded_tokens(runner: DecoderRunner) -> None:
    batch = runner.open_batch("none")
    row = batch.add("Hello", 8)
    text, toks = "", []
    while batch.active or batch.waiting:
        for ev in batch.step():
            assert ev.row == row and ev.text is not None
            text += ev.text
            toks += ev.token_ids
    assert text == runner._decode(toks)


def test_cancel_frees_a_row_and_leaves_the_others(runner: DecoderRunner, alone: list[list[int]]) -> None:
    batch = runner.open_batch("speculative", thresholds=0.3)
    a, b, c = (batch.add(p, N_NEW) for p in PROMPTS[:3])
    tokens: dict[int, list[int]] = {}
    for _ in range(3):
        for ev in batch.step():
            tokens.setdefault(ev.row, []).extend(ev.token_ids)
    batch.cancel(b)
    batch.cancel(c)
    assert batch.active == 1
    before = list(tokens.get(b, []))
    _drain(batch, tokens)
    assert tokens[a] == alone[0]
    assert tokens.get(b, []) == before  # no event after cancel
    with pytest.raises(DataError, match="row 9: no such row"):
        batch.cancel(9)
    batch.cancel(a)  # finished: nothing to do


def test_sampled_rows_follow_their_own_seed(runner: DecoderRunner) -> None:
    def run(late: bool) -> list[int]:
        batch = runner.open_batch("speculative", thresholds="always", draft_tokens=2)
        tokens: dict[int, list[int]] = {}
        other = batch.add(PROMPTS[3], N_NEW, sample=True, seed=1)
        if late:
            for _ in range(4):
                for ev in batch.step():
                    tokens.setdefault(ev.row, []).extend(ev.token_ids)
        mine = batch.add(PROMPTS[0], 10, sample=True, temperature=0.9, seed=7)
        assert mine != other
        _drain(batch, tokens)
        return tokens[mine]

    assert run(False) == run(True)


def test_bad_use_of_a_batch_is_one_clear_error(runner: DecoderRunner) -> None:
    with pytest.raises(DataError, match="mode: 'fast'"):
        runner.open_batch("fast")
    with pytest.raises(DataError, match="max_batch: 0"):
        runner.open_batch("none", max_batch=0)
    batch = runner.open_batch("none")
    with pytest.raises(DataError, match="max_new_tokens: 0"):
        batch.add([1, 2], 0)
    with pytest.raises(DataError, match="prompt: 92 tokens"):
        batch.add([3] * 92, 10)
    assert batch.waiting == 0
    batch.add([1, 2], 2)
    batch.close()
    assert (batch.active, batch.waiting) == (0, 0)
    with pytest.raises(DataError, match="closed"):
        batch.step()
    with pytest.raises(DataError, match="closed"):
        batch.add([1], 1)


def test_rows_whose_drafting_does_not_pay_decode_plainly(runner: DecoderRunner, alone: list[list[int]]) -> None:
    # drafting that cannot pay (a draft step costs as much as a plain step): every row pauses after its warm-up
    # rounds, decodes plainly, and its tokens are unchanged
    costs = (1.0, 1.0)
    batch = runner.open_batch("speculative", thresholds="always", draft_tokens=2, drafting_costs=costs)
    rows = [batch.add(p, N_NEW) for p in PROMPTS]
    tokens: dict[int, list[int]] = {}
    _drain(batch, tokens)
    assert [tokens[r] for r in rows] == alone
    assert batch.stats["paused"] >= len(PROMPTS)
    free = runner.open_batch("speculative", thresholds="always", draft_tokens=2, drafting_costs=(0.0, 0.0))
    for p in PROMPTS:
        free.add(p, N_NEW)
    _drain(free, {})
    assert "paused" not in free.stats  # free drafting always pays
    assert batch.stats["rounds"] < free.stats["rounds"]
