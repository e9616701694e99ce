"""The generic sealed relay over REAL gRPC with mutual TLS on loopback.

A ``CoordinatorServer`` of a ``resfim`` (or ``deer+resfim``, ``fedrdn``, or a toy method with two
purposes) run with HE aggregation and three enrolled silos, each joining with a signed X25519
announcement. Silos then publish blobs under a purpose of their method (ResFIM's style banks:
``style-bank``), sealed with ``fedsilo.silo_agent.secure.seal`` under a shared secret the
coordinator never holds and signed as relay blobs (``fedsilo.privacy.relay_blob``) with the
silo's certificate key, through ``PublishSealed``, and read the other silos' with ``GetSealed``;
the calls are made with raw ``fedsilo.v1`` stubs over channels configured like the agent's
(``fedsilo.silo_agent.client.channel_options``). The coordinator verifies every blob at the door
(the caller's own, for this run and purpose, signed under the federation CA).

A signed blob's size steps by 4 bytes with its payload (base64); tests that need a blob of an
exact size run under a run id whose length makes that size reachable (``exact_run``).

Every refusal test checks the status code and a meaningful fragment of its details, that the
banks another silo reads are unchanged, and that the run status and round history (Admin RPCs)
are unchanged. The last tests check ``seal`` / ``open_sealed`` themselves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

import grpc
import pytest

from fedsilo.coordinator.config import AggregationMode, FederationConfig, TlsFiles
from fedsilo.coordinator.records import MAX_SEALED_BYTES
from fedsilo.coordinator.server import CoordinatorServer
from fedsilo.core.methods import Method, register_method, unregister_method
from fedsilo.privacy import pki
from fedsilo.privacy.keywrap import KemKeyPair, announce_kem_public
from fedsilo.privacy.pki import Role
from fedsilo.privacy.relay_blob import RelayBlob, sign_relay_blob
from fedsilo.silo_agent.client import channel_options
from fedsilo.silo_agent.secure import open_sealed, seal
from fedsilo.v1 import admin_pb2, admin_pb2_grpc, federation_pb2, federation_pb2_grpc, tensor_pb2

if TYPE_CHECKING:
    from conftest import Certs  # tests/coordinator/conftest.py: the module-scoped `certs` fixture

RUN_ID = "grpc-style-banks"
SILOS = ("hospital-a", "hospital-b", "hospital-c")  # conftest.HOSPITALS: the `certs` fixture has these
EXAMPLES = {"hospital-a": 120, "hospital-b": 380, "hospital-c": 500}
# LoRA factor names, so that the same manifest also joins a deer+resfim run (it alternates B and A).
SHAPES = {"enc.lora_A.weight": (4, 16), "enc.lora_B.weight": (16, 4), "head.bias": (8,)}
FINGERPRINT = "5c" * 32
PURPOSE = "style-bank"  # fedsilo.silo_agent.resfim.BANK_PURPOSE (that module imports torch)
RPC_TIMEOUT_S = 20
# What the agent's channels use (message limits 8 MiB), plus a private subchannel per channel so
# every client certificate gets its own TLS connection.
CHANNEL_OPTIONS = [*channel_options(), ("grpc.use_local_subchannel_pool", 1)]

Snapshot = tuple[admin_pb2.GetStatusResponse, admin_pb2.ListRoundsResponse]
Banks = list[tuple[str, bytes]]


# -- certificates and signed blobs --------------------------------------------------------------


def announce(certs: Certs, run_id: str) -> dict[str, bytes]:
    """Each silo's signed X25519 announcement for ``run_id`` (HE runs need one at join)."""
    out = {}
    for name, paths in certs.silo.items():
        out[name] = announce_kem_public(run_id=run_id, silo=name, public=KemKeyPair.generate().public_bytes(),
                                        certificate_pem=paths.cert.read_bytes(),
                                        private_key_pem=paths.key.read_bytes())
    return out


def signed(certs: Certs, silo: str, payload: bytes, purpose: str = PURPOSE, run_id: str = RUN_ID) -> bytes:
    """``payload`` as silo ``silo`` publishes it: a relay blob signed with its certificate key (JSON bytes)."""
    paths = certs.silo[silo]
    return sign_relay_blob(run_id=run_id, purpose=purpose, silo=silo, payload=payload,
                           certificate_pem=paths.cert.read_bytes(),
                           private_key_pem=paths.key.read_bytes()).to_json().encode("ascii")


def overhead(certs: Certs, silo: str, run_id: str) -> int:
    """A signed blob's size less its payload's base64 size (the same for every payload)."""
    return len(signed(certs, silo, b"\x00" * 3, run_id=run_id)) - 4


