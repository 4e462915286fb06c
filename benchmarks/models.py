"""The graphs the benchmarks run, built once into a cache directory.

* ResNet-50 class: the onnx package's ``light_resnet50.onnx`` (real ResNet-50 structure, weights made by
  ConstantOfShape: fine for timing), exits at ``r35, r67, r99, r139``; quick mode: a tiny bottleneck ResNet.
* BERT-base class: a BERT-style encoder exported with torch (d=768, 12 layers, 12 heads, seq 128, dynamic
  batch), exits after layers 3, 6, 9, 11; quick mode: d=32, 4 layers, seq 8.
* Bottleneck ResNets of three depths (model-size growth of the compile), and a tiny MLP (segment hop cost).

Heads are linear, ``make_head``-style (tests/conftest.py): pool / first token / identity, then Gemm.
torch is imported only by the builders that export with it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

log = logging.getLogger(__name__)

ZOO = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
RESNET50_EXITS = ("r35", "r67", "r99", "r139")
BERT_EXIT_LAYERS = (2, 5, 8, 10)  # exits after these layers (0-based) of the 12
TORCH_RESNET50_EXIT_BLOCKS = (2, 6, 9, 13)  # exits after these bottleneck blocks (0-based) of the 16


@dataclass
class Workload:
    """A compiled bundle, the unsplit model it came from (batch-dynamic), and an input maker."""

    name: str
    source: Path  # the model as given to the compiler
    reference: Path  # the same model with a dynamic batch (what the unsplit timings run)
    bundle: Path
    make_inputs: Callable[[int, int], dict[str, np.ndarray]]  # (batch, seed) -> feeds


# ------------------------------------------------------------------------------------------- heads


def linear_head(path: Path, shape: Sequence[Any], n_classes: int, opset: int, seed: int = 0) -> Path:
    """A linear head for a cut tensor: [B,C,H,W] -> global pool; [B,T,D] -> first token; [B,D] -> as is."""
    rng = np.random.default_rng(seed)
    rank = len(shape)
    width = int(shape[1] if rank in (2, 4) else shape[2])
    inits = [nh.from_array((rng.standard_normal((n_classes, width)) * 0.05).astype(np.float32), "W"),
             nh.from_array(np.zeros(n_classes, np.float32), "B")]
    nodes = []
    if rank == 4:
        nodes += [oh.make_node("GlobalAveragePool", ["x"], ["p"]), oh.make_node("Flatten", ["p"], ["f"])]
    elif rank == 3:
        inits.append(nh.from_array(np.array(0, dtype=np.int64), "zero"))
        nodes.append(oh.make_node("Gather", ["x", "zero"], ["f"], axis=1))
    else:
        nodes.append(oh.make_node("Identity", ["x"], ["f"]))
    nodes.append(oh.make_node("Gemm", ["f", "W", "B"], ["y"], transB=1))
    in_shape = ["N", *[d if isinstance(d, int) else f"d{i}" for i, d in enumerate(shape[1:], 1)]]
    g = oh.make_graph(nodes, "head", [oh.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                      [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_classes])], inits)
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.save(m, path)
    return path


def tensor_shapes(model: Path, names: Sequence[str]) -> dict[str, list[Any]]:
    """Shapes of named intermediate tensors (onnx shape inference; symbolic dims as strings)."""
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(model), load_external_data=False))
    out: dict[str, list[Any]] = {}
    for vi in [*proto.graph.value_info, *proto.graph.output]:
        if vi.name in names:
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                            for d in vi.type.tensor_type.shape.dim]
    missing = set(names) - set(out)
    if missing:
        raise ValueError(f"{model}: no inferred shape for {sorted(missing)}")
    return out


def compile_with_exits(model: Path, cuts: Sequence[str], out: Path, *, n_classes: int, opset: int,
                       final: dict[str, Any] | None = None, threshold: float = 0.9,
                       shapes: dict[str, list[Any]] | None = None) -> Path:
    """Write linear heads and a spec for exits at ``cuts`` beside ``out`` and compile (cached by path)."""
    import yaml

    import eecompile

    if (out / "manifest.yaml").is_file():
        from eecompile.bundle import Bundle, sha256_file

        if Bundle.load(out, verify=False).manifest.source_model.get("sha256") == sha256_file(model):
            return out  # built from this very model
    work = out.parent / f"{out.stem}.work"
    work.mkdir(parents=True, exist_ok=True)
    shapes = shapes or tensor_shapes(model, cuts)
    exits = [{"at": c, "head": str(linear_head(work / f"head{k}.onnx", shapes[c], n_classes, opset, seed=k)),
              "gate": {"kind": "max_prob", "threshold": threshold}} for k, c in enumerate(cuts)]
    spec: dict[str, Any] = {"model": str(model), "exits": exits}
    if final:
        spec["final"] = final
    (work / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    eecompile.compile_model(work / "spec.yaml", out, force=True)
    return out


def reference_of(model: Path, cache: Path) -> Path:
    """The unsplit model with a dynamic batch (made the way the compiler does it)."""
    from eecompile.benchmark import dynamic_reference

    target = cache / f"{model.stem}.dynamic.onnx"
    if target.is_file():
        return target
    return dynamic_reference(model, cache)


# ------------------------------------------------------------------------------------------- graphs


def block_outputs(model: Path) -> list[str]:
    """Residual block outputs (a Relu fed by Add/Sum), in graph order: the clean cuts of a ResNet."""
    g = onnx.load(str(model), load_external_data=False).graph
    producer = {o: n for n in g.node for o in n.output}
    outs = []
    for n in g.node:
        if n.op_type == "Relu" and n.input[0] in producer and producer[n.input[0]].op_type in ("Add", "Sum"):
            outs.append(n.output[0])
    return outs


def conv_only_cuts(model: Path) -> list[str]:
    """Block outputs read by Conv nodes only (stage boundaries, where the next block has a projection shortcut).

    ORT CPU runs Conv in the blocked NCHWc layout and fuses a residual Add/Sum (+ Relu) into the Conv only when
    every operand is NCHWc. A segment input that also feeds a residual Sum is plain NCHW, so that Sum and every
    later one in the segment stay unfused with a reorder pair around each (the cascade measured in README)."""
    g = onnx.load(str(model), load_external_data=False).graph
    return [t for t in block_outputs(model) if all(n.op_type == "Conv" for n in g.node if t in n.input)]


def resnet50(cache: Path, n_exits: int = 4, cuts: Sequence[str] | None = None, tag: str = "") -> Workload:
    """light_resnet50 with exits at ``cuts``, or ``n_exits`` exits (4: r35, r67, r99, r139; otherwise evenly
    spaced block outputs)."""
    src = ZOO / "light_resnet50.onnx"
    if not src.is_file():
        raise FileNotFoundError(f"the onnx package does not ship {src.name}")
    if cuts is not None:
        n_exits = len(cuts)
    elif n_exits == 4:
        cuts = RESNET50_EXITS
    else:
        blocks = block_outputs(src)[:-1]  # not the last block: the classifier follows it directly
        idx = np.unique(np.linspace(0, len(blocks) - 1, n_exits).round().astype(int))
        cuts = [blocks[i] for i in idx]
    bundle = compile_with_exits(src, cuts, cache / f"resnet50{tag}-{n_exits}x.eebundle", n_classes=1000, opset=9,
                                final={"class_axis": 1})

    def inputs(batch: int, seed: int) -> dict[str, np.ndarray]:
        return {"gpu_0/data_0": np.random.default_rng(seed).random((batch, 3, 224, 224), dtype=np.float32)}

    return Workload(f"resnet50{tag}", src, reference_of(src, cache), bundle, inputs)


def torch_resnet_module(blocks: Sequence[int], width: int) -> Any:
    """A bottleneck ResNet as ``nn.Sequential`` (stem 4 modules, one module per block, pool, flatten, fc), seeded."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Bottleneck(nn.Module):
        def __init__(self, cin: int, mid: int, stride: int) -> None:
            super().__init__()
            cout = 4 * mid
            self.body = nn.Sequential(
                nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.body(x) + self.skip(x))

    layers: list[nn.Module] = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                               nn.MaxPool2d(3, 2, 1)]
    cin = width
    for stage, n in enumerate(blocks):
        mid = width * 2 ** stage
        for i in range(n):
            layers.append(Bottleneck(cin, mid, 2 if i == 0 and stage > 0 else 1))
            cin = 4 * mid
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000)).eval()


