"""The decoding loop over a decoder bundle's segments: plain, self-speculative and per-token-exit generation.

A decoder bundle (``eecompile compile`` of a ``kind: decoder`` spec) holds segments of consecutive layers,
each with the key/value cache of its own layers, and one head (final norm + LM head + max-prob gate) that
serves every exit and the final output. ``DecoderRunner.generate`` drives them:

- ``mode="none"``: every token goes through every segment (the model itself).
- ``mode="speculative"`` (lossless; LayerSkip/Kangaroo): the segments up to the exit draft tokens until the
  draft's max-prob falls below the exit's threshold or ``draft_tokens`` (k) are drafted; the remaining segments
  then run once over all drafted positions, starting from the hidden states cached at the exit while drafting
  (the early layers are never recomputed); the longest prefix that agrees with the verifier is kept, plus the
  verifier's own next token. Greedy output equals ``mode="none"``. Sampling uses speculative rejection
  sampling (Leviathan et al. 2023, Chen et al. 2023): a draft token x drawn from q is kept with probability
  min(1, p(x)/q(x)), else a token is drawn from max(0, p - q) normalised, so tokens follow p exactly.
- ``mode="exit"`` (lossy; CALM/SpecEE): a token whose gate fires at an exit is emitted there. The skipped
  layers' cache for that position is filled later by default (``exit_fill="later"``): the exit hidden states of
  pending positions go through the deeper segments together with the next token that goes deep (no graph of
  its own: the verification call of speculative mode; the deep keys/values are exactly what the deep layers
  compute from the exit states). ``exit_fill="propagate"``: CALM's state propagation, each skipped layer's
  key/value projections of the exit state, written at once by the bundle's ``propagate{s}.onnx`` graphs.

Batches: every row keeps its own lengths (per segment), positions and cache; one call to a segment takes
only the rows that need it (rows drafting, rows verifying and rows going deep are separate sub-batches), so
no row waits for another's verification, and a row that finishes (EOS, ``max_new_tokens``) simply leaves.

Key/value memory. Bundles compiled with the in-place cache (the default; ``decoder.segments[].kv_update ==
"tensor_scatter"``, see ``eecompile.decoder.kv_inplace``): a ``KVPool`` per decoding batch holds one buffer
[slots, H_kv, L, D] per cached tensor, a row owns a slot, and a call binds an ``OrtValue`` over its rows' slots
as both past and present, so ONNX Runtime writes only the new positions; rejected drafts lower the row's
length. Bundles with the exported ``Concat`` cache: each row's cache is a view into the ``present`` of the last
call it took part in; a call stacks the rows' caches into one past (left-padded with masked slots) and ONNX
Runtime writes a new present, a copy of the cache per call. ``calls["kv_bytes_copied"]`` counts the bytes of
cached positions moved again. An exit's attention adapter (Kangaroo's, ``eecompile.decoder.adapter``) owns a
cache too and is driven like a segment: ``_owners`` lists the segments, then the adapters, and rows, pools and
rewinds cover them all.

Acceptance is computed in the verifying head's graph when the bundle has it (``eecompile.decoder.acceptance``):
greedy, and speculative rejection sampling with the rows' own seeded uniform draws as inputs; the host rule
(``sampled_verification``) on the same draws serves bundles compiled before it.

Imports: numpy, pyyaml (via the bundle), onnxruntime; ``tokenizers`` only when text is given.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from eecompile.bundle import Bundle
from eecompile.errors import BackendError, BundleError, DataError

log = logging.getLogger(__name__)

MODES = ("none", "speculative", "exit")
EXIT_FILLS = ("later", "propagate")  # exit mode: skipped layers' keys/values run later from the exit state, or CALM's
_NEVER = 2.0  # a max-prob threshold no row reaches
RIDER_POSITIONS = 16  # in-place calls: most positions computed for rows riding along in a slot range
IN_PLACE = "tensor_scatter"  # decoder.segments[].kv_update of a segment whose cache is written in place
_ALWAYS = 0.0
# the head's inputs for speculative rejection sampling in the graph (eecompile.decoder.acceptance)
HEAD_SAMPLING_INPUTS = ("temperature", "draft_probs", "u_accept", "u_sample")


@dataclass
class GenerateResult:
    """What ``generate`` returns; ``to_dict()`` is the CLI's ``--json`` object.

    ``tokens_per_s``: generated tokens of all rows / wall seconds of the whole call (prefill included).
    ``acceptance_rate``: accepted draft tokens / drafted tokens (speculative). ``mean_accepted_length``: tokens
    emitted per verification (accepted drafts + the verifier's token). ``exit_shares``: fraction of generated
    tokens emitted at each exit, then at the final head (exit mode).
    """

    results: list[dict[str, Any]]
    tokens_per_s: float
    acceptance_rate: float | None = None
    mean_accepted_length: float | None = None
    exit_shares: list[float] | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"results": self.results, "tokens_per_s": self.tokens_per_s, "acceptance_rate": self.acceptance_rate,
                "mean_accepted_length": self.mean_accepted_length, "exit_shares": self.exit_shares}


@dataclass
class StepEvent:
    """What one ``DecodeBatch.step()`` produced for one row.

    ``row``: the id ``DecodeBatch.add`` returned. ``token_ids``: tokens confirmed in this step (0 or more;
    speculative rows emit several per verification and none while drafting). ``finished``: the row left the
    batch; ``finish_reason``: "eos" (it emitted its ``eos_token_id``, which is the last of ``token_ids``),
    "length" (``max_new_tokens`` reached) or None. ``text``: the text these tokens add (incremental decoding
    of everything generated so far; "" while a multi-byte character is incomplete), None without a tokenizer.
    """

    row: int
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    text: str | None


@dataclass
class _Row:
    index: int
    seq: list[int]  # prompt + generated (+ drafts while drafting)
    n_prompt: int
    caches: list[list[np.ndarray]]  # per segment: [k_first, v_first, ...] each [1, H_kv, length, D]
    lengths: list[int]  # per segment: positions in its cache
    pending: list[list[np.ndarray]]  # per segment s > 0: its input hidden states [D] not yet run through it
    n_confirmed: int = 0  # len(seq) without drafts
    q: list[np.ndarray] = field(default_factory=list)  # sampling: the draft distribution of each draft
    done: bool = False
    max_new: int = 1
    eos: int | None = None
    sample: bool = False
    temperature: float = 1.0
    rng: np.random.Generator | None = None
    finish_reason: str | None = None
    reported: int = 0  # generated tokens already returned in a StepEvent
    text: str = ""  # their text (incremental decoding)
    spec_tokens: float = 0.0  # speculative: running mean of tokens per verification, and of draft steps per round
    spec_steps: float = 0.0
    paused: int = 0  # speculative: steps left decoding plainly (drafting did not pay for this row)
    pool: KVPool | None = None  # in-place caches: the buffers holding this row's cache, and its slot there
    slot: int = -1

    @property
    def generated(self) -> int:
        return self.n_confirmed - self.n_prompt



def _seed(seed: Any) -> int | None:
    """``seed`` for ``numpy.random.default_rng``/``SeedSequence``: None or an int >= 0, else ``DataError`` (numpy's
    own "expected non-negative integer" named no option)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise DataError(f"seed: {seed!r}; give a non-negative integer (or none)")
    return None if seed is None else int(seed)

class DecoderRunner:
    """Generates with a decoder bundle on ONNX Runtime (CPU unless ``providers`` say otherwise).

    ``threads``: intra-op threads per session (default: the cores this process may use).
    ``tokenizer``: a ``tokenizers.Tokenizer``, a path to a ``tokenizer.json``, or None for the bundle's own
    (``tokenizer.json`` in the bundle, when it was compiled with one). Raises ``BundleError`` for a bundle that
    is not a decoder bundle, ``BackendError`` when onnxruntime is missing or a session fails to load. For a
    bundle whose layers carry a recurrent state instead of a cache (``decoder.state``), ``DecoderRunner(bundle)``
    returns an ``eecompile.runtimes.recurrent.RecurrentDecoderRunner`` (the same interface).
    """

    _loaded: Bundle | None = None  # the bundle __new__ loaded to choose the class

    def __new__(cls, bundle: Bundle | str | Path | None = None, *args: Any, **kwargs: Any) -> DecoderRunner:
        # a bundle whose layers carry a recurrent state (decoder.state) gets the runner that keeps per-row states
        # (bundle None: copy/pickle make an instance without arguments)
        if cls is DecoderRunner and bundle is not None:
            if not isinstance(bundle, Bundle):
                bundle = Bundle.load(bundle)
            if (bundle.manifest.decoder or {}).get("state"):
                from eecompile.runtimes.recurrent import RecurrentDecoderRunner

                cls = RecurrentDecoderRunner
        runner = super().__new__(cls)
        runner._loaded = bundle if isinstance(bundle, Bundle) else None  # __init__ does not load it twice
        return runner

    def __init__(self, bundle: Bundle | str | Path, *, threads: int | None = None, tokenizer: Any = None,
                 providers: Sequence[str] | None = None) -> None:
        if not isinstance(bundle, Bundle):
            bundle = self._loaded or Bundle.load(bundle)
        dec = bundle.manifest.decoder
        if not dec:
            raise BundleError(f"{bundle.path}: not a decoder bundle (it has no decoder section); compile a "
                              f"decoder with a key/value cache from a spec with 'kind: decoder' to generate")
        self.bundle = bundle
        self.dec = dec
        self.vocab = int(dec["vocab"])
        self.hidden_size = int(dec["hidden_size"])
        self.max_length = int(dec["max_length"])
        kv = dec.get("kv") or {"heads": 0, "head_dim": 0}  # none in a recurrent-state bundle
        self.kv_heads = int(kv["heads"])
        self.head_dim = int(kv["head_dim"])
        self.exits = list(dec["exits"])
        self.segments = list(dec["segments"])
        self.eos_token_id: int | None = dec.get("eos_token_id")
        from eecompile.runtimes.sessions import import_onnxruntime, session_options

        ort = import_onnxruntime()
        self._ort = ort
        so = session_options(threads)
        prov = list(providers or ["CPUExecutionProvider"])
        files = [s["file"] for s in self.segments] + [dec["head"]["file"]]
        try:
            self._sessions = [ort.InferenceSession(str(bundle.file(f)), so, providers=prov) for f in files[:-1]]
            self._head = ort.InferenceSession(str(bundle.file(files[-1])), so, providers=prov)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise BackendError(f"{bundle.path}: onnxruntime could not load the decoder ({e})") from e
        self._drafts: dict[int, Any] = {}  # exit -> trained draft head (adapter + sub-vocabulary head)
        self._draft_ids: dict[int, np.ndarray] = {}
        # graphs that own a key/value cache: the segments, then the exits' attention adapters (Kangaroo's, from
        # train-heads --adapter attention), which the runner drives like segments (eecompile.decoder.adapter)
        self._owners: list[dict[str, Any]] = list(self.segments)
        self._adapter_of: dict[int, int] = {}  # exit -> its adapter's index in _owners
        self._adapters_after: dict[int, list[int]] = {}  # segment -> the adapters reading its output
        for k, ex in enumerate(self.exits):
            d = ex.get("draft_head")
            if d:
                try:
                    self._drafts[k] = ort.InferenceSession(str(bundle.file(d["file"])), so, providers=prov)
                    a = d.get("adapter_segment")
                    if a:
                        self._sessions.append(ort.InferenceSession(str(bundle.file(a["file"])), so, providers=prov))
                except Exception as err:
                    raise BackendError(f"{bundle.path}: onnxruntime could not load the draft head of exit {k} "
                                       f"({err})") from err
                if a:
                    self._adapter_of[k] = len(self._owners)
                    self._adapters_after.setdefault(int(ex["segment"]), []).append(len(self._owners))
                    self._owners.append(a)
                self._draft_ids[k] = self._drafts[k].run(["vocab_ids_out"], {
                    "hidden": np.zeros((1, 1, self.hidden_size), np.float32),
                    "threshold": np.array(0.0, np.float32)})[0]
        self._inputs = [{i.name for i in s.get_inputs()} for s in self._sessions]
        # exit mode's CALM state propagation: per segment after the first, its layers' keys/values from a state
        self._propagate: dict[int, Any] = {}
        for s, seg in enumerate(self.segments):
            if seg.get("propagate"):
                try:
                    self._propagate[s] = ort.InferenceSession(str(bundle.file(seg["propagate"])), so, providers=prov)
                except Exception as err:
                    raise BackendError(f"{bundle.path}: onnxruntime could not load {seg['propagate']} ({err})") from err
        self._propagate_inputs = {s: {i.name for i in p.get_inputs()} for s, p in self._propagate.items()}
        # heads compiled with acceptance in the graph (greedy verification reads back 2 ints per row)
        head_inputs = {i.name for i in self._head.get_inputs()}
        self._head_accepts = {"drafts", "n_fed"} <= head_inputs
        self.in_graph_acceptance = self._head_accepts
        # heads that also apply speculative rejection sampling (draws from the host's generators as inputs)
        self._head_samples = self._head_accepts and set(HEAD_SAMPLING_INPUTS) <= head_inputs
        self.in_graph_sampling = self._head_samples
        self._kv_names = [_kv("past_key_values", s["layers"]) for s in self._owners]
        self._present = [_kv("present", s["layers"]) for s in self._owners]
        self._tokenizer = tokenizer
        self._in_place = [s.get("kv_update") == IN_PLACE for s in self._owners]
        if any(self._in_place) and not all(self._in_place):
            raise BundleError(f"{bundle.path}: some segments or adapters write their cache in place and some do "
                              f"not; recompile the bundle (and train the heads again)")
        self.in_place = all(self._in_place) and bool(self.segments)
        # session runs (per segment, then per adapter), and key/value bytes: written (new positions) and copied
        # (positions already cached, moved again: the stock Concat graph's present, stacking rows into one past)
        self.calls: dict[str, Any] = {"segments": [0] * len(self._owners), "propagate": [0] * len(self.segments),
                                      "head": 0, "kv_bytes_written": 0, "kv_bytes_copied": 0}

    # ------------------------------------------------------------------------------------------ tokenizer

    def tokenizer(self) -> Any:
        """The tokenizer (loaded on first use); raises ``DataError`` when there is none or it does not fit."""
        tok = self._tokenizer
        if tok is None:
            rel = self.dec.get("tokenizer")
            if rel is None:
                raise DataError(f"{self.bundle.path}: the bundle has no tokenizer; give token ids, or a tokenizer "
                                f"(--tokenizer tokenizer.json), or compile with 'tokenizer: FILE' in the spec")
            tok = self.bundle.verify_file(rel)
        if isinstance(tok, (str, Path)):
            try:
                from tokenizers import Tokenizer
            except ImportError as e:
                raise DataError("text prompts need the 'tokenizers' package: pip install tokenizers") from e
            try:
                tok = Tokenizer.from_file(str(tok))
            except Exception as e:  # tokenizers raises a plain Exception for a bad file
                raise DataError(f"{tok}: not a tokenizer.json ({e})") from e
        size = tok.get_vocab_size() if hasattr(tok, "get_vocab_size") else len(tok)
        if size > self.vocab:
            raise DataError(f"the tokenizer has {size} tokens but the model's vocabulary has {self.vocab}; "
                            f"use the tokenizer the model was trained with")
        self._tokenizer = tok
        return tok

    def _encode(self, prompt: str) -> list[int]:
        tok = self.tokenizer()
        enc = tok.encode(prompt)
        return list(enc.ids if hasattr(enc, "ids") else enc)

    def _decode(self, ids: list[int]) -> str:
        tok = self.tokenizer()
        return str(tok.decode(ids))

    # ------------------------------------------------------------------------------------------ graph calls

    def _run_segment(self, s: int, rows: list[_Row], xs: list[np.ndarray] | None, *,
                     propagate: bool = False) -> list[np.ndarray]:
        """Run segment ``s`` (or the adapter at ``_owners[s]``) on each row's pending positions:
        ``rows[i].seq[lengths[s]:lengths[s] + n_i]`` (token ids) with input hidden states ``xs[i]`` [n_i, D] (None
        for segment 0). Updates the rows' caches and lengths; returns the output hidden states per row, [n_i, D]
        float32. ``propagate``: run the segment's state-propagation graph instead (its layers' keys/values from
        ``xs`` alone, ``eecompile.decoder.propagate``); returns empty arrays."""
        if self.in_place:
            return self._run_segment_in_place(s, rows, xs, propagate)
        starts = [r.lengths[s] for r in rows]
        ns = [len(x) for x in xs] if xs is not None else [len(r.seq) - r.lengths[s] for r in rows]
        b, n, t = len(rows), max(ns), max(starts)
        ids = np.zeros((b, n), np.int64)
        pos = np.zeros((b, n), np.int64)
        mask = np.zeros((b, t + n), np.int64)
        for i, r in enumerate(rows):
            ids[i, :ns[i]] = r.seq[starts[i]:starts[i] + ns[i]]
            pos[i] = starts[i] + np.arange(n)
            mask[i, t - starts[i]:t + ns[i]] = 1
        feeds: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        sess, inputs = self._session(s, propagate)
        feeds = {k: v for k, v in feeds.items() if k in inputs}
        for j, name in enumerate(self._kv_names[s]):
            if b == 1:
                feeds[name] = rows[0].caches[s][j]
            else:
                past = np.zeros((b, self.kv_heads, t, self.head_dim), np.float32)
                for i, r in enumerate(rows):
                    if starts[i]:
                        past[i, :, t - starts[i]:] = r.caches[s][j][0]
                feeds[name] = past
        if xs is not None:
            h = np.zeros((b, n, self.hidden_size), np.float32)
            for i, x in enumerate(xs):
                h[i, :ns[i]] = x
            feeds[self._owners[s]["hidden_in"]] = h
        names = ([] if propagate else [self._owners[s]["hidden_out"]]) + self._present[s]
        try:
            out = sess.run(names, feeds)
        except Exception as e:  # onnxruntime's own error types
            raise BackendError(f"segment {s} ({self._owners[s]['file']}) failed: {e}") from e
        self.calls["propagate" if propagate else "segments"][s] += 1
        item = 4 * self.kv_heads * self.head_dim
        self.calls["kv_bytes_copied"] += len(self._kv_names[s]) * item * (
            b * t + (sum(starts) if b > 1 else 0))  # Concat copies the past; b > 1 stacked it first
        self.calls["kv_bytes_written"] += len(self._kv_names[s]) * item * b * n
        for i, r in enumerate(rows):
            lo, hi = t - starts[i], t + ns[i]
            r.caches[s] = [p[i:i + 1, :, lo:hi] for p in out[0 if propagate else 1:]]
            r.lengths[s] = starts[i] + ns[i]
        return [np.empty((0, self.hidden_size), np.float32) if propagate else out[0][i, :ns[i]] for i in range(b)]

    def _session(self, s: int, propagate: bool) -> tuple[Any, set[str]]:
        """The session of segment ``s`` (or of its state-propagation graph) and its input names."""
        if not propagate:
            return self._sessions[s], self._inputs[s]
        return self._propagate[s], self._propagate_inputs[s]

    def _run_segment_in_place(self, s: int, rows: list[_Row], xs: list[np.ndarray] | None,
                              propagate: bool = False) -> list[np.ndarray]:
        """``_run_segment`` for segments whose cache is a preallocated buffer written in place (TensorScatter).

        Rows are grouped by pool and split into runs of nearby slots; one call covers a run's contiguous slots
        ``lo..hi`` (an ``OrtValue`` over that slice of each buffer is bound as both past and present, so
        nothing is copied). A row of that range that is not in the call rides along with zero inputs at its
        own length (its outputs are dropped and the slots it writes lie past its length, where the mask never
        looks); runs are split where such riders would cost more than ``RIDER_POSITIONS`` positions.
        """
        ns = [len(x) for x in xs] if xs is not None else [len(r.seq) - r.lengths[s] for r in rows]
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            if r.pool is None:  # a row made outside a DecodeBatch: a pool of its own
                r.pool = KVPool(self, 1, length=len(r.seq))
                r.slot = r.pool.acquire(r)
            groups.setdefault(id(r.pool), []).append(i)
        n = max(ns) if ns else 0
        out: list[np.ndarray] = [np.empty(0)] * len(rows)
        for idx in groups.values():
            idx.sort(key=lambda i: rows[i].slot)
            runs = [[idx[0]]]
            for i in idx[1:]:
                if (rows[i].slot - rows[runs[-1][-1]].slot - 1) * n > RIDER_POSITIONS:
                    runs.append([i])
                else:
                    runs[-1].append(i)
            for run in runs:
                got = self._call_in_place(s, [rows[i] for i in run], [ns[i] for i in run],
                                          None if xs is None else [xs[i] for i in run], propagate)
                for i, o in zip(run, got, strict=True):
                    out[i] = o
        return out

    def _call_in_place(self, s: int, rows: list[_Row], ns: list[int], xs: list[np.ndarray] | None,
                       propagate: bool = False) -> list[np.ndarray]:
        """One session call over the slots ``rows[0].slot .. rows[-1].slot`` of their pool (rows sorted by slot)."""
        pool = rows[0].pool
        assert pool is not None
        n = max(ns)
        lo, hi = rows[0].slot, rows[-1].slot + 1
        width = hi - lo
        write = np.array([o.lengths[s] if o is not None else 0 for o in pool.rows[lo:hi]], np.int64)
        if not pool.ensure(int(write.max()) + n):
            if len(rows) > 1:  # a rider or a padded row would run past the buffer: one call per row
                return [self._call_in_place(s, [r], [m], None if xs is None else [xs[i]], propagate)[0]
                        for i, (r, m) in enumerate(zip(rows, ns, strict=True))]
            raise DataError(f"a row needs {int(write.max()) + n} cache positions; the cache holds {pool.length}")
        ids = np.zeros((width, n), np.int64)
        pos = write[:, None] + np.arange(n, dtype=np.int64)[None]
        for i, r in enumerate(rows):
            start = r.lengths[s]
            ids[r.slot - lo, :ns[i]] = r.seq[start:start + ns[i]]
        sess, inputs = self._session(s, propagate)
        io = sess.io_binding()
        for k, v in (("input_ids", ids), ("position_ids", pos)):
            if k in inputs:
                io.bind_cpu_input(k, v)
        if "attention_mask" in inputs:
            io.bind_cpu_input("attention_mask", np.ones((width, pool.length), np.int64))
        if xs is not None:
            h = np.zeros((width, n, self.hidden_size), np.float32)
            for i, (r, x) in enumerate(zip(rows, xs, strict=True)):
                h[r.slot - lo, :ns[i]] = x
            io.bind_cpu_input(self._owners[s]["hidden_in"], h)
        if not propagate:
            io.bind_output(self._owners[s]["hidden_out"], "cpu")  # first: get_outputs() keeps the binding order
        for j, (past, present) in enumerate(zip(self._kv_names[s], self._present[s], strict=True)):
            ov = self._ort.OrtValue.ortvalue_from_numpy(pool.buffers[s][j][lo:hi])
            io.bind_ortvalue_input(past, ov)
            io.bind_ortvalue_output(present, ov)
        try:
            sess.run_with_iobinding(io)
        except Exception as e:  # onnxruntime's own error types
            raise BackendError(f"segment {s} ({self._owners[s]['file']}) failed: {e}") from e
        hidden = None if propagate else io.get_outputs()[0].numpy()
        self.calls["propagate" if propagate else "segments"][s] += 1
        self.calls["kv_bytes_written"] += len(self._kv_names[s]) * 4 * self.kv_heads * self.head_dim * width * n
        res = []
        for i, r in enumerate(rows):
            r.lengths[s] += ns[i]
            res.append(np.empty((0, self.hidden_size), np.float32) if hidden is None else hidden[r.slot - lo, :ns[i]])
        return res

    def _run_head(self, h: np.ndarray, threshold: float, logits: bool, *, drafts: np.ndarray | None = None,
                  n_fed: np.ndarray | None = None, sampling: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The shared head on hidden states [B, S, D]: token [B, S] int64, max_prob and gate [B, S] (and logits
        [B, S, V] when asked). With ``drafts`` [B, S] int64 (-1 where none) and ``n_fed`` [B] on a head that
        computes acceptance in the graph (``in_graph_acceptance``): only accepted [B] and next_token [B] —
        greedy, or with ``sampling`` (``temperature`` [B] (<= 0: a greedy row), ``draft_probs`` [B, S, V],
        ``u_accept`` [B, S], ``u_sample`` [B], all float32; needs ``in_graph_sampling``) by speculative rejection
        sampling (``eecompile.decoder.acceptance``)."""
        accept = drafts is not None and self.in_graph_acceptance
        names = ["accepted", "next_token"] if accept else ["token", "max_prob", "gate"] + (["logits"] if logits else [])
        feeds: dict[str, np.ndarray] = {self.dec["head"]["input"]: np.ascontiguousarray(h, np.float32),
                                        self.dec["head"]["threshold_input"]: np.array(threshold, np.float32)}
        if self._head_accepts:
            feeds["drafts"] = drafts if accept else np.full((1, 1), -1, np.int64)  # type: ignore[assignment]
            feeds["n_fed"] = n_fed if accept else np.zeros(1, np.int64)  # type: ignore[assignment]
        if self._head_samples:  # a greedy call: temperature 0 takes the If's greedy branch; the rest is not read
            feeds.update(sampling if accept and sampling is not None else {
                "temperature": np.zeros(1, np.float32), "draft_probs": np.zeros((1, 1, self.vocab), np.float32),
                "u_accept": np.zeros((1, 1), np.float32), "u_sample": np.zeros(1, np.float32)})
        try:
            out = self._head.run(names, feeds)
        except Exception as e:
            raise BackendError(f"head ({self.dec['head']['file']}) failed: {e}") from e
        self.calls["head"] += 1
        return dict(zip(names, out, strict=True))

    def _exit_head(self, k: int, h: np.ndarray, threshold: float, logits: bool) -> dict[str, np.ndarray]:
        """Exit ``k``'s draft head (its trained adapter + sub-vocabulary head when it has one, else the shared head)
        on hidden states [B, S, D]; ``logits`` (when asked) are over the full vocabulary (-inf outside the
        sub-vocabulary, so a draft distribution is zero there)."""
        sess = self._drafts.get(k)
        if sess is None:
            return self._run_head(h, threshold, logits)
        names = ["token", "max_prob", "gate"] + (["logits"] if logits else [])
        try:
            out = dict(zip(names, sess.run(names, {"hidden": np.ascontiguousarray(h, np.float32),
                                                   "threshold": np.array(threshold, np.float32)}), strict=True))
        except Exception as e:
            raise BackendError(f"draft head of exit {k} failed: {e}") from e
        self.calls["draft_head"] = self.calls.get("draft_head", 0) + 1
        if logits:
            sub = out["logits"]
            full = np.full((*sub.shape[:-1], self.vocab), -np.inf, np.float32)
            full[..., self._draft_ids[k]] = sub
            out["logits"] = full
        return out

    def _stack(self, rows: list[_Row], first: int, last: int) -> list[np.ndarray]:
        """Run segments ``first..last`` (inclusive) over each row's pending positions; return segment ``last``'s
        outputs per row. Outputs of a segment are pending for the next one until it runs."""
        outs: list[np.ndarray] = []
        for s in range(first, last + 1):
            xs = None if s == 0 else [np.stack(r.pending[s]) for r in rows]
            outs = self._run_segment(s, rows, xs)
            for r, o in zip(rows, outs, strict=True):
                if s > 0:
                    r.pending[s] = []
                if s + 1 < len(self.segments):
                    r.pending[s + 1].extend(o)
                for a in self._adapters_after.get(s, ()):  # an exit's attention adapter reads these states too
                    r.pending[a].extend(o)
        return outs

    def _adapt(self, k: int, rows: list[_Row], outs: list[np.ndarray]) -> list[np.ndarray]:
        """The draft head's input at exit ``k`` for the positions of ``outs`` (each row's exit states, [n_i, D]):
        ``outs`` itself, or with an attention adapter its output after running it over the row's pending exit
        states (which end with those positions), filling its key/value cache."""
        a = self._adapter_of.get(k)
        if a is None:
            return outs
        got = self._run_segment(a, rows, [np.stack(r.pending[a]) for r in rows])
        for r in rows:
            r.pending[a] = []
        return [g[len(g) - len(o):] for g, o in zip(got, outs, strict=True)]

    def has_attention_adapter(self, k: int) -> bool:
        """Exit ``k``'s draft head starts with an attention adapter (which owns a key/value cache)."""
        return k in self._adapter_of

    def _drop_adapter_states(self, rows: list[_Row], keep: int | None) -> None:
        """Forget pending exit states of adapters the mode does not read (all but exit ``keep``'s), which
        would otherwise pile up."""
        for k, a in self._adapter_of.items():
            if k != keep:
                for r in rows:
                    r.pending[a] = []


    # ------------------------------------------------------------------------------------------ generate

    def _thresholds(self, thresholds: Any, mode: str) -> list[float]:
        n = len(self.exits)
        if thresholds is None:
            vals: list[Any] = [e["gate"]["threshold"] for e in self.exits]
        elif isinstance(thresholds, (str, int, float)):
            vals = [thresholds] * n
        else:
            vals = list(thresholds)
            if len(vals) != n:
                raise DataError(f"thresholds: got {len(vals)} values for {n} exits; give one per exit")
        out = []
        for k, v in enumerate(vals):
            if v == "never":
                out.append(_NEVER)
            elif v == "always":
                out.append(_ALWAYS)
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= float(v) <= 1.0:
                out.append(float(v))
            else:
                raise DataError(f"thresholds[{k}]: {v!r} is not a max-prob threshold in [0, 1], 'never' or 'always'")
        return out

    def open_batch(self, mode: str = "none", max_batch: int | None = None, thresholds: Any = None,
                   draft_tokens: int | None = None, exit: int = 0, *, calibrated: bool = True,
                   drafting_costs: tuple[float, float] | None = None, exit_fill: str = "later") -> DecodeBatch:
        """An iteration-level decoding batch: rows join (``add``) and leave between ``step()`` calls.

        ``mode``, ``thresholds``, ``draft_tokens``, ``exit`` and ``calibrated`` as for ``generate``; they hold
        for every row of the batch. ``max_batch``: the most rows decoded together (None: no limit); rows added
        beyond it wait and join as others finish. ``drafting_costs``: (r, g), a draft step's and a verification's
        cost over a plain step (default: the calibration's for this batch size, when it has them); with them a
        speculative row whose predicted speedup, tokens / (draft steps * r + g) per round over running means,
        falls below 1 decodes plainly for ``PAUSE_STEPS`` steps, then drafts again (the tokens do not change).
        ``exit_fill`` (exit mode): how the layers a token skipped get its keys/values, "later" (its exit state
        goes through them with the next token that goes deep: what the full model computes from it) or
        "propagate" (CALM: each skipped layer's own key/value projections of the exit state, at once).
        Raises ``DataError`` for a bad mode, exit, threshold, k or exit_fill.
        """
        return DecodeBatch(self, mode=mode, max_batch=max_batch, thresholds=thresholds, draft_tokens=draft_tokens,
                           exit=exit, calibrated=calibrated, drafting_costs=drafting_costs, exit_fill=exit_fill)

    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]] | str, max_new_tokens: int, *,
                 mode: str = "none", thresholds: Any = None, draft_tokens: int | None = None, exit: int = 0,
                 sample: bool = False, temperature: float = 1.0, seed: int | None = None,
                 eos_token_id: int | None = None, batch: int | None = None,
                 calibrated: bool = True, exit_fill: str = "later") -> GenerateResult:
        """Continue each prompt (text, or a list of token ids) by up to ``max_new_tokens`` tokens.

        ``mode``: "none" | "speculative" | "exit" (see the module docstring). ``thresholds``: per exit, a
        max-prob in [0, 1], "never" or "always" (default: the bundle's). ``draft_tokens``: k, the most tokens
        drafted per verification (default: the exit's). ``exit``: the exit that drafts (speculative).
        ``sample``: draw from softmax(logits / temperature), else greedy; row i draws from its own generator,
        ``numpy.random.default_rng(SeedSequence(seed).spawn(n)[i])``. ``batch``: the most rows decoded together
        (default: all prompts); a row that finishes makes room for the next prompt. Stops a row at
        ``eos_token_id`` (default: the bundle's) or after ``max_new_tokens``. ``calibrated``: in speculative
        mode without explicit thresholds and k, use the bundle's calibration for this batch size
        (``eecompile.decoder.calibrate``), which may switch drafting off where it did not pay (plain decoding;
        the same tokens); in exit mode without thresholds, use the bundle's Learn-then-Test exit thresholds
        (``eecompile.decoder.calibrate.calibrate_exit``) when it has them, and decode plainly at a batch size
        its speed measurement switched exits off (the tokens of mode none). ``exit_fill``: as for ``open_batch``.
        This is a loop over ``open_batch(...).step()``.

        Raises ``DataError`` for a bad mode, ``max_new_tokens`` < 1, a seed that is not a non-negative integer, an
        empty prompt, a token id outside the
        vocabulary, or a prompt that with ``max_new_tokens`` does not fit the cache (``max_length``).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if batch is not None and batch < 1:
            raise DataError(f"batch: {batch}; give a positive number of rows")
        db = self.open_batch(mode, max_batch=batch or max(len(prompts), 1), thresholds=thresholds,
                             draft_tokens=draft_tokens, exit=exit, calibrated=calibrated, exit_fill=exit_fill)
        seeds = np.random.SeedSequence(_seed(seed)).spawn(len(prompts)) if seed is not None else [None] * len(prompts)
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            db._add(cast("str | Sequence[int]", p), max_new_tokens, sample=sample, temperature=temperature, rng=np.random.default_rng(seeds[i]),
                    eos_token_id=eos_token_id, where=f"prompts[{i}]")
        tokens: list[list[int]] = [[] for _ in prompts]
        while db.active or db.waiting:
            for ev in db.step():
                tokens[ev.row] += ev.token_ids
        wall = time.perf_counter() - t0
        results = []
        for i, p in enumerate(prompts):
            gen = tokens[i]
            text = self._decode(gen) if isinstance(p, str) or self._has_tokenizer() else ""
            results.append({"prompt": p if isinstance(p, str) else "", "token_ids": gen, "text": text})
        n_gen = sum(len(t) for t in tokens)
        stats = db.stats
        res = GenerateResult(results=results, tokens_per_s=n_gen / wall if wall > 0 else 0.0, stats=stats)
        if mode == "speculative":
            res.acceptance_rate = stats["accepted"] / stats["drafted"] if stats["drafted"] else 0.0
            res.mean_accepted_length = stats["emitted"] / stats["rounds"] if stats["rounds"] else 0.0
        if mode == "exit":
            if stats.get("exits_off"):  # decoded plainly: every token from the final head
                stats["exit_counts"][-1] = n_gen
            total = sum(stats["exit_counts"]) or 1
            res.exit_shares = [c / total for c in stats["exit_counts"]]
        return res

    def _has_tokenizer(self) -> bool:
        return self._tokenizer is not None or self.dec.get("tokenizer") is not None

    def _new_row(self, index: int, ids: list[int], **kw: Any) -> _Row:
        n_seg = len(self._owners)
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
        return _Row(index=index, seq=list(ids), n_prompt=len(ids), n_confirmed=len(ids),
                    caches=[[empty] * len(self._kv_names[s]) for s in range(n_seg)], lengths=[0] * n_seg,
                    pending=[[] for _ in range(n_seg)], **kw)

    def _new_rows(self, ids_list: Sequence[Sequence[int]]) -> list[_Row]:
        """Rows outside a DecodeBatch that share one pool (in-place caches), so ``_stack`` runs them together."""
        rows = [self._new_row(i, list(ids)) for i, ids in enumerate(ids_list)]
        if self.in_place and rows:
            pool = KVPool(self, len(rows), length=max(len(r.seq) for r in rows))
            for r in rows:
                r.pool, r.slot = pool, pool.acquire(r)
        return rows

    # ------------------------------------------------------------------------------------------ steps

    def _pick(self, head: dict[str, np.ndarray], i: int, j: int, r: _Row) -> tuple[int, np.ndarray | None]:
        """The token at row i, position j of a head call: argmax, or a draw from softmax(logits / T)."""
        if not r.sample:
            return int(head["token"][i, j]), None
        assert r.rng is not None
        p = softmax(head["logits"][i, j], r.temperature)
        return int(r.rng.choice(len(p), p=p)), p

    def _emit(self, r: _Row, tokens: list[int]) -> None:
        """Confirm ``tokens`` after the row's confirmed tokens (dropping its drafts); stop at EOS or the budget."""
        seq = r.seq[:r.n_confirmed]
        for t in tokens:
            if len(seq) - r.n_prompt >= r.max_new:
                break
            seq.append(t)
            if r.eos is not None and t == r.eos:
                r.done, r.finish_reason = True, "eos"
                break
        old = r.seq
        common = 0
        for a, b in zip(old, seq, strict=False):
            if a != b:
                break
            common += 1
        self._rewind(r, common)
        r.seq = seq
        r.n_confirmed = len(seq)
        r.q = []
        if not r.done and r.generated >= r.max_new:
            r.done, r.finish_reason = True, "length"

    def _rewind(self, r: _Row, common: int) -> None:
        """Forget what the segments (and attention adapters) computed past the first ``common`` positions
        (rejected drafts)."""
        for s in range(len(self._owners)):  # lower the row's length (a narrower view)
            if r.lengths[s] > common:
                r.lengths[s] = common
                if r.pool is None:
                    r.caches[s] = [c[:, :, :common] for c in r.caches[s]]
                r.pending[s] = []

    def _prefill(self, rows: list[_Row]) -> None:
        """Every prompt position but the last through every segment; the mode's first step then takes the last
        prompt token, so the first generated token is drafted (speculative) or may exit (exit mode) too."""
        todo = [r for r in rows if r.n_prompt > 1]
        if not todo:
            return
        full = [r.seq for r in todo]
        for r in todo:
            r.seq = r.seq[:-1]
        self._stack(todo, 0, len(self.segments) - 1)
        for r, seq in zip(todo, full, strict=True):
            r.seq = seq
            for s in range(1, len(self.segments)):
                r.pending[s] = []

    def _step_none(self, rows: list[_Row], ctx: _Ctx) -> None:
        outs = self._stack(rows, 0, len(self.segments) - 1)
        head = self._run_head(np.stack([o[-1:] for o in outs]), _NEVER, _sampling(rows))
        for i, r in enumerate(rows):
            t, _ = self._pick(head, i, 0, r)
            self._emit(r, [t])

    def _step_exit(self, rows: list[_Row], ctx: _Ctx) -> None:
        """One token per row; a row stops at the first exit whose gate fires on it (CALM/SpecEE)."""
        going = rows
        for e, ex in enumerate(self.exits):
            first = 0 if e == 0 else self.exits[e - 1]["segment"] + 1
            outs = self._adapt(e, going, self._stack(going, first, ex["segment"]))
            head = self._exit_head(e, np.stack([o[-1:] for o in outs]), ctx.thr[e], _sampling(going))
            deeper, left = [], []
            for i, r in enumerate(going):
                if head["gate"][i, 0]:
                    t, _ = self._pick(head, i, 0, r)
                    ctx.stats["exit_counts"][e] += 1
                    self._emit(r, [t])
                    left.append(r)
                else:
                    deeper.append(r)
            if left and ctx.exit_fill == "propagate":
                self._propagate_state(left, ex["segment"])
            going = deeper
            if not going:
                return
        first = self.exits[-1]["segment"] + 1
        outs = self._stack(going, first, len(self.segments) - 1)
        head = self._run_head(np.stack([o[-1:] for o in outs]), _NEVER, _sampling(going))
        for i, r in enumerate(going):
            t, _ = self._pick(head, i, 0, r)
            ctx.stats["exit_counts"][-1] += 1
            self._emit(r, [t])

    def _propagate_state(self, rows: list[_Row], seg: int) -> None:
        """CALM's state propagation: the segments after ``seg`` write the keys/values of each row's pending
        position from its exit state alone (``eecompile.decoder.propagate``), so nothing stays pending."""
        xs = [np.stack(r.pending[seg + 1]) for r in rows]
        for s in range(seg + 1, len(self.segments)):
            self._run_segment(s, rows, xs, propagate=True)
            for r in rows:
                r.pending[s] = []

    def _step_speculative(self, rows: list[_Row], ctx: _Ctx) -> None:
        """One draft step for rows drafting, then one verification for rows whose drafting stopped."""
        e = self.exits[ctx.exit]
        last_draft = e["segment"]
        outs = self._adapt(ctx.exit, rows, self._stack(rows, 0, last_draft))
        head = self._exit_head(ctx.exit, np.stack([o[-1:] for o in outs]), ctx.thr[ctx.exit], _sampling(rows))
        verify = []
        for i, r in enumerate(rows):
            n_drafts = len(r.seq) - r.n_confirmed
            room = r.max_new - r.generated - 1  # a verification emits up to n_drafts + 1 tokens
            if head["gate"][i, 0] and n_drafts < min(ctx.k, room):
                t, q = self._pick(head, i, 0, r)
                r.seq.append(t)
                if q is not None:
                    r.q.append(q)
                if len(r.seq) - r.n_confirmed < min(ctx.k, room):
                    continue  # keep drafting: feed this draft next step
            verify.append(r)
        if not verify:
            return
        outs = self._stack(verify, last_draft + 1, len(self.segments) - 1)
        hidden = np.stack(pad_positions(outs))
        sampling = _sampling(verify)
        # per sampled row, one uniform per draft (accept?) and one for the token after them, drawn up front from
        # the row's generator: the graph and the host rule use the same draws
        draws = [r.rng.random(len(r.seq) - r.n_confirmed + 1) if r.sample and r.rng is not None else None
                 for r in verify]
        in_graph = self.in_graph_acceptance and (not sampling or self.in_graph_sampling)
        if in_graph:
            d = np.full(hidden.shape[:2], -1, np.int64)
            for i, r in enumerate(verify):
                drafts = r.seq[r.n_confirmed:]
                d[i, :len(drafts)] = drafts
            fed = np.array([len(o) for o in outs], np.int64)
            head = self._run_head(hidden, _NEVER, False, drafts=d, n_fed=fed,
                                  sampling=_sampling_feeds(verify, draws, hidden.shape[1], self.vocab) if sampling
                                  else None)
        else:
            head = self._run_head(hidden, _NEVER, sampling)
        for i, r in enumerate(verify):
            drafts = r.seq[r.n_confirmed:]
            n_fed = len(outs[i])  # verified positions: the last confirmed token and the drafts fed
            if in_graph:
                m, nxt = int(head["accepted"][i]), int(head["next_token"][i])
                emitted = drafts[:m] + ([nxt] if nxt >= 0 else [])
            else:
                emitted = self._accept(head, i, drafts, n_fed, r, draws[i])
            ctx.stats["drafted"] += len(drafts)
            ctx.stats["accepted"] += _n_accepted(drafts, emitted)
            ctx.stats["rounds"] += 1
            ctx.stats["emitted"] += len(emitted)
            self._emit(r, emitted)
            if ctx.costs is not None:
                _judge(r, len(emitted), n_fed, ctx)

    def _accept(self, head: dict[str, np.ndarray], i: int, drafts: list[int], n_fed: int, r: _Row,
                draws: np.ndarray | None) -> list[int]:
        """The tokens a verification emits, on the host (heads without acceptance in the graph): the longest
        accepted prefix of ``drafts`` plus the verifier's token (none when every draft was accepted and the last
        one was not fed). Sampled rows: ``sampled_verification`` with the row's ``draws``."""
        if not r.sample:
            v = [int(t) for t in head["token"][i, :n_fed]]
            m = 0
            while m < len(drafts) and m < n_fed and drafts[m] == v[m]:
                m += 1
            return drafts[:m] + ([v[m]] if m < n_fed else [])
        assert draws is not None
        p = np.stack([softmax(head["logits"][i, j], r.temperature) for j in range(n_fed)])
        q = np.stack(r.q) if r.q else np.zeros((0, self.vocab))
        m, nxt = sampled_verification(p, q, drafts, draws[:-1], float(draws[-1]))
        return drafts[:m] + ([nxt] if nxt >= 0 else [])