def sized(certs: Certs, silo: str, size: int, run_id: str) -> bytes:
    """A signed blob of exactly ``size`` bytes with a random payload (``size`` must be reachable)."""
    body = size - overhead(certs, silo, run_id)
    assert body > 0 and body % 4 == 0, f"{size} bytes is not reachable under run id {run_id!r}"
    blob = signed(certs, silo, os.urandom(body // 4 * 3), run_id=run_id)
    assert len(blob) == size
    return blob


@pytest.fixture(scope="module")
def exact_run(certs: Certs) -> str:
    """A run id under which every silo's signed blobs take every size that is a multiple of 4."""
    for pad in range(4):
        run_id = RUN_ID + "-" + "x" * pad
        if all(overhead(certs, silo, run_id) % 4 == 0 for silo in SILOS):
            return run_id
    raise AssertionError("the three silos' blobs have different size steps")


@pytest.fixture(scope="module")
def announcements(certs: Certs) -> dict[str, bytes]:
    return announce(certs, RUN_ID)


# -- plaintexts and sealed banks ------------------------------------------------------------------


def plaintext(tag: str, n: int = 200) -> bytes:
    """``n`` distinctive bytes: a pseudo-random stream keyed by ``tag`` (never found by chance)."""
    return hashlib.shake_256(f"fedsilo style-bank test plaintext {tag}".encode()).digest(n)


def random_secret(seed: int) -> bytes:
    """A random shared secret of 32..64 bytes."""
    return os.urandom(32 + seed % 33)


def contains_any_window(data: bytes, secret: bytes, width: int = 16) -> bool:
    """Whether any ``width``-byte window of ``secret`` occurs in ``data``."""
    return any(secret[i:i + width] in data for i in range(len(secret) - width + 1))


# -- a running coordinator ------------------------------------------------------------------------


def expect(code: grpc.StatusCode, fragment: str, call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert err.code() is code, (err.code(), err.details())
    assert fragment in (err.details() or ""), err.details()
    return err


def manifest_msg() -> list[tensor_pb2.TensorSpec]:
    return [tensor_pb2.TensorSpec(name=k, dtype=tensor_pb2.DTYPE_FLOAT32, shape=list(s)) for k, s in SHAPES.items()]


@dataclass
class Fed:
    """A ``CoordinatorServer`` on 127.0.0.1 and mTLS channels to it, one per client certificate."""

    server: CoordinatorServer
    certs: Certs
    announcements: dict[str, bytes]
    _channels: dict[Path, grpc.Channel] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.address = f"127.0.0.1:{self.server.port}"

    @property
    def state_dir(self) -> Path:
        return Path(self.server.config.state_dir)

    def channel(self, client: pki.IssuedPaths) -> grpc.Channel:
        if client.cert not in self._channels:
            creds = grpc.ssl_channel_credentials(root_certificates=self.certs.ca.read_bytes(),
                                                 private_key=client.key.read_bytes(),
                                                 certificate_chain=client.cert.read_bytes())
            self._channels[client.cert] = grpc.secure_channel(self.address, creds, options=CHANNEL_OPTIONS)
        return self._channels[client.cert]

    def stub(self, who: str) -> federation_pb2_grpc.FederationStub:
        """A Federation stub as silo ``who``, or as the admin for ``who == "admin"``."""
        paths = self.certs.admin if who == "admin" else self.certs.silo[who]
        return federation_pb2_grpc.FederationStub(self.channel(paths))

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()

    # -- calls ----------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        admin = admin_pb2_grpc.AdminStub(self.channel(self.certs.admin))
        return (admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=RPC_TIMEOUT_S),
                admin.ListRounds(admin_pb2.ListRoundsRequest(), timeout=RPC_TIMEOUT_S))

    def blob(self, who: str, payload: bytes, purpose: str = PURPOSE) -> bytes:
        """``payload`` signed by silo ``who`` for this run and ``purpose``."""
        return signed(self.certs, who, payload, purpose, self.server.config.run_id)

    def join(self, silo: str) -> federation_pb2.JoinResponse:
        req = federation_pb2.JoinRequest(model_fingerprint=FINGERPRINT, num_train_examples=EXAMPLES.get(silo, 1),
                                         shared_tensors=manifest_msg(), agent_version="test/1",
                                         kem_announcement=self.announcements[silo])
        return self.stub(silo).Join(req, timeout=RPC_TIMEOUT_S)

    def publish(self, who: str, sealed: bytes, purpose: str = PURPOSE) -> int:
        req = federation_pb2.PublishSealedRequest(purpose=purpose, blob=sealed)
        return self.stub(who).PublishSealed(req, timeout=RPC_TIMEOUT_S).published

    def banks_response(self, who: str, purpose: str = PURPOSE, after: str = "") -> federation_pb2.GetSealedResponse:
        return self.stub(who).GetSealed(federation_pb2.GetSealedRequest(purpose=purpose, after_silo=after),
                                        timeout=RPC_TIMEOUT_S)

    def banks(self, who: str, purpose: str = PURPOSE) -> Banks:
        """Every page, as an agent reads them."""
        out: Banks = []
        after = ""
        while True:
            resp = self.banks_response(who, purpose, after)
            out += [(e.silo, bytes(e.blob)) for e in resp.entries]
            if not resp.more:
                return out
            after = out[-1][0]


def make_config(certs: Certs, state_dir: Path, **overrides: object) -> FederationConfig:
    kwargs: dict[str, object] = dict(
        run_id=RUN_ID, silos=SILOS, rounds=2, min_silos=2, strategy="resfim",
        aggregation=AggregationMode.HE, he={},
        # The run waits for the key ceremony, which these tests never run: no round ever opens.
        round_deadline_s=60.0, quorum_timeout_s=600.0, start_grace_s=600.0,
        listen="127.0.0.1:0", state_dir=state_dir,
        tls=TlsFiles(ca=certs.ca, cert=certs.coordinator.cert, key=certs.coordinator.key),
        model={"name": "tiny"}, training={"epochs": 1},
    )
    kwargs.update(overrides)
    return FederationConfig(**kwargs)  # type: ignore[arg-type]


@pytest.fixture
def start_fed(certs: Certs, announcements: dict[str, bytes], tmp_path: Path) -> Iterator[Callable[..., Fed]]:
    started: list[Fed] = []

    def start(**overrides: object) -> Fed:
        server = CoordinatorServer(make_config(certs, tmp_path / f"state{len(started)}", **overrides), max_workers=8)
        server.start()
        run_id = server.config.run_id
        fed = Fed(server, certs, announcements if run_id == RUN_ID else announce(certs, run_id))
        started.append(fed)
        return fed

    yield start
    for fed in started:
        fed.close()
        fed.server.stop(grace=1.0)


@pytest.fixture
def fed(start_fed: Callable[..., Fed]) -> Fed:
    """A resfim run; nobody has joined yet."""
    return start_fed()


@pytest.fixture
def joined(fed: Fed) -> Fed:
    """A resfim run all three silos have joined."""
    for silo in SILOS:
        assert fed.join(silo).state == federation_pb2.RUN_STATE_WAITING_FOR_SILOS
    return fed


# -- the happy path ---------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["resfim", "deer+resfim"])
def test_banks_are_relayed_byte_for_byte_to_the_other_silos_and_stored_sealed(
        start_fed: Callable[..., Fed], strategy: str) -> None:
    fed = start_fed(strategy=strategy)
    secret = random_secret(7)
    plain = {silo: plaintext(f"{strategy} {silo}") for silo in SILOS[:2]}
    sealed = {silo: fed.blob(silo, seal(secret, plain[silo], run_id=RUN_ID, purpose=PURPOSE, silo=silo))
              for silo in plain}
    a, b = sealed["hospital-a"], sealed["hospital-b"]

    for i, silo in enumerate(SILOS, start=1):
        fed.join(silo)
        resp = fed.banks_response(silo)  # nothing published yet
        assert (list(resp.entries), resp.silos_joined) == ([], i)
    before = fed.snapshot()

    assert fed.publish("hospital-a", a) == 1
    assert fed.banks("hospital-a") == []  # never the caller's own
    assert fed.banks("hospital-c") == [("hospital-a", a)]
    assert fed.publish("hospital-b", b) == 2

    resp = fed.banks_response("hospital-c")
    assert [(e.silo, bytes(e.blob)) for e in resp.entries] == [("hospital-a", a), ("hospital-b", b)]
    assert resp.silos_joined == 3
    assert fed.banks("hospital-a") == [("hospital-b", b)]
    assert fed.banks("hospital-b") == [("hospital-a", a)]

    # The same bytes again (an agent restarted before it saw the reply): accepted, nothing changes.
    assert fed.publish("hospital-a", a) == 2
    assert fed.publish("hospital-b", b) == 2
    assert fed.banks("hospital-c") == [("hospital-a", a), ("hospital-b", b)]
    # Publishing touches neither the run status nor the round history.
    assert fed.snapshot() == before

    # What c reads verifies as each silo's own and opens, with the run's secret, to exactly what it sealed.
    for silo, blob in fed.banks("hospital-c"):
        doc = RelayBlob.from_json(blob)
        doc.verify(ca_pem=fed.certs.ca.read_bytes(), run_id=RUN_ID, purpose=PURPOSE, silo=silo)
        assert open_sealed(secret, doc.payload, run_id=RUN_ID, purpose=PURPOSE, silo=silo) == plain[silo]

    # The coordinator keeps only sealed bytes: no 16-byte window of a plaintext in its state dir,
    # running or stopped (the sealed blobs themselves are found there: the scan looks where banks live).
    for when in ("running", "stopped"):
        if when == "stopped":
            fed.server.stop(grace=1.0)
        files = [p for p in fed.state_dir.rglob("*") if p.is_file()]
        assert any(p.name == "coordinator.sqlite" for p in files)
        contents = {p: p.read_bytes() for p in files}
        for blob in (a, b):
            assert any(blob in data for data in contents.values()), f"sealed bank not found in state dir ({when})"
        for p, data in contents.items():
            for silo, text in plain.items():
                assert not contains_any_window(data, text), f"plaintext bank of {silo} in {p} ({when})"


def test_a_bank_of_exactly_the_limit_is_stored_and_relayed(start_fed: Callable[..., Fed], exact_run: str) -> None:
    fed = start_fed(run_id=exact_run)
    for silo in SILOS:
        fed.join(silo)
    big = sized(fed.certs, "hospital-b", MAX_SEALED_BYTES, exact_run)
    assert fed.publish("hospital-b", big) == 1
    assert fed.banks("hospital-a") == [("hospital-b", big)]


# -- refusals -----------------------------------------------------------------------------------------


def test_a_different_second_bank_is_already_exists_and_the_first_is_kept(joined: Fed) -> None:
    first = joined.blob("hospital-a", b"\x01first bank" * 10)
    second = joined.blob("hospital-a", b"\x02second bank" * 10)
    assert joined.publish("hospital-a", first) == 1
    before = joined.snapshot()
    resigned = joined.blob("hospital-a", b"\x01first bank" * 10)  # the same bank signed again, later
    assert resigned != first
    exists = (grpc.StatusCode.ALREADY_EXISTS, "silo 'hospital-a' already published its 'style-bank' blob for this run")
    # Another valid blob of a's, the same bank signed again; a damaged copy is not a's blob at all.
    for other, (code, fragment) in ((second, exists), (resigned, exists),
                                    (first + b" ", (grpc.StatusCode.INVALID_ARGUMENT, "not in canonical form")),
                                    (first[:-1], (grpc.StatusCode.INVALID_ARGUMENT, "not valid JSON"))):
        expect(code, fragment, lambda other=other: joined.publish("hospital-a", other))
        assert joined.banks("hospital-c") == [("hospital-a", first)]
        assert joined.snapshot() == before
    # The count is still one bank: b's is the second.
    b_bank = joined.blob("hospital-b", b"\x02second bank" * 10)
    assert joined.publish("hospital-b", b_bank) == 2
    assert joined.banks("hospital-c") == [("hospital-a", first), ("hospital-b", b_bank)]


def test_an_empty_or_oversized_bank_is_invalid_argument_and_nothing_is_stored(joined: Fed) -> None:
    kept = joined.blob("hospital-b", b"b's bank")
    assert joined.publish("hospital-b", kept) == 1
    before = joined.snapshot()
    # 4 MiB + 1 is within the gRPC message limits (8 MiB both ways): the coordinator itself refuses it.
    for size in (0, MAX_SEALED_BYTES + 1):
        expect(grpc.StatusCode.INVALID_ARGUMENT,
               f"blob has {size} bytes; 1..{MAX_SEALED_BYTES} allowed",
               lambda size=size: joined.publish("hospital-a", b"\x07" * size))
        assert joined.banks("hospital-c") == [("hospital-b", kept)]
        assert joined.banks("hospital-b") == []
        assert joined.snapshot() == before
    # a was refused, not counted: its first valid bank is the second one stored, and c reads
    # both ordered by silo name (not by publication).
    a_bank = joined.blob("hospital-a", b"a's bank")
    assert joined.publish("hospital-a", a_bank) == 2
    assert joined.banks("hospital-c") == [("hospital-a", a_bank), ("hospital-b", kept)]


def _another_run(fed: Fed) -> bytes:
    return signed(fed.certs, "hospital-b", b"b's bank", run_id="another-run")


def _another_silos(fed: Fed) -> bytes:
    return fed.blob("hospital-a", b"a's bank")  # valid, but a's: b relays it as its own


def _bad_signature(fed: Fed) -> bytes:
    doc = RelayBlob.from_json(fed.blob("hospital-b", b"b's bank"))
    return dataclasses.replace(doc, payload=b"another bank").to_json().encode("ascii")


def _another_silos_certificate(fed: Fed) -> bytes:
    """a's blob renamed to b: a's certificate and signature, claiming to be b's."""
    doc = RelayBlob.from_json(fed.blob("hospital-a", b"a's bank"))
    return dataclasses.replace(doc, silo="hospital-b").to_json().encode("ascii")


def _foreign_ca(fed: Fed) -> bytes:
    """Signed with a certificate for hospital-b that another CA issued."""
    root = fed.state_dir.parent / "foreign-pki"
    pki.init_ca(root / "ca", common_name="another federation CA")
    paths = pki.issue_certificate(root / "ca", root / "certs", role=Role.SILO, name="hospital-b")
    return sign_relay_blob(run_id=RUN_ID, purpose=PURPOSE, silo="hospital-b", payload=b"b's bank",
                           certificate_pem=paths.cert.read_bytes(),
                           private_key_pem=paths.key.read_bytes()).to_json().encode("ascii")


def _not_json(fed: Fed) -> bytes:
    return seal(random_secret(1), b"b's bank", run_id=RUN_ID, purpose=PURPOSE, silo="hospital-b")  # unsigned


def _huge_field(fed: Fed) -> bytes:
    """b's blob with a 3 MiB format name: refused, and the refusal quotes only an excerpt of it."""
    fields = json.loads(fed.blob("hospital-b", b"b's bank"))
    fields["format"] = "x" * (3 * 2**20)
    return json.dumps(fields).encode("ascii")


@pytest.mark.parametrize("make, fragment", [
    (_another_run, f"relay blob run_id is 'another-run', expected '{RUN_ID}'"),
    (_another_silos, "relay blob silo is 'hospital-a', expected 'hospital-b'"),
    (_bad_signature, "silo 'hospital-b''s relay blob: the signature does not match its certificate"),
    (_another_silos_certificate, "the certificate in silo 'hospital-b''s relay blob"),
    (_foreign_ca, "the certificate in silo 'hospital-b''s relay blob"),
    (_not_json, "relay blob is not valid UTF-8 text"),
    (_huge_field, "malformed relay blob: field format is 'xxxxxxxx"),
], ids=["another-run", "another-silos-blob", "bad-signature", "another-silos-certificate",
        "foreign-ca", "not-json", "huge-field"])
def test_a_blob_that_is_not_the_callers_own_for_this_run_and_purpose_is_invalid_argument(
        joined: Fed, make: Callable[[Fed], bytes], fragment: str) -> None:
    """The coordinator verifies every blob at the door (run, sender, certificate, signature; the sealing
    purpose inside is the receivers' to check, as a method may relay one under another name): refused ones
    are never stored, so no silo reads them and the caller may still publish its real blob."""
    kept = joined.blob("hospital-a", b"a's bank")
    assert joined.publish("hospital-a", kept) == 1
    before = joined.snapshot()
    err = expect(grpc.StatusCode.INVALID_ARGUMENT, "blob refused: " + fragment,
                 lambda: joined.publish("hospital-b", make(joined)))
    assert len(err.details() or "") <= 600, "the refusal quotes an excerpt, never the whole blob"
    assert joined.banks("hospital-c") == [("hospital-a", kept)]
    assert joined.banks("hospital-a") == []
    assert joined.snapshot() == before
    b_bank = joined.blob("hospital-b", b"b's bank")
    assert joined.publish("hospital-b", b_bank) == 2
    assert joined.banks("hospital-c") == [("hospital-a", kept), ("hospital-b", b_bank)]


def test_a_bank_beyond_the_grpc_message_limit_is_refused_by_grpc(joined: Fed) -> None:
    kept = joined.blob("hospital-b", b"b's bank")
    assert joined.publish("hospital-b", kept) == 1
    before = joined.snapshot()
    huge = b"\x07" * (8 * 2**20 + 1)
    # Beyond the 8 MiB message limit the agent's own channel refuses to send it ...
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "CLIENT: Sent message larger than max",
           lambda: joined.publish("hospital-a", huge))
    # ... and a client without that limit is refused by the coordinator's gRPC server.
    paths = joined.certs.silo["hospital-a"]
    creds = grpc.ssl_channel_credentials(root_certificates=joined.certs.ca.read_bytes(),
                                         private_key=paths.key.read_bytes(), certificate_chain=paths.cert.read_bytes())
    with grpc.secure_channel(joined.address, creds, options=[("grpc.max_send_message_length", 64 * 2**20),
                                                             ("grpc.use_local_subchannel_pool", 1)]) as ch:
        stub = federation_pb2_grpc.FederationStub(ch)
        expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER: Received message larger than max",
               lambda: stub.PublishSealed(federation_pb2.PublishSealedRequest(purpose=PURPOSE, blob=huge),
                                          timeout=RPC_TIMEOUT_S))
    assert joined.banks("hospital-c") == [("hospital-b", kept)]
    assert joined.banks("hospital-b") == []
    assert joined.snapshot() == before


