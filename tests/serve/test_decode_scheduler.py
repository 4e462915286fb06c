"""The iteration-level scheduler (no Ray) against a scripted decode batch: requests join and leave between steps,
each gets exactly its own row's tokens, a short request started later finishes before a long one, cancelled and
refused rows leave the others alone, and a failed step fails only its own batch's requests.

The scripted batch here follows the ``DecodeBatch`` interface (add/step/cancel/close, StepEvent) with a token rule
that depends on the row's own sequence only; the real decoder behind a real Ray Serve is tested in
tests/serve/test_ray_generate.py."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest

from eecompile.errors import BackendError, DataError
from eecompile.serve.decoding import Busy, DecodeScheduler, RowSink
from eecompile.serve.protocol import GenerateRequest
from tests.lm.conftest import lm_bundle, lm_dir  # noqa: F401  (the tiny Llama decoder bundle, built once)

VOCAB, MAX_LENGTH, EOS = 50, 64, 0


def rule(seq: list[int]) -> int:
    """The scripted model: the next token from the row's own sequence (never EOS unless the prompt asks)."""
    if seq[0] == 99:  # a prompt starting with 99 ends with EOS after 2 tokens
        return EOS if len(seq) >= 3 else 7
    return 1 + (sum(seq) * 31 + len(seq)) % (VOCAB - 1)


def alone(prompt: list[int], n: int) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(n):
        t = rule(seq)
        seq.append(t)
        out.append(t)
        if t == EOS:
            break
    return out


@dataclass
class Event:
    row: int
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    text: str | None = None


class ScriptedBatch:
    def __init__(self, owner: ScriptedRunner, mode: str, max_batch: int, fail_at: int | None) -> None:
        self.owner, self.mode, self.max_batch, self.fail_at = owner, mode, max_batch, fail_at
        self.rows: dict[int, dict[str, Any]] = {}
        self.queue: list[int] = []
        self.next_row = 0
        self.steps = 0
        self.occupancy: list[int] = []
        self.cancelled: list[int] = []
        self.closed = False
        self.thread: set[str] = set()

    def add(self, prompt: Any, max_new_tokens: int, sample: bool = False, temperature: float = 1.0,
            seed: int | None = None, eos_token_id: int | None = None) -> int:
        self.thread.add(threading.current_thread().name)
        if max_new_tokens < 1:
            raise DataError(f"max_new_tokens: {max_new_tokens!r}; give a positive number of tokens to generate")
        ids = [ord(c) % VOCAB for c in prompt] if isinstance(prompt, str) else list(prompt)
        if len(ids) + max_new_tokens > MAX_LENGTH:
            raise DataError(f"prompts[0]: {len(ids)} tokens + max_new_tokens {max_new_tokens} exceed the cache "
                            f"({MAX_LENGTH} positions)")
        row = self.next_row
        self.next_row += 1
        self.rows[row] = {"seq": ids, "n": 0, "max": max_new_tokens, "on": False}
        self.queue.append(row)
        return row

    @property
    def active(self) -> int:
        return sum(1 for r in self.rows.values() if r["on"])

    @property
    def waiting(self) -> int:
        return len(self.queue)

    def step(self) -> list[Event]:
        self.thread.add(threading.current_thread().name)
        self.steps += 1
        if self.fail_at is not None and self.steps >= self.fail_at:
            raise BackendError("segment 0 (segments/seg0.onnx) failed: scripted")
        while self.queue and self.active < self.max_batch:
            self.rows[self.queue.pop(0)]["on"] = True
        self.occupancy.append(self.active)
        time.sleep(self.owner.step_s)
        events = []
        for row, r in list(self.rows.items()):
            if not r["on"]:
                continue
            t = rule(r["seq"])
            r["seq"].append(t)
            r["n"] += 1
            reason = "eos" if t == EOS else "length" if r["n"] >= r["max"] else None
            events.append(Event(row, [t], reason is not None, reason))
            if reason:
                del self.rows[row]
        return events

    def cancel(self, row: int) -> None:
        self.cancelled.append(row)
        self.rows.pop(row, None)
        if row in self.queue:
            self.queue.remove(row)

    def close(self) -> None:
        self.closed = True


