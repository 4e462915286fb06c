"""Prophet's early commit in a masked diffusion LM as a loop bundle: the LM (tokens -> logits) is the chain, one
unmasking step the step graph, ``tokens_next`` fed back as ``tokens``, and the ``logit_gap`` loop gate (the gap
between the top-2 logits, averaged over the positions still masked) commits a sample: its result is
``committed``, every masked position filled with its argmax at once."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

import eecompile
from eecompile.errors import SpecError, ThresholdError
from eecompile.runtimes.loop import LoopRunner
from tests.loops.models import MASK, SEQ, VOCAB, export_masked_lm, export_unmask_step

STEPS = 5  # 10 masked positions, 2 unmasked per step: the last step still has masked positions


def prophet_spec(d: Path, lm: Path, step: Path, name: str = "spec.yaml", **gate: object) -> Path:
    doc = {"model": str(lm), "exits": [], "final": {"output": "logits"},
           "loop": {"steps": STEPS, "step": str(step), "feedback": {"tokens_next": "tokens"},
                    "gate": {"kind": "logit_gap", "logits": "logits", "tokens": "tokens", "mask_id": MASK,
                             "threshold": 4.0, **gate},
                    "commit": "committed"}}
    path = d / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def prophet(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("prophet")
    lm, step = export_masked_lm(d / "mlm.onnx"), export_unmask_step(d / "unmask.onnx")
    bundle = eecompile.compile_model(prophet_spec(d, lm, step), d / "prophet.eebundle")
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, VOCAB, size=(12, SEQ)).astype(np.int64)
    tokens[:, 2:] = MASK  # a 2-token prompt, 10 positions to generate
    return {"dir": d, "lm": lm, "step": step, "bundle": bundle, "tokens": tokens, "runner": LoopRunner(bundle)}


def _gap(logits: np.ndarray, masked: np.ndarray, reduce: str) -> float:
    top = np.sort(logits.astype(np.float64), axis=-1)[..., -2:]
    gaps = (top[..., 1] - top[..., 0])[masked]
    if gaps.size == 0:
        return np.inf
    return float(gaps.mean() if reduce == "mean" else gaps.min())


def reference(lm: Path, step: Path, tokens: np.ndarray, threshold: float | list[float], reduce: str = "mean"
              ) -> tuple[np.ndarray, np.ndarray, list[list[float]]]:
    """Prophet written out by hand on the unsplit LM, one sample at a time: (results, steps, scores per sample).
    ``threshold``: one for every step, or a list with each step's own."""
    import onnxruntime as ort

    lm_s = ort.InferenceSession(str(lm), providers=["CPUExecutionProvider"])
    st_s = ort.InferenceSession(str(step), providers=["CPUExecutionProvider"])
    out, steps, scores = np.zeros_like(tokens), np.zeros(len(tokens), np.int64), []
    for b in range(len(tokens)):
        t = tokens[b:b + 1]
        scores.append([])
        for i in range(STEPS):
            logits = lm_s.run(None, {"tokens": t})[0]
            nxt, committed = st_s.run(None, {"tokens": t, "logits": logits})
            gap = _gap(logits[0], t[0] == MASK, reduce)
            scores[-1].append(gap)
            if gap >= (threshold[i] if isinstance(threshold, list) else threshold) or i == STEPS - 1:
                out[b], steps[b] = committed[0], i + 1
                break
            t = nxt
    return out, steps, scores


