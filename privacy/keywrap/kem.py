"""A silo's X25519 KEM key pair for one run: generate, save (0600, atomic), load, fingerprint."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

from fedsilo.core.atomic import atomic_write_with
from fedsilo.privacy.keywrap.wire import KEM_PUBLIC_BYTES, KeyWrapError, _as_bytes


_KEY_MODE = 0o600


@dataclass(frozen=True, kw_only=True)
class KemKeyPair:
    """A silo's X25519 key pair for one run; its public half is published when it joins.

    Attributes:
        private_key: The X25519 private key. Never leaves the silo.
    """

    private_key: x25519.X25519PrivateKey = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.private_key, x25519.X25519PrivateKey):
            raise TypeError(
                f"private_key must be an X25519PrivateKey, not {type(self.private_key).__name__}"
            )

    @classmethod
    def generate(cls) -> KemKeyPair:
        """Creates a fresh key pair.

        Returns:
            A new key pair; call `save` before publishing its public key.
        """
        return cls(private_key=x25519.X25519PrivateKey.generate())

    def public_bytes(self) -> bytes:
        """The public key to publish when joining a run.

        Returns:
            The 32-byte raw X25519 public key.
        """
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def save(self, path: Path | str) -> Path:
        """Writes the private key as PEM (PKCS#8), mode 0600, atomically.

        The key goes to a temporary file in the same directory (mode 0600), is
        flushed to disk, then renamed over ``path``, so a crash leaves either the old
        file or the new one, never half of one.

        Args:
            path: Where to write, e.g. ``state/<run_id>/kem.key``. Its directory must exist.

        Returns:
            The path written.

        Raises:
            KeyWrapError: If the file cannot be written.
        """
        path = Path(path)
        data = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            _write_atomic(path, data)
        except OSError as exc:
            raise KeyWrapError(
                f"cannot write the KEM key to {str(path)!r}: {exc.strerror or exc}; check that "
                "the directory exists and this silo agent may write to it"
            ) from None
        return path

    @classmethod
    def load(cls, path: Path | str) -> KemKeyPair:
        """Reads a key pair written by `save` (PEM PKCS#8) or a raw 32-byte private key.

        Args:
            path: The key file.

        Returns:
            The key pair.

        Raises:
            KeyWrapError: If the file is missing, unreadable, or not an X25519 private key.
        """
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise KeyWrapError(
                f"KEM key file {str(path)!r} does not exist; this silo cannot receive the run's "
                "encryption key without it: re-join the run to create and publish a new one"
            ) from None
        except OSError as exc:
            raise KeyWrapError(
                f"cannot read KEM key file {str(path)!r}: {exc.strerror or exc}; check its "
                "permissions (it should be readable by the silo agent only, mode 0600)"
            ) from None
        if data.lstrip().startswith(b"-----BEGIN "):
            try:
                key = serialization.load_pem_private_key(data, password=None)
            except TypeError:
                raise KeyWrapError(
                    f"KEM key file {str(path)!r} is password-protected; fedsilo needs the "
                    "unencrypted key it wrote itself: re-join the run to create a new one"
                ) from None
            except (ValueError, UnsupportedAlgorithm):
                key = None
            if not isinstance(key, x25519.X25519PrivateKey):
                raise KeyWrapError(
                    f"KEM key file {str(path)!r} does not hold an X25519 private key; it may have "
                    "been overwritten by another file: re-join the run to create a new one"
                )
            return cls(private_key=key)
        if len(data) == KEM_PUBLIC_BYTES:
            return cls(private_key=x25519.X25519PrivateKey.from_private_bytes(data))
        raise KeyWrapError(
            f"KEM key file {str(path)!r} is neither a PEM private key nor a raw 32-byte key "
            f"({len(data)} bytes); re-join the run to create a new one"
        )


def kem_public_fingerprint(public: bytes) -> str:
    """A short, stable name for a KEM public key, for logs and for comparing by eye.

    Args:
        public: A 32-byte raw X25519 public key.

    Returns:
        ``"sha256:"`` followed by the first 32 hex digits of the key's SHA-256.

    Raises:
        KeyWrapError: If ``public`` is not 32 bytes.
    """
    public = _as_bytes(public, "KEM public key")
    if len(public) != KEM_PUBLIC_BYTES:
        raise KeyWrapError(
            f"a KEM public key is {KEM_PUBLIC_BYTES} bytes, this one is {len(public)}"
        )
    return "sha256:" + hashlib.sha256(public).hexdigest()[:32]


def _write_atomic(path: Path, data: bytes) -> None:
    def write(handle: BinaryIO) -> None:
        os.fchmod(handle.fileno(), _KEY_MODE)  # also when a stale temporary file was looser
        handle.write(data)

    atomic_write_with(path, write, mode=_KEY_MODE)
