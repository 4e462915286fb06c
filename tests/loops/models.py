"""Small faithful iterative models for the loop tests, written in torch and exported to ONNX.

- :func:`export_denoiser`: an eps-predicting conv denoiser ``eps = f(x, t)`` with a time embedding and an
  in-model exit after its first block (``eps1`` with DeeDiff's uncertainty score ``conf1``), and
  :func:`export_ddim_step`: the deterministic DDIM update (Song et al. 2021, eta = 0) on a cosine schedule
  (alpha_bar(t) = cos(pi t / 2)^2, Nichol & Dhariwal 2021), ``x_next, x0 = step(x, eps, t, t_next)``.
- :func:`export_halve`: ``y = 0.5 x + 1`` in ONNX text, a loop on the chain's own output;
  :func:`export_scale_shift`: the same with element-wise ops only; :func:`export_shift`: ``y = 0.5 x + t`` with a
  per-step input ``t`` (:func:`shift_loop_spec`).
- :func:`export_masked_lm`: a bidirectional transformer over tokens ``[B, T]`` giving ``logits [B, T, V]`` (a
  masked diffusion LM's denoiser), and :func:`export_unmask_step`: one step of its sampler (the ``per_step``
  most confident masked positions take their argmax; ``committed`` fills every masked position at once,
  Prophet's early commit).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

B1 = "/b1/Relu_output_0"  # the denoiser's first block (the in-model exit's cut)
VOCAB, MASK, SEQ = 32, 0, 12


def _torch():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return torch


def export_denoiser(path: Path) -> Path:
    """x[B, 3, 8, 8], t[B] -> eps[B, 3, 8, 8]; in-model exit outputs eps1 (a 1x1 conv after block 1) and conf1[B, 1]."""
    torch = _torch()
    nn = torch.nn
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self, cin: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(cin, 16, 3, padding=1)

        def forward(self, x, e):
            return torch.relu(self.conv(x) + e)

    class Denoiser(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.temb = nn.Linear(1, 16)
            self.b1, self.b2, self.b3 = Block(3), Block(16), Block(16)
            self.out1, self.out = nn.Conv2d(16, 3, 1), nn.Conv2d(16, 3, 1)
            self.uem = nn.Linear(16, 1)

        def forward(self, x, t):
            e = torch.sin(self.temb(t[:, None]))[:, :, None, None]
            h1 = self.b1(x, e)
            h3 = self.b3(self.b2(h1, e), e)
            conf1 = torch.sigmoid(self.uem(h1.mean((2, 3))) * 4)
            return self.out(h3) * 0.5, self.out1(h1) * 0.5, conf1

    names = ["eps", "eps1", "conf1"]
    torch.onnx.export(Denoiser().eval(), (torch.randn(2, 3, 8, 8), torch.rand(2)), str(path),
                      input_names=["x", "t"], output_names=names,
                      dynamic_axes={n: {0: "batch"} for n in ["x", "t", *names]}, opset_version=17, dynamo=False)
    return path


def export_ddim_step(path: Path, t_next_dtype: str = "float32") -> Path:
    """(x, eps, t, t_next) -> (x_next, x0): DDIM with eta = 0 on the cosine schedule."""
    torch = _torch()

    class DDIM(torch.nn.Module):
        def forward(self, x, eps, t, t_next):
            def abar(s):
                return torch.cos(s.float() * (math.pi / 2)).pow(2).clamp(1e-3, 1.0)[:, None, None, None]

            a, an = abar(t), abar(t_next)
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            return an.sqrt() * x0 + (1 - an).sqrt() * eps, x0

    dt = getattr(torch, t_next_dtype)
    torch.onnx.export(DDIM(), (torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.rand(2),
                               torch.rand(2).to(dt)), str(path),
                      input_names=["x", "eps", "t", "t_next"], output_names=["x_next", "x0"],
                      dynamic_axes={n: {0: "batch"} for n in ["x", "eps", "t", "t_next", "x_next", "x0"]},
                      opset_version=17, dynamo=False)
    return path


def ddim_reference(denoiser: Path, step: Path, x: np.ndarray, n: int, threshold: float, start: float = 0.98
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The sampler written out by hand on the unsplit models, one sample at a time: N DDIM steps from t = start
    to 0, a sample stopping once ||x_next - x|| / ||x|| <= threshold; returns (x0 at the stop, steps run)."""
    import onnxruntime as ort

    den = ort.InferenceSession(str(denoiser), providers=["CPUExecutionProvider"])
    upd = ort.InferenceSession(str(step), providers=["CPUExecutionProvider"])
    out, steps = np.zeros_like(x), np.zeros(len(x), dtype=np.int64)
    for b in range(len(x)):
        xb = x[b:b + 1]
        for i in range(n):
            t = np.array([start * (1 - i / n)], np.float32)
            t_next = np.array([start * (1 - (i + 1) / n)], np.float32)
            eps = den.run(["eps"], {"x": xb, "t": t})[0]
            x_next, x0 = upd.run(None, {"x": xb, "eps": eps, "t": t, "t_next": t_next})
            change = np.linalg.norm(x_next - xb) / (np.linalg.norm(xb) + 1e-12)
            if change <= threshold or i == n - 1:
                out[b], steps[b] = x0[0], i + 1
                break
            xb = x_next
    return out, steps