def _sampling_feeds(rows: list[_Row], draws: list[np.ndarray | None], n: int, vocab: int) -> dict[str, np.ndarray]:
    """The head's sampling inputs for a verification of ``rows`` over ``n`` positions (greedy rows: temperature 0)."""
    b = len(rows)
    feeds = {"temperature": np.zeros(b, np.float32), "draft_probs": np.zeros((b, n, vocab), np.float32),
             "u_accept": np.zeros((b, n), np.float32), "u_sample": np.zeros(b, np.float32)}
    for i, (r, u) in enumerate(zip(rows, draws, strict=True)):
        if u is None:
            continue
        feeds["temperature"][i] = r.temperature
        if r.q:
            feeds["draft_probs"][i, :len(r.q)] = np.stack(r.q)
        u32 = np.minimum(u.astype(np.float32), _BELOW_ONE)  # float32 rounding must not reach 1 (a 0-probability token)
        feeds["u_accept"][i, :len(u) - 1] = u32[:-1]
        feeds["u_sample"][i] = u32[-1]
    return feeds


_BELOW_ONE = np.nextafter(np.float32(1.0), np.float32(0.0))


@dataclass
class _Ctx:
    thr: list[float]
    k: int
    exit: int
    stats: dict[str, Any]
    costs: tuple[float, float] | None = None  # (r, g): a row whose predicted speedup falls below 1 pauses drafting
    exit_fill: str = "later"  # exit mode: how skipped layers get an exited position's keys/values (EXIT_FILLS)


