"""The coordinator's run configuration (``federation.toml``), validated before anything starts."""

from __future__ import annotations

import enum
import hashlib
import json
import re
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedsilo.core import validators
from fedsilo.core.methods import DEFAULT_METHOD, Method, UnknownMethod, get_method, method_names



class ConfigError(ValueError):
    """A config file or value is invalid; the message names the field."""


#: The Task of a run that names none: today's 2-D segmentation.
DEFAULT_TASK = "segmentation-2d"
_TASK_NAME_RE = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")


class AggregationMode(enum.Enum):
    """How the coordinator adds up uploads."""

    #: Homomorphic: silos upload ciphertexts; the coordinator adds them without any key.
    HE = "he"
    #: Plaintext: the coordinator sees every update. Only where the coordinator is trusted.
    PLAIN = "plain"


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    """PEM files for mutual TLS."""

    ca: Path
    cert: Path
    key: Path

    def check_exist(self, section: str) -> None:
        """Raises ConfigError naming the first missing file."""
        for f in fields(self):
            p = getattr(self, f.name)
            if not Path(p).is_file():
                raise ConfigError(f"{section}.{f.name}: file {p} does not exist")


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
        aggregation: how uploads are added up (homomorphic by default).
        he: HE parameters (``fedsilo.privacy.he.HeParams`` fields); defaults when empty.
        listen: host:port the gRPC server binds.
        state_dir: SQLite database, checkpoints, logs.
        tls: CA, certificate and key of the coordinator; None only when ``insecure``.
        insecure: plaintext gRPC without TLS (development only; loudly warned).
        max_upload_bytes: largest accepted upload payload.
        max_chunk_bytes: largest accepted chunk of an upload stream (<= 4 MiB).
        model: model config handed to silos (validated by the agents, which build the model).
        training: local-training config handed to silos.
        tables: the method's own config tables by name (the method declares them and their parsers
            in ``Method.tables``; a table the method needs is filled with its defaults), each a plain
            mapping that GetRun hands the silos.
        privacy: the run's differential-privacy plan (``fedsilo.privacy.plan.PrivacyPlan``);
            None (the default) means no differential privacy, which is loudly warned.
        budgets: ε budgets agreed with enrolled silos (name -> ε at ``privacy.delta``); the
            coordinator refuses to start a run whose planned spend exceeds one of them.
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
    aggregation: AggregationMode = AggregationMode.HE
    listen: str = "0.0.0.0:50051"
    state_dir: Path = Path("coordinator-state")
    tls: TlsFiles | None = None
    insecure: bool = False
    max_upload_bytes: int = 4 * 2**30
    max_chunk_bytes: int = 2**20
    model: Mapping[str, Any] = field(default_factory=dict)
    training: Mapping[str, Any] = field(default_factory=dict)
    he: Mapping[str, Any] = field(default_factory=dict)
    tables: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    privacy: Any = None  # fedsilo.privacy.plan.PrivacyPlan | None
    budgets: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validators.run_id("run.id", self.run_id, error=ConfigError)
        if not self.silos:
            raise ConfigError("silos.enrolled: at least one silo must be enrolled")
        for s in self.silos:
            validators.silo_name("silos.enrolled", s, error=ConfigError)
        if len(set(self.silos)) != len(self.silos):
            raise ConfigError(f"silos.enrolled: duplicate names in {list(self.silos)}")
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
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"server.listen: {self.listen!r} is not host:port")
        if self.tls is None and not self.insecure:
            raise ConfigError("server.tls: ca, cert and key are required unless server.insecure = true")
        _int_in("server.max_upload_bytes", self.max_upload_bytes, 1, 2**40)
        _int_in("server.max_chunk_bytes", self.max_chunk_bytes, 1024, 4 * 2**20)
        for name in ("model", "training", "he"):
            value = getattr(self, name)
            if not isinstance(value, Mapping):
                raise ConfigError(f"{name}: must be a table, got {type(value).__name__}")
            try:
                json.dumps(dict(value))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{name}: not representable as JSON ({exc})") from None
        if not isinstance(self.task, str) or not _TASK_NAME_RE.fullmatch(self.task):
            raise ConfigError(f"run.task: {self.task!r} is not a Task name (lowercase words joined by '-')")
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

    def _check_privacy(self) -> None:
        from fedsilo.privacy.plan import PrivacyPlan

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
            users = ", ".join(m.name for m in _methods_with(lambda m: name in m.tables)) or "none"
            raise ConfigError(f"{name}: set, but run.strategy {method.name!r} does not read a [{name}] table "
                              f"(used by {users})")
        if not isinstance(table, Mapping):
            raise ConfigError(f"{name}: must be a table, got {type(table).__name__}")
        try:
            json.dumps(dict(table))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{name}: not representable as JSON ({exc})") from None
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


