"""Upload weights and the weight normalizer, fixed by the coordinator: what each silo declared at join, frozen once round 1 opens.

A silo's upload weight is the number of training examples it declared when it joined (1 for
every silo under silo-level DP), never what an upload's header claims. The study can bound the
declared sizes (``[silos] train_examples`` / ``max_train_examples``). When round 1 opens the
coordinator fixes the run's weight normalizer N: the sizes of the joined silos plus a size
reserved for each enrolled silo that has not joined yet (its expected size, else the study's
maximum, else the largest size declared so far). HE silos encrypt ``n_i / N * u_i``, so with
every weight counted at most once the sum of any subset of uploads stays within the encoding's
range; a late joiner may declare at most what was reserved for it, and a re-join cannot change a
size once the run has started.
"""

from __future__ import annotations

import json

from fedsilo.coordinator.context import RunContext
from fedsilo.coordinator.schema import SiloRow
from fedsilo.core.errors import FailedPrecondition, InvalidArgument

_NORMALIZER = "weight_normalizer"
_RESERVED = "reserved_examples"


def _silo_level(ctx: RunContext) -> bool:
    return ctx.cfg.privacy is not None and ctx.cfg.privacy.silo_level


def check_declared(ctx: RunContext, name: str, n: int) -> None:
    """Raises unless silo ``name`` may declare ``n`` training examples now (lock held).

    Raises:
        InvalidArgument: outside the study's bounds.
        FailedPrecondition: the run has started and ``n`` differs from what the silo declared
            before, or exceeds what was reserved for a silo joining late.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise InvalidArgument(f"num_train_examples must be a whole number, got {type(n).__name__}")
    why = ctx.cfg.declared_size_error(name, n)
    if why is not None:
        raise InvalidArgument(why)
    if ctx.store.get_meta(_NORMALIZER) is None:
        return  # before round 1 a silo may still correct its size
    prior = ctx.store.silos().get(name)
    if prior is not None:
        if prior.num_train_examples != n:
            raise FailedPrecondition(
                f"silo {name!r} declared {prior.num_train_examples} training examples when it joined; sizes are "
                f"frozen once round 1 opens, so a re-join cannot declare {n}")
        return
    if _silo_level(ctx):
        return  # every weight is 1 and the normalizer counts every enrolled silo
    reserved = int(json.loads(ctx.store.get_meta(_RESERVED) or "{}").get(name, 0))
    if n > reserved:
        raise FailedPrecondition(
            f"silo {name!r} joins after the run started: the weight normalizer, fixed at round 1, reserved "
            f"{reserved} training examples for it, and it declared {n}; the study can set silos.train_examples")


def fix_normalizer(ctx: RunContext, silos: dict[str, SiloRow]) -> float:
    """The run's weight normalizer: fixed (and stored) when round 1 opens, the same for every round.

    Inside the transaction that opens a round, lock held.
    """
    stored = ctx.store.get_meta(_NORMALIZER)
    if stored is not None:
        return float(stored)
    cfg = ctx.cfg
    if _silo_level(ctx):
        normalizer, reserved = float(len(cfg.silos)), {}
    else:
        largest = max((s.num_train_examples for s in silos.values()), default=1)
        fallback = cfg.max_train_examples or largest
        reserved = {s: int(cfg.train_examples.get(s, fallback)) for s in cfg.silos if s not in silos}
        normalizer = float(sum(s.num_train_examples for s in silos.values()) + sum(reserved.values()))
    ctx.store.set_meta(_NORMALIZER, repr(normalizer))
    ctx.store.set_meta(_RESERVED, json.dumps(reserved, sort_keys=True))
    return normalizer


def upload_weight(ctx: RunContext, name: str) -> float:
    """The weight of silo ``name``'s uploads: its declared size, or 1 under silo-level DP."""
    if _silo_level(ctx):
        return 1.0
    return float(ctx.store.silos()[name].num_train_examples)