SWITCH_WEIGHT = 0.3  # running means of a row's speculative rounds: weight of the newest round
SWITCH_WARMUP = 3  # rounds before a row's drafting can be paused
PAUSE_STEPS = 32  # plain steps of a paused row before it drafts again


def _judge(r: _Row, tokens: int, steps: int, ctx: _Ctx) -> None:
    """Pause a row's drafting when its predicted speedup, tokens / (draft steps * r + g) per round from running
    means (Leviathan et al. 2023's cost model with the measured r and g), falls below 1."""
    assert ctx.costs is not None
    r_cost, g_cost = ctx.costs
    if r.spec_steps == 0.0:
        r.spec_tokens, r.spec_steps = float(tokens), float(steps)
    else:
        r.spec_tokens += SWITCH_WEIGHT * (tokens - r.spec_tokens)
        r.spec_steps += SWITCH_WEIGHT * (steps - r.spec_steps)
    rounds = ctx.stats.setdefault("row_rounds", {})
    rounds[r.index] = rounds.get(r.index, 0) + 1
    if rounds[r.index] >= SWITCH_WARMUP and r.spec_tokens < r.spec_steps * r_cost + g_cost:
        r.paused = PAUSE_STEPS
        r.spec_tokens = r.spec_steps = 0.0
        rounds[r.index] = 0
        ctx.stats["paused"] = ctx.stats.get("paused", 0) + 1


