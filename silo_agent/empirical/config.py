"""Settings of one empirical privacy audit (a training run with canaries), validated on construction."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from fedsilo.privacy.accounting import Mechanism, Neighbouring, Release
from fedsilo.privacy.audit.empirical import ScoreMode

__all__ = ["EmpiricalAuditConfig"]


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _positive(name: str, value: object) -> None:
    if not _is_real(value) or not math.isfinite(float(value)) or not float(value) > 0.0:  # type: ignore[arg-type]
        raise ValueError(f"invalid {name} {value!r}: must be a finite number > 0")


def _open_unit(name: str, value: object) -> None:
    if not _is_real(value) or not 0.0 < float(value) < 1.0:  # type: ignore[arg-type]
        raise ValueError(f"invalid {name} {value!r}: must be a number in (0, 1)")


def _count(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < low:
        raise ValueError(f"invalid {name} {value!r}: must be an integer >= {low}")


@dataclass(frozen=True, kw_only=True)
class EmpiricalAuditConfig:
    """One audit: which relation, what the auditor sees, the DP settings claimed, the canaries.

    Record level: one silo trains a logistic model with DP-SGD (Opacus) on ``records``
    records of a built-in Gaussian-mixture generator plus the included canaries. Silo level:
    ``silos`` silos train locally without DP-SGD and each clips and noises its update
    (``privatize_update``); ``canaries`` simulated canary silos each join every round or never.

    Attributes:
        level: The neighbouring relation audited (RECORD or SILO).
        mode: WHITE_BOX (Dirac gradient canaries) or BLACK_BOX (input canaries, record level only).
        canaries: m >= 4, each included with probability ½ by a secret only the auditor holds.
        noise_multiplier: σ > 0 the ledger is charged for.
        steps: DP-SGD steps (record level) or rounds (silo level), >= 1.
        sample_rate: Poisson rate q in (0, 1] of each DP-SGD step; 1 at silo level.
        clip_norm: C > 0, per example (record) or per update (silo).
        delta: δ in (0, 1) of the audited claim.
        confidence: Of the lower bound, in (0, 1).
        records: Real records per silo (>= 2); as many fresh records are drawn as non-members.
        silos: Real silos at silo level (>= 1); 1 at record level.
        features: Input features of the real records (>= 1).
        classes: Classes (>= 2).
        learning_rate: SGD step size (> 0).
        seed: Seeds every draw (reproducible, for tests); None draws the secret and the noise
            from the OS (a real audit).
    """

    level: Neighbouring = Neighbouring.RECORD
    mode: ScoreMode = ScoreMode.WHITE_BOX
    canaries: int = 1000
    noise_multiplier: float = 1.0
    steps: int = 100
    sample_rate: float = 0.1
    clip_norm: float = 1.0
    delta: float = 1e-5
    confidence: float = 0.95
    records: int = 1000
    silos: int = 1
    features: int = 16
    classes: int = 4
    learning_rate: float = 0.5
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.level, Neighbouring):
            raise ValueError(f"invalid level {self.level!r}: must be a Neighbouring (RECORD or SILO)")
        if not isinstance(self.mode, ScoreMode):
            raise ValueError(f"invalid mode {self.mode!r}: must be a ScoreMode (WHITE_BOX or BLACK_BOX)")
        _count("canaries", self.canaries, 4)
        _positive("noise_multiplier", self.noise_multiplier)
        _count("steps", self.steps, 1)
        q = self.sample_rate
        if not _is_real(q) or not 0.0 < float(q) <= 1.0:
            raise ValueError(f"invalid sample_rate {q!r}: must be a number in (0, 1]")
        _positive("clip_norm", self.clip_norm)
        _open_unit("delta", self.delta)
        _open_unit("confidence", self.confidence)
        _count("records", self.records, 2)
        _count("silos", self.silos, 1)
        _count("features", self.features, 1)
        _count("classes", self.classes, 2)
        _positive("learning_rate", self.learning_rate)
        if self.seed is not None:
            _count("seed", self.seed, 0)
        if self.level is Neighbouring.SILO:
            if self.mode is not ScoreMode.WHITE_BOX:
                raise ValueError(
                    f"invalid mode {self.mode.value!r} at silo level: the silo-level audit scores the "
                    "aggregated model change (white_box)"
                )
            if float(q) != 1.0:
                raise ValueError(
                    f"invalid sample_rate {q!r} at silo level: every silo uploads every round, it must be 1"
                )
        elif self.silos != 1:
            raise ValueError(f"invalid silos {self.silos!r} at record level: one silo trains, it must be 1")

    @property
    def guess_sizes(self) -> tuple[tuple[int, int], ...]:
        """The (k+, k−) choices tried: k = m/40, m/20, m/10 and m/4 guesses each way (at least 1)."""
        sizes = sorted({max(1, self.canaries // d) for d in (40, 20, 10, 4)})
        return tuple((k, k) for k in sizes)

    @property
    def release(self) -> Release:
        """The release the ledger is charged for: subsampled Gaussian (record) or Gaussian (silo)."""
        if self.level is Neighbouring.RECORD:
            return Release(mechanism=Mechanism.SUBSAMPLED_GAUSSIAN, neighbouring=Neighbouring.RECORD,
                           noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=self.steps)
        return Release(mechanism=Mechanism.GAUSSIAN, neighbouring=Neighbouring.SILO,
                       noise_multiplier=self.noise_multiplier, sample_rate=1.0, steps=self.steps)
