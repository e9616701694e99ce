"""The silo agent's configuration (``silo.toml``), validated before it dials anyone."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsilo.core import validators
from fedsilo.core.configfile import ConfigError, TlsFiles
from fedsilo.core.configfile import check_keys, parse_enum, read_toml, resolve_path, tls_files
from fedsilo.core.metrics_endpoint import MetricsConfig, parse_metrics
from fedsilo.privacy.accounting import BudgetAccountant
from fedsilo.models.precision import Precision


class DataSource(enum.Enum):
    """Where a silo's images come from."""

    BUILTIN = "builtin"
    FOLDER = "folder"


class DeviceKind(enum.Enum):
    """Which kind of device a silo trains and evaluates on (``[agent] device``)."""

    AUTO = "auto"  # CUDA device 0 when this process can use CUDA, else the CPU
    CPU = "cpu"
    CUDA = "cuda"  # the current CUDA device, or device ``index``


@dataclass(frozen=True, kw_only=True)
class DeviceSetting:
    """The agent's ``device``: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Only the spelling is checked here (the config loads without torch); whether this process
    can use the device is checked when the agent starts (``Agent.run``).

    Attributes:
        kind: auto, CPU or CUDA.
        index: CUDA only: the device number N of ``"cuda:N"``; None is the current CUDA device.
    """

    kind: DeviceKind = DeviceKind.CPU
    index: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, DeviceKind):
            raise ConfigError(f"agent.device: {self.kind!r} is not a DeviceKind")
        if self.index is not None and (
            self.kind is not DeviceKind.CUDA or isinstance(self.index, bool) or not isinstance(self.index, int)
            or not 0 <= self.index <= 4095
        ):
            raise ConfigError(f"agent.device: index {self.index!r} needs kind 'cuda' and an integer in [0, 4095]")

    @classmethod
    def parse(cls, text: Any) -> DeviceSetting:
        """Parses ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (N a decimal integer >= 0).

        Raises:
            ConfigError: naming ``agent.device`` and the bad value.
        """
        want = "must be 'auto', 'cpu', 'cuda' or 'cuda:N' (N an integer >= 0)"
        if not isinstance(text, str):
            raise ConfigError(f"agent.device: {text!r} {want}")
        kind, sep, number = text.partition(":")
        try:
            parsed = DeviceKind(kind)
        except ValueError:
            raise ConfigError(f"agent.device: {text!r} {want}") from None
        if not sep:
            return cls(kind=parsed)
        if parsed is not DeviceKind.CUDA or not number.isascii() or not number.isdigit() or len(number) > 4:
            raise ConfigError(f"agent.device: {text!r} {want}")
        return cls(kind=parsed, index=int(number))

    def __str__(self) -> str:
        return self.kind.value if self.index is None else f"{self.kind.value}:{self.index}"


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """A silo's data.

    Attributes:
        source: the built-in multi-domain generator, or a folder / datalist JSON.
        domain: built-in only: which scanner domain this silo holds (0-based).
        seed: seed of the generator and of the train/validation/test split.
        path: folder only: a folder with images/ and masks/ (or labels/), or a datalist JSON.
        options: further settings passed to the data loader (e.g. image_size, n_train).
        unseen_path: folder only: a folder (or datalist) of a domain no silo trains on; every
            image in it is used to evaluate the final model's generalisation (``unseen_dice``).
    """

    source: DataSource = DataSource.BUILTIN
    domain: int = 0
    seed: int = 0
    path: Path | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    unseen_path: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.source, DataSource):
            raise ConfigError(f"data.source: {self.source!r} is not a DataSource")
        if isinstance(self.domain, bool) or not isinstance(self.domain, int) or self.domain < 0:
            raise ConfigError(f"data.domain: {self.domain!r} must be an integer >= 0")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"data.seed: {self.seed!r} must be an integer >= 0")
        if self.source is DataSource.FOLDER and self.path is None:
            raise ConfigError("data.path: required when data.source = 'folder'")
        if self.unseen_path is not None and self.source is not DataSource.FOLDER:
            raise ConfigError("data.unseen_path: only with data.source = 'folder' (the built-in data has its own "
                              "unseen domain)")


