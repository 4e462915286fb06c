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
local      [B, T, D]       LGViT's local perception head: tokens (a leading class token dropped when
                           T = s^2 + 1) to their s x s grid [B, D, s, s] -> depthwise k x k Conv -> Relu
                           -> GlobalAveragePool -> Gemm
global     [B, T, D]       LGViT's global aggregation head: attention pooling, a = softmax_T(x w + b),
                           sum_T a x -> Gemm
=========  ==============  =====================================================================

Options: ``hidden`` (mlp, default 128), ``conv_channels`` (conv, default 64), ``pool`` (rank-3 features:
``first`` (default), ``mean`` or ``masked_mean``), ``seed`` (initial hidden weights, default 0), ``grid``
(local: the side s of the token grid, default the square root of T or of T - 1), ``kernel`` (local: the
depthwise kernel, odd, default 3), ``score`` (a second output ``score`` [B, 1] that a ``score`` or ``q_exit``
gate reads):

- ``score: uncertainty`` (regression exits; DeeDiff's uncertainty estimation module, Tang et al. 2023):
  u = sigmoid(w . pooled + b) predicts the exit's error; ``score = 1 - u``, so the gate fires when the predicted
  error is low. ``train-heads`` fits u to tanh(relative L2 error of the exit to the final output).
- ``score: agreement`` (classification exits; the learned gates of JEI-DNN, Regol et al. 2024, and BERxiT,
  Xin et al. 2021): ``score = sigmoid(w . [pooled, max p, normalised entropy, top-1 - top-2] + b)``, from the
  pooled features and the exit's softmax statistics; ``train-heads`` fits it (cross-entropy) to whether the
  exit's argmax equals the final exit's. As a Q-exit's lambda it is a halting probability.
- ``score: halting`` (classification exits with a ``q_exit`` gate; PALBERT, Balagansky and Gavrilov 2022): the
  same graph as ``agreement``, read as the exit's halting probability lambda; ``train-heads`` trains the lambdas of
  all such exits jointly with PALBERT's objective (:mod:`eecompile.halting`).

Regression outputs (``final.task: regression``): a ``conv`` head on [B, C, h, w] features for a final output
[B, C', H, W] maps back to the output's shape (``out_shape``): 1x1 Conv -> Relu -> 1x1 Conv to C' channels ->
bilinear Resize to H x W (half-pixel, as torch's ``interpolate(align_corners=False)``) when h x w differs; the
other kinds give the output's values flat (Gemm to the product of its per-sample shape), reshaped by the
compiler.
``pool: masked_mean`` gives the head a second input ``mask`` ([B, T], 1 = real token), which the compiler
connects to the exit's second cut tensor (``at: [hidden_states, attention_mask]``).

Weights are a dict ``name -> np.ndarray`` whose names and shapes are exactly the ``state_dict`` of
:func:`head_module`, so a head trained in torch goes back into the same ONNX template without
``torch.onnx.export``. With ``weights=None`` the head is *untrained*: its last layer is zero, so its softmax
is uniform and no max_prob / entropy / margin gate fires before training; hidden layers get small random
weights so that training can start.

Features are float32 with the batch on axis 0. torch is imported only inside :func:`head_module`. An untrained
score is near 0 (its bias is -10 or +10), so a score gate with a positive threshold does not fire before training.
"""

from __future__ import annotations

import math
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
SCORE = "score"

Dim = int | str | None

_DEFAULTS: dict[str, Any] = {"hidden": 128, "conv_channels": 64, "pool": "first", "seed": 0, "score": None,
                             "grid": None, "kernel": 3}
_POOLS = ("first", "mean", "masked_mean")
_SCORES = ("uncertainty", "agreement", "halting")
_STAT_SCORES = ("agreement", "halting")  # scores read from the pooled features and the exit's softmax statistics
_RANKS = {"linear": (2, 3, 4), "mlp": (2, 3, 4), "conv": (4,), "token": (3,), "local": (3,), "global": (3,)}


# ------------------------------------------------------------------------------------------- shapes


def _options(kind: str, feature_shape: Sequence[Dim], options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check kind, rank and options; return the options with defaults filled in."""
    if kind not in HEAD_KINDS:
        raise SpecError(f"head kind '{kind}' is unknown; use one of {', '.join(HEAD_KINDS)}")
    opts = dict(_DEFAULTS)
    for key, value in (options or {}).items():
        if key.startswith("_"):  # filled in by an earlier call (e.g. the grid's class token)
            continue
        if key not in _DEFAULTS:
            raise SpecError(f"head option '{key}' is unknown for kind '{kind}'; known: {', '.join(_DEFAULTS)}")
        opts[key] = value
    rank = len(feature_shape)
    allowed = _RANKS[kind]
    if rank not in allowed:
        shapes = {2: "[B, D]", 3: "[B, T, D]", 4: "[B, C, H, W]"}
        hint = "; for [B, T, D] tokens use kind 'local' (tokens on their 2-D grid) or 'global'" if kind == "conv" else ""
        raise SpecError(
            f"head kind '{kind}' cannot read features shaped {list(feature_shape)} (rank {rank}); it takes "
            f"{' or '.join(shapes[r] for r in allowed)}; cut at another tensor or pick another kind{hint}"
        )
    for key in ("hidden", "conv_channels", "kernel"):
        if not isinstance(opts[key], int) or isinstance(opts[key], bool) or opts[key] < 1:
            raise SpecError(f"head option '{key}' must be a positive integer, got {opts[key]!r}")
    if opts["kernel"] % 2 == 0:
        raise SpecError(f"head option 'kernel' must be odd (the grid keeps its size), got {opts['kernel']}")
    if opts["pool"] not in _POOLS:
        raise SpecError(f"head option 'pool' must be one of {', '.join(_POOLS)}, got {opts['pool']!r}")
    if opts["score"] is not None and opts["score"] not in _SCORES:
        raise SpecError(f"head option 'score' must be one of {', '.join(_SCORES)}, got {opts['score']!r}")
    if opts["score"] in _STAT_SCORES and kind == "token":
        raise SpecError(f"head option 'score: {opts['score']}' needs one prediction per sample; kind 'token' has one per "
                        "token")
    channels = feature_shape[1] if rank == 4 else feature_shape[-1]
    if not isinstance(channels, int) or channels < 1:
        raise SpecError(
            f"head '{kind}': the feature dimension of {list(feature_shape)} must be a known integer to size "
            f"the head's weights (got {channels!r}); run shape inference on the model or fix its input shapes"
        )
    if kind == "local":
        opts["grid"], opts["_cls"] = _grid(feature_shape, opts["grid"])
    return opts


def _grid(feature_shape: Sequence[Dim], grid: Any) -> tuple[int, bool]:
    """(side s, drop a leading class token) of the token grid of [B, T, D] features (LGViT's local head)."""
    t = feature_shape[1]
    if grid is not None and (not isinstance(grid, int) or isinstance(grid, bool) or grid < 1):
        raise SpecError(f"head option 'grid' must be a positive integer (the side of the token grid), got {grid!r}")
    if not isinstance(t, int):
        raise SpecError(f"head 'local': the token count of {list(feature_shape)} must be a known integer to lay the "
                        f"tokens on their grid")
    sides = [grid] if grid is not None else [int(round(math.sqrt(t))), int(round(math.sqrt(max(t - 1, 0))))]
    for s in sides:
        if s * s == t:
            return s, False
        if s * s + 1 == t:
            return s, True
    raise SpecError(f"head 'local': {t} tokens do not make a square grid{f' of side {grid}' if grid else ''} (with or "
                    f"without one class token first); give options: {{grid: SIDE}} or use kind 'global'")


def _in_dim(feature_shape: Sequence[Dim]) -> int:
    d = feature_shape[1] if len(feature_shape) == 4 else feature_shape[-1]
    assert isinstance(d, int)
    return d


def _uses_mask(kind: str, feature_shape: Sequence[Dim], opts: Mapping[str, Any]) -> bool:
    return len(feature_shape) == 3 and kind in ("linear", "mlp") and opts["pool"] == "masked_mean"


def _dense(kind: str, feature_shape: Sequence[Dim], out_shape: Sequence[int] | None) -> bool:
    """A conv head that maps [B, C, h, w] features to a regression output [B, C', H, W] (``out_shape``)."""
    return kind == "conv" and out_shape is not None and len(out_shape) == 3 and len(feature_shape) == 4


def _check_out_shape(out_shape: Sequence[int] | None) -> tuple[int, ...] | None:
    if out_shape is None:
        return None
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in out_shape) or not out_shape:
        raise SpecError(f"a regression head needs the final output's per-sample shape as positive integers, got "
                        f"{list(out_shape)}; give the model's output fixed sizes (except the batch)")
    return tuple(out_shape)


def head_input_names(kind: str, feature_shape: Sequence[Dim], options: Mapping[str, Any] | None = None) -> list[str]:
    """The head graph's inputs, in the order they map to the exit's ``at`` tensors."""
    opts = _options(kind, feature_shape, options)
    return [FEATURES, MASK] if _uses_mask(kind, feature_shape, opts) else [FEATURES]


def head_output_names(kind: str, feature_shape: Sequence[Dim], options: Mapping[str, Any] | None = None) -> list[str]:
    """The head graph's outputs: ``logits``, and ``score`` with the ``score`` option."""
    opts = _options(kind, feature_shape, options)
    return [LOGITS, SCORE] if opts["score"] else [LOGITS]


def _pooled_width(kind: str, feature_shape: Sequence[Dim], opts: Mapping[str, Any]) -> int:
    """Width of the pooled features the last layer (and the score) reads."""
    if kind == "mlp":
        return int(opts["hidden"])
    if kind == "conv":
        return int(opts["conv_channels"])
    return _in_dim(feature_shape)


def weight_shapes(kind: str, feature_shape: Sequence[Dim], n_classes: int,
                  options: Mapping[str, Any] | None = None,
                  out_shape: Sequence[int] | None = None) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every weight of a head (the torch twin's ``state_dict`` keys). ``out_shape``: a
    regression output's per-sample shape ([C', H, W] for a ``conv`` head that maps back to it)."""
    opts = _options(kind, feature_shape, options)
    out_shape = _check_out_shape(out_shape)
    d = _in_dim(feature_shape)
    shapes: dict[str, tuple[int, ...]]
    if kind == "mlp":
        h = int(opts["hidden"])
        shapes = {"fc1.weight": (h, d), "fc1.bias": (h,), "fc2.weight": (n_classes, h), "fc2.bias": (n_classes,)}
    elif kind == "conv" and _dense(kind, feature_shape, out_shape):
        c = int(opts["conv_channels"])
        assert out_shape is not None
        shapes = {"conv.weight": (c, d, 1, 1), "conv.bias": (c,), "out.weight": (out_shape[0], c, 1, 1),
                  "out.bias": (out_shape[0],)}
    elif kind == "conv":
        c = int(opts["conv_channels"])
        shapes = {"conv.weight": (c, d, 1, 1), "conv.bias": (c,), "fc.weight": (n_classes, c), "fc.bias": (n_classes,)}
    elif kind == "local":
        k = int(opts["kernel"])
        shapes = {"dw.weight": (d, 1, k, k), "dw.bias": (d,), "fc.weight": (n_classes, d), "fc.bias": (n_classes,)}
    elif kind == "global":
        shapes = {"attn.weight": (1, d), "attn.bias": (1,), "fc.weight": (n_classes, d), "fc.bias": (n_classes,)}
    else:
        shapes = {"fc.weight": (n_classes, d), "fc.bias": (n_classes,)}
    if opts["score"]:
        extra = 3 if opts["score"] in _STAT_SCORES else 0  # max p, normalised entropy, margin
        shapes.update({"score.weight": (1, _pooled_width(kind, feature_shape, opts) + extra), "score.bias": (1,)})
    return shapes


_LAST = {"mlp": "fc2.", "conv": "fc."}


def initial_weights(kind: str, feature_shape: Sequence[Dim], n_classes: int,
                    options: Mapping[str, Any] | None = None,
                    out_shape: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Untrained weights: last layer zero (uniform softmax; a zero regression output), hidden layers small and
    random (seeded), the score's weights zero with a bias that keeps the score near 0 (see the module doc)."""
    opts = _options(kind, feature_shape, options)
    rng = np.random.default_rng(int(opts["seed"]))
    shapes = weight_shapes(kind, feature_shape, n_classes, opts, out_shape)
    last = "out." if _dense(kind, feature_shape, out_shape) else _LAST.get(kind, "fc.")
    out: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        if name == "score.bias":
            out[name] = np.full(shape, 10.0 if opts["score"] == "uncertainty" else -10.0, np.float32)
        elif name.startswith((last, "score.")) or name.endswith(".bias"):
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


def _resizes(feature_shape: Sequence[Dim], out_shape: Sequence[int] | None) -> bool:
    return out_shape is not None and list(feature_shape[2:]) != list(out_shape[1:])


def least_opset(kind: str, feature_shape: Sequence[Dim], options: Mapping[str, Any] | None = None,
                out_shape: Sequence[int] | None = None) -> int:
    """The lowest opset the head template for ``kind`` is written for: 9 (the model zoo's opset, Gemm with
    broadcasting bias), 13 for masked_mean (Unsqueeze/ReduceSum with axes as inputs), for a score (Softmax over
    the last axis) and for a conv head that resizes to a regression output (Resize without scales). A model at
    an older opset gets this one in the segment holding the head (passes/opset.py)."""
    opts = _options(kind, feature_shape, options)
    dense_resize = _dense(kind, feature_shape, out_shape) and _resizes(feature_shape, out_shape)
    return 13 if _uses_mask(kind, feature_shape, opts) or opts["score"] or dense_resize or kind == "global" else 9


def head_onnx(kind: str, feature_shape: Sequence[Dim], n_classes: int, options: Mapping[str, Any] | None = None,
              weights: Mapping[str, Any] | None = None, opset: int = 17,
              mask_dtype: int = TensorProto.INT64, out_shape: Sequence[int] | None = None) -> onnx.ModelProto:
    """Build the head graph (input ``features``, output ``logits``, and ``score`` [B, 1] with the ``score``
    option); untrained when ``weights`` is None.

    ``feature_shape`` is the cut tensor's shape; its batch dim (axis 0) becomes symbolic ``batch``.
    ``mask_dtype`` (an ``onnx.TensorProto`` type) is the type of the ``mask`` input of ``pool: masked_mean``.
    ``out_shape``: a regression output's per-sample shape; a ``conv`` head on [B, C, h, w] then gives
    ``[B, *out_shape]`` (see the module doc). Raises SpecError for kinds, options, shapes or weights that do not
    fit, and an opset below :func:`least_opset`.
    """
    if not isinstance(n_classes, int) or n_classes < 1:
        raise SpecError(f"head '{kind}': n_classes must be a positive integer, got {n_classes!r}")
    opts = _options(kind, feature_shape, options)
    out_shape = _check_out_shape(out_shape)
    least = least_opset(kind, feature_shape, options, out_shape)
    if opset < least:
        raise SpecError(f"head '{kind}' with these options needs opset >= {least} (the model has {opset}); "
                        f"convert the model with onnx.version_converter")
    shapes = weight_shapes(kind, feature_shape, n_classes, opts, out_shape)
    w = (_check_weights(weights, shapes, kind) if weights is not None
         else initial_weights(kind, feature_shape, n_classes, opts, out_shape))
    rank = len(feature_shape)
    d = _in_dim(feature_shape)
    nodes: list[onnx.NodeProto] = []
    inits = [numpy_helper.from_array(v, name) for name, v in w.items()]

    def node(op: str, ins: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, ins, [out], name=f"head/{out}", **attrs))
        return out

    def const_i64(name: str, values: list[int]) -> str:
        inits.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    def const_f32(name: str, value: float) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def reduce(op: str, x: str, axis: int, out: str, keepdims: int = 0) -> str:
        if opset >= (13 if op == "ReduceSum" else 18):  # Reduce ops take axes as an input
            return node(op, [x, const_i64(f"{out}_axes", [axis])], out, keepdims=keepdims)
        return node(op, [x], out, axes=[axis], keepdims=keepdims)

    x = FEATURES
    inputs = [helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["batch", *feature_shape[1:]])]
    pooled = ""
    if kind == "conv":
        x = node("Conv", [x, "conv.weight", "conv.bias"], "conv_out", kernel_shape=[1, 1])
        x = node("Relu", [x], "conv_relu")
    if kind == "token":
        wt = node("Transpose", ["fc.weight"], "fc_weight_t", perm=[1, 0])
        x = node("MatMul", [x, wt], "token_mm")
        node("Add", [x, "fc.bias"], LOGITS)
        out_dims: list[Dim] = ["batch", feature_shape[1], n_classes]
        pooled = reduce("ReduceMean", FEATURES, 1, "mean_tokens") if opts["score"] else ""
    elif _dense(kind, feature_shape, out_shape):
        assert out_shape is not None
        pooled = node("Flatten", [node("GlobalAveragePool", [x], "pooled")], "flat", axis=1)
        y = node("Conv", [x, "out.weight", "out.bias"], "dense_out" if _resizes(feature_shape, out_shape) else LOGITS,
                 kernel_shape=[1, 1])
        if _resizes(feature_shape, out_shape):
            shp = node("Shape", [y], "dense_shape")
            nc = node("Slice", [shp, const_i64("s0", [0]), const_i64("s2", [2])], "dense_nc")
            sizes = node("Concat", [nc, const_i64("out_hw", list(out_shape[1:]))], "dense_sizes", axis=0)
            node("Resize", [y, "", "", sizes], LOGITS, mode="linear", coordinate_transformation_mode="half_pixel")
        out_dims = ["batch", *out_shape]
    else:
        if kind == "local":
            s_, cls = int(opts["grid"]), bool(opts["_cls"])
            if cls:
                x = node("Slice", [x, const_i64("tok_start", [1]), const_i64("tok_end", [1 + s_ * s_]),
                                   const_i64("tok_axis", [1])], "patch_tokens")
            x = node("Transpose", [x], "tokens_dt", perm=[0, 2, 1])
            x = node("Reshape", [x, const_i64("grid_shape", [0, d, s_, s_])], "grid")
            k = int(opts["kernel"])
            x = node("Conv", [x, "dw.weight", "dw.bias"], "dw_out", kernel_shape=[k, k], group=d,
                     pads=[k // 2] * 4)
            x = node("Relu", [x], "dw_relu")
            x = node("Flatten", [node("GlobalAveragePool", [x], "pooled_grid")], "flat", axis=1)
        elif kind == "global":
            wt = node("Transpose", ["attn.weight"], "attn_weight_t", perm=[1, 0])
            a = node("Add", [node("MatMul", [x, wt], "attn_logits_mm"), "attn.bias"], "attn_logits")
            a = node("Softmax", [a], "attn", axis=1)
            x = reduce("ReduceSum", node("Mul", [x, a], "attn_weighted"), 1, "attn_pooled")
        elif rank == 4:
            x = node("GlobalAveragePool", [x], "pooled")
            x = node("Flatten", [x], "flat", axis=1)
        elif rank == 3 and opts["pool"] == "first":
            x = node("Gather", [x, const_i64("first_index", [0])], "first_token", axis=1)
            x = node("Flatten", [x], "flat", axis=1)
        elif rank == 3 and opts["pool"] == "mean":
            x = reduce("ReduceMean", x, 1, "mean_tokens")
        elif rank == 3:  # masked mean: padding tokens must not dilute the average
            inputs.append(helper.make_tensor_value_info(MASK, mask_dtype, ["batch", feature_shape[1]]))
            m = node("Cast", [MASK], "mask_f", to=TensorProto.FLOAT)
            axis1 = const_i64("token_axis", [1])
            m3 = node("Unsqueeze", [m, const_i64("last_axis", [2])], "mask_3d")
            s = node("ReduceSum", [node("Mul", [x, m3], "masked"), axis1], "masked_sum", keepdims=0)
            cnt = node("ReduceSum", [m, axis1], "mask_count", keepdims=1)
            x = node("Div", [s, node("Max", [cnt, const_f32("one", 1.0)], "mask_count_1")], "mean_tokens")
        if kind == "mlp":
            x = node("Gemm", [x, "fc1.weight", "fc1.bias"], "hidden", transB=1)
            x = node("Relu", [x], "hidden_relu")
            node("Gemm", [x, "fc2.weight", "fc2.bias"], LOGITS, transB=1)
        else:
            node("Gemm", [x, "fc.weight", "fc.bias"], LOGITS, transB=1)
        pooled = x
        out_dims = ["batch", n_classes]
    outputs = [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, out_dims)]
    if opts["score"]:
        feats = pooled
        if opts["score"] in _STAT_SCORES:  # the exit's softmax statistics (JEI-DNN, BERxiT)
            p = node("Softmax", [LOGITS], "score_p", axis=-1)
            maxp = reduce("ReduceMax", p, -1, "score_maxp", keepdims=1)
            logp = node("LogSoftmax", [LOGITS], "score_logp", axis=-1)
            ent = node("Neg", [reduce("ReduceSum", node("Mul", [p, logp], "score_plogp"), -1, "score_sum",
                                      keepdims=1)], "score_ent")
            ent = node("Mul", [ent, const_f32("score_inv_logc", 1.0 / math.log(n_classes) if n_classes > 1 else 1.0)],
                       "score_entn")
            if n_classes > 1:
                vals = "score_top2"
                nodes.append(helper.make_node("TopK", [p, const_i64("score_k", [2])], [vals, "score_top2_idx"],
                                              name="head/score_topk", axis=-1))
                t1 = node("Slice", [vals, const_i64("sk0", [0]), const_i64("sk1", [1]), const_i64("skax", [1])], "score_t1")
                t2 = node("Slice", [vals, const_i64("sk1b", [1]), const_i64("sk2", [2]), const_i64("skaxb", [1])], "score_t2")
                margin = node("Sub", [t1, t2], "score_margin")
            else:
                margin = maxp
            feats = node("Concat", [pooled, maxp, ent, margin], "score_in", axis=1)
        z = node("Gemm", [feats, "score.weight", "score.bias"], "score_z", transB=1)
        if opts["score"] == "uncertainty":
            node("Sub", [const_f32("score_one", 1.0), node("Sigmoid", [z], "uncertainty")], SCORE)
        else:
            node("Sigmoid", [z], SCORE)
        outputs.append(helper.make_tensor_value_info(SCORE, TensorProto.FLOAT, ["batch", 1]))
    graph = helper.make_graph(nodes, f"exit_head_{kind}", inputs, outputs, inits)
    opset_id = helper.make_opsetid("", opset)
    model = helper.make_model(graph, opset_imports=[opset_id], producer_name="eecompile.heads",
                              ir_version=helper.find_min_ir_version_for([opset_id]))
    onnx.checker.check_model(model, full_check=True)
    return model


# -------------------------------------------------------------------------------------------- torch


def head_module(kind: str, feature_shape: Sequence[Dim], n_classes: int,
                options: Mapping[str, Any] | None = None, weights: Mapping[str, Any] | None = None,
                out_shape: Sequence[int] | None = None) -> Any:
    """The torch twin of :func:`head_onnx` (same maths, ``state_dict`` == the ONNX weights).

    Starts from :func:`initial_weights` (or ``weights``), so an untrained module equals the untrained graph.
    ``module(x[, mask])`` gives the logits (or regression output); ``module.score(x[, mask])`` the score
    [B, 1] of the ``score`` option (computed from the same pooled features and logits).
    """
    import torch
    from torch import nn

    opts = _options(kind, feature_shape, options)
    out_shape = _check_out_shape(out_shape)
    shapes = weight_shapes(kind, feature_shape, n_classes, opts, out_shape)
    rank = len(feature_shape)
    d = _in_dim(feature_shape)
    pool = opts["pool"]
    dense = _dense(kind, feature_shape, out_shape)

    class ExitHead(nn.Module):
        """The trainable twin of the head template ``kind`` (same weights, same ONNX graph once exported)."""

        def __init__(self) -> None:
            super().__init__()
            if kind == "mlp":
                self.fc1 = nn.Linear(d, int(opts["hidden"]))
                self.fc2 = nn.Linear(int(opts["hidden"]), n_classes)
            elif kind == "conv":
                self.conv = nn.Conv2d(d, int(opts["conv_channels"]), kernel_size=1)
                if dense:
                    assert out_shape is not None
                    self.out = nn.Conv2d(int(opts["conv_channels"]), out_shape[0], kernel_size=1)
                else:
                    self.fc = nn.Linear(int(opts["conv_channels"]), n_classes)
            elif kind == "local":
                k = int(opts["kernel"])
                self.dw = nn.Conv2d(d, d, k, padding=k // 2, groups=d)
                self.fc = nn.Linear(d, n_classes)
            elif kind == "global":
                self.attn = nn.Linear(d, 1)
                self.fc = nn.Linear(d, n_classes)
            else:
                self.fc = nn.Linear(d, n_classes)
            if opts["score"]:
                out_f, in_f = shapes["score.weight"]
                self.score_layer = nn.Linear(in_f, out_f)

        def body(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            """(output, pooled features the last layer and the score read)."""
            if kind == "token":
                return self.fc(x), x.mean(dim=1)
            if kind == "conv":
                x = torch.relu(self.conv(x))
                if dense:
                    assert out_shape is not None
                    y = self.out(x)
                    if tuple(y.shape[2:]) != tuple(out_shape[1:]):
                        y = torch.nn.functional.interpolate(y, size=tuple(out_shape[1:]), mode="bilinear",
                                                            align_corners=False)
                    return y, x.mean(dim=(2, 3))
            if kind == "local":
                s_ = int(opts["grid"])
                if opts["_cls"]:
                    x = x[:, 1:1 + s_ * s_]
                x = x.transpose(1, 2).reshape(x.shape[0], d, s_, s_)
                x = torch.relu(self.dw(x)).mean(dim=(2, 3))
            elif kind == "global":
                a = torch.softmax(self.attn(x), dim=1)
                x = (x * a).sum(1)
            elif rank == 4:
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
                x = torch.relu(self.fc1(x))
                return self.fc2(x), x
            return self.fc(x), x

        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            """``x``: float features, batch first (``[B, D]``, ``[B, T, D]`` or ``[B, C, H, W]``); ``mask``:
            ``[B, T]`` (1 = real token) for ``pool: masked_mean``. Returns logits ``[B, n_classes]`` (``[B, T,
            n_classes]`` for ``token``; ``[B, *out_shape]`` for a dense conv head). Raises ValueError when
            ``masked_mean`` gets no mask."""
            return self.body(x, mask)[0]

        def score(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            """The ``score`` output [B, 1] (see :func:`head_onnx`). Raises ValueError without the option."""
            if not opts["score"]:
                raise ValueError(f"head '{kind}' has no score option")
            logits, pooled = self.body(x, mask)
            feats = pooled
            if opts["score"] in _STAT_SCORES:
                p = torch.softmax(logits, -1)
                ent = -(p * torch.log_softmax(logits, -1)).sum(-1, keepdim=True)
                ent = ent * (1.0 / math.log(n_classes) if n_classes > 1 else 1.0)
                maxp = p.max(-1, keepdim=True).values
                top = p.topk(2, -1).values if n_classes > 1 else None
                margin = top[:, :1] - top[:, 1:2] if top is not None else maxp
                feats = torch.cat([pooled, maxp, ent, margin], 1)
            z = torch.sigmoid(self.score_layer(feats))
            return 1.0 - z if opts["score"] == "uncertainty" else z

    module = ExitHead()
    w = (_check_weights(weights, shapes, kind) if weights is not None
         else initial_weights(kind, feature_shape, n_classes, opts, out_shape))
    state = {k.replace("score.", "score_layer.") if k.startswith("score.") else k: torch.from_numpy(v.copy())
             for k, v in w.items()}
    module.load_state_dict(state)
    return module


def module_weights(module: Any) -> dict[str, np.ndarray]:
    """A trained twin's weights as numpy arrays, ready for :func:`head_onnx`."""
    return {(k.replace("score_layer.", "score.") if k.startswith("score_layer.") else k): v.detach().cpu().float().numpy()
            for k, v in module.state_dict().items()}