def test_two_banks_within_the_limit_can_be_read_by_a_third_silo(start_fed: Callable[..., Fed], exact_run: str) -> None:
    """Each bank may take MAX_SEALED_BYTES; replies are paged so any number of them fits gRPC's limit."""
    joined = start_fed(run_id=exact_run)
    for silo in SILOS:
        joined.join(silo)
    a, b = (sized(joined.certs, silo, MAX_SEALED_BYTES, exact_run) for silo in SILOS[:2])
    assert joined.publish("hospital-a", a) == 1
    assert joined.publish("hospital-b", b) == 2  # both accepted: each is within the documented limit
    assert joined.banks("hospital-a") == [("hospital-b", b)]  # one bank alone fits in a message
    first = joined.banks_response("hospital-c")  # two 4 MiB banks come in two pages
    assert [e.silo for e in first.entries] == ["hospital-a"] and first.more
    assert joined.banks("hospital-c") == [("hospital-a", a), ("hospital-b", b)]


@pytest.mark.parametrize("caller, code, fragment", [
    ("admin", grpc.StatusCode.PERMISSION_DENIED, "a admin certificate cannot act as a silo"),
    ("hospital-x", grpc.StatusCode.PERMISSION_DENIED, f"silo 'hospital-x' is not enrolled in run '{RUN_ID}'"),
    ("hospital-c", grpc.StatusCode.FAILED_PRECONDITION,
     f"silo 'hospital-c' has not joined run '{RUN_ID}'; call Join first"),
], ids=["admin-certificate", "not-enrolled", "enrolled-not-joined"])
def test_a_caller_that_is_not_a_joined_silo_can_neither_publish_nor_read(
        fed: Fed, caller: str, code: grpc.StatusCode, fragment: str) -> None:
    for silo in SILOS[:2]:  # c stays out
        fed.join(silo)
    kept = fed.blob("hospital-a", b"a's bank")
    assert fed.publish("hospital-a", kept) == 1
    before = fed.snapshot()
    own = fed.blob(caller, b"caller's bank") if caller in fed.certs.silo else b"admin's bank"
    for bank in (b"intruder's bank", own, kept, b""):  # refused on identity first, whatever the bank
        expect(code, fragment, lambda bank=bank: fed.publish(caller, bank))
    expect(code, fragment, lambda: fed.banks(caller))
    assert fed.banks("hospital-b") == [("hospital-a", kept)]
    assert fed.snapshot() == before
    assert fed.banks_response("hospital-b").silos_joined == 2


