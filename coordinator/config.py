"""The coordinator's run configuration (``federation.toml``), validated before anything starts."""

from __future__ import annotations

import enum
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsilo.core import validators
from fedsilo.core.configfile import ConfigError, TlsFiles
from fedsilo.core.metrics_endpoint import MetricsConfig
from fedsilo.core.methods import DEFAULT_METHOD, Method, UnknownMethod, get_method, method_names
from fedsilo.privacy.accounting import BudgetAccountant


#: The largest training-set size a silo may declare (and so the largest upload weight).
MAX_DECLARED_EXAMPLES = 10**9

#: The Task of a run that names none: today's 2-D segmentation.
DEFAULT_TASK = "segmentation-2d"


class AggregationMode(enum.Enum):
    """How the coordinator adds up uploads."""

    #: Homomorphic: silos upload ciphertexts; the coordinator adds them without any key.
    HE = "he"
    #: Plaintext: the coordinator sees every update. Only where the coordinator is trusted.
    PLAIN = "plain"


class FailedRoundPolicy(enum.Enum):
    """What a run does once a round is marked failed (its aggregate was unusable; nobody applies it)."""

    #: Go on with the next round, from the last good aggregate.
    CONTINUE = "continue"
    #: End the run as failed, naming the round.
    STOP = "stop"


