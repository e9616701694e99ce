"""Empirical privacy audits: training runs with secret canaries that lower-bound the ε actually achieved."""

from __future__ import annotations

from fedsilo.silo_agent.empirical.config import EmpiricalAuditConfig
from fedsilo.silo_agent.empirical.fault import FAULT_ENV, FaultSwitchError, injected_noise_scale
from fedsilo.silo_agent.empirical.run import EmpiricalAuditOutcome, run_empirical_audit

__all__ = [
    "FAULT_ENV",
    "EmpiricalAuditConfig",
    "EmpiricalAuditOutcome",
    "FaultSwitchError",
    "injected_noise_scale",
    "run_empirical_audit",
]