def test_a_run_whose_method_relays_nothing_refuses_every_purpose(start_fed: Callable[..., Fed]) -> None:
    """Blobs are relayed only under the purposes the run's method declares (ResFIM's style banks,
    FedRDN's statistics); FedAvg's run declares none and refuses both directions, storing nothing."""
    fed = start_fed(strategy="fedavg")
    for silo in SILOS:
        fed.join(silo)
    before = fed.snapshot()
    for purpose in (PURPOSE, "rdn-stats"):
        fragment = (f"run '{RUN_ID}' relays nothing under purpose '{purpose}': its method 'fedavg' uses the "
                    "sealed relay for none")
        bank = fed.blob("hospital-a", b"a's bank", purpose)
        expect(grpc.StatusCode.FAILED_PRECONDITION, fragment, lambda: fed.publish("hospital-a", bank, purpose))
        for silo in SILOS:
            expect(grpc.StatusCode.FAILED_PRECONDITION, fragment, lambda silo=silo: fed.banks(silo, purpose))
    assert fed.snapshot() == before
    # Nothing was stored: the coordinator's database has no relayed blob.
    fed.server.stop(grace=1.0)
    with sqlite3.connect(fed.state_dir / "coordinator.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM sealed_blobs").fetchone() == (0,)


# -- sealing --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 15, 32], ids=["32-byte-secret", "47-byte-secret", "64-byte-secret"])
def test_seal_opens_only_for_its_run_purpose_and_silo(seed: int) -> None:
    secret = random_secret(seed)
    assert 32 <= len(secret) <= 64
    text = plaintext(f"seal {seed}")
    where = dict(run_id=RUN_ID, purpose=PURPOSE, silo="hospital-a")
    blob = seal(secret, text, **where)
    assert open_sealed(secret, blob, **where) == text

    # The sealed bytes do not carry the plaintext, and two seals of it differ (fresh nonce).
    assert not contains_any_window(blob, text)
    again = seal(secret, text, **where)
    assert again != blob and open_sealed(secret, again, **where) == text

    for wrong in (dict(where, silo="hospital-b"), dict(where, run_id="another-run"),
                  dict(where, purpose="wrapped-key")):
        with pytest.raises(ValueError, match="fails authentication"):
            open_sealed(secret, blob, **wrong)
    with pytest.raises(ValueError, match="fails authentication"):
        open_sealed(random_secret(seed + 1), blob, **where)

    # One flipped bit anywhere: the magic is no longer a sealed blob; nonce, ciphertext, tag fail to verify.
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(ValueError, match="not a sealed fedsilo blob|fails authentication"):
            open_sealed(secret, bytes(bad), **where)
    for i in (8, 12, 19, 20, 100, len(blob) - 1):  # nonce, ciphertext, tag
        bad = bytearray(blob)
        bad[i] ^= 0xFF
        with pytest.raises(ValueError, match="fails authentication"):
            open_sealed(secret, bytes(bad), **where)

    # Not a sealed blob at all: the plaintext, nothing, a truncated blob.
    for junk in (text, b"", blob[:35], blob[:-1]):
        with pytest.raises(ValueError):
            open_sealed(secret, junk, **where)
    with pytest.raises(ValueError, match="not a sealed fedsilo blob"):
        open_sealed(secret, text, **where)


