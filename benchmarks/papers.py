"""The papers' way against eecompile: the same model, heads, thresholds and exits, in PyTorch eager and in the bundle.

Published early-exit code (BranchyNet, DeeBERT, PABEE, ...) runs the backbone in PyTorch eager and decides after
each exit in Python: at batch 1 an ``if`` that returns when the gate fires; at batch 32 the batch goes on whole
until every sample has left (``wait-all``). Here both run the same weights: the torch modules the ONNX graphs were
exported from (their weights are saved beside the export), the bundle's own linear heads (their ONNX weights
loaded into torch), ``max_prob`` gates with the same thresholds, chosen so that 30/25/20/10% of a sample pool leave
at the four early exits and 15% at the final one. Exits taken are compared sample by sample.

Rows: eecompile's default (compact, ORT CPU engines built by ``compile``) against torch with an ``if`` per exit
(batch 1) and against torch wait-all (batch 32); plus torch with the same compaction as eecompile (rows of
exited samples dropped after each exit) at batch 32, which compares the engines with eager kernels alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import models

SHARES = (0.30, 0.25, 0.20, 0.10)  # of the pool, leaving at early exits 0..3 (15% reach the final exit)


@dataclass
class TorchChain:
    """The backbone cut where the bundle is cut, with the bundle's heads, in torch."""

    prepare: Callable[..., tuple[Any, Any]]  # inputs -> (hidden, side input carried along, e.g. the mask bias)
    segments: list[Callable[[Any, Any], Any]]  # (hidden, side) -> hidden, one per segment (last: the final part)
    heads: list[Callable[[Any], Any]]  # hidden -> logits, one per early exit
    final: Callable[[Any], Any]  # hidden after the last segment -> logits
    side_rows: Callable[[Any, Any], Any]  # (side, rows) -> side for those rows


def _linear(head_file: Path, pool: str) -> Callable[[Any], Any]:
    """The ONNX linear head (``models.linear_head``) in torch: the same W and B."""
    import onnx
    import torch
    from onnx import numpy_helper as nh

    inits = {t.name: nh.to_array(t) for t in onnx.load(str(head_file)).graph.initializer}
    w, b = torch.from_numpy(inits["W"].copy()), torch.from_numpy(inits["B"].copy())

    def head(h: Any) -> Any:
        f = h.mean((2, 3)) if pool == "mean" else h[:, 0]
        return torch.addmm(b, f, w.t())

    return head


