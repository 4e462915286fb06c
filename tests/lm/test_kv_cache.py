"""The in-place key/value cache (TensorScatter into preallocated buffers) against the exported Concat cache."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir
import pytest
import yaml

from eecompile.decoder.compile import compile_decoder
from eecompile.decoder.kv_inplace import rewrite_segment
from eecompile.errors import SpecError
from eecompile.runtimes.lm import DecoderRunner

PROMPTS = [[5, 17, 33], [90, 2, 41, 7, 7, 63, 12], [11], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]]


@pytest.fixture(scope="module")
def concat_runner(lm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> DecoderRunner:
    spec = yaml.safe_load((lm_dir / "spec.yaml").read_text())
    tmp = tmp_path_factory.mktemp("concat")
    spec.update(model=str(lm_dir / "tiny.onnx"), tokenizer=str(lm_dir / "tokenizer.json"), kv_cache="concat")
    (tmp / "spec.yaml").write_text(yaml.safe_dump(spec))
    compile_decoder(tmp / "spec.yaml", tmp / "concat.eebundle")
    return DecoderRunner(tmp / "concat.eebundle", threads=1)


def test_segments_write_their_cache_in_place(lm_bundle: Path, runner: DecoderRunner,
                                             concat_runner: DecoderRunner) -> None:
    assert runner.in_place and not concat_runner.in_place
    assert [s["kv_update"] for s in runner.segments] == ["tensor_scatter"] * 2
    assert [s["kv_update"] for s in concat_runner.segments] == ["concat"] * 2
    seg = onnx.load(str(lm_bundle / "segment1.onnx"), load_external_data=False)
    ops = [n.op_type for n in seg.graph.node]
    assert ops.count("TensorScatter") == 4 and "attention_mask" not in [i.name for i in seg.graph.input]
    producers = {o: n.op_type for n in seg.graph.node for o in n.output}
    assert all(producers[o.name] == "TensorScatter" for o in seg.graph.output if o.name.startswith("present."))


@pytest.mark.parametrize(("mode", "thr"), [("none", None), ("speculative", "always"), ("speculative", 0.3),
                                           ("exit", 0.3)])
def test_in_place_and_concat_caches_give_the_same_tokens(runner: DecoderRunner, concat_runner: DecoderRunner,
                                                         mode: str, thr: object) -> None:
    a = concat_runner.generate(PROMPTS, 16, mode=mode, thresholds=thr, draft_tokens=3, batch=3)
    b = runner.generate(PROMPTS, 16, mode=mode, thresholds=thr, draft_tokens=3, batch=3)
    assert [r["token_ids"] for r in a.results] == [r["token_ids"] for r in b.results]


def test_no_cache_is_copied_per_step(runner: DecoderRunner, concat_runner: DecoderRunner,
                                     capfd: pytest.CaptureFixture[str]) -> None:
    for r in (runner, concat_runner):
        r.calls["kv_bytes_copied"] = r.calls["kv_bytes_written"] = 0
        r.generate(PROMPTS, 16, mode="speculative", thresholds="always", draft_tokens=3)
    assert runner.calls["kv_bytes_copied"] == 0
    assert runner.calls["kv_bytes_written"] > 0
    assert concat_runner.calls["kv_bytes_copied"] > 10 * concat_runner.calls["kv_bytes_written"]
    # ONNX Runtime says when TensorScatter could not write in place (past and present not the same buffer)
    assert "in-place optimization not activated" not in capfd.readouterr().err


def test_a_row_reuses_a_freed_slot_and_rejected_drafts_only_lower_its_length(runner: DecoderRunner) -> None:
    alone = runner.generate([PROMPTS[1]], 12).results[0]["token_ids"]
    batch = runner.open_batch("speculative", max_batch=2, thresholds="always", draft_tokens=4)
    short = batch.add(PROMPTS[0], 2)
    batch.add(PROMPTS[3], 12)
    late = batch.add(PROMPTS[1], 12)  # takes the slot the short row frees
    got: dict[int, list[int]] = {}
    slots = set()
    while batch.active or batch.waiting:
        for ev in batch.step():
            got.setdefault(ev.row, []).extend(ev.token_ids)
        slots |= {r.slot for r in batch._active if r.index == late}
        for r in batch._active:  # every segment's length stays within the row's confirmed tokens + drafts
            assert all(n <= len(r.seq) for n in r.lengths)
    assert len(got[short]) == 2
    assert got[late] == alone
    assert slots == {0}


def test_a_graph_without_the_concat_cache_is_left_as_it_is() -> None:
    past = ir.Value(name="past_key_values.0.key", type=ir.TensorType(ir.DataType.FLOAT),
                    shape=ir.Shape(["b", 2, "p", 4]))
    pos = ir.Value(name="position_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["b", "s"]))
    node = ir.node("Identity", [past], name="copy")
    node.outputs[0].name = "present.0.key"
    g = ir.Graph([past, pos], [node.outputs[0]], nodes=[node], name="seg")
    assert rewrite_segment(g, 0, 1) is False
    assert [n.op_type for n in g] == ["Identity"]


def test_bad_kv_cache_option_is_refused(tmp_path: Path, lm_dir: Path) -> None:
    spec = yaml.safe_load((lm_dir / "spec.yaml").read_text())
    spec.update(model=str(lm_dir / "tiny.onnx"), kv_cache="paged")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError, match="kv_cache: 'paged' is not one of"):
        compile_decoder(tmp_path / "spec.yaml", tmp_path / "x.eebundle")


def test_the_rewrite_logs_no_stack_traces(tmp_path: Path, lm_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The dead-node pass after the rewrite used to look TensorScatter and Attention up at the export's opset,
    find no schema and log a stack trace at INFO for every rewritten node."""
    import logging

    spec = yaml.safe_load((lm_dir / "spec.yaml").read_text())
    spec.update(model=str(lm_dir / "tiny.onnx"), tokenizer=str(lm_dir / "tokenizer.json"))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    with caplog.at_level(logging.INFO):
        compile_decoder(tmp_path / "spec.yaml", tmp_path / "b.eebundle")
    noisy = [r.getMessage()[:120] for r in caplog.records if r.stack_info or r.exc_info or "schema" in r.getMessage()]
    assert noisy == []
    for k in (0, 1):
        seg = onnx.load(str(tmp_path / f"b.eebundle/segment{k}.onnx"), load_external_data=False)
        assert "TensorScatter" in {n.op_type for n in seg.graph.node}
        assert next(o.version for o in seg.opset_import if o.domain in ("", "ai.onnx")) >= 24
