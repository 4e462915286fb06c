"""The decoding loop for decoders whose layers carry a recurrent state (Mamba-style) instead of a KV cache.

A recurrent bundle (``eecompile.decoder.recurrent``; ``decoder.state`` in its manifest) has the KV decoder's
segments and shared head, but each segment reads the past states of its layers (``past_state.{i}[.part]``,
[B, ...] float32, fixed size) and writes their present states after the new positions. ``DecoderRunner(bundle)``
returns a ``RecurrentDecoderRunner`` for such a bundle; ``generate``, ``open_batch`` and the three modes are the
KV runner's (``eecompile.runtimes.lm``), with the state kept per row and per segment:

- **Calls.** A segment call takes each row's pending positions as one short scan. With an ``attention_mask``
  input (1 real, 0 padding; a padded position leaves the state unchanged) rows with different numbers of new
  positions share a call, right-padded; without one, rows are grouped by that number. At most ``CHUNK``
  positions go into one call (the exported closed-form scan's memory grows with T^2); the state carries over,
  so a long prompt in chunks gives the same result.
- **Rejected drafts.** A state is not indexable by position, so rejecting drafts cannot lower a row's length.
  Each row keeps, per segment, the states at the ends of its calls since the last confirmed token
  (checkpoints) and the hidden states fed since then. Rewinding to ``common`` positions restores, segment by
  segment, the latest checkpoint at or before the positions still valid there and puts the inputs between it
  and them back as pending; the next call runs them again with the new positions. The draft segments run one
  position per call while drafting, so they restore exactly; the deep segments restore the state from before
  the verification, and the accepted positions' exit hidden states run through them again before the next
  verification's positions, as their own short scan (in the same call as other rows' positions when the model
  takes a mask), so the state at the confirmed tokens is a checkpoint again; their outputs are not returned
  again (the verification sees only its own positions). Without that separate piece a rejecting round would
  leave no checkpoint at its confirmed tokens, and consecutive rejecting rounds would feed an ever longer span
  again. We chose this over returning per-position states from the verification (a [B, T, ...] state output
  per layer, a rewrite of every scan in the graph) because it needs nothing from the exported graph; it costs
  the accepted positions once more and, at batch 1, one more short call per rejecting round. When every draft
  is accepted nothing runs again.
- **Exit mode.** A token that exits early leaves its exit hidden state pending for the deeper segments; when the
  row's next token goes deep, the pending positions go through them as a short scan (the same call).

Imports: numpy, onnxruntime (through ``eecompile.runtimes.lm``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eecompile.bundle import Bundle
from eecompile.errors import BackendError, BundleError
from eecompile.runtimes.lm import DecoderRunner, _Row

CHUNK = 32  # most new positions per segment call
MASK = "attention_mask"


@dataclass
class _StateRow(_Row):
    """A row of a recurrent decoder: ``caches[s]`` is segment s's current state (one [1, ...] array per state
    input); ``saved[s]`` maps a length to the state after that many positions (checkpoints since the last
    confirmed token); ``fed[s]`` holds the input hidden states [D] segment s consumed since ``min(saved[s])``;
    ``seen[s]``: positions whose outputs of segment s were returned before its last rewind and are still valid
    (they are computed again after the rewind, and not returned again)."""

    saved: list[dict[int, list[np.ndarray]]] = field(default_factory=list)
    fed: list[list[np.ndarray]] = field(default_factory=list)
    seen: list[int] = field(default_factory=list)


class RecurrentDecoderRunner(DecoderRunner):
    """``DecoderRunner`` for a recurrent-state decoder bundle (see the module docstring); same arguments.

    Raises ``BundleError`` when the bundle's state layout does not match its segments' inputs.
    """

    def __init__(self, bundle: Bundle | str | Path, *, threads: int | None = None, tokenizer: Any = None,
                 providers: Sequence[str] | None = None) -> None:
        super().__init__(bundle, threads=threads, tokenizer=tokenizer, providers=providers)
        state = self.dec.get("state") or {}
        self._parts = {str(p): tuple(int(d) for d in shape) for p, shape in (state.get("parts") or {}).items()}
        self._state_in = [list(s.get("state_inputs") or []) for s in self.segments]
        self._state_out = [list(s.get("state_outputs") or []) for s in self.segments]
        for s, names in enumerate(self._state_in):
            missing = [n for n in names if n not in self._inputs[s] or _part(n) not in self._parts]
            if missing or not names:
                raise BundleError(f"{self.bundle.path}: segment {s} ({self.segments[s]['file']}) lacks the state "
                                  f"inputs {missing or 'of its layers'}; recompile the bundle")
        self._masked = [MASK in names for names in self._inputs]
        self.chunk = CHUNK
        # positions fed to segments, and those of them fed again after a rewind (the cost of checkpoints)
        self.calls.update({"state_positions": 0, "state_positions_rerun": 0})

    def zero_state_feeds(self, first: int, last: int) -> dict[str, np.ndarray]:
        """Zero states [1, ...] float32 for layers ``first..last-1``, by input name (a row before its prompt)."""
        return {f"past_state.{i}" + (f".{p}" if p else ""): np.zeros((1, *shape), np.float32)
                for i in range(first, last) for p, shape in self._parts.items()}

    def _new_row(self, index: int, ids: list[int], **kw: Any) -> _StateRow:
        n = len(self.segments)
        zero = [[np.zeros((1, *self._parts[_part(name)]), np.float32) for name in self._state_in[s]] for s in range(n)]
        return _StateRow(index=index, seq=list(ids), n_prompt=len(ids), n_confirmed=len(ids), caches=zero,
                         lengths=[0] * n, pending=[[] for _ in range(n)], saved=[{0: z} for z in zero],
                         fed=[[] for _ in range(n)], seen=[0] * n, **kw)

    def _stack(self, rows: list[_Row], first: int, last: int) -> list[np.ndarray]:
        """The KV runner's ``_stack``, returning segment ``last``'s outputs for the positions its caller has not
        had yet: positions run again after a rewind (``_StateRow.seen``) are fed on, not returned."""
        starts = [r.lengths[last] for r in rows]
        outs = super()._stack(rows, first, last)
        return [o[max(0, r.seen[last] - start):]  # type: ignore[attr-defined]
                for o, r, start in zip(outs, rows, starts, strict=True)]

    # ------------------------------------------------------------------------------------------ graph calls

    def _run_segment(self, s: int, rows: list[_Row], xs: list[np.ndarray] | None) -> list[np.ndarray]:
        """Run segment ``s`` on each row's pending positions (token ids ``seq[lengths[s]:]`` for segment 0, input
        hidden states ``xs[i]`` [n_i, D] after it), in calls of at most ``chunk`` positions; advance the rows'
        states and lengths; return the output hidden states per row, [n_i, D] float32."""
        ns = [len(x) for x in xs] if xs is not None else [len(r.seq) - r.lengths[s] for r in rows]
        done = [0] * len(rows)
        outs: list[list[np.ndarray]] = [[] for _ in rows]
        while True:
            take = {}
            for i, r in enumerate(rows):
                if done[i] < ns[i]:
                    # positions fed again after a rewind run as their own piece, so the state where they end
                    # (the row's confirmed tokens) is a checkpoint for the next rewind
                    replay = r.seen[s] - r.lengths[s]  # type: ignore[attr-defined]
                    take[i] = min(ns[i] - done[i], self.chunk, replay if replay > 0 else self.chunk)
            if not take:
                break
            groups: dict[int, list[int]] = {}
            for i, n in take.items():  # with a mask rows of any length share a call, else rows of one length
                groups.setdefault(0 if self._masked[s] else n, []).append(i)
            for idx in groups.values():
                got = self._call(s, [rows[i] for i in idx], [take[i] for i in idx],
                                 None if xs is None else [xs[i][done[i]:done[i] + take[i]] for i in idx])
                for i, o in zip(idx, got, strict=True):
                    outs[i].append(o)
                    done[i] += take[i]
        return [np.concatenate(o) if len(o) > 1 else o[0] if o else np.zeros((0, self.hidden_size), np.float32)
                for o in outs]

    def _call(self, s: int, rows: list[_Row], ns: list[int], xs: list[np.ndarray] | None) -> list[np.ndarray]:
        """One session call of segment ``s``: row i feeds ``ns[i]`` positions (right-padded to the longest)."""
        b, n = len(rows), max(ns)
        inputs = self._inputs[s]
        feeds: dict[str, np.ndarray] = {}
        if "input_ids" in inputs:
            ids = np.zeros((b, n), np.int64)
            for i, r in enumerate(rows):
                ids[i, :ns[i]] = r.seq[r.lengths[s]:r.lengths[s] + ns[i]]
            feeds["input_ids"] = ids
        if self._masked[s]:
            feeds[MASK] = (np.arange(n)[None, :] < np.array(ns)[:, None]).astype(np.int64)
        if xs is not None:
            h = np.zeros((b, n, self.hidden_size), np.float32)
            for i, x in enumerate(xs):
                h[i, :ns[i]] = x
            feeds[self.segments[s]["hidden_in"]] = h
        for j, name in enumerate(self._state_in[s]):
            feeds[name] = rows[0].caches[s][j] if b == 1 else np.concatenate([r.caches[s][j] for r in rows])
        names = [self.segments[s]["hidden_out"], *self._state_out[s]]
        try:
            out = self._sessions[s].run(names, feeds)
        except Exception as e:  # onnxruntime's own error types
            raise BackendError(f"segment {s} ({self.segments[s]['file']}) failed: {e}") from e
        self.calls["segments"][s] += 1
        self.calls["state_positions"] += sum(ns)
        for i, r in enumerate(rows):
            assert isinstance(r, _StateRow)
            r.caches[s] = [o[i:i + 1] for o in out[1:]]
            r.lengths[s] += ns[i]
            r.saved[s][r.lengths[s]] = r.caches[s]
            if xs is not None:
                r.fed[s].extend(xs[i])
        return [out[0][i, :ns[i]] for i in range(b)]

    # ------------------------------------------------------------------------------------------ rows

    def _rewind(self, r: _Row, common: int) -> None:
        """Keep only what the segments computed from the first ``common`` positions (module docstring).

        Segment by segment, ``frontier`` is how far its inputs are still valid: ``common`` for segment 0 (the
        token ids), the previous segment's (new) length after it (its later outputs will be computed again).
        """
        assert isinstance(r, _StateRow)
        frontier = common
        for s in range(len(self.segments)):
            r.seen[s] = min(r.lengths[s], common)
            if r.lengths[s] > frontier:
                c = max(k for k in r.saved[s] if k <= frontier)
                base = min(r.saved[s])
                r.caches[s] = r.saved[s][c]
                r.pending[s] = r.fed[s][c - base:frontier - base] if s > 0 else []
                r.lengths[s] = c
                self.calls["state_positions_rerun"] += r.seen[s] - c
            elif s > 0:
                r.pending[s] = r.pending[s][:frontier - r.lengths[s]]
            frontier = r.lengths[s]
        self._forget(r)

    def _forget(self, r: _Row) -> None:
        """The current states become the only checkpoints: no later rewind goes below the confirmed tokens."""
        assert isinstance(r, _StateRow)
        for s in range(len(self.segments)):
            r.saved[s] = {r.lengths[s]: r.caches[s]}
            r.fed[s] = []

    def _prefill(self, rows: list[_Row]) -> None:
        super()._prefill(rows)
        for r in rows:
            self._forget(r)


def _part(name: str) -> str:
    """The state part of ``past_state.{i}.{part}`` ("" for ``past_state.{i}``)."""
    pieces = name.split(".", 2)
    return pieces[2] if len(pieces) == 3 else ""
