"""Shared fixtures of the coordinator's gRPC tests: one federation PKI per test module."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from fedsilo.privacy import pki
from fedsilo.privacy.pki import Role

#: The enrolled silos of the three-hospital gRPC tests; hospital-x holds a valid certificate but is
#: enrolled nowhere.
HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")


@dataclass(frozen=True, kw_only=True)
class Certs:
    ca: Path
    coordinator: pki.IssuedPaths
    silo: dict[str, pki.IssuedPaths]  # the three hospitals, and hospital-x: CA-valid, not enrolled
    admin: pki.IssuedPaths


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A CA, the coordinator (localhost, 127.0.0.1), hospitals a-c and x, and the study lead."""
    root = tmp_path_factory.mktemp("pki")
    ca = pki.init_ca(root / "ca")
    out = root / "certs"
    return Certs(
        ca=ca.cert,
        coordinator=pki.issue_certificate(root / "ca", out, role=Role.COORDINATOR, name="coordinator",
                                          hosts=["localhost", "127.0.0.1"]),
        silo={name: pki.issue_certificate(root / "ca", out, role=Role.SILO, name=name)
              for name in (*HOSPITALS, "hospital-x")},
        admin=pki.issue_certificate(root / "ca", out, role=Role.ADMIN, name="study-lead"),
    )

