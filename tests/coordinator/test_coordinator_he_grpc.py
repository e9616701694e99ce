"""Homomorphic aggregation over REAL gRPC with mutual TLS on loopback.

A ``CoordinatorServer`` with ``aggregation = he`` (default BFV parameters) and three enrolled
silos. The key ceremony runs through the RPCs with real crypto: every silo joins with a
signed X25519 announcement, the key holder (the first enrolled silo) verifies them, wraps
the BFV secret key for each with ``wrap_key`` and publishes; the others fetch their wrapped
key, ``unwrap_key`` it (checking the holder's signature against the CA) and rebuild the
shared ``SecretContext``. Uploads are built here with raw ``fedsilo.v1`` stubs: seeded BFV
ciphertexts of ``w_i / N * u_i`` (``N`` the round's weight normalizer), length-prefixed.

Every refusal test checks the status code and a meaningful fragment of its details, that
the run status and round history (Admin RPCs) are unchanged, and then finishes the round
with valid uploads, decrypts the fetched aggregate with the shared secret context and
compares it with the weighted mean of exactly the valid uploads, within the stated error
(max |error| <= 1e-4 * max |plaintext mean|).
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

import grpc
import numpy as np
import pytest
import tenseal.sealapi as seal

from fedsilo.coordinator.config import AggregationMode, FederationConfig, TlsFiles
from fedsilo.coordinator.server import CoordinatorServer
from fedsilo.privacy import pki
from fedsilo.privacy.he import FixedPoint, HeParams, SecretContext
from fedsilo.privacy.keywrap import KemKeyPair, announce_kem_public, unwrap_key, verify_kem_announcement, wrap_key
from fedsilo.privacy.pki import Role
from fedsilo.v1 import admin_pb2, admin_pb2_grpc, federation_pb2, federation_pb2_grpc, tensor_pb2
from upload_signing import signed

if TYPE_CHECKING:
    from conftest import Certs  # tests/coordinator/conftest.py: the module-scoped `certs` fixture

RUN_ID = "grpc-he"
SILOS = ("hospital-a", "hospital-b", "hospital-c")  # conftest.HOSPITALS: the `certs` fixture has these
KEY_HOLDER = SILOS[0]
EXAMPLES = {"hospital-a": 120, "hospital-b": 380, "hospital-c": 500}
NORMALIZER = float(sum(EXAMPLES.values()))  # every silo joins: the round's weight normalizer
# 20,000 + 480 = 20,480 float32 parameters = exactly 5 ciphertexts of 4,096 slots.
SHAPES = {"layer.weight": (100, 200), "layer.bias": (480,)}
PARAMS = 20_480
N_CIPHERTEXTS = 5
FINGERPRINT = "7a" * 32
MAX_CHUNK_BYTES = 64 * 1024
RPC_TIMEOUT_S = 10
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
HE = federation_pb2.PAYLOAD_ENCODING_HE_CIPHERTEXTS

Arrays = dict[str, np.ndarray]
Update = tuple[float, Arrays]
Snapshot = tuple[admin_pb2.GetStatusResponse, admin_pb2.ListRoundsResponse]


# -- certificates -------------------------------------------------------------------------------




# -- payloads, built here independently of the agent's helpers ---------------------------------------


def make_update(seed: int) -> Arrays:
    """Values within the default clip bound (1.0)."""
    rng = np.random.default_rng(seed)
    return {k: rng.uniform(-1, 1, size=s).astype(np.float32) for k, s in SHAPES.items()}


def flat(arrays: Arrays) -> np.ndarray:
    return np.concatenate([np.ravel(arrays[k]).astype(np.float64) for k in SHAPES])


def weighted_mean(updates: Iterable[Update]) -> np.ndarray:
    updates = list(updates)
    return sum(w * flat(u) for w, u in updates) / sum(w for w, _ in updates)


def manifest_msg() -> tensor_pb2.PayloadManifest:
    return tensor_pb2.PayloadManifest(
        tensors=[tensor_pb2.TensorSpec(name=k, dtype=tensor_pb2.DTYPE_FLOAT32, shape=list(s))
                 for k, s in SHAPES.items()],
        total_bytes=4 * PARAMS)


def frame(blobs: Iterable[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in blobs)


def unframe(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        out.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    assert pos == len(data)
    return out


def stream(rnd: int, weight: float, payload: bytes, encoding: int = HE,
           chunk_bytes: int = MAX_CHUNK_BYTES) -> list[federation_pb2.SubmitUpdateRequest]:
    """Header, chunks, trailer (count and SHA-256 of the payload)."""
    chunks = [payload[i:i + chunk_bytes] for i in range(0, len(payload), chunk_bytes)]
    head = federation_pb2.UpdateHeader(round=rnd, weight=weight, manifest=manifest_msg(), encoding=encoding,
                                       payload_bytes=len(payload))
    return [federation_pb2.SubmitUpdateRequest(header=head),
            *(federation_pb2.SubmitUpdateRequest(chunk=c) for c in chunks),
            federation_pb2.SubmitUpdateRequest(trailer=tensor_pb2.PayloadTrailer(
                num_chunks=len(chunks), sha256=hashlib.sha256(payload).digest()))]


def encrypt(ctx: SecretContext, arrays: Arrays, weight: float, normalizer: float = NORMALIZER,
            seed: int = 0) -> list[bytes]:
    """A silo's ciphertexts: Enc(w_i / N * u_i), fixed point with stochastic rounding."""
    ints, clipped = FixedPoint(params=ctx.params).encode(flat(arrays) * (weight / normalizer),
                                                         np.random.default_rng(seed))
    assert clipped == 0
    blobs = ctx.encrypt(ints)
    assert len(blobs) == N_CIPHERTEXTS
    return blobs


