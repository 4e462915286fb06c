"""`eecompile export triton` against a real tritonserver (the one the nvidia-pytriton wheel bundles: Python
backend only), with tritonclient over HTTP and gRPC, answers compared with the local runner.

* in-process repository: served as written;
* bls repository: its configs parsed by Triton's own ``model_config.proto`` parser and loaded by the server
  (the segment models fail only for the backend this server lacks); then served with each segment model's
  backend swapped for a Python stand-in that runs the same ``model.onnx`` on ONNX Runtime, so the BLS chain
  (loop, compaction, early stop) runs for real inside Triton.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.serve.conftest import free_ports, mixed_inputs
from tests.serve.triton_env import TritonServer, triton_env

pytestmark = pytest.mark.slow
STANDIN = Path(__file__).with_name("ort_standin_model.py")


@pytest.fixture(scope="module")
def env():
    return triton_env()


@pytest.fixture(scope="module")
def local(served_bundle):
    import eecompile

    with eecompile.load(served_bundle) as r:
        yield r


def _export(bundle: Path, out: Path, segments: str) -> Path:
    from click.testing import CliRunner

    from eecompile.cli import cli

    result = CliRunner().invoke(cli, ["export", "triton", str(bundle), "-o", str(out), "--segments", segments,
                                      "--name", "ee", "--max-batch-size", "16", "--queue-delay-us", "20000"])
    assert result.exit_code == 0, result.output
    return out


def _ports() -> tuple[int, int, int]:
    return free_ports(3)


def _check_answers(server: TritonServer, local) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    xs = [mixed_inputs(n, seed=40 + i) for i, n in enumerate([1, 3, 2, 1, 4, 1, 2, 1])]

    def call(args: tuple[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        i, x = args
        if i % 2:
            c = httpclient.InferenceServerClient(f"127.0.0.1:{server.http}")
            inp = httpclient.InferInput("image", list(x.shape), "FP32")
        else:
            c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
            inp = grpcclient.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        r = c.infer("ee", [inp])
        return r.as_numpy("logits"), r.as_numpy("exit_index")

    with ThreadPoolExecutor(8) as pool:  # concurrent: the dynamic batcher hands several requests at once
        answers = list(pool.map(call, enumerate(xs)))
    seen = set()
    for x, (logits, exit_index) in zip(xs, answers, strict=True):
        want = local.run({"image": x})
        np.testing.assert_array_equal(exit_index.reshape(-1), want.exit_index)
        np.testing.assert_allclose(logits, want.outputs["logits"], rtol=1e-4, atol=1e-5)
        seen |= set(want.exit_index.tolist())
    assert seen == {0, 1, 2}


def _same_graph_but_threshold(exported: Path, original: Path, seg) -> None:
    """The exported segment computes what the bundle's does, with the threshold fed as shape [1]."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    a = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"])
    feeds = {t.name: rng.standard_normal([3 if i == t.batch_axis else d for i, d in enumerate(t.shape)])
             .astype(t.dtype) for t in seg.inputs}
    gate = seg.exit.gate
    fa = {**feeds, **({gate.threshold_input: np.array([0.3], np.float32)} if gate else {})}
    fb = {**feeds, **({gate.threshold_input: np.array(0.3, np.float32)} if gate else {})}
    for x, y in zip(a.run(None, fa), b.run(None, fb), strict=True):
        np.testing.assert_array_equal(x, y)


def test_in_process_repository_on_tritonserver(env, served_bundle, local, tmp_path) -> None:
    repo = _export(served_bundle, tmp_path / "repo", "in-process")
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == ["ee"]
    with TritonServer(env, repo, _ports(), tmp_path / "triton.log") as server:
        _check_answers(server, local)
        import tritonclient.http as httpclient

        c = httpclient.InferenceServerClient(f"127.0.0.1:{server.http}")
        bad = httpclient.InferInput("image", [1, 3, 16, 32], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3, 16, 32), np.float32))
        with pytest.raises(Exception, match=r"unexpected shape|expects \[B, 3, 32, 32\]"):
            c.infer("ee", [bad])
        x = mixed_inputs(4, seed=5)
        inp = httpclient.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        r = c.infer("ee", [inp], parameters={"thresholds": "never,never"})  # per request, as in /v1/predict
        assert r.as_numpy("exit_index").reshape(-1).tolist() == [2] * 4
        r = c.infer("ee", [inp], parameters={"thresholds": "always,0.5"})
        assert r.as_numpy("exit_index").reshape(-1).tolist() == [0] * 4
        with pytest.raises(Exception, match="give one per exit"):
            c.infer("ee", [inp], parameters={"thresholds": "0.5,0.5,0.5"})


