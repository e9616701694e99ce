"""A loss-threshold membership-inference check: AUROC and TPR at low FPR (Yeom et al. 2018; Carlini et al. 2022)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["MembershipResult", "loss_threshold_attack"]

#: The false-positive rates at which the true-positive rate is reported (Carlini et al. 2022,
#: "Membership Inference Attacks From First Principles", argue for TPR at low FPR).
LOW_FPRS = (0.01, 0.001)


@dataclass(frozen=True, kw_only=True)
class MembershipResult:
    """How well "low loss means member" separates one silo's training records from fresh ones.

    Attributes:
        members: Training records scored.
        non_members: Held-out records of the same distribution scored.
        auroc: Area under the ROC curve, ties counted half (0.5: chance).
        tpr_at_1pct_fpr: The largest TPR of a threshold whose FPR is at most 1%.
        tpr_at_0_1pct_fpr: The same at 0.1% (0 when there are fewer than 1000 non-members
            and no threshold reaches that FPR except the empty one).
    """

    members: int
    non_members: int
    auroc: float
    tpr_at_1pct_fpr: float
    tpr_at_0_1pct_fpr: float

    def __post_init__(self) -> None:
        for name in ("members", "non_members"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"invalid {name} {value!r}: must be an integer >= 1")
        for name in ("auroc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr"):
            value = getattr(self, name)
            if not isinstance(value, float) or not 0.0 <= value <= 1.0:
                raise ValueError(f"invalid {name} {value!r}: must be a float in [0, 1]")

    def to_dict(self) -> dict[str, float | int]:
        """The fields as a JSON-ready dict."""
        return {
            "members": self.members,
            "non_members": self.non_members,
            "auroc": self.auroc,
            "tpr_at_1pct_fpr": self.tpr_at_1pct_fpr,
            "tpr_at_0_1pct_fpr": self.tpr_at_0_1pct_fpr,
        }


def _tpr_at_fpr(member_scores: np.ndarray, non_member_scores: np.ndarray, fpr: float) -> float:
    """The largest TPR over thresholds t ("member" iff score >= t) with FPR <= ``fpr``."""
    thresholds = np.unique(np.concatenate([member_scores, non_member_scores, [np.inf]]))
    neg = np.sort(non_member_scores)
    pos = np.sort(member_scores)
    false_pos = (neg.size - np.searchsorted(neg, thresholds, side="left")) / neg.size
    true_pos = (pos.size - np.searchsorted(pos, thresholds, side="left")) / pos.size
    return float(np.max(true_pos[false_pos <= fpr]))


def loss_threshold_attack(
    member_losses: Sequence[float] | np.ndarray, non_member_losses: Sequence[float] | np.ndarray
) -> MembershipResult:
    """Scores the loss-threshold attack (Yeom et al. 2018): "member" iff the loss is low.

    Args:
        member_losses: The final model's loss on each training record.
        non_member_losses: Its loss on each held-out record.

    Returns:
        AUROC (Mann-Whitney U / (n_members · n_non_members), ties half) and the TPR at 1% and
        0.1% FPR.

    Raises:
        ValueError: If either side is empty or holds a non-finite loss.
    """
    members = -np.asarray(member_losses, dtype=np.float64).ravel()
    non_members = -np.asarray(non_member_losses, dtype=np.float64).ravel()
    for name, values in (("member_losses", members), ("non_member_losses", non_members)):
        if values.size == 0 or not np.isfinite(values).all():
            raise ValueError(f"invalid {name}: must be a non-empty sequence of finite numbers")
    ordered = np.sort(non_members)
    below = np.searchsorted(ordered, members, side="left")
    ties = np.searchsorted(ordered, members, side="right") - below
    auroc = float((below.sum() + 0.5 * ties.sum()) / (members.size * non_members.size))
    return MembershipResult(
        members=int(members.size),
        non_members=int(non_members.size),
        auroc=auroc,
        tpr_at_1pct_fpr=_tpr_at_fpr(members, non_members, LOW_FPRS[0]),
        tpr_at_0_1pct_fpr=_tpr_at_fpr(members, non_members, LOW_FPRS[1]),
    )
