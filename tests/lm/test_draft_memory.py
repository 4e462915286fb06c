"""Draft-head distillation keeps hidden states and top-1 tokens per position, never full-vocabulary logits, and
computes the sub-vocabulary targets from the stored final hidden states: the same sub-vocabulary and targets as
from the full logits."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from eecompile.decoder.train import _chunks, collect, sub_targets, sub_vocabulary

TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 6
N = 24  # the sub-vocabulary: fewer than the tiny model's 128 tokens


@pytest.fixture(scope="module")
def chunks(runner: Any) -> list[list[int]]:
    return _chunks(runner, [TEXT], 40, 400)


def _full_logits(runner: Any, chunks: list[list[int]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per chunk: exit 0's hidden states [T_i, D] and the final head's full logits [T_i, V] (what training held)."""
    seg = runner.exits[0]["segment"]
    hs, logits = [], []
    for ids in chunks:
        row = runner._new_row(0, ids)
        runner._stack([row], 0, seg)
        hs.append(np.stack(row.pending[seg + 1]))
        out = runner._stack([row], seg + 1, len(runner.segments) - 1)[0]
        logits.append(runner._run_head(out[None], 2.0, True)["logits"][0])
    return hs, logits


def test_targets_from_stored_final_states_equal_the_full_logits_ones(runner: Any, chunks: list[list[int]]) -> None:
    hs, logits = _full_logits(runner, chunks)
    full = np.concatenate(logits)
    counts = np.bincount(full.argmax(-1), minlength=runner.vocab)
    want_ids = np.sort(np.argsort(-counts, kind="stable")[:N])

    got = collect(runner, chunks, 0)
    for h, z, e, t in zip(hs, logits, got.exit_states, got.top, strict=True):
        np.testing.assert_array_equal(e, h)
        np.testing.assert_array_equal(t, z.argmax(-1))
    ids = sub_vocabulary(np.concatenate(got.top), N, runner.vocab)
    np.testing.assert_array_equal(ids, want_ids)
    assert ids.dtype == np.int64 and 1 < len(np.unique(full.argmax(-1))) and len(ids) == N
    targets = list(sub_targets(runner, got.final_states, ids))
    assert len(targets) == len(chunks)
    for t, z in zip(targets, logits, strict=True):
        want = torch.softmax(torch.from_numpy(z[:, ids]), -1)
        assert t.shape == (len(z), N)
        torch.testing.assert_close(t, want, rtol=1e-5, atol=1e-6)


def test_what_collect_keeps_does_not_grow_with_the_vocabulary(runner: Any, chunks: list[list[int]]) -> None:
    got = collect(runner, chunks, 0)
    d, n_pos = runner.hidden_size, sum(len(c) for c in chunks)
    assert d != runner.vocab
    for e, f, t, c in zip(got.exit_states, got.final_states, got.top, chunks, strict=True):
        assert e.shape == f.shape == (len(c), d) and t.shape == (len(c),)
    arrays = got.exit_states + got.final_states + got.top
    assert sum(a.nbytes for a in arrays) == n_pos * (2 * 4 * d + 8)  # 4 x V bytes a position before
    ids = sub_vocabulary(np.concatenate(got.top), N, runner.vocab)
    assert [tuple(t.shape) for t in sub_targets(runner, got.final_states, ids)] == [(len(c), N) for c in chunks]


def test_sub_vocabulary_takes_the_most_frequent_lower_id_first() -> None:
    top = np.array([5, 5, 5, 2, 2, 9, 9, 7, 1])
    np.testing.assert_array_equal(sub_vocabulary(top, 3, 12), [2, 5, 9])  # 9 and 2 tie at two; 7 and 1 at one
    np.testing.assert_array_equal(sub_vocabulary(top, 4, 12), [1, 2, 5, 9])  # 1 before 7: the lower id
    assert len(sub_vocabulary(top, 50, 12)) == 12  # never more than the vocabulary
