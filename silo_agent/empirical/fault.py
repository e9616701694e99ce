"""The testing-only fault switch that makes an audit's training add less noise than its ledger claims."""

from __future__ import annotations

import math
import os
import sys
import warnings

__all__ = ["FAULT_ENV", "FAULT_PREFIX", "FaultSwitchError", "injected_noise_scale"]

#: The only way to turn the fault on: ``FEDSILO_TESTING_UNSAFE_NOISE_SCALE=break-dp:<scale>``
#: with 0 <= scale < 1. Only the empirical audit's own training reads it (never the agent's
#: DP-SGD or silo-level noise); a test checks that no other module names it.
FAULT_ENV = "FEDSILO_TESTING_UNSAFE_NOISE_SCALE"
FAULT_PREFIX = "break-dp:"


class FaultSwitchError(ValueError):
    """The fault switch's variable is set but not to ``break-dp:<scale>`` with 0 <= scale < 1."""


def injected_noise_scale() -> float:
    """The factor the audit's training multiplies its noise by: 1.0 unless the fault switch is on.

    When ``FEDSILO_TESTING_UNSAFE_NOISE_SCALE`` is set it must read ``break-dp:<scale>`` with
    0 <= scale < 1; the audit then adds ``scale`` times the noise its ledger ε is computed
    for, so that a test can check that the audit catches a DP implementation that adds too
    little noise. It says so on stderr and as a RuntimeWarning every time, and the audit
    record stores the scale (the report marks it as a TESTING FAULT).

    Returns:
        The scale, 1.0 when the variable is not set.

    Raises:
        FaultSwitchError: If the variable is set to anything else (even empty).
    """
    raw = os.environ.get(FAULT_ENV)
    if raw is None:
        return 1.0
    scale = math.nan
    if raw.startswith(FAULT_PREFIX):
        try:
            scale = float(raw[len(FAULT_PREFIX):])
        except ValueError:
            pass
    if not 0.0 <= scale < 1.0:
        raise FaultSwitchError(
            f"{FAULT_ENV} is set to {raw!r}: this testing-only fault switch takes "
            f"'{FAULT_PREFIX}<scale>' with 0 <= scale < 1; unset it for a real audit"
        )
    message = (
        f"TESTING FAULT ON ({FAULT_ENV}={raw}): the audit's training adds {scale:g} x the noise its "
        "ledger epsilon claims; this run is NOT differentially private as stated"
    )
    print(f"WARNING: {message}", file=sys.stderr, flush=True)
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    return scale
