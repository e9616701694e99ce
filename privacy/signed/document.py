"""The base of documents signed as canonical JSON: ledger entries and budget statements."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from fedsilo.privacy.pki import CertificateError, Role, identity_from_pem
from fedsilo.privacy.signed.certificates import check_silo_certificate
from fedsilo.privacy.signed.fields import (
    DocumentError,
    MAX_CERT_CHARS,
    FieldError,
    canonical_json,
    exact_keys,
    parse_created_at,
    parse_json_object,
    parse_signature_hex,
)
from fedsilo.privacy.signed.keys import (
    CERT_PARSE_ERRORS,
    SIGNATURE_BYTES,
    PublicKey,
    SignatureError,
    SigningKey,
    sign,
    verify,
)


class SignedDocument:
    """Base of a frozen dataclass that a silo signs as canonical JSON with its certificate key.

    A subclass is a frozen dataclass with ``created_at`` (`fields.now_text` form),
    ``certificate`` (the signer's PEM, text) and ``signature`` (raw 64 bytes) fields; it
    sets ``FORMAT`` and implements `_unsigned_dict` (every field but the signature, as JSON
    values, with ``"format": FORMAT``). The signature covers `canonical_bytes`.
    """

    FORMAT: ClassVar[str]

    def _unsigned_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """The document as JSON-ready values: `_unsigned_dict` plus the signature in hex.

        Returns:
            A new dict; the subclass's ``from_json`` accepts it back.
        """
        data = self._unsigned_dict()
        data["signature"] = self.signature.hex()  # type: ignore[attr-defined]
        return data

    def canonical_bytes(self) -> bytes:
        """The bytes the silo signs: `to_dict` without ``signature`` as canonical JSON, ASCII."""
        return canonical_json(self._unsigned_dict()).encode("ascii")

    def to_json(self) -> str:
        """The document as canonical JSON text (sorted keys, no whitespace, ASCII escapes)."""
        return canonical_json(self.to_dict())

    def signed_with(self, signer: SigningKey) -> Any:
        """A copy whose signature is ``signer``'s over `canonical_bytes`."""
        return dataclasses.replace(self, signature=sign(signer, self.canonical_bytes()))  # type: ignore[type-var]

    def signature_matches(self, public_key: object) -> bool:
        """Whether the signature verifies over `canonical_bytes` with ``public_key``."""
        return verify(public_key, self.signature, self.canonical_bytes())  # type: ignore[attr-defined]

    def certificate_key(
        self, ca_pem: bytes | str, *, whose: str, consequence: str, only: str
    ) -> PublicKey:
        """Checks the embedded certificate against the CA at ``created_at``; returns its key.

        Args:
            ca_pem: The federation CA certificate, PEM.
            whose: Names the certificate in messages.
            consequence: What the reader should do, for messages.
            only: Why only a silo may sign this, for the message when another role did.

        Returns:
            The certificate's public key.

        Raises:
            SignatureError: If it is not a silo certificate from the CA for the document's
                silo, valid (with the CA) at ``created_at``.
        """
        ca_bytes = ca_pem.encode("ascii") if isinstance(ca_pem, str) else bytes(ca_pem)
        cert_pem = self.certificate.encode("ascii")  # type: ignore[attr-defined]
        try:
            identity = identity_from_pem(cert_pem)
        except (CertificateError, *CERT_PARSE_ERRORS):  # a damaged certificate may raise late
            identity = None  # check_silo_certificate below says what is wrong with it
        if identity is not None and identity.role is not Role.SILO:
            raise SignatureError(
                f"{whose} belongs to the {identity.role.value} {identity.name!r}, not to a "
                f"silo; {only}"
            )
        return check_silo_certificate(
            cert_pem,
            ca_bytes,
            name=self.silo,  # type: ignore[attr-defined]
            now=parse_created_at(self.created_at),  # type: ignore[attr-defined]
            whose=whose,
            consequence=consequence,
        )

    def verify_signature(self, ca_pem: bytes | str, *, what: str, consequence: str, only: str,
                         error: type[DocumentError]) -> None:
        """Checks the embedded certificate (`certificate_key`) and that the signature verifies with its key.

        Args:
            ca_pem: The federation CA certificate, PEM.
            what: The document in messages, e.g. "budget statement".
            consequence: What the reader should do, for messages.
            only: Why only a silo may sign this, for the message when another role did.
            error: The document's error class.

        Raises:
            DocumentError: ``error`` naming the field at fault ("certificate" or "signature").
        """
        silo = self.silo  # type: ignore[attr-defined]
        try:
            public_key = self.certificate_key(ca_pem, whose=f"the certificate in silo {silo!r}'s {what}",
                                              consequence=consequence, only=only)
        except SignatureError as exc:
            raise error(str(exc), field="certificate") from None
        if not self.signature_matches(public_key):
            raise error(f"silo {silo!r}'s {what}: the signature does not match its certificate, so a field was "
                        "changed after the silo signed it (or another key signed it)", field="signature")

    def _check_signed_fields(self) -> None:
        """Checks ``certificate`` and ``signature`` (a bytearray becomes bytes); for __post_init__."""
        certificate = self.certificate  # type: ignore[attr-defined]
        if (
            not isinstance(certificate, str)
            or not 0 < len(certificate) <= MAX_CERT_CHARS
            or not certificate.startswith("-----BEGIN CERTIFICATE-----")
            or not certificate.isascii()
        ):
            raise ValueError(
                "invalid field certificate: expected the silo's PEM certificate as ASCII text "
                f"of at most {MAX_CERT_CHARS} characters"
            )
        if isinstance(self.signature, (bytearray, memoryview)):  # type: ignore[attr-defined]
            object.__setattr__(self, "signature", bytes(self.signature))  # type: ignore[attr-defined]
        signature = self.signature  # type: ignore[attr-defined]
        if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
            shown = len(signature) if isinstance(signature, bytes) else signature
            raise ValueError(
                f"invalid field signature {shown!r}: expected {SIGNATURE_BYTES} bytes"
            )

    @classmethod
    def _decode(
        cls,
        data: str | bytes | Mapping[str, Any],
        *,
        what: str,
        refuse: Callable[[str, str | None], Exception],
    ) -> Any:
        """Parses canonical JSON text (or a mapping) into a document; does not verify it.

        Args:
            data: JSON text (str or UTF-8 bytes), or an already-parsed mapping.
            what: What the document is, for messages (e.g. "ledger entry").
            refuse: Builds the error to raise from a message and the field at fault.

        Raises:
            Exception: ``refuse``'s, if the data is not well-formed; the subclass's
                `_not_canonical` error if the text is not exactly `to_json`.
        """
        try:
            parsed, text = parse_json_object(data, what=what)
        except ValueError as exc:
            raise refuse(str(exc), None) from None
        try:
            document = cls._from_mapping(parsed)  # type: ignore[attr-defined]
        except ValueError as exc:
            raise refuse(f"malformed {what}: {exc}", getattr(exc, "field", None)) from None
        if text is not None and document.to_json() != text:
            raise document._not_canonical()
        return document

    @classmethod
    def _envelope(cls, data: Mapping[str, Any], *, what: str) -> bytes:
        """Checks the keys and ``format`` of a parsed document; returns its signature bytes.

        Raises:
            FieldError: Naming the field (None for a missing or unknown key).
        """
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        older = cls._older_formats()
        stated = data.get("format")
        if isinstance(stated, str) and stated in older:
            names = set(older[stated])
        try:
            exact_keys(data, {"format", *names}, what)
        except ValueError as exc:
            raise FieldError(str(exc), field=None) from None
        if data["format"] != cls.FORMAT and data["format"] not in older:
            readable = " or ".join(repr(f) for f in (cls.FORMAT, *older))
            raise FieldError(
                f"field format is {data['format']!r}, this fedsilo reads {readable}",
                field="format",
            )
        try:
            return parse_signature_hex(data["signature"])
        except ValueError as exc:
            raise FieldError(str(exc), field="signature") from None

    @classmethod
    def _older_formats(cls) -> Mapping[str, frozenset[str]]:
        """Earlier formats this class still reads, each with its field names (besides
        ``format``); a subclass whose format grew fields lists its old ones here."""
        return {}

    def _not_canonical(self) -> Exception:
        """The error for text that parses to this document but is not its `to_json`."""
        raise NotImplementedError
