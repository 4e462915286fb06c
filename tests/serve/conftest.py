"""A compiled bundle for the serving tests: the tests' PyTorch ResNet cut at two suggested points, linear heads,
and thresholds set from the gates' own scores so that samples leave at every exit (mixed difficulty)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_head, write_spec


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> tuple[int, ...]:
    """``n`` distinct free loopback ports: every socket stays bound until all are chosen (ports picked one at
    a time can repeat, and a server given the same port for HTTP and gRPC refuses to start)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return tuple(int(s.getsockname()[1]) for s in socks)
    finally:
        for s in socks:
            s.close()


def mixed_inputs(n: int, seed: int = 0) -> np.ndarray:
    """Images of mixed difficulty: plain noise and noise scaled up (the heads are surer of large inputs)."""
    rng = np.random.default_rng(seed)
    scale = rng.choice([0.2, 1.0, 4.0], size=(n, 1, 1, 1)).astype(np.float32)
    return (rng.standard_normal((n, 3, 32, 32)).astype(np.float32) * scale).astype(np.float32)


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Path]) -> Path:
    """``build(root)`` once per test run, in a directory the xdist workers share (pytest-xdist's recipe: their
    parent directory), under a file lock; returns what it returned (the same path for every caller)."""
    import fcntl
    import os

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    root.mkdir(exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = root / "done"
        if not done.exists():
            done.write_text(str(build(root)))
    return Path(done.read_text())


@pytest.fixture(scope="session")
def served_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from torch_models import export

    return built_once(tmp_path_factory, "served_resnet", lambda root: build_served_bundle(root, export("resnet", root)))


def build_served_bundle(root: Path, model: Path) -> Path:
    """Compile ``model`` (the tests' ResNet) with two exits whose thresholds split mixed inputs about evenly."""
    from eecompile.bundle import update_bundle
    from eecompile.compiler import analyze_model, compile_model
    from eecompile.runtimes.chain import EarlyExitRunner

    report = analyze_model(model)
    cuts = report.to_json()["suggested"][:2]
    shapes = {c["tensor"]: c["shape"] for c in report.to_json()["cut_points"]}
    exits = []
    for i, cut in enumerate(cuts):
        head = make_head(root / f"head{i}.onnx", shapes[cut], 10, seed=i, scale=0.5)
        exits.append({"at": cut, "head": str(head), "gate": {"kind": "max_prob", "threshold": 0.5}})
    spec = write_spec(root, model, exits)
    bundle = root / "resnet.eebundle"
    compile_model(spec, bundle)
    # Thresholds at the gates' score terciles on mixed inputs: about a third leaves at each exit.
    with EarlyExitRunner(bundle) as runner:
        scores = runner.run({"image": mixed_inputs(96, seed=123)}, policy="never").gate_scores
    t0 = float(np.quantile(scores[0], 2 / 3))
    t1 = float(np.quantile(scores[1], 0.5))

    def change(_: Path, manifest) -> None:  # noqa: ANN001
        for seg, t in zip(manifest.segments, (t0, t1), strict=False):
            seg.exit.gate.threshold = t

    update_bundle(bundle, change)
    return bundle


LONG_LENGTH = 640  # positions of the serving tests' decoder: room for a request long enough to watch others pass it


@pytest.fixture(scope="session")
def long_lm_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests' tiny random-weight Llama (4 layers, vocabulary 128), compiled with a cache of LONG_LENGTH
    positions: a request of a few hundred tokens decodes for long enough (hundreds of steps) that a short one
    sent after it starts can join the running batch and leave before it, whatever the machine's load."""
    pytest.importorskip("torch")
    return built_once(tmp_path_factory, "long_llama", build_long_lm_bundle)


def build_long_lm_bundle(root: Path) -> Path:
    import yaml

    from eecompile.decoder.compile import compile_decoder
    from eecompile.models.lm import char_tokenizer, export_decoder, tiny_llama

    export_decoder(tiny_llama(seed=0, layers=4, vocab=128, max_positions=LONG_LENGTH), root / "tiny.onnx")
    char_tokenizer(root / "tokenizer.json", 128)
    spec = {"kind": "decoder", "model": "tiny.onnx", "max_length": LONG_LENGTH, "tokenizer": "tokenizer.json",
            "exits": [{"after_layer": 1, "gate": {"kind": "max_prob", "threshold": 0.3}, "draft_tokens": 4}]}
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    compile_decoder(root / "spec.yaml", root / "tiny.eebundle")
    return root / "tiny.eebundle"