def export_halve(path: Path) -> Path:
    """x[N, 4] -> y = 0.5 x + 1 (fed back as x, it converges to 2): a loop that needs no step graph."""
    import onnx

    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        halve (float[N, 4] x) => (float[N, 4] y) <float[4, 4] w = {0.5, 0, 0, 0, 0, 0.5, 0, 0, 0, 0, 0.5, 0, 0, 0, 0, 0.5},
                                                 float[4] b = {1, 1, 1, 1}> {
            h = MatMul(x, w)
            y = Add(h, b)
        }""")
    onnx.save(model, path)
    return path


def export_shift(path: Path) -> Path:
    """x[N, 4], t[N] -> y = 0.5 x + t (ONNX text): a loop with a per-step input ``t`` the runtime fills."""
    import onnx

    onnx.save(onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        shift (float[N, 4] x, float[N] t) => (float[N, 4] y) <float[4, 4] w = {0.5, 0, 0, 0, 0, 0.5, 0, 0, 0, 0, 0.5,
                                                                              0, 0, 0, 0, 0.5},
                                                                 int64[1] one = {1}> {
            h = MatMul(x, w)
            tt = Unsqueeze(t, one)
            y = Add(h, tt)
        }"""), path)
    return path


def shift_loop_spec(d: Path, model: Path) -> Path:
    """A 3-step loop of :func:`export_shift` with ``t`` from a linspace and a change gate."""
    import yaml

    (d / "shift.yaml").write_text(yaml.safe_dump({"model": str(model), "loop": {
        "steps": 3, "feedback": {"y": "x"}, "inputs": {"t": {"source": "linspace", "start": 1.0, "end": 0.0}},
        "gate": {"kind": "change", "of": "y", "threshold": 0.01}}}))
    return d / "shift.yaml"


