"""A stand-in for Triton's ONNX Runtime backend, for the tests (the bundled tritonserver has the Python backend
only): a Python-backend model that runs its ``model.onnx`` on ONNX Runtime, with the segment's own config."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        here = Path(args["model_repository"]) / args["model_version"]
        self.session = ort.InferenceSession(str(here / "model.onnx"), providers=["CPUExecutionProvider"])
        self.inputs = [(i.name, len(i.shape)) for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        responses = []
        for request in requests:
            feeds = {}
            for name, rank in self.inputs:
                a = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                feeds[name] = a.reshape(()) if rank == 0 else a
            values = self.session.run(self.outputs, feeds)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(n, np.ascontiguousarray(v)) for n, v in zip(self.outputs, values, strict=True)]))
        return responses
