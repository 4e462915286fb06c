"""``python -m benchmarks.qdq_carry``: bytes carried across each boundary of a quantized (QDQ) CNN, float cut
vs QDQ cut, for the same exits.

The graph is the tests' static QDQ CNN (``tests/graphs/builders.py``: ``onnxruntime.quantization.
quantize_static``, uint8 activations, exits after its first two conv blocks). Compiled twice: its float model
(``model_fp32.onnx``, cut at the block outputs) and the QDQ model (cut at the DequantizeLinear outputs, which
the compiler carries as the 8-bit QuantizeLinear outputs). Figures are bytes per sample read off the bundles'
manifests (shape x dtype size of every carried tensor), and the ratio float / QDQ; the QDQ chain with no exit
is also checked to equal the quantized model. Writes ``results/qdq_carry.json``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent


def _bytes_per_sample(bundle) -> list[int]:  # noqa: ANN001 - an eecompile Bundle
    out = []
    for seg in bundle.manifest.segments[:-1]:
        total = 0
        for t in seg.outputs:
            if t.name in seg.carried_out:
                dims = [d for i, d in enumerate(t.shape) if i != t.batch_axis]
                total += int(np.prod(dims)) * np.dtype(t.dtype).itemsize
        out.append(total)
    return out


def main() -> dict:
    import onnxruntime as ort

    import eecompile
    from tests.graphs.builders import dequantized, qdq_cnn

    work = Path(tempfile.mkdtemp(prefix="eecompile-qdq-"))
    qdq = qdq_cnn(work)
    fp32 = work / "model_fp32.onnx"
    rows = {}
    for label, model, cuts in [("float cut (fp32 model)", fp32, ["pool1", "pool2"]),
                               ("QDQ cut (quantized model)", qdq,
                                [dequantized(qdq, "pool1")[1], dequantized(qdq, "pool2")[1]])]:
        spec = work / f"{model.stem}.yaml"
        spec.write_text(yaml.safe_dump({"model": str(model), "final": {"output": "logits"}, "exits": [
            {"at": c, "head": {"output": f"aux{k}"}, "gate": {"kind": "max_prob", "threshold": 0.9}}
            for k, c in enumerate(cuts)]}))
        b = eecompile.compile_model(spec, work / f"{model.stem}.eebundle")
        rows[label] = {"bytes_per_sample": _bytes_per_sample(b),
                       "carried": [s.carried_out for s in b.manifest.segments[:-1]]}
        if model == qdq:
            x = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
            ref = ort.InferenceSession(str(qdq), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[0]
            got = eecompile.load(b.path).run({"input": x}, thresholds="never").outputs["logits"]
            rows[label]["max_abs_diff_vs_model"] = float(np.abs(got - ref).max())
    f, q = (rows[k]["bytes_per_sample"] for k in rows)
    result = {"graph": "tests/graphs/builders.py:qdq_cnn", "rows": rows,
              "ratio_float_over_qdq": [round(a / b, 3) for a, b in zip(f, q, strict=True)]}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "qdq_carry.json").write_text(json.dumps(result, indent=1) + "\n")
    print("| cut | boundary 0 bytes/sample | boundary 1 bytes/sample |")
    print("|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['bytes_per_sample'][0]} | {r['bytes_per_sample'][1]} |")
    print(f"float / QDQ: {result['ratio_float_over_qdq']}")
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    main()