class ScriptedRunner:
    dec: dict[str, Any] = {}

    def __init__(self, step_s: float = 0.002, fail_at: dict[str, int] | None = None) -> None:
        self.step_s = step_s
        self.fail_at = fail_at or {}
        self.batches: list[ScriptedBatch] = []

    def open_batch(self, mode: str = "none", max_batch: int = 8, thresholds: Any = None, draft_tokens: Any = None,
                   exit: int = 0) -> ScriptedBatch:
        b = ScriptedBatch(self, mode, max_batch, self.fail_at.get(mode))
        self.batches.append(b)
        return b

    def tokenizer(self) -> Any:
        class Chars:
            @staticmethod
            def decode(ids: list[int]) -> str:
                return "".join(chr(97 + i % 26) for i in ids)

        return Chars()


class Collect(RowSink):
    def __init__(self) -> None:
        self.streamed: list[int] = []
        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.was_admitted = False
        self.done = threading.Event()
        self.at: float | None = None

    def admitted(self) -> None:
        self.was_admitted = True

    def tokens(self, token_ids: list[int], text: str | None) -> None:
        self.streamed += token_ids

    def finished(self, result: dict[str, Any]) -> None:
        self.result, self.at = result, time.perf_counter()
        self.done.set()

    def failed(self, error: BaseException) -> None:
        self.error, self.at = error, time.perf_counter()
        self.done.set()


def req(prompt: Any, n: int, mode: str = "none") -> GenerateRequest:
    return GenerateRequest(prompt=prompt, max_new_tokens=n, mode=mode)


@pytest.fixture
def runner() -> ScriptedRunner:
    return ScriptedRunner()


def test_each_request_gets_its_own_rows_tokens(runner) -> None:
    sched = DecodeScheduler(runner, max_batch=4)
    prompts = [[3, 4], [5], [9, 9, 9], [1, 2, 3, 4], [8], [99, 1]]
    lengths = [7, 3, 12, 5, 9, 10]
    sinks = [Collect() for _ in prompts]
    try:
        for p, n, s in zip(prompts, lengths, sinks, strict=True):
            sched.submit(req(p, n), s)
        for s in sinks:
            assert s.done.wait(10)
    finally:
        sched.close()
    for p, n, s in zip(prompts, lengths, sinks, strict=True):
        assert s.error is None and s.result is not None
        assert s.result["token_ids"] == alone(p, n) == s.streamed
        assert s.result["finish_reason"] == ("eos" if p[0] == 99 else "length")
        f = s.result["figures"]
        assert f["steps"] == len(s.result["token_ids"]) and 1 <= f["mean_batch_rows"] <= 4
        assert f["time_to_first_token_ms"] <= f["total_ms"]
    assert max(max(b.occupancy) for b in runner.batches) <= 4
    assert {n for b in runner.batches for n in b.thread} == {"eecompile-decode"}  # only the loop thread
    assert sched.outstanding == 0


def test_a_short_request_started_later_finishes_first(runner) -> None:
    sched = DecodeScheduler(runner, max_batch=4)
    long, short = Collect(), Collect()
    try:
        sched.submit(req([1, 2], 40), long)
        deadline = time.time() + 5
        while len(long.streamed) < 3 and time.time() < deadline:
            time.sleep(0.001)
        sched.submit(req([3], 3), short)
        assert short.done.wait(5)
        assert not long.done.is_set(), "the short request waited for the long one"
        assert 3 <= len(long.streamed) < 40
        assert long.done.wait(10)
    finally:
        sched.close()
    assert short.at < long.at
    assert long.result["token_ids"] == alone([1, 2], 40) and short.result["token_ids"] == alone([3], 3)
    assert len(runner.batches) == 1 and max(runner.batches[0].occupancy) == 2  # they shared the running batch


def test_bad_values_fail_only_their_request(runner) -> None:
    sched = DecodeScheduler(runner, max_batch=4)
    ok, too_long, zero = Collect(), Collect(), Collect()
    try:
        sched.submit(req([1], 5), ok)
        sched.submit(req(list(range(60)), 10), too_long)
        sched.submit(req([1], 0), zero)
        for s in (ok, too_long, zero):
            assert s.done.wait(5)
    finally:
        sched.close()
    assert isinstance(too_long.error, DataError) and "exceed the cache" in str(too_long.error)
    assert isinstance(zero.error, DataError) and "max_new_tokens" in str(zero.error)
    assert not too_long.was_admitted and not zero.was_admitted
    assert ok.result["token_ids"] == alone([1], 5)


