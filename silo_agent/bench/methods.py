"""The methods ``fedsilo bench`` compares: the registered methods that declare bench defaults, plus the two reference runs."""

from __future__ import annotations

from collections.abc import Mapping
import json
from dataclasses import dataclass, field, replace
from typing import Any

from fedsilo.core.methods import methods as registered_methods

#: The reference runs that need no federation, with their one-line notes (they run without DP).
REFERENCES: dict[str, str] = {
    "local": "no federation: each silo trains alone on its own data (0 bytes)",
    "centralised": "pooled data of all silos in one place (the upper reference; the pooling itself is what "
                   "federated learning avoids)",
}


@dataclass(frozen=True, kw_only=True)
class Method:
    """One method of the study.

    Attributes:
        name: as given on the command line.
        strategy: the run strategy (``run.strategy``), or None for a reference run that needs no
            federation (``local``, ``centralised``).
        note: one line for the summary: what it shares, what it keeps.
        training: entries of the run's ``[training]`` table (e.g. FedProx's μ).
        he_bound: the HE bound its uploads need (None: the default).
        resfim: its ``[resfim]`` table, if any.
        lora: whether it fine-tunes LoRA adapters on a pretrained base.
        privacy: its ``[privacy]`` plan when the study runs with DP (None: it cannot run with DP;
            ``why_no_dp`` says why).
        why_no_dp: the reason it runs only without DP.
    """

    name: str
    strategy: str | None
    note: str
    training: Mapping[str, Any] = field(default_factory=dict)
    he_bound: float | None = None
    resfim: Mapping[str, Any] | None = None
    lora: bool = False
    privacy: Mapping[str, Any] | None = None
    why_no_dp: str = ""


def study_method_names() -> tuple[str, ...]:
    """Method names in the order of the study's tables: the references, then every registered
    method with bench defaults (by the registry's order)."""
    return tuple(REFERENCES) + tuple(m.name for m in registered_methods() if m.bench is not None)


def methods(*, mu: float | None = None) -> dict[str, Method]:
    """Every method of the study, by name; ``mu`` (if given) replaces any ``proximal_mu`` a method's
    bench defaults set (FedProx's μ)."""
    out = {name: Method(name=name, strategy=None, note=note, why_no_dp="reference run without DP")
           for name, note in REFERENCES.items()}
    for m in registered_methods():
        b = m.bench
        if b is None:
            continue
        training = dict(b.training)
        note = b.note or m.summary
        if mu is not None and "proximal_mu" in training:
            training["proximal_mu"] = mu
            note = note.replace(f"mu = {b.training['proximal_mu']:g}", f"mu = {mu:g}")
        out[m.name] = Method(name=m.name, strategy=b.strategy or m.name, note=note, training=training,
                             he_bound=m.he_bound, resfim=b.tables.get("resfim"), lora=b.needs_base,
                             privacy=b.privacy, why_no_dp=b.why_no_dp)
    return out


def resolve(name: str, *, mu: float | None = None) -> Method:
    """A study method by name, or a variant of one: ``base@table.key=value[&table.key=value…]`` runs
    ``base`` with entries of its ``[training]`` or ``[resfim]`` table replaced (e.g.
    ``resfim@resfim.rho=0.2``); values are read as JSON where they parse, else as text.

    Raises:
        ValueError: an unknown base, a malformed variant, or a table the base method has not got.
    """
    base, sep, spec = name.partition("@")
    table = methods(mu=mu)
    if base not in table:
        raise ValueError(f"unknown method {base!r}; choose from {', '.join(study_method_names())}")
    method = table[base]
    if not sep:
        return method
    if method.strategy is None:
        raise ValueError(f"{name}: {base} is a reference run; it has no settings to vary")
    training, resfim = dict(method.training), dict(method.resfim) if method.resfim is not None else None
    for item in spec.split("&"):
        key, eq, raw = item.partition("=")
        table_name, dot, field = key.partition(".")
        if not (eq and dot and field and raw):
            raise ValueError(f"{name}: a variant is base@table.key=value, got {item!r}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        if table_name == "training":
            training[field] = value
        elif table_name == "resfim" and resfim is not None:
            resfim[field] = value
        else:
            raise ValueError(f"{name}: {base} has no [{table_name}] table to vary")
    return replace(method, name=name, training=training, resfim=resfim, note=f"{method.note} [{spec}]")


__all__ = ["REFERENCES", "Method", "methods", "resolve", "study_method_names"]
