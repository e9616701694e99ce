"""Federation PKI vocabulary: roles, identities, where files live, and valid certificate names."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from fedsilo.core.validators import is_silo_name

CA_CERT_FILENAME = "ca.pem"
CA_KEY_FILENAME = "ca.key"
ORGANIZATION = "fedsilo"


class Role(enum.Enum):
    """Who a certificate belongs to; carried in the subject's OU."""

    COORDINATOR = "coordinator"
    SILO = "silo"
    ADMIN = "admin"


class CertificateError(Exception):
    """A certificate or key is unusable: wrong CA, outside its validity, or malformed."""


@dataclass(frozen=True, kw_only=True)
class Identity:
    """The authenticated identity a federation certificate carries.

    Attributes:
        role: What the holder is allowed to act as.
        name: The holder's name (the certificate's CN), e.g. ``hospital-a``.
    """

    role: Role
    name: str


@dataclass(frozen=True, kw_only=True)
class CaPaths:
    """Where `init_ca` wrote the federation CA.

    Attributes:
        cert: The CA certificate (``ca.pem``); every agent needs a copy.
        key: The CA private key (``ca.key``, mode 0600); keep it with the operator only.
    """

    cert: Path
    key: Path


@dataclass(frozen=True, kw_only=True)
class IssuedPaths:
    """Where `issue_certificate` wrote a leaf certificate and its key.

    Attributes:
        cert: The leaf certificate (``<name>.pem``).
        key: The leaf private key (``<name>.key``, mode 0600).
    """

    cert: Path
    key: Path


def validate_name(name: str) -> str:
    """Checks that a certificate name is safe as a CN and as a file name.

    Args:
        name: A silo, admin or coordinator name such as ``hospital-a``.

    Returns:
        The name, unchanged.

    Raises:
        ValueError: If the name is not 1-63 characters of lowercase letters, digits,
            ``.``, ``_`` or ``-`` starting with a letter or digit.
    """
    if not is_silo_name(name):
        raise ValueError(
            f"invalid name {name!r}: use 1-63 characters of lowercase letters, digits, "
            "'.', '_' or '-', starting with a letter or digit (e.g. 'hospital-a')"
        )
    return name