def test_cancel_drops_the_row_between_steps(runner) -> None:
    runner.step_s = 0.005
    sched = DecodeScheduler(runner, max_batch=4)
    gone, stays = Collect(), Collect()
    try:
        t = sched.submit(req([4], 50), gone)
        sched.submit(req([5], 20), stays)
        while len(gone.streamed) < 2:
            time.sleep(0.001)
        sched.cancel(t)
        assert stays.done.wait(10)
    finally:
        sched.close()
    assert not gone.done.is_set() and len(gone.streamed) < 50
    assert runner.batches[0].cancelled == [t.row]
    assert stays.result["token_ids"] == alone([5], 20)
    assert sched.outstanding == 0


def test_batch_wide_options_get_their_own_running_batch_and_a_failure_stays_there() -> None:
    runner = ScriptedRunner(fail_at={"exit": 3})
    sched = DecodeScheduler(runner, max_batch=2)
    plain = [Collect() for _ in range(3)]
    failing = Collect()
    try:
        for i, s in enumerate(plain):
            sched.submit(req([i + 1], 6), s)
        sched.submit(req([7], 6, mode="exit"), failing)
        for s in (*plain, failing):
            assert s.done.wait(10)
    finally:
        sched.close()
    assert isinstance(failing.error, BackendError) and "scripted" in str(failing.error)
    assert [s.result["token_ids"] for s in plain] == [alone([i + 1], 6) for i in range(3)]
    modes = sorted(b.mode for b in runner.batches)
    assert "exit" in modes and "none" in modes
    assert all(b.closed for b in runner.batches)  # empty batches are closed
    assert max(max(b.occupancy) for b in runner.batches if b.mode == "none") == 2  # the third row waited


def test_busy_and_close(runner) -> None:
    runner.step_s = 0.01
    sched = DecodeScheduler(runner, max_batch=1, max_waiting=1)
    a, b = Collect(), Collect()
    sched.submit(req([1], 60), a)
    sched.submit(req([2], 60), b)
    with pytest.raises(Busy, match="retry later"):
        sched.submit(req([3], 2), Collect())
    sched.close()
    assert a.done.is_set() and b.done.is_set()
    assert isinstance(a.error, BackendError) and "stopping" in str(a.error)
    with pytest.raises(BackendError, match="closed"):
        sched.submit(req([3], 2), Collect())


def test_the_real_decoder_behind_the_scheduler(lm_bundle) -> None:  # noqa: F811
    """The tiny Llama decoder bundle: rows of different lengths added while others decode, one cancelled, each
    finished row equal to ``generate`` for its prompt alone."""
    from eecompile.runtimes.lm import DecoderRunner

    dec = DecoderRunner(lm_bundle, threads=1)
    sched = DecodeScheduler(dec, max_batch=3)
    work = [("hello", 12), ([5, 6, 7], 4), ("the cat", 20), ([9], 7), ("zz", 2)]
    sinks = [Collect() for _ in work]
    gone = Collect()
    try:
        t = sched.submit(req("abc", 93), gone)
        for i, ((p, n), s) in enumerate(zip(work, sinks, strict=True)):
            sched.submit(req(p, n), s)
            if i == 0:
                while not gone.streamed:
                    time.sleep(0.001)
                sched.cancel(t)
            time.sleep(0.01)  # later rows join a running batch
        for s in sinks:
            assert s.done.wait(60)
    finally:
        sched.close()
    for (p, n), s in zip(work, sinks, strict=True):
        want = dec.generate([p], n).results[0]
        assert s.error is None and s.result["token_ids"] == want["token_ids"] == s.streamed, p
        assert s.result["text"] == want["text"]
    assert not gone.done.is_set()
    assert sched.outstanding == 0


def test_a_sink_that_raises_loses_only_its_own_row(runner) -> None:
    class Broken(Collect):
        def tokens(self, token_ids: list[int], text: str | None) -> None:
            if len(self.streamed) >= 2:
                raise ConnectionResetError("the client went away")
            super().tokens(token_ids, text)

    sched = DecodeScheduler(runner, max_batch=4)
    broken, ok = Broken(), Collect()
    try:
        sched.submit(req([2], 30), broken)
        sched.submit(req([3], 10), ok)
        assert ok.done.wait(10)
        later = Collect()
        sched.submit(req([4], 3), later)  # the loop still serves
        assert later.done.wait(10)
    finally:
        sched.close()
    assert ok.result["token_ids"] == alone([3], 10) and later.result["token_ids"] == alone([4], 3)
    assert broken.streamed == alone([2], 30)[:2] and not broken.done.is_set()
    assert runner.batches[0].cancelled and sched.outstanding == 0
