"""Bundle signatures (OpenSSF model-signing, EC P-256 key pair, offline): sign, verify, and every way a
bundle can stop matching its signature."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("model_signing")

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

import eecompile  # noqa: E402
from eecompile.bundle import SIGNATURE, Bundle, update_bundle  # noqa: E402
from eecompile.errors import SignatureError  # noqa: E402
from eecompile.signing import sign_bundle, verify_bundle  # noqa: E402
from tests.bad_inputs.util import expect_error, invoke, snapshot  # noqa: E402
from tests.security.util import edit_manifest, rehash  # noqa: E402


def _key_pair(root: Path, name: str) -> tuple[Path, Path]:
    """An EC P-256 key pair in PEM, as `openssl ecparam -genkey -name prime256v1` makes."""
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = root / f"{name}.pem", root / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture
def signed(ws: Path) -> tuple[Path, Path, Path]:
    """(bundle, private key, public key) with the bundle signed through the CLI."""
    keys = ws.parent / "keys"
    keys.mkdir()
    private, public = _key_pair(keys, "alice")
    b = ws / "b.eebundle"
    r = invoke(["sign", b, "--private-key", private])
    assert r.exit_code == 0, r.output
    assert (b / SIGNATURE).is_file()
    return b, private, public


def _verify(b: Path, public: Path, *needles: str) -> None:
    expect_error(["verify-signature", b, "--public-key", public], SignatureError, *needles)


def test_sign_then_verify(signed: tuple[Path, Path, Path]) -> None:
    b, _, public = signed
    r = invoke(["verify-signature", b, "--public-key", public])
    assert r.exit_code == 0 and "signature holds" in r.output, r.output
    assert SIGNATURE not in Bundle.load(b).manifest.files  # the signature is not in the hashed set
    runner = eecompile.load(b, public_key=public)
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    assert runner.run({"x": x}).outputs["logits"].shape == (4, 4)


def test_tampered_segment_with_recomputed_hash_is_refused(signed: tuple[Path, Path, Path]) -> None:
    """The manifest's hashes are recomputed, as an attacker would: only the signature catches it."""
    b, _, public = signed
    seg = b / "segments" / "seg1.onnx"
    seg.write_bytes(seg.read_bytes() + b"\0")
    rehash(b, "segments/seg1.onnx")
    Bundle.load(b)  # the hashes agree again
    _verify(b, public, "segments/seg1.onnx", "changed", "manifest.yaml", "publisher")
    ws = b.parent
    expect_error(["run", b, "--data", ws / "data.npz", "-o", ws / "out.npz", "--public-key", public],
                 SignatureError, "segments/seg1.onnx", "changed", workspace=ws)
    with pytest.raises(SignatureError, match="seg1.onnx"):
        eecompile.load(b, public_key=public)


def test_tampered_threshold_in_the_manifest_is_refused(signed: tuple[Path, Path, Path]) -> None:
    b, _, public = signed
    edit_manifest(b, lambda d: d["segments"][0]["exit"]["gate"].__setitem__("threshold", 0.0))
    _verify(b, public, "'manifest.yaml' changed")
    ws = b.parent
    expect_error(["bench", b, "--data", ws / "data.npz", "--public-key", public], SignatureError,
                 "manifest.yaml", workspace=ws)


def test_added_and_removed_files_are_named(signed: tuple[Path, Path, Path]) -> None:
    b, _, public = signed
    (b / "heads" / "extra.onnx").write_bytes(b"x")
    _verify(b, public, "added since signing", "heads/extra.onnx")
    (b / "heads" / "extra.onnx").unlink()
    (b / "heads" / "exit1.onnx").unlink()
    _verify(b, public, "removed since signing", "heads/exit1.onnx")


def test_resigned_with_another_key_is_refused(signed: tuple[Path, Path, Path]) -> None:
    b, _, public = signed
    mallory, mallory_pub = _key_pair(b.parent.parent / "keys", "mallory")
    edit_manifest(b, lambda d: d["segments"][0]["exit"]["gate"].__setitem__("threshold", 0.0))
    sign_bundle(b, mallory)
    verify_bundle(b, mallory_pub)  # holds for mallory's key...
    _verify(b, public, "another key", str(public))  # ...not for alice's


def test_unsigned_bundle_with_a_public_key_is_refused(ws: Path) -> None:
    keys = ws.parent / "keys"
    keys.mkdir()
    _, public = _key_pair(keys, "alice")
    b = ws / "b.eebundle"
    _verify(b, public, "unsigned", SIGNATURE, "eecompile sign")
    with pytest.raises(SignatureError, match="unsigned"):
        eecompile.load(b, public_key=public)
    with pytest.raises(SignatureError, match="unsigned"):
        Bundle.load(b, public_key=public)
    expect_error(["run", b, "--data", ws / "data.npz", "-o", ws / "out.npz", "--public-key", public],
                 SignatureError, "unsigned", workspace=ws)


def test_damaged_signature_and_missing_key(signed: tuple[Path, Path, Path]) -> None:
    b, private, public = signed
    _verify(b, b.parent / "nope.pem", "nope.pem", "no such public key")
    expect_error(["sign", b, "--private-key", b.parent / "nope.pem"], SignatureError, "no such private key")
    expect_error(["sign", b, "--private-key", public], SignatureError, "cannot sign with this key")
    (b / SIGNATURE).write_text("{not json")
    _verify(b, public, SIGNATURE, "unreadable or invalid signature")


def test_rewriting_a_signed_bundle_drops_its_signature(signed: tuple[Path, Path, Path],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    b, private, public = signed
    with caplog.at_level(logging.WARNING):
        update_bundle(b, lambda tmp, m: m.notes.append("rewritten"))
    assert not (b / SIGNATURE).exists()
    assert any("signature" in r.getMessage() and "eecompile sign" in r.getMessage() for r in caplog.records)
    _verify(b, public, "unsigned")
    sign_bundle(b, private)
    verify_bundle(b, public)


def test_sign_refuses_a_damaged_bundle(signed: tuple[Path, Path, Path]) -> None:
    b, private, _ = signed
    seg = b / "segments" / "seg0.onnx"
    seg.write_bytes(seg.read_bytes() + b"\0")
    before = snapshot(b)
    expect_error(["sign", b, "--private-key", private], Exception, "seg0.onnx", "sha256")
    assert snapshot(b) == before
