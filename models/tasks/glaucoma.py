"""The "glaucoma-multimodal" Task (alias "glaucoma"): optic disc/cup segmentation and glaucoma grading from fundus (+ OCT)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fedsilo.core.validators import check_int
from fedsilo.models.tasks.base import DataSpec, SiloData, Task, parsed_config, register_task

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from fedsilo.models.glaucoma_data import GlaucomaDataset
    from fedsilo.models.imo_config import ImoNetConfig

__all__ = ["GlaucomaMultimodal"]


@register_task
class GlaucomaMultimodal(Task):
    """Joint optic disc/cup segmentation and glaucoma grading from fundus photographs and, where a clinic has one, OCT.

    Eye clinics hold fundus photographs and OCT B-scans of the same eyes; some hold only a fundus
    camera. Every silo segments the disc and cup on the fundus photograph and grades the eye
    (:data:`~fedsilo.models.glaucoma_data.GRADES`: normal, early, advanced).

    * Data: items are :class:`~fedsilo.models.glaucoma_data.GlaucomaExample`
      ``(fundus float32 [3, H, W], oct float32 [1, h, w], has_oct bool, mask int64 [H, W], grade int64)``;
      mask labels 0 background, 1 disc rim, 2 cup; an example without OCT has a zero ``oct`` and
      ``has_oct`` false. ``builtin`` is :func:`~fedsilo.models.glaucoma_data.glaucoma_silo_splits` of
      ``SyntheticGlaucomaConfig(seed=spec.seed, **spec.options)`` (options ``image_size`` (64),
      ``oct_size`` ((32, 64)), ``n_train``, ``n_val``, ``n_test``, ``n_unseen``, ``modalities``
      (``"auto"``: every third clinic, domain ``i % 3 == 2``, is fundus-only; ``"both"``; or
      ``"fundus"`` for a fundus-only clinic)): the cup-to-disc ratio grows and the
      OCT's nerve fibre layer thins with the grade; domain ``i`` has its own fundus camera and OCT
      device styles and a mildly skewed grade prior from (seed, i).
      ``folder`` is :func:`~fedsilo.models.glaucoma_folder.load_glaucoma_folder` of
      ``GlaucomaFolderConfig(path=spec.path, seed=spec.seed, **spec.options)``: a ``datalist.csv``
      ``fundus,oct,mask,grade`` (``oct`` may be empty).
    * Unseen domain: built-in, grade-balanced examples from a fundus camera and an OCT device no
      silo has (with the silo's ``modalities``); folder, every example of ``spec.unseen_path``.
    * Model: :class:`fedsilo.models.imo_config.ImoNetConfig` built by
      :func:`fedsilo.models.imo_net.build_imo_net` (another module; imported on first use).
      ``forward`` is ``model(inputs)`` with inputs a
      :class:`~fedsilo.models.glaucoma_data.GlaucomaInputs` ``(fundus, oct, has_oct)``.
    * The output object the network returns, which this Task relies on:

      - ``output.seg_logits``: float ``[N, 3, H, W]`` disc/cup logits on the fundus grid (read in
        eval mode by :meth:`evaluate`; argmax gives the label map);
      - ``output.grade_logits``: float ``[N, 3]`` grade logits (read in eval mode);
      - ``output.loss(targets) -> torch.Tensor``: the training loss of the batch, a scalar that is
        the batch mean of per-example losses (so DP-SGD's per-example gradients are well defined),
        given a :class:`~fedsilo.models.glaucoma_data.GlaucomaTargets` ``(mask [N, H, W], grade [N])``.

    * Loss: delegated to the network: :meth:`loss` is ``output.loss(target)``. What it holds
      (segmentation Dice + cross-entropy, or a diffusion objective, grading cross-entropy, a
      fundus/OCT alignment term, how examples without OCT are handled) is the network's business.
    * Metrics, over the evaluated set: cup Dice (headline) and disc Dice (labels >= 1), each the
      mean of per-image Dice (1 when both prediction and mask lack the structure); ``vcdr_error``,
      the mean ``|vCDR(pred) - vCDR(mask)|`` over the images with a disc in both (each vCDR from the
      largest disc component and the largest cup component in it; lower is better;
      1.0 with n = 0 when no image qualifies); grading accuracy, macro-F1 and quadratic-weighted
      kappa of the argmax grade.
    """

    name = "glaucoma-multimodal"
    aliases = ("glaucoma",)
    summary = "optic disc/cup segmentation and glaucoma grading from fundus photographs and OCT (fundus-only silos too)"
    metric_names = ("cup_dice", "disc_dice", "vcdr_error", "grade_accuracy", "grade_macro_f1", "grade_kappa")
    headline_metric = "cup_dice"
    lower_is_better = frozenset({"vcdr_error"})
    unseen_domain = ("built-in: a fundus camera and an OCT device no silo has (colour cast, gamma, blur, "
                     "illumination; contrast, speckle); folder: every example of data.unseen_path")
    data_sources = ("builtin", "folder")
    spatial_dims = 2
    image_batches = False

    def read_data(self, spec: DataSpec) -> SiloData:
        """Loads the built-in domain ``spec.domain`` or the folder ``spec.path`` (see the class doc).

        Raises:
            ValueError: On bad options or a malformed folder (the message names the file).
            FileNotFoundError: If the folder, its datalist or a file it names does not exist.
        """
        if spec.source == "builtin":
            from fedsilo.models import glaucoma_data as gd

            scfg = gd.SyntheticGlaucomaConfig.from_mapping({"seed": spec.seed, **spec.options})
            unseen = gd.glaucoma_unseen(scfg, spec.domain) if scfg.n_unseen else None
            return SiloData(splits=gd.glaucoma_silo_splits(scfg, spec.domain), unseen=unseen)
        from fedsilo.models import glaucoma_folder as gf

        fcfg = gf.GlaucomaFolderConfig.from_mapping({"path": str(spec.path), "seed": spec.seed, **spec.options})
        splits = gf.load_glaucoma_folder(fcfg)
        unseen = None
        if spec.unseen_path is not None:
            held = gf.load_glaucoma_folder(gf.GlaucomaFolderConfig.from_mapping(
                {**fcfg.to_mapping(), "path": str(spec.unseen_path)}))
            unseen = _pool([held.train, held.val, held.test])
        return SiloData(splits=splits, unseen=unseen)

    def model_config(self, config: Mapping[str, Any] | ImoNetConfig) -> ImoNetConfig:
        """Parses a :class:`fedsilo.models.imo_config.ImoNetConfig` (a parsed one is returned as is).

        Raises:
            ValueError: Naming a bad or unknown key.
        """
        from fedsilo.models.imo_config import ImoNetConfig

        return parsed_config(config, ImoNetConfig)

    def default_model_config(self, seed: int = 0) -> dict[str, Any]:
        """The network's defaults with weights from ``seed``."""
        return {"seed": seed}

    def build_model(self, config: Mapping[str, Any] | ImoNetConfig) -> nn.Module:
        """:func:`fedsilo.models.imo_net.build_imo_net` of the parsed config.

        Raises:
            ValueError: On a bad config.
        """
        from fedsilo.models.imo_net import build_imo_net

        return build_imo_net(self.model_config(config))

    def collate(self, dataset: Dataset[Any], indices: Sequence[int], device: torch.device) -> tuple[Any, Any]:
        """:func:`~fedsilo.models.glaucoma_data.collate_glaucoma`: ``(GlaucomaInputs, GlaucomaTargets)``."""
        from fedsilo.models.glaucoma_data import collate_glaucoma

        return collate_glaucoma(dataset, indices, device)

    def forward(self, model: nn.Module, inputs: Any) -> Any:
        """``model(inputs)``: the network reads fundus, OCT and ``has_oct`` from the :class:`GlaucomaInputs`."""
        return model(inputs)

    def loss(self, output: Any, target: Any) -> torch.Tensor:
        """``output.loss(target)``: the network's output object computes its own loss (see the class doc)."""
        return output.loss(target)

    def evaluate(self, model: nn.Module, dataset: Dataset[Any], *, batch_size: int = 16) -> dict[str, tuple[float, int]]:
        """Disc/cup Dice, vCDR error and grading accuracy, macro-F1 and kappa of ``model`` over ``dataset``.

        The model runs in eval mode under ``torch.no_grad`` on its own device; its training mode is
        restored. Segmentation metrics are per image (n the number of images; for ``vcdr_error``
        the images with a disc in both prediction and mask), grading metrics over the whole set.

        Raises:
            ValueError: On an empty dataset or a bad batch size.
        """
        import numpy as np
        import torch

        from fedsilo.models import metrics as m
        from fedsilo.models.glaucoma_data import GRADES, collate_glaucoma

        check_int("evaluate", "batch_size", batch_size, minimum=1)
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError("cannot evaluate on an empty dataset")
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        was_training = model.training
        model.eval()
        cup, disc, vcdr, preds, trues = [], [], [], [], []
        try:
            with torch.no_grad():
                for start in range(0, n, batch_size):
                    inputs, targets = collate_glaucoma(dataset, range(start, min(start + batch_size, n)), device)
                    out = model(inputs)
                    labels = out.seg_logits.argmax(dim=1).cpu().numpy()
                    masks = targets.mask.cpu().numpy()
                    for p, t in zip(labels, masks):
                        cup.append(m.cup_dice(p, t))
                        disc.append(m.disc_dice(p, t))
                        err = abs(m.vertical_cdr(p) - m.vertical_cdr(t))
                        if not math.isnan(err):
                            vcdr.append(err)
                    preds.append(out.grade_logits.argmax(dim=1).cpu().numpy())
                    trues.append(targets.grade.cpu().numpy())
        finally:
            model.train(was_training)
        pred, true = np.concatenate(preds), np.concatenate(trues)
        acc, f1 = m.accuracy_and_macro_f1(pred, true, len(GRADES))
        return {
            "cup_dice": (float(np.mean(cup)), n),
            "disc_dice": (float(np.mean(disc)), n),
            "vcdr_error": (float(np.mean(vcdr)), len(vcdr)) if vcdr else (1.0, 0),
            "grade_accuracy": (acc, n),
            "grade_macro_f1": (f1, n),
            "grade_kappa": (m.quadratic_weighted_kappa(pred, true, len(GRADES)), n),
        }


def _pool(parts: Sequence[GlaucomaDataset]) -> GlaucomaDataset:
    """One dataset of every example of ``parts`` (in order), OCT modality kept if any part has it."""
    import torch

    from fedsilo.models.glaucoma_data import GlaucomaDataset

    return GlaucomaDataset(*(torch.cat([getattr(p, k) for p in parts]) for k in ("fundus", "oct", "has_oct", "masks", "grades")),
                           has_oct_modality=any(p.has_oct_modality for p in parts))
