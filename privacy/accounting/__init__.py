"""Privacy accounting: releases, the accountant seam (RDP, PRV, PLD, dp_accounting), calibration."""

from __future__ import annotations

from fedsilo.privacy.accounting.accountants import (
    DEFAULT_PLD_DISCRETIZATION,
    DEFAULT_PLD_MAX_RDP_EPSILON,
    DEFAULT_PRV_MAX_POINTS,
    Accountant,
    DpAccountingVerifier,
    PldAccountant,
    PrvAccountant,
    RdpAccountant,
    pld_or_none,
)
from fedsilo.privacy.accounting.calibration import calibrate_noise
from fedsilo.privacy.accounting.config import check_privacy_config
from fedsilo.privacy.accounting.orders import DEFAULT_RDP_ORDERS, INTEGER_RDP_ORDERS, LEDGER_RDP_ORDERS
from fedsilo.privacy.accounting.releases import (
    AccountingError,
    AccountingMethod,
    BudgetAccountant,
    EpsilonResult,
    Mechanism,
    Neighbouring,
    Release,
)

__all__ = [
    "DEFAULT_PLD_DISCRETIZATION",
    "DEFAULT_PLD_MAX_RDP_EPSILON",
    "DEFAULT_PRV_MAX_POINTS",
    "DEFAULT_RDP_ORDERS",
    "INTEGER_RDP_ORDERS",
    "LEDGER_RDP_ORDERS",
    "Accountant",
    "AccountingError",
    "AccountingMethod",
    "BudgetAccountant",
    "DpAccountingVerifier",
    "EpsilonResult",
    "Mechanism",
    "Neighbouring",
    "PldAccountant",
    "PrvAccountant",
    "RdpAccountant",
    "Release",
    "calibrate_noise",
    "check_privacy_config",
    "pld_or_none",
]