def test_a_bad_page_cursor_is_refused(joined: Fed) -> None:
    bank = joined.blob("hospital-a", b"bank")
    joined.publish("hospital-a", bank)
    expect(grpc.StatusCode.INVALID_ARGUMENT, "after_silo must be a silo name",
           lambda: joined.banks_response("hospital-b", after="x" * 65))
    assert joined.banks("hospital-b") == [("hospital-a", bank)]


# -- purposes ---------------------------------------------------------------------------------------------


class TwoRelays(Method):
    """A toy method relaying under two purposes (registered for these tests only)."""

    name = "test-two-relays"
    summary = "test only: FedAvg's layout, two sealed-relay purposes"
    relays = frozenset({"first-purpose", "second-purpose"})


class PerRound(Method):
    """A toy method relaying one blob per silo and round under ``tally-r<round>`` (as FedAWA does)."""

    name = "test-per-round"
    summary = "test only: FedAvg's layout, a per-round sealed-relay purpose"
    round_relays = frozenset({"tally-r"})


@pytest.fixture(scope="module", autouse=True)
def _toy_method() -> Iterator[None]:
    """Registered while this module's tests run only: tests elsewhere list every registered method."""
    register_method(TwoRelays)
    register_method(PerRound)
    yield
    unregister_method(TwoRelays.name)
    unregister_method(PerRound.name)


