"""Train the weights of an ONNX head file in PyTorch: the graph run op by op on torch tensors.

:class:`OnnxModule` holds the graph's float initializers as ``nn.Parameter`` (trainable) and the others (shapes,
indices) as constants, and runs the nodes in order with torch ops that follow the ONNX operator definitions, so
gradients reach every float weight. After training, :meth:`OnnxModule.trained_model` writes the weights back
into a copy of the same ``ModelProto``: the graph, its names and its opset are untouched, only initializer values
change. No conversion to a torch model (and no ``torch.onnx.export``) is involved.

Operators: the ones exit heads are made of — Identity, Constant, Add, Sub, Mul, Div, Pow, Sqrt, Exp, Log, Neg, Abs,
Relu, LeakyRelu, Elu, Sigmoid, HardSigmoid, Tanh, Erf, Gelu, Softplus, Softmax, LogSoftmax, MatMul, Gemm, Conv
(1-D/2-D, groups, explicit pads), GlobalAveragePool, GlobalMaxPool, AveragePool, MaxPool (2-D), Flatten, Reshape,
Transpose, Squeeze, Unsqueeze, Concat, Gather, Slice, Shape, Cast, Dropout, Clip, Max, Min, Where, Equal, Greater,
Less, Not, Expand, ReduceMean, ReduceSum, ReduceMax, ReduceMin, LayerNormalization, BatchNormalization (inference:
the running statistics are constants), Resize (nearest and linear, 2-D), TopK. Another operator is refused with
:class:`~eecompile.errors.SpecError` naming it. Softmax and LogSoftmax take the opset-13 meaning (one axis); an
older-opset graph normalising over several flattened axes is refused.

torch is imported when a module is made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from eecompile.errors import SpecError

SUPPORTED = frozenset({
    "Identity", "Constant", "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Exp", "Log", "Neg", "Abs", "Relu",
    "LeakyRelu", "Elu", "Sigmoid", "HardSigmoid", "Tanh", "Erf", "Gelu", "Softplus", "Softmax", "LogSoftmax",
    "MatMul", "Gemm", "Conv", "GlobalAveragePool", "GlobalMaxPool", "AveragePool", "MaxPool", "Flatten", "Reshape",
    "Transpose", "Squeeze", "Unsqueeze", "Concat", "Gather", "Slice", "Shape", "Cast", "Dropout", "Clip", "Max",
    "Min", "Where", "Equal", "Greater", "Less", "Not", "Expand", "ReduceMean", "ReduceSum", "ReduceMax",
    "ReduceMin", "LayerNormalization", "BatchNormalization", "Resize", "TopK",
})


def check_supported(model: onnx.ModelProto, where: str) -> None:
    """Raise SpecError naming ``where`` and the first operator :class:`OnnxModule` cannot run."""
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED:
            raise SpecError(f"{where}: train-heads cannot train through the {node.domain + '.' if node.domain else ''}"
                            f"{node.op_type} node '{node.name}' of this head; use a built-in head (head: {{kind: ...}}) "
                            f"or train the head yourself and keep it as is (train-heads --no-head-files)")


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def OnnxModule(model: onnx.ModelProto, where: str = "head") -> Any:  # noqa: N802 - a class factory (torch lazily)
    """An ``nn.Module`` running ``model``'s graph; ``forward(*inputs)`` returns the graph outputs as a list, in
    order. Float initializers are parameters (``named_parameters`` by index, see :attr:`names`). Raises SpecError
    for an operator it cannot run (see the module doc)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    check_supported(model, where)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}

    def ints(v: Any) -> list[int]:
        return [int(i) for i in np.asarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v).reshape(-1)]

    def axes_of(node_attrs: dict[str, Any], ins: list[Any], i: int) -> list[int] | None:
        if "axes" in node_attrs:
            return list(node_attrs["axes"])
        return ints(ins[i]) if len(ins) > i and ins[i] is not None else None

    def reduce(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(a: dict[str, Any], x: Any, *rest: Any) -> Any:
            axes = axes_of(a, [x, *rest], 1)
            keep = bool(a.get("keepdims", 1))
            if not axes:
                if a.get("noop_with_empty_axes", 0):
                    return x
                axes = list(range(x.dim()))
            return fn(x, axes, keep)
        return run

    def rmax(x: Any, axes: list[int], keep: bool) -> Any:
        for ax in sorted((a % x.dim() for a in axes), reverse=True):
            x = x.amax(dim=ax, keepdim=keep)
        return x

    def rmin(x: Any, axes: list[int], keep: bool) -> Any:
        for ax in sorted((a % x.dim() for a in axes), reverse=True):
            x = x.amin(dim=ax, keepdim=keep)
        return x

    def reshape(a: dict[str, Any], x: Any, shape: Any) -> Any:
        s = ints(shape)
        s = [x.shape[i] if d == 0 and not a.get("allowzero", 0) else d for i, d in enumerate(s)]
        return x.reshape(s)

    def gemm(a: dict[str, Any], x: Any, w: Any, c: Any = None) -> Any:
        x = x.t() if a.get("transA", 0) else x
        w = w.t() if a.get("transB", 0) else w
        y = a.get("alpha", 1.0) * (x @ w)
        return y + a.get("beta", 1.0) * c if c is not None else y

    def conv(a: dict[str, Any], x: Any, w: Any, b: Any = None) -> Any:
        if _text(a.get("auto_pad", "NOTSET")) != "NOTSET":
            raise SpecError(f"{where}: Conv with auto_pad is not supported by train-heads; give explicit pads")
        nd = w.dim() - 2
        pads = list(a.get("pads", [0] * 2 * nd))
        if pads[:nd] != pads[nd:]:
            x = F.pad(x, [p for i in reversed(range(nd)) for p in (pads[i], pads[i + nd])])
            pads = [0] * 2 * nd
        fn = F.conv1d if nd == 1 else F.conv2d
        return fn(x, w, b, stride=list(a.get("strides", [1] * nd)), padding=pads[:nd],
                  dilation=list(a.get("dilations", [1] * nd)), groups=int(a.get("group", 1)))

    def slice_(a: dict[str, Any], x: Any, *rest: Any) -> Any:
        if opset < 10:
            starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
        else:
            starts, ends = ints(rest[0]), ints(rest[1])
            axes = ints(rest[2]) if len(rest) > 2 and rest[2] is not None else None
            steps = ints(rest[3]) if len(rest) > 3 and rest[3] is not None else None
        axes = list(axes) if axes is not None else list(range(len(starts)))
        index: list[Any] = [slice(None)] * x.dim()
        for i, ax in enumerate(axes):
            index[ax % x.dim()] = slice(int(starts[i]), int(min(ends[i], 2**62)), int(steps[i]) if steps else 1)
        return x[tuple(index)]

    def softmax(log: bool) -> Callable[..., Any]:
        def run(a: dict[str, Any], x: Any) -> Any:
            axis = int(a.get("axis", -1 if opset >= 13 else 1)) % x.dim()
            if opset < 13 and axis != x.dim() - 1:
                raise SpecError(f"{where}: Softmax over flattened axes (opset {opset}) is not supported by "
                                f"train-heads; export the head with opset >= 13")
            return F.log_softmax(x, axis) if log else F.softmax(x, axis)
        return run

    def layer_norm(a: dict[str, Any], x: Any, scale: Any, bias: Any = None) -> Any:
        axis = int(a.get("axis", -1)) % x.dim()
        return F.layer_norm(x, x.shape[axis:], scale, bias, float(a.get("epsilon", 1e-5)))

    def batch_norm(a: dict[str, Any], x: Any, scale: Any, bias: Any, mean: Any, var: Any) -> Any:
        return F.batch_norm(x, mean.detach(), var.detach(), scale, bias, False, 0.0, float(a.get("epsilon", 1e-5)))

    def pool(kind: str) -> Callable[..., Any]:
        def run(a: dict[str, Any], x: Any) -> Any:
            k, s = list(a["kernel_shape"]), list(a.get("strides", a["kernel_shape"]))
            pads = list(a.get("pads", [0] * 2 * len(k)))
            if pads[:len(k)] != pads[len(k):] or len(k) != 2:
                raise SpecError(f"{where}: {kind} with asymmetric pads or not 2-D is not supported by train-heads")
            if kind == "MaxPool":
                return F.max_pool2d(x, k, s, pads[:2])
            return F.avg_pool2d(x, k, s, pads[:2], count_include_pad=bool(a.get("count_include_pad", 0)))
        return run

    def resize(a: dict[str, Any], x: Any, roi: Any = None, scales: Any = None, sizes: Any = None) -> Any:
        mode = _text(a.get("mode", "nearest"))
        if sizes is not None and sizes.numel():
            size = ints(sizes)[2:]
        else:
            size = [int(d * f) for d, f in zip(x.shape[2:], ints_f(scales)[2:], strict=True)]
        if mode == "linear":
            ctm = _text(a.get("coordinate_transformation_mode", "half_pixel"))
            return F.interpolate(x, size=size, mode="bilinear", align_corners=ctm == "align_corners")
        return F.interpolate(x, size=size, mode="nearest")

    def ints_f(v: Any) -> list[float]:
        return [float(i) for i in v.detach().cpu().numpy().reshape(-1)]

    def cast(a: dict[str, Any], x: Any) -> Any:
        to = onnx.helper.tensor_dtype_to_np_dtype(int(a["to"]))
        return x.to(torch.from_numpy(np.zeros(0, to)).dtype)

    def unsqueeze(a: dict[str, Any], x: Any, axes: Any = None) -> Any:
        ax = sorted(a["axes"] if "axes" in a else ints(axes))
        for i in ax:
            x = x.unsqueeze(i % (x.dim() + 1))
        return x

    def squeeze(a: dict[str, Any], x: Any, axes: Any = None) -> Any:
        ax = a.get("axes") if "axes" in a else (ints(axes) if axes is not None else None)
        if ax is None:
            return x.squeeze()
        for i in sorted((i % x.dim() for i in ax), reverse=True):
            x = x.squeeze(i)
        return x

    def gather(a: dict[str, Any], x: Any, idx: Any) -> Any:
        axis = int(a.get("axis", 0)) % x.dim()
        i = idx.long()
        i = torch.where(i < 0, i + x.shape[axis], i)
        out = x.index_select(axis, i.reshape(-1))
        return out.reshape(*x.shape[:axis], *i.shape, *x.shape[axis + 1:])

    def clip(a: dict[str, Any], x: Any, lo: Any = None, hi: Any = None) -> Any:
        lo = a.get("min", lo)
        hi = a.get("max", hi)
        return torch.clamp(x, min=lo, max=hi)

    def topk(a: dict[str, Any], x: Any, k: Any = None) -> tuple[Any, Any]:
        kk = int(a["k"]) if "k" in a else ints(k)[0]
        r = torch.topk(x, kk, dim=int(a.get("axis", -1)), largest=bool(a.get("largest", 1)), sorted=True)
        return r.values, r.indices

    def expand(a: dict[str, Any], x: Any, shape: Any) -> Any:
        return x * torch.ones(ints(shape), dtype=x.dtype)

    ops: dict[str, Callable[..., Any]] = {
        "Identity": lambda a, x: x, "Dropout": lambda a, x, *r: x,
        "Add": lambda a, x, y: x + y, "Sub": lambda a, x, y: x - y, "Mul": lambda a, x, y: x * y,
        "Div": lambda a, x, y: x / y if x.is_floating_point() else torch.div(x, y, rounding_mode="trunc"),
        "Pow": lambda a, x, y: torch.pow(x, y), "Sqrt": lambda a, x: torch.sqrt(x), "Exp": lambda a, x: torch.exp(x),
        "Log": lambda a, x: torch.log(x), "Neg": lambda a, x: -x, "Abs": lambda a, x: torch.abs(x),
        "Relu": lambda a, x: torch.relu(x), "LeakyRelu": lambda a, x: F.leaky_relu(x, a.get("alpha", 0.01)),
        "Elu": lambda a, x: F.elu(x, a.get("alpha", 1.0)), "Sigmoid": lambda a, x: torch.sigmoid(x),
        "HardSigmoid": lambda a, x: torch.clamp(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0, 1),
        "Tanh": lambda a, x: torch.tanh(x), "Erf": lambda a, x: torch.erf(x),
        "Gelu": lambda a, x: F.gelu(x, approximate=_text(a.get("approximate", "none"))),
        "Softplus": lambda a, x: F.softplus(x), "Softmax": softmax(False), "LogSoftmax": softmax(True),
        "MatMul": lambda a, x, y: x @ y, "Gemm": gemm, "Conv": conv,
        "GlobalAveragePool": lambda a, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
        "GlobalMaxPool": lambda a, x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True),
        "AveragePool": pool("AveragePool"), "MaxPool": pool("MaxPool"),
        "Flatten": lambda a, x: x.reshape(int(np.prod(x.shape[:int(a.get("axis", 1)) % (x.dim() + 1)])), -1),
        "Reshape": reshape, "Transpose": lambda a, x: x.permute(*(a.get("perm") or reversed(range(x.dim())))),
        "Squeeze": squeeze, "Unsqueeze": unsqueeze,
        "Concat": lambda a, *xs: torch.cat(xs, dim=int(a["axis"])), "Gather": gather, "Slice": slice_,
        "Shape": lambda a, x: torch.tensor(list(x.shape), dtype=torch.int64), "Cast": cast, "Clip": clip,
        "Max": lambda a, *xs: torch.stack(torch.broadcast_tensors(*xs)).amax(0),
        "Min": lambda a, *xs: torch.stack(torch.broadcast_tensors(*xs)).amin(0),
        "Where": lambda a, c, x, y: torch.where(c.bool(), x, y), "Equal": lambda a, x, y: x == y,
        "Greater": lambda a, x, y: x > y, "Less": lambda a, x, y: x < y, "Not": lambda a, x: ~x.bool(),
        "Expand": expand, "TopK": topk,
        "ReduceMean": reduce(lambda x, ax, k: x.mean(dim=ax, keepdim=k)),
        "ReduceSum": reduce(lambda x, ax, k: x.sum(dim=ax, keepdim=k)),
        "ReduceMax": reduce(rmax), "ReduceMin": reduce(rmin),
        "LayerNormalization": layer_norm, "BatchNormalization": batch_norm, "Resize": resize,
    }
    # BatchNormalization's running mean and variance stay constants (inference statistics).
    frozen = {n.input[i] for n in graph.node if n.op_type == "BatchNormalization" for i in (3, 4) if len(n.input) > i}

    class Module(nn.Module):
        """``model``'s graph in torch (see :func:`OnnxModule`)."""

        def __init__(self) -> None:
            super().__init__()
            self.names = [n for n, v in inits.items() if v.dtype.kind == "f" and n not in frozen]
            self.weights = nn.ParameterList(nn.Parameter(torch.from_numpy(inits[n].astype(np.float32).copy()))
                                            for n in self.names)
            self.consts = {n: torch.from_numpy(np.array(v)) for n, v in inits.items() if n not in self.names}
            for node in graph.node:
                if node.op_type == "Constant":
                    a = _attrs(node)
                    value = a.get("value")
                    arr = (numpy_helper.to_array(value) if value is not None
                           else np.asarray(a.get("value_float", a.get("value_int", a.get("value_floats",
                                                                                        a.get("value_ints"))))))
                    self.consts[node.output[0]] = torch.from_numpy(np.array(arr))
            self.inputs = [i.name for i in graph.input if i.name not in inits]
            self.outputs = [o.name for o in graph.output]

        def forward(self, *args: Any) -> list[Any]:
            env: dict[str, Any] = dict(self.consts)
            env.update(zip(self.names, self.weights, strict=True))
            env.update(zip(self.inputs, args, strict=False))
            for node in graph.node:
                if node.op_type == "Constant":
                    continue
                ins = [env[i] if i else None for i in node.input]
                while ins and ins[-1] is None:
                    ins.pop()
                out = ops[node.op_type](_attrs(node), *ins)
                if isinstance(out, tuple):
                    env.update((name, v) for name, v in zip(node.output, out, strict=False) if name)
                else:
                    env[node.output[0]] = out
            return [env[o] for o in self.outputs]

        def trained_model(self) -> onnx.ModelProto:
            """A copy of ``model`` with the trained weights (dtype as stored)."""
            out = onnx.ModelProto()
            out.CopyFrom(model)
            trained = dict(zip(self.names, self.weights, strict=True))
            for t in out.graph.initializer:
                if t.name in trained:
                    arr = trained[t.name].detach().cpu().numpy().astype(inits[t.name].dtype)
                    t.CopyFrom(numpy_helper.from_array(arr, t.name))
            return out

    return Module()