def _sampling(rows: Sequence[_Row]) -> bool:
    return any(r.sample for r in rows)


class DecodeBatch:
    """Iteration-level decoding over one ``DecoderRunner``: rows join and leave between steps.

    Made by ``DecoderRunner.open_batch``. ``add`` queues a row (its prefill runs at the next ``step``);
    ``step`` admits waiting rows up to ``max_batch``, prefills them, and runs one iteration of the mode for all
    active rows (none/exit: one token per row; speculative: one draft token for rows drafting, one verification
    for rows whose drafting stopped), returning a ``StepEvent`` per row that confirmed tokens or finished.
    Every row keeps its own cache, lengths and positions, and its tokens are decided from its own logits only,
    so greedy tokens do not depend on when a row joined or on the other rows (rows are stacked left-padded
    with masked slots: the padding changes kernel reduction order at the last float bit at most).
    ``active``/``waiting``: rows decoding / queued. ``stats``: drafted, accepted, rounds, emitted,
    exit_counts (per exit, then the final head). Not thread-safe: one caller drives a batch.
    """

    def __init__(self, runner: DecoderRunner, *, mode: str, max_batch: int | None, thresholds: Any,
                 draft_tokens: int | None, exit: int, calibrated: bool,
                 drafting_costs: tuple[float, float] | None = None, exit_fill: str = "later") -> None:
        if mode not in MODES:
            raise DataError(f"mode: '{mode}' is not one of {list(MODES)}")
        if exit_fill not in EXIT_FILLS:
            raise DataError(f"exit_fill: '{exit_fill}' is not one of {list(EXIT_FILLS)}")
        if exit_fill == "propagate":
            if mode != "exit":
                raise DataError(f"exit_fill 'propagate' applies to mode 'exit', not '{mode}'")
            if runner.dec.get("state"):
                raise DataError(f"{runner.bundle.path}: exit_fill 'propagate' writes a skipped layer's key/value at the "
                                f"exited position; a recurrent-state decoder has no cache to write into (each layer's "
                                f"state runs over every position in order): use exit_fill 'later'")
            deep = range(int(runner.exits[0]["segment"]) + 1 if runner.exits else 0, len(runner.segments))
            missing = [s for s in deep if s not in runner._propagate]
            if missing:
                raise DataError(f"{runner.bundle.path}: segments {missing} have no state-propagation graph (the bundle "
                                f"was compiled before them, or its layer outputs are not named layers.N.output); "
                                f"recompile it, or use exit_fill 'later'")
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
            raise DataError(f"max_batch: {max_batch!r}; give a positive number of rows (or None: no limit)")
        if mode != "none" and not runner.exits:
            raise DataError("the bundle has no exits; use mode 'none'")
        if runner.exits and not 0 <= exit < len(runner.exits):
            raise DataError(f"exit: {exit} is not an exit of this bundle (it has {len(runner.exits)})")
        self.runner = runner
        self.mode = mode
        self.max_batch = max_batch
        self.drafting_off = False
        choice = choice_for_batch(runner.dec.get("calibration"), max_batch or 1) if (
            mode == "speculative" and calibrated and thresholds is None and draft_tokens is None) else None
        costs = drafting_costs
        if costs is None and choice is not None and "r" in choice and "g" in choice:
            costs = (float(choice["r"]), float(choice["g"]))
        if choice is not None:
            self.drafting_off = bool(choice.get("off"))
            if not self.drafting_off:
                thresholds = [choice["threshold"] if j == exit else "never" for j in range(len(runner.exits))]
                draft_tokens = int(choice["draft_tokens"])
        cal_exit = (runner.dec.get("calibration") or {}).get("exit")
        self.exits_off = False
        if mode == "exit" and calibrated and thresholds is None and cal_exit:
            thresholds = list(cal_exit["thresholds"])  # Learn-then-Test (eecompile.decoder.calibrate)
            exit_choice = choice_for_batch(runner.dec.get("calibration"), max_batch or 1, mode="exit")
            self.exits_off = bool(exit_choice and exit_choice.get("off"))  # exiting did not pay at this size
        thr = runner._thresholds(thresholds, mode)
        k = int(draft_tokens if draft_tokens is not None else
                (runner.exits[exit].get("draft_tokens", 6) if runner.exits else 1))
        if k < 1:
            raise DataError(f"draft_tokens: {k}; give at least 1")
        self.stats: dict[str, Any] = {"drafted": 0, "accepted": 0, "rounds": 0, "emitted": 0,
                                      "exit_counts": [0] * (len(runner.exits) + 1)}
        if self.drafting_off:
            self.stats["drafting_off"] = True
        if self.exits_off:
            self.stats["exits_off"] = True
        self._ctx = _Ctx(thr=thr, k=k, exit=exit, stats=self.stats, costs=costs, exit_fill=exit_fill)
        step = {"none": runner._step_none, "speculative": runner._step_speculative, "exit": runner._step_exit}
        self._step = runner._step_none if self.drafting_off or self.exits_off else step[mode]
        self._waiting: deque[_Row] = deque()
        self._active: list[_Row] = []
        # in-place caches: one pool for the batch, a slot per active row (grows by doubling past max_batch)
        self._pool = KVPool(runner, min(max_batch or 4, 64)) if runner.in_place else None
        self._next_id = 0
        self._closed = False

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def add(self, prompt_or_token_ids: str | Sequence[int], max_new_tokens: int, sample: bool = False,
            temperature: float = 1.0, seed: int | None = None, eos_token_id: int | None = None) -> int:
        """Queue a row: text (needs a tokenizer) or token ids; it joins (prefill) at the next ``step()``.

        ``sample``: draw from softmax(logits / temperature) with ``numpy.random.default_rng(seed)``, else
        greedy. ``eos_token_id``: stop token (default: the bundle's). Returns the row id used in ``StepEvent``.
        Raises ``DataError`` for ``max_new_tokens`` < 1, a temperature ≤ 0 with sampling, a seed that is not a
        non-negative integer, an empty prompt, a token id outside the vocabulary, or a prompt that with
        ``max_new_tokens`` does not fit ``max_length``.
        """
        return self._add(prompt_or_token_ids, max_new_tokens, sample=sample, temperature=temperature,
                         rng=np.random.default_rng(_seed(seed)), eos_token_id=eos_token_id, where="prompt")

    def _add(self, p: str | Sequence[int], max_new_tokens: int, *, sample: bool, temperature: float,
             rng: np.random.Generator, eos_token_id: int | None, where: str) -> int:
        if self._closed:
            raise DataError("this decoding batch is closed; open a new one with DecoderRunner.open_batch")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise DataError(f"max_new_tokens: {max_new_tokens!r}; give a positive number of tokens to generate")
        if sample and not temperature > 0:
            raise DataError(f"temperature: {temperature}; sampling needs a temperature > 0")
        run = self.runner
        ids = run._encode(p) if isinstance(p, str) else [int(t) for t in p]
        if not ids:
            raise DataError(f"{where}: empty; give at least one token")
        bad = [t for t in ids if not 0 <= t < run.vocab]
        if bad:
            raise DataError(f"{where}: token id {bad[0]} is outside the vocabulary (0..{run.vocab - 1})")
        if len(ids) + max_new_tokens > run.max_length:
            raise DataError(f"{where}: {len(ids)} tokens + max_new_tokens {max_new_tokens} exceed the cache "
                            f"({run.max_length} positions); shorten the prompt, lower max_new_tokens, or "
                            f"recompile with a larger max_length")
        row = run._new_row(self._next_id, ids, max_new=max_new_tokens,
                           eos=run.eos_token_id if eos_token_id is None else eos_token_id,
                           sample=sample, temperature=temperature, rng=rng)
        self._next_id += 1
        self._waiting.append(row)
        return row.index

    def cancel(self, row: int) -> None:
        """Drop a waiting or active row (its cache is freed; no further event for it). A finished row: no-op.
        Raises ``DataError`` for an id this batch never gave."""
        if not 0 <= row < self._next_id:
            raise DataError(f"row {row}: no such row in this batch")
        self._waiting = deque(r for r in self._waiting if r.index != row)
        for r in self._active:
            if r.index == row and self._pool is not None:
                self._pool.release(r)
        self._active = [r for r in self._active if r.index != row]

    def close(self) -> None:
        """Drop every row; ``add``/``step`` then raise ``DataError``."""
        self._waiting.clear()
        self._active = []
        self._pool = None
        self._closed = True

    def step(self) -> list[StepEvent]:
        """One iteration: admit and prefill waiting rows (up to ``max_batch`` active), then one step of the mode
        for every active row. Returns events for rows that confirmed tokens or finished; finished rows leave.
        Raises ``BackendError`` when a session fails (the batch is then closed)."""
        if self._closed:
            raise DataError("this decoding batch is closed; open a new one with DecoderRunner.open_batch")
        join: list[_Row] = []
        while self._waiting and (self.max_batch is None or len(self._active) + len(join) < self.max_batch):
            join.append(self._waiting.popleft())
        if self._pool is not None:
            for r in join:
                r.pool, r.slot = self._pool, self._pool.acquire(r)
        try:
            if join:
                self.runner._prefill(join)
                self._active += join
            if not self._active:
                return []
            plain = [r for r in self._active if r.paused > 0 and len(r.seq) == r.n_confirmed]
            if plain and self._step == self.runner._step_speculative:  # rows whose drafting did not pay
                self.runner._step_none(plain, self._ctx)
                for r in plain:
                    r.paused -= 1
                rest = [r for r in self._active if all(r is not p for p in plain)]
                if rest:
                    self._step(rest, self._ctx)
            else:
                self._step(self._active, self._ctx)
        except BackendError:
            self.close()
            raise
        if self.runner._adapter_of and self.mode != "exit":  # exit mode reads every exit's adapter
            self.runner._drop_adapter_states(self._active, None if self._step == self.runner._step_none
                                             else self._ctx.exit)
        events = []
        for r in self._active:
            new = r.seq[r.n_prompt + r.reported:r.n_confirmed]
            if not new and not r.done:
                continue
            r.reported += len(new)
            events.append(StepEvent(row=r.index, token_ids=new, finished=r.done, finish_reason=r.finish_reason,
                                    text=self._text(r)))
        for r in self._active:
            if r.done and self._pool is not None:
                self._pool.release(r)
        self._active = [r for r in self._active if not r.done]
        return events

    def _text(self, r: _Row) -> str | None:
        run = self.runner
        if not run._has_tokenizer():
            return None
        full = run._decode(r.seq[r.n_prompt:r.n_prompt + r.reported])
        if full.endswith("\ufffd") and not r.done:  # a multi-byte character is not complete yet
            return ""
        # a tokenizer may rewrite earlier text as more tokens come (byte fallback): the new part is what follows
        # the longest common prefix with what was returned
        n = 0
        while n < min(len(full), len(r.text)) and full[n] == r.text[n]:
            n += 1
        r.text = full
        return full[n:]


