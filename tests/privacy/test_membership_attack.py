"""The loss-threshold membership check: AUROC and TPR at low FPR against scikit-learn's ROC."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score, roc_curve

from fedsilo.privacy.audit.membership import loss_threshold_attack

losses = st.lists(st.integers(0, 30).map(lambda k: k / 10), min_size=1, max_size=300)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(losses, losses)
def test_matches_sklearn(members: list[float], non_members: list[float]) -> None:
    labels = np.r_[np.ones(len(members)), np.zeros(len(non_members))]
    scores = -np.r_[members, non_members]  # low loss: member
    result = loss_threshold_attack(members, non_members)
    assert result.auroc == pytest.approx(roc_auc_score(labels, scores) if len(set(labels)) == 2 else 0.5)
    fpr, tpr, _ = roc_curve(labels, scores)
    for got, level in ((result.tpr_at_1pct_fpr, 0.01), (result.tpr_at_0_1pct_fpr, 0.001)):
        assert got == pytest.approx(float(np.max(tpr[fpr <= level])))


def test_separable_and_identical_losses() -> None:
    perfect = loss_threshold_attack(np.zeros(2000), np.ones(2000))
    assert (perfect.auroc, perfect.tpr_at_1pct_fpr, perfect.tpr_at_0_1pct_fpr) == (1.0, 1.0, 1.0)
    same = loss_threshold_attack(np.ones(100), np.ones(100))
    assert (same.auroc, same.tpr_at_1pct_fpr) == (0.5, 0.0)


@pytest.mark.parametrize(("members", "non_members", "name"),
                         [([], [1.0], "member_losses"), ([1.0], [np.inf], "non_member_losses")])
def test_bad_losses_are_named(members: list[float], non_members: list[float], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        loss_threshold_attack(members, non_members)
