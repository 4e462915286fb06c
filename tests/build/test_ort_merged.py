"""ORT CPU engines cut from one optimised graph of the chain: the fusions of the unsplit model survive the cuts,
the results equal the portable chain's, ``compile`` builds them by default, and a changed segment never runs on
an engine built from its old version."""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from click.testing import CliRunner
from conftest import make_head, write_spec

import eecompile
from eecompile.build import build_engines, ort_merged
from eecompile.bundle import Bundle
from eecompile.cli import cli
from eecompile.inspect import describe_bundle
from eecompile.runtimes import onnxruntime as ortrt
from eecompile.runtimes.chain import EarlyExitRunner
from eecompile.runtimes.records import engine_records

# The tests' small torch ResNet: the first cut feeds a projection block, the others identity residuals (a Sum
# reads the segment input: the case per-segment optimisation cannot fuse).
CUTS = ["/layers.0/Relu_1_output_0", "/layers.2/Relu_1_output_0", "/layers.3/Relu_1_output_0"]
SHAPES = [[1, 16, 32, 32], [1, 32, 16, 16], [1, 64, 8, 8]]


def _spec(d: Path, model: Path) -> Path:
    exits = [{"at": c, "head": str(make_head(d / f"h{i}.onnx", s, 10, seed=i, scale=0.5)),
              "gate": {"kind": "max_prob", "threshold": 0.5}} for i, (c, s) in enumerate(zip(CUTS, SHAPES, strict=True))]
    return write_spec(d, model, exits)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory, torch_model: Callable[[str], Path]) -> tuple[Path, Path]:
    """(bundle compiled with engines=True, the source model)."""
    d = tmp_path_factory.mktemp("ort_merged")
    model = torch_model("resnet")
    return eecompile.compile_model(_spec(d, model), d / "m.eebundle", engines=True).path, model


@pytest.fixture
def bundle(compiled: tuple[Path, Path], tmp_path: Path) -> Path:
    dst = tmp_path / "m.eebundle"
    shutil.copytree(compiled[0], dst)
    return dst


def _x(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"image": np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)}


def _fused_sums(model: onnx.ModelProto) -> int:
    """NCHWc Convs that took a residual Sum in (their 4th input)."""
    return sum(1 for n in model.graph.node
               if n.op_type == "Conv" and n.domain == "com.microsoft.nchwc" and len(n.input) > 3 and n.input[3])


def _optimised(src: Path, dst: Path) -> onnx.ModelProto:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return onnx.load(str(dst))


