"""A silo's side of homomorphic aggregation: the key ceremony, encrypting updates, decrypting sums."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np

from fedsilo.core.atomic import atomic_write_with
from fedsilo.core.configfile import TlsFiles
from fedsilo.privacy.he import FixedPoint, HeError, HeParams, SecretContext
from fedsilo.privacy.keywrap import (
    KemKeyPair,
    KeyWrapError,
    announce_kem_public,
    unwrap_key,
    verify_kem_announcement,
    wrap_key,
)
from fedsilo.silo_agent.client import CoordinatorClient, Stopped

log = logging.getLogger("fedsilo.agent")

KEY_POLL_S = 1.0


class KeyCeremonyError(Exception):
    """The run's key could not be obtained safely; the message says why."""


_SEAL_MAGIC = b"FSSEAL1\0"
_NONCE_BYTES = 12


def _seal_key(secret: bytes, *, run_id: str, purpose: str) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    info = b"fedsilo seal v1\0" + purpose.encode() + b"\0" + run_id.encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _seal_aad(*, run_id: str, purpose: str, silo: str) -> bytes:
    return b"\0".join([_SEAL_MAGIC, purpose.encode(), run_id.encode(), silo.encode()])


def seal(secret: bytes, data: bytes, *, run_id: str, purpose: str, silo: str) -> bytes:
    """Encrypts ``data`` for the run's silos: AES-256-GCM under a key derived (HKDF-SHA256) from the
    run's shared secret key, which the coordinator never holds. The run, the purpose and the
    publishing silo are authenticated, so the coordinator can neither read a sealed blob nor pass
    it off as another silo's or another run's."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(_NONCE_BYTES)
    key = _seal_key(secret, run_id=run_id, purpose=purpose)
    return _SEAL_MAGIC + nonce + AESGCM(key).encrypt(nonce, data, _seal_aad(run_id=run_id, purpose=purpose, silo=silo))


def open_sealed(secret: bytes, blob: bytes, *, run_id: str, purpose: str, silo: str) -> bytes:
    """Decrypts a blob made by :func:`seal` for (run, purpose, silo).

    Raises:
        ValueError: not a sealed blob, or it fails authentication (tampered, another silo's, another run's).
    """
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    head = len(_SEAL_MAGIC) + _NONCE_BYTES
    if len(blob) < head + 16 or not blob.startswith(_SEAL_MAGIC):
        raise ValueError("not a sealed fedsilo blob")
    nonce = blob[len(_SEAL_MAGIC):head]
    key = _seal_key(secret, run_id=run_id, purpose=purpose)
    try:
        return AESGCM(key).decrypt(nonce, blob[head:], _seal_aad(run_id=run_id, purpose=purpose, silo=silo))
    except InvalidTag:
        raise ValueError(f"sealed {purpose} of {silo!r} fails authentication (tampered, or not that silo's for "
                         f"run {run_id!r})") from None


def write_private(path: Path, data: bytes) -> None:
    """Writes secret material: mode 0600, temp file, fsync, rename."""
    atomic_write_with(path, lambda f: f.write(data), mode=0o600)


class HeSession:
    """Holds a silo's KEM key pair and, once the ceremony is done, the run's secret HE key.

    The key holder (the run's first enrolled silo) generates the secret key and wraps it for
    every other silo with X25519 + HKDF + AES-GCM, signed with its certificate key; the others
    verify that signature against the federation CA before they use the key, so the coordinator,
    which relays the wrapped keys, can neither read nor substitute them. Both key files live in
    the agent's state dir with mode 0600 and survive restarts.

    Args:
        run_id: the run.
        me: this silo's name (its certificate's common name).
        params: the run's public HE parameters.
        key_holder: the silo that generates the key.
        state_dir: where the key files are kept.
        tls: this silo's CA, certificate and key (the ceremony signs and verifies with them).
    """

    def __init__(self, *, run_id: str, me: str, params: HeParams, key_holder: str, state_dir: Path,
                 tls: TlsFiles) -> None:
        self.run_id, self.me, self.params, self.key_holder = run_id, me, params, key_holder
        self.codec = FixedPoint(params=params)
        self._ca = Path(tls.ca).read_bytes()
        self._cert = Path(tls.cert).read_bytes()
        self._key = Path(tls.key).read_bytes()
        state_dir.mkdir(parents=True, exist_ok=True)
        kem_path = state_dir / "kem.key"
        self.kem = KemKeyPair.load(kem_path) if kem_path.exists() else KemKeyPair.generate()
        if not kem_path.exists():
            self.kem.save(kem_path)
        self.announcement = announce_kem_public(run_id=run_id, silo=me, public=self.kem.public_bytes(),
                                                certificate_pem=self._cert, private_key_pem=self._key)
        self._secret_path = state_dir / f"he-secret-{params.fingerprint()[:16]}.key"
        self.context: SecretContext | None = None
        if self._secret_path.exists():
            self.context = SecretContext.from_secret_key(params, self._secret_path.read_bytes())
        self._rng = np.random.default_rng()

    @property
    def is_key_holder(self) -> bool:
        """Whether this silo generates the run's key."""
        return self.me == self.key_holder

    def ensure_key(self, client: CoordinatorClient, stop: threading.Event) -> None:
        """Generates (key holder) or fetches and verifies (others) the run's secret key.

        Raises:
            KeyCeremonyError: a wrapped key that fails verification (tampered, replayed, wrong
                recipient, foreign issuer certificate) — it is never used.
            Stopped: ``stop`` was set while waiting for the key holder.
        """
        if self.context is not None:
            return
        if self.is_key_holder:
            self.context = SecretContext.generate(self.params)
            write_private(self._secret_path, self.context.secret_key_bytes())
            log.info("generated the run's HE secret key (key holder)")
            return
        log.info("waiting for the key holder %s to wrap the run's key for this silo", self.key_holder)
        while True:
            blob = client.wrapped_key()
            if blob is not None:
                break
            if stop.wait(KEY_POLL_S):
                raise Stopped("waiting for the wrapped key")
        try:
            secret = unwrap_key(blob, run_id=self.run_id, me=self.me, my_keypair=self.kem, ca_pem=self._ca,
                                expected_issuer=self.key_holder, params_fingerprint=self.params.fingerprint())
        except KeyWrapError as exc:
            raise KeyCeremonyError(f"refusing the wrapped key relayed by the coordinator: {exc}") from None
        self.context = SecretContext.from_secret_key(self.params, secret)
        write_private(self._secret_path, secret)
        log.info("received and verified the run's HE key from %s", self.key_holder)

    def serve_recipients(self, client: CoordinatorClient) -> int:
        """Key holder: wraps the key for every joined silo still waiting; returns how many.

        A silo whose announcement does not verify (not signed by a federation certificate of
        that silo, e.g. substituted by the coordinator) gets nothing; the refusal is logged.
        """
        assert self.is_key_holder and self.context is not None
        entries = []
        for name, announcement in client.key_recipients():
            try:
                public = verify_kem_announcement(announcement, run_id=self.run_id, expected_silo=name, ca_pem=self._ca)
            except KeyWrapError as exc:
                log.error("not wrapping the key for %s: its key announcement does not verify: %s", name, exc)
                continue
            wrapped = wrap_key(secret=self.context.secret_key_bytes(), run_id=self.run_id, issuer=self.me,
                               issuer_certificate_pem=self._cert, issuer_private_key_pem=self._key,
                               params_fingerprint=self.params.fingerprint(), recipient=name, recipient_public=public)
            entries.append((name, wrapped.to_bytes()))
        if entries:
            client.publish_wrapped_keys(entries)
            log.info("wrapped the run's key for %s", ", ".join(n for n, _ in entries))
        return len(entries)

    def encrypt(self, weighted: np.ndarray) -> list[bytes]:
        """Quantizes and encrypts ``w_i * u_i`` (flat float64); logs values clipped to the bound."""
        assert self.context is not None
        ints, clipped = self.codec.encode(np.ravel(weighted), self._rng)
        if clipped:
            log.warning("%d value(s) of the weighted update exceeded the HE bound %g and were clipped", clipped,
                        self.codec.bound if self.codec.bound is not None else self.params.bound)
        return self.context.encrypt(ints)

    def seal(self, data: bytes, *, purpose: str) -> bytes:
        """Seals ``data`` from this silo for the run's other silos (see :func:`seal`) and signs the sealed
        bytes with this silo's certificate key: the relay blob (``fedsilo.privacy.relay_blob``) says
        which silo made it, which the run's shared secret alone cannot."""
        from fedsilo.privacy.relay_blob import sign_relay_blob

        assert self.context is not None
        sealed = seal(self.context.secret_key_bytes(), data, run_id=self.run_id, purpose=purpose, silo=self.me)
        return sign_relay_blob(run_id=self.run_id, purpose=purpose, silo=self.me, payload=sealed,
                               certificate_pem=self._cert, private_key_pem=self._key).to_json().encode("ascii")

    def open_sealed(self, blob: bytes, *, purpose: str, silo: str) -> bytes:
        """Opens a relay blob ``silo`` published: verifies it is that silo's (its certificate from the
        federation CA, its signature, this run and purpose), then opens the sealed bytes.

        Raises:
            ValueError: a blob that is malformed, not that silo's, or fails authentication.
        """
        from fedsilo.privacy.relay_blob import RelayBlob, RelayBlobError

        assert self.context is not None
        try:
            doc = RelayBlob.from_json(blob)
            doc.verify(ca_pem=self._ca, run_id=self.run_id, purpose=purpose, silo=silo)
        except RelayBlobError as exc:
            raise ValueError(f"relay blob of {silo!r} refused: {exc}") from None
        return open_sealed(self.context.secret_key_bytes(), doc.payload, run_id=self.run_id, purpose=purpose,
                           silo=silo)

    def decrypt_sum(self, blobs: list[bytes], n: int, contributors: int | None = None) -> np.ndarray:
        """The decrypted sum of the contributors' ``w_i * u_i`` (float64, ``n`` values).

        Every honest upload is clipped to the public bound before it is encrypted, so the sum of
        ``contributors`` uploads lies within ``contributors * bound``; a sum beyond it proves that
        some upload was not encoded honestly (encrypted values outside the bound, or under another
        key). Values out of bound but within that total cannot be told apart without range proofs.

        Raises:
            HeError: a ciphertext does not decrypt (e.g. no noise budget: encrypted under another
                key), or the sum lies outside what ``contributors`` honest uploads can add up to.
        """
        assert self.context is not None
        total = self.codec.decode(self.context.decrypt(blobs, n))
        if contributors is not None and total.size:
            limit = contributors * float(self.codec.bound)
            worst = float(np.max(np.abs(total)))
            if not worst <= limit * (1 + 1e-9):
                raise HeError(f"the decrypted sum reaches {worst:.3g}, beyond what {contributors} upload(s) within "
                              f"the public bound {self.codec.bound:g} can add up to ({limit:.3g}): an upload was "
                              "encoded outside the bound or encrypted under another key")
        return total
