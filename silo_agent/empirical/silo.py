"""The silo-level audit run: simulated silos clip and noise their updates; canary silos join by the secret."""

from __future__ import annotations

import numpy as np

from fedsilo.privacy.audit.membership import loss_threshold_attack
from fedsilo.privacy.update_noise import privatize_update
from fedsilo.silo_agent.empirical.config import EmpiricalAuditConfig
from fedsilo.silo_agent.empirical.network import build_network, mixture, per_example_loss
from fedsilo.silo_agent.empirical.record import CanaryScores

__all__ = ["silo_level_scores"]

_LOCAL_BATCH = 64


def _state(model) -> dict[str, np.ndarray]:  # noqa: ANN001 - torch imported lazily
    return {name: p.detach().double().numpy().copy() for name, p in model.named_parameters()}


def _load(model, state: dict[str, np.ndarray]) -> None:  # noqa: ANN001
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(state[name]).to(p.dtype))


def silo_level_scores(
    config: EmpiricalAuditConfig, *, rng: np.random.Generator, included: np.ndarray, noise_scale: float
) -> CanaryScores:
    """Runs ``steps`` rounds of silo-level DP FedAvg with canary silos, then scores every canary silo.

    Each round every real silo trains one local epoch of plain SGD from the global model,
    and its update (local minus global) goes through the agent's `privatize_update`: joint
    clipping to C and Gaussian noise of std σC/√K for K real silos (the noise shared as
    under encryption, so the aggregate carries std σC). Canary silo i, when included, uploads
    C · e_i on canary-head weight i: norm exactly C, which clipping leaves as it is, and no
    noise share, so the noise in the aggregate does not depend on the secret. The server adds
    the uploads and divides by K (public). The aggregate is what every silo decrypts under
    encryption; encryption itself is exact and left out here. The noise actually added is
    ``noise_scale`` · σC; the ledger ε (Gaussian mechanism, ``steps`` releases) is for σ.

    Score of canary silo i: the total change of canary-head weight i, i.e. the aggregated
    model change's inner product with the canary's update direction.

    Args:
        config: The audit's settings (silo level).
        rng: Source of the data and, with a seed, of the noise.
        included: The secret inclusion bit of each canary silo.
        noise_scale: 1.0, or the testing fault switch's scale.

    Returns:
        Scores, the secret, and the loss-threshold attack on each real silo's records.
    """
    import torch

    m, f, k = config.canaries, config.features, config.silos
    means = 2.0 * rng.standard_normal((config.classes, f)) / np.sqrt(f)
    names = [f"silo-{i + 1}" for i in range(k)]
    data = {name: (mixture(rng, means, config.records, m), mixture(rng, means, config.records, m)) for name in names}
    model = build_network(f, config.classes, m)
    start = _state(model)
    noise_rng = None if config.seed is None else np.random.default_rng(config.seed + 3)
    canary_sum = config.clip_norm * included.astype(np.float64)
    for _ in range(config.steps):
        global_state = _state(model)
        total = {name: np.zeros_like(value) for name, value in global_state.items()}
        for name in names:
            train = data[name][0]
            _load(model, global_state)
            optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate)
            order = rng.permutation(len(train.y))
            for begin in range(0, len(order), _LOCAL_BATCH):
                index = order[begin:begin + _LOCAL_BATCH]
                optimizer.zero_grad(set_to_none=True)
                out = model(torch.from_numpy(train.x[index]))
                per_example_loss(out, torch.from_numpy(train.y[index])).mean().backward()
                optimizer.step()
            local = _state(model)
            update = {key: local[key] - global_state[key] for key in local}
            upload = privatize_update(update, clip_norm=config.clip_norm,
                                      noise_multiplier=config.noise_multiplier * noise_scale,
                                      shares=k, rng=noise_rng)
            for key, value in upload.arrays.items():
                total[key] += value
        total["canary.weight"][0] += canary_sum
        _load(model, {key: global_state[key] + total[key] / k for key in total})
    model.eval()
    scores = _state(model)["canary.weight"][0] - start["canary.weight"][0]
    membership = {}
    with torch.no_grad():
        for name in names:
            losses = [per_example_loss(model(torch.from_numpy(d.x)), torch.from_numpy(d.y)).double().numpy()
                      for d in data[name]]
            membership[name] = loss_threshold_attack(losses[0], losses[1])
    return CanaryScores(scores=scores, included=included, membership=membership)
