"""Upload admission: every check an upload passes before it reaches the round, in one place.

In order: the caller is a joined silo; the header (weight, encoding, announced size, size
limit); the round (run running, the open round, not uploaded yet, silo not retired); privacy
(silo-level DP weights, the release accounted in the mirrored ledger first); the layout the
run's method gives the round; then the stream itself, spooled to disk while it arrives (chunk
sizes, byte count, chunk count, SHA-256) and validated by the aggregator (e.g. finite values).
Only a completely valid upload is handed to ``Rounds.accept``; a refused one changes nothing.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from fedsilo.coordinator import weights
from fedsilo.coordinator.context import RunContext
from fedsilo.coordinator.records import (
    ENCODING_FOR,
    MAX_UPLOAD_STATEMENT_CHARS,
    MAX_WEIGHT,
    PayloadEncoding,
    RunState,
    SubmitResult,
    UploadHeader,
    UploadPart,
    UploadTrailer,
)
from fedsilo.coordinator.rounds import Rounds
from fedsilo.core.errors import AlreadyExists, Cancelled, FailedPrecondition, InvalidArgument, ResourceExhausted
from fedsilo.core.validators import excerpt
from fedsilo.privacy.ledger import GuaranteeScope
from fedsilo.privacy.pki import Identity
from fedsilo.privacy.plan import entry_key

_SINGLE = GuaranteeScope.SINGLE_UPLOAD


class Admission:
    """Receives and checks upload streams, then hands them to the round.

    Args:
        ctx: the run's shared state.
        rounds: the round state machine that adds admitted uploads.
    """

    def __init__(self, ctx: RunContext, rounds: Rounds) -> None:
        self.ctx = ctx
        self.rounds = rounds

    def submit(self, caller: Identity, parts: Iterable[UploadPart]) -> SubmitResult:
        """Receives one upload stream, validates it completely, then adds it to the round.

        Nothing is stored unless the whole stream is well-formed: one header, chunks whose
        sizes add up to the manifest's, a trailer whose chunk count and SHA-256 match, finite
        values. The payload is spooled to disk while it streams, so memory does not depend on
        the update size or on the number of silos uploading at once.

        Raises:
            InvalidArgument, FailedPrecondition, AlreadyExists, ResourceExhausted: see the
            messages; the running sum and the database are unchanged.
        """
        ctx = self.ctx
        name = ctx.require_joined(caller)
        it = iter(parts)
        try:
            header = next(it)
        except StopIteration:
            raise InvalidArgument("empty upload stream: expected a header") from None
        if not isinstance(header, UploadHeader):
            raise InvalidArgument("an upload stream must start with a header")
        self.check_header(header)
        with ctx.cond:
            self.check_round(name, header)
            assert ctx.agg is not None
            agg = ctx.agg
            diff = header.manifest.difference(agg.manifest)
            if diff is not None:
                raise InvalidArgument(f"update does not match the run's shared tensors: {diff}")
            if header.size > agg.payload_bytes_bound():
                raise InvalidArgument(f"payload of {header.size} bytes is larger than any upload of this model "
                                      f"can be ({agg.payload_bytes_bound()} bytes)")
        spool = ctx.spool / f"r{header.round:06d}-{name}-{uuid.uuid4().hex}.part"
        try:
            received, digest, wire, statement = self.receive(it, header, spool)
            self.check_statement(name, header.round, digest, received, statement)
            agg.validate(spool)
            with ctx.cond:
                self.check_round(name, header)
                return self.rounds.accept(name, header, spool, digest, wire + header.wire_bytes, received,
                                          statement=statement)
        finally:
            spool.unlink(missing_ok=True)

    # -- the header -----------------------------------------------------------------------
    def check_header(self, header: UploadHeader) -> None:
        """Checks what a header says on its own: weight, encoding, announced size and the size limit."""
        cfg = self.ctx.cfg
        if not math.isfinite(header.weight) or not 0 < header.weight <= MAX_WEIGHT:
            raise InvalidArgument(f"weight {header.weight} is not a finite number in (0, 10^9]")
        expected = ENCODING_FOR[cfg.aggregation]
        if header.encoding is not expected:
            raise InvalidArgument(f"payload encoding {header.encoding.name} does not match the run's "
                                  f"{cfg.aggregation.value} aggregation (expected {expected.name})")
        if header.encoding is PayloadEncoding.RAW_TENSORS and header.size != header.manifest.total_bytes:
            raise InvalidArgument(f"payload_bytes {header.size} != the manifest's raw size {header.manifest.total_bytes}")
        if not 1 <= header.size:
            raise InvalidArgument(f"payload_bytes {header.size} must be >= 1")
        if header.size > cfg.max_upload_bytes:
            raise ResourceExhausted(
                f"upload of {header.size} bytes exceeds server.max_upload_bytes ({cfg.max_upload_bytes})"
            )

    # -- the round and privacy ------------------------------------------------------------
    def check_round(self, name: str, header: UploadHeader) -> None:
        """Raises unless ``name`` may upload ``header`` now (lock held): checked before the stream
        is received and again before it is added."""
        ctx = self.ctx
        state = ctx.state()
        if state is not RunState.RUNNING:
            raise FailedPrecondition(f"run {ctx.cfg.run_id!r} is {state.value}; no round is open")
        open_round = ctx.store.open_round()
        assert open_round is not None and ctx.agg is not None
        if header.round != open_round.round:
            when = "closed" if header.round < open_round.round else "not open yet"
            raise FailedPrecondition(f"round {header.round} is {when}; the open round is {open_round.round}")
        if name in ctx.store.uploads(header.round):
            raise AlreadyExists(f"silo {name!r} already uploaded its update for round {header.round}")
        retired = ctx.store.retired().get(name)
        if retired is not None:
            raise FailedPrecondition(f"silo {name!r} stopped training from round {retired[0]} ({retired[1]})")
        weight = weights.upload_weight(ctx, name)
        if header.weight != weight:
            why = ("silo-level DP weights every silo equally" if weight == 1.0 and ctx.cfg.privacy is not None
                   and ctx.cfg.privacy.silo_level else f"the {int(weight)} training examples silo {name!r} declared "
                   "at join")
            raise InvalidArgument(f"weight {header.weight} must be {weight:g}: the coordinator fixes an upload's "
                                  f"weight ({why})")
        if ctx.cfg.privacy is not None:
            self.check_accounted(name, header.round)

    def check_accounted(self, name: str, rnd: int) -> None:
        """An upload of a DP run needs its ledger entries mirrored first, matching the plan: each
        per-round release, and each release the plan schedules for this round besides them."""
        ctx = self.ctx
        plan = ctx.cfg.privacy
        assert plan is not None and ctx.mirror is not None
        position = ctx.method.ledger_position(rnd)
        entries = ctx.mirror.entries_at(name, ctx.cfg.run_id, *position)
        extra = plan.extra_releases(rnd)
        for planned in plan.round_releases() + extra:
            relation = planned.neighbouring.value
            what = f"{relation}-level" + (" scheduled extra release" if planned in extra else "")
            found = [e for e in entries if e.neighbouring.value == relation]
            if not found:
                raise FailedPrecondition(
                    f"round {rnd}: no {what} privacy-ledger entry of silo {name!r} is mirrored; send it "
                    "with SubmitLedgerEntries before uploading (every DP release is accounted first)")
            want = planned.key()
            if not any(entry_key(e) == want and e.guarantee(_SINGLE).noise_multiplier
                       == planned.single_upload_noise_multiplier for e in found):
                e = found[-1]
                raise FailedPrecondition(
                    f"round {rnd}: no mirrored {what} ledger entry of silo {name!r} matches the run's plan "
                    f"(mechanism, σ, q, steps, C) = {want}; its latest {relation}-level entry there, seq {e.seq}, "
                    f"accounts {entry_key(e)}")

    # -- the stream -------------------------------------------------------------------------
    def receive(self, it: Iterator[UploadPart], header: UploadHeader, spool: Path) -> tuple[int, str, int, str]:
        """Spools the payload chunks to ``spool``, checking them as they come.

        Returns:
            (payload bytes, hex SHA-256, wire bytes of the chunks and trailer, the trailer's upload statement).
        """
        total = header.size
        received = chunks = wire = 0
        sha = hashlib.sha256()
        trailer: UploadTrailer | None = None
        limit = self.ctx.cfg.max_chunk_bytes
        with open(spool, "wb") as f:
            while True:
                try:
                    part = next(it)
                except StopIteration:
                    break
                except (InvalidArgument, Cancelled):  # Cancelled: the client went away or the stream stalled
                    raise
                except Exception as exc:  # the transport broke mid-stream (client cancelled, reset)
                    raise InvalidArgument(f"upload stream broken after {received} of {total} bytes: {exc}") from None
                if trailer is not None:
                    raise InvalidArgument("message after the trailer")
                wire += part.wire_bytes
                if isinstance(part, UploadHeader):
                    raise InvalidArgument("a second header in one upload stream")
                if isinstance(part, UploadTrailer):
                    trailer = part
                    continue
                n = len(part.data)
                if n == 0:
                    raise InvalidArgument("empty chunk")
                if n > limit:
                    raise ResourceExhausted(f"chunk of {n} bytes exceeds the limit of {limit} bytes")
                if received + n > total:
                    raise InvalidArgument(f"more payload bytes than the {total} announced")
                f.write(part.data)
                sha.update(part.data)
                received += n
                chunks += 1
        if trailer is None:
            raise InvalidArgument(f"upload truncated: stream ended after {received} of {total} bytes without a trailer")
        if received != total:
            raise InvalidArgument(f"upload truncated: {received} of {total} payload bytes received")
        if trailer.num_chunks != chunks:
            raise InvalidArgument(f"trailer announces {trailer.num_chunks} chunks, {chunks} were received")
        if trailer.sha256 != sha.digest():
            raise InvalidArgument("payload SHA-256 does not match the trailer: the upload was corrupted")
        return received, sha.hexdigest(), wire, trailer.statement

    # -- the sender's statement ---------------------------------------------------------------
    def check_statement(self, name: str, rnd: int, digest: str, size: int, statement: str) -> None:
        """With mTLS, an upload carries its sender's signed statement of exactly these bytes (run, round,
        silo, SHA-256, size), verified against the federation CA; it is kept with the upload.

        Raises:
            InvalidArgument: missing (with mTLS), oversized, malformed, or not verifying for this upload.
        """
        cfg = self.ctx.cfg
        if cfg.insecure or cfg.tls is None:
            if statement:
                raise InvalidArgument("upload_statement given, but this coordinator runs without TLS and cannot "
                                      "verify it")
            return
        if not 1 <= len(statement) <= MAX_UPLOAD_STATEMENT_CHARS:
            raise InvalidArgument(f"upload_statement (the silo's signed statement of its upload) is required, "
                                  f"1..{MAX_UPLOAD_STATEMENT_CHARS} characters; got {len(statement)}")
        from fedsilo.privacy.upload_statement import UploadStatement, UploadStatementError

        try:
            UploadStatement.from_json(statement).verify(
                ca_pem=self.ctx.ca_pem, run_id=cfg.run_id, round=rnd, silo=name, sha256=digest, payload_bytes=size)
        except UploadStatementError as exc:
            raise InvalidArgument(f"upload_statement refused: {excerpt(exc, 300)}") from None
