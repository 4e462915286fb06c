"""The manifest is checked against its schema on load: one BundleError naming the manifest path of the
problem (``segments[1].inputs[0].batch_axis``) and saying to recompile, never an internal error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from eecompile.bundle import Bundle
from eecompile.errors import BundleError
from tests.bad_inputs.util import expect_error
from tests.security.util import edit_manifest


def _run(ws: Path) -> list:
    return ["run", ws / "b.eebundle", "--data", ws / "data.npz", "-o", ws / "out.npz"]


def _set(path: list[Any], value: Any) -> Any:
    def change(d: dict) -> None:
        for k in path[:-1]:
            d = d[k]
        if value is _DELETE:
            del d[path[-1]]
        else:
            d[path[-1]] = value
    return change


_DELETE = object()

CASES = [
    # (what, manifest keys, new value, words the message must hold)
    ("carried tensor without a batch axis", ["segments", 1, "inputs", 0, "batch_axis"], _DELETE,
     ["segments[1].inputs[0].batch_axis", "missing"]),
    ("format_version 0", ["format_version"], 0, ["format_version", "positive integer", "0"]),
    ("format_version -7", ["format_version"], -7, ["format_version", "positive integer", "-7"]),
    ("format_version true", ["format_version"], True, ["format_version", "positive integer", "True"]),
    ("format_version '1'", ["format_version"], "1", ["format_version", "positive integer", "'1'",
                                                     "without quotes"]),
    ("unknown dtype", ["segments", 0, "outputs", 0, "dtype"], "float33",
     ["segments[0].outputs[0].dtype", "unknown dtype", "float33"]),
    ("batch axis beyond the rank", ["segments", 1, "inputs", 0, "batch_axis"], 2,
     ["segments[1].inputs[0].batch_axis", "beyond", "rank 2"]),
    ("negative batch axis", ["inputs", 0, "batch_axis"], -1, ["inputs[0].batch_axis", ">= 0"]),
    ("non-numeric threshold", ["segments", 0, "exit", "gate", "threshold"], "high",
     ["segments[0].exit.gate.threshold", "expected a number", "'high'"]),
    ("threshold a list", ["segments", 1, "exit", "gate", "threshold"], [0.5],
     ["segments[1].exit.gate.threshold", "a list"]),
    ("segments a mapping", ["segments"], {"a": 1}, ["segments", "expected a list"]),
    ("shape with a float", ["outputs", 0, "shape", 1], 4.5, ["outputs[0].shape[1]", "integer"]),
    ("tensor name missing", ["segments", 0, "inputs", 0, "name"], _DELETE, ["segments[0].inputs[0].name",
                                                                           "missing"]),
    ("carried name not an output", ["segments", 0, "carried_out", 0], "nope",
     ["segments[0].carried_out[0]", "'nope'"]),
    ("segments out of order", ["segments", 1, "index"], 5, ["segments[1].index", "expected 1"]),
    ("unknown batch mode", ["batch_mode"], "sometimes", ["batch_mode", "sometimes"]),
    ("bad file hash", ["files", "segments/seg0.onnx"], 12, ["files['segments/seg0.onnx']", "sha256"]),
    ("carried tensor dropped", ["segments", 1, "carried_out"], [], ["segments[2].inputs[0]", "'h1'",
                                                                   "carried out"]),
    ("gate output unknown", ["segments", 0, "exit", "gate", "output"], "zz",
     ["segments[0].exit.gate.output", "'zz'"]),
    ("gate score unknown", ["segments", 1, "exit", "gate", "score_output"], "zz",
     ["segments[1].exit.gate.score_output", "'zz'"]),
    ("misspelt gate kind", ["segments", 0, "exit", "gate", "kind"], "max_porb",
     ["segments[0].exit.gate.kind", "'max_porb'", "max_prob"]),
    ("exit output unknown", ["segments", 2, "exit", "outputs", "logits"], "zz",
     ["segments[2].exit.outputs.logits", "'zz'"]),
]


@pytest.mark.parametrize("what,keys,value,needles", CASES, ids=[c[0] for c in CASES])
def test_malformed_manifest_is_one_clear_error(ws: Path, what: str, keys: list, value: Any,
                                               needles: list[str]) -> None:
    b = ws / "b.eebundle"
    edit_manifest(b, _set(keys, value))
    with pytest.raises(BundleError) as info:
        Bundle.load(b, verify=False)
    msg = str(info.value)
    assert "manifest.yaml" in msg and "recompile" in msg, msg
    for n in needles:
        assert n.lower() in msg.lower(), (n, msg)
    expect_error(_run(ws), BundleError, "manifest.yaml", needles[0], workspace=ws)


def test_the_compiled_manifest_passes(ws: Path) -> None:
    m = Bundle.load(ws / "b.eebundle").manifest
    assert [s.inputs[0].batch_axis for s in m.segments] == [0, 0, 0]


def test_manifest_gate_kinds_are_the_spec_gate_kinds() -> None:
    """bundle.py checks gate kinds against names.GATE_KINDS (the runtime may not import spec.py's enum):
    a kind added to the spec must be added there too, or its bundles would be refused on load."""
    from eecompile import names
    from eecompile.spec import GateKind
    assert set(names.GATE_KINDS) == {k.value for k in GateKind}
