"""The "sensor-activity" Task (alias "sensor"): animal activity recognition from wearable sensors, a species per silo."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fedsilo.models.tasks.base import DataSpec, SiloData, Task, parsed_config, register_task

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from fedsilo.models.sensor_net import SensorNetConfig

__all__ = ["SensorActivity"]  # and accuracy_and_macro_f1, an alias (``__getattr__``)


def __getattr__(name: str) -> Any:
    """``accuracy_and_macro_f1``, which moved to :mod:`fedsilo.models.metrics`, loaded on first use (PEP 562):
    the old import path keeps working, and importing this module still loads no torch."""
    if name == "accuracy_and_macro_f1":
        from fedsilo.models.metrics import accuracy_and_macro_f1

        return accuracy_and_macro_f1
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@register_task
class SensorActivity(Task):
    """Animal activity recognition (standing, walking, running, grazing, lying) from collar/leg sensor windows.

    Each silo is a farm or study of ONE species; the network shares what is common to all
    species and keeps a small branch per species (CKSP: Mao et al., "CKSP: Cross-species
    Knowledge Sharing and Preserving for Universal Animal Activity Recognition", arXiv:2410.16644).

    * Data: windows ``[C, T]`` (built-in: 6 channels, accelerometer then gyroscope, T = 64)
      with a behaviour label and the window's species name; items are
      ``((window float32 [C, T], species), label int64)``.
      ``builtin`` is :func:`~fedsilo.models.sensor_data.sensor_silo_splits` of
      ``SyntheticSensorConfig(seed=spec.seed, **spec.options)`` (options ``window``,
      ``n_train``, ``n_val``, ``n_test``, ``n_unseen``, ``imbalance``): domain ``i`` holds
      species ``BUILTIN_SPECIES[(i // 2) % 4]`` of (horse, sheep, cattle, goat), so domains
      0, 1, 2 (a three-silo demo) are horse, horse, sheep, each with its own label imbalance.
      ``folder`` is :func:`~fedsilo.models.sensor_data.load_sensor_folder` of
      ``SensorFolderConfig(path=spec.path, seed=spec.seed, **spec.options)``: ``windows.npy`` +
      ``labels.npy`` or ``windows.csv``, and the required option ``species`` (``[data] species``).
    * Unseen domain: built-in, the silo's own species worn with a device no silo has (another
      mounting angle, more noise, offsets); folder, every window of ``spec.unseen_path``, read
      with the silo's options (its ``species`` unless the option ``unseen_species`` names another).
    * Model: :class:`~fedsilo.models.sensor_net.SensorNetConfig`, ``[N, n_classes]`` logits of
      :class:`~fedsilo.models.sensor_net.SensorNet`: SPConv (shared conv + per-species low-rank
      conv) and per-species norms (``sbn`` BatchNorm; ``sgn`` GroupNorm for record-level DP).
    * Batches: :func:`~fedsilo.models.sensor_data.collate_sensor`,
      ``(SensorInputs(x [N, C, T], species_idx [N], names), labels [N])``.
    * Loss: cross-entropy, the batch mean of per-example losses.
    * Metrics: accuracy (headline) and macro-F1.

    ``spatial_dims`` is 1 (series ``[C, T]``): a run refuses the methods that work on 2-D images only
    (``Method.needs_2d``: LoRA of ``Conv2d``, Fourier styles, channel statistics of images).
    """

    name = "sensor-activity"
    aliases = ("sensor",)
    summary = "animal activity recognition from wearable sensors (species-aware 1-D CNN) scored by accuracy and macro-F1"
    metric_names = ("accuracy", "macro_f1")
    headline_metric = "accuracy"
    unseen_domain = ("built-in: the silo's species worn with a sensor device no silo has (another mounting "
                     "angle, more noise, offsets); folder: every window of data.unseen_path")
    data_sources = ("builtin", "folder")
    spatial_dims = 1
    image_batches = False

    def read_data(self, spec: DataSpec) -> SiloData:
        """Loads the built-in domain ``spec.domain`` or the folder ``spec.path`` (see the class doc).

        Raises:
            ValueError: On bad options (e.g. a folder without ``species``) or a malformed file.
            FileNotFoundError: If the folder or its files do not exist.
        """
        from fedsilo.models import sensor_data as sd

        if spec.source == "builtin":
            scfg = sd.SyntheticSensorConfig.from_mapping({"seed": spec.seed, **spec.options})
            unseen = sd.sensor_unseen(scfg, spec.domain) if scfg.n_unseen else None
            return SiloData(splits=sd.sensor_silo_splits(scfg, spec.domain), unseen=unseen)
        options = dict(spec.options)
        unseen_species = options.pop("unseen_species", None)
        if "species" not in options:
            raise ValueError("task 'sensor-activity': folder data needs the species of its windows, "
                             "e.g. [data] options species = \"sheep\"")
        fcfg = sd.SensorFolderConfig.from_mapping({"path": str(spec.path), "seed": spec.seed, **options})
        unseen = None
        if spec.unseen_path is not None:
            ucfg = sd.SensorFolderConfig.from_mapping({
                **fcfg.to_mapping(), "path": str(spec.unseen_path),
                "species": unseen_species if unseen_species is not None else fcfg.species})
            parts = sd.load_sensor_folder(ucfg)
            unseen = sd.SensorDataset(*_pool(parts), ucfg.species)
        return SiloData(splits=sd.load_sensor_folder(fcfg), unseen=unseen)

    def group_of(self, data: SiloData) -> str | None:
        """The species of the silo's training set (``data.splits.train.species``): one species, one group."""
        return str(data.splits.train.species)

    def model_config(self, config: Mapping[str, Any] | SensorNetConfig) -> SensorNetConfig:
        """Parses a :class:`~fedsilo.models.sensor_net.SensorNetConfig` (a parsed one is returned as is).

        Raises:
            ValueError: Naming a bad or unknown key.
        """
        from fedsilo.models.sensor_net import SensorNetConfig

        return parsed_config(config, SensorNetConfig)

    def default_model_config(self, seed: int = 0) -> dict[str, Any]:
        """The default network (built-in species, channels (32, 64), kernel 5, rank 4, SBN) with weights from ``seed``."""
        return {"seed": seed}

    def build_model(self, config: Mapping[str, Any] | SensorNetConfig) -> nn.Module:
        """:func:`~fedsilo.models.sensor_net.build_sensor_net` of the parsed config.

        Under a record-level DP plan the run passes the model through ``make_private_compatible``:
        with ``norm = "sgn"`` it is used as is; with ``"sbn"`` Opacus' fix swaps every species'
        BatchNorm for a GroupNorm (``min(32, C)`` groups, weight 1, bias 0), which the network then
        applies per example like ``"sgn"``. Write ``norm = "sgn"`` for DP runs to choose the groups.

        Raises:
            ValueError: On a bad config.
        """
        from fedsilo.models.sensor_net import build_sensor_net

        return build_sensor_net(self.model_config(config))

    def collate(self, dataset: Dataset[Any], indices: Sequence[int], device: torch.device) -> tuple[Any, Any]:
        """:func:`~fedsilo.models.sensor_data.collate_sensor`: ``(SensorInputs(x, species_idx, names), labels)``."""
        from fedsilo.models.sensor_data import collate_sensor

        return collate_sensor(dataset, indices, device)

    def forward(self, model: nn.Module, inputs: Any) -> Any:
        """``model(inputs)``: the network reads the windows and their species from the :class:`SensorInputs`."""
        return model(inputs)

    def loss(self, output: Any, target: Any) -> torch.Tensor:
        """Cross-entropy of logits ``[N, K]`` and labels ``[N]``, averaged over the batch."""
        from torch.nn import functional

        return functional.cross_entropy(output, target)

    def evaluate(self, model: nn.Module, dataset: Dataset[Any], *, batch_size: int = 16) -> dict[str, tuple[float, int]]:
        """Accuracy and macro-F1 (:func:`~fedsilo.models.metrics.accuracy_and_macro_f1`) of the argmax prediction over ``dataset``.

        Raises:
            ValueError: On an empty dataset or a bad batch size.
        """
        from fedsilo.models.sensor_data import collate_sensor
        from fedsilo.models.metrics import classification_scores

        return classification_scores(model, dataset, collate=collate_sensor, batch_size=batch_size)


def _pool(parts: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows and labels of every split of ``parts`` (train, val, test), concatenated."""
    import torch

    sets = [parts.train, parts.val, parts.test]
    return torch.cat([s.windows for s in sets]), torch.cat([s.labels for s in sets])