class KVPool:
    """Preallocated key/value buffers for the in-place cache: per segment, per cached tensor, one float32 array
    [slots, H_kv, length, D]; a row owns one slot (its cache is ``buffer[slot, :, :row length]``).

    ``length`` starts at ``INITIAL`` (or the longest row asked for) plus ``SPARE`` positions (so the zero-padded
    positions of a short row in a longer call fit) and doubles, up to ``max_length + SPARE``, when a call needs
    more: attention reads the whole buffer, so it stays near the longest row rather than ``max_length``. Slots
    double when all are taken. Each growth copies the buffers once (counted in ``kv_bytes_copied``): a few
    copies per pool, not one per step. Memory: slots x 2 x layers x H_kv x length x D x 4 bytes.
    """

    SPARE = 16
    INITIAL = 64

    def __init__(self, runner: DecoderRunner, slots: int, length: int | None = None) -> None:
        self.runner = runner
        self.length = min(max(self.INITIAL, length or 0), max(runner.max_length, length or 0)) + self.SPARE
        self._cap = max(runner.max_length, length or 0) + self.SPARE
        self.buffers: list[list[np.ndarray]] = [[self._zeros(slots, self.length) for _ in names]
                                                for names in runner._kv_names]
        self.rows: list[_Row | None] = [None] * slots

    def _zeros(self, slots: int, length: int) -> np.ndarray:
        return np.zeros((slots, self.runner.kv_heads, length, self.runner.head_dim), np.float32)

    def _grow(self, slots: int, length: int) -> None:
        for bufs in self.buffers:
            for j, b in enumerate(bufs):
                new = self._zeros(slots, length)
                new[:b.shape[0], :, :b.shape[2]] = b
                self.runner.calls["kv_bytes_copied"] += b.nbytes
                bufs[j] = new
        self.rows += [None] * (slots - len(self.rows))
        self.length = length

    def ensure(self, positions: int) -> bool:
        """Make room for ``positions`` slots per row (doubling); False when that exceeds the cap."""
        if positions <= self.length:
            return True
        if positions > self._cap:
            return False
        self._grow(len(self.rows), min(max(2 * self.length, positions), self._cap))
        return True

    def acquire(self, row: _Row) -> int:
        """The lowest free slot for ``row`` (doubling the slots when none is free)."""
        try:
            slot = self.rows.index(None)
        except ValueError:
            slot = len(self.rows)
            self._grow(max(1, 2 * len(self.rows)), self.length)
        self.rows[slot] = row
        return slot

    def release(self, row: _Row) -> None:
        if 0 <= row.slot < len(self.rows) and self.rows[row.slot] is row:
            self.rows[row.slot] = None


