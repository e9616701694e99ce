"""Loading ``federation.toml``: its sections, the run's tables and the ``[privacy]`` plan (σ calibrated from targets)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedsilo.coordinator.config import (
    DEFAULT_METHOD,
    AggregationMode,
    FailedRoundPolicy,
    FederationConfig,
    method_privacy_keys,
    method_tables,
    methods_with,
    parse_tables,
)
from fedsilo.core import validators
from fedsilo.core.configfile import ConfigError, check_keys, parse_enum, read_toml, resolve_path, tls_files
from fedsilo.core.metrics_endpoint import parse_metrics
from fedsilo.core.methods import UnknownMethod, get_method, method_names

__all__ = ["load_federation_config", "parse_privacy"]


_SECTIONS = {
    "run": {"id", "rounds", "min_silos", "round_deadline_s", "quorum_timeout_s", "start_grace_s", "strategy", "aggregation",
            "task", "model_fingerprint", "shared_tensors_sha256", "on_failed_round"},
    "silos": {"enrolled", "train_examples", "max_train_examples"},
    "server": {"listen", "state_dir", "ca", "cert", "key", "insecure", "max_upload_bytes", "max_chunk_bytes",
               "stall_timeout_s", "min_transfer_bytes_per_s", "max_calls_per_identity"},
    "model": None,
    "training": None,
    "he": None,
    "metrics": {"listen"},
    "privacy": {"record_level", "sample_rate", "steps_per_round", "max_grad_norm", "noise_multiplier",
                "target_epsilon", "silo_level", "update_clip_norm", "update_noise_multiplier",
                "update_target_epsilon", "distributed_noise", "delta", "budgets", "accountant"},
}


def _sections() -> dict[str, set[str] | None]:
    """The config file's sections: the common ones, every registered method's tables, and the
    ``[privacy]`` keys registered methods add."""
    sections: dict[str, set[str] | None] = {**_SECTIONS, **{name: None for name in method_tables()}}
    sections["privacy"] = set(_SECTIONS["privacy"] or ()) | method_privacy_keys()
    return sections


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
    for key in ("train_examples", "max_train_examples"):
        if key in data["silos"]:
            kwargs[key] = data["silos"][key]
    for key in ("round_deadline_s", "quorum_timeout_s", "start_grace_s"):
        if key in run:
            kwargs[key] = run[key]
    if "task" in run:
        kwargs["task"] = run["task"]
    for key in ("model_fingerprint", "shared_tensors_sha256"):  # the study's model pin (`fedsilo pin-model`)
        if key in run:
            kwargs[key] = run[key]
    if "strategy" in run:
        if not isinstance(run["strategy"], str):
            raise ConfigError(f"run.strategy: {run['strategy']!r} must be a method name (one of {list(method_names())})")
        kwargs["strategy"] = run["strategy"]
    if "aggregation" in run:
        kwargs["aggregation"] = parse_enum(AggregationMode, "run.aggregation", run["aggregation"])
    if "on_failed_round" in run:
        kwargs["on_failed_round"] = parse_enum(FailedRoundPolicy, "run.on_failed_round", run["on_failed_round"])
    if "listen" in server:
        if not isinstance(server["listen"], str):
            raise ConfigError(f"server.listen: {server['listen']!r} is not host:port")
        kwargs["listen"] = server["listen"]
    if "state_dir" in server:
        kwargs["state_dir"] = resolve_path(base, server["state_dir"], "server.state_dir")
    else:
        kwargs["state_dir"] = base / "coordinator-state"
    for key in ("max_upload_bytes", "max_chunk_bytes", "stall_timeout_s", "min_transfer_bytes_per_s",
                "max_calls_per_identity"):
        if key in server:
            kwargs[key] = server[key]
    if "metrics" in data:
        kwargs["metrics"] = parse_metrics(data["metrics"])
    strategy = kwargs.get("strategy", DEFAULT_METHOD)
    try:
        method = get_method(strategy)
    except UnknownMethod as exc:
        raise ConfigError(f"run.strategy: {exc}") from None
    kwargs["tables"] = parse_tables(method, {name: data[name] for name in method_tables() if name in data})
    if "privacy" in data:
        kwargs["privacy"], kwargs["budgets"], kwargs["accountant"] = parse_privacy(
            data["privacy"], rounds=run["rounds"], min_silos=run["min_silos"],
            aggregation=kwargs.get("aggregation", AggregationMode.HE), strategy=strategy, tables=kwargs["tables"])
    return FederationConfig(**kwargs)


def parse_privacy(table: Mapping[str, Any], *, rounds: Any, min_silos: Any,
                  aggregation: AggregationMode, strategy: str = DEFAULT_METHOD,
                  tables: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[Any, dict[str, float], Any]:
    """The ``[privacy]`` table as a `PrivacyPlan`, the budgets and the accountant; σ calibrated from targets.

    ``accountant`` (``"rdp"``, the default, or ``"pld"``) is whose ε a target is calibrated
    against and the budgets in ``[privacy.budgets]`` are checked with; PLD's tighter bound gives
    a smaller σ for the same target (calibrating takes seconds instead of milliseconds).

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
    from fedsilo.privacy.accounting import (
        DEFAULT_PLD_DISCRETIZATION,
        LEDGER_RDP_ORDERS,
        BudgetAccountant,
        DpAccountingVerifier,
        PldAccountant,
        calibrate_noise,
    )
    from fedsilo.privacy.plan import PrivacyPlan

    t = dict(table)
    governing = parse_enum(BudgetAccountant, "privacy.accountant", t.pop("accountant", BudgetAccountant.RDP.value))
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
    accountant = (PldAccountant() if governing is BudgetAccountant.PLD
                  else DpAccountingVerifier(orders=LEDGER_RDP_ORDERS))
    try:
        method = get_method(strategy)
    except UnknownMethod as exc:
        raise ConfigError(f"run.strategy: {exc}") from None
    foreign = [k for k in t if k in method_privacy_keys() and k not in method.privacy_keys]
    if foreign:
        users = " or ".join(m.name for m in methods_with(lambda m: foreign[0] in m.privacy_keys))
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
            kwargs = dict(target_epsilon=eps, delta=t.get("delta", 1e-5), sample_rate=q, steps=total,
                          fixed=fixed if q_key else ())
            upper = None
            if governing is BudgetAccountant.PLD:  # RDP's σ (milliseconds) fits under PLD: search below it
                upper = calibrate_noise(**kwargs, accountant=DpAccountingVerifier(orders=LEDGER_RDP_ORDERS))
            coarse = PldAccountant(value_discretization_interval=10 * DEFAULT_PLD_DISCRETIZATION) if upper else None
            t[sigma] = calibrate_noise(**kwargs, accountant=accountant, upper=upper, coarse=coarse)
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
    return plan, dict(budgets), governing