def contains_window(data: bytes, secret: bytes, width: int = 64) -> bool:
    """Whether any ``width``-byte window of ``secret`` occurs in ``data``.

    Any such window contains a ``width/2``-byte block of ``secret`` starting at a multiple of
    ``width/2``; find those blocks, then measure how far each occurrence extends.
    """
    half = width // 2
    for j in range(0, len(secret) - half + 1, half):
        block = secret[j:j + half]
        p = data.find(block)
        while p >= 0:
            left = 0
            while left < min(j, p) and secret[j - left - 1] == data[p - left - 1]:
                left += 1
            right = 0
            while (j + half + right < len(secret) and p + half + right < len(data)
                   and secret[j + half + right] == data[p + half + right]):
                right += 1
            if left + half + right >= width:
                return True
            p = data.find(block, p + 1)
    return False


# -- a running coordinator ------------------------------------------------------------------------


def expect(code: grpc.StatusCode, fragment: str, call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert err.code() is code, (err.code(), err.details())
    assert fragment in (err.details() or ""), err.details()
    return err


@dataclass(frozen=True, kw_only=True)
class Fetched:
    header: federation_pb2.AggregateHeader
    blobs: list[bytes]
    payload_bytes: int
    wire_bytes: int
    mean: np.ndarray


@dataclass(kw_only=True)
class Silo:
    """What one silo holds: its KEM key pair, its signed announcement, then the run's key."""

    name: str
    kem: KemKeyPair
    announcement: bytes
    context: SecretContext | None = None
    wrapped_received: bytes | None = None


@dataclass
class Fed:
    """A ``CoordinatorServer`` on 127.0.0.1, mTLS channels to it, and the silos' key material."""

    server: CoordinatorServer
    certs: Certs
    silos: dict[str, Silo] = field(default_factory=dict)
    published: dict[str, bytes] = field(default_factory=dict)  # what the key holder published, per recipient
    _channels: dict[Path, grpc.Channel] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.address = f"127.0.0.1:{self.server.port}"
        for name in (*SILOS, "hospital-x"):
            paths = self.certs.silo[name]
            kem = KemKeyPair.generate()
            ann = announce_kem_public(run_id=RUN_ID, silo=name, public=kem.public_bytes(),
                                      certificate_pem=paths.cert.read_bytes(), private_key_pem=paths.key.read_bytes())
            self.silos[name] = Silo(name=name, kem=kem, announcement=ann)

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

    def stub(self, silo: str) -> federation_pb2_grpc.FederationStub:
        return federation_pb2_grpc.FederationStub(self.channel(self.certs.silo[silo]))

    def admin_stub(self) -> admin_pb2_grpc.AdminStub:
        return admin_pb2_grpc.AdminStub(self.channel(self.certs.admin))

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()

    # -- calls ----------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        admin = self.admin_stub()
        return (admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=RPC_TIMEOUT_S),
                admin.ListRounds(admin_pb2.ListRoundsRequest(), timeout=RPC_TIMEOUT_S))

    def state(self) -> int:
        return self.snapshot()[0].state

    def run_info(self, silo: str = KEY_HOLDER) -> federation_pb2.GetRunResponse:
        return self.stub(silo).GetRun(federation_pb2.GetRunRequest(), timeout=RPC_TIMEOUT_S)

    def join(self, silo: str, announcement: bytes | None = None) -> federation_pb2.JoinResponse:
        specs = manifest_msg().tensors
        req = federation_pb2.JoinRequest(
            model_fingerprint=FINGERPRINT, num_train_examples=EXAMPLES.get(silo, 1), shared_tensors=specs,
            agent_version="test/1",
            kem_announcement=self.silos[silo].announcement if announcement is None else announcement)
        return self.stub(silo).Join(req, timeout=RPC_TIMEOUT_S)

    def recipients(self, silo: str = KEY_HOLDER) -> list[tuple[str, bytes]]:
        resp = self.stub(silo).ListKeyRecipients(federation_pb2.ListKeyRecipientsRequest(), timeout=RPC_TIMEOUT_S)
        return [(r.name, bytes(r.kem_announcement)) for r in resp.recipients]

    def publish(self, entries: Iterable[tuple[str, bytes]], silo: str = KEY_HOLDER) -> int:
        req = federation_pb2.PublishWrappedKeysRequest(
            keys=[federation_pb2.WrappedKeyEntry(recipient=r, wrapped=w) for r, w in entries])
        return self.stub(silo).PublishWrappedKeys(req, timeout=RPC_TIMEOUT_S).stored

    def wrapped_key(self, silo: str) -> federation_pb2.GetWrappedKeyResponse:
        return self.stub(silo).GetWrappedKey(federation_pb2.GetWrappedKeyRequest(), timeout=RPC_TIMEOUT_S)

    def task(self, silo: str, after_round: int, wait_s: int = 0) -> federation_pb2.GetTaskResponse:
        return self.stub(silo).GetTask(federation_pb2.GetTaskRequest(after_round=after_round, wait_seconds=wait_s),
                                       timeout=RPC_TIMEOUT_S + wait_s)

    def submit(self, silo: str, msgs: Iterable[federation_pb2.SubmitUpdateRequest],
               sign: bool = True) -> federation_pb2.SubmitUpdateResponse:
        """Streams ``msgs``, the trailer signed as the silo's agent signs it (unless ``sign`` is False)."""
        msgs = signed(msgs, self.certs.silo[silo], run_id=RUN_ID, silo=silo) if sign else list(msgs)
        return self.stub(silo).SubmitUpdate(iter(msgs), timeout=RPC_TIMEOUT_S)

    # -- the key ceremony, as the key holder and the other silos run it --------------------------
    def holder_context(self) -> SecretContext:
        holder = self.silos[KEY_HOLDER]
        if holder.context is None:
            holder.context = SecretContext.generate(HeParams.from_bytes(self.run_info().he_parameters))
        return holder.context

    def wrap_for(self, recipient: str, announcement: bytes) -> bytes:
        """The key holder: verify the relayed announcement against the CA, wrap and sign the key."""
        ctx = self.holder_context()
        paths = self.certs.silo[KEY_HOLDER]
        public = verify_kem_announcement(announcement, run_id=RUN_ID, expected_silo=recipient,
                                         ca_pem=self.certs.ca.read_bytes())
        return wrap_key(secret=ctx.secret_key_bytes(), run_id=RUN_ID, issuer=KEY_HOLDER,
                        issuer_certificate_pem=paths.cert.read_bytes(), issuer_private_key_pem=paths.key.read_bytes(),
                        params_fingerprint=ctx.params.fingerprint(), recipient=recipient,
                        recipient_public=public).to_bytes()

    def serve_recipients(self) -> list[str]:
        """The key holder: wraps for every listed recipient and publishes; returns their names."""
        entries = [(name, self.wrap_for(name, ann)) for name, ann in self.recipients()]
        if entries:
            assert self.publish(entries) == len(entries)
            self.published.update(entries)
        return [n for n, _ in entries]

    def receive_key(self, silo: str) -> SecretContext:
        """A silo: fetch the wrapped key, check it against the CA and the key holder, rebuild the context."""
        resp = self.wrapped_key(silo)
        assert resp.ready
        me = self.silos[silo]
        me.wrapped_received = bytes(resp.wrapped)
        params = HeParams.from_bytes(self.run_info(silo).he_parameters)
        secret = unwrap_key(me.wrapped_received, run_id=RUN_ID, me=silo, my_keypair=me.kem,
                            ca_pem=self.certs.ca.read_bytes(), expected_issuer=KEY_HOLDER,
                            params_fingerprint=params.fingerprint())
        me.context = SecretContext.from_secret_key(params, secret)
        return me.context

    def ceremony(self) -> None:
        """Everyone joins, the key holder wraps for all others, they unwrap; the run is running."""
        for silo in SILOS:
            self.join(silo)
        assert sorted(self.serve_recipients()) == sorted(SILOS[1:])
        for silo in SILOS[1:]:
            self.receive_key(silo)
        assert self.state() == federation_pb2.RUN_STATE_RUNNING

    def context(self, silo: str) -> SecretContext:
        ctx = self.silos[silo].context
        assert ctx is not None, f"{silo} has no key"
        return ctx

    # -- rounds -----------------------------------------------------------------------------
    def upload(self, silo: str, rnd: int, update: Update, seed: int = 0) -> federation_pb2.SubmitUpdateResponse:
        weight, arrays = update
        return self.submit(silo, stream(rnd, weight, frame(encrypt(self.context(silo), arrays, weight, seed=seed))))

    def fetch(self, silo: str, rnd: int) -> Fetched:
        head, tail, buf, n, wire = None, None, bytearray(), 0, 0
        for resp in self.stub(silo).FetchAggregate(federation_pb2.FetchAggregateRequest(round=rnd),
                                                   timeout=RPC_TIMEOUT_S):
            wire += resp.ByteSize()
            kind = resp.WhichOneof("part")
            if kind == "header":
                assert head is None
                head = resp.header
            elif kind == "chunk":
                assert head is not None and tail is None
                buf += resp.chunk
                n += 1
            else:
                assert kind == "trailer" and tail is None
                tail = resp.trailer
        assert head is not None and tail is not None
        assert tail.num_chunks == n and tail.sha256 == hashlib.sha256(buf).digest()
        assert head.encoding == HE and head.payload_bytes == len(buf)
        assert head.manifest == manifest_msg()
        blobs = unframe(bytes(buf))
        assert len(blobs) == N_CIPHERTEXTS
        # The silo's side: decrypt the sum of w_i / N * u_i, undo N, divide by the total weight.
        ctx = self.context(silo)
        summed = FixedPoint(params=ctx.params).decode(ctx.decrypt(blobs, PARAMS))
        mean = summed * (head.weight_normalizer / head.total_weight)
        return Fetched(header=head, blobs=blobs, payload_bytes=len(buf), wire_bytes=wire, mean=mean)

    def finish_round(self, rnd: int, updates: dict[str, Update], already: Iterable[Update] = ()) -> Fetched:
        """Uploads valid updates (the round then has every enrolled silo's upload) and checks the
        decrypted aggregate against numpy; ``already`` are uploads accepted before."""
        already = list(already)
        for i, (silo, update) in enumerate(updates.items(), start=len(already) + 1):
            resp = self.upload(silo, rnd, update, seed=i)
            assert (resp.round, resp.uploads_in_round) == (rnd, i)
        counted = already + list(updates.values())
        got = self.fetch(SILOS[1], rnd)  # a silo that received the key through the ceremony
        assert got.header.round == rnd and got.header.num_contributors == len(counted)
        assert got.header.total_weight == pytest.approx(sum(w for w, _ in counted), rel=1e-12)
        assert got.header.weight_normalizer == NORMALIZER
        assert_within_stated_error(got.mean, weighted_mean(counted))
        return got