def choice_for_batch(calibration: dict[str, Any] | None, batch: int, mode: str = "speculative") -> dict[str, Any] | None:
    """The calibrated entry of ``mode`` ("speculative": ``calibration.speculative``; "exit": the per-batch
    entries ``calibration.exit.batches``) for ``batch`` rows: the entry of the largest calibrated batch size not
    above ``batch`` (the smallest one below all of them), or None when there are none (not calibrated, or
    calibrated before exit mode measured its speed)."""
    cal = calibration or {}
    table = (cal.get("speculative") if mode == "speculative" else (cal.get("exit") or {}).get("batches")) or {}
    if not table:
        return None
    sizes = sorted(int(b) for b in table)
    below = [s for s in sizes if s <= batch]
    return dict(table[str(below[-1] if below else sizes[0])])


def _kv(prefix: str, layers: Sequence[int]) -> list[str]:
    return [f"{prefix}.{i}.{t}" for i in range(layers[0], layers[1]) for t in ("key", "value")]


def _n_accepted(drafts: list[int], emitted: list[int]) -> int:
    m = 0
    while m < len(drafts) and m < len(emitted) and drafts[m] == emitted[m]:
        m += 1
    return m


def pad_positions(outs: list[np.ndarray]) -> list[np.ndarray]:
    """Per-row hidden states [n_i, D] zero-padded to the longest n (for one head call over all rows)."""
    n = max(len(o) for o in outs)
    return [np.concatenate([o, np.zeros((n - len(o), o.shape[1]), o.dtype)]) if len(o) < n else o for o in outs]


