"""Small graphs shaped like the ones users bring (model-zoo exports, converter output), built with
``onnx.helper`` so each test states exactly the structure it is about."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


def _w(rng: np.random.Generator, name: str, *shape: int, s: float = 0.2) -> onnx.TensorProto:
    return nh.from_array((rng.standard_normal(shape) * s).astype(np.float32), name)


def opset8_cnn(path: Path, seed: int = 5) -> Path:
    """An opset-8 / IR-3 MNIST CNN shaped like the model zoo's mnist-8 (a CNTK export): every initializer is
    also listed among the graph inputs, Conv with ``auto_pad=SAME_UPPER``, biases added as [C, 1, 1], the weight
    Reshape computed in the graph, and the activation flattened by a Reshape to the constant [1, 256] (batch 1).
    Input ``Input3`` [1, 1, 28, 28]; output ``Plus214_Output_0`` [1, 10] (logits). The cut tensor
    ``ReLU32_Output_0`` is [1, 8, 28, 28]."""
    rng = np.random.default_rng(seed)
    inits = [_w(rng, "Parameter5", 8, 1, 5, 5), _w(rng, "Parameter6", 8, 1, 1), _w(rng, "Parameter87", 16, 8, 5, 5),
             _w(rng, "Parameter88", 16, 1, 1), _w(rng, "Parameter193", 16, 4, 4, 10),
             nh.from_array(np.array([256, 10], np.int64), "Parameter193_reshape1_shape"),
             nh.from_array(np.array([1, 256], np.int64), "Pooling160_Output_0_reshape0_shape"),
             _w(rng, "Parameter194", 1, 10)]
    conv = {"strides": [1, 1], "auto_pad": "SAME_UPPER", "group": 1, "dilations": [1, 1], "kernel_shape": [5, 5]}
    nodes = [
        h.make_node("Reshape", ["Parameter193", "Parameter193_reshape1_shape"], ["Parameter193_reshape1"],
                    name="Times212_reshape1"),
        h.make_node("Conv", ["Input3", "Parameter5"], ["Convolution28_Output_0"], name="Convolution28", **conv),
        h.make_node("Add", ["Convolution28_Output_0", "Parameter6"], ["Plus30_Output_0"], name="Plus30"),
        h.make_node("Relu", ["Plus30_Output_0"], ["ReLU32_Output_0"], name="ReLU32"),
        h.make_node("MaxPool", ["ReLU32_Output_0"], ["Pooling66_Output_0"], kernel_shape=[2, 2], strides=[2, 2],
                    pads=[0, 0, 0, 0], auto_pad="NOTSET", name="Pooling66"),
        h.make_node("Conv", ["Pooling66_Output_0", "Parameter87"], ["Convolution110_Output_0"], name="Convolution110",
                    **conv),
        h.make_node("Add", ["Convolution110_Output_0", "Parameter88"], ["Plus112_Output_0"], name="Plus112"),
        h.make_node("Relu", ["Plus112_Output_0"], ["ReLU114_Output_0"], name="ReLU114"),
        h.make_node("MaxPool", ["ReLU114_Output_0"], ["Pooling160_Output_0"], kernel_shape=[3, 3], strides=[3, 3],
                    pads=[0, 0, 0, 0], auto_pad="NOTSET", name="Pooling160"),
        h.make_node("Reshape", ["Pooling160_Output_0", "Pooling160_Output_0_reshape0_shape"],
                    ["Pooling160_Output_0_reshape0"], name="Times212_reshape0"),
        h.make_node("MatMul", ["Pooling160_Output_0_reshape0", "Parameter193_reshape1"], ["Times212_Output_0"],
                    name="Times212"),
        h.make_node("Add", ["Times212_Output_0", "Parameter194"], ["Plus214_Output_0"], name="Plus214"),
    ]
    ins = [h.make_tensor_value_info("Input3", T.FLOAT, [1, 1, 28, 28])] + [
        h.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    g = h.make_graph(nodes, "CNTKGraph", ins, [h.make_tensor_value_info("Plus214_Output_0", T.FLOAT, [1, 10])], inits)
    m = h.make_model(g, producer_name="CNTK", producer_version="2.5.1", opset_imports=[h.make_opsetid("", 8)])
    m.ir_version = 3
    onnx.checker.check_model(m)
    onnx.save(m, path)
    return path


def pooled_head(path: Path, channels: int, n_classes: int, opset: int, *, layernorm: bool = False,
                seed: int = 0, scale: float = 0.3) -> Path:
    """An exit head as a current exporter writes it: GlobalAveragePool -> Flatten -> (LayerNormalization,
    opset >= 17) -> Gemm. Input ``features`` [N, C, H, W] float32; output ``logits`` [N, n_classes]."""
    rng = np.random.default_rng(seed)
    inits = [_w(rng, "fc.weight", n_classes, channels, s=scale), _w(rng, "fc.bias", n_classes, s=0.1)]
    nodes = [h.make_node("GlobalAveragePool", ["features"], ["pooled"], name="pool"),
             h.make_node("Flatten", ["pooled"], ["flat"], axis=1, name="flatten")]
    x = "flat"
    if layernorm:
        inits += [nh.from_array(np.ones(channels, np.float32), "ln.weight"),
                  nh.from_array(np.zeros(channels, np.float32), "ln.bias")]
        nodes.append(h.make_node("LayerNormalization", ["flat", "ln.weight", "ln.bias"], ["normed"], axis=-1,
                                 epsilon=1e-5, name="ln"))
        x = "normed"
    nodes.append(h.make_node("Gemm", [x, "fc.weight", "fc.bias"], ["logits"], transB=1, name="fc"))
    g = h.make_graph(nodes, "exit_head", [h.make_tensor_value_info("features", T.FLOAT, ["N", channels, "H", "W"])],
                     [h.make_tensor_value_info("logits", T.FLOAT, ["N", n_classes])], inits)
    opset_id = h.make_opsetid("", opset)
    m = h.make_model(g, opset_imports=[opset_id], ir_version=max(h.find_min_ir_version_for([opset_id]), 4))
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, path)
    return path


def with_head_output(model: Path, head: Path, at: str, out_name: str, path: Path) -> Path:
    """``model`` with ``head`` applied to tensor ``at`` as an extra output ``out_name`` (the reference for
    forced exits), both brought to the higher of the two opsets."""
    from onnx import compose, version_converter

    m, hd = onnx.load(str(model)), onnx.load(str(head))
    op_m = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    op_h = next(o.version for o in hd.opset_import if o.domain in ("", "ai.onnx"))
    top = max(op_m, op_h)
    if op_m < top:
        m = version_converter.convert_version(m, top)
    if op_h < top:
        hd = version_converter.convert_version(hd, top)
    hd = compose.add_prefix(hd, f"ref_{out_name}/")
    head_in, head_out = hd.graph.input[0].name, hd.graph.output[0].name
    for n in hd.graph.node:
        n.input[:] = [at if x == head_in else x for x in n.input]
        n.output[:] = [out_name if x == head_out else x for x in n.output]
    m.graph.node.extend(hd.graph.node)
    m.graph.initializer.extend(hd.graph.initializer)
    out = onnx.ValueInfoProto()
    out.CopyFrom(hd.graph.output[0])
    out.name = out_name
    out.type.tensor_type.shape.dim[0].CopyFrom(m.graph.output[0].type.tensor_type.shape.dim[0])
    m.graph.output.append(out)
    m.ir_version = max(m.ir_version, hd.ir_version)
    onnx.checker.check_model(m)
    onnx.save(m, path)
    return path


def small_cnn(path: Path, *, activation: str | None = "Softmax", opset: int = 13, aux_activation: str | None = None,
              seed: int = 1, batch: int | str = "N", nhwc: bool = False) -> Path:
    """A LeNet-sized classifier (a tf2onnx/Keras export when ``nhwc``: NHWC input transposed first) whose
    final output ``probs`` [N, 10] is ``activation`` (Softmax, LogSoftmax, Sigmoid or None) of the logits.
    Cut tensor ``pool`` [N, 6, 15, 15]; an in-model exit head gives ``aux`` [N, 10] from it (its logits,
    or ``aux_activation`` of them). Input ``image`` [N, 32, 32, 3] (nhwc) or [N, 3, 32, 32]."""
    rng = np.random.default_rng(seed)
    inits = [_w(rng, "c1.w", 6, 3, 3, 3), _w(rng, "c1.b", 6), _w(rng, "c2.w", 16, 6, 3, 3), _w(rng, "c2.b", 16),
             _w(rng, "fc.w", 16 * 13 * 13, 10, s=0.05), _w(rng, "fc.b", 10), _w(rng, "aux.w", 6, 10, s=0.5),
             _w(rng, "aux.b", 10)]
    x = "image"
    nodes = []
    if nhwc:
        nodes.append(h.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2], name="to_nchw"))
        x = "nchw"
    nodes += [
        h.make_node("Conv", [x, "c1.w", "c1.b"], ["c1"], kernel_shape=[3, 3], name="conv1"),
        h.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        h.make_node("AveragePool", ["r1"], ["pool"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
        h.make_node("Conv", ["pool", "c2.w", "c2.b"], ["c2"], kernel_shape=[3, 3], name="conv2"),
        h.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        h.make_node("Flatten", ["r2"], ["flat"], axis=1, name="flatten"),
        h.make_node("MatMul", ["flat", "fc.w"], ["mm"], name="fc"),
        h.make_node("Add", ["mm", "fc.b"], ["logits" if activation else "probs"], name="fc_bias"),
        h.make_node("GlobalAveragePool", ["pool"], ["aux_pool"], name="aux_pool"),
        h.make_node("Flatten", ["aux_pool"], ["aux_flat"], axis=1, name="aux_flatten"),
        h.make_node("MatMul", ["aux_flat", "aux.w"], ["aux_mm"], name="aux_fc"),
        h.make_node("Add", ["aux_mm", "aux.b"], ["aux_logits" if aux_activation else "aux"], name="aux_bias"),
    ]
    if activation:
        attrs = {} if activation == "Sigmoid" else {"axis": 1 if opset < 13 else -1}
        nodes.append(h.make_node(activation, ["logits"], ["probs"], name="final_act", **attrs))
    if aux_activation:
        attrs = {} if aux_activation == "Sigmoid" else {"axis": 1 if opset < 13 else -1}
        nodes.append(h.make_node(aux_activation, ["aux_logits"], ["aux"], name="aux_act", **attrs))
    shape = [batch, 32, 32, 3] if nhwc else [batch, 3, 32, 32]
    g = h.make_graph(nodes, "cnn", [h.make_tensor_value_info("image", T.FLOAT, shape)],
                     [h.make_tensor_value_info("probs", T.FLOAT, [batch, 10]),
                      h.make_tensor_value_info("aux", T.FLOAT, [batch, 10])], inits)
    opset_id = h.make_opsetid("", opset)
    m = h.make_model(g, opset_imports=[opset_id], ir_version=max(h.find_min_ir_version_for([opset_id]), 4))
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, path)
    return path


def qdq_cnn(directory: Path, seed: int = 3) -> Path:
    """A CNN quantized with ``onnxruntime.quantization.quantize_static`` (QDQ format, per-channel int8
    weights, uint8 activations), with two exit heads inside the model: three conv blocks (``pool1``
    [N, 16, 16, 16], ``pool2`` [N, 32, 8, 8]), final ``logits`` [N, 10], heads ``aux0`` (from pool1) and ``aux1``
    (from pool2). Returns the QDQ model's path (the float model is ``model_fp32.onnx`` beside it)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(seed)
    inits = [_w(rng, "c1.w", 16, 3, 3, 3), _w(rng, "c1.b", 16, s=0.05), _w(rng, "c2.w", 32, 16, 3, 3, s=0.1),
             _w(rng, "c2.b", 32, s=0.05), _w(rng, "c3.w", 32, 32, 3, 3, s=0.1), _w(rng, "c3.b", 32, s=0.05),
             _w(rng, "fc.w", 10, 32), _w(rng, "fc.b", 10), _w(rng, "h0.w", 10, 16), _w(rng, "h0.b", 10),
             _w(rng, "h1.w", 10, 32), _w(rng, "h1.b", 10)]
    nodes = []
    x = "input"
    for i, (c, pool) in enumerate([("c1", "pool1"), ("c2", "pool2")], start=1):
        nodes += [h.make_node("Conv", [x, f"{c}.w", f"{c}.b"], [f"conv{i}"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                  h.make_node("Relu", [f"conv{i}"], [f"relu{i}"]),
                  h.make_node("MaxPool", [f"relu{i}"], [pool], kernel_shape=[2, 2], strides=[2, 2])]
        x = pool
    nodes += [h.make_node("Conv", ["pool2", "c3.w", "c3.b"], ["conv3"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
              h.make_node("Relu", ["conv3"], ["relu3"]), h.make_node("GlobalAveragePool", ["relu3"], ["gap3"]),
              h.make_node("Flatten", ["gap3"], ["flat3"]),
              h.make_node("Gemm", ["flat3", "fc.w", "fc.b"], ["logits"], transB=1)]
    for k, src in enumerate(["pool1", "pool2"]):
        nodes += [h.make_node("GlobalAveragePool", [src], [f"h{k}_gap"]), h.make_node("Flatten", [f"h{k}_gap"], [f"h{k}_flat"]),
                  h.make_node("Gemm", [f"h{k}_flat", f"h{k}.w", f"h{k}.b"], [f"aux{k}"], transB=1)]
    outs = [h.make_tensor_value_info(n, T.FLOAT, ["batch", 10]) for n in ("logits", "aux0", "aux1")]
    g = h.make_graph(nodes, "qcnn", [h.make_tensor_value_info("input", T.FLOAT, ["batch", 3, 32, 32])], outs, inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(m, full_check=True)
    fp32, out = directory / "model_fp32.onnx", directory / "model_qdq.onnx"
    onnx.save(m, fp32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(8)])

        def get_next(self) -> dict | None:
            return next(self.it, None)

    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def dequantized(model: Path, tensor: str) -> tuple[str, str]:
    """(QuantizeLinear output, DequantizeLinear output) of the Q/DQ pair quantize_static put after ``tensor``."""
    g = onnx.load(str(model)).graph
    q = next(n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
    dq = next(n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
    return q.output[0], dq.output[0]


def fp16_cnn(path: Path, seed: int = 2) -> Path:
    """:func:`small_cnn` (no final activation) converted to float16 with float32 inputs and outputs, the way
    ``onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)`` writes it (Casts at
    the edges, fp16 weights and activations inside)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    fp32 = path.with_name(path.stem + "_fp32.onnx")
    small_cnn(fp32, activation=None, seed=seed)
    onnx.save(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True), path)
    return path


GRU_D, GRU_H, GRU_C = 6, 8, 4


def gru_loop(path: Path, seed: int = 10) -> Path:
    """A recurrent layer written as an ONNX Loop the way tf2onnx emits a TF GRU/while-loop: no trip count (the
    body computes its condition from the outer sequence length), the body reads the time-major sequence, the
    weights and a per-sample context vector from the outer scope and carries ``h``, whose initial value is
    zeros built from the batch size (Shape -> Gather -> ConstantOfShape). Input ``x`` [B, T, 6]; outputs
    ``logits`` [B, 4] (from the last ``h``) and ``aux0`` [B, 4] (an exit head from ``ctx``, before the Loop).
    Per sample: 2*T*6*8 FLOPs before the Loop, T*2*(2*8*8) in it, 2*8*4 per head."""
    rng = np.random.default_rng(seed)
    d, hh, c = GRU_D, GRU_H, GRU_C

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return nh.from_array((rng.standard_normal(shape) * 0.4).astype(np.float32), name)

    inits = [w("Wp", d, hh), w("bp", hh), w("Wx", hh, hh), w("Wh", hh, hh), w("bh", hh), w("Wo", hh, c), w("bo", c),
             w("Wa", hh, c), w("ba", c), nh.from_array(np.array([0], np.int64), "zero1"),
             nh.from_array(np.array([hh], np.int64), "hsize"), nh.from_array(np.array(1, np.int64), "one"),
             nh.from_array(np.array(True), "true")]
    body = h.make_graph(
        [h.make_node("Gather", ["xt", "i"], ["x_i"], axis=0),
         h.make_node("MatMul", ["x_i", "Wx"], ["a1"]), h.make_node("MatMul", ["h_prev", "Wh"], ["a2"]),
         h.make_node("Add", ["a1", "a2"], ["a3"]), h.make_node("Add", ["a3", "bh"], ["a4"]),
         h.make_node("Add", ["a4", "ctx"], ["a5"]), h.make_node("Tanh", ["a5"], ["h_new"]),
         h.make_node("Identity", ["h_new"], ["y_t"]), h.make_node("Add", ["i", "one"], ["i1"]),
         h.make_node("Less", ["i1", "seqlen"], ["cond_out"])],
        "gru_body",
        [h.make_tensor_value_info("i", T.INT64, []), h.make_tensor_value_info("cond_in", T.BOOL, []),
         h.make_tensor_value_info("h_prev", T.FLOAT, ["B", hh])],
        [h.make_tensor_value_info("cond_out", T.BOOL, []), h.make_tensor_value_info("h_new", T.FLOAT, ["B", hh]),
         h.make_tensor_value_info("y_t", T.FLOAT, ["B", hh])])
    nodes = [
        h.make_node("MatMul", ["x", "Wp"], ["xp0"]), h.make_node("Add", ["xp0", "bp"], ["xp1"]),
        h.make_node("Relu", ["xp1"], ["xr"]),
        h.make_node("ReduceMean", ["xr"], ["ctx"], axes=[1], keepdims=0),
        h.make_node("Transpose", ["xr"], ["xt"], perm=[1, 0, 2]),
        h.make_node("Shape", ["x"], ["xs"]), h.make_node("Gather", ["xs", "one"], ["seqlen"], axis=0),
        h.make_node("Gather", ["xs", "zero1"], ["bdim"], axis=0),
        h.make_node("Concat", ["bdim", "hsize"], ["h0shape"], axis=0),
        h.make_node("ConstantOfShape", ["h0shape"], ["h0"], value=nh.from_array(np.array([0.0], np.float32))),
        h.make_node("Loop", ["", "true", "h0"], ["h_last", "ys"], body=body, name="while_loop"),
        h.make_node("MatMul", ["h_last", "Wo"], ["o0"]), h.make_node("Add", ["o0", "bo"], ["logits"]),
        h.make_node("MatMul", ["ctx", "Wa"], ["q0"]), h.make_node("Add", ["q0", "ba"], ["aux0"]),
    ]
    g = h.make_graph(nodes, "tf2onnx_gru_loop", [h.make_tensor_value_info("x", T.FLOAT, ["unk__B", "unk__T", d])],
                     [h.make_tensor_value_info("logits", T.FLOAT, ["unk__B", c]),
                      h.make_tensor_value_info("aux0", T.FLOAT, ["unk__B", c])], inits)
    m = h.make_model(g, producer_name="tf2onnx", opset_imports=[h.make_opsetid("", 12)])
    m.ir_version = 7
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, path)
    return path


def shape_read_cnn(path: Path, merged: bool = False, seed: int = 6) -> Path:
    """A CNN whose flattening Reshape takes the batch size from ``Shape(r1)[0]`` of an early feature map, the
    way exporters write ``h.view(h.shape[0], -1)`` with the shape read merged onto one tensor. Input ``x``
    [N, 3, 16, 16]; ``r1`` [N, 8, 16, 16], ``r2`` [N, 8, 8, 8] (a cut there leaves ``r1`` read after it only by
    the Shape node); output ``logits`` [N, 10], exit head ``aux`` [N, 10] from ``r2``. ``merged``: the head
    branch before the cut reads the same ``Shape(r1)[0]`` (one Shape node feeding both sides of the cut)."""
    rng = np.random.default_rng(seed)
    inits = [_w(rng, "c1.w", 8, 3, 3, 3), _w(rng, "c2.w", 8, 8, 3, 3), _w(rng, "fc.w", 8 * 8 * 8, 10, s=0.05),
             _w(rng, "aux.w", 8, 10), nh.from_array(np.array([0], np.int64), "zero"),
             nh.from_array(np.array([-1], np.int64), "minus1")]
    nodes = [
        h.make_node("Conv", ["x", "c1.w"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c1"], ["r1"]),
        h.make_node("Conv", ["r1", "c2.w"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        h.make_node("Relu", ["c2"], ["r2"]),
        h.make_node("Shape", ["r1"], ["r1_shape"]),
        h.make_node("Gather", ["r1_shape", "zero"], ["batch"], axis=0),
        h.make_node("Concat", ["batch", "minus1"], ["flat_shape"], axis=0),
        h.make_node("Reshape", ["r2", "flat_shape"], ["flat"]),
        h.make_node("MatMul", ["flat", "fc.w"], ["logits"]),
        h.make_node("GlobalAveragePool", ["r2"], ["gap"]),
    ]
    if merged:
        nodes += [h.make_node("Reshape", ["gap", "flat_shape"], ["gap_flat"]),
                  h.make_node("MatMul", ["gap_flat", "aux.w"], ["aux"])]
    else:
        nodes += [h.make_node("Flatten", ["gap"], ["gap_flat"]), h.make_node("MatMul", ["gap_flat", "aux.w"], ["aux"])]
    g = h.make_graph(nodes, "shape_read", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 16, 16])],
                     [h.make_tensor_value_info("logits", T.FLOAT, ["N", 10]),
                      h.make_tensor_value_info("aux", T.FLOAT, ["N", 10])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, path)
    return path


def yolo_detector(path: Path, seed: int = 4) -> Path:
    """A small YOLOv3-style detector exported from torch at batch 1 (the traced batch size baked into the
    Reshape targets [1, 3, 9, H, W]), with nearest Upsample -> Resize (opset 11), a Concat skip and three
    outputs: ``cls`` [1, 4], ``det_small`` [1, 3, 8, 8, 9], ``det_big`` [1, 3, 16, 16, 9] (sigmoid), plus an exit
    head ``aux0`` [1, 4] from ``/c1/c1.1/LeakyRelu_output_0`` [1, 16, 16, 16]. Input ``images`` [1, 3, 32, 32]."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    na, no = 3, 9

    class Det(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.LeakyReLU(0.1))
            self.c2 = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.LeakyReLU(0.1))
            self.p_small = nn.Conv2d(32, na * no, 1)
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.mix = nn.Sequential(nn.Conv2d(48, 16, 3, 1, 1), nn.LeakyReLU(0.1))
            self.p_big = nn.Conv2d(16, na * no, 1)
            self.cls = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))
            self.aux = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))

        def forward(self, x):  # noqa: ANN001, ANN202
            a = self.c1(x)
            b = self.c2(a)
            bs, _, ny, nx = b.shape
            s = self.p_small(b).view(bs, na, no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            m = self.mix(torch.cat([self.up(b), a], 1))
            bs2, _, ny2, nx2 = m.shape
            g = self.p_big(m).view(bs2, na, no, ny2, nx2).permute(0, 1, 3, 4, 2).contiguous()
            return self.cls(b), torch.sigmoid(s), torch.sigmoid(g), self.aux(a)

    torch.onnx.export(Det().eval(), (torch.randn(1, 3, 32, 32),), str(path), input_names=["images"],
                      output_names=["cls", "det_small", "det_big", "aux0"], opset_version=11, dynamo=False)
    return path


def _drop_output(path: Path, name: str) -> Path:
    """``path`` rewritten without the graph output ``name`` (the tensor stays, as an intermediate)."""
    m = onnx.load(str(path))
    keep = [o for o in m.graph.output if o.name != name]
    del m.graph.output[:]
    m.graph.output.extend(keep)
    onnx.save(m, path)
    return path


def crnn_time_major(path: Path, seed: int = 11, n_classes: int = 7) -> Path:
    """A CTC text recogniser (conv + two bidirectional LSTMs, exported from torch without ``batch_first``)
    whose outputs are time-major: ``logits`` [T=16, B, 7] and the exit head ``aux0`` [16, B, 7] from ``r1``
    (the first LSTM's output, [16, B, 32]); the batch is axis 1. Input ``image`` [B, 1, 8, 32]."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class CRNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cnn = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2),
                                     nn.Conv2d(16, 32, 3, 1, 1), nn.ReLU(), nn.MaxPool2d((4, 1)))
            self.rnn1 = nn.LSTM(32, 16, bidirectional=True)
            self.rnn2 = nn.LSTM(32, 16, bidirectional=True)
            self.out = nn.Linear(32, n_classes)
            self.aux = nn.Linear(32, n_classes)

        def forward(self, x):  # noqa: ANN001, ANN202
            f = self.cnn(x).squeeze(2).permute(2, 0, 1)  # [T, B, 32]
            r1, _ = self.rnn1(f)
            r2, _ = self.rnn2(r1)
            return self.out(r2), self.aux(r1), r1

    torch.onnx.export(CRNN().eval(), (torch.randn(2, 1, 8, 32),), str(path), input_names=["image"],
                      output_names=["logits", "aux0", "r1"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {1: "batch"}, "aux0": {1: "batch"},
                                    "r1": {1: "batch"}}, opset_version=12, dynamo=False)
    return _drop_output(path, "r1")  # r1 named as an output only to give it that name


def flag_if(path: Path, seed: int = 2) -> Path:
    """A batch-first CNN whose If condition is a graph input ``use_branch`` bool[1] with no batch axis (like the
    ``use_cache_branch`` flag of merged decoder exports); both branches read tensors from before the cut ``r2``
    (then: r2 + r1, else: r2 * r1 - r1). Input ``x`` [batch, 3, H, W]; outputs ``logits`` [batch, 10] and the
    exit head ``aux0`` [batch, 10] from ``r2``. Feed the flag once: ``use_branch = np.array([True])``."""
    rng = np.random.default_rng(seed)

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return nh.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    inits = [w("w1", 8, 3, 3, 3), w("b1", 8), w("w2", 8, 8, 3, 3), w("b2", 8), w("fw", 10, 8), w("fb", 10),
             w("aw", 10, 8), w("ab", 10)]
    then_g = h.make_graph([h.make_node("Add", ["r2", "r1"], ["t_out"])], "then", [],
                          [h.make_tensor_value_info("t_out", T.FLOAT, None)])
    else_g = h.make_graph([h.make_node("Mul", ["r2", "r1"], ["e_mul"]), h.make_node("Sub", ["e_mul", "r1"], ["e_out"])],
                          "else", [], [h.make_tensor_value_info("e_out", T.FLOAT, None)])
    nodes = [
        h.make_node("Squeeze", ["use_branch"], ["cond"], name="sq"),
        h.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        h.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        h.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        h.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        h.make_node("If", ["cond"], ["mix"], then_branch=then_g, else_branch=else_g, name="if_branch"),
        h.make_node("GlobalAveragePool", ["mix"], ["gp"], name="gap"),
        h.make_node("Flatten", ["gp"], ["fl"], name="flat"),
        h.make_node("Gemm", ["fl", "fw", "fb"], ["logits"], transB=1, name="fc"),
        h.make_node("GlobalAveragePool", ["r2"], ["agp"], name="aux_gap"),
        h.make_node("Flatten", ["agp"], ["afl"], name="aux_flat"),
        h.make_node("Gemm", ["afl", "aw", "ab"], ["aux0"], transB=1, name="aux_fc"),
    ]
    g = h.make_graph(nodes, "flag_if", [h.make_tensor_value_info("x", T.FLOAT, ["batch", 3, "H", "W"]),
                                        h.make_tensor_value_info("use_branch", T.BOOL, [1])],
                     [h.make_tensor_value_info("logits", T.FLOAT, ["batch", 10]),
                      h.make_tensor_value_info("aux0", T.FLOAT, ["batch", 10])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, path)
    return path


def lstm_classifier(path: Path, seed: int = 7) -> Path:
    """A sequence classifier exported from torch: Linear -> two batch-first LSTMs (torch writes a Transpose
    around each ONNX LSTM) -> the last step -> Linear. Input ``x`` [b, t, 8]; output ``y`` [b, 5]."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Linear(8, 16)
            self.l1 = nn.LSTM(16, 16, batch_first=True)
            self.l2 = nn.LSTM(16, 16, batch_first=True)
            self.fc = nn.Linear(16, 5)

        def forward(self, x):  # noqa: ANN001, ANN202
            h1, _ = self.l1(torch.relu(self.emb(x)))
            h2, _ = self.l2(h1)
            return self.fc(h2[:, -1])

    torch.onnx.export(M().eval(), (torch.randn(2, 6, 8),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b", 1: "t"}, "y": {0: "b"}}, opset_version=14, dynamo=False)
    return path


def lstm_time_major_input(path: Path, seed: int = 3, time_major_output: bool = False, steps: int = 120) -> Path:
    """A recogniser that takes its input time-major, ``x`` [time, batch, 6] (both symbolic, the batch on axis 1),
    as torch code without ``batch_first`` does: Conv1d over time -> bidirectional LSTM (``r1``, named through
    the output list, [time, batch, 24]) -> LSTM. ``time_major_output``: outputs ``logits`` and the exit head
    ``aux0`` are per step, [time, batch, 5] (CTC-style); else ``logits`` [batch, 5] from the last step and
    ``aux0`` [batch, 5] from the mean of ``r1`` over time. Trained for ``steps`` small steps first."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(6, 16, 3, padding=1)
            self.rnn1 = nn.LSTM(16, 12, bidirectional=True)
            self.rnn2 = nn.LSTM(24, 12)
            self.out = nn.Linear(12, 5)
            self.aux = nn.Linear(24, 5)

        def forward(self, x):  # noqa: ANN001, ANN202
            f = torch.relu(self.conv(x.permute(1, 2, 0))).permute(2, 0, 1)  # [T, B, 16]
            r1, _ = self.rnn1(f)
            r2, _ = self.rnn2(r1)
            if time_major_output:
                return self.out(r2), self.aux(r1), r1
            return self.out(r2[-1]), self.aux(r1.mean(0)), r1

    # A short training run (random weights give one class for every input): the class is the channel with
    # the largest sum over time (per step: the largest running sum), so predictions vary and heads can learn.
    model = M()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(9, 32, 6, generator=gen)
        y = x[..., :5].cumsum(0).argmax(-1)  # [T, B]
        logits, aux, _ = model(x)
        if not time_major_output:
            y = y[-1]
        loss = nn.functional.cross_entropy(logits.reshape(-1, 5), y.reshape(-1)) + \
            nn.functional.cross_entropy(aux.reshape(-1, 5), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    tb = {0: "time", 1: "batch"}
    out_axes = tb if time_major_output else {0: "batch"}
    torch.onnx.export(model.eval(), (torch.randn(9, 2, 6),), str(path), input_names=["x"],
                      output_names=["logits", "aux0", "r1"],
                      dynamic_axes={"x": tb, "logits": out_axes, "aux0": out_axes, "r1": tb},
                      opset_version=14, dynamo=False)
    return _drop_output(path, "r1")  # r1 named as an output only to give it that name