def assert_within_stated_error(got: np.ndarray, want: np.ndarray) -> None:
    err = float(np.max(np.abs(got - want)))
    scale = float(np.max(np.abs(want)))
    assert err <= 1e-4 * scale, f"max |error| {err:.3g} > 1e-4 * max |mean| ({scale:.3g})"


def make_config(certs: Certs, state_dir: Path, **overrides: object) -> FederationConfig:
    kwargs: dict[str, object] = dict(
        run_id=RUN_ID, silos=SILOS, rounds=2, min_silos=2, aggregation=AggregationMode.HE, he={},
        # A round closes when all three uploaded; the run starts once all three joined and hold the key.
        round_deadline_s=60.0, quorum_timeout_s=600.0, start_grace_s=600.0,
        listen="127.0.0.1:0", state_dir=state_dir,
        tls=TlsFiles(ca=certs.ca, cert=certs.coordinator.cert, key=certs.coordinator.key),
        max_chunk_bytes=MAX_CHUNK_BYTES, model={"name": "tiny"}, training={"epochs": 1},
    )
    kwargs.update(overrides)
    return FederationConfig(**kwargs)  # type: ignore[arg-type]


@pytest.fixture
def start_fed(certs: Certs, tmp_path: Path) -> Iterator[Callable[..., Fed]]:
    started: list[Fed] = []

    def start(**overrides: object) -> Fed:
        server = CoordinatorServer(make_config(certs, tmp_path / f"state{len(started)}", **overrides), max_workers=8)
        server.start()
        fed = Fed(server, certs)
        started.append(fed)
        return fed

    yield start
    for fed in started:
        fed.close()
        fed.server.stop(grace=1.0)