def test_bls_repository_structure_and_tritons_parser(served_bundle, tmp_path) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    import eecompile

    repo = _export(served_bundle, tmp_path / "repo", "bls")
    m = eecompile.Bundle.load(served_bundle).manifest
    names = ["ee", *[f"ee_seg{k}" for k in range(len(m.segments))]]
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == sorted(names)
    assert (repo / ".eecompile-triton").is_file()  # what lets --force replace it later
    configs = {}
    for name in names:
        cfg = model_config_pb2.ModelConfig()
        text_format.Parse((repo / name / "config.pbtxt").read_text(), cfg)  # Triton's own schema
        configs[name] = cfg
        assert cfg.name == name and cfg.instance_group[0].count == 1
    chain = configs["ee"]
    assert chain.backend == "python" and chain.max_batch_size == 16
    assert chain.dynamic_batching.max_queue_delay_microseconds == 20000
    assert [o.name for o in chain.output] == ["logits", "exit_index"]
    params = {k: v.string_value for k, v in chain.parameters.items()}
    assert params["segments"] == "bls" and json.loads(params["segment_models"]) == names[1:]
    for k, seg in enumerate(m.segments):
        cfg = configs[f"ee_seg{k}"]
        assert cfg.backend == "onnxruntime" and cfg.max_batch_size == 0
        _same_graph_but_threshold(repo / f"ee_seg{k}" / "1" / "model.onnx", served_bundle / seg.file, seg)
        assert [i.name for i in cfg.input][:len(seg.inputs)] == [t.name for t in seg.inputs]
        assert {o.name for o in cfg.output} == {t.name for t in seg.outputs}
        if seg.exit.gate is not None:
            thr = cfg.input[-1]
            assert thr.name == seg.exit.gate.threshold_input and list(thr.dims) == [1]


def test_bls_repository_loads_on_tritonserver(env, served_bundle, tmp_path) -> None:
    """The chain model is ready; the segments fail only for want of the onnxruntime backend in this build."""
    repo = _export(served_bundle, tmp_path / "repo", "bls")
    names = sorted(p.name for p in repo.iterdir() if p.is_dir())
    with TritonServer(env, repo, _ports(), tmp_path / "triton.log", exit_on_error=False) as server:
        import tritonclient.http as httpclient

        c = httpclient.InferenceServerClient(f"127.0.0.1:{server.http}")
        import time

        deadline = time.time() + 60
        index = []
        while time.time() < deadline:
            index = c.get_model_repository_index()
            if all(e.get("state") in ("READY", "UNAVAILABLE") for e in index) and len(index) == len(names):
                break
            time.sleep(0.5)
        states = {e["name"]: (e.get("state"), e.get("reason", "")) for e in index}
        assert states["ee"][0] == "READY", server.tail()
        for name in [n for n in names if n != "ee"]:
            state, reason = states[name]
            assert state == "UNAVAILABLE" and "onnxruntime" in reason, (name, reason)


def test_bls_chain_on_tritonserver_with_standin_segments(env, served_bundle, local, tmp_path) -> None:
    repo = _export(served_bundle, tmp_path / "repo", "bls")
    for seg in sorted(repo.glob("ee_seg*")):
        cfg = seg / "config.pbtxt"
        cfg.write_text(cfg.read_text().replace('backend: "onnxruntime"', 'backend: "python"'))
        shutil.copy(STANDIN, seg / "1" / "model.py")
    with TritonServer(env, repo, _ports(), tmp_path / "triton.log") as server:
        _check_answers(server, local)


def test_export_refuses_to_overwrite(served_bundle, tmp_path) -> None:
    from click.testing import CliRunner

    from eecompile.cli import cli

    repo = _export(served_bundle, tmp_path / "repo", "in-process")
    result = CliRunner().invoke(cli, ["export", "triton", str(served_bundle), "-o", str(repo)])
    assert result.exit_code == 1 and "already exists; pass --force" in result.output
    result = CliRunner().invoke(cli, ["export", "triton", str(served_bundle), "-o", str(repo), "--force",
                                      "--segments", "bls"])
    assert result.exit_code == 0 and (repo / "resnet_seg0" / "1" / "model.onnx").is_file()  # name from the bundle


def test_force_never_replaces_a_directory_it_did_not_write(served_bundle, tmp_path) -> None:
    from click.testing import CliRunner

    from eecompile.cli import cli

    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's own work")
    result = CliRunner().invoke(cli, ["export", "triton", str(served_bundle), "-o", str(mine), "--force"])
    assert result.exit_code == 1 and "not a model repository written by" in result.output
    assert (mine / "notes.txt").read_text() == "the user's own work" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    plain = tmp_path / "file.txt"
    plain.write_text("x")
    result = CliRunner().invoke(cli, ["export", "triton", str(served_bundle), "-o", str(plain), "--force"])
    assert result.exit_code == 1 and plain.read_text() == "x"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directory left behind