def method_tables() -> set[str]:
    """Every config table some registered method reads."""
    return {name for n in method_names() for name in get_method(n).tables}


def _method_privacy_keys() -> set[str]:
    return {k for n in method_names() for k in get_method(n).privacy_keys}


def _methods_with(rule) -> list[type[Method]]:  # noqa: ANN001 - a predicate on method classes
    """Registered methods for which ``rule`` holds (names in refusals derive from the registry)."""
    return [get_method(n) for n in method_names() if rule(get_method(n))]


def _int_in(name: str, value: Any, lo: int, hi: int) -> None:
    validators.int_in(name, value, lo, hi, error=ConfigError)


def _positive(name: str, value: Any) -> None:
    validators.positive(name, value, error=ConfigError)


def _non_negative(name: str, value: Any) -> None:
    validators.non_negative(name, value, error=ConfigError)


_SECTIONS = {
    "run": {"id", "rounds", "min_silos", "round_deadline_s", "quorum_timeout_s", "start_grace_s", "strategy", "aggregation",
            "task"},
    "silos": {"enrolled"},
    "server": {"listen", "state_dir", "ca", "cert", "key", "insecure", "max_upload_bytes", "max_chunk_bytes"},
    "model": None,
    "training": None,
    "he": None,
    "privacy": {"record_level", "sample_rate", "steps_per_round", "max_grad_norm", "noise_multiplier",
                "target_epsilon", "silo_level", "update_clip_norm", "update_noise_multiplier",
                "update_target_epsilon", "distributed_noise", "delta", "budgets"},
}


def _sections() -> dict[str, set[str] | None]:
    """The config file's sections: the common ones, every registered method's tables, and the
    ``[privacy]`` keys registered methods add."""
    sections: dict[str, set[str] | None] = {**_SECTIONS, **{name: None for name in method_tables()}}
    sections["privacy"] = set(_SECTIONS["privacy"] or ()) | _method_privacy_keys()
    return sections


def parse_enum(enum_cls: type[enum.Enum], name: str, value: Any) -> Any:
    """Parses a config string into ``enum_cls``, naming the field and the choices on error."""
    try:
        return enum_cls(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in enum_cls)
        raise ConfigError(f"{name}: {value!r} is not one of {choices}") from None


def check_keys(data: Mapping[str, Any], sections: Mapping[str, set[str] | None], path: str) -> None:
    """Raises ConfigError for unknown sections or keys (typos must not pass silently)."""
    for sec, value in data.items():
        if sec not in sections:
            raise ConfigError(f"{path}: unknown section [{sec}] (expected one of {sorted(sections)})")
        allowed = sections[sec]
        if allowed is None:
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: [{sec}] must be a table")
        for key in value:
            if key not in allowed:
                raise ConfigError(f"{sec}.{key}: unknown key (expected one of {sorted(allowed)})")


