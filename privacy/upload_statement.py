"""A silo's signed statement of what it uploaded for a round (the payload's SHA-256 and size), kept by the coordinator.

The coordinator adds ciphertexts it cannot read, so it cannot tell a poisoned upload from an
honest one. What it can keep is each sender's own signature over the digest of exactly the bytes
it sent: when a round's aggregate turns out undecryptable, the study can hold every contributor
to its upload (the statement verifies against the federation CA and the stored SHA-256).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
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
    parse_int,
    parse_str,
)

__all__ = ["UPLOAD_STATEMENT_FORMAT", "UploadStatement", "UploadStatementError", "sign_upload_statement",
           "statement_signer"]

UPLOAD_STATEMENT_FORMAT = "fedsilo-upload-statement-v1"

_HEX64 = re.compile(r"[0-9a-f]{64}")
#: Largest round number and payload size a statement can name.
_MAX_ROUND = 10**6
_MAX_BYTES = 2**50


class UploadStatementError(DocumentError):
    """An upload statement is malformed, not canonical, or does not verify for the upload it came with."""


@dataclass(frozen=True, kw_only=True)
class UploadStatement(SignedDocument):
    """"Silo S uploaded these bytes for round R of run X", signed with S's certificate key.

    Attributes:
        run_id: The run.
        round: The round the upload is for (>= 1).
        silo: The uploading silo; its certificate's CN.
        sha256: Hex SHA-256 of the upload's payload, exactly as streamed.
        payload_bytes: The payload's size.
        created_at: When the silo signed it, UTC.
        certificate: The silo's federation certificate (PEM) whose key signed it.
        signature: Raw 64-byte signature over the canonical JSON of every other field.
    """

    run_id: str
    round: int
    silo: str
    sha256: str
    payload_bytes: int
    created_at: str
    certificate: str = field(repr=False)
    signature: bytes = field(repr=False)

    FORMAT: ClassVar[str] = UPLOAD_STATEMENT_FORMAT

    def __post_init__(self) -> None:
        if not is_printable_run_id(self.run_id):
            raise ValueError(f"invalid field run_id {self.run_id!r}: expected printable text of 1..256 bytes")
        for name, top in (("round", _MAX_ROUND), ("payload_bytes", _MAX_BYTES)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
                raise ValueError(f"invalid field {name} {value!r}: expected a whole number in [1, {top}]")
        try:
            validate_name(self.silo)
        except ValueError as exc:
            raise ValueError(f"invalid field silo: {exc}") from None
        if not isinstance(self.sha256, str) or not _HEX64.fullmatch(self.sha256):
            raise ValueError("invalid field sha256: expected 64 lowercase hex characters")
        check_created_at(self.created_at)
        self._check_signed_fields()

    @classmethod
    def from_json(cls, data: str | bytes | Mapping[str, Any]) -> UploadStatement:
        """Parses `to_json` text (exactly; any other spelling is refused). Does not verify the signature.

        Raises:
            UploadStatementError: not a well-formed, canonical statement; the message names the field.
        """
        return cls._decode(data, what="upload statement",
                           refuse=lambda message, field_: UploadStatementError(message, field=field_))

    def _not_canonical(self) -> UploadStatementError:
        return UploadStatementError(f"upload statement of silo {self.silo!r} is not in canonical form (the text "
                                    "differs from what the silo signed)")

    def verify(self, *, ca_pem: bytes | str, run_id: str, round: int, silo: str, sha256: str,  # noqa: A002
               payload_bytes: int) -> None:
        """Checks that the statement is ``silo``'s, for exactly this upload, and signed with its certificate.

        Raises:
            UploadStatementError: naming what differs (run, round, silo, digest, size) or what does
                not verify (a certificate not from the CA or not the silo's, a bad signature).
        """
        for name, want in (("run_id", run_id), ("round", round), ("silo", silo), ("sha256", sha256),
                           ("payload_bytes", payload_bytes)):
            if getattr(self, name) != want:
                got = str(getattr(self, name))[:80]
                raise UploadStatementError(f"upload statement {name} is {got!r}, the upload's is {want!r}",
                                           field=name)
        self.verify_signature(ca_pem, what="upload statement", consequence="refuse the upload",
                              only="only a silo uploads", error=UploadStatementError)

    @classmethod
    def _from_mapping(cls, data: Mapping[str, Any]) -> UploadStatement:
        values: dict[str, Any] = {"signature": cls._envelope(data, what="upload statement")}
        try:
            for name in ("run_id", "silo", "sha256", "created_at", "certificate"):
                values[name] = parse_str(data[name], name)
            for name in ("round", "payload_bytes"):
                values[name] = parse_int(data[name], name)
        except ValueError as exc:
            raise FieldError(str(exc), field=name) from None
        try:
            return cls(**values)
        except ValueError as exc:
            bad = str(exc).removeprefix("invalid field ").split(" ", 1)[0].rstrip(":")
            raise FieldError(str(exc), field=bad if bad in values else None) from None

    def _unsigned_dict(self) -> dict[str, Any]:
        """Every field but the signature as JSON values: what `canonical_bytes` encodes."""
        return {"format": UPLOAD_STATEMENT_FORMAT, "run_id": self.run_id, "round": self.round, "silo": self.silo,
                "sha256": self.sha256, "payload_bytes": self.payload_bytes, "created_at": self.created_at,
                "certificate": self.certificate}


def sign_upload_statement(*, run_id: str, round: int, silo: str, sha256: str, payload_bytes: int,  # noqa: A002
                          certificate_pem: bytes | str, private_key_pem: bytes | str) -> UploadStatement:
    """Signs the statement of one upload now, with this silo's certificate key.

    Raises:
        ValueError: naming a bad field.
        UploadStatementError: the certificate is not silo ``silo``'s, or the key is not its key.
    """
    sign = statement_signer(run_id=run_id, silo=silo, certificate_pem=certificate_pem,
                            private_key_pem=private_key_pem)
    return UploadStatement.from_json(sign(round, sha256, payload_bytes))


def statement_signer(*, run_id: str, silo: str, certificate_pem: bytes | str,
                     private_key_pem: bytes | str) -> Callable[[int, str, int], str]:
    """A function ``(round, sha256 hex, payload bytes) -> statement JSON`` signing with this silo's key.

    Raises:
        UploadStatementError: the certificate is not silo ``silo``'s, or the key is not its key.
    """
    cert = certificate_pem.decode("ascii") if isinstance(certificate_pem, bytes) else certificate_pem
    key = private_key_pem.encode("ascii") if isinstance(private_key_pem, str) else private_key_pem
    try:
        signer = own_signer(cert.encode("ascii"), key, name=silo, purpose="upload statements")
    except SignatureError as exc:
        raise UploadStatementError(str(exc), field="certificate") from None

    def sign(rnd: int, sha256: str, payload_bytes: int) -> str:
        unsigned = UploadStatement(run_id=run_id, round=rnd, silo=silo, sha256=sha256, payload_bytes=payload_bytes,
                                   created_at=now_text(), certificate=cert, signature=bytes(SIGNATURE_BYTES))
        return unsigned.signed_with(signer).to_json()

    return sign
