"""Exit-head templates: the ONNX graph the compiler splices in, and its PyTorch twin that trains it.

A head reads the cut tensor (graph input ``features``) and returns ``logits`` shaped ``[B, n_classes]``
(``[B, T, n_classes]`` for ``token``). Templates by kind and feature shape:

=========  ==============  =====================================================================
kind       features        graph
=========  ==============  =====================================================================
linear     [B, C, H, W]    GlobalAveragePool -> Flatten -> Gemm
linear     [B, T, D]       first token | mean | masked mean over T -> Gemm
linear     [B, D]          Gemm
mlp        any of those    (pool as linear) -> Gemm -> Relu -> Gemm
conv       [B, C, H, W]    1x1 Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm
token      [B, T, D]       the same Linear on every token -> [B, T, n_classes] (token-level outputs,
                           e.g. a tagger whose final output is [B, T, C]; for one label per sequence
                           use ``linear`` with ``pool: first|mean``)
=========  ==============  =====================================================================

Options: ``hidden`` (mlp, default 128), ``conv_channels`` (conv, default 64), ``pool`` (rank-3 features:
``first`` (default), ``mean`` or ``masked_mean``), ``seed`` (initial hidden weights, default 0).
``pool: masked_mean`` gives the head a second input ``mask`` ([B, T], 1 = real token), which the compiler
connects to the exit's second cut tensor (``at: [hidden_states, attention_mask]``).

Weights are a dict ``name -> np.ndarray`` whose names and shapes are exactly the ``state_dict`` of
:func:`head_module`, so a head trained in torch goes back into the same ONNX template without
``torch.onnx.export``. With ``weights=None`` the head is *untrained*: its last layer is zero, so its softmax
is uniform and no max_prob / entropy / margin gate fires before training; hidden layers get small random
weights so that training can start.

Features are float32 with the batch on axis 0. torch is imported only inside :func:`head_module`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from eecompile.errors import SpecError
from eecompile.spec import HEAD_KINDS

FEATURES = "features"
MASK = "mask"
LOGITS = "logits"

Dim = int | str | None

_DEFAULTS: dict[str, Any] = {"hidden": 128, "conv_channels": 64, "pool": "first", "seed": 0}
_POOLS = ("first", "mean", "masked_mean")


# ------------------------------------------------------------------------------------------- shapes


def _options(kind: str, feature_shape: Sequence[Dim], options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check kind, rank and options; return the options with defaults filled in."""
    if kind not in HEAD_KINDS:
        raise SpecError(f"head kind '{kind}' is unknown; use one of {', '.join(HEAD_KINDS)}")
    opts = dict(_DEFAULTS)
    for key, value in (options or {}).items():
        if key not in _DEFAULTS:
            raise SpecError(f"head option '{key}' is unknown for kind '{kind}'; known: {', '.join(_DEFAULTS)}")
        opts[key] = value
    rank = len(feature_shape)
    allowed = {"linear": (2, 3, 4), "mlp": (2, 3, 4), "conv": (4,), "token": (3,)}[kind]
    if rank not in allowed:
        shapes = {2: "[B, D]", 3: "[B, T, D]", 4: "[B, C, H, W]"}
        raise SpecError(
            f"head kind '{kind}' cannot read features shaped {list(feature_shape)} (rank {rank}); it takes "
            f"{' or '.join(shapes[r] for r in allowed)}; cut at another tensor or pick another kind"
        )
    for key in ("hidden", "conv_channels"):
        if not isinstance(opts[key], int) or isinstance(opts[key], bool) or opts[key] < 1:
            raise SpecError(f"head option '{key}' must be a positive integer, got {opts[key]!r}")
    if opts["pool"] not in _POOLS:
        raise SpecError(f"head option 'pool' must be one of {', '.join(_POOLS)}, got {opts['pool']!r}")
    channels = feature_shape[1] if rank == 4 else feature_shape[-1]
    if not isinstance(channels, int) or channels < 1:
        raise SpecError(
            f"head '{kind}': the feature dimension of {list(feature_shape)} must be a known integer to size "
            f"the head's weights (got {channels!r}); run shape inference on the model or fix its input shapes"
        )
    return opts


def _in_dim(feature_shape: Sequence[Dim]) -> int:
    d = feature_shape[1] if len(feature_shape) == 4 else feature_shape[-1]
    assert isinstance(d, int)
    return d


def _uses_mask(kind: str, feature_shape: Sequence[Dim], opts: Mapping[str, Any]) -> bool:
    return len(feature_shape) == 3 and kind in ("linear", "mlp") and opts["pool"] == "masked_mean"


def head_input_names(kind: str, feature_shape: Sequence[Dim], options: Mapping[str, Any] | None = None) -> list[str]:
    """The head graph's inputs, in the order they map to the exit's ``at`` tensors."""
    opts = _options(kind, feature_shape, options)
    return [FEATURES, MASK] if _uses_mask(kind, feature_shape, opts) else [FEATURES]


