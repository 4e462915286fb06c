"""PyTorch models exported to ONNX for the tests: a small ResNet, a ViT-style encoder, a BERT-style encoder
that reads an attention mask. Exported once per session into a cache directory (torch is imported lazily)."""

from __future__ import annotations

from pathlib import Path


def _torch():
    import torch

    torch.manual_seed(0)
    return torch


def small_resnet():
    torch = _torch()
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            return torch.relu(self.b2(self.c2(y)) + self.skip(x))

    class ResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.layers = nn.ModuleList([Block(16, 16, 1), Block(16, 32, 2), Block(32, 32, 1), Block(32, 64, 2),
                                         Block(64, 64, 1)])
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = self.stem(x)
            for layer in self.layers:
                x = layer(x)
            return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))

    m = ResNet().eval()
    for p in m.modules():  # non-trivial BatchNorm statistics
        if isinstance(p, nn.BatchNorm2d):
            p.running_mean.uniform_(-0.1, 0.1)
            p.running_var.uniform_(0.5, 1.5)
    return m, (torch.randn(2, 3, 32, 32),), ["image"], ["logits"]


class Encoder:
    """Builds BERT-style and ViT-style encoders with nn.TransformerEncoderLayer-like blocks written out so the
    export has plain MatMul/Softmax attention (and the additive attention mask for BERT). The benchmarks build
    their BERT-base-class graph with it too."""

    @staticmethod
    def build(kind: str, *, d: int = 32, heads: int = 4, layers: int = 4, vocab: int = 50, t: int = 8,
              n_classes: int | None = None):
        torch = _torch()
        nn = torch.nn

        class Layer(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.qkv = nn.Linear(d, 3 * d)
                self.proj = nn.Linear(d, d)
                self.ln1 = nn.LayerNorm(d)
                self.ln2 = nn.LayerNorm(d)
                self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

            def forward(self, x, bias):
                b, n, _ = x.shape
                q, k, v = self.qkv(x).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
                att = (q @ k.transpose(-2, -1)) / (d // heads) ** 0.5 + bias
                y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
                x = self.ln1(x + self.proj(y))
                return self.ln2(x + self.ff(x))

        class Bert(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.emb = nn.Embedding(vocab, d)
                self.pos = nn.Parameter(torch.randn(1, t, d) * 0.1)
                self.layers = nn.ModuleList([Layer() for _ in range(layers)])
                self.cls = nn.Linear(d, n_classes or 3)

            def forward(self, input_ids, attention_mask):
                x = self.emb(input_ids) + self.pos[:, : input_ids.shape[1]]
                bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
                for layer in self.layers:
                    x = layer(x, bias)
                return self.cls(x[:, 0])

        class ViT(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.patch = nn.Conv2d(3, d, 4, 4)
                self.cls_tok = nn.Parameter(torch.randn(1, 1, d) * 0.1)
                self.pos = nn.Parameter(torch.randn(1, 17, d) * 0.1)
                self.layers = nn.ModuleList([Layer() for _ in range(layers)])
                self.head = nn.Linear(d, n_classes or 10)

            def forward(self, image):
                x = self.patch(image).flatten(2).transpose(1, 2)
                x = torch.cat([self.cls_tok.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
                for layer in self.layers:
                    x = layer(x, 0.0)
                return self.head(x[:, 0])

        if kind == "bert":
            m = Bert().eval()
            ids = torch.randint(0, vocab, (2, t))
            mask = torch.ones(2, t, dtype=torch.int64)
            mask[1, 5:] = 0
            return m, (ids, mask), ["input_ids", "attention_mask"], ["logits"]
        m = ViT().eval()
        return m, (torch.randn(2, 3, 16, 16),), ["image"], ["logits"]


def small_gpt():
    """A GPT-2-style decoder: causal mask from the sequence length, the MLP on flattened tokens ``[B*T, C]``
    (no batch axis there), token logits ``[B, T, V]``; batch and sequence length dynamic."""
    torch = _torch()
    nn = torch.nn
    d, heads, layers, vocab, t = 32, 4, 4, 50, 8

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            b, n, c = x.size()
            q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
            q, k, v = (z.view(b, n, heads, c // heads).transpose(1, 2) for z in (q, k, v))
            att = (q @ k.transpose(-2, -1)) / (c // heads) ** 0.5
            causal = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
            att = att.masked_fill(causal == 0, float("-inf")).softmax(-1)
            x = x + self.proj((att @ v).transpose(1, 2).contiguous().view(b, n, c))
            flat = self.ln2(x).view(-1, c)  # [B*T, C]: folds the batch
            return x + self.out(torch.relu(self.fc(flat))).view(b, n, c)

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(t, d)
            self.blocks = nn.ModuleList([Block() for _ in range(layers)])
            self.lnf, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

        def forward(self, ids):
            x = self.wte(ids) + self.wpe(torch.arange(ids.size(1)).unsqueeze(0))
            for block in self.blocks:
                x = block(x)
            return self.head(self.lnf(x))

    return GPT().eval(), (torch.randint(0, vocab, (2, t)),), ["input_ids"], ["logits"]


def export(name: str, directory: Path) -> Path:
    """Export model ``name`` to ``directory/name.onnx`` with a dynamic batch: resnet | vit | bert with the
    TorchScript exporter (opset 17), or dynamo-resnet | dynamo-bert with torch.export (the default exporter
    since torch 2.9: opset 18, weights in an external .data file, its own tensor names)."""
    path = directory / f"{name}.onnx"
    if path.exists():
        return path
    torch = _torch()
    dynamo = name.startswith("dynamo-")
    base = name.removeprefix("dynamo-")
    if base == "resnet":
        model, args, inputs, outputs = small_resnet()
    elif base == "gpt":
        model, args, inputs, outputs = small_gpt()
    else:
        model, args, inputs, outputs = Encoder.build(base)
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=1024)
        torch.onnx.export(model, args, str(path), input_names=inputs, output_names=outputs, dynamo=True,
                          dynamic_shapes=tuple({0: batch} for _ in inputs), opset_version=18)
        return path
    axes = {n: {0: "batch", 1: "seq"} if base == "gpt" else {0: "batch"} for n in inputs + outputs}
    torch.onnx.export(model, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                      opset_version=17, dynamo=False)
    return path
