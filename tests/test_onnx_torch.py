"""ONNX head files run in torch op by op (eecompile.onnx_torch): same outputs as ONNX Runtime, gradients reach
every float weight, the trained weights go back into the same graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from eecompile.errors import SpecError
from eecompile.heads import head_module, head_onnx, module_weights

torch = pytest.importorskip("torch")

from eecompile.onnx_torch import OnnxModule  # noqa: E402


def _ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _random_template(kind: str, shape: list, opts: dict, out_shape=None, opset: int = 17) -> onnx.ModelProto:
    module = head_module(kind, shape, 5, opts, out_shape=out_shape)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return head_onnx(kind, shape, 5, opts, weights=module_weights(module), opset=opset, out_shape=out_shape)


def _torch_head(path: Path) -> onnx.ModelProto:
    """A head as users export them: LayerNorm, GELU MLP, dropout, mean over tokens (TorchScript exporter, opset 14)."""
    nn = torch.nn
    torch.manual_seed(0)
    head = nn.Sequential(nn.LayerNorm(12), nn.Linear(12, 16), nn.GELU(), nn.Dropout(0.1), nn.Linear(16, 5))

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.h = head

        def forward(self, x):
            return self.h(x.mean(1))

    torch.onnx.export(Head().eval(), (torch.randn(2, 6, 12),), str(path), input_names=["hidden"],
                      output_names=["logits"], dynamic_axes={"hidden": {0: "b"}, "logits": {0: "b"}},
                      opset_version=14, dynamo=False)
    return onnx.load(str(path))


CASES = [
    ("linear", [None, 8, 5, 5], {}, None, 11),
    ("mlp", [None, 6, 12], {"pool": "masked_mean"}, None, 17),
    ("conv", [None, 8, 4, 4], {"conv_channels": 6}, None, 9),
    ("local", [None, 17, 12], {}, None, 17),
    ("global", [None, 6, 12], {"score": "agreement"}, None, 18),
    ("conv", [None, 8, 4, 4], {"score": "uncertainty"}, (3, 8, 8), 17),
]


@pytest.mark.parametrize("kind,shape,opts,out_shape,opset", CASES)
def test_templates_run_in_torch_as_in_onnx_runtime(kind, shape, opts, out_shape, opset) -> None:
    model = _random_template(kind, shape, opts, out_shape, opset)
    rng = np.random.default_rng(0)
    feeds = {"features": rng.standard_normal([3, *shape[1:]]).astype(np.float32)}
    if opts.get("pool") == "masked_mean":
        feeds["mask"] = np.ones([3, shape[1]], np.int64)
        feeds["mask"][0, 2:] = 0
    want = _ort(model, feeds)
    got = OnnxModule(model)(*[torch.from_numpy(v) for v in feeds.values()])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.detach().numpy(), w, rtol=1e-4, atol=1e-5)


def test_a_torch_exported_head_trains_and_goes_back_into_its_graph(tmp_path: Path) -> None:
    model = _torch_head(tmp_path / "head.onnx")
    x = torch.randn(32, 6, 12)
    target = torch.randn(32, 5)
    module = OnnxModule(model)
    np.testing.assert_allclose(module(x)[0].detach().numpy(), _ort(model, {"hidden": x.numpy()})[0], rtol=1e-4,
                               atol=1e-5)
    assert len(list(module.parameters())) == 6  # LayerNorm scale/bias, two Linear weights and biases
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(module(x)[0], target)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first
    trained = module.trained_model()
    assert [n.op_type for n in trained.graph.node] == [n.op_type for n in model.graph.node]
    np.testing.assert_allclose(_ort(trained, {"hidden": x.numpy()})[0], module(x)[0].detach().numpy(), rtol=1e-4,
                               atol=1e-5)


def test_an_operator_it_cannot_run_is_named() -> None:
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Einsum", ["x", "x"], ["y"], name="mix", equation="bi,bi->b")], "h",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b"])])
    with pytest.raises(SpecError, match=r"exits\[0\]\.head: train-heads cannot train through the Einsum node 'mix'"):
        OnnxModule(helper.make_model(g), "exits[0].head")