@pytest.mark.parametrize("engines", ["onnxruntime", "tensorrt"])
def test_explicit_loading_fails_only_for_the_missing_backend(env, served_bundle, tmp_path, engines) -> None:
    """``--model-control-mode=explicit``: each model is loaded by name, so Triton parses and validates its config
    on that request and answers why it cannot load. The bls segment models (ONNX Runtime backend; with
    ``--engines tensorrt`` on GPU instances with its TensorRT accelerator) fail only because this build has no
    onnxruntime backend; a config with a syntax error, loaded the same way, fails for its syntax (the check
    can tell the two apart); the chain model loads."""
    from click.testing import CliRunner
    from tritonclient.utils import InferenceServerException

    from eecompile.cli import cli

    repo = tmp_path / "repo"
    result = CliRunner().invoke(cli, ["export", "triton", str(served_bundle), "-o", str(repo), "--name", "ee",
                                      "--engines", engines])
    assert result.exit_code == 0, result.output
    segments = sorted(p.name for p in repo.glob("ee_seg*"))
    broken = repo / "ee_broken"
    shutil.copytree(repo / segments[0], broken)
    text = (broken / "config.pbtxt").read_text().replace(f'name: "{segments[0]}"', 'name: "ee_broken"')
    (broken / "config.pbtxt").write_text(text.replace("max_batch_size: 0", "max_batch_size: zero", 1))
    import tritonclient.http as httpclient

    with TritonServer(env, repo, _ports(), tmp_path / "triton.log", exit_on_error=False,
                      extra_args=("--model-control-mode=explicit",)) as server:
        c = httpclient.InferenceServerClient(f"127.0.0.1:{server.http}")
        assert c.get_model_repository_index() and not any(e.get("state") == "READY"
                                                          for e in c.get_model_repository_index())
        for name in segments:
            with pytest.raises(InferenceServerException) as err:
                c.load_model(name)
            msg = str(err.value)
            assert "backend" in msg and "onnxruntime" in msg, (name, msg, server.tail())
            assert "pars" not in msg.lower() and "syntax" not in msg.lower(), msg
        with pytest.raises(InferenceServerException) as err:
            c.load_model("ee_broken")
        assert "onnxruntime" not in str(err.value), str(err.value)
        log = server.tail(100_000)
        assert "Error parsing text-format inference.ModelConfig" in log and "ee_broken/config.pbtxt" in log
        for name in segments:  # Triton's parser read every exported config without complaint
            assert f"{name}/config.pbtxt" not in log, log
        c.load_model("ee")
        assert c.is_model_ready("ee")


def test_end_only_outputs_come_with_their_present_masks(env, tmp_path) -> None:
    """A detector whose boxes only the final exit gives (``final.end_only``): Triton's answer has NaN rows for
    the samples that left early and ``present.<name>`` (BOOL [B, 1]) saying which rows are real, as the local
    runner's ``RunResult.present`` does."""
    pytest.importorskip("torch")
    import tritonclient.http as httpclient
    import yaml

    import eecompile
    from tests.graphs.builders import yolo_detector

    model = yolo_detector(tmp_path / "model.onnx")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "model": str(model), "final": {"output": "cls", "end_only": ["det_small", "det_big"]},
        "exits": [{"at": "/c1/c1.1/LeakyRelu_output_0", "head": {"output": "aux0"},
                   "gate": {"kind": "max_prob", "threshold": 0.6}}]}))
    bundle = eecompile.compile_model(tmp_path / "spec.yaml", tmp_path / "b.eebundle").path
    x = np.random.default_rng(4).standard_normal((6, 3, 32, 32)).astype(np.float32)
    with eecompile.load(bundle) as r:
        probe = r.run({"images": x}, thresholds="never", policy="never")
        mixed = [float(np.median(probe.gate_scores[0]))]
        want = r.run({"images": x}, thresholds=mixed)
    assert 0 < int(want.present["det_big"].sum()) < 6
    repo = _export(bundle, tmp_path / "repo", "in-process")
    with TritonServer(env, repo, _ports(), tmp_path / "triton.log") as server:
        c = httpclient.InferenceServerClient(f"127.0.0.1:{server.http}")
        inp = httpclient.InferInput("images", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        got = c.infer("ee", [inp], parameters={"thresholds": f"{mixed[0]!r}"})
    for name in ("det_small", "det_big"):
        mask = got.as_numpy(f"present.{name}").reshape(-1)
        np.testing.assert_array_equal(mask, want.present[name])
        rows = got.as_numpy(name)
        assert np.isnan(rows[~mask]).all()
        np.testing.assert_allclose(rows[mask], want.outputs[name][mask], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got.as_numpy("exit_index").reshape(-1), want.exit_index)
