"""The RDP order grids ε is minimised over: the default grid, its integer orders, the ledger grid."""

from __future__ import annotations

import math
from collections.abc import Iterable

from fedsilo.privacy.accounting.releases import _is_real

DEFAULT_RDP_ORDERS: tuple[float, ...] = (
    tuple(1 + x / 10.0 for x in range(1, 100))
    + tuple(float(a) for a in range(11, 64))
    + (128.0, 256.0, 512.0, 1024.0)
)
"""The RDP orders α searched for the best (ε, δ) conversion: 1.1, 1.2, …, 10.9, 11, …, 63,
128, 256, 512, 1024. This is Google dp_accounting's default grid; it is Opacus'
`RDPAccountant.DEFAULT_ALPHAS` (1.1…10.9 by 0.1, then 12…63) plus α = 11 and α = 128…1024,
which only lower ε for high-noise releases whose best order lies above 63. The issue-4 known
answers (best orders 3.9, 4.7, 5.4) are identical on both grids. A finer grid can only lower
ε (the bound holds at every order); ledgers store the history, so ε can be recomputed on any
grid."""

INTEGER_RDP_ORDERS: tuple[float, ...] = tuple(a for a in DEFAULT_RDP_ORDERS if a.is_integer())
"""The integer orders of `DEFAULT_RDP_ORDERS` (2…63, 128…1024). At integer orders both Opacus
and dp_accounting evaluate the subsampled-Gaussian RDP exactly (a finite binomial sum; Mironov,
Talwar, Zhang 2019, §3.3), so `RdpAccountant` and `DpAccountingVerifier` on this grid agree to
floating point; see `DpAccountingVerifier` for why they may not on fractional orders."""

LEDGER_RDP_ORDERS: tuple[float, ...] = INTEGER_RDP_ORDERS
"""The order grid of every ε written to a privacy ledger or audit report. Integer orders are
where Opacus (which the agent uses) and Google's dp_accounting (which `fedsilo audit verify`
and the coordinator's planning use) evaluate the same exact formula, so an auditor can
recompute each ledger ε with independent code to ~1e-9. The price is a slightly higher
(still valid) ε than on `DEFAULT_RDP_ORDERS`: e.g. 7.3291 becomes 7.3299 for the first
issue-4 known answer."""


def _check_orders(orders: Iterable[float]) -> tuple[float, ...]:
    values = tuple(orders)
    if not values:
        raise ValueError("invalid orders (): need at least one RDP order")
    for a in values:
        if not _is_real(a) or not 1.0 < float(a) < math.inf:
            raise ValueError(f"invalid orders: order {a!r} must be a finite number > 1")
    return tuple(sorted({float(a) for a in values}))
