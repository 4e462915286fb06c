"""`analyze` on third-party graphs: residual, dense, multi-branch, transformer with a mask."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import zoo_model

from eecompile.cli import cli
from eecompile.compiler import analyze_model


@pytest.mark.parametrize("name", ["resnet50", "densenet121", "inception_v1", "squeezenet"])
def test_zoo_graphs_have_clean_suggested_cuts(name: str) -> None:
    report = analyze_model(zoo_model(name))
    assert report.total_flops > 1e8
    assert report.batch_mode == "dynamic"
    assert len(report.suggested) >= 2
    by_name = {c.tensor: c for c in report.valid}
    fracs = [by_name[s].fraction for s in report.suggested]
    assert fracs == sorted(fracs) and 0 < fracs[0] and fracs[-1] < 1
    for s in report.suggested:
        assert by_name[s].carried == [s]  # residual/dense/inception blocks: cut where one tensor crosses
    # Inside a ResNet block the skip connection rides along: some cut points carry two tensors.
    if name == "resnet50":
        assert any(len(c.carried) == 2 for c in report.valid)
        # Stage boundaries (read only by Convs) are preferred over block outputs that feed a residual Sum.
        assert "r77" in report.suggested and not by_name["r77"].feeds_elementwise
        assert by_name["r67"].feeds_elementwise


def test_transformer_with_mask_cuts_carry_only_hidden_state(torch_model) -> None:
    report = analyze_model(torch_model("bert"))
    layer_outs = [c for c in report.valid if c.tensor.endswith("ln2/LayerNormalization_output_0")]
    assert len(layer_outs) == 4  # after each of the 4 layers
    for c in layer_outs:
        assert c.carried == [c.tensor]
    for c in layer_outs[:-1]:  # the mask is recomputed after the cut, from the input
        assert "attention_mask" in c.inputs_after


def test_analyze_json_contract(tmp_path) -> None:
    result = CliRunner().invoke(cli, ["analyze", str(zoo_model("squeezenet")), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert {"inputs", "outputs", "total_flops", "cut_points"} <= set(data)
    cp = data["cut_points"][0]
    assert {"tensor", "shape", "flops_before", "fraction"} <= set(cp)
    assert data["inputs"][0]["name"] == "data_0"


def test_analyze_bad_file_is_one_line(tmp_path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"this is not a protobuf at all")
    result = CliRunner().invoke(cli, ["analyze", str(bad)])
    assert result.exit_code == 1
    assert "not a valid ONNX model" in result.output and str(bad) in result.output


def test_flops_count_matmuls_that_read_inputs_and_if_outputs_can_be_cut(tmp_path) -> None:
    import onnx
    from test_compiler import LOOPED  # MatMul on the input, an If whose body reads the outer scope

    path = tmp_path / "if.onnx"
    onnx.save(onnx.parser.parse_model(LOOPED), path)
    report = analyze_model(path)
    by_name = {c.tensor: c for c in report.valid}
    assert report.total_flops == 96  # 2 * 4 * 4 per MatMul and sample, the If's larger branch (one MatMul) too
    assert by_name["h"].flops_before == 32  # the first MatMul reads the model input directly
    assert "inner" not in by_name  # never inside the If body
    assert set(by_name) == {"h", "r", "z"}


def test_analyze_says_what_each_cut_costs(torch_model) -> None:  # type: ignore[no-untyped-def]
    """Every cut point names its exit's FLOPs share, the bytes it carries per sample and a residual join after it."""
    from eecompile.compiler import analyze_model

    report = analyze_model(torch_model("resnet"))
    doc = {c["tensor"]: c for c in report.to_json()["cut_points"]}
    proj, ident = doc["/layers.0/Relu_1_output_0"], doc["/layers.3/Relu_1_output_0"]  # [16,32,32], [64,8,8]
    assert proj["cost"]["carried_bytes_per_sample"] == 16 * 32 * 32 * 4
    assert ident["cost"]["carried_bytes_per_sample"] == 64 * 8 * 8 * 4
    assert proj["cost"]["residual_join"] is False and ident["cost"]["residual_join"] is True
    # pool over the map + a linear layer to the 10 classes, against the whole model
    assert proj["cost"]["exit_flops_fraction"] == pytest.approx((16 * 32 * 32 + 2 * 16 * 10) / report.total_flops,
                                                                abs=1e-6)