def test_compile_builds_merged_engines_that_keep_the_unsplit_fusions(compiled: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    path, model = compiled
    m = Bundle.load(path).manifest
    recs = engine_records(m, "onnxruntime", ortrt.cpu_target())
    assert [r.segment for r in recs] == [0, 1, 2, 3]
    assert {r.flags["method"] for r in recs} == {"merged"}
    assert [r.flags["segment_sha256"] for r in recs] == [m.files[s.file] for s in m.segments]
    if ortrt.nchwc_block_size() == 1:
        pytest.skip("this CPU's ONNX Runtime does not use NCHWc")
    engines = [onnx.load(str(path / str(r.file))) for r in recs]
    unsplit = _optimised(model, tmp_path / "unsplit.opt.onnx")
    per_segment = [_optimised(path / s.file, tmp_path / f"s{s.index}.opt.onnx") for s in m.segments]
    # Per-segment optimisation loses the residual fusions whose Sum reads a segment input; the merged engines don't.
    assert sum(map(_fused_sums, engines)) == _fused_sums(unsplit) > sum(map(_fused_sums, per_segment))
    ops = Counter(n.op_type for e in engines for n in e.graph.node)
    assert ops["ReorderInput"] == 0 and ops["Sum"] == 0
    # Each cut tensor crosses blocked: the producer outputs it, the consumer takes it, nobody converts it.
    block = ortrt.nchwc_block_size()
    for k, cut in enumerate(CUTS):
        name = f"{cut}.nchwc{block}"
        assert name in [o.name for o in engines[k].graph.output]
        assert [i.name for i in engines[k + 1].graph.input][0] == name
        assert recs[k].flags["outputs"][cut] == recs[k + 1].flags["inputs"][cut]


@pytest.mark.parametrize("policy", ["compact", "wait-all", "never"])
def test_merged_engines_match_the_portable_chain(compiled: tuple[Path, Path], policy: str) -> None:
    path, _ = compiled
    eng = EarlyExitRunner(path)
    port = EarlyExitRunner(path, engines=False)
    assert eng.backend.engine_target == ortrt.cpu_target()  # type: ignore[attr-defined]
    x = _x(20, seed=3)
    scores = port.run(x, policy="never").gate_scores
    assert scores is not None
    thr = [float(np.median(s)) for s in scores]
    a, b = eng.run(x, thresholds=thr, policy=policy), port.run(x, thresholds=thr, policy=policy)
    np.testing.assert_array_equal(a.exit_index, b.exit_index)
    np.testing.assert_allclose(a.outputs["logits"], b.outputs["logits"], rtol=1e-5, atol=1e-6)
    assert len(set(a.exit_index.tolist())) > 1


@pytest.mark.parametrize("policy", ["compact", "wait-all"])
def test_no_gate_firing_runs_the_no_exit_engine_with_the_chains_outputs(compiled: tuple[Path, Path],
                                                                        policy: str) -> None:
    """When no gate can fire, the runner runs the no-exit engine (the chain without heads and gates, one ORT
    graph) by itself; its outputs are the final exit's, as the segments give them and as the unsplit model does."""
    path, model = compiled
    m = Bundle.load(path).manifest
    ne = (engine_records(m, "onnxruntime", ortrt.cpu_target())[-1].flags.get("no_exit") or {})
    assert ne.get("outputs") == dict(m.segments[-1].exit.outputs) and (path / ne["file"]).is_file()
    graph = onnx.load(str(path / ne["file"]))
    assert [o.name for o in graph.graph.output] == ["logits"]
    assert not {i.name for i in graph.graph.input} - {"image"}  # no threshold inputs: no gates in it
    eng = EarlyExitRunner(path)
    assert eng.backend.has_no_exit  # type: ignore[attr-defined]
    x = _x(7, seed=4)
    unsplit = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, x)[0]
    seen: list[tuple[int, list[int]]] = []
    for thr in ("never", [float("inf")] * 3, ["never", float("inf"), "never"]):
        a = eng.run(x, thresholds=thr, policy=policy, on_exit=lambda k, rows, _o: seen.append((k, rows.tolist())))
        b = eng.run(x, thresholds=thr, policy=policy, no_exit_path=False)
        c = EarlyExitRunner(path, engines=False).run(x, thresholds=thr, policy=policy)
        assert (a.path, b.path, c.path) == ("no-exit", "chain", "chain")
        for r in (b, c):
            np.testing.assert_allclose(a.outputs["logits"], r.outputs["logits"], rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(a.exit_index, r.exit_index)
            np.testing.assert_array_equal(a.exit_counts, r.exit_counts)
            np.testing.assert_array_equal(a.nonfinite_counts, r.nonfinite_counts)
        np.testing.assert_allclose(a.outputs["logits"], unsplit, rtol=1e-4, atol=1e-5)
    assert seen == [(3, list(range(7)))] * 3
    # A gate that can fire, or policy never (every exit's outputs), runs the segments.
    assert eng.run(x, thresholds=[0.5, "never", "never"], policy=policy).path == "chain"
    assert eng.run(x, thresholds="never", policy="never").path == "chain"
    assert EarlyExitRunner(path, no_exit_path=False).run(x, thresholds="never", policy=policy).path == "chain"


def test_refused_merge_falls_back_to_per_segment_engines(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a: object, **_k: object) -> None:
        raise ort_merged.MergeRefused("a reason for the test")

    monkeypatch.setattr(ort_merged, "build_merged", refuse)
    report = build_engines(bundle, "onnxruntime")
    assert {r.flags["method"] for r in report.records} == {"per-segment"}
    assert "a reason for the test" in report.notes[0]
    assert not any(r.flags.get("no_exit") for r in report.records)
    assert not list((bundle / "engines").glob("noexit.*"))  # the merged build's no-exit engine went with it
    assert not EarlyExitRunner(bundle).backend.has_no_exit  # type: ignore[attr-defined]
    x = _x(6)
    got = EarlyExitRunner(bundle).run(x, thresholds=[0.5] * 3).outputs["logits"]
    want = EarlyExitRunner(bundle, engines=False).run(x, thresholds=[0.5] * 3).outputs["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_engine_of_a_changed_segment_is_ignored(bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An engine record names the segment it was built from; after the segment changes, the portable one runs."""
    doc = yaml.safe_load((bundle / "manifest.yaml").read_text())
    for d in doc["engines"]:
        if d["segment"] == 2:
            d["flags"]["segment_sha256"] = "0" * 64
    (bundle / "manifest.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    with caplog.at_level(logging.WARNING, logger="eecompile.runtimes.onnxruntime"):
        runner = EarlyExitRunner(bundle)
    assert runner.backend.engine_target is None  # type: ignore[attr-defined]
    assert any("older version of the segment" in r.getMessage() for r in caplog.records)


def test_replacing_a_head_rebuilds_the_engines(bundle: Path, tmp_path: Path) -> None:
    from eecompile.replace_heads import replace_heads

    m = Bundle.load(bundle).manifest
    # A record for another CPU, built from the current segments: it goes stale with the head too.
    other = dict(next(d for d in m.engines if d["segment"] == 1))
    other_doc = yaml.safe_load((bundle / "manifest.yaml").read_text())
    other_doc["engines"].append({**other, "target": "ort0.9-nchwc4"})
    (bundle / "manifest.yaml").write_text(yaml.safe_dump(other_doc, sort_keys=False))
    head = onnx.load(str(make_head(tmp_path / "new.onnx", SHAPES[1], 10, seed=9, scale=0.5)))
    replace_heads(bundle, {1: head})
    # The head file kept in the bundle is the head as given (it loads and reads the cut tensor).
    kept = ort.InferenceSession(str(bundle / "heads" / "exit1.onnx"), providers=["CPUExecutionProvider"])
    assert kept.run(None, {kept.get_inputs()[0].name: np.zeros(SHAPES[1], np.float32)})[0].shape == (1, 10)
    m2 = Bundle.load(bundle).manifest
    recs = engine_records(m2, "onnxruntime", ortrt.cpu_target())
    assert [r.flags["segment_sha256"] for r in recs] == [m2.files[s.file] for s in m2.segments]
    assert m2.files[m2.segments[1].file] != m.files[m.segments[1].file]
    assert not engine_records(m2, "onnxruntime", "ort0.9-nchwc4")
    x = _x(6)
    eng = EarlyExitRunner(bundle)
    assert eng.backend.engine_target == ortrt.cpu_target()  # type: ignore[attr-defined]
    a = eng.run(x, thresholds="never", policy="never")
    b = EarlyExitRunner(bundle, engines=False).run(x, thresholds="never", policy="never")
    assert a.all_exits is not None and b.all_exits is not None
    np.testing.assert_allclose(a.all_exits[1]["logits"], b.all_exits[1]["logits"], rtol=1e-5, atol=1e-6)


def test_cli_compile_builds_engines_unless_told_not_to(tmp_path: Path, torch_model: Callable[[str], Path]) -> None:
    spec = _spec(tmp_path, torch_model("resnet"))
    res = CliRunner().invoke(cli, ["compile", str(spec), "-o", str(tmp_path / "a.eebundle")])
    assert res.exit_code == 0, res.output
    assert f"engines ({ortrt.cpu_target()})" in res.output
    assert engine_records(Bundle.load(tmp_path / "a.eebundle").manifest, "onnxruntime", ortrt.cpu_target())
    res = CliRunner().invoke(cli, ["compile", str(spec), "-o", str(tmp_path / "b.eebundle"), "--no-engines"])
    assert res.exit_code == 0, res.output
    assert not Bundle.load(tmp_path / "b.eebundle").manifest.engines


def _hf_bert(path: Path, layers: int = 3) -> dict[str, np.ndarray]:
    """A small random-weight BERT from transformers (eager attention: the pattern ORT's fuser knows)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=100, max_position_embeddings=16, num_labels=3)
    cfg._attn_implementation = "eager"
    model = transformers.BertForSequenceClassification(cfg).eval()

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=ids, attention_mask=mask).logits

    rng = np.random.default_rng(0)
    mask = np.ones((6, 8), np.int64)
    mask[1, 5:] = 0
    mask[4, 3:] = 0
    feeds = {"input_ids": rng.integers(0, 100, (6, 8)).astype(np.int64), "attention_mask": mask}
    with torch.no_grad():
        torch.onnx.export(Logits().eval(), tuple(torch.from_numpy(v[:2]) for v in feeds.values()), str(path),
                          input_names=list(feeds), output_names=["logits"],
                          dynamic_axes={n: {0: "batch"} for n in [*feeds, "logits"]}, opset_version=17, dynamo=False)
    return feeds


def test_encoder_engines_run_on_fused_attention(tmp_path: Path) -> None:
    from eecompile.compiler import analyze_model

    feeds = _hf_bert(tmp_path / "bert.onnx")
    cuts = analyze_model(tmp_path / "bert.onnx").suggested[:2]
    assert len(cuts) == 2
    exits = [{"at": c, "head": {"kind": "linear"}, "gate": {"kind": "max_prob", "threshold": 0.5}} for c in cuts]
    path = eecompile.compile_model(write_spec(tmp_path, tmp_path / "bert.onnx", exits), tmp_path / "b.eebundle",
                                   engines=True).path
    m = Bundle.load(path).manifest
    recs = engine_records(m, "onnxruntime", ortrt.cpu_target())
    assert {r.flags["method"] for r in recs} == {"merged"}
    assert recs[0].flags["transformer_fusions"]["Attention"] == 3  # one per layer, of the whole chain
    ops = Counter(n.op_type for r in recs for n in onnx.load(str(path / str(r.file))).graph.node)
    assert ops["Attention"] == 3 and ops["Softmax"] <= len(m.segments)  # the heads' own Softmax may remain
    eng, port = EarlyExitRunner(path), EarlyExitRunner(path, engines=False)
    assert eng.backend.engine_target == ortrt.cpu_target()  # type: ignore[attr-defined]
    a = eng.run(feeds, thresholds="never", policy="never")
    b = port.run(feeds, thresholds="never", policy="never")
    assert a.all_exits is not None and b.all_exits is not None
    for ea, eb in zip(a.all_exits, b.all_exits, strict=True):
        np.testing.assert_allclose(ea["logits"], eb["logits"], rtol=1e-4, atol=1e-5)


def test_engines_built_into_the_user_cache_leave_the_bundle_untouched(bundle: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`build --cache`: this machine's engines go to the user's cache (keyed by target and segment hashes); the
    bundle's files and manifest stay byte for byte; the runner finds them, checks their sha256, and runs them."""
    monkeypatch.setenv("EECOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    doc = yaml.safe_load((bundle / "manifest.yaml").read_text())
    doc["engines"] = []  # as if built elsewhere: no engines for this machine in the bundle
    for f in [f for f in doc["files"] if f.startswith("engines/")]:
        (bundle / f).unlink()
        del doc["files"][f]
    (bundle / "manifest.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    before = {p.relative_to(bundle): p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    assert EarlyExitRunner(bundle).backend.engine_target is None  # type: ignore[attr-defined]
    assert describe_bundle(bundle)["engine_cache"] is None
    res = CliRunner().invoke(cli, ["build", str(bundle), "--backend", "onnxruntime", "--cache"])
    assert res.exit_code == 0, res.output
    assert {p.relative_to(bundle): p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == before
    where = ortrt.engine_cache_dir(Bundle.load(bundle).manifest)
    assert (where / ortrt.ENGINE_CACHE_INDEX).is_file() and tmp_path / "cache" in where.parents
    # `inspect` says where they are instead of "none built".
    assert describe_bundle(bundle)["engine_cache"] == str(where)
    shown = CliRunner().invoke(cli, ["inspect", str(bundle)])
    assert "engines outside the bundle (`build --cache`)" in shown.output and "none built" not in shown.output
    eng = EarlyExitRunner(bundle)
    assert eng.backend.engine_target == ortrt.cpu_target() and eng.backend.has_no_exit  # type: ignore[attr-defined]
    x = _x(5, seed=2)
    port = EarlyExitRunner(bundle, engines=False)
    for thr in ([0.5] * 3, "never"):
        np.testing.assert_allclose(eng.run(x, thresholds=thr).outputs["logits"],
                                   port.run(x, thresholds=thr).outputs["logits"], rtol=1e-5, atol=1e-6)
    # A changed cached file is refused (sha256 checked before loading): the portable segments run.
    victim = next((where / "engines").glob("seg1.*"))
    victim.write_bytes(victim.read_bytes() + b"\0")
    assert EarlyExitRunner(bundle).backend.engine_target is None  # type: ignore[attr-defined]


def test_a_gate_score_that_is_nan_in_both_chains_still_merges(tmp_path: Path) -> None:
    """A head file of zeros makes a change gate's score 0/0 = NaN on every row, in the engines and the portable
    chain alike; the comparison took that for a difference of NaN and built each segment on its own."""
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        net (float[N, 8] x) => (float[N, 8] y) <float[8, 8] w1 = {""" + ", ".join(["0.1"] * 64) + """},
                                                float[8, 8] w2 = {""" + ", ".join(["0.2"] * 64) + """}> {
            m = MatMul(x, w1)
            h = Relu(m)
            y = MatMul(h, w2)
        }""")
    onnx.save(model, tmp_path / "model.onnx")
    head = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        zero (float[N, 8] f) => (float[N, 8] out) <float[8, 8] w = {""" + ", ".join(["0"] * 64) + """}> {
            out = MatMul(f, w)
        }""")
    onnx.save(head, tmp_path / "head.onnx")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "model": "model.onnx", "final": {"output": "y", "task": "regression"},
        "exits": [{"at": "h", "head": "head.onnx", "gate": {"kind": "change", "threshold": 0.1}}]}))
    b = eecompile.compile_model(tmp_path / "spec.yaml", tmp_path / "b.eebundle", engines=True)
    assert b.manifest.engines and all(e["flags"]["method"] == "merged" for e in b.manifest.engines), b.manifest.notes
