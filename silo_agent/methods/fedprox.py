"""FedProx (Li et al., MLSys 2020): FedAvg with the proximal term μ/2‖w − w_global‖² in every silo's local objective."""

from __future__ import annotations

from typing import Any

from fedsilo.core.methods import BenchDefaults, register_method
from fedsilo.silo_agent.presets import DEMO_PRIVACY
from fedsilo.silo_agent.methods.fedavg import FedAvg

#: μ of the bench's FedProx cells.
BENCH_MU = 0.01


@register_method
class FedProx(FedAvg):
    """Shares and averages like FedAvg; local training adds μ(w − w⁰) to every step's gradient
    (``[training] proximal_mu``, applied by ``fedsilo.models.training``)."""

    name = "fedprox"
    summary = "FedAvg with the proximal term mu/2 ||w - w_global||^2 in local training (Li et al. 2020)"
    order = 15
    @classmethod
    def check_run(cls, run: Any) -> None:
        """A FedProx run states its μ: ``[training] proximal_mu`` > 0 (with μ = 0 it is FedAvg)."""
        super().check_run(run)
        mu = dict(run.training).get("proximal_mu", 0)
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not mu > 0:
            raise ValueError(f"training.proximal_mu: run.strategy 'fedprox' needs mu > 0 (e.g. {BENCH_MU:g}), got {mu!r}")

    bench = BenchDefaults(strategy="fedavg", training={"proximal_mu": BENCH_MU}, privacy=DEMO_PRIVACY,
                          note=f"FedAvg with the proximal term mu/2 ||w - w_global||^2, mu = {BENCH_MU:g} "
                               "(Li et al. 2020)")
