"""The "classification-2d" Task (alias "classify"): 2-D image classification under label skew and scanner (domain) skew."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fedsilo.core.validators import check_int
from fedsilo.models.tasks.base import DataSpec, SiloData, Task, parsed_config, register_task

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from fedsilo.models.classify_net import ClassifyNetConfig

__all__ = ["ImageClassification", "per_class_f1"]


def per_class_f1(pred: np.ndarray | Sequence[int], true: np.ndarray | Sequence[int], n_classes: int) -> list[float]:
    """The F1 score of each class ``0..n_classes-1`` of integer predictions against labels.

    F1 of class c is ``2 TP / (2 TP + FP + FN) = 2 TP / (support + predicted)``; it is NaN for a
    class with no true and no predicted example (undefined, and left out of macro-F1, see
    :func:`~fedsilo.models.metrics.accuracy_and_macro_f1`), 0 for a class predicted but absent or
    present but never predicted.

    Raises:
        ValueError: On vectors of unequal length or not 1-D, or a label outside ``[0, n_classes)``.
    """
    import numpy as np

    check_int("per_class_f1", "n_classes", n_classes, minimum=1)
    pred = np.asarray(pred, dtype=np.int64)
    true = np.asarray(true, dtype=np.int64)
    if pred.shape != true.shape or pred.ndim != 1:
        raise ValueError(f"pred and true must be equal-length vectors, got {pred.shape} and {true.shape}")
    if pred.size and (min(pred.min(), true.min()) < 0 or max(pred.max(), true.max()) >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}), got pred {pred.min()}..{pred.max()}, "
                         f"true {true.min()}..{true.max()}")
    tp = np.bincount(true[pred == true], minlength=n_classes).astype(np.float64)
    denom = np.bincount(true, minlength=n_classes) + np.bincount(pred, minlength=n_classes)
    return [float(2 * tp[c] / denom[c]) if denom[c] else float("nan") for c in range(n_classes)]


@register_task
class ImageClassification(Task):
    """Image classification of lesions (one label per 2-D RGB image) across scanners with skewed class mixes.

    Silos differ in two ways at once: each scanner renders images in its own style (domain
    skew), and each silo sees its own class mix (label skew: a class may be rare or missing),
    while the federation wants one model good at every class.

    * Data: images ``[3, H, W]`` in [0, 1] with a class label; items are
      ``(image float32 [C, H, W], label int64)``. ``builtin`` is
      :func:`~fedsilo.models.classify_data.classify_silo_splits` of
      ``SyntheticClassifyConfig(seed=spec.seed, **spec.options)`` (options ``image_size`` (32),
      ``n_train``, ``n_val``, ``n_test``, ``n_unseen``, ``label_skew``): five classes
      (:data:`~fedsilo.models.classify_data.BUILTIN_CLASSES`: normal tissue, benign cyst,
      inflammatory lesion, malignant tumour, calcification) drawn on a shared tissue texture
      at random positions, sizes and rotations; domain ``i`` has its own scanner style (colour
      gain and offset, gamma, contrast, blur, noise) from (seed, i).
      ``folder`` is :func:`~fedsilo.models.classify_folder.load_classify_folder` of
      ``ClassifyFolderConfig(path=spec.path, seed=spec.seed, **spec.options)``: one sub-folder
      per class or a ``labels.csv`` (``path,label``); option ``classes`` fixes the label order
      (give every silo the same list, and the model the same ``class_names``).
    * Label skew (built-in): each silo's class prior is Dirichlet(``label_skew``) seeded by
      (seed, domain), default α = 0.5 (smaller: more skew; 0: no skew). Training and
      validation follow the silo's prior (training holds at least two classes); the test set is
      class-balanced, so test scores measure every class.
    * Unseen domain: built-in, class-balanced images from a scanner style no silo has (each
      style parameter outside the silos' ranges); folder, every image of ``spec.unseen_path``,
      read with the silo's options and classes.
    * Model: :class:`~fedsilo.models.classify_net.ClassifyNetConfig`, ``[N, n_classes]`` logits of
      :class:`~fedsilo.models.classify_net.ClassifyNet`: ``features`` (conv blocks, global
      max pooling, a linear embedding) then ``head`` (linear); GroupNorm by default
      (record-level DP as is), BatchNorm with ``norm = "batch"``.
    * Batches: :func:`~fedsilo.models.classify_data.collate_classify`, ``(x [N, C, H, W], y [N])``.
    * Loss: cross-entropy, the batch mean of per-example losses.
    * Metrics: accuracy (headline) and macro-F1 (over the classes present in labels or
      predictions); as details (``detail_prefixes``), ``f1_class_<i>``: the F1 of class ``i``
      (:func:`per_class_f1`) for each class present in the labels or predictions, n its support.
    """

    name = "classification-2d"
    aliases = ("classify",)
    summary = "2-D image classification under label and scanner skew (small CNN) scored by accuracy and macro-F1"
    metric_names = ("accuracy", "macro_f1")
    headline_metric = "accuracy"
    unseen_domain = ("built-in: class-balanced images from a scanner style no silo has (colour cast, gamma, "
                     "contrast, blur, noise); folder: every image of data.unseen_path")
    data_sources = ("builtin", "folder")
    spatial_dims = 2
    detail_prefixes = ("f1_class_",)

    def read_data(self, spec: DataSpec) -> SiloData:
        """Loads the built-in domain ``spec.domain`` or the folder ``spec.path`` (see the class doc).

        Raises:
            ValueError: On bad options or a malformed folder (the message names the file).
            FileNotFoundError: If the folder, or an image it lists, does not exist.
        """
        from fedsilo.models import classify_data as cd
        from fedsilo.models import classify_folder as cf

        if spec.source == "builtin":
            scfg = cd.SyntheticClassifyConfig.from_mapping({"seed": spec.seed, **spec.options})
            unseen = cd.classify_unseen(scfg, spec.domain) if scfg.n_unseen else None
            return SiloData(splits=cd.classify_silo_splits(scfg, spec.domain), unseen=unseen)
        fcfg = cf.ClassifyFolderConfig.from_mapping({"path": str(spec.path), "seed": spec.seed, **spec.options})
        splits = cf.load_classify_folder(fcfg)
        unseen = None
        if spec.unseen_path is not None:
            import torch

            ucfg = cf.ClassifyFolderConfig.from_mapping({**fcfg.to_mapping(), "path": str(spec.unseen_path),
                                                         "classes": list(splits.train.class_names)})
            held = cf.load_classify_folder(ucfg)
            parts = [p for p in (held.train, held.val, held.test) if len(p)]
            unseen = cd.ClassifyDataset(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]),
                                        splits.train.class_names)
        return SiloData(splits=splits, unseen=unseen)

    def model_config(self, config: Mapping[str, Any] | ClassifyNetConfig) -> ClassifyNetConfig:
        """Parses a :class:`~fedsilo.models.classify_net.ClassifyNetConfig` (a parsed one is returned as is).

        Raises:
            ValueError: Naming a bad or unknown key.
        """
        from fedsilo.models.classify_net import ClassifyNetConfig

        return parsed_config(config, ClassifyNetConfig)

    def default_model_config(self, seed: int = 0) -> dict[str, Any]:
        """The default network (channels (16, 32, 64), embedding 64, GroupNorm of 16 groups) for the built-in classes,
        with weights from ``seed``; the class names are written out, so the run's model table names them."""
        from fedsilo.models.classify_data import BUILTIN_CLASSES

        return {"seed": seed, "class_names": list(BUILTIN_CLASSES)}

    def build_model(self, config: Mapping[str, Any] | ClassifyNetConfig) -> nn.Module:
        """:func:`~fedsilo.models.classify_net.build_classify_net` of the parsed config.

        Under a record-level DP plan the run passes the model through ``make_private_compatible``:
        with ``norm = "group"`` it is used as is; with ``"batch"`` Opacus' fix swaps each BatchNorm
        for a GroupNorm (``min(32, C)`` groups, weight 1, bias 0).

        Raises:
            ValueError: On a bad config.
        """
        from fedsilo.models.classify_net import build_classify_net

        return build_classify_net(self.model_config(config))

    def collate(self, dataset: Dataset[Any], indices: Sequence[int], device: torch.device) -> tuple[Any, Any]:
        """:func:`~fedsilo.models.classify_data.collate_classify`: ``(x float32 [N, C, H, W], y int64 [N])``."""
        from fedsilo.models.classify_data import collate_classify

        return collate_classify(dataset, indices, device)

    def loss(self, output: Any, target: Any) -> torch.Tensor:
        """Cross-entropy of logits ``[N, K]`` and labels ``[N]``, averaged over the batch."""
        from torch.nn import functional

        return functional.cross_entropy(output, target)

    def evaluate(self, model: nn.Module, dataset: Dataset[Any], *, batch_size: int = 16) -> dict[str, tuple[float, int]]:
        """Accuracy and macro-F1 (:func:`~fedsilo.models.metrics.accuracy_and_macro_f1`) of the argmax
        prediction over ``dataset``, and ``f1_class_<i>`` (F1, support) for each class present in its
        labels or the predictions (:func:`~fedsilo.models.metrics.classification_scores`).

        Raises:
            ValueError: On an empty dataset or a bad batch size.
        """
        from fedsilo.models.classify_data import collate_classify
        from fedsilo.models.metrics import classification_scores

        return classification_scores(model, dataset, collate=collate_classify, batch_size=batch_size,
                                     per_class=self.detail_prefixes[0])
