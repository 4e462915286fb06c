"""Iteration-level batching for decoder bundles: requests join and leave a running batch between decode steps.

One :class:`DecodeScheduler` per replica owns the decoder's running batches
(:meth:`~eecompile.runtimes.lm.DecoderRunner.open_batch`, one per set of batch-wide options: mode, thresholds,
draft tokens) and one thread that runs the step loop::

    loop: admit new requests (batch.add: the row prefills at the next step) and drop cancelled ones,
          then one batch.step() per running batch; hand each row's new tokens to its request,
          and answer the request whose row finished (EOS or max_new_tokens) right away.

A short request that arrives while a long one decodes starts at the next step and is answered as soon as its
own row finishes, whatever the long one still has to do (iteration-level batching, as in Orca, Yu et al.,
OSDI 2022). Greedy tokens of a row do not depend on who else is in the batch (the decoder's guarantee), so
every answer equals the local ``DecoderRunner.generate`` for that prompt alone.

``DecodeBatch`` is not thread-safe: only the loop thread calls it. Other threads :meth:`~DecodeScheduler.submit`
and :meth:`~DecodeScheduler.cancel`; what a request gets back arrives through its :class:`RowSink`'s
callbacks, called on the loop thread (the Ray deployment forwards them to its event loop).

Numpy only (no Ray): the Ray Serve deployment uses it, and so could any other server.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from eecompile.errors import BackendError, DataError, EECompileError
from eecompile.serve.protocol import GenerateRequest

log = logging.getLogger(__name__)


class Busy(EECompileError):
    """Too many requests are waiting for a row (HTTP 503: retry later or add replicas)."""


class RowSink:
    """What a request receives, called on the scheduler's loop thread (keep each call short).

    ``admitted()``: the row was added (the request's values were accepted); ``failed(error)``: it was refused
    (an ``EECompileError`` for bad input) or the decoder failed; ``tokens(ids, text)``: new tokens of this
    step; ``finished(result)``: the final per-row object (see :func:`row_result`)."""

    def admitted(self) -> None: ...

    def failed(self, error: BaseException) -> None: ...

    def tokens(self, token_ids: list[int], text: str | None) -> None: ...

    def finished(self, result: dict[str, Any]) -> None: ...


@dataclass
class StepFigures:
    """One ``step()`` of one running batch, for the metrics: rows decoded (occupancy), tokens emitted, seconds."""

    rows: int
    waiting: int
    tokens: int
    seconds: float
    max_batch: int


@dataclass
class _Ticket:
    request: GenerateRequest
    sink: RowSink
    submitted: float
    key: tuple[Any, ...] = ()
    row: int | None = None
    admitted: float | None = None
    first_token: float | None = None
    token_ids: list[int] = field(default_factory=list)
    steps: int = 0
    rows_seen: int = 0  # sum over this row's steps of the rows decoded in that step
    cancelled: bool = False


class DecodeScheduler:
    """Runs a decoder's running batches on one thread; requests join and leave between steps.

    ``runner``: a :class:`~eecompile.runtimes.lm.DecoderRunner` (anything with ``open_batch`` and the
    ``DecodeBatch`` interface). ``max_batch``: rows decoded together per running batch (the rest wait inside
    the batch for a free row). ``max_waiting``: requests admitted but without a row, across batches, beyond
    which :meth:`submit` raises :class:`Busy`. ``on_step(StepFigures)`` and ``on_first_token(seconds)`` (from
    submit to the row's first token) are called on the loop thread, for metrics.
    """

    def __init__(self, runner: Any, max_batch: int = 8, max_waiting: int = 256,
                 on_step: Callable[[StepFigures], None] | None = None,
                 on_first_token: Callable[[float], None] | None = None) -> None:
        if max_batch < 1:
            raise DataError(f"max_batch: {max_batch}; give at least 1 row")
        self.runner = runner
        self.max_batch = int(max_batch)
        self.max_waiting = int(max_waiting)
        self._on_step = on_step
        self._on_first_token = on_first_token
        self._inbox: queue.SimpleQueue[tuple[str, _Ticket]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._batches: dict[tuple[Any, ...], Any] = {}
        self._rows: dict[tuple[Any, ...], dict[int, _Ticket]] = {}
        self._outstanding = 0  # submitted, not yet finished or failed (any thread reads it)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="eecompile-decode", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ any thread

    def submit(self, request: GenerateRequest, sink: RowSink) -> _Ticket:
        """Queue ``request``; it joins its running batch before the next step. Thread-safe.

        Raises :class:`Busy` when ``max_batch`` rows per batch and ``max_waiting`` more are already taken,
        BackendError when the scheduler is closed. Bad values (a prompt too long for the cache, ...) reach
        ``sink.failed`` with the decoder's own DataError."""
        if self._closed.is_set():
            raise BackendError("the decoder's scheduler is closed")
        with self._lock:
            if self._outstanding >= self.max_waiting + self.max_batch * max(1, len(self._batches)):
                raise Busy(f"request: {self._outstanding} requests are already decoding or waiting on this "
                           f"replica; retry later or add replicas")
            self._outstanding += 1
        ticket = _Ticket(request, sink, time.perf_counter(), key=request.batch_key())
        self._inbox.put(("add", ticket))
        self._wake.set()
        return ticket

    def cancel(self, ticket: _Ticket) -> None:
        """Drop the request's row at the next step boundary (a client that went away). Thread-safe."""
        self._inbox.put(("cancel", ticket))
        self._wake.set()

    @property
    def outstanding(self) -> int:
        """Requests submitted and not yet answered."""
        return self._outstanding

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop; rows still decoding get ``failed(BackendError)``; the running batches are closed."""
        self._closed.set()
        self._wake.set()
        self._thread.join(timeout)

    # ------------------------------------------------------------------------------------------ loop thread

    def _loop(self) -> None:
        try:
            while not self._closed.is_set():
                self._drain()
                running = [k for k, b in self._batches.items() if b.active or b.waiting]
                if not running:
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                for key in running:
                    self._step(key)
        finally:
            self._shutdown()

    def _drain(self, stopping: bool = False) -> None:
        """Admit new requests and drop cancelled rows; when ``stopping``, refuse the new ones instead."""
        while True:
            try:
                what, t = self._inbox.get_nowait()
            except queue.Empty:
                return
            if what == "add" and stopping:
                self._finish(t, error=BackendError("the replica is stopping; retry the request"))
            elif what == "add":
                self._admit(t)
            elif what == "cancel":
                self._drop(t)

    def _admit(self, t: _Ticket) -> None:
        r = t.request
        try:
            batch = self._batches.get(t.key)
            if batch is None:
                batch = self.runner.open_batch(mode=r.mode, max_batch=self.max_batch,
                                               thresholds=None if r.thresholds is None else list(r.thresholds),
                                               draft_tokens=r.draft_tokens)
                self._batches[t.key] = batch
                self._rows[t.key] = {}
            t.row = batch.add(r.prompt, r.max_new_tokens, sample=r.sample, temperature=r.temperature, seed=r.seed)
        except Exception as e:  # the decoder's DataError for bad values; anything else is a failure too
            self._finish(t, error=e)
            if t.key in self._batches and not self._rows[t.key] and not self._busy(t.key):
                self._close_batch(t.key)
            return
        t.admitted = time.perf_counter()
        self._rows[t.key][t.row] = t
        _notify(t.sink.admitted)

    def _drop(self, t: _Ticket) -> None:
        rows = self._rows.get(t.key, {})
        if t.row is None or rows.get(t.row) is not t:
            return  # finished or failed already (or refused before it had a row)
        t.cancelled = True
        try:
            self._batches[t.key].cancel(t.row)
        finally:
            del rows[t.row]
            with self._lock:
                self._outstanding -= 1

    def _busy(self, key: tuple[Any, ...]) -> bool:
        b = self._batches[key]
        return bool(b.active or b.waiting)

    def _step(self, key: tuple[Any, ...]) -> None:
        batch, rows = self._batches[key], self._rows[key]
        t0 = time.perf_counter()
        try:
            events = batch.step()
        except Exception as e:  # a failed session call: every row of this batch fails, the batch goes
            log.exception("decode step failed")
            for t in list(rows.values()):
                self._finish(t, error=e if isinstance(e, EECompileError) else BackendError(f"decode step: {e}"))
            self._close_batch(key)
            return
        now = time.perf_counter()
        finished = sum(1 for ev in events if ev.finished)
        occupancy = batch.active + finished  # rows that were in the batch during this step
        n_tokens = 0
        for ev in events:
            got = rows.get(ev.row)
            if got is None:  # a row cancelled in the meantime
                continue
            t = got
            t.steps += 1
            t.rows_seen += occupancy
            new = [int(x) for x in ev.token_ids]
            n_tokens += len(new)
            if new:
                if t.first_token is None:
                    t.first_token = now
                    if self._on_first_token is not None:
                        self._on_first_token(now - t.submitted)
                t.token_ids += new
                if not _notify(t.sink.tokens, new, ev.text):  # the request cannot take them: drop its row
                    self._drop(t)
                    continue
            if ev.finished:
                del rows[ev.row]
                self._finish(t, reason=ev.finish_reason, now=now)
        if self._on_step is not None:
            self._on_step(StepFigures(rows=occupancy, waiting=batch.waiting, tokens=n_tokens, seconds=now - t0,
                                      max_batch=self.max_batch))
        if not rows and not self._busy(key):
            self._close_batch(key)

    def _finish(self, t: _Ticket, *, reason: str | None = None, error: BaseException | None = None,
                now: float | None = None) -> None:
        with self._lock:
            self._outstanding -= 1
        if error is not None:
            _notify(t.sink.failed, error)
            return
        _notify(t.sink.finished, row_result(self.runner, t, reason, now or time.perf_counter()))

    def _close_batch(self, key: tuple[Any, ...]) -> None:
        batch = self._batches.pop(key, None)
        self._rows.pop(key, None)
        if batch is not None:
            try:
                batch.close()
            except Exception:  # closing frees caches; nothing a caller can do about a failure here
                log.exception("closing a decode batch failed")

    def _shutdown(self) -> None:
        self._drain(stopping=True)
        for key in list(self._batches):
            for t in list(self._rows.get(key, {}).values()):
                self._finish(t, error=BackendError("the replica is stopping; retry the request"))
            self._close_batch(key)


def _notify(callback: Callable[..., None], *args: Any) -> bool:
    """Call a sink's callback; a failure (a closed connection, a cancelled Triton request) is logged and
    returned as False, never raised into the loop that serves the other rows."""
    try:
        callback(*args)
    except Exception:
        log.warning("a request could not take its answer; dropping its row", exc_info=True)
        return False
    return True


def row_result(runner: Any, t: _Ticket, reason: str | None, now: float) -> dict[str, Any]:
    """The per-row object of ``eecompile generate --json``'s ``results`` (``prompt``, ``token_ids``, ``text``)
    plus ``finish_reason`` ("eos" | "length") and the request's own figures:

    ``queue_ms`` (submit -> joined the batch), ``time_to_first_token_ms`` (submit -> first token),
    ``total_ms`` (submit -> last token), ``tokens_per_s`` (its tokens / seconds from joining to its last token),
    ``steps`` (decode steps it took part in), ``mean_batch_rows`` (rows decoded per step, averaged over its
    steps: how full the batch was while it ran)."""
    r = t.request
    ids = list(t.token_ids)
    text = ""
    if isinstance(r.prompt, str) or _has_tokenizer(runner):
        text = str(runner.tokenizer().decode(ids))
    admitted = t.admitted if t.admitted is not None else t.submitted
    first = t.first_token if t.first_token is not None else now
    run_s = max(now - admitted, 1e-9)
    figures = {"queue_ms": (admitted - t.submitted) * 1e3, "time_to_first_token_ms": (first - t.submitted) * 1e3,
               "total_ms": (now - t.submitted) * 1e3, "tokens_per_s": len(ids) / run_s, "steps": t.steps,
               "mean_batch_rows": t.rows_seen / t.steps if t.steps else 0.0}
    return {"prompt": r.prompt if isinstance(r.prompt, str) else "", "token_ids": ids, "text": text,
            "finish_reason": reason, "figures": figures}


def _has_tokenizer(runner: Any) -> bool:
    dec = getattr(runner, "dec", None) or {}
    return getattr(runner, "_tokenizer", None) is not None or dec.get("tokenizer") is not None


__all__ = ["Busy", "DecodeScheduler", "RowSink", "StepFigures", "row_result"]
