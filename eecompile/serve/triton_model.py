"""The Python-backend model of a Triton repository written by ``eecompile export triton``.

Triton's Python backend loads ``model.py`` from the model's version directory; the one written there imports
:class:`TritonPythonModel` from here. The model reads its bundle (``bundle/`` beside ``model.py``) and runs
eecompile's chain runner on the requests that Triton's dynamic batcher hands it, one runner call per batch,
with one of two segment backends (config parameter ``segments``):

* ``bls``: each segment is its own Triton model (ONNX Runtime or TensorRT backend) called through Business
  Logic Scripting; the runner's loop stops early when every sample has exited (what an ensemble cannot do);
* ``in-process``: the segments run on ONNX Runtime inside this Python process (hosts without those backends).

Triton's Python environment needs numpy, pyyaml, eecompile and (in-process) onnxruntime.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from eecompile.bundle import Bundle
from eecompile.errors import BackendError, EECompileError
from eecompile.runtimes.base import SegmentBackend
from eecompile.serve.batching import Answer, group_requests, run_group
from eecompile.serve.decoding import DecodeScheduler, RowSink
from eecompile.serve.protocol import PredictRequest, check_arrays, thresholds_of

EXIT_INDEX = "exit_index"


class TritonBLSBackend(SegmentBackend):
    """Runs segment ``k`` as the Triton model ``models[k]`` through BLS (``pb_utils.InferenceRequest``)."""

    name = "triton-bls"

    def __init__(self, bundle: Bundle, models: list[str], pb_utils: Any) -> None:
        super().__init__(bundle)
        self.models = models
        self.pb = pb_utils

    def run_segment(self, index: int, feeds: dict[str, Any], threshold: float | None) -> dict[str, Any]:
        seg = self.manifest.segments[index]
        inputs = [self.pb.Tensor(name, np.ascontiguousarray(a)) for name, a in feeds.items()]
        if threshold is not None and seg.exit.gate is not None:  # dims [1] in the config, reshaped to a scalar
            inputs.append(self.pb.Tensor(seg.exit.gate.threshold_input, np.array([threshold], np.float32)))
        names = [t.name for t in seg.outputs]
        response = self.pb.InferenceRequest(model_name=self.models[index], requested_output_names=names,
                                            inputs=inputs).exec()
        if response.has_error():
            raise BackendError(f"segment {index} ({self.models[index]}): {response.error().message()}")
        return {n: self.pb.get_output_tensor_by_name(response, n).as_numpy() for n in names}

    def to_host(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def from_host(self, x: np.ndarray) -> Any:
        return x

    def gather(self, x: Any, rows: np.ndarray, axis: int) -> Any:
        return np.take(x, rows, axis=axis)


class TritonPythonModel:
    """Triton's Python-backend entry points: ``initialize``, ``execute``, ``finalize``."""

    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        from eecompile import load
        from eecompile.runtimes.chain import EarlyExitRunner

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        here = Path(args["model_repository"]) / args["model_version"]
        bundle = Bundle.load(here / "bundle")
        self.decoder: TritonDecoder | None = None
        if params.get("kind") == "decoder":
            self.decoder = TritonDecoder(bundle, pb_utils, int(params.get("max_rows", "8")),
                                         int(params.get("threads", "0")) or None)
            return
        if params.get("segments") == "bls":
            models = json.loads(params["segment_models"])
            self.runner = EarlyExitRunner(bundle, backend=TritonBLSBackend(bundle, models, pb_utils))
        else:
            threads = int(params.get("threads", "0")) or None
            self.runner = load(bundle.path, backend="onnxruntime", **({"threads": threads} if threads else {}))
        self.outputs = [t.name for t in bundle.manifest.outputs]
        self.end_only = list(bundle.manifest.end_only)

    def execute(self, requests: list[Any]) -> list[Any] | None:
        if self.decoder is not None:
            self.decoder.execute(requests)
            return None  # decoupled: the responses go out through each request's response sender
        pb = self.pb
        parsed: list[PredictRequest | None] = []
        errors: list[str | None] = []
        for request in requests:
            try:
                raw = {t.name: pb.get_input_tensor_by_name(request, t.name).as_numpy() for t in self.runner.inputs}
                feeds, n = check_arrays(raw, self.runner.inputs)
                params = json.loads(request.parameters() or "{}")
                thresholds = thresholds_of(params.get("thresholds"), self.runner.manifest.n_early_exits)
                parsed.append(PredictRequest(feeds, n, thresholds, as_npz=True))
                errors.append(None)
            except EECompileError as e:
                parsed.append(None)
                errors.append(str(e))
        answers: dict[int, Answer] = {}
        good = [i for i, p in enumerate(parsed) if p is not None]
        requests_ok: list[PredictRequest] = [p for p in parsed if p is not None]
        for group in group_requests(requests_ok, self.runner.inputs):  # one runner call per thresholds
            members = [good[j] for j in group]

            def done(j: int, answer: Answer, members: list[int] = members) -> None:
                answers[members[j]] = answer

            try:
                run_group(self.runner, [requests_ok[j] for j in group], done)
            except EECompileError as e:
                for i in members:
                    errors[i] = str(e)
        responses = []
        for i in range(len(requests)):
            if errors[i] is not None or i not in answers:
                responses.append(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(errors[i] or "no answer")))
                continue
            a = answers[i]
            assert a.exit_index is not None  # only a loop's answer has none (export triton refuses loop bundles)
            tensors = [pb.Tensor(name, np.ascontiguousarray(a.outputs[name])) for name in self.outputs]
            tensors.append(pb.Tensor(EXIT_INDEX, a.exit_index.reshape(-1, 1).astype(np.int64)))
            for name in self.end_only:  # BOOL [n, 1]: True where the sample reached the final exit (else NaN rows)
                mask = a.present[name][0] if name in a.present else np.ones(len(a.exit_index), bool)
                tensors.append(pb.Tensor(f"present.{name}", mask.reshape(-1, 1).astype(bool)))
            responses.append(pb.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        if self.decoder is not None:
            self.decoder.scheduler.close()
            return
        self.runner.close()


class TritonDecoder:
    """A decoder bundle in a decoupled Python model: one :class:`~eecompile.serve.decoding.DecodeScheduler` (its
    own thread steps the running batch); each request streams ``output_ids``/``text`` of every step that gave
    it tokens (``finished`` false), then one response with every token, the full text, ``finished`` true and
    ``result`` (the row object of ``POST /v1/generate`` as JSON), flagged final. Options besides the prompt and
    ``max_new_tokens`` ride as request parameters (``mode``, ``thresholds``, ``draft_tokens``, ``sample``,
    ``temperature``, ``seed``). A refused request gets one error response, flagged final."""

    def __init__(self, bundle: Bundle, pb_utils: Any, max_rows: int, threads: int | None) -> None:
        from eecompile.runtimes.lm import DecoderRunner

        self.pb = pb_utils
        self.runner = DecoderRunner(bundle, threads=threads)
        self.scheduler = DecodeScheduler(self.runner, max_batch=max_rows)

    def execute(self, requests: list[Any]) -> None:
        from eecompile.serve.protocol import generate_request

        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for request in requests:
            sender = request.get_response_sender()
            try:
                doc: dict[str, Any] = json.loads(request.parameters() or "{}")
                for name in ("prompt", "token_ids", "max_new_tokens"):
                    t = self.pb.get_input_tensor_by_name(request, name)
                    if t is None:
                        continue
                    a = t.as_numpy().reshape(-1)
                    if name == "prompt":
                        doc[name] = a[0].decode() if isinstance(a[0], bytes) else str(a[0])
                    elif name == "token_ids":
                        doc[name] = [int(v) for v in a]
                    else:
                        doc[name] = int(a[0])
                doc.pop("stream", None)
                if isinstance(doc.get("thresholds"), str):  # "0.9,never" as for the chain model
                    doc["thresholds"] = list(thresholds_of(doc["thresholds"], len(self.runner.exits)) or [])
                sink = _TritonSink(self.pb, sender, self.scheduler)
                sink.ticket = self.scheduler.submit(generate_request(doc, len(self.runner.exits)), sink)
            except EECompileError as e:
                sender.send(self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(str(e))),
                            flags=final)


