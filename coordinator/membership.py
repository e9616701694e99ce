"""Who takes part: the run's config for enrolled silos, and joins (model fingerprint, shared tensors, upload size, budget, key)."""

from __future__ import annotations

import logging
import re

from fedsilo.coordinator.aggregation import Aggregator
from fedsilo.coordinator.config import AggregationMode, FederationConfig
from fedsilo.coordinator.aggregation import aggregator_for
from fedsilo.coordinator.context import RunContext, to_json
from fedsilo.coordinator.keys import KeyRelay
from fedsilo.coordinator.mirror import Mirror
from fedsilo.coordinator import weights
from fedsilo.coordinator.records import MAX_ANNOUNCEMENT_BYTES, RunState
from fedsilo.coordinator.rounds import Rounds
from fedsilo.coordinator.schema import SiloRow
from fedsilo.core.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from fedsilo.core.tensors import Manifest
from fedsilo.privacy.pki import Identity

log = logging.getLogger("fedsilo.coordinator")

_HEX64 = re.compile(r"[0-9a-f]{64}")


class Membership:
    """Joins silos to the run: the model and shared tensors must be the ones the study pins
    (``run.model_fingerprint``, ``run.shared_tensors_sha256``); in a run that pins none, the first join fixes them.

    Args:
        ctx: the run's shared state.
        rounds: the round state machine (a join may start the run).
        mirror: verifies budget statements.
        keys: verifies KEM key announcements (HE).
    """

    def __init__(self, ctx: RunContext, rounds: Rounds, mirror: Mirror, keys: KeyRelay) -> None:
        self.ctx = ctx
        self.rounds = rounds
        self.mirror = mirror
        self.keys = keys
        self._largest: tuple[Manifest, int] | None = None
        self._first: Aggregator | None = None

    def run_config(self, caller: Identity) -> FederationConfig:
        """The run's config, for an enrolled silo (model and training settings included).

        Raises:
            PermissionDenied: not an enrolled silo.
        """
        self.ctx.require_silo(caller)
        return self.ctx.cfg

    def _largest_upload(self, manifest: Manifest) -> int:
        """The largest upload payload of the run, over the distinct layouts its method gives the
        first two and the last two rounds (share phases alternate at most every round; the final
        rounds may carry more). Keeps round 1's aggregator for :meth:`join` to install."""
        if self._largest is None or self._largest[0] != manifest:
            ctx = self.ctx
            rounds = ctx.cfg.rounds
            aggs = {}
            for r in sorted({1, 2, rounds - 1, rounds}):
                if 1 <= r <= rounds:
                    layout = ctx.round_layout(r, manifest)
                    if layout not in aggs:
                        aggs[layout] = aggregator_for(ctx.cfg, layout)
            self._first = aggs[ctx.round_layout(1, manifest)]
            self._largest = (manifest, max(agg.payload_bytes_bound() for agg in aggs.values()))
        return self._largest[1]

    def _check_pin(self, model_fingerprint: str, manifest: Manifest) -> None:
        """Refuses a model or shared-tensor manifest other than the study pins (no-op in an unpinned run).

        Raises:
            FailedPrecondition: naming the pinned digest and the silo's (short prefixes).
        """
        cfg = self.ctx.cfg
        if cfg.model_fingerprint is None:
            return
        if model_fingerprint != cfg.model_fingerprint:
            raise FailedPrecondition(
                f"model fingerprint {model_fingerprint[:12]}… is not the study's run.model_fingerprint "
                f"{cfg.model_fingerprint[:12]}…: the silo built a different model (check the fedsilo version, "
                "model settings and base checkpoint)")
        digest = manifest.digest()
        if digest != cfg.shared_tensors_sha256:
            raise FailedPrecondition(
                f"shared tensors {digest[:12]}… are not the study's run.shared_tensors_sha256 "
                f"{str(cfg.shared_tensors_sha256)[:12]}… ({len(manifest.tensors)} tensors sent)")

    def join(self, caller: Identity, *, model_fingerprint: str, num_train_examples: int,
             manifest: Manifest, agent_version: str, kem_announcement: bytes = b"",
             budget_statement: bytes = b"") -> tuple[str, RunState, int]:
        """Joins (or re-joins) the run.

        Returns:
            (silo name, run state, last closed round).

        Raises:
            PermissionDenied: not an enrolled silo.
            InvalidArgument: malformed fingerprint, example count, manifest, announcement or budget.
            FailedPrecondition: a model or manifest that differs from the study's pin (or from the other
                silos' in a run that pins none).
            ResourceExhausted: the model's uploads would exceed ``server.max_upload_bytes``.
        """
        ctx = self.ctx
        cfg = ctx.cfg
        name = ctx.require_silo(caller)
        if not isinstance(model_fingerprint, str) or not _HEX64.fullmatch(model_fingerprint):
            raise InvalidArgument("model_fingerprint must be 64 lowercase hex characters (SHA-256)")
        if len(agent_version) > 64:
            raise InvalidArgument("agent_version is longer than 64 characters")
        if cfg.aggregation is AggregationMode.HE and not 1 <= len(kem_announcement) <= MAX_ANNOUNCEMENT_BYTES:
            raise InvalidArgument("kem_announcement (the silo's signed X25519 key) is required for HE aggregation, "
                                  f"1..{MAX_ANNOUNCEMENT_BYTES} bytes")
        self.keys.check_announcement(name, kem_announcement)
        budget = self.mirror.check_budget_statement(name, budget_statement)
        with ctx.cond:
            weights.check_declared(ctx, name, num_train_examples)
            self._check_pin(model_fingerprint, manifest)
            known_fp = ctx.store.get_meta("model_fingerprint")
            if known_fp is not None and known_fp != model_fingerprint:
                raise FailedPrecondition(
                    f"model fingerprint {model_fingerprint[:12]}… differs from the run's {known_fp[:12]}…: "
                    "the silo built a different model (check the fedsilo version and model settings)"
                )
            known_manifest = ctx.manifest()
            if known_manifest is not None:
                diff = manifest.difference(known_manifest)
                if diff is not None:
                    raise FailedPrecondition(f"shared tensors differ from the run's: {diff}")
            ctx.method.check_manifest(manifest)
            largest = self._largest_upload(manifest)
            if largest > cfg.max_upload_bytes:
                raise ResourceExhausted(
                    f"this model's uploads take up to {largest} bytes ({cfg.aggregation.value} aggregation), "
                    f"more than server.max_upload_bytes ({cfg.max_upload_bytes})"
                )
            now = ctx.now_ms()
            with ctx.store.transaction():
                if known_fp is None:
                    ctx.store.set_meta("model_fingerprint", model_fingerprint)
                    ctx.store.set_meta("manifest", to_json(manifest.to_json()))
                ctx.store.upsert_silo(SiloRow(name=name, joined_at_ms=now, last_seen_ms=now,
                                              num_train_examples=int(num_train_examples),
                                              agent_version=agent_version,
                                              kem_public_key=bytes(kem_announcement) or None))
            if budget is not None:
                self.mirror.save_budget(name, budget)
            if ctx.agg is None:
                ctx.agg = self._first
            log.info("silo %s joined (%d training examples%s)", name, num_train_examples,
                     "" if budget is None else f"; privacy budget ε = {budget.epsilon:g} at δ = {budget.delta:g}")
            self.rounds.maybe_start()
            ctx.cond.notify_all()
            return name, ctx.state(), ctx.store.last_closed_round()
