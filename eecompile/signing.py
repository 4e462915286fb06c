"""Bundle signatures with OpenSSF model-signing: an EC key pair, offline.

``sign_bundle`` hashes every file of a bundle (the manifest included, the signature file itself excluded)
and signs the list with a private key (an EC P-256 key in PEM, as ``openssl ecparam -genkey -name
prime256v1 -noout -out key.pem`` makes; ``openssl ec -in key.pem -pubout -out pub.pem`` gives the public
half). The signature is a Sigstore bundle (DSSE envelope over an in-toto statement), written to
``BUNDLE/bundle.sig``. ``verify_bundle`` checks it against a public key: the key must be the signer's, and
the bundle's files must be exactly the signed ones (none changed, added or removed).

The manifest's sha256 list protects against accidental damage only: anyone who changes a file can
recompute its hash. The signature protects against tampering and says who published the bundle. See
docs/security.md for the trust model.

``model_signing`` (and ``pyopenssl``, which it imports without declaring) are imported inside the functions:
the device runtime does not need them unless it checks signatures (``pip install eecompile[sign]``).
"""

from __future__ import annotations

import ast
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from eecompile.bundle import SIGNATURE, Bundle, refuse_symlinks
from eecompile.errors import BackendError, SignatureError


def _model_signing() -> Any:
    try:
        import model_signing.hashing
        import model_signing.signing
        import model_signing.verifying
    except ImportError as e:
        raise BackendError(f"signing needs the model-signing package ({e}); install it with "
                           f"`pip install 'eecompile[sign]'`") from e
    return model_signing


def _hashing_config(ms: Any) -> Any:
    # Git files are hashed like any other: a bundle is not a repository, and nothing in it goes unsigned.
    return ms.hashing.Config().set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False)


def _key_file(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise SignatureError(f"{p}: no such {what} file; give a PEM file (an EC P-256 key, e.g. made with "
                             f"`openssl ecparam -genkey -name prime256v1 -noout -out key.pem`)")
    return p


def sign_bundle(bundle: str | Path, private_key: str | Path, password: str | None = None) -> Path:
    """Sign ``bundle`` with ``private_key`` (PEM, EC P-256/384/521) and write ``BUNDLE/bundle.sig``.

    The bundle's hashes are checked first (a damaged bundle is not signed). The signature is written
    atomically (a temporary file beside the bundle, then a rename). Returns the signature's path.
    Raises BundleError for a damaged or unconfined bundle, SignatureError for a key that cannot be read,
    BackendError when model-signing is not installed."""
    ms = _model_signing()
    b = Bundle.load(bundle)
    key = _key_file(private_key, "private key")
    dest = b.path / SIGNATURE
    fd, tmp = tempfile.mkstemp(prefix=f".{b.path.name}.sig-", dir=b.path.absolute().parent)
    os.close(fd)
    try:
        config = ms.signing.Config().use_elliptic_key_signer(private_key=key, password=password)
        config.set_hashing_config(_hashing_config(ms)).sign(b.path, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dest)
    except (ValueError, TypeError) as e:
        raise SignatureError(f"{key}: cannot sign with this key ({_first_line(e)}); give an unencrypted EC "
                             f"private key in PEM (or its password)") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def verify_bundle(bundle: str | Path, public_key: str | Path) -> None:
    """Check ``BUNDLE/bundle.sig`` against ``public_key`` (PEM): signed by that key's owner, and every file
    exactly as signed. Raises SignatureError (a BundleError) naming what differs: no signature, another
    signer, a file changed, added or removed; BackendError when model-signing is not installed."""
    ms = _model_signing()
    path = Path(bundle)
    key = _key_file(public_key, "public key")
    sig = path / SIGNATURE
    if not sig.is_file():
        raise SignatureError(f"{path}: unsigned bundle (no {SIGNATURE}); refusing it because a public key was "
                             f"given: get a signed copy from its publisher, or sign it with `eecompile sign`")
    refuse_symlinks(path)
    config = ms.verifying.Config().use_elliptic_key_verifier(public_key=key)
    try:
        config.set_hashing_config(_hashing_config(ms)).verify(path, sig)
    except ValueError as e:
        if str(e).startswith(("Signature mismatch", "Key mismatch")):
            raise SignatureError(f"{path}: signature does not hold: {_difference(e, key)}; do not use this "
                                 f"bundle: get it again from its publisher") from e
        raise SignatureError(f"{sig}: unreadable or invalid signature ({type(e).__name__}: {_first_line(e)}); "
                             f"do not use this bundle: get it again from its publisher") from e
    except Exception as e:  # a damaged signature file: JSON or protobuf errors from the Sigstore reader
        raise SignatureError(f"{sig}: unreadable or invalid signature ({type(e).__name__}: {_first_line(e)}); get the "
                             f"bundle again from its publisher") from e


def _difference(e: ValueError, key: Path) -> str:
    """model-signing's mismatch message, reduced to one line naming the files."""
    text = str(e)
    if text.startswith("Key mismatch"):
        return f"it was signed with another key, not the one in {key}"
    if text.startswith("Signature mismatch: "):
        try:
            items = ast.literal_eval(text[len("Signature mismatch: "):])
        except (ValueError, SyntaxError):
            items = [text]
        out = []
        for item in items if isinstance(items, list) else [text]:
            item = str(item)
            if m := re.match(r"Hash mismatch for '(.*)': Expected", item):
                out.append(f"'{m.group(1)}' changed")
            elif m := re.match(r"Extra files found in model '.*?': (.*)", item):
                out.append(f"added since signing: {m.group(1)}")
            elif m := re.match(r"Missing files in model '.*?': (.*)", item):
                out.append(f"removed since signing: {m.group(1)}")
            else:
                out.append(_first_line(item))
        return "; ".join(out)
    return _first_line(e)


def _first_line(e: object) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