def test_a_per_round_purpose_is_refused_outside_its_round(start_fed: Callable[..., Fed]) -> None:
    """``tally-r<r>`` is published only while round r is open and read only once it has opened: before the
    first round (the key ceremony never runs here) both are FAILED_PRECONDITION and nothing is stored, so a
    silo cannot fill the relay with blobs for rounds to come; other purposes name the per-round pattern."""
    fed = start_fed(strategy=PerRound.name)
    for silo in SILOS:
        fed.join(silo)
    before = fed.snapshot()
    for rnd in (1, 2, 99999):
        purpose = f"tally-r{rnd}"
        blob = fed.blob("hospital-a", b"scalars", purpose)
        expect(grpc.StatusCode.FAILED_PRECONDITION,
               f"purpose '{purpose}' carries round {rnd}'s blobs, published while that round is open; the open "
               "round is none", lambda p=purpose, b=blob: fed.publish("hospital-a", b, p))
        expect(grpc.StatusCode.FAILED_PRECONDITION, f"purpose '{purpose}' carries round {rnd}'s blobs; that round "
               "has not opened", lambda p=purpose: fed.banks("hospital-b", p))
    for purpose in ("tally-r0", "tally-r01", "tally-r1234567", "tally-r", "tally-rx"):
        expect(grpc.StatusCode.FAILED_PRECONDITION, f"relays nothing under purpose '{purpose}': its method "
               "'test-per-round' uses the sealed relay for tally-r<round>",
               lambda p=purpose: fed.publish("hospital-a", fed.blob("hospital-a", b"x", p), p))
    assert fed.snapshot() == before
    fed.server.stop(grace=1.0)
    with sqlite3.connect(fed.state_dir / "coordinator.sqlite") as db:
        assert db.execute("SELECT count(*) FROM sealed_blobs").fetchone() == (0,)