def export_scale_shift(path: Path) -> Path:
    """x[N, 4] -> y = x * h + b with h = 0.5, b = 1 (element-wise only, built with onnx.helper): the same loop as
    :func:`export_halve` with no MatMul, so the partition finds no node it counts as compute."""
    import onnx
    from onnx import TensorProto
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    g = oh.make_graph([oh.make_node("Mul", ["x", "h"], ["t"]), oh.make_node("Add", ["t", "b"], ["y"])], "scale_shift",
                      [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                      [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                      [nh.from_array(np.full(4, 0.5, np.float32), "h"), nh.from_array(np.ones(4, np.float32), "b")])
    model = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def export_masked_lm(path: Path) -> Path:
    """tokens[B, T] (int64) -> logits[B, T, V]: embedding + positions, two bidirectional encoder layers, a tied head."""
    torch = _torch()
    nn = torch.nn
    torch.manual_seed(0)

    class MaskedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(VOCAB, 32)
            self.pos = nn.Parameter(torch.randn(1, SEQ, 32) * 0.5)
            layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

        def forward(self, tokens):
            h = self.enc(self.emb(tokens) + self.pos)
            return (h @ self.emb.weight.T) * 2.0

    torch.onnx.export(MaskedLM().eval(), (torch.randint(0, VOCAB, (2, SEQ)),), str(path), input_names=["tokens"],
                      output_names=["logits"], dynamic_axes={"tokens": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)
    return path


def export_unmask_step(path: Path, per_step: int = 2) -> Path:
    """(tokens, logits) -> (tokens_next, committed): the ``per_step`` most confident masked positions take their
    argmax (the low-confidence remasking sampler of LLaDA); ``committed`` fills every masked position."""
    torch = _torch()

    class Unmask(torch.nn.Module):
        def forward(self, tokens, logits):
            masked = tokens == MASK
            logits = logits.clone()
            logits[..., MASK] = -1e9  # never predict the mask token itself
            conf, pred = logits.softmax(-1).max(-1)
            conf = torch.where(masked, conf, torch.full_like(conf, -1.0))
            idx = conf.topk(per_step, dim=-1).indices
            pick = torch.zeros_like(masked).scatter(1, idx, torch.ones_like(idx, dtype=torch.bool)) & masked
            return torch.where(pick, pred, tokens), torch.where(masked, pred, tokens)

    torch.onnx.export(Unmask(), (torch.randint(0, VOCAB, (2, SEQ)), torch.randn(2, SEQ, VOCAB)), str(path),
                      input_names=["tokens", "logits"], output_names=["tokens_next", "committed"],
                      dynamic_axes={n: {0: "batch"} for n in ["tokens", "logits", "tokens_next", "committed"]},
                      opset_version=17, dynamo=False)
    return path


def export_encoder_decoder(path: Path):
    """src[B, S], tgt[B, T] (int64) -> logits[B, T, V]: three encoder layers, the encoder's final LayerNorm
    (``enc_out``), two decoder layers attending to it, an LM head. MuE's exits as in-model heads: ``enc1``/``enc2``
    (the final LayerNorm on encoder layers 1 and 2: each stands in for ``enc_out``) and ``logits1`` (the LM head
    after decoder layer 1). Returns (path, the torch module, names of the layers' output tensors)."""
    torch = _torch()
    nn = torch.nn
    torch.manual_seed(0)

    def enc_layer():
        return nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)

    def dec_layer():
        return nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True)

    class EncoderDecoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.src_emb, self.tgt_emb = nn.Embedding(VOCAB, 32), nn.Embedding(VOCAB, 32)
            self.enc1, self.enc2, self.enc3 = enc_layer(), enc_layer(), enc_layer()
            self.norm = nn.LayerNorm(32)
            self.dec1, self.dec2 = dec_layer(), dec_layer()
            self.head = nn.Linear(32, VOCAB)

        def encode(self, src):
            e = self.src_emb(src) * 2.0
            h1 = self.enc1(e)
            h2 = self.enc2(h1)
            return e, h1, h2, self.norm(self.enc3(h2))

        def decode(self, tgt, memory):
            d1 = self.dec1(self.tgt_emb(tgt), memory)
            return self.head(d1), self.head(self.dec2(d1, memory))

        def forward(self, src, tgt):
            _, h1, h2, enc_out = self.encode(src)
            logits1, logits = self.decode(tgt, enc_out)
            return logits, self.norm(h1), self.norm(h2), logits1

    model = EncoderDecoder().eval()
    outs = ["logits", "enc1", "enc2", "logits1"]
    torch.onnx.export(model, (torch.randint(0, VOCAB, (2, SEQ)), torch.randint(0, VOCAB, (2, 6))), str(path),
                      input_names=["src", "tgt"], output_names=outs,
                      dynamic_axes={n: {0: "batch"} for n in ["src", "tgt", *outs]}, opset_version=17, dynamo=False)
    import onnx

    nodes = onnx.load(str(path)).graph.node

    def last_output(prefix: str) -> str:
        return [n.output[0] for n in nodes if n.name.startswith(prefix)][-1]

    names = {k: last_output(f"/{k}/") for k in ("enc1", "enc2", "enc3", "dec1", "norm")}
    names["emb"] = [n.output[0] for n in nodes if n.op_type == "Mul" and n.input and "src_emb" in n.input[0]][0]
    return path, model, names