@pytest.fixture
def fed(start_fed: Callable[..., Fed]) -> Fed:
    """A coordinator nobody has joined yet."""
    return start_fed()


@pytest.fixture
def running(fed: Fed) -> Fed:
    """Key ceremony done, round 1 open, every silo holds its TRAIN task for round 1."""
    fed.ceremony()
    for silo in SILOS:
        task = fed.task(silo, 0)
        assert (task.kind, task.round, task.weight_normalizer) == (federation_pb2.TASK_KIND_TRAIN, 1, NORMALIZER)
    return fed


GOOD = {silo: (float(EXAMPLES[silo]), make_update(i)) for i, silo in enumerate(SILOS, start=1)}


def other_params_context() -> SecretContext:
    """Same N and coefficient modulus as the run, another plain modulus: other HE parameters."""
    return SecretContext.generate(HeParams(plain_modulus=seal.PlainModulus.Batching(4096, 40).value()))


# -- the key ceremony -------------------------------------------------------------------------------


def test_key_ceremony_starts_the_run_only_once_every_joined_silo_has_its_wrapped_key(fed: Fed) -> None:
    run = fed.run_info()
    assert run.aggregation == federation_pb2.AGGREGATION_HE and run.key_holder == KEY_HOLDER
    assert HeParams.from_bytes(run.he_parameters) == HeParams()  # he = {}: the defaults

    # An HE run needs the silo's signed X25519 key at join.
    expect(grpc.StatusCode.INVALID_ARGUMENT, "kem_announcement (the silo's signed X25519 key) is required",
           lambda: fed.join("hospital-b", announcement=b""))

    waiting = federation_pb2.RUN_STATE_WAITING_FOR_SILOS
    assert fed.join(KEY_HOLDER).state == waiting
    assert fed.recipients() == []
    assert fed.join("hospital-b").state == waiting  # min_silos joined, but b has no key
    assert fed.wrapped_key("hospital-b").ready is False
    # The coordinator relays b's announcement byte for byte.
    assert fed.recipients() == [("hospital-b", fed.silos["hospital-b"].announcement)]
    assert fed.join("hospital-c").state == waiting
    status = fed.snapshot()[0]
    assert "waiting for the key holder 'hospital-a'" in status.message and "hospital-b" in status.message

    # Wrap for b only: c still has no key, the run still waits.
    wrapped_b = fed.wrap_for("hospital-b", fed.recipients()[0][1])
    assert fed.publish([("hospital-b", wrapped_b)]) == 1
    fed.published["hospital-b"] = wrapped_b
    assert fed.state() == waiting
    assert fed.recipients() == [("hospital-c", fed.silos["hospital-c"].announcement)]
    assert fed.wrapped_key("hospital-c").ready is False
    for silo in SILOS:  # nobody gets a task yet
        assert fed.task(silo, 0).kind == federation_pb2.TASK_KIND_WAIT

    assert fed.serve_recipients() == ["hospital-c"]
    assert fed.state() == federation_pb2.RUN_STATE_RUNNING
    assert fed.recipients() == []

    # GetWrappedKey returns exactly what the key holder published, and it opens to the key.
    holder_key = fed.holder_context().secret_key_bytes()
    for silo in SILOS[1:]:
        ctx = fed.receive_key(silo)
        assert fed.silos[silo].wrapped_received == fed.published[silo]
        assert ctx.secret_key_bytes() == holder_key
    # The key holder has no wrapped key of its own (it generated the key).
    assert fed.wrapped_key(KEY_HOLDER).ready is False

    for silo in SILOS:
        task = fed.task(silo, 0)
        assert (task.kind, task.round, task.weight_normalizer) == (federation_pb2.TASK_KIND_TRAIN, 1, NORMALIZER)
    fed.finish_round(1, GOOD)


