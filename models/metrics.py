"""Per-image Dice and 95th-percentile Hausdorff distance (defined for empty masks); accuracy and macro-F1 of class labels; optic disc/cup scores and quadratic-weighted kappa."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["SegmentationScores", "accuracy_and_macro_f1", "classification_scores", "cup_dice", "dice_and_hd95",
           "disc_dice", "hd95_pixels", "quadratic_weighted_kappa", "to_labels", "vertical_cdr"]


@dataclass(frozen=True)
class SegmentationScores:
    """Scores of a batch, one value per image (mean over foreground classes).

    Attributes:
        dice: float64 tensor ``[N]`` with values in [0, 1].
        hd95: float64 tensor ``[N]`` with values in [0, sqrt(H**2 + W**2)], in pixels.
    """

    dice: torch.Tensor
    hd95: torch.Tensor


def to_labels(pred: torch.Tensor) -> torch.Tensor:
    """Turns network output or a label map into an int64 label map ``[N, 1, H, W]``.

    Args:
        pred: ``[N, C, H, W]`` with ``C >= 2``: logits or probabilities, reduced by argmax
            over the channel dimension. ``[N, 1, H, W]``: already a label map (integer or bool;
            a floating map must hold whole numbers).

    Returns:
        The label map.

    Raises:
        ValueError: On a wrong rank or a non-integral floating label map.
    """
    if pred.dim() != 4:
        raise ValueError(f"pred must be [N, C, H, W], got shape {tuple(pred.shape)}")
    if pred.shape[1] >= 2:
        return pred.argmax(dim=1, keepdim=True).to(torch.int64)
    if pred.is_floating_point() and not torch.equal(pred, pred.round()):
        raise ValueError("a single-channel pred is read as a label map and must hold whole numbers")
    return pred.to(torch.int64)


def _edges(mask: np.ndarray) -> np.ndarray:
    """Edge pixels of a bool ``[H, W]`` mask: set pixels with a 4-neighbour unset or off-image."""
    p = np.pad(mask, 1, constant_values=False)
    interior = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~interior


def _nearest_distances(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Distance from each point of ``src`` ``[n, 2]`` to the nearest point of ``dst`` ``[m, 2]``."""
    out = np.empty(src.shape[0])
    chunk = max(1, 2_000_000 // max(1, dst.shape[0]))
    for start in range(0, src.shape[0], chunk):
        diff = src[start : start + chunk, None, :] - dst[None, :, :]
        out[start : start + chunk] = np.sqrt(np.min(np.einsum("ijk,ijk->ij", diff, diff), axis=1))
    return out


def hd95_pixels(
    pred: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray, *, percentile: float = 95.0
) -> float:
    """Symmetric percentile Hausdorff distance between two ``[H, W]`` masks, in pixels.

    Args:
        pred: Predicted foreground ``[H, W]`` (nonzero is foreground).
        mask: Reference foreground ``[H, W]`` (nonzero is foreground).
        percentile: Percentile in [0, 100].

    Returns:
        The distance; 0 when both are empty, the image diagonal when exactly one is.

    Raises:
        ValueError: On shapes that are not equal and 2-D, or a bad percentile.
    """
    p = (pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)) != 0
    m = (mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)) != 0
    if p.ndim != 2 or p.shape != m.shape:
        raise ValueError(f"pred and mask must be equal [H, W], got {p.shape} and {m.shape}")
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
    has_p, has_m = bool(p.any()), bool(m.any())
    if not has_p and not has_m:
        return 0.0
    if not (has_p and has_m):
        return math.hypot(*p.shape)
    ep = np.argwhere(_edges(p)).astype(np.float64)
    em = np.argwhere(_edges(m)).astype(np.float64)
    return float(
        max(
            np.percentile(_nearest_distances(ep, em), percentile),
            np.percentile(_nearest_distances(em, ep), percentile),
        )
    )