def torch_resnet(cache: Path, blocks: Sequence[int], width: int, image: int, name: str) -> Path:
    """A bottleneck ResNet (ResNet-50 is blocks (3, 4, 6, 3), width 64) exported with torch, dynamic batch; its
    weights are kept beside it (``{name}.pt``, see :func:`torch_weights`)."""
    path = cache / f"{name}.onnx"
    if path.is_file() and path.with_suffix(".pt").is_file():
        return path
    import torch

    model = torch_resnet_module(blocks, width)
    x = torch.randn(2, 3, image, image)
    torch.onnx.export(model, (x,), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    torch.save(model.state_dict(), path.with_suffix(".pt"))
    return path


def torch_weights(module: Any, model: Path) -> Any:
    """``module`` with the weights the ONNX ``model`` was exported from (``model.pt`` beside it)."""
    import torch

    module.load_state_dict(torch.load(model.with_suffix(".pt"), weights_only=True))
    return module.eval()


def resnet_family(cache: Path, n_exits: int = 4, quick: bool = False) -> list[tuple[str, Path, int, list[str]]]:
    """(name, model, parameters, cuts) for bottleneck ResNets of growing depth, ``n_exits`` evenly spaced cuts."""
    configs = ([("resnet-tiny", (1, 1, 1, 1), 8, 32), ("resnet-small", (1, 2, 2, 1), 8, 32)] if quick else
               [("resnet26", (2, 2, 2, 2), 64, 224), ("resnet50", (3, 4, 6, 3), 64, 224),
                ("resnet101", (3, 4, 23, 3), 64, 224)])
    out = []
    for name, blocks, width, image in configs:
        model = torch_resnet(cache, blocks, width, image, name)
        cuts = block_outputs(model)[:-1]
        idx = np.unique(np.linspace(0, len(cuts) - 1, n_exits).round().astype(int))
        params = sum(int(np.prod(t.dims)) for t in onnx.load(str(model)).graph.initializer)
        out.append((name, model, params, [cuts[i] for i in idx]))
    return out


def torch_resnet50(cache: Path) -> Workload:
    """ResNet-50 exported from torch (random weights, real BatchNorm), exits at the block outputs that match
    ``r35, r67, r99, r139`` of the zoo graph. Its gate scores differ per sample, unlike the zoo graph's, whose
    ConstantOfShape weights saturate every softmax to 1.0 (so no threshold splits a batch)."""
    model = torch_resnet(cache, (3, 4, 6, 3), 64, 224, "resnet50")
    blocks = block_outputs(model)
    cuts = [blocks[i] for i in TORCH_RESNET50_EXIT_BLOCKS]
    bundle = compile_with_exits(model, cuts, cache / "torch-resnet50-4x.eebundle", n_classes=1000, opset=17)

    def inputs(batch: int, seed: int) -> dict[str, np.ndarray]:
        return {"image": np.random.default_rng(seed).random((batch, 3, 224, 224), dtype=np.float32)}

    return Workload("resnet50 (torch)", model, model, bundle, inputs)


def quick_resnet(cache: Path) -> Workload:
    """A tiny bottleneck ResNet with 4 exits (the quick-mode stand-in for ResNet-50)."""
    model = torch_resnet(cache, (1, 1, 2, 1), 8, 32, "resnet-quick")
    cuts = block_outputs(model)[:4]
    bundle = compile_with_exits(model, cuts, cache / "resnet-quick-4x.eebundle", n_classes=1000, opset=17)

    def inputs(batch: int, seed: int) -> dict[str, np.ndarray]:
        return {"image": np.random.default_rng(seed).random((batch, 3, 32, 32), dtype=np.float32)}

    return Workload("resnet-quick", model, model, bundle, inputs)


def bert(cache: Path, quick: bool = False) -> Workload:
    """A BERT-style encoder (BERT-base sizes, or tiny in quick mode) with exits after 4 layer outputs."""
    name = "bert-tiny" if quick else "bert-base"
    d, heads, n_layers, seq, vocab = BERT_SIZES[name]
    exit_layers = (0, 1, 2, 3) if quick else BERT_EXIT_LAYERS
    path = cache / f"{name}.onnx"
    if not path.is_file() or not path.with_suffix(".pt").is_file():
        _export_bert(path)
    g = onnx.load(str(path), load_external_data=False).graph
    cuts = []
    for i in exit_layers:
        node = [n for n in g.node if n.name.startswith(f"/layers.{i}/ln2/")]
        if not node:
            raise ValueError(f"{path}: no output node for layer {i}")
        cuts.append(node[-1].output[0])
    shapes = {c: ["batch", seq, d] for c in cuts}
    bundle = compile_with_exits(path, cuts, cache / f"{name}-4x.eebundle", n_classes=2, opset=17, shapes=shapes)

    def inputs(batch: int, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        mask = np.ones((batch, seq), dtype=np.int64)
        mask[:, seq - seq // 4:] = rng.integers(0, 2, (batch, seq // 4))  # some padding
        return {"input_ids": rng.integers(0, vocab, (batch, seq), dtype=np.int64), "attention_mask": mask}

    return Workload(name, path, path, bundle, inputs)


BERT_SIZES = {"bert-tiny": (32, 4, 4, 8, 100), "bert-base": (768, 12, 12, 128, 30522)}  # d, heads, layers, seq, vocab


def bert_module(name: str) -> Any:
    """The torch encoder of :func:`bert` (``bert-base`` or ``bert-tiny``), seeded, without trained weights."""
    import torch

    from tests.torch_models import Encoder

    d, heads, n_layers, seq, vocab = BERT_SIZES[name]
    torch.manual_seed(0)
    return Encoder.build("bert", d=d, heads=heads, layers=n_layers, vocab=vocab, t=seq, n_classes=2)


def _export_bert(path: Path) -> None:
    """The tests' BERT-style encoder (plain MatMul attention, additive mask) at the given sizes; its weights are
    kept beside it (``.pt``)."""
    import torch

    model, args, names, outputs = bert_module(path.stem)
    torch.onnx.export(model, args, str(path), input_names=names, output_names=outputs,
                      dynamic_axes={n: {0: "batch"} for n in [*names, *outputs]}, opset_version=17, dynamo=False)
    torch.save(model.state_dict(), path.with_suffix(".pt"))


def mlp(path: Path, layers: int, width: int = 64) -> Path:
    """A tiny MLP ``x [B, width] -> layers x (MatMul, Relu) -> [B, 10]``; layer outputs are named ``h{i}``."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        inits.append(nh.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), f"w{i}"))
        nodes += [oh.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]), oh.make_node("Relu", [f"m{i}"], [f"h{i}"])]
        prev = f"h{i}"
    inits.append(nh.from_array((rng.standard_normal((width, 10)) * 0.1).astype(np.float32), "wo"))
    nodes.append(oh.make_node("MatMul", [prev, "wo"], ["logits"]))
    g = oh.make_graph(nodes, "mlp", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                      [oh.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, path)
    return path