def test_a_purpose_the_method_does_not_use_is_failed_precondition_naming_it(joined: Fed) -> None:
    """A ResFIM run relays style banks only: FedRDN's purpose, or any other well-formed one, is refused
    both ways, naming the purpose and the run's own; nothing is stored under it or under style banks."""
    kept = joined.blob("hospital-a", b"a's bank")
    assert joined.publish("hospital-a", kept) == 1
    before = joined.snapshot()
    for purpose in ("rdn-stats", "wrapped-key", "0", "a" * 64):
        fragment = (f"run '{RUN_ID}' relays nothing under purpose '{purpose}': its method 'resfim' uses the "
                    "sealed relay for style-bank")
        bank = joined.blob("hospital-b", b"b's bank", purpose)  # signed for that purpose: only the method refuses it
        expect(grpc.StatusCode.FAILED_PRECONDITION, fragment, lambda p=purpose: joined.publish("hospital-b", bank, p))
        expect(grpc.StatusCode.FAILED_PRECONDITION, fragment, lambda p=purpose: joined.banks("hospital-c", p))
    assert joined.banks("hospital-c") == [("hospital-a", kept)]
    assert joined.publish("hospital-b", joined.blob("hospital-b", b"b's bank")) == 2  # b published nothing before
    assert joined.snapshot() == before
    joined.server.stop(grace=1.0)
    with sqlite3.connect(joined.state_dir / "coordinator.sqlite") as db:
        assert db.execute("SELECT purpose, silo FROM sealed_blobs ORDER BY silo").fetchall() == [
            (PURPOSE, "hospital-a"), (PURPOSE, "hospital-b")]


@pytest.mark.parametrize("purpose", ["", "Style-Bank", "style_bank", "style-bank/v1", "style bank", "a" * 65,
                                     "style-bänk", "style-bank\n", "\x00"],
                         ids=["empty", "upper-case", "underscore", "slash", "space", "65-chars", "non-ascii",
                              "newline", "nul"])
def test_a_malformed_purpose_is_invalid_argument_and_nothing_is_stored(joined: Fed, purpose: str) -> None:
    kept = joined.blob("hospital-a", b"a's bank")
    assert joined.publish("hospital-a", kept) == 1
    before = joined.snapshot()
    fragment = "is not 1..64 characters of [a-z0-9-]"
    bank = joined.blob("hospital-b", b"b's bank")
    expect(grpc.StatusCode.INVALID_ARGUMENT, fragment, lambda: joined.publish("hospital-b", bank, purpose))
    expect(grpc.StatusCode.INVALID_ARGUMENT, fragment, lambda: joined.banks_response("hospital-c", purpose))
    assert joined.banks("hospital-c") == [("hospital-a", kept)]
    assert joined.snapshot() == before


