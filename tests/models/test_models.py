"""Reference models: ONNX export keeps the maths, names the exit taps and has a dynamic batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from eecompile.models.export import export_onnx  # noqa: E402
from eecompile.models.resnet import EarlyExitResNet  # noqa: E402
from eecompile.models.transformer import EarlyExitTransformer  # noqa: E402


def _session(path: Path, extra_outputs: list[str] = ()) -> ort.InferenceSession:  # type: ignore[assignment]
    model = onnx.load(str(path))
    for name in extra_outputs:  # a tap is an internal tensor: expose it to read it
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("internal_heads", [False, True])
def test_resnet_export_names_taps_and_keeps_outputs(tmp_path: Path, internal_heads: bool) -> None:
    torch.manual_seed(0)
    model = EarlyExitResNet(num_classes=10, widths=(8, 16, 32), blocks=(1, 1, 1), internal_heads=internal_heads).eval()
    x = torch.randn(2, 3, 32, 32)
    path = export_onnx(model, (x,), tmp_path / "resnet.onnx", input_names=["input"],
                       output_names=model.output_names, exit_taps=model.exit_taps)
    proto = onnx.load(str(path))
    assert [o.name for o in proto.graph.output] == list(model.output_names)  # taps are not outputs
    produced = {o for n in proto.graph.node for o in n.output}
    assert set(model.exit_taps) <= produced  # ... but named tensors a spec can cut at
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    sess = _session(path, list(model.exit_taps))
    names = [o.name for o in sess.get_outputs()]
    for batch in (1, 5):
        xb = torch.randn(batch, 3, 32, 32)
        got = dict(zip(names, sess.run(None, {"input": xb.numpy()}), strict=True))
        with torch.no_grad():
            want = model(xb)
        for name, w in zip([*model.output_names, *model.exit_taps], want, strict=True):
            np.testing.assert_allclose(got[name], w.numpy(), rtol=1e-4, atol=1e-4)
    assert got["stage1"].shape == (5, 8, 32, 32) and got["stage2"].shape == (5, 16, 16, 16)


def test_transformer_export_with_mask_and_dynamic_sequence(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = EarlyExitTransformer(vocab_size=50, num_classes=3, d_model=32, n_layers=3, n_heads=4, d_ff=64,
                                 max_len=16).eval()
    ids = torch.randint(0, 50, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.int64)
    path = export_onnx(model, (ids, mask), tmp_path / "enc.onnx", input_names=["input_ids", "attention_mask"],
                       exit_taps=model.exit_taps,
                       dynamic_axes={"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}})
    sess = _session(path, list(model.exit_taps))
    ids = torch.randint(0, 50, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.int64)
    mask[1, 6:] = 0  # padding must not change the answer for the real tokens
    logits, l1, l2 = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        want = model(ids, mask)
    np.testing.assert_allclose(logits, want[0].numpy(), rtol=1e-4, atol=1e-4)
    assert l1.shape == (3, 11, 32) and l2.shape == (3, 11, 32)
    ids2 = ids.clone()
    ids2[1, 6:] = 7
    with torch.no_grad():
        assert torch.allclose(model(ids2, mask)[0][1], want[0][1], atol=1e-5)


def test_export_refuses_mismatched_names(tmp_path: Path) -> None:
    from eecompile.errors import GraphError

    model = EarlyExitResNet(widths=(4, 8), blocks=(1, 1)).eval()
    with pytest.raises(GraphError, match="returned 2 tensors"):
        export_onnx(model, (torch.randn(1, 3, 32, 32),), tmp_path / "m.onnx", input_names=["input"],
                    exit_taps=("stage1", "extra"))
