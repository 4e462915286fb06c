"""``eecompile export triton``: a Triton Inference Server model repository for a bundle.

Two layouts (``segments``):

* ``bls`` (default): every segment is a model of Triton's ONNX Runtime backend (``NAME_seg{k}/1/model.onnx``;
  with ``engines="tensorrt"`` on GPU instances through that backend's TensorRT execution accelerator), and the
  Python-backend model ``NAME`` chains them with Business Logic Scripting: it runs eecompile's chain runner
  with a backend that calls the segment models, so the chain stops as soon as every sample of the batch has
  exited — the conditional stop an ensemble cannot express;
* ``in-process``: only the Python model ``NAME``, running the segments on ONNX Runtime inside the Python
  backend (hosts whose Triton lacks the ONNX Runtime and TensorRT backends).

A decoder bundle becomes one decoupled Python model ``NAME`` (:func:`decoder_config`): each request's row joins
the model's running decode batch between steps (:mod:`eecompile.serve.decoding`) and streams a response per
step that confirmed tokens for it, the last one flagged final.

``NAME`` takes the model's inputs (batch axis first), and optionally the request parameter ``thresholds``
(``"0.9,never"``: one per early exit), and answers the final outputs plus ``exit_index`` (INT64, one per sample); Triton's dynamic batcher gathers requests for it (``max_batch_size``,
``max_queue_delay_microseconds``), and each model has an instance group. Segment models see whole
tensors (``max_batch_size: 0``): batching happens once, in front of the chain, and compaction shrinks the batch
from segment to segment. Triton has no scalar tensors in a model without batching, so each segment graph's
scalar threshold input becomes shape [1] followed by a Reshape to [] (the bundle's prebuilt TensorRT plans take
the scalar, which is why TensorRT runs through the ONNX Runtime backend's accelerator here). Config files follow Triton's ``model_config.proto`` (checked with its own parser in the tests).

The repository is written to a temporary directory beside ``output`` and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eecompile.bundle import Bundle, TensorInfo
from eecompile.errors import BundleError, DataError
from eecompile.runtimes.base import check_classifier_bundle

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "int64": "TYPE_INT64",
                "int32": "TYPE_INT32", "int16": "TYPE_INT16", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8",
                "bool": "TYPE_BOOL", "bfloat16": "TYPE_BF16"}
SEP = ",\n"
MODEL_PY = '''"""Written by `eecompile export triton`: the model is eecompile.serve.triton_model.TritonPythonModel
(Triton's Python environment needs numpy, pyyaml, eecompile and, in process, onnxruntime)."""

from eecompile.serve.triton_model import TritonPythonModel  # noqa: F401
'''


@dataclass
class TritonExport:
    """What was written: the repository, the chain model's name and every model directory."""

    repository: Path
    model: str
    models: list[str] = field(default_factory=list)
    segment_backend: str = "in-process"
    notes: list[str] = field(default_factory=list)


def _dtype(t: TensorInfo, where: str) -> str:
    if t.dtype not in TRITON_TYPES:
        raise BundleError(f"{where}: tensor '{t.name}' has dtype {t.dtype}, which Triton has no type for")
    return TRITON_TYPES[t.dtype]


def _dims(t: TensorInfo, drop_batch: bool) -> list[int]:
    return [d if isinstance(d, int) and d > 0 else -1 for i, d in enumerate(t.shape)
            if not (drop_batch and i == t.batch_axis)]


def _tensor(t: TensorInfo, where: str, drop_batch: bool = False) -> str:
    dims = ", ".join(str(d) for d in _dims(t, drop_batch))
    return f'  {{\n    name: {json.dumps(t.name)}\n    data_type: {_dtype(t, where)}\n    dims: [ {dims} ]\n  }}'


def _instances(count: int, kind: str) -> str:
    return f"instance_group [\n  {{\n    count: {count}\n    kind: {kind}\n  }}\n]\n"


def segment_config(bundle: Bundle, k: int, model: str, tensorrt: bool, instances: int) -> str:
    """config.pbtxt of segment ``k`` as a model of Triton's ``onnxruntime`` backend (with its TensorRT
    execution accelerator on GPU instances when ``tensorrt``)."""
    seg = bundle.manifest.segments[k]
    where = f"segment {k}"
    inputs = [_tensor(t, where) for t in seg.inputs]
    if seg.exit.gate is not None:
        inputs.append(f"  {{\n    name: {json.dumps(seg.exit.gate.threshold_input)}\n    data_type: TYPE_FP32\n"
                      f"    dims: [ 1 ]\n  }}")
    outputs = [_tensor(t, where) for t in seg.outputs]
    kind = "KIND_GPU" if tensorrt else "KIND_CPU"
    accel = ("optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [ { name: \"tensorrt\" } ]\n"
             "  }\n}\n") if tensorrt else ""
    return (f"name: {json.dumps(model)}\nbackend: \"onnxruntime\"\nmax_batch_size: 0\n"
            f"input [\n{SEP.join(inputs)}\n]\noutput [\n{SEP.join(outputs)}\n]\n{_instances(instances, kind)}{accel}")


def triton_segment_graph(path: Path, threshold_input: str | None) -> bytes:
    """The segment graph with its scalar threshold input made shape [1] (Triton has no scalar tensors in a
    model without batching): the input is renamed inside and a Reshape to [] restores the scalar."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    if threshold_input is None:
        return model.SerializeToString()
    g = model.graph
    inner = f"{threshold_input}.scalar"
    for node in g.node:
        node.input[:] = [inner if i == threshold_input else i for i in node.input]
    for vi in g.input:
        if vi.name == threshold_input:
            vi.CopyFrom(helper.make_tensor_value_info(threshold_input, TensorProto.FLOAT, [1]))
    shape = f"{threshold_input}.scalar_shape"
    g.initializer.append(numpy_helper.from_array(np.zeros(0, np.int64), shape))
    g.node.insert(0, helper.make_node("Reshape", [threshold_input, shape], [inner], name=f"{threshold_input}/reshape"))
    return model.SerializeToString()


def chain_config(bundle: Bundle, model: str, segments: str, segment_models: list[str], max_batch_size: int,
                 queue_delay_us: int, instances: int, threads: int | None) -> str:
    """config.pbtxt of the Python-backend model that runs the chain."""
    m = bundle.manifest
    batched = max_batch_size > 0 and all(t.batch_axis == 0 for t in [*m.inputs, *m.outputs])
    inputs = [_tensor(t, "model input", drop_batch=batched) for t in m.inputs]
    exit_index = TensorInfo("exit_index", "int64", ["batch", 1], 0)
    present = [TensorInfo(f"present.{name}", "bool", ["batch", 1], 0) for name in m.end_only]  # rows it has
    outputs = [_tensor(t, "model output", drop_batch=batched) for t in [*m.outputs, exit_index, *present]]
    params = {"segments": segments, "segment_models": json.dumps(segment_models)}
    if threads:
        params["threads"] = str(threads)
    parameters = "".join(f"parameters: {{\n  key: {json.dumps(k)}\n  value: {{ string_value: {json.dumps(v)} }}\n}}\n"
                         for k, v in params.items())
    batching = (f"max_batch_size: {max_batch_size}\ndynamic_batching {{\n  max_queue_delay_microseconds: "
                f"{queue_delay_us}\n}}\n") if batched else "max_batch_size: 0\n"
    return (f"name: {json.dumps(model)}\nbackend: \"python\"\n{batching}input [\n{SEP.join(inputs)}\n]\n"
            f"output [\n{SEP.join(outputs)}\n]\n{_instances(instances, 'KIND_CPU')}{parameters}")


def decoder_config(model: str, max_rows: int, instances: int, threads: int | None) -> str:
    """config.pbtxt of a decoder bundle's model: Python backend, decoupled (a stream of responses per request).

    Inputs (each optional, one of ``prompt`` / ``token_ids`` given): ``prompt`` (BYTES [1], text),
    ``token_ids`` (INT64 [-1]), ``max_new_tokens`` (INT32 [1]); the other options ride as request parameters.
    Outputs: ``output_ids`` (INT64 [-1]), ``text`` (BYTES [1]), ``finished`` (BOOL [1]), ``result`` (BYTES [1],
    the final row object as JSON; empty before)."""
    def tensor(name: str, dtype: str, dims: str, optional: bool = False) -> str:
        opt = "\n    optional: true" if optional else ""
        return f"  {{\n    name: {json.dumps(name)}\n    data_type: {dtype}\n    dims: [ {dims} ]{opt}\n  }}"

    inputs = [tensor("prompt", "TYPE_STRING", "1", True), tensor("token_ids", "TYPE_INT64", "-1", True),
              tensor("max_new_tokens", "TYPE_INT32", "1", True)]
    outputs = [tensor("output_ids", "TYPE_INT64", "-1"), tensor("text", "TYPE_STRING", "1"),
               tensor("finished", "TYPE_BOOL", "1"), tensor("result", "TYPE_STRING", "1")]
    params = {"kind": "decoder", "max_rows": str(max_rows)}
    if threads:
        params["threads"] = str(threads)
    parameters = "".join(f"parameters: {{\n  key: {json.dumps(k)}\n  value: {{ string_value: {json.dumps(v)} }}\n}}\n"
                         for k, v in params.items())
    return (f"name: {json.dumps(model)}\nbackend: \"python\"\nmax_batch_size: 0\n"
            f"model_transaction_policy {{\n  decoupled: true\n}}\ninput [\n{SEP.join(inputs)}\n]\n"
            f"output [\n{SEP.join(outputs)}\n]\n{_instances(instances, 'KIND_CPU')}{parameters}")


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


REPOSITORY_MARKER = ".eecompile-triton"  # at the repository root (Triton loads only the model directories)


def export_triton(bundle_path: str | Path, output: str | Path, *, name: str | None = None,
                  segments: str = "bls", max_batch_size: int = 32, queue_delay_us: int = 1000,
                  instances: int = 1, engines: str = "onnxruntime", threads: int | None = None, force: bool = False) -> TritonExport:
    """Write the model repository (see the module docstring). ``engines``: ``onnxruntime`` (CPU instances) or
    ``tensorrt`` (GPU instances, ONNX Runtime's TensorRT accelerator); bls only.

    Raises DataError for bad options or an existing ``output`` without ``force``; BundleError for a damaged
    bundle or a tensor dtype Triton has no type for."""
    if segments not in ("bls", "in-process"):
        raise DataError(f"--segments '{segments}': use bls or in-process")
    if engines not in ("onnxruntime", "tensorrt"):
        raise DataError(f"--engines '{engines}': use onnxruntime or tensorrt")
    if max_batch_size < 0 or queue_delay_us < 0 or instances < 1:
        raise DataError("--max-batch-size and --queue-delay-us must be >= 0, --instances >= 1")
    bundle = Bundle.load(bundle_path)
    m = bundle.manifest
    decoder = m.decoder is not None
    if decoder and engines != "onnxruntime":
        raise DataError(f"--engines {engines}: a decoder bundle is exported as one Python model decoding on ONNX "
                        f"Runtime in process (its key/value caches stay in that process); use --engines onnxruntime")
    if decoder:
        segments = "in-process"
    else:
        check_classifier_bundle(bundle, "eecompile export triton")
    name = name or bundle.path.name.split(".")[0].replace("-", "_") or "eecompile"
    output = Path(output)
    out, src = output.resolve(), bundle.path.resolve()
    if out == src or src in out.parents or out in src.parents:
        raise DataError(f"{output}: {'is' if out == src else 'inside' if src in out.parents else 'holds'} the bundle "
                        f"{bundle.path}; the repository must not overlap it: choose an -o path outside the bundle")
    if output.exists() and not force:
        raise DataError(f"{output}: already exists; pass --force to replace it")
    if output.exists() and not (output.is_dir() and (output / REPOSITORY_MARKER).is_file()):
        # --force replaces a repository this command wrote, never an arbitrary file or directory of the user's
        raise DataError(f"{output}: exists and is not a model repository written by `eecompile export triton` "
                        f"(no {REPOSITORY_MARKER} in it); --force only replaces those: remove it yourself or "
                        f"choose another -o path")
    if not output.parent.is_dir():
        raise DataError(f"{output.parent}: directory does not exist; create it or choose another -o path")
    seg_models = [f"{name}_seg{k}" for k in range(len(m.segments))] if segments == "bls" else []
    result = TritonExport(output, name, [name, *seg_models], "decoupled generate" if decoder else segments)
    if decoder:
        result.notes.append(f"decoder bundle: one decoupled Python model; requests join its running batch of at "
                            f"most {max_batch_size or 1} rows between decode steps and stream their tokens")
    elif not (max_batch_size > 0 and all(t.batch_axis == 0 for t in [*m.inputs, *m.outputs])):
        result.notes.append("no dynamic batching: an input or output has no batch axis first")
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        chain_dir = tmp / name / "1"
        chain_dir.mkdir(parents=True)
        shutil.copytree(bundle.path, chain_dir / "bundle", copy_function=_link_or_copy)
        (chain_dir / "model.py").write_text(MODEL_PY)
        (tmp / REPOSITORY_MARKER).write_text(f"written by eecompile export triton from {bundle.path.name}\n")
        (tmp / name / "config.pbtxt").write_text(
            decoder_config(name, max_batch_size or 1, instances, threads) if decoder else
            chain_config(bundle, name, segments, seg_models, max_batch_size, queue_delay_us, instances, threads))
        for k, model in enumerate(seg_models):
            d = tmp / model / "1"
            d.mkdir(parents=True)
            gate = m.segments[k].exit.gate
            graph = triton_segment_graph(bundle.verify_file(m.segments[k].file), gate.threshold_input if gate else None)
            (d / "model.onnx").write_bytes(graph)
            (tmp / model / "config.pbtxt").write_text(
                segment_config(bundle, k, model, engines == "tensorrt", instances))
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result
