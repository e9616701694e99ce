"""The HE key relay: the key holder lists who needs the run's key and publishes it wrapped per silo; opaque to the coordinator.

The coordinator cannot open what it relays, but it checks at the door what it can: a silo's KEM
key announcement must verify (this run, this silo, signed with its federation certificate)
before the silo is joined, so the key holder never meets an announcement it must refuse. Round
1 waits for the key holder to wrap the key for every joined silo; once ``min_silos`` silos hold
the key and ``start_grace_s`` passed since ``min_silos`` silos joined, it no longer waits for
the rest (they join the rounds when the key holder wraps for them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fedsilo.coordinator.config import AggregationMode
from fedsilo.coordinator.context import RunContext
from fedsilo.coordinator.records import MAX_WRAPPED_KEY_BYTES
from fedsilo.coordinator.schema import SiloRow
from fedsilo.core.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from fedsilo.core.validators import excerpt
from fedsilo.privacy.keywrap import KeyWrapError, verify_bundle, verify_kem_announcement
from fedsilo.privacy.pki import Identity

log = logging.getLogger("fedsilo.coordinator")


class KeyRelay:
    """Relays the wrapped HE key from the key holder to every other joined silo.

    Args:
        ctx: the run's shared state.
        on_published: called (lock held) after wrapped keys were stored: the run may start now.
    """

    def __init__(self, ctx: RunContext, on_published: Callable[[], None]) -> None:
        self.ctx = ctx
        self._on_published = on_published
        self._started_without: set[str] = set()

    def check_announcement(self, name: str, blob: bytes) -> None:
        """Raises unless ``blob`` is silo ``name``'s KEM key announcement for this run, signed with
        its federation certificate (what the key holder checks before wrapping the key for it).
        Nothing to check in a run without HE.

        Raises:
            InvalidArgument: naming why the announcement does not verify.
        """
        cfg = self.ctx.cfg
        if cfg.aggregation is not AggregationMode.HE:
            return
        try:
            verify_kem_announcement(bytes(blob), run_id=cfg.run_id, expected_silo=name, ca_pem=self._ca())
        except KeyWrapError as exc:
            raise InvalidArgument(f"kem_announcement refused: {excerpt(exc, 400)}") from None

    def _ca(self) -> bytes:
        assert self.ctx.ca_pem is not None  # an HE run always has TLS (FederationConfig)
        return self.ctx.ca_pem

    def start_gate(self, silos: dict[str, SiloRow]) -> str | None:
        """Why round 1 may not open yet given the joined ``silos`` (None: it may).

        An HE run waits for the key holder to join and wrap the key for every other joined silo.
        Once ``min_silos`` joined silos hold the key (the key holder included) and ``start_grace_s``
        passed since ``min_silos`` silos joined, it stops waiting for the others: a silo without
        the key cannot upload anything useful, and the key holder wraps for it while the run goes on.
        """
        cfg = self.ctx.cfg
        if cfg.aggregation is not AggregationMode.HE:
            return None
        missing = self._missing(silos)
        if cfg.key_holder in silos and not missing:
            return None
        waiting = (f"waiting for the key holder {cfg.key_holder!r} to join and "
                   f"wrap the run's key for {sorted(missing) or 'the others'}")
        if cfg.key_holder not in silos or len(silos) - len(missing) < cfg.min_silos:
            return waiting
        quorum_ms = sorted(s.joined_at_ms for s in silos.values())[cfg.min_silos - 1]
        if self.ctx.now_ms() < quorum_ms + cfg.start_grace_s * 1000:
            return (f"{waiting}; {len(silos) - len(missing)} joined silos hold it (min_silos = {cfg.min_silos}), "
                    "so the run starts without the others once start_grace_s has passed")
        if missing != self._started_without:
            self._started_without = missing
            log.warning("the run may start without %s: the key holder has not wrapped the run's key for them "
                        "within start_grace_s", ", ".join(sorted(missing)))
        return None

    def _missing(self, silos: dict[str, SiloRow]) -> set[str]:
        have = self.ctx.store.wrapped_key_recipients()
        return {n for n in silos if n != self.ctx.cfg.key_holder and n not in have}

    def _require_he(self) -> None:
        cfg = self.ctx.cfg
        if cfg.aggregation is not AggregationMode.HE:
            raise FailedPrecondition(f"run {cfg.run_id!r} uses {cfg.aggregation.value} aggregation; "
                                     "there is no key ceremony")

    def _require_holder(self, caller: Identity, what: str) -> str:
        name = self.ctx.require_joined(caller)
        self._require_he()
        if name != self.ctx.cfg.key_holder:
            raise PermissionDenied(f"only the key holder {self.ctx.cfg.key_holder!r} {what}")
        return name

    def recipients(self, caller: Identity) -> list[tuple[str, bytes]]:
        """Key holder only: joined silos still without a wrapped key, with their signed X25519 keys.

        Raises:
            PermissionDenied: the caller is not the key holder.
            FailedPrecondition: the run does not use HE.
        """
        self._require_holder(caller, "lists key recipients")
        silos = self.ctx.store.silos()
        return [(n, silos[n].kem_public_key or b"") for n in sorted(self._missing(silos))]

    def publish(self, caller: Identity, entries: list[tuple[str, bytes]]) -> int:
        """Key holder only: stores wrapped keys (the coordinator cannot open them, but checks what needs no
        secret: run, recipient, the key holder's certificate and signature, the HE parameters).

        Raises:
            PermissionDenied: the caller is not the key holder.
            InvalidArgument: empty, duplicate, oversized, for a silo not joined / the holder itself, or a
                bundle its recipient would refuse.
        """
        name = self._require_holder(caller, "publishes wrapped keys")
        if not 1 <= len(entries) <= 1000:
            raise InvalidArgument(f"expected 1..1000 wrapped keys, got {len(entries)}")
        silos = self.ctx.store.silos()
        seen: set[str] = set()
        for recipient, wrapped in entries:
            if recipient in seen:
                raise InvalidArgument(f"two wrapped keys for '{excerpt(recipient)}'")
            seen.add(recipient)
            if recipient == name or recipient not in silos:
                raise InvalidArgument(f"'{excerpt(recipient)}' is not a joined silo that needs the key")
            if not 1 <= len(wrapped) <= MAX_WRAPPED_KEY_BYTES:
                raise InvalidArgument(f"wrapped key for {recipient!r} has {len(wrapped)} bytes (1..4 MiB allowed)")
        fingerprint = self.ctx.cfg.he_params().fingerprint()
        for recipient, wrapped in entries:  # what no recipient would accept is refused at the door
            try:
                verify_bundle(bytes(wrapped), run_id=self.ctx.cfg.run_id, recipient=recipient, ca_pem=self._ca(),
                              expected_issuer=name, params_fingerprint=fingerprint)
            except KeyWrapError as exc:
                raise InvalidArgument(f"wrapped key for {recipient!r} refused: {excerpt(exc, 400)}") from None
        with self.ctx.cond:
            self.ctx.store.put_wrapped_keys(entries, self.ctx.now_ms())
            log.info("stored wrapped keys for %s", ", ".join(sorted(seen)))
            self._on_published()
            self.ctx.cond.notify_all()
        return len(entries)

    def wrapped_key(self, caller: Identity) -> bytes | None:
        """The run's key wrapped for the caller, or None while the key holder has not published it.

        Raises:
            FailedPrecondition: the run does not use HE.
        """
        name = self.ctx.require_joined(caller)
        self._require_he()
        return self.ctx.store.wrapped_key(name)
