"""Replace the heads of a compiled bundle (e.g. with trained ones), re-verify, and rewrite it atomically.

Exit k's head nodes (named ``ee{k}.head/...``) and initializers are removed from segment k and the new head is
spliced in their place (:func:`~eecompile.passes.attach_heads.splice_head`), reading the same ``at`` tensors and
writing the same exit output. Before anything is written, the chain with no exit taken must give the same final
outputs as before, and every new exit output must be finite on random inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from eecompile.analysis.probe import random_inputs
from eecompile.analysis.records import untrained_note
from eecompile.bundle import Bundle, Manifest, update_bundle
from eecompile.errors import GraphError, SpecError
from eecompile.names import exit_logits, head_input, head_prefix
from eecompile.passes.attach_heads import fit_exit_output, splice_head
from eecompile.passes.load import opset_of
from eecompile.passes.opset import convert_model, main_opset
from eecompile.passes.verify import SegmentIO, check_gate_shapes, run_chain_no_exit
from eecompile.write import save_segment, segment_ios


def replace_heads(bundle_path: str | Path, heads: dict[int, onnx.ModelProto], *,
                  head_specs: dict[int, dict] | None = None,
                  score_outputs: dict[int, str] | None = None) -> Bundle:
    """Splice new heads (e.g. trained ones) into a bundle's segments, re-verify, rewrite atomically.

    Each head replaces exit k's head: same input (the cut tensor), same output contract. A head with a score
    output (``score_outputs[k]``, its output name; by default ``score`` for a head with two outputs, one of them
    ``score``: eecompile's templates) takes over the old head's score, which the gate reads. The final outputs
    of the chain with no exit must be unchanged, and every new exit output must be finite on random inputs."""
    bundle = Bundle.load(bundle_path)
    m = bundle.manifest
    for k in heads:
        if not 0 <= k < m.n_early_exits:
            raise SpecError(f"replace_heads: exit {k} does not exist (the bundle has {m.n_early_exits} early exits)")

    def change(tmp: Path, manifest: Manifest) -> None:
        for k, proto in heads.items():
            seg = manifest.segments[k]
            path = tmp / seg.file
            model = ir.load(path)
            opset = opset_of(model)
            # A copy: splicing renames the head's initializers, and onnx-ir writes names through to the proto,
            # which is saved below as heads/exit{k}.onnx.
            head_copy = onnx.ModelProto()
            head_copy.CopyFrom(proto)
            head = ir.from_proto(head_copy)
            head_opset = main_opset(head) or opset
            if head_opset > opset:  # raise the segment, never lower the head (passes/opset.py)
                model = convert_model(model, head_opset, f"replace_heads: segment {k}",
                                      f"export the head with opset {opset}")
                opset = head_opset
            elif head_opset < opset:
                head = convert_model(head, opset, f"replace_heads: exit {k}'s head", f"export it with opset {opset}")
            g = model.graph
            prefix = head_prefix(k)
            final_name = next(iter(seg.exit.outputs))
            old_out = next(v for v in g.outputs if v.name == seg.exit.outputs[final_name])
            # With a final activation the head ends in ee{k}.logits (read by the gate and the activation).
            old_out = next((v for n in g for v in n.outputs if v.name == exit_logits(k)), old_out)
            score_name = (score_outputs or {}).get(k)
            if score_name is None and len(proto.graph.output) == 2 and "score" in [o.name for o in proto.graph.output]:
                score_name = "score"
            old_score = next((v for n in g for v in n.outputs if v.name == prefix + score_name), None) \
                if score_name else None
            if old_score is not None:
                old_score.name = f"{old_score.name}.old"
            old_nodes = [n for n in g if (n.name or "").startswith(prefix)]
            g.remove(old_nodes, safe=False)
            for name in [n for n in g.initializers if n.startswith(prefix)]:
                g.initializers.pop(name)
            values = {v.name: v for n in g for v in n.outputs}
            values.update({v.name: v for v in g.inputs})
            # The head reads the batch-first views of the `at` tensors where the compiler made them.
            at = [values.get(head_input(k, i)) or values[n] for i, n in enumerate(seg.exit.at)]
            logits, score, _ = splice_head(g, k, at, head, f"exits[{k}].head", score_name)
            if old_score is not None and score is not None:
                old_score.replace_all_uses_with(score, replace_graph_outputs=True)
            # The exit output's own layout (a time-major [T, batch, C] keeps its batch on axis 1); the trained
            # head gives its logits batch-first.
            out_shape = [d if isinstance(d, int) else str(d) for d in (old_out.shape or [])]
            if "batch" not in out_shape and out_shape:
                out_shape[0] = "batch"
            lshape = [d if isinstance(d, int) else "batch" for d in (logits.shape or out_shape)]
            old_out.name = f"{old_out.name}.old"
            new_out = fit_exit_output(g, k, logits, lshape, out_shape, old_out.name[:-len(".old")],
                                      f"exits[{k}].head", batch_first=True)
            old_out.replace_all_uses_with(new_out, replace_graph_outputs=True)
            TopologicalSortPass()(RemoveUnusedNodesPass()(model).model)
            save_segment(model, path)
            (tmp / "heads").mkdir(exist_ok=True)
            onnx.save(proto, tmp / "heads" / f"exit{k}.onnx")
            if head_specs and k in head_specs:
                seg.exit.head_spec = head_specs[k]
        # Re-verify: the no-exit chain's final outputs are untouched, every exit output is finite.
        ios = segment_ios(tmp, manifest.segments)
        old = [SegmentIO(bundle.path / s.file, i.inputs, i.threshold_input, i.outputs)
               for s, i in zip(m.segments, ios, strict=True)]
        inputs = [ir.Value(name=t.name, type=ir.TensorType(ir.DataType.from_numpy(np.dtype(t.dtype))),
                           shape=ir.Shape(t.shape)) for t in manifest.inputs]
        b = 1 if manifest.batch_mode != "dynamic" else 3
        feeds = random_inputs(inputs, b, seed=11)
        new_env, old_env = run_chain_no_exit(ios, feeds), run_chain_no_exit(old, feeds)
        check_gate_shapes(ios, new_env, b)  # one bool per sample from every gate
        for t in manifest.outputs:
            if not np.allclose(new_env[t.name], old_env[t.name], rtol=1e-6, atol=1e-6):
                raise GraphError(f"replace_heads: final output '{t.name}' changed; this is a bug, nothing was written")
        for k in heads:
            for name in manifest.segments[k].exit.outputs.values():
                if not np.all(np.isfinite(new_env[name])):
                    raise GraphError(f"replace_heads: exit {k}'s new head gives non-finite outputs; "
                                     f"nothing was written")
        manifest.notes = [n for n in manifest.notes if "untrained heads" not in n]
        untrained = [s.index for s in manifest.segments
                     if s.exit.head_spec is not None and not s.exit.head_spec.get("trained")]
        if untrained:
            manifest.notes.append(untrained_note(untrained))
        manifest.notes.append(f"heads replaced for exits {sorted(heads)}; re-verified")
        from eecompile.build.onnxruntime import stage_engines_noted

        stage_engines_noted(tmp, manifest, build=None)  # engines of the old segments go; this machine's are rebuilt

    return update_bundle(bundle.path, change)