@dataclass(frozen=True, kw_only=True)
class BudgetConfig:
    """This hospital's privacy budget: the most ε it will ever spend, at δ.

    The budget bounds the cumulative ε of each neighbouring relation separately (record-level
    and silo-level are never added up), against anyone who sees this silo's uploads, over
    every run this state directory's ledger has recorded. The agent declines a round that
    would take it over the budget.

    Attributes:
        epsilon: ε_max, a finite number > 0.
        delta: δ every ε of this silo is stated at, in (0, 1); the agent also refuses δ ≥ 1/n
            for n training records when the run has record-level DP.
        accountant: Whose ε the budget is enforced on: ``"rdp"`` (the default) or ``"pld"``
            (tighter, so more rounds fit). Every ledger entry states both either way, and
            says which one governed.
    """

    epsilon: float
    delta: float = 1e-5
    accountant: BudgetAccountant = BudgetAccountant.RDP

    def __post_init__(self) -> None:
        import math

        if not isinstance(self.accountant, BudgetAccountant):
            object.__setattr__(self, "accountant", parse_enum(BudgetAccountant, "privacy.accountant", self.accountant))

        for name, ok in (("epsilon", lambda v: math.isfinite(v) and v > 0), ("delta", lambda v: 0 < v < 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
                want = "a finite number > 0" if name == "epsilon" else "a number in (0, 1)"
                raise ConfigError(f"privacy.{name}: {v!r} must be {want}")


MAX_GROUP = 64  # agent.gpus and agent.nodes


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """Everything a silo agent needs.

    Attributes:
        coordinator: host:port of the coordinator.
        state_dir: the agent's checkpoint, state and log.
        tls: CA, this silo's certificate and key; None only when ``insecure``.
        insecure: plaintext gRPC (development only; loudly warned).
        name: the silo's name; only used in insecure mode, where there is no certificate.
        threads: torch CPU threads (0 = torch's default).
        device: where local training and evaluation run (a ``DeviceSetting``, or its string,
            e.g. ``"cuda:1"``); the default, the CPU, is bit-reproducible. The model is moved there
            for training and evaluation only: the agent's state, uploads, HE and the strategy's
            tensors stay on the CPU.
        precision: non-private local training's forward pass and loss: ``Precision.FP32`` (the
            default) or ``Precision.BF16`` (``torch.autocast`` to bfloat16; faster on GPUs with
            bf16 units, close to but not equal to float32). DP-SGD always runs in float32.
        gpus: training processes on each node (one per GPU; with ``device = "cpu"``, CPU
            processes over gloo, for testing). More than one (or ``nodes`` > 1) makes ``fedsilo
            agent`` start itself under ``torchrun``: rank 0 is the agent (it alone talks to the
            coordinator and holds HE keys, the ledger and the checkpoint), every rank trains its
            share of each batch (data-parallel; ``fedsilo.models.parallel``).
        nodes: machines of the training group; each runs ``fedsilo agent --node-rank K`` with the
            same config and the same data, node 0 being the agent's.
        master: ``host:port`` of node 0 for the group's rendezvous; required when ``nodes`` > 1.
        data: the silo's data.
        heartbeat_s: seconds between heartbeats.
        budget: this silo's privacy budget; required to take part in a run with DP.
        base_checkpoint: LoRA runs: the frozen base model (a ``fedsilo export`` or ``fedsilo
            pretrain`` file); every silo of the run must hold the same one.
        metrics: where the agent's Prometheus endpoint listens (``[metrics] listen``); None (the
            default): no endpoint.
    """

    coordinator: str
    state_dir: Path
    tls: TlsFiles | None = None
    insecure: bool = False
    name: str | None = None
    threads: int = 0
    device: DeviceSetting = field(default_factory=DeviceSetting)
    precision: Precision = Precision.FP32
    gpus: int = 1
    nodes: int = 1
    master: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    heartbeat_s: float = 5.0
    budget: BudgetConfig | None = None
    base_checkpoint: Path | None = None
    metrics: MetricsConfig | None = None

    def __post_init__(self) -> None:
        host, sep, port = self.coordinator.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"agent.coordinator: {self.coordinator!r} is not host:port")
        if self.tls is None and not self.insecure:
            raise ConfigError("tls: ca, cert and key are required unless agent.insecure = true")
        if self.insecure and (self.name is None or not validators.is_silo_name(self.name)):
            raise ConfigError(f"agent.name: insecure mode needs a valid silo name, got {self.name!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or not 0 <= self.threads <= 256:
            raise ConfigError(f"agent.threads: {self.threads!r} must be an integer in [0, 256]")
        if not isinstance(self.device, DeviceSetting):
            object.__setattr__(self, "device", DeviceSetting.parse(self.device))
        if not isinstance(self.precision, Precision):
            object.__setattr__(self, "precision", parse_enum(Precision, "agent.precision", self.precision))
        for key in ("gpus", "nodes"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_GROUP:
                raise ConfigError(f"agent.{key}: {value!r} must be an integer in [1, {MAX_GROUP}]")
        if self.gpus > 1 and self.device.index is not None:
            raise ConfigError(f"agent.device: {str(self.device)!r} names one GPU, but agent.gpus = {self.gpus}: use "
                              "'cuda' (or 'auto'); rank r trains on GPU r of its node")
        if self.nodes > 1:
            host, sep, port = (self.master if isinstance(self.master, str) else "").rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"agent.master: {self.master!r} must be host:port of node 0 when agent.nodes = "
                                  f"{self.nodes}")
        elif self.master is not None:
            raise ConfigError(f"agent.master: {self.master!r} is only used with agent.nodes > 1")
        if not isinstance(self.heartbeat_s, (int, float)) or not 0.1 <= self.heartbeat_s <= 300:
            raise ConfigError(f"agent.heartbeat_s: {self.heartbeat_s!r} must be in [0.1, 300]")
        if self.metrics is not None and not isinstance(self.metrics, MetricsConfig):
            raise ConfigError(f"metrics: {self.metrics!r} is not a MetricsConfig")

    @property
    def group_size(self) -> int:
        """The processes that train each round: ``gpus`` × ``nodes`` (1: the agent alone)."""
        return self.gpus * self.nodes


_SECTIONS = {
    "agent": {"coordinator", "state_dir", "insecure", "name", "threads", "device", "precision", "gpus", "nodes", "master",
              "heartbeat_s"},
    "tls": {"ca", "cert", "key"},
    "data": None,
    "privacy": {"epsilon", "delta", "accountant"},
    "model": {"base_checkpoint"},
    "metrics": {"listen"},
}


def load_agent_config(path: Path | str) -> AgentConfig:
    """Loads and validates ``silo.toml``; relative paths resolve against its folder.

    Raises:
        ConfigError: naming the bad field.
    """
    path = Path(path)
    data = read_toml(path)
    check_keys(data, _SECTIONS, str(path))
    agent = data.get("agent", {})
    base = path.parent
    for key in ("coordinator", "state_dir"):
        if key not in agent:
            raise ConfigError(f"agent.{key}: missing")
        if not isinstance(agent[key], str):
            raise ConfigError(f"agent.{key}: {agent[key]!r} must be a string")
    insecure = agent.get("insecure", False)
    if not isinstance(insecure, bool):
        raise ConfigError(f"agent.insecure: {insecure!r} must be true or false")
    tls = tls_files(data.get("tls", {}), "tls", base, insecure=insecure, insecure_key="agent.insecure")
    d = dict(data.get("data", {}))
    data_kwargs: dict[str, Any] = {}
    if "source" in d:
        data_kwargs["source"] = parse_enum(DataSource, "data.source", d.pop("source"))
    for key in ("domain", "seed"):
        if key in d:
            data_kwargs[key] = d.pop(key)
    for key in ("path", "unseen_path"):
        if key in d:
            data_kwargs[key] = resolve_path(base, d.pop(key), f"data.{key}")
    data_kwargs["options"] = d
    kwargs: dict[str, Any] = {
        "coordinator": agent["coordinator"],
        "state_dir": resolve_path(base, agent["state_dir"], "agent.state_dir"),
        "tls": tls,
        "insecure": insecure,
        "data": DataConfig(**data_kwargs),
    }
    for key in ("name", "threads", "precision", "gpus", "nodes", "master", "heartbeat_s"):
        if key in agent:
            kwargs[key] = agent[key]
    if "device" in agent:
        kwargs["device"] = DeviceSetting.parse(agent["device"])
    if "base_checkpoint" in data.get("model", {}):
        kwargs["base_checkpoint"] = resolve_path(base, data["model"]["base_checkpoint"], "model.base_checkpoint")
    if "metrics" in data:
        kwargs["metrics"] = parse_metrics(data["metrics"])
    if "privacy" in data:
        p = data["privacy"]
        if "epsilon" not in p:
            raise ConfigError("privacy.epsilon: missing (this silo's ε budget)")
        kwargs["budget"] = BudgetConfig(**p)
    return AgentConfig(**kwargs)

