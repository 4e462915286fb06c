"""A tiny random-weight Llama (from a transformers config; nothing downloaded) exported with its KV cache and
compiled into a decoder bundle once per test session (shared by the xdist workers through a file lock)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest
import yaml

LAYERS = 4
VOCAB = 128


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.getbasetemp()
    # xdist workers of one run share their parent directory (pytest-xdist's recipe for session data)
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "tiny_llama"
    root.mkdir(exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "done").exists():
            from eecompile.decoder.compile import compile_decoder
            from eecompile.models.lm import char_tokenizer, export_decoder, tiny_llama

            export_decoder(tiny_llama(seed=0, layers=LAYERS, vocab=VOCAB), root / "tiny.onnx")
            char_tokenizer(root / "tokenizer.json", VOCAB)
            spec = {"kind": "decoder", "model": "tiny.onnx", "max_length": 96, "tokenizer": "tokenizer.json",
                    "exits": [{"after_layer": 1, "gate": {"kind": "max_prob", "threshold": 0.3}, "draft_tokens": 4}]}
            (root / "spec.yaml").write_text(yaml.safe_dump(spec))
            compile_decoder(root / "spec.yaml", root / "tiny.eebundle")
            (root / "done").write_text("ok")
    return root


@pytest.fixture(scope="session")
def lm_bundle(lm_dir: Path) -> Path:
    return lm_dir / "tiny.eebundle"


@pytest.fixture(scope="session")
def runner(lm_bundle: Path):  # type: ignore[no-untyped-def]
    from eecompile.runtimes.lm import DecoderRunner

    return DecoderRunner(lm_bundle, threads=1)
