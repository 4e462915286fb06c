"""Check a decoder bundle against its source model: the segment chain + shared head must give the model's logits.

Two calls at batch 2 with rows of different lengths (as the runtime stacks them: left-padded for the exported
Concat cache, each row at its own slots for the in-place cache): a prefill of 5 and 3 tokens, then one decode
step on top of the caches the segments wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from eecompile.bundle import Bundle
from eecompile.errors import BundleError

TOLERANCE = 1e-3  # max |logit difference|, relative to the logits' scale


def verify_decoder(bundle_dir: Path, source: Path, seed: int = 0, source_feeds: Any = None) -> float:
    """Return the largest relative logit difference; raise ``BundleError`` above ``TOLERANCE``.

    ``source_feeds(runner, ids)``: the source model's inputs for a whole sequence ``ids`` [1, S] from an empty
    cache (default: the KV layout's: attention mask, positions, empty past key/values)."""
    import onnxruntime as ort

    from eecompile.runtimes.lm import DecoderRunner, pad_positions
    from eecompile.runtimes.sessions import session_options

    runner = DecoderRunner(Bundle.load(bundle_dir), threads=1)
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(0, runner.vocab, 5)), list(rng.integers(0, runner.vocab, 3))]
    rows = runner._new_rows(prompts)
    so = session_options(1)
    src = ort.InferenceSession(str(source), so, providers=["CPUExecutionProvider"])
    worst = 0.0
    for _ in range(2):  # prefill, then one decode step
        outs = runner._stack(rows, 0, len(runner.segments) - 1)
        got = runner._run_head(np.stack(pad_positions(outs)), 2.0, True)["logits"]
        for i, r in enumerate(rows):
            n = len(outs[i])
            ids = np.array([r.seq], np.int64)
            feeds = (source_feeds or _kv_feeds)(runner, ids)
            want = src.run(["logits"], feeds)[0][0, -n:]
            scale = max(float(np.abs(want).max()), 1.0)
            worst = max(worst, float(np.abs(got[i, :n] - want).max()) / scale)
            r.seq.append(int(np.argmax(want[-1])))
    if worst > TOLERANCE:
        raise BundleError(f"{bundle_dir}: the decoder segments do not reproduce the model (largest relative logit "
                          f"difference {worst:.2e} > {TOLERANCE}); this is a bug in the decoder split, please "
                          f"report it with the model")
    return worst


def _kv_feeds(runner: Any, ids: np.ndarray) -> dict[str, np.ndarray]:
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None]}
    for layer in range(runner.dec["layers"]):
        for t in ("key", "value"):
            feeds[f"past_key_values.{layer}.{t}"] = np.zeros((1, runner.kv_heads, 0, runner.head_dim), np.float32)
    return feeds