class _TritonSink(RowSink):
    """Sends a request's tokens through its response sender (called on the scheduler's thread); a request the
    client cancelled (``response_sender.is_cancelled()``) has its row dropped at the next step."""

    def __init__(self, pb: Any, sender: Any, scheduler: DecodeScheduler) -> None:
        self.pb, self.sender, self.scheduler = pb, sender, scheduler
        self.ticket: Any = None
        self.cancelled = False

    def _send(self, ids: list[int], text: str, finished: bool, result: str, flags: int = 0) -> None:
        pb = self.pb
        tensors = [pb.Tensor("output_ids", np.asarray(ids, np.int64)),
                   pb.Tensor("text", np.array([text.encode()], dtype=np.object_)),
                   pb.Tensor("finished", np.array([finished])),
                   pb.Tensor("result", np.array([result.encode()], dtype=np.object_))]
        self.sender.send(pb.InferenceResponse(output_tensors=tensors), flags=flags)

    def admitted(self) -> None:
        pass

    def tokens(self, token_ids: list[int], text: str | None) -> None:
        if self.cancelled:
            return
        if self.ticket is not None and self.sender.is_cancelled():
            self.cancelled = True
            self.scheduler.cancel(self.ticket)
            return
        self._send(token_ids, text or "", False, "")

    def finished(self, result: dict[str, Any]) -> None:
        self._send(result["token_ids"], result["text"], True, json.dumps(result),
                   flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def failed(self, error: BaseException) -> None:
        self.sender.send(self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(str(error))),
                         flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