def test_a_fedrdn_run_relays_its_statistics_and_nothing_else(start_fed: Callable[..., Fed]) -> None:
    fed = start_fed(strategy="fedrdn")
    for silo in SILOS:
        fed.join(silo)
    stats = fed.blob("hospital-b", b"b's statistics", "rdn-stats")
    assert fed.publish("hospital-b", stats, "rdn-stats") == 1
    assert fed.banks("hospital-a", "rdn-stats") == [("hospital-b", stats)]
    expect(grpc.StatusCode.FAILED_PRECONDITION,
           f"run '{RUN_ID}' relays nothing under purpose 'style-bank': its method 'fedrdn' uses the sealed relay "
           "for rdn-stats", lambda: fed.publish("hospital-a", fed.blob("hospital-a", b"a's bank")))


def test_each_purpose_holds_its_own_blob_per_silo(start_fed: Callable[..., Fed]) -> None:
    """Under a method with two purposes a silo publishes one blob under each: the same payload under both
    is fine (each blob signed for its purpose; the receivers check the sealing purpose inside), and a
    different second blob under one purpose is refused without touching the other."""
    fed = start_fed(strategy=TwoRelays.name)
    for silo in SILOS:
        fed.join(silo)
    one_first, one_second = (fed.blob("hospital-a", b"one", p) for p in ("first-purpose", "second-purpose"))
    two = fed.blob("hospital-b", b"two", "second-purpose")
    assert fed.publish("hospital-a", one_first, "first-purpose") == 1
    assert fed.publish("hospital-a", one_second, "second-purpose") == 1
    assert fed.publish("hospital-b", two, "second-purpose") == 2
    expect(grpc.StatusCode.ALREADY_EXISTS, "silo 'hospital-a' already published its 'second-purpose' blob",
           lambda: fed.publish("hospital-a", fed.blob("hospital-a", b"other", "second-purpose"), "second-purpose"))
    assert fed.banks("hospital-c", "first-purpose") == [("hospital-a", one_first)]
    assert fed.banks("hospital-c", "second-purpose") == [("hospital-a", one_second), ("hospital-b", two)]
    assert fed.banks("hospital-a", "first-purpose") == []
    assert fed.banks_response("hospital-b", "first-purpose").silos_joined == 3


# -- paging ------------------------------------------------------------------------------------------------


def test_pages_follow_the_cursor_never_hold_the_callers_own_and_hold_at_least_one(
        start_fed: Callable[..., Fed], exact_run: str) -> None:
    joined = start_fed(run_id=exact_run)
    for silo in SILOS:
        joined.join(silo)
    half = MAX_SEALED_BYTES // 2
    # The smallest step of a signed blob's size is 4 bytes.
    a, b, c = (sized(joined.certs, silo, size, exact_run)
               for silo, size in zip(SILOS, (half, half + 4, MAX_SEALED_BYTES)))
    for silo, blob in zip(SILOS, (a, b, c)):
        joined.publish(silo, blob)
    # a + b exceed a page by one step: b starts the next page; c alone fills a page.
    pages = []
    after = ""
    while True:
        resp = joined.banks_response("hospital-c", after=after)
        pages.append([(e.silo, bytes(e.blob)) for e in resp.entries])
        if not resp.more:
            break
        after = pages[-1][-1][0]
    assert pages == [[("hospital-a", a)], [("hospital-b", b)]]
    # For a, whose own blob is skipped, b and c are two pages as well (b + c > 4 MiB).
    first = joined.banks_response("hospital-a")
    assert [e.silo for e in first.entries] == ["hospital-b"] and first.more
    assert joined.banks("hospital-a") == [("hospital-b", b), ("hospital-c", c)]
    # A cursor between names, past the caller's own, or past everyone.
    assert joined.banks_response("hospital-a", after="hospital-b").entries[0].silo == "hospital-c"
    resp = joined.banks_response("hospital-b", after="hospital-a")
    assert [e.silo for e in resp.entries] == ["hospital-c"] and not resp.more
    resp = joined.banks_response("hospital-a", after="hospital-c")
    assert (list(resp.entries), resp.more, resp.silos_joined) == ([], False, 3)
    resp = joined.banks_response("hospital-a", after="x" * 64)  # the longest cursor allowed
    assert (list(resp.entries), resp.more) == ([], False)


def test_blobs_that_fill_a_page_exactly_come_in_one_page(start_fed: Callable[..., Fed], exact_run: str) -> None:
    fed = start_fed(run_id=exact_run)
    for silo in SILOS:
        fed.join(silo)
    half = MAX_SEALED_BYTES // 2
    a, b = (sized(fed.certs, silo, half, exact_run) for silo in SILOS[:2])
    fed.publish("hospital-a", a)
    fed.publish("hospital-b", b)
    resp = fed.banks_response("hospital-c")
    assert [(e.silo, bytes(e.blob)) for e in resp.entries] == [("hospital-a", a), ("hospital-b", b)]
    assert not resp.more
