"""The record-level audit run: DP-SGD (Opacus, via DpSgdStep) on one silo's records plus the included canaries."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedsilo.privacy.audit.empirical import ScoreMode
from fedsilo.privacy.audit.membership import MembershipResult, loss_threshold_attack
from fedsilo.privacy.dpsgd import DpSgdStep, poisson_batches, secure_generator, seeded_generator
from fedsilo.silo_agent.empirical.config import EmpiricalAuditConfig
from fedsilo.silo_agent.empirical.network import (
    CANARY_INPUT,
    AuditData,
    build_network,
    canary_loss,
    mixture,
    per_example_loss,
)

__all__ = ["CanaryScores", "record_level_scores"]

#: The silo name under which the record-level run's membership check is reported.
RECORD_SILO = "audited-silo"


@dataclass(frozen=True, kw_only=True)
class CanaryScores:
    """What an audit run leaves for the auditor: one score per canary, the secret, the attack."""

    scores: np.ndarray
    included: np.ndarray
    membership: dict[str, MembershipResult]


def _canaries(config: EmpiricalAuditConfig, rng: np.random.Generator) -> AuditData:
    m, f = config.canaries, config.features
    x = np.zeros((m, f + m), dtype=np.float32)
    if config.mode is ScoreMode.WHITE_BOX:
        x[np.arange(m), f + np.arange(m)] = CANARY_INPUT  # Dirac canary i on canary-head weight i
        y = np.zeros(m, dtype=np.int64)
    else:  # input-space canaries: far-off random points with random labels
        x[:, :f] = 4.0 * rng.standard_normal((m, f))
        y = rng.integers(0, config.classes, size=m).astype(np.int64)
    return AuditData(x=x, y=y)


def _losses(model, data: AuditData):  # noqa: ANN001, ANN202 - torch types imported lazily
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(data.x))
        return per_example_loss(out, torch.from_numpy(data.y)).double().numpy()


def record_level_scores(
    config: EmpiricalAuditConfig, *, rng: np.random.Generator, included: np.ndarray, noise_scale: float
) -> CanaryScores:
    """Trains with DP-SGD on the records and the included canaries, then scores every canary.

    DP-SGD is the agent's: `DpSgdStep` (Opacus' per-sample clipping to C and Gaussian noise
    in secure mode), ``steps`` Poisson batches of rate q over the training set, plain SGD (so
    the model change is the sum of the noised steps), expected batch size q·(records + m/2)
    (public: it does not depend on the secret). The noise actually added is
    ``noise_scale`` · σ · C; the ledger ε is computed for σ.

    White-box score of canary i: minus the change of canary-head weight i, i.e. the model
    change's inner product with the canary's (clipped) gradient direction e_i. Black-box
    score: the decrease of the canary's loss from the initial to the final model.

    Args:
        config: The audit's settings (record level).
        rng: Source of the data and, with a seed, of the batches and noise.
        included: The secret inclusion bit of each canary.
        noise_scale: 1.0, or the testing fault switch's scale.

    Returns:
        Scores, the secret, and the loss-threshold attack on the silo's records.
    """
    import torch

    m, f = config.canaries, config.features
    means = 2.0 * rng.standard_normal((config.classes, f)) / np.sqrt(f)
    records = mixture(rng, means, config.records, m)
    fresh = mixture(rng, means, config.records, m)
    canaries = _canaries(config, rng)
    x = np.concatenate([records.x, canaries.x[included]])
    y = np.concatenate([records.y, canaries.y[included]])
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)

    model = build_network(f, config.classes, m)
    before = _losses(model, canaries)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate)
    if config.seed is None:
        batches_gen, noise_gen = secure_generator(torch.device("cpu")), secure_generator(torch.device("cpu"))
    else:
        batches_gen, noise_gen = seeded_generator(config.seed + 1), seeded_generator(config.seed + 2)
    expected = max(1, round(config.sample_rate * (config.records + m / 2)))
    with DpSgdStep(model, optimizer, max_grad_norm=config.clip_norm,
                   noise_multiplier=config.noise_multiplier * noise_scale, expected_batch_size=expected,
                   generator=noise_gen, loss_fn=canary_loss) as dp:
        for batch in poisson_batches(len(y), config.sample_rate, config.steps, batches_gen):
            index = torch.tensor(batch, dtype=torch.long)
            dp.step(x_t[index], y_t[index])
    model.eval()
    if config.mode is ScoreMode.WHITE_BOX:
        scores = -model.canary.weight.detach().double().numpy()[0]  # initial weights are 0
    else:
        scores = before - _losses(model, canaries)
    attack = loss_threshold_attack(_losses(model, records), _losses(model, fresh))
    return CanaryScores(scores=scores, included=included, membership={RECORD_SILO: attack})
