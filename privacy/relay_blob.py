"""A blob a silo relays through the coordinator (sealed for the other silos), signed with its certificate key."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fedsilo.privacy.pki import validate_name
from fedsilo.privacy.signed import (
    SIGNATURE_BYTES,
    DocumentError,
    FieldError,
    SignatureError,
    SignedDocument,
    check_created_at,
    is_printable_run_id,
    now_text,
    own_signer,
    parse_str,
)

__all__ = ["RELAY_BLOB_FORMAT", "RelayBlob", "RelayBlobError", "sign_relay_blob"]

RELAY_BLOB_FORMAT = "fedsilo-relay-blob-v1"

#: A sealing purpose: 1..64 chars of [a-z0-9./-], starting alphanumeric (e.g. "style-bank", "fedrdn-stats/v1").
_PURPOSE_RE = re.compile(r"[a-z0-9][a-z0-9./-]{0,63}")


class RelayBlobError(DocumentError):
    """A relayed blob is malformed, not canonical, not from the silo it names, or does not verify
    (``field`` names the field at fault)."""


@dataclass(frozen=True, kw_only=True)
class RelayBlob(SignedDocument):
    """What a silo publishes through the sealed relay: its sealed bytes, bound to the run, the purpose
    and the silo by its own signature.

    The payload stays sealed for the run's silos (AES-GCM under the run's shared secret, which the
    coordinator never holds); the signature says *which* silo sealed it, which the shared secret
    alone cannot (every silo holds it). A receiver trusts a blob only after :meth:`verify` against
    the federation CA and a check that the run, purpose and silo are the ones it asked for.

    Attributes:
        run_id: The run (printable, at most 256 UTF-8 bytes).
        purpose: What the bytes are sealed as (the sealing purpose the payload's encryption
            authenticates), 1..64 chars of [a-z0-9./-].
        silo: The publishing silo; its certificate's CN.
        payload: The sealed bytes (base64 in the JSON form).
        created_at: When the silo signed it, UTC, ``YYYY-MM-DDTHH:MM:SS.ffffffZ``.
        certificate: The silo's federation certificate (PEM) whose key signed it.
        signature: Raw 64-byte signature over the canonical JSON of every other field.
    """

    run_id: str
    purpose: str
    silo: str
    payload: bytes = field(repr=False)
    created_at: str
    certificate: str = field(repr=False)
    signature: bytes = field(repr=False)

    FORMAT: ClassVar[str] = RELAY_BLOB_FORMAT

    def __post_init__(self) -> None:
        if not is_printable_run_id(self.run_id):
            raise ValueError(f"invalid field run_id {self.run_id!r}: expected printable text of 1..256 bytes")
        if not isinstance(self.purpose, str) or not _PURPOSE_RE.fullmatch(self.purpose):
            raise ValueError(f"invalid field purpose {self.purpose!r}: expected 1..64 chars of [a-z0-9./-]")
        try:
            validate_name(self.silo)
        except ValueError as exc:
            raise ValueError(f"invalid field silo: {exc}") from None
        if isinstance(self.payload, (bytearray, memoryview)):
            object.__setattr__(self, "payload", bytes(self.payload))
        if not isinstance(self.payload, bytes) or not self.payload:
            raise ValueError("invalid field payload: expected 1 or more sealed bytes")
        check_created_at(self.created_at)
        self._check_signed_fields()

    @classmethod
    def from_json(cls, data: str | bytes | Mapping[str, Any]) -> RelayBlob:
        """Parses `to_json` text (exactly; any other spelling is refused). Does not verify the signature.

        Raises:
            RelayBlobError: not a well-formed, canonical relay blob; the message names the field.
        """
        return cls._decode(data, what="relay blob",
                           refuse=lambda message, field_: RelayBlobError(message, field=field_))

    def _not_canonical(self) -> RelayBlobError:
        return RelayBlobError(f"relay blob of silo {self.silo!r} is not in canonical form (the text differs "
                              "from what the silo signed)")

    def verify(self, *, ca_pem: bytes | str, run_id: str, purpose: str, silo: str) -> None:
        """Checks that the blob is ``silo``'s for (``run_id``, ``purpose``) and signed with its certificate.

        Raises:
            RelayBlobError: naming what is wrong (another run, purpose or silo, a certificate not from
                the CA or not that silo's, or a signature that does not match).
        """
        for name, want in (("run_id", run_id), ("purpose", purpose), ("silo", silo)):
            if getattr(self, name) != want:
                raise RelayBlobError(f"relay blob {name} is {getattr(self, name)!r}, expected {want!r}", field=name)
        self.verify_signature(ca_pem, what="relay blob", consequence="ignore this blob",
                              only="only a silo publishes relay blobs", error=RelayBlobError)

    @classmethod
    def _from_mapping(cls, data: Mapping[str, Any]) -> RelayBlob:
        values: dict[str, Any] = {"signature": cls._envelope(data, what="relay blob")}
        for name in ("run_id", "purpose", "silo", "payload", "created_at", "certificate"):
            try:
                values[name] = parse_str(data[name], name)
            except ValueError as exc:
                raise FieldError(str(exc), field=name) from None
        try:
            values["payload"] = base64.b64decode(values["payload"].encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise FieldError("invalid field payload: not base64", field="payload") from None
        try:
            return cls(**values)
        except ValueError as exc:
            name = str(exc).removeprefix("invalid field ").split(" ", 1)[0].rstrip(":")
            raise FieldError(str(exc), field=name if name in values else None) from None

    def _unsigned_dict(self) -> dict[str, Any]:
        """Every field but the signature as JSON values: what `canonical_bytes` encodes."""
        return {
            "format": RELAY_BLOB_FORMAT,
            "run_id": self.run_id,
            "purpose": self.purpose,
            "silo": self.silo,
            "payload": base64.b64encode(self.payload).decode("ascii"),
            "created_at": self.created_at,
            "certificate": self.certificate,
        }


def sign_relay_blob(*, run_id: str, purpose: str, silo: str, payload: bytes, certificate_pem: bytes | str,
                    private_key_pem: bytes | str) -> RelayBlob:
    """Signs ``payload`` (already sealed) for the relay now, with this silo's certificate key.

    Raises:
        ValueError: naming a bad field.
        RelayBlobError: the certificate is not silo ``silo``'s, or the key is not its key.
    """
    cert = certificate_pem.decode("ascii") if isinstance(certificate_pem, bytes) else certificate_pem
    key = private_key_pem.encode("ascii") if isinstance(private_key_pem, str) else private_key_pem
    unsigned = RelayBlob(run_id=run_id, purpose=purpose, silo=silo, payload=payload, created_at=now_text(),
                         certificate=cert, signature=bytes(SIGNATURE_BYTES))
    try:
        signer = own_signer(cert.encode("ascii"), key, name=silo, purpose="relay blobs")
    except SignatureError as exc:
        raise RelayBlobError(str(exc), field="certificate") from None
    return unsigned.signed_with(signer)
