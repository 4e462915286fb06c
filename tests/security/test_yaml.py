"""Specs and manifests are parsed with bounded aliases and a size cap: an alias bomb or a recursive alias
is refused before anything expands it, with the file, the line and what to do. A manifest allows no alias;
a spec allows the few that yaml.safe_dump writes for a Python object used twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from eecompile import safe_yaml
from eecompile.bundle import Bundle
from eecompile.errors import BundleError, SpecError
from eecompile.spec import load_spec, parse_spec
from tests.bad_inputs.util import expect_error


def _bomb(levels: int = 12, width: int = 9) -> str:
    """``width ** levels`` strings once expanded (9**12 = 2.8e11) from about 600 bytes."""
    lines = ['b0: &b0 [' + ", ".join(['"lol"'] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"b{i}: &b{i} [" + ", ".join([f"*b{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_loader_is_libyaml_when_installed() -> None:
    import yaml

    if hasattr(yaml, "CSafeLoader"):
        assert issubclass(safe_yaml.NoAliasSafeLoader, yaml.CSafeLoader)
    assert issubclass(safe_yaml.NoAliasSafeLoader, (yaml.SafeLoader, getattr(yaml, "CSafeLoader", yaml.SafeLoader)))


def test_alias_bomb_spec_is_refused(ws: Path) -> None:
    text = (ws / "spec.yaml").read_text() + _bomb()
    assert len(text) < 2000
    (ws / "spec.yaml").write_text(text)
    expect_error(["compile", ws / "spec.yaml", "-o", ws / "out.eebundle"], SpecError, "spec.yaml", "line ",
                 "aliases", "more than 100000 nodes", "without anchors and aliases", workspace=ws)


def test_a_shared_value_dumped_by_pyyaml_is_accepted(tmp_path: Path) -> None:
    """yaml.safe_dump writes &id001 / *id001 for a dict used twice: such a spec stays valid."""
    import yaml

    gate = {"kind": "max_prob", "threshold": 0.5}
    text = yaml.safe_dump({"model": "m.onnx", "exits": [{"at": "h0", "head": "h.onnx", "gate": gate},
                                                        {"at": "h1", "head": "h.onnx", "gate": gate}]})
    assert "*id001" in text
    spec = parse_spec(text, base=tmp_path)
    assert [e.gate.threshold for e in spec.exits] == [0.5, 0.5]


def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="alias"):
        parse_spec("model: &m [m.onnx, *m]\nexits: []\n", base=tmp_path)
    with pytest.raises(SpecError, match="alias"):
        safe_yaml.load("a: &x {b: *x}\n", SpecError, "doc", "spec")


def test_alias_bomb_manifest_is_refused_and_nothing_is_written(ws: Path) -> None:
    b = ws / "b.eebundle"
    text = (b / "manifest.yaml").read_text().replace("notes: [", "bomb_notes: &n0 [x]\nnotes: [", 1)
    text += _bomb()
    (b / "manifest.yaml").write_text(text)
    with pytest.raises(BundleError, match="alias"):
        Bundle.load(b)
    expect_error(["inspect", b, "--json"], BundleError, "manifest.yaml", "alias", workspace=ws)
    expect_error(["calibrate", b, "--data", ws / "data.npz", "--max-drop", "0.05"], BundleError,
                 "manifest.yaml", "alias", workspace=ws)


def test_recursive_alias_manifest_is_refused(ws: Path) -> None:
    b = ws / "b.eebundle"
    text = (b / "manifest.yaml").read_text() + "loop: &l [*l]\n"
    (b / "manifest.yaml").write_text(text)
    expect_error(["inspect", b], BundleError, "manifest.yaml", "alias", workspace=ws)


def test_size_cap(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    size = (ws / "spec.yaml").stat().st_size
    monkeypatch.setenv(safe_yaml.ENV_MAX_YAML_BYTES, str(size - 1))
    expect_error(["compile", ws / "spec.yaml", "-o", ws / "o.eebundle"], SpecError, "spec.yaml", str(size),
                 safe_yaml.ENV_MAX_YAML_BYTES, workspace=ws)
    expect_error(["inspect", ws / "b.eebundle"], BundleError, "manifest.yaml", "limit",
                 safe_yaml.ENV_MAX_YAML_BYTES, workspace=ws)
    monkeypatch.setenv(safe_yaml.ENV_MAX_YAML_BYTES, str(10 * size))
    assert load_spec(ws / "spec.yaml").model.name == "model.onnx"
    assert safe_yaml.max_yaml_bytes() == 10 * size
    monkeypatch.delenv(safe_yaml.ENV_MAX_YAML_BYTES)
    assert safe_yaml.max_yaml_bytes() == safe_yaml.MAX_YAML_BYTES


def test_plain_documents_still_load() -> None:
    assert safe_yaml.load("a: [1, 2.5, null, true, x]\nb: {c: d}\n", SpecError, "doc", "spec") == {
        "a": [1, 2.5, None, True, "x"], "b": {"c": "d"}}
    assert safe_yaml.load("", SpecError, "doc", "spec") is None
