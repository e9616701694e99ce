"""The agent's side of the key ceremony: a wrapped key that does not verify is never used or stored."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from fedsilo.coordinator.config import TlsFiles
from fedsilo.privacy.he import HeParams
from fedsilo.privacy.pki import Role, init_ca, issue_certificate
from fedsilo.silo_agent.secure import HeSession, KeyCeremonyError

RUN = "run-secure"


class Relay:
    """Stands in for the coordinator's relay (the transport): hands out whatever it was given."""

    def __init__(self) -> None:
        self.announcements: dict[str, bytes] = {}
        self.published: dict[str, bytes] = {}

    def key_recipients(self) -> list[tuple[str, bytes]]:
        return [(n, a) for n, a in self.announcements.items() if n not in self.published]

    def publish_wrapped_keys(self, entries) -> None:
        self.published.update(entries)

    def wrapped_key(self) -> bytes | None:
        return self.published.get("hospital-b")


@pytest.fixture
def federation(tmp_path: Path):
    certs = tmp_path / "certs"
    init_ca(certs)
    for name in ("hospital-a", "hospital-b", "hospital-c"):
        issue_certificate(certs, certs, role=Role.SILO, name=name)

    def session(name: str, run_id: str = RUN) -> HeSession:
        tls = TlsFiles(ca=certs / "ca.pem", cert=certs / f"{name}.pem", key=certs / f"{name}.key")
        return HeSession(run_id=run_id, me=name, params=HeParams(), key_holder="hospital-a",
                         state_dir=tmp_path / name, tls=tls)

    return session, tmp_path


def test_ceremony_round_trip_and_shared_arithmetic(federation) -> None:
    session, _ = federation
    holder, other, relay = session("hospital-a"), session("hospital-b"), Relay()
    holder.ensure_key(relay, threading.Event())
    relay.announcements["hospital-b"] = other.announcement
    assert holder.serve_recipients(relay) == 1
    other.ensure_key(relay, threading.Event())
    values = np.linspace(-0.5, 0.5, 5000)
    blobs_a, blobs_b = holder.encrypt(values), other.encrypt(2 * values)
    from fedsilo.privacy.he import PublicContext

    ctx = PublicContext(HeParams())
    summed = [ctx.dump(ctx.add(ctx.load(a), ctx.load(b))) for a, b in zip(blobs_a, blobs_b, strict=True)]
    np.testing.assert_allclose(other.decrypt_sum(summed, values.size), 3 * values, atol=1e-9)


def test_a_substituted_announcement_gets_no_key(federation) -> None:
    session, _ = federation
    holder, relay = session("hospital-a"), Relay()
    holder.ensure_key(relay, threading.Event())
    # the relay swaps hospital-b's announcement for one signed by hospital-c
    relay.announcements["hospital-b"] = session("hospital-c").announcement
    assert holder.serve_recipients(relay) == 0 and not relay.published


@pytest.mark.parametrize("attack", ["flip", "other-run", "other-issuer"])
def test_a_tampered_or_replayed_wrapped_key_is_refused_and_not_stored(federation, attack: str) -> None:
    session, tmp_path = federation
    relay = Relay()
    if attack == "other-run":
        holder, other = session("hospital-a", run_id="an-old-run"), session("hospital-b", run_id="an-old-run")
    else:
        holder, other = session("hospital-a"), session("hospital-b")
    holder.ensure_key(relay, threading.Event())
    relay.announcements["hospital-b"] = other.announcement
    holder.serve_recipients(relay)
    blob = bytearray(relay.published["hospital-b"])
    if attack == "flip":
        blob[len(blob) // 2] ^= 0x01
    elif attack == "other-issuer":
        # hospital-c generates its own key and wraps it for hospital-b, pretending to be the holder
        impostor = session("hospital-c")
        impostor.key_holder = "hospital-c"
        impostor.ensure_key(relay, threading.Event())
        fake = Relay()
        fake.announcements["hospital-b"] = other.announcement
        impostor.serve_recipients(fake)
        blob = bytearray(fake.published["hospital-b"])
    relay.published["hospital-b"] = bytes(blob)
    victim = session("hospital-b")  # in run RUN, expecting hospital-a as the key holder
    with pytest.raises(KeyCeremonyError, match="refusing the wrapped key"):
        victim.ensure_key(relay, threading.Event())
    assert not list((tmp_path / "hospital-b").glob("he-secret-*")), "a refused key must not be stored"