def resnet_chain(cache: Path, quick: bool) -> tuple[models.Workload, TorchChain]:
    """The torch ResNet-50 of ``models.torch_resnet50`` (or the quick one) cut after its exit blocks."""
    if quick:
        blocks, width, idx = (1, 1, 2, 1), 8, (0, 1, 2, 3)
        w = models.quick_resnet(cache)
        work = cache / "resnet-quick-4x.work"
    else:
        blocks, width, idx = (3, 4, 6, 3), 64, models.TORCH_RESNET50_EXIT_BLOCKS
        w = models.torch_resnet50(cache)
        work = cache / "torch-resnet50-4x.work"
    net = models.torch_weights(models.torch_resnet_module(blocks, width), w.source)
    layers = list(net)
    ends = [4 + i + 1 for i in idx]  # the stem is 4 modules; block i is module 4 + i
    bounds = [0, *ends, len(layers) - 3]
    segs = [_sequential(layers[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    tail = _sequential(layers[-3:])
    heads = [_linear(work / f"head{k}.onnx", "mean") for k in range(len(idx))]
    return w, TorchChain(prepare=lambda image: (image, None), segments=[lambda h, _s, f=f: f(h) for f in segs],
                         heads=heads, final=tail, side_rows=lambda s, r: s)


def _sequential(mods: Sequence[Any]) -> Callable[[Any], Any]:
    import torch

    return torch.nn.Sequential(*mods).eval()


def bert_chain(cache: Path, quick: bool) -> tuple[models.Workload, TorchChain]:
    """The torch encoder of ``models.bert`` cut after its exit layers."""
    w = models.bert(cache, quick=quick)
    name = "bert-tiny" if quick else "bert-base"
    net, *_ = models.bert_module(name)
    net = models.torch_weights(net, w.source)
    n_layers = len(net.layers)
    exit_layers = (0, 1, 2, 3) if quick else models.BERT_EXIT_LAYERS
    bounds = [0, *[i + 1 for i in exit_layers], n_layers]
    work = cache / f"{name}-4x.work"

    def prepare(input_ids: Any, attention_mask: Any) -> tuple[Any, Any]:
        x = net.emb(input_ids) + net.pos[:, : input_ids.shape[1]]
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        return x, bias

    def segment(a: int, b: int) -> Callable[[Any, Any], Any]:
        def run(x: Any, bias: Any) -> Any:
            for layer in net.layers[a:b]:
                x = layer(x, bias)
            return x
        return run

    segs = [segment(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    heads = [_linear(work / f"head{k}.onnx", "first") for k in range(len(exit_layers))]
    return w, TorchChain(prepare=prepare, segments=segs, heads=heads, final=lambda x: net.cls(x[:, 0]),
                         side_rows=lambda s, r: s[r])


# ------------------------------------------------------------------------------------------- the torch loops


def _fires(logits: Any, t: float) -> Any:
    return logits.softmax(-1).amax(-1) >= t


def torch_if(chain: TorchChain, thr: Sequence[float], feeds: dict[str, Any]) -> tuple[Any, int]:
    """Batch 1, the papers' way: return as soon as a gate fires (a Python ``if`` per exit)."""
    h, side = chain.prepare(**feeds)
    for k, head in enumerate(chain.heads):
        h = chain.segments[k](h, side)
        logits = head(h)
        if bool(_fires(logits, thr[k])[0]):
            return logits, k
    return chain.final(chain.segments[-1](h, side)), len(chain.heads)


def torch_batch(chain: TorchChain, thr: Sequence[float], feeds: dict[str, Any], compact: bool) -> tuple[Any, Any]:
    """A batch: ``compact=False`` runs it whole until every sample has left (wait-all); ``compact=True`` drops the
    rows that left after each exit (what eecompile does). Returns the outputs and each sample's exit."""
    import torch

    h, side = chain.prepare(**feeds)
    n = h.shape[0]
    out: Any = None
    where = torch.full((n,), len(chain.heads), dtype=torch.int64)
    rows = torch.arange(n)  # original row of each row still running
    done = torch.zeros(n, dtype=torch.bool)
    for k, head in enumerate(chain.heads):
        h = chain.segments[k](h, side)
        logits = head(h)
        if out is None:
            out = torch.empty((n, logits.shape[-1]), dtype=logits.dtype)
        fire = _fires(logits, thr[k])
        if compact:
            out[rows[fire]] = logits[fire]
            where[rows[fire]] = k
            keep = ~fire
            if not bool(keep.any()):
                return out, where
            if not bool(keep.all()):
                h, side, rows = h[keep], chain.side_rows(side, keep), rows[keep]
        else:
            new = fire & ~done
            out[new] = logits[new]
            where[new] = k
            done |= fire
            if bool(done.all()):
                return out, where
    logits = chain.final(chain.segments[-1](h, side))
    if compact:
        out[rows] = logits
    else:
        out[~done] = logits[~done]
    return out, where


# ------------------------------------------------------------------------------------------- the figure


def _thresholds(scores: np.ndarray, shares: Sequence[float]) -> list[float]:
    """max_prob thresholds so that ``shares[k]`` of the pool leaves at exit k (in order)."""
    left = np.ones(scores.shape[1], bool)
    thr = []
    n = scores.shape[1]
    for k, share in enumerate(shares):
        s = np.sort(scores[k][left])[::-1]
        take = int(round(share * n))
        t = float(s[take - 1]) if 0 < take <= s.size else float("inf")
        if take < s.size and s[take] == t:  # a tie would take more than the share: go just above it
            t = float(np.nextafter(t, np.inf))
        thr.append(t)
        left &= ~(scores[k] >= t)
    return thr


def papers(ctx: Any) -> dict[str, Any]:
    """eecompile vs PyTorch eager early exit (the papers' way) on BERT-base and ResNet-50 classes."""
    import torch

    from eecompile.benchmark import block_calls, paired_blocks, ratio_stats
    from eecompile.runtimes.chain import EarlyExitRunner
    from eecompile.runtimes.onnxruntime import cpu_target

    torch.set_num_threads(ctx.threads)
    rows: list[dict[str, Any]] = []
    for make in (resnet_chain, bert_chain):
        w, chain = make(ctx.cache, ctx.quick)
        _ensure_engines(w.bundle, ctx)
        runner = EarlyExitRunner(w.bundle, threads=ctx.threads)
        engine = getattr(runner.backend, "engine_target", None)
        pool_n = 32 if ctx.quick else 64
        pool = w.make_inputs(pool_n, 7)
        scores = runner.run(pool, thresholds="never", policy="never").gate_scores
        assert scores is not None
        thr = _thresholds(np.asarray(scores, np.float64), SHARES)
        ctx.say(f"papers: {w.name}, thresholds {', '.join(f'{t:.5g}' for t in thr)}")
        tfeeds = {k: torch.from_numpy(v) for k, v in pool.items()}
        with torch.inference_mode():
            # Same exits taken: torch's per-sample decisions against eecompile's on the whole pool.
            ee = runner.run(pool, thresholds=thr).exit_index
            t_if = np.array([torch_if(chain, thr, {k: v[i:i + 1] for k, v in tfeeds.items()})[1]
                             for i in range(pool_n)])
            t_wait = torch_batch(chain, thr, tfeeds, compact=False)[1].numpy()
            t_comp, _ = torch_batch(chain, thr, tfeeds, compact=True)
            shares = np.bincount(ee, minlength=len(thr) + 1) / pool_n
            agree = {"torch_if": float((t_if == ee).mean()), "torch_wait_all": float((t_wait == ee).mean())}
            # Same model: the final outputs of torch (compact) and eecompile agree where both reached the end.
            last = ee == len(thr)
            ee_out = runner.run(pool, thresholds=thr).outputs
            ee_final = next(iter(ee_out.values()))
            diff = float(np.abs(t_comp.numpy()[last] - ee_final[last]).max()) if last.any() else 0.0
            for batch in (1, 32):
                n_b = 8 if ctx.quick else (16 if batch == 1 else 32)
                if batch == 1:
                    singles = [{k: v[i:i + 1] for k, v in pool.items()} for i in range(n_b)]
                    tsingles = [{k: torch.from_numpy(v) for k, v in s.items()} for s in singles]
                    fns: dict[str, Callable[[], object]] = {
                        "torch": functools.partial(_each, functools.partial(torch_if, chain, thr), tsingles),
                        "eecompile": functools.partial(_each, functools.partial(runner.run, thresholds=thr),
                                                       singles),
                    }
                    vs = [("torch", "torch, an `if` per exit")]
                else:
                    feeds = {k: v[:batch] for k, v in pool.items()}
                    tb = {k: torch.from_numpy(v) for k, v in feeds.items()}
                    fns = {
                        "torch": functools.partial(torch_batch, chain, thr, tb, False),
                        "torch_compact": functools.partial(torch_batch, chain, thr, tb, True),
                        "eecompile": functools.partial(runner.run, feeds, thresholds=thr),
                        "eecompile_wait_all": functools.partial(runner.run, feeds, thresholds=thr,
                                                                policy="wait-all"),
                    }
                    vs = [("torch", "torch wait-all"), ("torch_compact", "torch, same compaction"),
                          ("eecompile_wait_all", "eecompile wait-all")]
                calls = 1 if batch > 1 or not ctx.quick else block_calls(fns["eecompile"], 0.05)
                t = paired_blocks(fns, calls=calls, rounds=ctx.rounds(5), warmup=1)
                for key, label in vs:
                    rows.append({
                        "model": w.name, "batch": batch, "against": label, "engines": engine,
                        "speedup": ratio_stats(t[key].wall, t["eecompile"].wall),
                        "cpu_speedup": ratio_stats(t[key].cpu, t["eecompile"].cpu),
                        "eecompile_ms": _ms(t["eecompile"].wall, n_b if batch == 1 else 1),
                        "other_ms": _ms(t[key].wall, n_b if batch == 1 else 1),
                        "exit_shares": [float(s) for s in shares], "exits_agree": agree,
                        "final_max_abs_diff": diff,
                    })
                    ctx.say(f"papers: {w.name} b{batch} vs {label}: {rows[-1]['speedup']['median']:.2f}x")
        runner.close()
    return {"rows": rows, "target": cpu_target(), "shares": list(SHARES),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def _each(call: Callable[[Any], object], feeds: Sequence[Any]) -> None:
    for f in feeds:
        call(f)


def _ms(wall: Sequence[float], per: int) -> dict[str, float]:
    from eecompile.benchmark import summary

    return summary([x / per for x in wall])


def _ensure_engines(bundle: Path, ctx: Any) -> None:
    """The bundle as ``eecompile compile`` leaves it: with this machine's ORT CPU engines (built once)."""
    from eecompile.build.onnxruntime import build_onnxruntime
    from eecompile.bundle import Bundle
    from eecompile.runtimes.onnxruntime import cpu_target
    from eecompile.runtimes.records import engine_records

    m = Bundle.load(bundle, verify=False).manifest
    recs = engine_records(m, "onnxruntime", cpu_target())
    if len(recs) != len(m.segments) or any(r.flags.get("method") != "merged" or
                                           r.flags.get("segment_sha256") != m.files.get(m.segments[r.segment].file)
                                           for r in recs):
        ctx.say(f"building ORT CPU engines for {bundle.name}")
        build_onnxruntime(bundle, 32)