def dice_and_hd95(
    pred_logits_or_labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_classes: int | None = None,
) -> SegmentationScores:
    """Scores a batch of 2-D segmentations image by image.

    Conventions, per image and foreground class (then averaged over the foreground classes):

    * Dice is MONAI's ``DiceMetric(include_background=False, ignore_empty=False)``: both
      prediction and mask empty gives 1, exactly one of them empty gives 0.
    * HD95 (pixels, unit spacing) is the symmetric 95th-percentile surface distance as MONAI's
      ``HausdorffDistanceMetric(percentile=95)`` defines it (edges are foreground pixels with
      a 4-neighbour outside the object or the image; for each edge pixel the distance to the
      nearest edge pixel of the other mask; 95th percentile by linear interpolation; the
      larger of the two directions). Both empty gives 0; exactly one empty gives the image
      diagonal ``sqrt(H**2 + W**2)``, an upper bound of any real value.

    So no NaN or infinity ever reaches a report. HD95 is computed with NumPy
    (:func:`hd95_pixels`) because MONAI's metric needs SciPy, which the agent does not
    install; the tests cross-check the two whenever SciPy is importable.

    Args:
        pred_logits_or_labels: ``[N, C, H, W]`` logits/probabilities (``C >= 2``, argmax taken)
            or an ``[N, 1, H, W]`` label map.
        mask: Reference label map ``[N, 1, H, W]`` (integer; bool accepted).
        num_classes: Number of classes including background. Defaults to ``C`` for logits and
            to ``max(2, largest label + 1)`` for label maps.

    Returns:
        Per-image Dice and HD95, each averaged over the foreground classes ``1..K-1``.

    Raises:
        ValueError: On bad shapes, negative labels or labels not below ``num_classes``.
    """
    from monai.metrics import DiceMetric

    labels = to_labels(pred_logits_or_labels)
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be [N, 1, H, W], got shape {tuple(mask.shape)}")
    if mask.is_floating_point() and not torch.equal(mask, mask.round()):
        raise ValueError("mask must hold whole-number labels")
    mask = mask.to(torch.int64)
    if labels.shape != mask.shape:
        raise ValueError(f"pred {tuple(labels.shape)} and mask {tuple(mask.shape)} do not match")
    labels = labels.cpu()
    mask = mask.cpu()
    if num_classes is None:
        if pred_logits_or_labels.shape[1] >= 2:
            num_classes = int(pred_logits_or_labels.shape[1])
        else:
            top = max(int(labels.max()), int(mask.max())) if labels.numel() else 0
            num_classes = max(2, top + 1)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    for name, t in (("pred", labels), ("mask", mask)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(f"{name} labels must lie in [0, {num_classes - 1}]")
    n = labels.shape[0]
    if n == 0:
        empty = torch.zeros(0, dtype=torch.float64)
        return SegmentationScores(dice=empty, hd95=empty.clone())

    pred_onehot = F.one_hot(labels[:, 0], num_classes).permute(0, 3, 1, 2).float()
    mask_onehot = F.one_hot(mask[:, 0], num_classes).permute(0, 3, 1, 2).float()
    dice_metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    dice = dice_metric(pred_onehot, mask_onehot).to(torch.float64)  # [N, K-1]
    dice_metric.reset()

    hd = np.empty((n, num_classes - 1))
    labels_np, mask_np = labels[:, 0].numpy(), mask[:, 0].numpy()
    for i in range(n):
        for c in range(1, num_classes):
            hd[i, c - 1] = hd95_pixels(labels_np[i] == c, mask_np[i] == c)
    return SegmentationScores(dice=dice.mean(dim=1), hd95=torch.from_numpy(hd.mean(axis=1)))


def accuracy_and_macro_f1(pred: np.ndarray, true: np.ndarray, n_classes: int) -> tuple[float, float]:
    """Accuracy and macro-F1 of integer predictions against labels.

    Macro-F1 averages the per-class F1 over the classes that occur in ``true`` or ``pred``
    (scikit-learn's default label set); a class with no true and no predicted example is left
    out, one predicted but absent (or present but never predicted) counts with F1 = 0.
    """
    pred = np.asarray(pred, dtype=np.int64)
    true = np.asarray(true, dtype=np.int64)
    if pred.shape != true.shape or pred.ndim != 1 or pred.size == 0:
        raise ValueError(f"pred and true must be equal-length non-empty vectors, got {pred.shape} and {true.shape}")
    conf = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(conf, (true, pred), 1)
    tp = np.diag(conf).astype(np.float64)
    support = conf.sum(axis=1)
    predicted = conf.sum(axis=0)
    present = (support + predicted) > 0
    f1 = 2 * tp[present] / (support[present] + predicted[present])
    return float(tp.sum() / pred.size), float(f1.mean())


def classification_scores(model: torch.nn.Module, dataset: Any, *, collate: Callable[..., tuple[Any, Any]],
                          batch_size: int = 16, per_class: str | None = None) -> dict[str, tuple[float, int]]:
    """Accuracy and macro-F1 (:func:`accuracy_and_macro_f1`) of ``model``'s argmax prediction over ``dataset``,
    and optionally each class's F1, from one pass over the data.

    The model is scored in eval mode under ``torch.no_grad`` on its own device and its training mode is
    restored; the class count is the logits' width (at least 2, and more if a label exceeds it).

    Args:
        model: A classifier whose output on a batch is logits ``[N, K]``.
        dataset: A non-empty map-style dataset.
        collate: The Task's ``collate(dataset, indices, device) -> (inputs, labels [N])``.
        batch_size: Examples per forward pass.
        per_class: A name prefix: also return ``<per_class><c>`` for each class ``c`` that occurs in
            the labels or the predictions (the classes macro-F1 averages over), valued the class's F1
            (:func:`fedsilo.models.tasks.classification.per_class_f1`, always finite) with n its
            support (examples labelled ``c``). None: no per-class entries.

    Returns:
        ``{"accuracy": (value, n), "macro_f1": (value, n)}`` with n the number of examples, then the
        per-class entries in class order.

    Raises:
        ValueError: On an empty dataset or a bad batch size.
    """
    from fedsilo.core.validators import check_int

    check_int("evaluate", "batch_size", batch_size, minimum=1)
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    preds, trues = [], []
    n_classes = 2
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                inputs, y = collate(dataset, range(start, min(start + batch_size, n)), device)
                logits = model(inputs)
                n_classes = max(n_classes, int(logits.shape[1]))
                preds.append(logits.argmax(dim=1).cpu().numpy())
                trues.append(y.cpu().numpy())
    finally:
        model.train(was_training)
    true, pred = np.concatenate(trues), np.concatenate(preds)
    n_classes = max(n_classes, int(true.max()) + 1)
    acc, f1 = accuracy_and_macro_f1(pred, true, n_classes)
    scores = {"accuracy": (acc, n), "macro_f1": (f1, n)}
    if per_class is not None:
        from fedsilo.models.tasks.classification import per_class_f1

        support = np.bincount(true, minlength=n_classes)
        scores.update((f"{per_class}{c}", (v, int(support[c])))
                      for c, v in enumerate(per_class_f1(pred, true, n_classes)) if not math.isnan(v))
    return scores


# -- optic disc / cup and glaucoma grading ----------------------------------------------------------------

def _label_map(mask: torch.Tensor | np.ndarray) -> np.ndarray:
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be an [H, W] label map, got shape {m.shape}")
    return m


def _rows_spanned(region: np.ndarray) -> int:
    rows = np.flatnonzero(region.any(axis=1))
    return int(rows[-1] - rows[0] + 1) if rows.size else 0


def _largest_component(region: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a bool map (the first in scan order on a tie; empty stays empty)."""
    from scipy import ndimage

    labels, n = ndimage.label(region, structure=np.ones((3, 3), dtype=bool))
    if n <= 1:
        return region.copy() if n else region
    sizes = np.bincount(labels.ravel())[1:]
    return labels == int(np.argmax(sizes)) + 1


def vertical_cdr(mask: torch.Tensor | np.ndarray) -> float:
    """Vertical cup-to-disc ratio of an ``[H, W]`` label map (0 background, 1 rim, 2 cup).

    The rows spanned by the cup over the rows spanned by the disc, where the disc is the largest
    8-connected component of labels >= 1 and the cup the largest 8-connected component of label 2
    inside it (the usual post-processing of a predicted map, e.g. the REFUGE challenge's evaluation:
    a few stray pixels far from the disc would otherwise set both extents); 0 when the disc holds no
    cup, NaN when there is no disc. A single-blob mask (every ground truth) is measured as it is.
    """
    m = _label_map(mask)
    disc = _largest_component(m >= 1)
    height = _rows_spanned(disc)
    return _rows_spanned(_largest_component(disc & (m == 2))) / height if height else math.nan


def _binary_dice(pred: np.ndarray, true: np.ndarray) -> float:
    """Dice of two bool maps; 1 when both are empty (MONAI's ``ignore_empty=False``), 0 when one is."""
    total = int(pred.sum()) + int(true.sum())
    return 2.0 * int((pred & true).sum()) / total if total else 1.0


def disc_dice(pred: torch.Tensor | np.ndarray, true: torch.Tensor | np.ndarray) -> float:
    """Dice of the optic disc (labels >= 1) of two ``[H, W]`` label maps; 1 when neither has a disc."""
    return _binary_dice(_label_map(pred) >= 1, _label_map(true) >= 1)


def cup_dice(pred: torch.Tensor | np.ndarray, true: torch.Tensor | np.ndarray) -> float:
    """Dice of the optic cup (label 2) of two ``[H, W]`` label maps; 1 when neither has a cup."""
    return _binary_dice(_label_map(pred) == 2, _label_map(true) == 2)


def quadratic_weighted_kappa(pred: np.ndarray, true: np.ndarray, n_classes: int) -> float:
    """Cohen's kappa of ordinal labels with quadratic weights ``(i - j)^2 / (K - 1)^2``.

    ``1 - sum(w * O) / sum(w * E)`` with ``O`` the confusion matrix and ``E`` the outer product of
    its marginals over ``N``, as scikit-learn's ``cohen_kappa_score(weights="quadratic",
    labels=range(n_classes))`` (the distance between two classes is that of their labels, even where
    a class between them is absent from both vectors); where
    that is 0/0 (every label and prediction the same single class: perfect agreement) it is 1,
    not NaN.

    Raises:
        ValueError: On vectors of unequal length, empty or not 1-D, fewer than 2 classes, or a
            label outside ``[0, n_classes)``.
    """
    pred = np.asarray(pred, dtype=np.int64)
    true = np.asarray(true, dtype=np.int64)
    if pred.shape != true.shape or pred.ndim != 1 or pred.size == 0:
        raise ValueError(f"pred and true must be equal-length non-empty vectors, got {pred.shape} and {true.shape}")
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
        raise ValueError(f"n_classes must be an int >= 2, got {n_classes!r}")
    if min(pred.min(), true.min()) < 0 or max(pred.max(), true.max()) >= n_classes:
        raise ValueError(f"labels must lie in [0, {n_classes}), got pred {pred.min()}..{pred.max()}, "
                         f"true {true.min()}..{true.max()}")
    observed = np.zeros((n_classes, n_classes))
    np.add.at(observed, (true, pred), 1.0)
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / pred.size
    idx = np.arange(n_classes)
    weights = (idx[:, None] - idx[None, :]) ** 2 / (n_classes - 1) ** 2
    denom = float((weights * expected).sum())
    return 1.0 - float((weights * observed).sum()) / denom if denom > 0 else 1.0
