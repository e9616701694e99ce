"""The generic sealed relay: opaque blobs by (purpose, sender silo), which the coordinator stores and pages out but cannot open.

A method declares the purposes it relays (``Method.relays``): what a silo publishes under one
of them (sealed with a secret only the silos hold) reaches the other joined silos byte for
byte. What a silo publishes is a signed relay blob (``fedsilo.privacy.relay_blob``): the
coordinator cannot open its sealed payload, but checks at the door that it is the caller's own,
for this run and purpose, signed with its federation certificate. One blob per purpose and silo
per run; the same bytes again are accepted (an agent that restarted before it saw the reply),
different bytes are refused. In a DP run, a purpose whose blob the privacy plan accounts
(``PrivacyPlan.release_for_relay``) is relayed only once that release is mirrored from the
silo's ledger.
"""

from __future__ import annotations

import logging
import re

from fedsilo.coordinator.context import RunContext
from fedsilo.coordinator.records import MAX_SEALED_BYTES, SEALED_PAGE_BYTES, SealedPage
from fedsilo.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from fedsilo.core.validators import excerpt
from fedsilo.privacy.pki import Identity
from fedsilo.privacy.plan import entry_key
from fedsilo.privacy.relay_blob import RelayBlob, RelayBlobError

log = logging.getLogger("fedsilo.coordinator")

#: A purpose: 1..64 characters of lowercase letters, digits and dashes.
PURPOSE_RE = re.compile(r"[a-z0-9-]{1,64}")


class SealedRelay:
    """Stores and serves the run's sealed blobs.

    Args:
        ctx: the run's shared state.
    """

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def _check_purpose(self, purpose: object, *, publishing: bool) -> str:
        """Raises unless ``purpose`` is well-formed and one the run's method relays; a per-round purpose
        (``Method.round_relays``) is published only while its round is open and read once it has opened."""
        if not isinstance(purpose, str) or not PURPOSE_RE.fullmatch(purpose):
            raise InvalidArgument(f"purpose '{excerpt(purpose)}' is not 1..64 characters of [a-z0-9-]")
        method = self.ctx.method
        if purpose in method.relays:
            return purpose
        rnd = method.relay_round(purpose)
        if rnd is None:
            used = ", ".join([*sorted(method.relays), *(f"{p}<round>" for p in sorted(method.round_relays))]) or "none"
            raise FailedPrecondition(f"run {self.ctx.cfg.run_id!r} relays nothing under purpose {purpose!r}: its "
                                     f"method {method.name!r} uses the sealed relay for {used}")
        with self.ctx.cond:
            open_round = self.ctx.open_round_number()
            closed = self.ctx.store.last_closed_round() if not publishing else 0
        if publishing and rnd != open_round:
            raise FailedPrecondition(f"purpose {purpose!r} carries round {rnd}'s blobs, published while that round is "
                                     f"open; the open round is {open_round or 'none'}")
        if not publishing and rnd > max(open_round, closed):
            raise FailedPrecondition(f"purpose {purpose!r} carries round {rnd}'s blobs; that round has not opened")
        return purpose

    def _check_accounted(self, name: str, purpose: str) -> None:
        """In a DP run, the release the plan ties to ``purpose`` must be mirrored first."""
        plan = self.ctx.cfg.privacy
        planned = plan.release_for_relay(purpose) if plan is not None else None
        if planned is None:
            return
        assert self.ctx.mirror is not None
        want = planned.key()
        if not any(entry_key(e) == want for e in self.ctx.mirror.entries_of_run(name, self.ctx.cfg.run_id)):
            raise FailedPrecondition(f"silo {name!r}: no mirrored privacy-ledger entry accounts its {purpose!r} blob "
                                     f"(mechanism, σ, q, steps, C) = {want}; send it with SubmitLedgerEntries "
                                     "before publishing")

    def publish(self, caller: Identity, purpose: str, blob: bytes) -> int:
        """Stores the caller's relay blob under ``purpose``, sealed for the other silos.

        Returns:
            How many silos have published under ``purpose``.

        Raises:
            InvalidArgument: a malformed purpose; an empty or oversized blob; or a blob that is not
                the caller's relay blob for this run and ``purpose``, signed with its certificate.
            FailedPrecondition: the run's method relays nothing under ``purpose``; the run has no TLS
                (no CA to verify blobs against); or (DP) the release the plan ties to it is not
                mirrored yet.
            AlreadyExists: the caller already published different bytes under ``purpose``.
        """
        ctx = self.ctx
        name = ctx.require_joined(caller)
        self._check_purpose(purpose, publishing=True)
        if not 1 <= len(blob) <= MAX_SEALED_BYTES:
            raise InvalidArgument(f"blob has {len(blob)} bytes; 1..{MAX_SEALED_BYTES} allowed")
        blob = bytes(blob)
        if ctx.cfg.tls is None:
            raise FailedPrecondition("the sealed relay needs TLS: the coordinator checks every blob against "
                                     "the federation CA; remove server.insecure")
        try:
            # Run, sender and signature are checked here; the sealing purpose inside (which the method's
            # silos choose, and which may differ from the relay purpose) is checked by the receivers.
            doc = RelayBlob.from_json(blob)
            doc.verify(ca_pem=ctx.ca_pem or ctx.cfg.tls.ca.read_bytes(), run_id=ctx.cfg.run_id, purpose=doc.purpose,
                       silo=name)
        except RelayBlobError as exc:
            raise InvalidArgument(f"blob refused: {excerpt(exc, 400)}") from None
        self._check_accounted(name, purpose)
        with ctx.cond:
            known = ctx.store.sealed(purpose, name)
            if known is not None:
                if known != blob:
                    raise AlreadyExists(f"silo {name!r} already published its {purpose!r} blob for this run "
                                        "(one per purpose and run; the agent keeps the sealed copy in its state dir)")
                return ctx.store.sealed_count(purpose)
            ctx.store.put_sealed(purpose, name, blob, ctx.now_ms())
            log.info("relay: stored the sealed %s blob of %s (%d bytes)", purpose, name, len(blob))
            ctx.cond.notify_all()
            return ctx.store.sealed_count(purpose)

    def page(self, caller: Identity, purpose: str, *, after_silo: str = "") -> SealedPage:
        """A page of the other silos' blobs under ``purpose``, how many silos have joined, and whether more follow.

        A page holds the blobs of the silos named after ``after_silo`` (in name order, never the
        caller's own) up to ``SEALED_PAGE_BYTES`` in all, and at least one, so every reply fits
        in one gRPC message however many silos publish.

        Raises:
            InvalidArgument: a malformed purpose, or an ``after_silo`` longer than a silo name can be.
            FailedPrecondition: the run's method relays nothing under ``purpose``.
        """
        ctx = self.ctx
        name = ctx.require_joined(caller)
        self._check_purpose(purpose, publishing=False)
        if not isinstance(after_silo, str) or len(after_silo) > 64:
            raise InvalidArgument("after_silo must be a silo name (at most 64 characters) or empty")
        chosen: list[str] = []
        size = 0
        more = False
        for silo, n in ctx.store.sealed_sizes(purpose, after=after_silo, exclude=name):
            if chosen and size + n > SEALED_PAGE_BYTES:
                more = True
                break
            chosen.append(silo)
            size += n
        entries = []
        for silo in chosen:
            blob = ctx.store.sealed(purpose, silo)
            assert blob is not None  # blobs are never deleted
            entries.append((silo, blob))
        return SealedPage(entries=tuple(entries), silos_joined=len(ctx.store.silos()), more=more)