def _for_another_run(fed: Fed) -> bytes:
    paths = fed.certs.silo["hospital-b"]
    return announce_kem_public(run_id="another-run", silo="hospital-b", public=fed.silos["hospital-b"].kem.public_bytes(),
                               certificate_pem=paths.cert.read_bytes(), private_key_pem=paths.key.read_bytes())


def _another_silos(fed: Fed) -> bytes:
    return fed.silos["hospital-c"].announcement  # valid, but c's


def _foreign_ca(fed: Fed) -> bytes:
    """Signed with a certificate for hospital-b that another CA issued."""
    root = fed.state_dir.parent / "foreign-pki"
    pki.init_ca(root / "ca", common_name="another federation CA")
    paths = pki.issue_certificate(root / "ca", root / "certs", role=Role.SILO, name="hospital-b")
    return announce_kem_public(run_id=RUN_ID, silo="hospital-b", public=fed.silos["hospital-b"].kem.public_bytes(),
                               certificate_pem=paths.cert.read_bytes(), private_key_pem=paths.key.read_bytes())


def _tampered(fed: Fed) -> bytes:
    blob = bytearray(fed.silos["hospital-b"].announcement)
    blob[-1] ^= 0x01  # the last byte of the signature
    return bytes(blob)


def _garbage(fed: Fed) -> bytes:
    return b"\x01" * 64


@pytest.mark.parametrize("make, fragment", [
    (_for_another_run, f"refusing a KEM key announcement for run 'another-run': this is run '{RUN_ID}'"),
    (_another_silos, "refusing a KEM key announcement from silo 'hospital-c' offered as silo 'hospital-b'"),
    (_foreign_ca, "silo 'hospital-b''s certificate in its KEM key announcement was not issued by this federation's CA"),
    (_tampered, "refusing silo 'hospital-b''s KEM key: its signature does not match 'hospital-b''s certificate"),
    (_garbage, "this is not a fedsilo KEM key announcement"),
], ids=["another-run", "another-silos", "foreign-ca", "tampered", "garbage"])
def test_a_key_announcement_that_does_not_verify_is_invalid_argument_and_the_silo_is_not_joined(
        fed: Fed, make: Callable[[Fed], bytes], fragment: str) -> None:
    """Join checks the announcement as the key holder would: a silo the key holder could not wrap
    the key for is not joined, so the run never waits for it."""
    fed.join(KEY_HOLDER)
    before = fed.snapshot()
    expect(grpc.StatusCode.INVALID_ARGUMENT, "kem_announcement refused: " + fragment,
           lambda: fed.join("hospital-b", announcement=make(fed)))
    assert fed.snapshot() == before
    assert [(s.name, s.joined) for s in before[0].silos] == [(KEY_HOLDER, True), ("hospital-b", False),
                                                             ("hospital-c", False)]
    assert fed.recipients() == []  # nothing stored for the key holder to wrap for
    expect(grpc.StatusCode.FAILED_PRECONDITION, "silo 'hospital-b' has not joined",
           lambda: fed.wrapped_key("hospital-b"))
    # With its own announcement b joins, and the key ceremony runs as usual.
    fed.ceremony()


def test_a_quorum_of_good_silos_starts_the_run_although_one_announcement_was_for_another_run(
        start_fed: Callable[..., Fed]) -> None:
    """The measured attack: b's replayed announcement was stored, the key holder refused to wrap for
    it, and the run waited forever. Now b is refused at Join and a + c start the run after the grace."""
    fed = start_fed(start_grace_s=0.5)
    fed.join(KEY_HOLDER)
    expect(grpc.StatusCode.INVALID_ARGUMENT, "kem_announcement refused",
           lambda: fed.join("hospital-b", announcement=_for_another_run(fed)))
    fed.join("hospital-c")
    assert fed.serve_recipients() == ["hospital-c"]
    fed.receive_key("hospital-c")
    task = fed.task("hospital-c", 0, wait_s=10)  # the server's ticker starts the run after start_grace_s
    assert (task.kind, task.round) == (federation_pb2.TASK_KIND_TRAIN, 1)
    assert fed.state() == federation_pb2.RUN_STATE_RUNNING