def weight_shapes(kind: str, feature_shape: Sequence[Dim], n_classes: int,
                  options: Mapping[str, Any] | None = None) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every weight of a head (the torch twin's ``state_dict`` keys)."""
    opts = _options(kind, feature_shape, options)
    d = _in_dim(feature_shape)
    if kind == "mlp":
        h = int(opts["hidden"])
        return {"fc1.weight": (h, d), "fc1.bias": (h,), "fc2.weight": (n_classes, h), "fc2.bias": (n_classes,)}
    if kind == "conv":
        c = int(opts["conv_channels"])
        return {"conv.weight": (c, d, 1, 1), "conv.bias": (c,), "fc.weight": (n_classes, c), "fc.bias": (n_classes,)}
    return {"fc.weight": (n_classes, d), "fc.bias": (n_classes,)}


def initial_weights(kind: str, feature_shape: Sequence[Dim], n_classes: int,
                    options: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Untrained weights: last layer zero (uniform softmax), hidden layers small and random (seeded)."""
    opts = _options(kind, feature_shape, options)
    rng = np.random.default_rng(int(opts["seed"]))
    shapes = weight_shapes(kind, feature_shape, n_classes, opts)
    last = {"mlp": "fc2", "conv": "fc"}.get(kind, "fc")
    out: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        if name.startswith(last + ".") or name.endswith(".bias"):
            out[name] = np.zeros(shape, np.float32)
        else:
            # torch's default Linear/Conv init range, so training starts where it usually would.
            bound = 1.0 / np.sqrt(int(np.prod(shape[1:])))
            out[name] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
    return out


def _check_weights(weights: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], kind: str) -> dict[str, np.ndarray]:
    missing = sorted(set(shapes) - set(weights))
    extra = sorted(set(weights) - set(shapes))
    if missing or extra:
        raise SpecError(f"head '{kind}': weights do not fit the template (missing {missing}, unexpected {extra})")
    out = {}
    for name, shape in shapes.items():
        w = np.asarray(weights[name], dtype=np.float32)
        if tuple(w.shape) != tuple(shape):
            raise SpecError(f"head '{kind}': weight '{name}' has shape {list(w.shape)}, the template needs {list(shape)}")
        out[name] = w
    return out


# --------------------------------------------------------------------------------------------- ONNX


def least_opset(kind: str, feature_shape: Sequence[Dim], options: Mapping[str, Any] | None = None) -> int:
    """The lowest opset the head template for ``kind`` is written for: 9 (the model zoo's opset, Gemm with
    broadcasting bias), 13 for masked_mean (Unsqueeze/ReduceSum with axes as inputs). A model at an older
    opset gets this one in the segment holding the head (passes/opset.py)."""
    return 13 if _uses_mask(kind, feature_shape, _options(kind, feature_shape, options)) else 9


def head_onnx(kind: str, feature_shape: Sequence[Dim], n_classes: int, options: Mapping[str, Any] | None = None,
              weights: Mapping[str, Any] | None = None, opset: int = 17,
              mask_dtype: int = TensorProto.INT64) -> onnx.ModelProto:
    """Build the head graph (input ``features``, output ``logits``); untrained when ``weights`` is None.

    ``feature_shape`` is the cut tensor's shape; its batch dim (axis 0) becomes symbolic ``batch``.
    ``mask_dtype`` (an ``onnx.TensorProto`` type) is the type of the ``mask`` input of ``pool: masked_mean``.
    """
    if not isinstance(n_classes, int) or n_classes < 1:
        raise SpecError(f"head '{kind}': n_classes must be a positive integer, got {n_classes!r}")
    opts = _options(kind, feature_shape, options)
    least = least_opset(kind, feature_shape, options)
    if opset < least:
        raise SpecError(f"head '{kind}' with these options needs opset >= {least} (the model has {opset}); "
                        f"convert the model with onnx.version_converter")
    shapes = weight_shapes(kind, feature_shape, n_classes, opts)
    w = _check_weights(weights, shapes, kind) if weights is not None else initial_weights(kind, feature_shape, n_classes, opts)
    rank = len(feature_shape)
    nodes: list[onnx.NodeProto] = []
    inits = [numpy_helper.from_array(v, name) for name, v in w.items()]

    def node(op: str, ins: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, ins, [out], name=f"head/{out}", **attrs))
        return out

    def const_i64(name: str, values: list[int]) -> str:
        inits.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    x = FEATURES
    inputs = [helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["batch", *feature_shape[1:]])]
    if kind == "conv":
        x = node("Conv", [x, "conv.weight", "conv.bias"], "conv_out", kernel_shape=[1, 1])
        x = node("Relu", [x], "conv_relu")
    if kind == "token":
        wt = node("Transpose", ["fc.weight"], "fc_weight_t", perm=[1, 0])
        x = node("MatMul", [x, wt], "token_mm")
        node("Add", [x, "fc.bias"], LOGITS)
        out_shape: list[Dim] = ["batch", feature_shape[1], n_classes]
    else:
        if rank == 4:
            x = node("GlobalAveragePool", [x], "pooled")
            x = node("Flatten", [x], "flat", axis=1)
        elif rank == 3 and opts["pool"] == "first":
            x = node("Gather", [x, const_i64("first_index", [0])], "first_token", axis=1)
            x = node("Flatten", [x], "flat", axis=1)
        elif rank == 3 and opts["pool"] == "mean":
            if opset >= 18:  # Reduce ops take axes as an input from opset 18
                x = node("ReduceMean", [x, const_i64("token_axis", [1])], "mean_tokens", keepdims=0)
            else:
                x = node("ReduceMean", [x], "mean_tokens", axes=[1], keepdims=0)
        elif rank == 3:  # masked mean: padding tokens must not dilute the average
            inputs.append(helper.make_tensor_value_info(MASK, mask_dtype, ["batch", feature_shape[1]]))
            m = node("Cast", [MASK], "mask_f", to=TensorProto.FLOAT)
            axis1 = const_i64("token_axis", [1])
            m3 = node("Unsqueeze", [m, const_i64("last_axis", [2])], "mask_3d")
            s = node("ReduceSum", [node("Mul", [x, m3], "masked"), axis1], "masked_sum", keepdims=0)
            cnt = node("ReduceSum", [m, axis1], "mask_count", keepdims=1)
            inits.append(numpy_helper.from_array(np.asarray(1.0, np.float32), "one"))
            x = node("Div", [s, node("Max", [cnt, "one"], "mask_count_1")], "mean_tokens")
        if kind == "mlp":
            x = node("Gemm", [x, "fc1.weight", "fc1.bias"], "hidden", transB=1)
            x = node("Relu", [x], "hidden_relu")
            node("Gemm", [x, "fc2.weight", "fc2.bias"], LOGITS, transB=1)
        else:
            node("Gemm", [x, "fc.weight", "fc.bias"], LOGITS, transB=1)
        out_shape = ["batch", n_classes]
    graph = helper.make_graph(nodes, f"exit_head_{kind}", inputs,
                              [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, out_shape)], inits)
    opset_id = helper.make_opsetid("", opset)
    model = helper.make_model(graph, opset_imports=[opset_id], producer_name="eecompile.heads",
                              ir_version=helper.find_min_ir_version_for([opset_id]))
    onnx.checker.check_model(model, full_check=True)
    return model


# -------------------------------------------------------------------------------------------- torch


def head_module(kind: str, feature_shape: Sequence[Dim], n_classes: int,
                options: Mapping[str, Any] | None = None, weights: Mapping[str, Any] | None = None) -> Any:
    """The torch twin of :func:`head_onnx` (same maths, ``state_dict`` == the ONNX weights).

    Starts from :func:`initial_weights` (or ``weights``), so an untrained module equals the untrained graph.
    """
    import torch
    from torch import nn

    opts = _options(kind, feature_shape, options)
    shapes = weight_shapes(kind, feature_shape, n_classes, opts)
    rank = len(feature_shape)
    d = _in_dim(feature_shape)
    pool = opts["pool"]

    class ExitHead(nn.Module):
        """The trainable twin of the head template ``kind`` (same weights, same ONNX graph once exported)."""

        def __init__(self) -> None:
            super().__init__()
            if kind == "mlp":
                self.fc1 = nn.Linear(d, int(opts["hidden"]))
                self.fc2 = nn.Linear(int(opts["hidden"]), n_classes)
            elif kind == "conv":
                self.conv = nn.Conv2d(d, int(opts["conv_channels"]), kernel_size=1)
                self.fc = nn.Linear(int(opts["conv_channels"]), n_classes)
            else:
                self.fc = nn.Linear(d, n_classes)

        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            """``x``: float features, batch first (``[B, D]``, ``[B, T, D]`` or ``[B, C, H, W]``); ``mask``:
            ``[B, T]`` (1 = real token) for ``pool: masked_mean``. Returns logits ``[B, n_classes]`` (``[B, T,
            n_classes]`` for ``token``). Raises ValueError when ``masked_mean`` gets no mask."""
            if kind == "token":
                return self.fc(x)
            if kind == "conv":
                x = torch.relu(self.conv(x))
            if rank == 4:
                x = x.mean(dim=(2, 3))
            elif rank == 3 and pool == "first":
                x = x[:, 0]
            elif rank == 3 and pool == "mean":
                x = x.mean(dim=1)
            elif rank == 3:
                if mask is None:
                    raise ValueError("pool 'masked_mean' needs the mask as second argument")
                m = mask.to(x.dtype)
                x = (x * m.unsqueeze(2)).sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)
            if kind == "mlp":
                return self.fc2(torch.relu(self.fc1(x)))
            return self.fc(x)

    module = ExitHead()
    w = _check_weights(weights, shapes, kind) if weights is not None else initial_weights(kind, feature_shape, n_classes, opts)
    module.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in w.items()})
    return module


def module_weights(module: Any) -> dict[str, np.ndarray]:
    """A trained twin's weights as numpy arrays, ready for :func:`head_onnx`."""
    return {k: v.detach().cpu().float().numpy() for k, v in module.state_dict().items()}
