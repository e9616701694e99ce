"""PKI files on disk: reading PEM certificates and keys, and writing key pairs atomically."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedsilo.core.atomic import atomic_write_with
from fedsilo.privacy.pki.names import CertificateError

_KEY_MODE = 0o600
_CERT_MODE = 0o644


def load_pem(path: Path | str) -> bytes:
    """Reads a PEM file (certificate or key).

    Args:
        path: The file to read.

    Returns:
        The file's bytes.

    Raises:
        FileNotFoundError: If the file does not exist.
        CertificateError: If the file is not PEM (e.g. a DER or empty file).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"PEM file {str(path)!r} does not exist; check the path") from None
    if b"-----BEGIN " not in data:
        raise CertificateError(
            f"{str(path)!r} is not a PEM file (expected a '-----BEGIN ...' block)"
        )
    return data


def _resolve(path: Path) -> Path:
    return path.expanduser().resolve(strict=False)


def _load_cert(path: Path) -> x509.Certificate:
    data = load_pem(path)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise CertificateError(f"{path.name} is not a valid PEM certificate: {exc}") from None


def _load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    data = load_pem(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CertificateError(
            f"private key {path.name} is password-protected; fedsilo needs an unencrypted key"
        ) from None
    except ValueError as exc:
        raise CertificateError(f"{path.name} is not a valid PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(
            f"private key {path.name} is a {type(key).__name__}, expected an ECDSA key"
        )
    return key


def _refuse_existing(paths: Sequence[Path], *, what: str, hint: str) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise FileExistsError(
            f"refusing to overwrite {what}: {', '.join(existing)} already exist(s); {hint}"
        )


def _write_pair(
    cert_path: Path,
    cert: x509.Certificate,
    key_path: Path,
    key: ec.EllipticCurvePrivateKey,
    *,
    overwrite: bool,
) -> None:
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomic(key_path, key_bytes, mode=_KEY_MODE, overwrite=overwrite)
    try:
        _write_atomic(
            cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=_CERT_MODE,
            overwrite=overwrite,
        )
    except BaseException:
        if not overwrite:
            key_path.unlink(missing_ok=True)
        raise


def _write_atomic(path: Path, data: bytes, *, mode: int, overwrite: bool) -> None:
    """Writes via a temp file in the same directory, then renames (or links) it in.

    With ``overwrite`` this is `atomic_write_with` (the temp file is ``mode`` before any
    byte is written). Without it the temp file is created 0600 by `tempfile.mkstemp`, so
    key material is never readable by others, even briefly, and the final name is claimed
    with a hard link, which fails if the name already exists.
    """
    if overwrite:
        def write(handle: BinaryIO) -> None:
            os.fchmod(handle.fileno(), mode)  # also when a stale temporary file was looser
            handle.write(data)

        atomic_write_with(path, write, mode=mode)
        return
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(
                f"refusing to overwrite {str(path)!r}: it already exists"
            ) from None
        except OSError:
            # No hard links on this filesystem: check, then rename (tiny race window).
            if path.exists():
                raise FileExistsError(
                    f"refusing to overwrite {str(path)!r}: it already exists"
                ) from None
            os.replace(tmp, path)
        else:
            tmp.unlink()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