def test_after_the_grace_the_run_starts_with_the_silos_that_hold_the_key(start_fed: Callable[..., Fed]) -> None:
    """Every silo joined, but the key holder wrapped the key only for b: once min_silos silos hold it
    and start_grace_s passed, the run starts rather than wait for c forever; the key holder still
    wraps for c during the run, and c then holds the run's key."""
    grace = 3.0
    fed = start_fed(start_grace_s=grace)
    fed.holder_context()  # the key holder's key exists before anyone joins
    fed.join(KEY_HOLDER)
    joined_at = time.monotonic()
    fed.join("hospital-b")
    fed.join("hospital-c")
    wrapped_b = fed.wrap_for("hospital-b", fed.silos["hospital-b"].announcement)
    assert fed.publish([("hospital-b", wrapped_b)]) == 1
    fed.published["hospital-b"] = wrapped_b
    status = fed.snapshot()[0]
    assert time.monotonic() - joined_at < grace, "too slow to see the waiting run"
    assert status.state == federation_pb2.RUN_STATE_WAITING_FOR_SILOS
    assert ("waiting for the key holder 'hospital-a' to join and wrap the run's key for ['hospital-c']; 2 joined "
            "silos hold it (min_silos = 2), so the run starts without the others once start_grace_s has passed"
            ) == status.message

    task = fed.task("hospital-b", 0, wait_s=10)
    assert time.monotonic() - joined_at >= grace - 0.1  # b's join (the second) started the grace
    assert (task.kind, task.round, task.weight_normalizer) == (federation_pb2.TASK_KIND_TRAIN, 1, NORMALIZER)
    assert fed.state() == federation_pb2.RUN_STATE_RUNNING
    assert fed.wrapped_key("hospital-c").ready is False
    # The key holder keeps serving late recipients while the run goes on.
    assert fed.serve_recipients() == ["hospital-c"]
    assert fed.receive_key("hospital-c").secret_key_bytes() == fed.holder_context().secret_key_bytes()
    assert fed.task("hospital-c", 0).kind == federation_pb2.TASK_KIND_TRAIN


def test_non_key_holder_cannot_list_recipients_or_publish_keys(fed: Fed) -> None:
    for silo in SILOS:
        fed.join(silo)
    before = fed.snapshot()
    expect(grpc.StatusCode.PERMISSION_DENIED, "only the key holder 'hospital-a' lists key recipients",
           lambda: fed.recipients("hospital-b"))
    # b wraps a key of its own for c, correctly signed by b: still not the key holder.
    forged = SecretContext.generate(HeParams()).secret_key_bytes()
    paths = fed.certs.silo["hospital-b"]
    c_public = fed.silos["hospital-c"].kem.public_bytes()
    wrapped = wrap_key(secret=forged, run_id=RUN_ID, issuer="hospital-b",
                       issuer_certificate_pem=paths.cert.read_bytes(), issuer_private_key_pem=paths.key.read_bytes(),
                       params_fingerprint=HeParams().fingerprint(), recipient="hospital-c",
                       recipient_public=c_public).to_bytes()
    expect(grpc.StatusCode.PERMISSION_DENIED, "only the key holder 'hospital-a' publishes wrapped keys",
           lambda: fed.publish([("hospital-c", wrapped)], silo="hospital-b"))
    assert fed.snapshot() == before
    assert fed.wrapped_key("hospital-c").ready is False
    assert fed.state() == federation_pb2.RUN_STATE_WAITING_FOR_SILOS

    # The real ceremony then runs, c gets the key holder's bundle, and the round sums correctly.
    fed.serve_recipients()
    for silo in SILOS[1:]:
        fed.receive_key(silo)
        assert fed.silos[silo].wrapped_received == fed.published[silo]
    fed.finish_round(1, GOOD)


@pytest.mark.parametrize("recipient, fragment", [
    ("hospital-z", "'hospital-z' is not a joined silo that needs the key"),
    ("hospital-x", "'hospital-x' is not a joined silo that needs the key"),
    (KEY_HOLDER, "'hospital-a' is not a joined silo that needs the key"),
    ("h" * 100_000, "'" + "h" * 80),  # quoted as an excerpt: the first 80 characters ...
    ("h" * 100_000, " (99920 more characters)' is not a joined silo that needs the key"),  # ... and how many more
], ids=["unknown", "not-enrolled", "key-holder-itself", "long-name-head", "long-name-tail"])
def test_publishing_for_an_unknown_recipient_is_invalid_argument(fed: Fed, recipient: str, fragment: str) -> None:
    for silo in SILOS:
        fed.join(silo)
    wrapped_b = fed.wrap_for("hospital-b", fed.silos["hospital-b"].announcement)
    before = fed.snapshot()
    # All or nothing: b's valid entry in the same request is not stored either.
    expect(grpc.StatusCode.INVALID_ARGUMENT, fragment,
           lambda: fed.publish([("hospital-b", wrapped_b), (recipient, b"\x01" * 64)]))
    assert fed.snapshot() == before
    assert fed.wrapped_key("hospital-b").ready is False
    assert sorted(n for n, _ in fed.recipients()) == ["hospital-b", "hospital-c"]

    fed.serve_recipients()
    for silo in SILOS[1:]:
        fed.receive_key(silo)
    fed.finish_round(1, GOOD)