@dataclass(frozen=True, kw_only=True)
class FederationConfig:
    """Everything the coordinator needs to run one federation.

    Attributes:
        run_id: identifier of the run, 1..64 chars of [A-Za-z0-9._-].
        silos: enrolled silo names (certificate common names), at least one, unique.
        rounds: number of rounds, 1..100000.
        min_silos: quorum: a round closes after its deadline once this many uploads are in.
        round_deadline_s: seconds a round stays open for uploads, > 0.
        quorum_timeout_s: after the deadline, seconds to wait for quorum before the run fails.
        start_grace_s: once ``min_silos`` have joined, seconds to wait for the rest before round 1.
        strategy: the registered method (``fedsilo.core.methods``) that decides what silos share.
        task: the registered Task of the run (``fedsilo.models.tasks``: data, model, loss, metrics),
            validated by the agents, which hold the Tasks (the coordinator never builds a model).
        model_fingerprint: the study's pin of the model every silo must build (``[run]
            model_fingerprint``, 64 hex; ``fedsilo pin-model`` prints it); None: the first silo to join
            decides the model, which is loudly warned. Set together with ``shared_tensors_sha256``.
        shared_tensors_sha256: the pin of the shared-tensor manifest (``Manifest.digest()``: SHA-256 of
            its canonical JSON); set exactly when ``model_fingerprint`` is.
        aggregation: how uploads are added up (homomorphic by default).
        on_failed_round: what the run does once a round is marked failed (``run.on_failed_round``).
        he: HE parameters (``fedsilo.privacy.he.HeParams`` fields); defaults when empty.
        listen: host:port the gRPC server binds.
        state_dir: SQLite database, checkpoints, logs.
        tls: CA, certificate and key of the coordinator; None only when ``insecure``.
        insecure: plaintext gRPC without TLS (development only; loudly warned).
        max_upload_bytes: largest accepted upload payload.
        max_chunk_bytes: largest accepted chunk of an upload stream (<= 4 MiB).
        stall_timeout_s: a call waiting longer than this on one message from (or to) its peer is cut
            (>= 1 s; ``fedsilo.coordinator.limits``). An operational setting, not part of the run.
        min_transfer_bytes_per_s: a transfer averaging fewer bytes a second, after its first
            ``stall_timeout_s`` of waiting on the peer, is cut; 0 switches the rule off.
        max_calls_per_identity: calls one silo (or admin) may hold at once, of any kind (4..1024);
            the worker pool is sized from it.
        model: model config handed to silos (validated by the agents, which build the model).
        training: local-training config handed to silos.
        tables: the method's own config tables by name (the method declares them and their parsers
            in ``Method.tables``; a table the method needs is filled with its defaults), each a plain
            mapping that GetRun hands the silos.
        privacy: the run's differential-privacy plan (``fedsilo.privacy.plan.PrivacyPlan``);
            None (the default) means no differential privacy, which is loudly warned.
        budgets: ε budgets agreed with enrolled silos (name -> ε at ``privacy.delta``); the
            coordinator refuses to start a run whose planned spend exceeds one of them.
        accountant: whose ε the plan's targets were calibrated against and ``budgets`` are
            checked with (``[privacy] accountant``); each silo's own setting governs its own budget.
        train_examples: training-set sizes the study expects of silos (name -> n, ``[silos]
            train_examples``); a silo that declares another size at join is refused.
        max_train_examples: the largest training-set size a silo may declare at join (``[silos]
            max_train_examples``); None: up to 10^9. An upload's weight is the size its silo declared
            (1 under silo-level DP), frozen once round 1 opens.
        metrics: where the Prometheus endpoint listens (``[metrics] listen``); None (the default): no
            endpoint. An operational setting, not part of the run.
    """

    run_id: str
    silos: tuple[str, ...]
    rounds: int
    min_silos: int
    round_deadline_s: float = 300.0
    quorum_timeout_s: float = 3600.0
    start_grace_s: float = 30.0
    strategy: str = DEFAULT_METHOD
    task: str = DEFAULT_TASK
    model_fingerprint: str | None = None
    shared_tensors_sha256: str | None = None
    aggregation: AggregationMode = AggregationMode.HE
    on_failed_round: FailedRoundPolicy = FailedRoundPolicy.CONTINUE
    listen: str = "0.0.0.0:50051"
    state_dir: Path = Path("coordinator-state")
    tls: TlsFiles | None = None
    insecure: bool = False
    max_upload_bytes: int = 4 * 2**30
    max_chunk_bytes: int = 2**20
    stall_timeout_s: float = 30.0
    min_transfer_bytes_per_s: int = 16 * 1024
    max_calls_per_identity: int = 8
    model: Mapping[str, Any] = field(default_factory=dict)
    training: Mapping[str, Any] = field(default_factory=dict)
    he: Mapping[str, Any] = field(default_factory=dict)
    tables: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    privacy: Any = None  # fedsilo.privacy.plan.PrivacyPlan | None
    budgets: Mapping[str, float] = field(default_factory=dict)
    accountant: BudgetAccountant = BudgetAccountant.RDP
    train_examples: Mapping[str, int] = field(default_factory=dict)
    max_train_examples: int | None = None
    metrics: MetricsConfig | None = None

    def __post_init__(self) -> None:
        validators.run_id("run.id", self.run_id, error=ConfigError)
        if not self.silos:
            raise ConfigError("silos.enrolled: at least one silo must be enrolled")
        for s in self.silos:
            validators.silo_name("silos.enrolled", s, error=ConfigError)
        if len(set(self.silos)) != len(self.silos):
            raise ConfigError(f"silos.enrolled: duplicate names in {list(self.silos)}")
        self._check_sizes()
        _int_in("run.rounds", self.rounds, 1, 100_000)
        _int_in("run.min_silos", self.min_silos, 1, len(self.silos))
        _positive("run.round_deadline_s", self.round_deadline_s)
        _positive("run.quorum_timeout_s", self.quorum_timeout_s)
        _non_negative("run.start_grace_s", self.start_grace_s)
        try:
            method = get_method(self.strategy)
        except UnknownMethod as exc:
            raise ConfigError(f"run.strategy: {exc}") from None
        if not isinstance(self.aggregation, AggregationMode):
            raise ConfigError(f"run.aggregation: {self.aggregation!r} is not an AggregationMode")
        if not isinstance(self.on_failed_round, FailedRoundPolicy):
            raise ConfigError(f"run.on_failed_round: {self.on_failed_round!r} is not a FailedRoundPolicy")
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"server.listen: {self.listen!r} is not host:port")
        if self.tls is None and not self.insecure:
            raise ConfigError("server.tls: ca, cert and key are required unless server.insecure = true")
        _int_in("server.max_upload_bytes", self.max_upload_bytes, 1, 2**40)
        _int_in("server.max_chunk_bytes", self.max_chunk_bytes, 1024, 4 * 2**20)
        _positive("server.stall_timeout_s", self.stall_timeout_s)
        if self.stall_timeout_s < 1:
            raise ConfigError(f"server.stall_timeout_s: {self.stall_timeout_s!r} must be at least 1 (seconds)")
        _int_in("server.min_transfer_bytes_per_s", self.min_transfer_bytes_per_s, 0, 2**30)
        _int_in("server.max_calls_per_identity", self.max_calls_per_identity, 4, 1024)
        self._check_metrics()
        for name in ("model", "training", "he"):
            _check_json_table(name, getattr(self, name))
        if not validators.is_task_name(self.task):
            raise ConfigError(f"run.task: {self.task!r} is not a Task name (lowercase words joined by '-')")
        self._check_model_pin()
        name = self.strategy
        object.__setattr__(self, "tables", parse_tables(method, self.tables))
        if method.needs_he and self.aggregation is not AggregationMode.HE:
            raise ConfigError(f"run.strategy: {name!r} needs run.aggregation = 'he': {method.needs_he}")
        fewest, why = method.min_silos
        if len(self.silos) < fewest:
            raise ConfigError(f"run.strategy: {name!r} needs at least {fewest} enrolled silos ({why})")
        try:
            method.check_run(self)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.aggregation is AggregationMode.HE:
            self.he_params()  # validates the [he] table now, naming the bad field
            if self.insecure:
                raise ConfigError("run.aggregation: 'he' needs TLS certificates (the key ceremony signs with them); "
                                  "use aggregation = 'plain' with server.insecure")
        self._check_privacy()

    def _check_metrics(self) -> None:
        """The metrics endpoint: a ``MetricsConfig`` or None, never the gRPC server's own address."""
        if self.metrics is None:
            return
        if not isinstance(self.metrics, MetricsConfig):
            raise ConfigError(f"metrics: {self.metrics!r} is not a MetricsConfig")
        host, _, port = self.listen.rpartition(":")
        wildcards = {"0.0.0.0", "[::]", "::", ""}
        if self.metrics.port != 0 and self.metrics.port == int(port) and (
                host == self.metrics.listen.rpartition(":")[0] or {host, self.metrics.host} & wildcards):
            raise ConfigError(f"metrics.listen: {self.metrics.listen!r} takes server.listen's port ({self.listen!r}); "
                              "give the metrics endpoint a port of its own")

    def _check_sizes(self) -> None:
        """The study's bounds on declared training-set sizes: enrolled names, whole numbers in range."""
        if self.max_train_examples is not None:
            _int_in("silos.max_train_examples", self.max_train_examples, 1, MAX_DECLARED_EXAMPLES)
        if not isinstance(self.train_examples, Mapping):
            raise ConfigError("silos.train_examples: must be a table of silo name = number of training examples")
        for name, n in self.train_examples.items():
            if name not in self.silos:
                raise ConfigError(f"silos.train_examples.{name}: not an enrolled silo")
            _int_in(f"silos.train_examples.{name}", n, 1, self.max_train_examples or MAX_DECLARED_EXAMPLES)

    def declared_size_error(self, silo: str, n: int) -> str | None:
        """Why silo ``silo`` may not declare ``n`` training examples under this config (None: it may)."""
        want = self.train_examples.get(silo)
        if want is not None and n != want:
            return f"silo {silo!r} declared {n} training examples; the study expects {want} (silos.train_examples)"
        top = self.max_train_examples or MAX_DECLARED_EXAMPLES
        if not 1 <= n <= top:
            return f"num_train_examples {n} is not in [1, {top}]" + (
                " (silos.max_train_examples)" if self.max_train_examples else "")
        return None

    def _check_model_pin(self) -> None:
        """The study's model pin: both digests or neither, each 64 lowercase hex characters."""
        pins = {"run.model_fingerprint": self.model_fingerprint,
                "run.shared_tensors_sha256": self.shared_tensors_sha256}
        for key, value in pins.items():
            if value is not None and not validators.is_hex64(value):
                raise ConfigError(f"{key}: {value!r} must be 64 lowercase hex characters (a SHA-256 digest, "
                                  "as `fedsilo pin-model` prints it)")
        for key, value in pins.items():
            if value is None and any(v is not None for v in pins.values()):
                raise ConfigError(f"{key}: missing: pin model_fingerprint and shared_tensors_sha256 together "
                                  "(`fedsilo pin-model` prints both)")

    def _check_privacy(self) -> None:
        from fedsilo.privacy.plan import PrivacyPlan

        if not isinstance(self.accountant, BudgetAccountant):
            raise ConfigError(f"privacy.accountant: {self.accountant!r} is not one of "
                              + ", ".join(repr(a.value) for a in BudgetAccountant))
        plan = self.privacy
        if plan is None:
            if self.budgets:
                raise ConfigError("privacy.budgets: budgets are set but the run has no [privacy] plan")
            return
        if not isinstance(plan, PrivacyPlan):
            raise ConfigError(f"privacy: {plan!r} is not a PrivacyPlan")
        method = self.method
        if plan.has_extra_releases and not method.privacy_keys:
            raise ConfigError(f"privacy.fisher_noise_multiplier: set, but run.strategy {self.strategy!r} "
                              "plans no release of its own")
        try:
            method.check_privacy(plan, self)
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for level, why in method.refuses.items():
            if getattr(plan, level.value):
                raise ConfigError(f"privacy.{level.value}: not supported with run.strategy {self.strategy!r}: {why}")
        if self.tls is None:
            raise ConfigError("privacy: differential privacy needs TLS certificates (silos sign their privacy ledgers "
                              "with them); remove server.insecure")
        if not plan.enabled:
            raise ConfigError("privacy: neither record_level nor silo_level is on; remove the [privacy] section "
                              "to run without differential privacy")
        if plan.silo_level and not plan.delta < 1.0 / len(self.silos):
            raise ConfigError(f"privacy.delta: {plan.delta!r} must be < 1/n = 1/{len(self.silos)} enrolled silos "
                              "(silo-level: a mechanism that publishes one whole silo outright is (0, 1/n)-DP)")
        if plan.noise_shares > 1:
            if self.aggregation is not AggregationMode.HE:
                raise ConfigError("privacy.distributed_noise: splitting the noise into shares needs "
                                  "run.aggregation = 'he' (the coordinator would see each weakly noised upload)")
            if plan.noise_shares > self.min_silos:
                raise ConfigError(f"privacy.distributed_noise: {plan.noise_shares} shares need at least that many "
                                  f"uploads per round, but run.min_silos is {self.min_silos}")
        for name, eps in self.budgets.items():
            if name not in self.silos:
                raise ConfigError(f"privacy.budgets.{name}: not an enrolled silo")
            if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
                raise ConfigError(f"privacy.budgets.{name}: {eps!r} must be a finite ε > 0")

    @property
    def method(self) -> type[Method]:
        """The run's registered method (what silos share, the upload layout, DP levels, relays)."""
        return get_method(self.strategy)

    @property
    def key_holder(self) -> str:
        """The silo that generates the run's HE secret key: the first enrolled one."""
        return self.silos[0]

    def he_params(self):  # -> fedsilo.privacy.he.HeParams (imported lazily: plain runs need no TenSEAL)
        """The run's HE parameters.

        Raises:
            ConfigError: an invalid or insecure [he] table, naming the field.
        """
        from fedsilo.privacy.he import HeParams, HeScheme

        kwargs = dict(self.he)
        try:
            if "scheme" in kwargs:
                kwargs["scheme"] = HeScheme(kwargs["scheme"])
            if isinstance(kwargs.get("coeff_modulus_bits"), list):
                kwargs["coeff_modulus_bits"] = tuple(kwargs["coeff_modulus_bits"])
            return HeParams(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"he: {exc} (see fedsilo.privacy.he.HeParams for the fields)") from None
        except ValueError as exc:
            raise ConfigError(f"he: {exc}") from None

    def run_fingerprint(self) -> str:
        """SHA-256 of the settings that define the run; a restart must present the same one.

        Operational settings (listen address, TLS files, deadlines, limits) may change across
        restarts; the run identity, enrolled silos, rounds, strategy and model may not.
        """
        ident = {
            "run_id": self.run_id,
            "silos": list(self.silos),
            "rounds": self.rounds,
            "strategy": self.strategy,
            **({"task": self.task} if self.task != DEFAULT_TASK else {}),  # earlier runs' fingerprints stay
            "aggregation": self.aggregation.value,
            "model": dict(self.model),
            "training": dict(self.training),
            "he": dict(self.he),
        }
        for name, table in sorted(self.tables.items()):
            if table:  # absent or empty tables keep fingerprints of earlier runs unchanged
                ident[name] = dict(table)
        if self.privacy is not None:
            ident["privacy"] = self.privacy.to_mapping()
        if self.model_fingerprint is not None:  # set only: earlier runs' fingerprints stay
            ident["model_pin"] = [self.model_fingerprint, self.shared_tensors_sha256]
        if self.train_examples:  # set only: earlier runs' fingerprints stay
            ident["train_examples"] = dict(sorted(self.train_examples.items()))
        if self.max_train_examples is not None:
            ident["max_train_examples"] = self.max_train_examples
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def parse_tables(method: type[Method], tables: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A run's method tables checked against ``method``: each one it reads, parsed by its parser (defaults
    filled in for those it needs); one it does not read is refused, naming the methods that do.

    Raises:
        ConfigError: naming the table (or its bad key).
    """
    out: dict[str, dict[str, Any]] = {}
    for name, table in tables.items():
        if name not in method.tables:
            users = ", ".join(m.name for m in methods_with(lambda m: name in m.tables)) or "none"
            raise ConfigError(f"{name}: set, but run.strategy {method.name!r} does not read a [{name}] table "
                              f"(used by {users})")
        _check_json_table(name, table)
    for name in sorted(set(tables) | set(method.default_tables)):
        parser = method.tables[name]
        raw = dict(tables.get(name, {}))
        try:
            out[name] = dict(parser(raw)) if parser is not None else raw
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    return out


def _check_json_table(name: str, value: Any) -> None:
    """Raises ConfigError unless ``value`` is a table (mapping) that JSON can carry to the silos."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name}: must be a table, got {type(value).__name__}")
    try:
        json.dumps(dict(value))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: not representable as JSON ({exc})") from None


def method_tables() -> set[str]:
    """Every config table some registered method reads."""
    return {name for n in method_names() for name in get_method(n).tables}


def method_privacy_keys() -> set[str]:
    return {k for n in method_names() for k in get_method(n).privacy_keys}


def methods_with(rule) -> list[type[Method]]:  # noqa: ANN001 - a predicate on method classes
    """Registered methods for which ``rule`` holds (names in refusals derive from the registry)."""
    return [get_method(n) for n in method_names() if rule(get_method(n))]


def _int_in(name: str, value: Any, lo: int, hi: int) -> None:
    validators.int_in(name, value, lo, hi, error=ConfigError)


def _positive(name: str, value: Any) -> None:
    validators.positive(name, value, error=ConfigError)


def _non_negative(name: str, value: Any) -> None:
    validators.non_negative(name, value, error=ConfigError)
