"""Export a Hugging Face decoder-only LM to ONNX with its key/value cache, in the optimum layout.

Inputs ``input_ids`` [B, S] int64, ``attention_mask`` [B, P+S] int64, ``position_ids`` [B, S] int64 and
``past_key_values.{i}.key|value`` [B, H_kv, P, D] float32; outputs ``logits`` [B, S, V] and
``present.{i}.key|value`` [B, H_kv, P+S, D]. One graph serves prefill (P = 0), one-token decoding and
multi-token verification. Each layer's output hidden state is named ``layers.{i}.output`` (kept in the
graph's value_info) so a decoder spec can cut there.

The wrapper rebuilds a ``DynamicCache`` from the flat past tensors (``cache.update(k, v, layer)``) and
exports with the TorchScript exporter (``dynamo=False``); torch and transformers are imported lazily.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from eecompile.errors import GraphError

log = logging.getLogger(__name__)


def layer_output_name(i: int) -> str:
    """The name the exported graph gives the hidden state after decoder layer ``i`` (0-based)."""
    return f"layers.{i}.output"


def _wrapper(model: Any) -> Any:
    import torch
    from transformers import DynamicCache

    n_layers = model.config.num_hidden_layers

    class _KVDecoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            seen: list[Any] = []
            hook = self.model.model.norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
            cache = DynamicCache()
            for i in range(n_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True, output_hidden_states=True)
            hook.remove()
            kv = []
            for i in range(n_layers):
                layer = out.past_key_values.layers[i]
                kv += [layer.keys, layer.values]
            # hidden_states[i + 1] is layer i's output, except the last, which HF gives after the final norm:
            # the final norm's input (caught by the hook) is the last layer's output
            taps = [out.hidden_states[i + 1] for i in range(n_layers - 1)] + [seen[-1]]
            return (out.logits, *kv, *taps)

    return _KVDecoder()


def export_decoder(model: Any, path: str | Path, *, opset: int = 18) -> Path:
    """Export ``model`` (a ``*ForCausalLM`` from transformers, eval mode, float32) to ``path`` with its KV cache.

    Raises ``GraphError`` when the model has no ``config.num_hidden_layers`` or the exporter fails.
    """
    import torch

    path = Path(path)
    cfg = model.config
    try:
        n_layers = int(cfg.num_hidden_layers)
        n_kv = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    except AttributeError as e:
        raise GraphError(f"export_decoder: the model's config lacks {e.name}; a decoder-only LM is needed") from e
    model.eval()
    b, p, s = 2, 3, 2
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    mask = torch.ones(b, p + s, dtype=torch.int64)
    pos = torch.arange(p, p + s).unsqueeze(0).expand(b, s).contiguous()
    past = [torch.zeros(b, n_kv, p, head_dim) for _ in range(2 * n_layers)]
    kv_in = [f"past_key_values.{i}.{t}" for i in range(n_layers) for t in ("key", "value")]
    kv_out = [f"present.{i}.{t}" for i in range(n_layers) for t in ("key", "value")]
    taps = [layer_output_name(i) for i in range(n_layers)]
    axes: dict[str, dict[int, str]] = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
                                       "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    axes.update({n: {0: "batch", 2: "past"} for n in kv_in})
    axes.update({n: {0: "batch", 2: "total"} for n in kv_out})
    axes.update({n: {0: "batch", 1: "seq"} for n in taps})
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_wrapper(model), (ids, mask, pos, *past), str(path),
                          input_names=["input_ids", "attention_mask", "position_ids", *kv_in],
                          output_names=["logits", *kv_out, *taps], dynamic_axes=axes, opset_version=opset,
                          dynamo=False, do_constant_folding=True)
    outputs_to_value_info(path, taps)
    log.info("exported %s (%d layers, KV cache)", path, n_layers)
    return path


def outputs_to_value_info(path: str | Path, names: list[str]) -> None:
    """Turn the graph outputs ``names`` of the ONNX file at ``path`` into value_info entries (kept, typed, named
    tensors a spec can cut at), rewriting the file. The exporters keep a tensor's name only as an output."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    keep = [o for o in proto.graph.output if o.name not in set(names)]
    info = [o for o in proto.graph.output if o.name in set(names)]
    del proto.graph.output[:]
    proto.graph.output.extend(keep)
    proto.graph.value_info.extend(info)
    onnx.save(proto, str(path))


def tiny_llama(seed: int = 0, *, layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
               vocab: int = 128, max_positions: int = 256,
               init_range: float = 0.2) -> Any:
    """A random-weight ``LlamaForCausalLM`` from a config (nothing downloaded), for tests and examples.

    ``init_range`` (the weights' std) is 10x Hugging Face's default so the next-token distributions are
    peaked and varied, as a trained model's are, rather than near-uniform.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                      tie_word_embeddings=True, attn_implementation="eager",  # type: ignore[call-arg]
                      initializer_range=init_range)
    return LlamaForCausalLM(cfg).eval()


def char_tokenizer(path: str | Path, vocab: int = 128) -> Path:
    """Write a character-level ``tokenizer.json`` (printable ASCII, then ``[UNK]``; at most ``vocab`` ids) for
    the random-weight test models; returns the path. Needs the ``tokenizers`` package."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = [chr(c) for c in range(32, 127)][: vocab - 1]
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)} | {"[UNK]": len(chars)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path