def _bundle_for_c_sent_as_b(fed: Fed) -> bytes:
    return fed.wrap_for("hospital-c", fed.silos["hospital-c"].announcement)


def _tampered(fed: Fed) -> bytes:
    blob = bytearray(fed.wrap_for("hospital-b", fed.silos["hospital-b"].announcement))
    blob[-10] ^= 0x01  # inside the signature
    return bytes(blob)


def _another_run(fed: Fed) -> bytes:
    ctx = fed.holder_context()
    paths = fed.certs.silo[KEY_HOLDER]
    public = fed.silos["hospital-b"].kem.public_bytes()
    return wrap_key(secret=ctx.secret_key_bytes(), run_id="another-run", issuer=KEY_HOLDER,
                    issuer_certificate_pem=paths.cert.read_bytes(), issuer_private_key_pem=paths.key.read_bytes(),
                    params_fingerprint=ctx.params.fingerprint(), recipient="hospital-b",
                    recipient_public=public).to_bytes()


@pytest.mark.parametrize("make, fragment", [
    (_bundle_for_c_sent_as_b, "addressed to silo 'hospital-c'"),
    (_tampered, "signature does not match"),
    (_another_run, "made for run 'another-run'"),
    (lambda fed: b"\x01" * 64, "not a fedsilo key bundle"),
], ids=["another-recipient", "tampered", "another-run", "garbage"])
def test_a_wrapped_key_its_recipient_would_refuse_is_refused_at_the_door(fed: Fed, make, fragment: str) -> None:
    """The coordinator cannot open a bundle, but checks what needs no secret (run, recipient, the key
    holder's certificate and signature, HE parameters); a refused publication stores nothing."""
    for silo in SILOS:
        fed.join(silo)
    before = fed.snapshot()
    expect(grpc.StatusCode.INVALID_ARGUMENT, "wrapped key for 'hospital-b' refused: ",
           lambda: fed.publish([("hospital-b", make(fed))]))
    err = expect(grpc.StatusCode.INVALID_ARGUMENT, fragment, lambda: fed.publish([("hospital-b", make(fed))]))
    assert len(err.details()) < 600
    assert fed.snapshot() == before and fed.wrapped_key("hospital-b").ready is False
    fed.serve_recipients()
    for silo in SILOS[1:]:
        fed.receive_key(silo)
    fed.finish_round(1, GOOD)


def test_silo_not_enrolled_is_permission_denied_for_keys_and_uploads(running: Fed) -> None:
    before = running.snapshot()
    denied = f"silo 'hospital-x' is not enrolled in run '{RUN_ID}'"
    expect(grpc.StatusCode.PERMISSION_DENIED, denied, lambda: running.join("hospital-x"))
    expect(grpc.StatusCode.PERMISSION_DENIED, denied, lambda: running.recipients("hospital-x"))
    expect(grpc.StatusCode.PERMISSION_DENIED, denied, lambda: running.wrapped_key("hospital-x"))
    expect(grpc.StatusCode.PERMISSION_DENIED, denied,
           lambda: running.publish([("hospital-b", b"\x01" * 64)], silo="hospital-x"))
    # A well-formed encrypted upload, even under the run's real key.
    blobs = encrypt(running.context(KEY_HOLDER), make_update(66), 1e9 / 2, normalizer=1e9)
    expect(grpc.StatusCode.PERMISSION_DENIED, denied,
           lambda: running.submit("hospital-x", stream(1, 1e9 / 2, frame(blobs))))
    assert running.snapshot() == before
    running.finish_round(1, GOOD)


# -- the encrypted round, its wire cost, and what the coordinator keeps --------------------------------


def test_round_decrypts_to_the_weighted_mean_at_the_stated_wire_cost_and_no_key_is_stored(running: Fed) -> None:
    got = running.finish_round(1, GOOD)

    # The aggregate is the encrypted sum (full, unseeded ciphertexts): ~15 B/param streamed.
    assert got.header.num_contributors == 3 and got.header.total_weight == NORMALIZER
    down_per_param = got.wire_bytes / PARAMS
    assert 14.0 <= got.payload_bytes / PARAMS <= down_per_param <= 16.0, down_per_param
    # Uploads: seeded ciphertexts, <= 8 B/param on the wire (Admin ListRounds, every message counted).
    r1 = running.snapshot()[1].rounds[0]
    assert (r1.round, r1.closed, sorted(r1.contributors), r1.params_shared) == (1, True, list(SILOS), PARAMS)
    up_per_param = r1.bytes_up / (PARAMS * len(SILOS))
    assert 7.0 <= up_per_param <= 8.0, up_per_param
    assert r1.bytes_down >= got.wire_bytes

    # A second round with other updates still works on top of the first (the sum was reset).
    round2 = {silo: (float(EXAMPLES[silo]), make_update(10 + i)) for i, silo in enumerate(SILOS)}
    for silo in SILOS:
        assert running.task(silo, 1).round == 2
    running.finish_round(2, round2)
    assert running.state() == federation_pb2.RUN_STATE_FINISHED

    # The coordinator's state dir holds no secret key material, running or stopped.
    secret = running.context(KEY_HOLDER).secret_key_bytes()
    assert contains_window(b"pad" + secret[1000:1064] + b"pad", secret)  # the scan works ...
    assert not contains_window(secret[1000:1063], secret)  # ... at exactly 64 bytes
    for when in ("running", "stopped"):
        if when == "stopped":
            running.server.stop(grace=1.0)
        files = [p for p in running.state_dir.rglob("*") if p.is_file()]
        assert any(p.name == "coordinator.sqlite" for p in files)
        assert any(p.parent.name == "aggregates" for p in files)
        for p in files:
            assert not contains_window(p.read_bytes(), secret), f"secret key bytes in {p} ({when})"


