"""The compaction invariant on compiled third-party graphs, for random thresholds: each sample's output from
`compact` equals its output when every sample is forced to exit at that sample's exit ("always" there,
"never" before), and `wait-all` gives the same outputs as `compact`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_head, write_spec, zoo_model
from test_compile_models import _feeds

import eecompile

pytestmark = pytest.mark.slow  # real graphs (model zoo, torch exports)

CASES = {
    # name: (model getter key, cuts, head feature shapes, classes, gates, final)
    "squeezenet": ([("r11", [1, 16, 7, 7]), ("r26", [1, 32, 7, 7]), ("r48", [1, 64, 7, 7])], 1000,
                   ["max_prob", "margin", "entropy"], {"class_axis": 1}),
    "resnet": ([("/layers.0/Relu_1_output_0", [1, 16, 32, 32]), ("/layers.2/Relu_1_output_0", [1, 32, 16, 16])],
               10, ["max_prob", "patience"], None),
    "bert": ([("/layers.0/ln2/LayerNormalization_output_0", [1, 8, 32]),
              ("/layers.1/ln2/LayerNormalization_output_0", [1, 8, 32]),
              ("/layers.2/ln2/LayerNormalization_output_0", [1, 8, 32])], 3, ["entropy", "patience", "margin"], None),
}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, torch_model) -> dict[str, tuple[Path, Path]]:
    out = {}
    for name, (cuts, n, gates, final) in CASES.items():
        d = tmp_path_factory.mktemp(name)
        model = zoo_model(name) if name == "squeezenet" else torch_model(name)
        exits = [{"at": t, "head": str(make_head(d / f"h{i}.onnx", s, n, opset=9 if name == "squeezenet" else 17,
                                                 seed=i, scale=0.5)),
                  "gate": {"kind": g, "threshold": 2 if g == "patience" else 0.5}}
                 for i, ((t, s), g) in enumerate(zip(cuts, gates, strict=True))]
        spec = write_spec(d, model, exits, final)
        out[name] = (model, eecompile.compile_model(spec, d / "b.eebundle").path)
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_compact_equals_forced_exit_and_wait_all(name: str, bundles) -> None:
    model, bundle = bundles[name]
    runner = eecompile.load(bundle)
    n_exits = runner.manifest.n_early_exits
    feeds = _feeds(model, 8, seed=3)
    never = runner.run(feeds, thresholds="never", policy="never")
    rng = np.random.default_rng(0)
    for trial in range(4):
        # Thresholds at random quantiles of each gate's scores, so that some samples leave at each exit.
        thr = []
        for k in range(n_exits):
            kind = runner.manifest.segments[k].exit.gate.kind
            s = never.gate_scores[k]
            thr.append(float(2.0 if kind == "patience" else np.quantile(s, rng.uniform(0.2, 0.8))))
        compact = runner.run(feeds, thresholds=thr, policy="compact")
        wait = runner.run(feeds, thresholds=thr, policy="wait-all")
        np.testing.assert_array_equal(compact.exit_index, wait.exit_index)
        for key in compact.outputs:
            np.testing.assert_array_equal(compact.outputs[key], wait.outputs[key])
        assert compact.exit_counts.sum() == 8
        for i in range(8):
            k = int(compact.exit_index[i])
            forced = ["never"] * n_exits
            if k < n_exits:
                forced[k] = "always"
            one = runner.run(feeds, thresholds=forced, policy="compact")
            for key in compact.outputs:
                np.testing.assert_allclose(compact.outputs[key][i], one.outputs[key][i], rtol=1e-5, atol=1e-6)
        if trial == 0 and name != "resnet":
            assert len(set(compact.exit_index.tolist())) > 1, "thresholds should split the batch"
