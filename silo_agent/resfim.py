"""A silo's side of pFL-ResFIM: its style bank, its masks, its masked uploads and its personalised model."""

from __future__ import annotations

import logging
import threading
import zlib
from pathlib import Path

import numpy as np
import torch

from fedsilo.silo_agent.methods.resfim import ResFimSettings
from fedsilo.core.phases import MASK_SUFFIXES, SharePhase
from fedsilo.core.tensors import Manifest
from fedsilo.silo_agent.client import CoordinatorClient, Stopped
from fedsilo.silo_agent.masked import apply_shared_mean, consensus, masked_upload, split_sums
from fedsilo.silo_agent.secure import HeSession, write_private
from fedsilo.silo_agent.state import AgentState
from fedsilo.silo_agent.strategy import StrategyError

log = logging.getLogger("fedsilo.agent")

BANK_FILE = "style-bank.sealed"
BANK_PURPOSE = "style-bank"
BANK_POLL_S = 1.0
#: How long to wait for the other silos' banks before computing masks with the banks there are.
BANK_WAIT_S = 120.0


class ResFimError(StrategyError):
    """pFL-ResFIM cannot go on; the message says why."""


def _stack(dataset, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` (image, mask) pairs of a dataset as two stacked CPU tensors (training's batching)."""
    from fedsilo.models.training import stack_batch

    count = len(dataset) if n is None else min(n, len(dataset))
    return stack_batch(dataset, range(count), torch.device("cpu"))


class ResFimSession:
    """Style banks, masks and masked aggregation for one silo of a resfim / deer+resfim run.

    The silo's style bank is built once from its training images (seeded k-means over clipped
    low-frequency log-amplitude windows, ``fedsilo.models.style``), sealed with the run's shared
    secret (only silos hold it) and kept in the state dir, so a restarted agent publishes the very
    same bytes. Masks are computed before training in rounds 1, 1 + k, … on the silo's current
    personalised model: Fisher on its images and on the same images re-styled toward the other
    silos' banks (``fedsilo.models.resfim``), and saved in the agent's checkpoint.

    With a privacy plan whose ``resfim_every`` is set, both releases are differentially private and
    ledgered: the bank is built with data-independent bins and one Gaussian release, its entry is
    reserved and mirrored before it is published; each mask computation uses noisy Fisher
    matrices (``FisherDp``) and is accounted with the upload it shapes.

    Args:
        settings: the run's ``[resfim]`` settings.
        he: the silo's HE session (its secret key seals and opens banks).
        state_dir: the agent's state dir.
        privacy: the silo's privacy session, or None in a run without DP.
    """

    def __init__(self, *, settings: ResFimSettings, he: HeSession, state_dir: Path, privacy=None) -> None:
        self.settings = settings
        self.he = he
        self.state_dir = state_dir
        self.privacy = privacy
        self.private = privacy is not None and bool(privacy.plan.resfim_every)

    def masks_due(self, state: AgentState, rnd: int) -> bool:
        """Whether masks will be computed before training round ``rnd`` (not yet done)."""
        return (not state.sensitive or self.settings.recompute(rnd)) and state.masks_round != rnd

    def mask_releases(self, state: AgentState, rnd: int, *, ahead: bool = False) -> list:
        """The ledger releases of round ``rnd``'s masks: the masks computed for it (``ahead``: about to be)."""
        if not self.private:
            return []
        made = self.masks_due(state, rnd) if ahead else state.masks_round == rnd
        return [self.privacy.plan.fisher_release()] if made else []

    # -- style banks ----------------------------------------------------------------------
    def publish_bank(self, client: CoordinatorClient, train) -> None:
        """Builds, seals, saves and publishes this silo's style bank (once per run)."""
        from fedsilo.models.style import StyleBankConfig, build_style_bank

        path = self.state_dir / BANK_FILE
        if path.is_file():
            sealed = path.read_bytes()
        else:
            images, _ = _stack(train)
            sigma = self.privacy.plan.style_noise_multiplier if self.private else 0.0
            cfg = StyleBankConfig(clip_norm=self.settings.style_clip_norm, noise_multiplier=sigma,
                                  beta=self.settings.beta, clusters=self.settings.clusters)
            bank = build_style_bank(images, cfg)
            sealed = self.he.seal(bank.to_bytes(), purpose=BANK_PURPOSE)
            write_private(path, sealed)  # the exact release is durable before it is accounted and sent
            log.info("style bank: %d style(s) of %d training images (β = %g%s), sealed for the other silos",
                     bank.clusters, images.shape[0], self.settings.beta,
                     f", DP σ = {sigma:g}" if sigma else ", no DP noise")
        if self.private:
            self.privacy.account_style_bank()
            self.privacy.sync(client)
        published = client.publish_sealed(BANK_PURPOSE, sealed)
        if self.private:
            self.privacy.commit_style_bank()
        log.info("style bank published (%d silo(s) have published theirs)", published)

    def other_banks(self, client: CoordinatorClient, stop: threading.Event, idle=None) -> list:
        """The other silos' banks, opened and checked; waits (up to BANK_WAIT_S) for every joined silo's."""
        from fedsilo.models.style import StyleBank

        waited = 0.0
        while True:
            sealed, joined = client.sealed(BANK_PURPOSE)
            if sealed and (len(sealed) >= joined - 1 or waited >= BANK_WAIT_S):
                break
            if idle is not None:
                idle()
            if stop.wait(BANK_POLL_S):
                raise Stopped("waiting for the other silos' style banks")
            waited += BANK_POLL_S
        banks = []
        for silo, blob in sorted(sealed.items()):
            try:
                banks.append(StyleBank.from_bytes(self.he.open_sealed(blob, purpose=BANK_PURPOSE, silo=silo)))
            except ValueError as exc:
                log.error("ignoring the style bank relayed for %s: %s", silo, exc)
        if not banks:
            raise ResFimError("no usable style bank from another silo: ResFIM masks need images in other styles")
        return banks

    # -- masks ----------------------------------------------------------------------------
    def ensure_masks(self, client: CoordinatorClient, stop: threading.Event, *, model: torch.nn.Module,
                     state: AgentState, train, rnd: int, trainable: frozenset[str], strategy, shared_names: list[str],
                     idle=None) -> None:
        """(Re)computes the masks before training round ``rnd`` when due, and saves them."""
        from fedsilo.models.resfim import FisherDp, ResFimConfig, compute_resfim
        from fedsilo.models.style_transfer import simulate_styles

        if not self.masks_due(state, rnd):  # masks_round == rnd: computed before a restart
            return
        banks = self.other_banks(client, stop, idle)
        images, labels = _stack(train, self.settings.max_examples)
        gen = torch.Generator().manual_seed(zlib.crc32(f"{self.he.run_id}/{self.he.me}/{rnd}".encode()))
        try:
            simulated = simulate_styles(images, banks, generator=gen)
        except ValueError as exc:  # e.g. another silo's images have another size
            raise ResFimError(f"cannot re-style this silo's images with the other silos' banks: {exc}") from None
        cfg = ResFimConfig(rho=self.settings.rho, local_norm_layers=self.settings.local_norm_layers,
                           recompute_every=self.settings.recompute_every, max_examples=self.settings.max_examples)
        strategy.set_trainable(model, SharePhase.ALL, trainable)  # Fisher over every parameter the silo trains
        model.load_state_dict(state.personal_state_dict())
        dp = None
        if self.private:
            plan = self.privacy.plan
            dp = FisherDp(clip_norm=plan.fisher_clip_norm, noise_multiplier=plan.fisher_noise_multiplier)
        try:
            result = compute_resfim(model, images, labels, simulated, cfg, dp=dp)
        except ValueError as exc:  # e.g. a model Opacus cannot compute per-example gradients for
            raise ResFimError(f"ResFIM masks cannot be computed: {exc}") from None
        state.sensitive = {k: v.detach().clone() for k, v in result.masks.items()}
        state.masks_round = rnd
        layout = [k for k in shared_names if k in result.masks]
        total = sum(result.masks[k].numel() for k in layout)
        state.shared_fraction = (sum(int((~result.masks[k]).sum()) for k in layout) / total) if total else 0.0
        state.save(self.state_dir)
        log.info("round %d: ResFIM masks from %d images and their twins in %d other silo style(s)%s: %.1f%% of "
                 "the shared tensors' elements shared, ρ = %g kept local per tensor", rnd, result.n_examples,
                 len(banks), f", noisy Fisher (σ = {dp.noise_multiplier:g}, C = {dp.clip_norm:g})" if dp else "",
                 100 * state.shared_fraction, self.settings.rho)

    @staticmethod
    def _masks_np(state: AgentState, names: list[str]) -> dict[str, np.ndarray]:
        """Masks as numpy (True = local); a tensor without a mask (a buffer, or no masks yet) is all shared."""
        out = {}
        for k in names:
            m = state.sensitive.get(k)
            out[k] = (m.numpy().astype(bool) if m is not None
                      else np.zeros(tuple(state.model[k].shape), dtype=bool))
        return out

    # -- uploads and aggregates -----------------------------------------------------------
    def upload_vector(self, values: dict[str, np.ndarray], state: AgentState, names: list[str],
                      weight: float, *, local_part: bool) -> np.ndarray:
        """``[w·s⊙θ | w·s (| w·(1−s)⊙θ)]`` over the round's tensors ``names`` (``weight`` already normalised)."""
        return masked_upload(values, self._masks_np(state, names), names, weight, local_part=local_part)

    def apply(self, state: AgentState, decrypted: np.ndarray, manifest: Manifest, *, total_weight: float) -> None:
        """Applies a decrypted masked sum to the personalised model and updates the consensus.

        Args:
            state: the agent state (``model``, ``global_shared`` and ``consensus`` are updated).
            decrypted: the decrypted sum, in units of the uploaded weights.
            manifest: the aggregate's layout (the round's tensors and their companion sets).
            total_weight: the contributors' total weight in the same units.
        """
        base = [t for t in manifest.tensors if not t.name.endswith(MASK_SUFFIXES)]
        local_part = any(t.name.endswith(MASK_SUFFIXES[1]) for t in manifest.tensors)
        sums = split_sums(decrypted, [(t.name, t.numel) for t in base], local_part=local_part)
        names = [t.name for t in base]
        values = {k: state.model[k].numpy() for k in names}
        personal = apply_shared_mean(values, self._masks_np(state, names), sums)
        for k, v in personal.items():
            t = torch.from_numpy(np.ascontiguousarray(v)).to(state.model[k].dtype)
            state.model[k] = t
            state.global_shared[k] = t.clone()
        if sums.local is not None:
            for k, v in consensus(sums, total_weight, values).items():
                state.consensus[k] = torch.from_numpy(np.ascontiguousarray(v)).to(state.model[k].dtype)

    @staticmethod
    def consensus_state_dict(state: AgentState) -> dict[str, torch.Tensor]:
        """The consensus model: the invariant part plus the mean of the silos' local parts (tensors
        outside the layout, e.g. normalisation layers kept local, are this silo's own)."""
        sd = state.personal_state_dict()
        sd.update({k: v.clone() for k, v in state.consensus.items()})
        return sd
