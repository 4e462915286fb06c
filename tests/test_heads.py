"""Head templates: ONNX graph and torch twin agree; untrained heads are uniform; bad shapes are refused."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from eecompile.errors import SpecError
from eecompile.heads import (
    FEATURES,
    LOGITS,
    MASK,
    head_input_names,
    head_module,
    head_onnx,
    initial_weights,
    module_weights,
)

CASES = [
    ("linear", [None, 8, 5, 5], {}),
    ("linear", [None, 6, 12], {"pool": "first"}),
    ("linear", [None, 6, 12], {"pool": "mean"}),
    ("linear", [None, 6, 12], {"pool": "masked_mean"}),
    ("linear", [None, 12], {}),
    ("mlp", [None, 12], {"hidden": 16}),
    ("mlp", [None, 8, 5, 5], {"hidden": 16}),
    ("mlp", [None, 6, 12], {"hidden": 16, "pool": "mean"}),
    ("conv", [None, 8, 5, 5], {"conv_channels": 4}),
    ("token", [None, 6, 12], {}),
    ("local", [None, 17, 12], {}),  # LGViT local perception: a class token + a 4 x 4 grid
    ("local", [None, 9, 12], {"kernel": 1}),
]

# Templates with a score output, a regression output or ops from opset 13 (tested at 13 and 18).
CASES_13 = [
    ("global", [None, 6, 12], {}, None),  # LGViT global aggregation (attention pooling)
    ("global", [None, 6, 12], {"score": "agreement"}, None),
    ("linear", [None, 8, 5, 5], {"score": "agreement"}, None),
    ("mlp", [None, 6, 12], {"hidden": 16, "pool": "mean", "score": "agreement"}, None),
    ("local", [None, 16, 12], {"score": "agreement"}, None),
    ("conv", [None, 8, 4, 4], {"conv_channels": 6, "score": "uncertainty"}, (3, 8, 8)),  # DeeDiff-style: upsample
    ("conv", [None, 8, 4, 4], {"conv_channels": 6}, (2, 4, 4)),  # same size: no Resize
    ("linear", [None, 12], {"score": "uncertainty"}, None),  # an embedding [B, 7]
]


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([LOGITS], feeds)[0]


def _feeds(kind: str, shape: list, opts: dict, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    x = rng.standard_normal([batch, *shape[1:]]).astype(np.float32)
    feeds = {FEATURES: x}
    if MASK in head_input_names(kind, shape, opts):
        mask = np.ones([batch, shape[1]], np.int64)
        mask[0, 3:] = 0
        feeds[MASK] = mask
    return feeds


@pytest.mark.parametrize("kind,shape,opts", CASES)
@pytest.mark.parametrize("opset", [11, 17, 18])
def test_onnx_matches_torch_twin(kind: str, shape: list, opts: dict, opset: int) -> None:
    torch = pytest.importorskip("torch")
    if opset < 13 and opts.get("pool") == "masked_mean":
        with pytest.raises(SpecError, match="opset >= 13"):
            head_onnx(kind, shape, 7, opts, opset=opset)
        return
    rng = np.random.default_rng(0)
    module = head_module(kind, shape, 7, opts)
    # Random weights everywhere, so the comparison covers every layer (untrained heads have a zero last layer).
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    model = head_onnx(kind, shape, 7, opts, weights=module_weights(module), opset=opset)
    assert [i.name for i in model.graph.input] == head_input_names(kind, shape, opts)
    assert [o.name for o in model.graph.output] == [LOGITS]
    for batch in (1, 5):  # the batch dim is symbolic
        feeds = _feeds(kind, shape, opts, batch, rng)
        got = _run(model, feeds)
        args = [torch.from_numpy(feeds[FEATURES])]
        if MASK in feeds:
            args.append(torch.from_numpy(feeds[MASK]))
        with torch.no_grad():
            want = module(*args).numpy()
        expected_shape = (batch, shape[1], 7) if kind == "token" else (batch, 7)
        assert got.shape == expected_shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind,shape,opts", CASES)
def test_untrained_head_is_uniform(kind: str, shape: list, opts: dict) -> None:
    model = head_onnx(kind, shape, 5, opts)
    logits = _run(model, _feeds(kind, shape, opts, 3, np.random.default_rng(1)))
    assert np.all(logits == 0.0)  # softmax is uniform: max_prob = 1/C, entropy = 1, margin = 0


def test_state_dict_names_are_the_onnx_initializers() -> None:
    pytest.importorskip("torch")
    shape = [None, 8, 4, 4]
    module = head_module("conv", shape, 3, {"conv_channels": 4})
    model = head_onnx("conv", shape, 3, {"conv_channels": 4})
    inits = {i.name for i in model.graph.initializer}
    assert set(module.state_dict()) <= inits
    assert set(initial_weights("conv", shape, 3, {"conv_channels": 4})) == set(module.state_dict())


def test_symbolic_spatial_dims_are_fine() -> None:
    model = head_onnx("linear", ["N", 8, "H", "W"], 4)
    out = _run(model, {FEATURES: np.ones([2, 8, 3, 7], np.float32)})
    assert out.shape == (2, 4)


@pytest.mark.parametrize(
    "kind,shape,opts,match",
    [
        ("conv", [None, 12], {}, "cannot read features"),
        ("token", [None, 8, 4, 4], {}, "cannot read features"),
        ("linear", [None, "C"], {}, "must be a known integer"),
        ("mlp", [None, 12], {"hiden": 3}, "unknown"),
        ("mlp", [None, 12], {"hidden": 0}, "positive integer"),
        ("linear", [None, 4, 12], {"pool": "max"}, "pool"),
        ("lineer", [None, 12], {}, "unknown"),
    ],
)
def test_bad_head_requests(kind: str, shape: list, opts: dict, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        head_onnx(kind, shape, 3, opts)


def test_weights_of_wrong_shape_are_refused() -> None:
    w = initial_weights("linear", [None, 12], 3)
    w["fc.weight"] = np.zeros([3, 11], np.float32)
    with pytest.raises(SpecError, match="fc.weight"):
        head_onnx("linear", [None, 12], 3, weights=w)


@pytest.mark.parametrize("kind,shape,opts,out_shape", CASES_13)
@pytest.mark.parametrize("opset", [13, 18])
def test_scores_regression_and_lgvit_heads_match_their_torch_twin(kind: str, shape: list, opts: dict,
                                                                  out_shape: tuple | None, opset: int) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    module = head_module(kind, shape, 7, opts, out_shape=out_shape)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    model = head_onnx(kind, shape, 7, opts, weights=module_weights(module), opset=opset, out_shape=out_shape)
    names = [o.name for o in model.graph.output]
    assert names == ([LOGITS, "score"] if opts.get("score") else [LOGITS])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = rng.standard_normal([batch, *shape[1:]]).astype(np.float32)
        got = sess.run(None, {FEATURES: x})
        with torch.no_grad():
            want = module(torch.from_numpy(x)).numpy()
            assert got[0].shape == ((batch, *out_shape) if out_shape and kind == "conv" else (batch, 7))
            np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-5)
            if opts.get("score"):
                np.testing.assert_allclose(got[1], module.score(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)
                assert got[1].shape == (batch, 1) and ((got[1] >= 0) & (got[1] <= 1)).all()


@pytest.mark.parametrize("score", ["uncertainty", "agreement"])
def test_untrained_score_stays_near_zero(score: str) -> None:
    model = head_onnx("linear", [None, 12], 4, {"score": score}, opset=17)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(["score"], {FEATURES: np.random.default_rng(0).standard_normal([3, 12]).astype(np.float32)})[0]
    assert (got < 1e-3).all()


@pytest.mark.parametrize(
    "kind,shape,opts,match",
    [
        ("conv", [None, 6, 12], {}, "use kind 'local'"),
        ("local", [None, 7, 12], {}, "do not make a square grid"),
        ("local", [None, 16, 12], {"kernel": 2}, "must be odd"),
        ("token", [None, 6, 12], {"score": "agreement"}, "one prediction per sample"),
        ("linear", [None, 12], {"score": "confidence"}, "must be one of uncertainty, agreement, halting"),
    ],
)
def test_bad_template_options(kind: str, shape: list, opts: dict, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        head_onnx(kind, shape, 3, opts)