SAMPLING_OPTIONS = ("temperature", "seed")  # options that only change a sampled row's draws


def unused_sampling_options(given: Sequence[str], sample: bool, how_to_sample: str) -> str | None:
    """The one message for sampling options given without sampling, or None when there is nothing to say.

    ``given``: the :data:`SAMPLING_OPTIONS` the caller was given, spelled as it spells them (``--temperature``,
    ``temperature``); ``how_to_sample``: how its user asks for sampling (``--sample``, ``"sample": true``).
    Without sampling, decoding is greedy and they would be ignored: ``eecompile generate`` refuses them
    (a usage error), ``POST /v1/generate`` and the Triton model answer 400 with the same message."""
    if sample or not given:
        return None
    one = len(given) == 1
    return (f"{' and '.join(given)} only appl{'ies' if one else 'y'} to sampling: add {how_to_sample} (without it "
            f"decoding is greedy and {'it' if one else 'they'} would be ignored).")


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) in float64 (sums to 1 for ``Generator.choice``)."""
    z = np.asarray(logits, np.float64) / temperature
    z = np.exp(z - z.max())
    return z / z.sum()


def sample_index(dist: np.ndarray, u: float) -> int:
    """Inverse-CDF draw from ``dist`` [V] (non-negative, not necessarily normalised) with the uniform ``u``: the
    count of normalised cumulative probabilities <= u, as ``numpy.random.Generator.choice(len(dist), p=...)``
    computes it from one ``random()`` draw."""
    cdf = np.cumsum(dist)
    cdf /= cdf[-1]
    return min(int(np.searchsorted(cdf, u, side="right")), len(dist) - 1)


def sampled_verification(p: np.ndarray, q: np.ndarray, drafts: Sequence[int], u_accept: np.ndarray,
                         u_sample: float) -> tuple[int, int]:
    """Speculative rejection sampling of one verification (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023)
    with explicit uniform draws: what the head's graph computes (``eecompile.decoder.acceptance``), on the host.

    ``p`` [n_fed, V]: the verifier's distributions at the fed positions; ``q`` [n_drafts, V]: the distribution
    each draft was drawn from; ``u_accept`` [n_drafts] and ``u_sample`` in [0, 1). Draft j is kept when
    q_j(x_j) <= 0, u_accept[j] < p_j(x_j) / q_j(x_j) (probability min(1, p/q)), or max(0, p_j - q_j) sums to 0;
    at the first rejection m the next token is ``sample_index(max(0, p_m - q_m), u_sample)``; when every draft
    is kept, it is ``sample_index(p[n_drafts], u_sample)`` if that position was fed, else -1 (none). Returns
    (drafts kept, next token); the emitted tokens follow p exactly.
    """
    for j, d in enumerate(drafts):
        residual = np.maximum(p[j] - q[j], 0.0)
        if q[j, d] <= 0 or u_accept[j] < p[j, d] / q[j, d] or residual.sum() <= 0:
            continue
        return j, sample_index(residual, u_sample)
    m = len(drafts)
    return m, (sample_index(p[m], u_sample) if m < len(p) else -1)


def speculative_accept(p: np.ndarray, q: np.ndarray, draft: int, rng: np.random.Generator) -> tuple[int, bool]:
    """Speculative rejection sampling for one draft token (Leviathan et al. 2023, Algorithm 1).

    ``p``, ``q``: the verifier's and the draft's distributions [V] (float64, sum 1); ``draft`` was drawn from q.
    Keeps it with probability min(1, p[draft] / q[draft]) (returns ``(draft, True)``), else draws from
    max(0, p - q) normalised (returns ``(token, False)``). The emitted token is distributed as p. Two draws
    from ``rng`` (the test, then the resample's): ``sampled_verification`` of one draft.
    """
    u = rng.random()
    m, token = sampled_verification(p[None], q[None], [draft], np.array([u]), rng.random())
    return (draft, True) if m == 1 else (token, False)