@pytest.mark.parametrize("reduce", ["mean", "min"])
def test_prophet_commits_when_the_top2_logit_gap_is_wide(prophet: dict, reduce: str, tmp_path: Path) -> None:
    runner = prophet["runner"]
    if reduce == "min":
        runner = LoopRunner(eecompile.compile_model(prophet_spec(tmp_path, prophet["lm"], prophet["step"],
                                                                 reduce="min"), tmp_path / "min.eebundle"))
    tokens = prophet["tokens"]
    rec = runner.run({"tokens": tokens}, policy="never", loop_threshold="never")
    assert rec.gate_scores is not None
    _, _, all_scores = reference(prophet["lm"], prophet["step"], tokens, np.inf, reduce)
    np.testing.assert_allclose(rec.gate_scores.T, np.array(all_scores, dtype=np.float32), rtol=1e-4)
    # Logits, not probabilities: a gap between probabilities is never above 1.
    assert rec.gate_scores.max() > 1.0
    thr = float(np.median(rec.gate_scores[1]))
    res = runner.run({"tokens": tokens}, loop_threshold=thr)
    want, steps, _ = reference(prophet["lm"], prophet["step"], tokens, thr, reduce)
    np.testing.assert_array_equal(res.steps, steps)
    np.testing.assert_array_equal(res.outputs["committed"], want)
    assert 1 < res.steps.min() < res.steps.max() and (res.outputs["committed"] != MASK).all()
    assert res.batch_sizes[-1] < len(tokens)


def test_prophet_compact_equals_wait_all_equals_one_sample_at_a_time(prophet: dict) -> None:
    runner, tokens = prophet["runner"], prophet["tokens"]
    scores = runner.run({"tokens": tokens}, policy="never").gate_scores
    thr = float(np.median(scores[2]))
    compact = runner.run({"tokens": tokens}, loop_threshold=thr)
    wait = runner.run({"tokens": tokens}, loop_threshold=thr, policy="wait-all")
    assert len(set(compact.steps.tolist())) > 1
    for name in ("tokens_next", "committed"):
        np.testing.assert_array_equal(wait.outputs[name], compact.outputs[name])
    np.testing.assert_array_equal(wait.steps, compact.steps)
    for b in range(len(tokens)):
        one = runner.run({"tokens": tokens[b:b + 1]}, loop_threshold=thr)
        np.testing.assert_array_equal(one.outputs["committed"][0], compact.outputs["committed"][b])
    always = runner.run({"tokens": tokens}, loop_threshold="always")
    assert always.steps.tolist() == [1] * len(tokens)  # every sample commits after the first step
    never = runner.run({"tokens": tokens}, loop_threshold=math.inf)  # a gap no sample reaches (masked left)
    assert never.steps.tolist() == [STEPS] * len(tokens)
    for bad in (-1.0, [4.0, -0.5], -math.inf):  # a gap is >= 0: the spec refuses these, and so does the runtime
        with pytest.raises(ThresholdError, match=r"loop_threshold(\[1\])?: threshold -(1|0\.5|inf) is outside "
                                                 r"\[0, inf\] for gate kind 'logit_gap'"):
            runner.run({"tokens": tokens}, loop_threshold=bad)


def test_a_sample_with_nothing_left_to_unmask_commits(prophet: dict) -> None:
    tokens = prophet["tokens"][:2].copy()
    tokens[0, :] = 5  # nothing masked: the gap over no position is +inf
    res = prophet["runner"].run({"tokens": tokens}, loop_threshold=1e9)
    assert res.steps.tolist() == [1, STEPS]
    np.testing.assert_array_equal(res.outputs["committed"][0], tokens[0])


def test_logit_gap_on_tensors_of_the_wrong_rank_is_refused(prophet: dict, tmp_path: Path) -> None:
    spec = prophet_spec(tmp_path, prophet["lm"], prophet["step"], logits="tokens")
    with pytest.raises(SpecError, match=r"loop\.gate: logit_gap reads logits \[B, T, V\] and tokens \[B, T\]; "
                                        r"'tokens' has rank 2"):
        eecompile.compile_model(spec, tmp_path / "b.eebundle")
    spec = prophet_spec(tmp_path, prophet["lm"], prophet["step"], tokens="nowhere")
    with pytest.raises(SpecError, match=r"loop\.gate\.tokens: 'nowhere' is neither a model input"):
        eecompile.compile_model(spec, tmp_path / "b.eebundle")