def read_toml(path: Path) -> dict[str, Any]:
    """Reads a TOML file; ConfigError with the parser's message on a syntax error."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_federation_config(path: Path | str) -> FederationConfig:
    """Loads and validates ``federation.toml``; relative paths are resolved against its folder.

    Raises:
        ConfigError: naming the bad field.
    """
    path = Path(path)
    data = read_toml(path)
    check_keys(data, _sections(), str(path))
    run = data.get("run", {})
    server = data.get("server", {})
    base = path.parent
    for key in ("id", "rounds", "min_silos"):
        if key not in run:
            raise ConfigError(f"run.{key}: missing")
    if "enrolled" not in data.get("silos", {}):
        raise ConfigError("silos.enrolled: missing")
    enrolled = data["silos"]["enrolled"]
    if not isinstance(enrolled, list):
        raise ConfigError(f"silos.enrolled: must be a list of names, got {enrolled!r}")
    insecure = server.get("insecure", False)
    if not isinstance(insecure, bool):
        raise ConfigError(f"server.insecure: {insecure!r} must be true or false")
    tls = tls_files(server, "server", base, insecure=insecure, insecure_key="server.insecure")
    kwargs: dict[str, Any] = {
        "run_id": run["id"],
        "silos": tuple(enrolled),
        "rounds": run["rounds"],
        "min_silos": run["min_silos"],
        "insecure": insecure,
        "tls": tls,
        "model": data.get("model", {}),
        "training": data.get("training", {}),
        "he": data.get("he", {}),
    }
    for key in ("round_deadline_s", "quorum_timeout_s", "start_grace_s"):
        if key in run:
            kwargs[key] = run[key]
    if "task" in run:
        kwargs["task"] = run["task"]
    if "strategy" in run:
        if not isinstance(run["strategy"], str):
            raise ConfigError(f"run.strategy: {run['strategy']!r} must be a method name (one of {list(method_names())})")
        kwargs["strategy"] = run["strategy"]
    if "aggregation" in run:
        kwargs["aggregation"] = parse_enum(AggregationMode, "run.aggregation", run["aggregation"])
    if "listen" in server:
        if not isinstance(server["listen"], str):
            raise ConfigError(f"server.listen: {server['listen']!r} is not host:port")
        kwargs["listen"] = server["listen"]
    if "state_dir" in server:
        kwargs["state_dir"] = resolve_path(base, server["state_dir"], "server.state_dir")
    else:
        kwargs["state_dir"] = base / "coordinator-state"
    for key in ("max_upload_bytes", "max_chunk_bytes"):
        if key in server:
            kwargs[key] = server[key]
    strategy = kwargs.get("strategy", DEFAULT_METHOD)
    try:
        method = get_method(strategy)
    except UnknownMethod as exc:
        raise ConfigError(f"run.strategy: {exc}") from None
    kwargs["tables"] = parse_tables(method, {name: data[name] for name in method_tables() if name in data})
    if "privacy" in data:
        kwargs["privacy"], kwargs["budgets"] = parse_privacy(
            data["privacy"], rounds=run["rounds"], min_silos=run["min_silos"],
            aggregation=kwargs.get("aggregation", AggregationMode.HE), strategy=strategy, tables=kwargs["tables"])
    return FederationConfig(**kwargs)


def parse_privacy(table: Mapping[str, Any], *, rounds: Any, min_silos: Any,
                  aggregation: AggregationMode, strategy: str = DEFAULT_METHOD,
                  tables: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[Any, dict[str, float]]:
    """The ``[privacy]`` table as a `PrivacyPlan` plus the budgets; σ calibrated from targets.

    ``target_epsilon`` / ``update_target_epsilon`` (instead of ``noise_multiplier`` /
    ``update_noise_multiplier``) ask for the smallest σ whose whole-run ε (all ``rounds``,
    at ``delta``) is at most the target against anyone who sees one silo's upload — the
    figure silos' budgets are checked against; with distributed noise the aggregate's σ is
    then √min_silos times larger (and its ε lower). A method's own releases (its
    ``privacy_keys``, planned by ``Method.plan_privacy`` from its ``tables``) are part of the run's
    spend: a record-level target then covers them too, and DP-SGD gets what is left. ``distributed_noise``
    (HE runs only; default true there when silo-level is on) splits the silo-level noise
    into ``min_silos`` shares.

    Raises:
        ConfigError: naming the bad field.
    """
    from fedsilo.privacy.accounting import LEDGER_RDP_ORDERS, DpAccountingVerifier, calibrate_noise
    from fedsilo.privacy.plan import PrivacyPlan

    t = dict(table)
    budgets = t.pop("budgets", {})
    if not isinstance(budgets, Mapping):
        raise ConfigError("privacy.budgets: must be a table of silo name = ε")
    for flag in ("record_level", "silo_level", "distributed_noise"):
        if flag in t and not isinstance(t[flag], bool):
            raise ConfigError(f"privacy.{flag}: {t[flag]!r} must be true or false")
    record, silo = t.get("record_level", False), t.get("silo_level", False)
    distributed = t.pop("distributed_noise", silo and aggregation is AggregationMode.HE)
    if distributed and not silo:
        raise ConfigError("privacy.distributed_noise: only silo-level noise can be distributed; set silo_level = true")
    if distributed and aggregation is not AggregationMode.HE:
        raise ConfigError("privacy.distributed_noise: needs run.aggregation = 'he' (with plaintext aggregation the "
                          "coordinator would see each weakly noised upload)")
    delta = t.get("delta", 1e-5)
    validators.probability("privacy.delta", delta, error=ConfigError)
    accountant = DpAccountingVerifier(orders=LEDGER_RDP_ORDERS)
    try:
        method = get_method(strategy)
    except UnknownMethod as exc:
        raise ConfigError(f"run.strategy: {exc}") from None
    foreign = [k for k in t if k in _method_privacy_keys() and k not in method.privacy_keys]
    if foreign:
        users = " or ".join(m.name for m in _methods_with(lambda m: foreign[0] in m.privacy_keys))
        raise ConfigError(f"privacy.{foreign[0]}: set, but run.strategy {strategy!r} plans no release it configures "
                          f"(it belongs to {users})")
    try:
        fixed = method.plan_privacy(t, parse_tables(method, tables or {}), record=record, rounds=rounds)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for target, sigma, on, q_key, steps in (
        ("target_epsilon", "noise_multiplier", record, "sample_rate", "steps_per_round"),
        ("update_target_epsilon", "update_noise_multiplier", silo, None, None),
    ):
        if target not in t:
            continue
        if sigma in t:
            raise ConfigError(f"privacy.{target}: give either {target} or {sigma}, not both")
        if not on:
            raise ConfigError(f"privacy.{target}: set only with {'record_level' if q_key else 'silo_level'} = true")
        eps = t.pop(target)
        try:
            per_round = 1 if steps is None else t.get(steps)
            q = 1.0 if q_key is None else t.get(q_key)
            total = int(rounds) * int(per_round)  # validated below; bad values fail there
            t[sigma] = calibrate_noise(target_epsilon=eps, delta=t.get("delta", 1e-5), sample_rate=q,
                                       steps=total, accountant=accountant, fixed=fixed if q_key else ())
            if q_key is None and distributed:
                # the target holds against one silo's upload (σ/√K), like the silos' budgets;
                # the aggregate of K shares then carries √K times that σ
                t[sigma] *= math.sqrt(int(min_silos))
        except (TypeError, ValueError) as exc:
            msg = str(exc).removeprefix("invalid ")
            raise ConfigError(f"privacy.{target}: cannot calibrate σ: {msg}") from None
    if distributed:
        t["noise_shares"] = int(min_silos) if isinstance(min_silos, int) else min_silos
    for flag, on, group in (("record_level", record, ("sample_rate", "steps_per_round", "max_grad_norm",
                                                      "noise_multiplier")),
                            ("silo_level", silo, ("update_clip_norm", "update_noise_multiplier"))):
        for key in group:
            if on and key not in t:
                raise ConfigError(f"privacy.{key}: missing (required with {flag} = true)")
            if not on and key in t:
                raise ConfigError(f"privacy.{key}: set but {flag} is off")
    try:
        plan = PrivacyPlan(**t)
    except ValueError as exc:
        msg = str(exc).removeprefix("invalid ")
        name = msg.split(" ", 1)[0]
        raise ConfigError(f"privacy.{name}: {msg.split(' ', 1)[1] if ' ' in msg else msg}") from None
    except TypeError as exc:
        raise ConfigError(f"privacy: {exc}") from None
    return plan, dict(budgets)


def tls_files(table: Mapping[str, Any], section: str, base: Path, *, insecure: bool,
              insecure_key: str) -> TlsFiles | None:
    """The ca/cert/key entries of a config table, resolved and checked to exist.

    Returns None only for an insecure config that names none of them.

    Raises:
        ConfigError: a missing entry or file, naming it.
    """
    keys = ("ca", "cert", "key")
    if insecure and not any(k in table for k in keys):
        return None
    missing = [k for k in keys if k not in table]
    if missing:
        raise ConfigError(f"{section}.{missing[0]}: missing (required unless {insecure_key} = true)")
    tls = TlsFiles(**{k: resolve_path(base, table[k], f"{section}.{k}") for k in keys})
    tls.check_exist(section)
    return tls


def resolve_path(base: Path, value: Any, name: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name}: {value!r} must be a path string")
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)