def test_silo_missing_from_the_round_is_divided_out(start_fed: Callable[..., Fed]) -> None:
    fed = start_fed(rounds=1, round_deadline_s=1.5)
    fed.ceremony()
    present = {silo: GOOD[silo] for silo in SILOS[:2]}  # hospital-c never uploads
    for i, (silo, update) in enumerate(present.items(), start=1):
        assert fed.upload(silo, 1, update, seed=i).uploads_in_round == i
    # Quorum (2) is in: the round closes at its deadline, and the run finishes.
    assert fed.task("hospital-a", 1, wait_s=10).kind == federation_pb2.TASK_KIND_STOP
    got = fed.fetch("hospital-b", 1)
    assert got.header.num_contributors == 2
    assert got.header.weight_normalizer == NORMALIZER and got.header.total_weight == 500.0
    assert_within_stated_error(got.mean, weighted_mean(present.values()))


# -- bad uploads: refused with a clear status, the running sum untouched -------------------------------


def _garbage(fed: Fed) -> bytes:
    blobs = encrypt(fed.context(KEY_HOLDER), make_update(66), 1.0)
    blobs[2] = np.random.default_rng(3).bytes(len(blobs[2]))
    return frame(blobs)


def _other_parameters(fed: Fed) -> bytes:
    return frame(encrypt(other_params_context(), make_update(66), 1.0))


def _too_few(fed: Fed) -> bytes:
    return frame(encrypt(fed.context(KEY_HOLDER), make_update(66), 1.0)[:-1])


def _too_many(fed: Fed) -> bytes:
    blobs = encrypt(fed.context(KEY_HOLDER), make_update(66), 1.0)
    return frame(blobs + blobs[:1])


@pytest.mark.parametrize("payload, fragment", [
    (_garbage, "ciphertext 3: ciphertext (31"),
    (_other_parameters, "ciphertext 1: ciphertext"),
    (_too_few, f"{N_CIPHERTEXTS - 1} ciphertexts in the upload; the shared tensors need {N_CIPHERTEXTS}"),
    (_too_many, "larger than any upload of this model can be"),
], ids=["does-not-deserialize", "other-he-parameters", "too-few-ciphertexts", "too-many-ciphertexts"])
def test_unusable_ciphertexts_are_invalid_argument(running: Fed, payload: Callable[[Fed], bytes],
                                                   fragment: str) -> None:
    # Sent by hospital-a, which then uploads its valid update: the refused one did not count.
    msgs = stream(1, GOOD[KEY_HOLDER][0], payload(running))
    before = running.snapshot()
    err = expect(grpc.StatusCode.INVALID_ARGUMENT, fragment, lambda: running.submit(KEY_HOLDER, msgs))
    if payload in (_garbage, _other_parameters):
        assert "does not deserialize" in err.details() and "other parameters" in err.details()
    assert running.snapshot() == before
    running.finish_round(1, GOOD)


def test_raw_tensors_in_an_he_run_are_invalid_argument(running: Fed) -> None:
    arrays = make_update(66)
    raw = b"".join(np.ascontiguousarray(arrays[k], dtype="<f4").tobytes() for k in SHAPES)
    msgs = stream(1, 1e3, raw, encoding=federation_pb2.PAYLOAD_ENCODING_RAW_TENSORS)
    before = running.snapshot()
    expect(grpc.StatusCode.INVALID_ARGUMENT, "payload encoding RAW_TENSORS does not match the run's he aggregation "
           "(expected HE_CIPHERTEXTS)", lambda: running.submit(KEY_HOLDER, msgs))
    assert running.snapshot() == before
    running.finish_round(1, GOOD)


def test_second_upload_for_the_same_round_is_already_exists(running: Fed) -> None:
    first = GOOD[KEY_HOLDER]
    assert running.upload(KEY_HOLDER, 1, first).uploads_in_round == 1
    before = running.snapshot()
    again = (first[0], make_update(66))
    expect(grpc.StatusCode.ALREADY_EXISTS, f"silo '{KEY_HOLDER}' already uploaded its update for round 1",
           lambda: running.upload(KEY_HOLDER, 1, again))
    assert running.snapshot() == before
    running.finish_round(1, {s: GOOD[s] for s in SILOS[1:]}, already=[first])
