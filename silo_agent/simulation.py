"""A whole federation in one process: the deployed coordinator and agents, joined by the in-process transport."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedsilo.coordinator.config import FederationConfig
from fedsilo.coordinator.run import Coordinator
from fedsilo.coordinator.records import RoundSummary, RunState, Status
from fedsilo.silo_agent.config import AgentConfig
from fedsilo.silo_agent.daemon import EXIT_OK, Agent
from fedsilo.silo_agent.inprocess import InProcessCoordinator
from fedsilo.silo_agent.state import AgentState

log = logging.getLogger("fedsilo.simulation")

#: How often the coordinator's deadlines are checked (the gRPC server's ticker does the same).
TICK_S = 0.25


class SimulationError(Exception):
    """The simulated run failed; the message names the silo and the reason."""


@dataclass(frozen=True, kw_only=True)
class SimulationResult:
    """A finished simulated run.

    Attributes:
        status: the coordinator's final status.
        rounds: the coordinator's round records (contributors, bytes on the wire, each silo's metrics).
        states: each silo's final agent state (its model, shared values, strategy state).
        epsilon: each silo's cumulative ε from the coordinator's ledger mirror (empty without DP),
            against anyone who sees one of its uploads: where noise is split into shares under HE
            that is the ledger's ``single_upload`` figure, not the stronger one against the aggregate.
        seconds: wall time of the run.
    """

    status: Status
    rounds: list[RoundSummary]
    states: dict[str, AgentState]
    epsilon: dict[str, float]
    seconds: float


def simulate(federation: FederationConfig, agents: Sequence[AgentConfig], *, unseen_every_round: bool = False,
             timeout_s: float = 3600.0, progress: Callable[[Status], None] | None = None) -> SimulationResult:
    """Runs a federation in this process and returns when every agent has finished.

    The coordinator is the deployed ``Coordinator`` behind the deployed servicers; each agent is
    the deployed ``Agent`` in a thread of its own, its client calling those servicers through
    :class:`~fedsilo.silo_agent.inprocess.InProcessCoordinator` instead of a socket. Strategy,
    aggregation (plain or HE), DP and ledgers are therefore the very code a deployed run executes;
    only gRPC's transport and TLS are left out. Training is deterministic per (seed, round) and
    serialised across silos by the process-wide RNG lock, so the same configs give the same models
    as separate processes do.

    Args:
        federation: the run (its state_dir must be new or a run to resume).
        agents: one config per silo (their ``coordinator`` address is ignored).
        unseen_every_round: agents evaluate the unseen domain after every round.
        timeout_s: give up (SimulationError) after this long.
        progress: called with the coordinator's status about every second.

    Raises:
        SimulationError: an agent failed, the run failed, or the timeout passed.
    """
    started = time.monotonic()
    coordinator = Coordinator(federation)
    served = InProcessCoordinator(coordinator)
    stop = threading.Event()
    errors: dict[str, BaseException] = {}
    codes: dict[str, int] = {}

    def agent_main(cfg: AgentConfig, name: str) -> None:
        try:
            codes[name] = Agent(cfg, stop=stop, connect=served.connect, unseen_every_round=unseen_every_round).run()
        except BaseException as exc:  # reported below with the silo's name
            errors[name] = exc
            log.exception("agent %s failed", name)

    names = [cfg.name or (Path(cfg.tls.cert).stem if cfg.tls is not None else f"silo-{i}")
             for i, cfg in enumerate(agents)]
    threads = [threading.Thread(target=agent_main, args=(cfg, name), name=f"agent-{name}", daemon=True)
               for cfg, name in zip(agents, names)]
    try:
        for t in threads:
            t.start()
        last_progress = 0.0
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(TICK_S / len(threads))
            coordinator.tick()
            if errors:
                stop.set()
                break
            if time.monotonic() - started > timeout_s:
                stop.set()
                raise SimulationError(f"the simulated run did not finish in {timeout_s:.0f} s")
            if progress is not None and time.monotonic() - last_progress >= 1.0:
                last_progress = time.monotonic()
                progress(coordinator.status())
        stop.set()
        for t in threads:
            t.join(30)
        if errors:
            name, exc = next(iter(errors.items()))
            raise SimulationError(f"agent {name} failed: {type(exc).__name__}: {exc}") from exc
        status = coordinator.status()
        if status.state is not RunState.FINISHED or any(c != EXIT_OK for c in codes.values()):
            raise SimulationError(f"the run ended {status.state.value}: {status.message}")
        rounds = coordinator.round_summaries()
    finally:
        stop.set()
        coordinator.close()
    states = {}
    for cfg, name in zip(agents, names):
        state = AgentState.load(Path(cfg.state_dir))
        if state is not None:
            states[name] = state
    return SimulationResult(status=status, rounds=rounds, states=states, epsilon=_epsilons(federation),
                            seconds=time.monotonic() - started)


def _epsilons(federation: FederationConfig) -> dict[str, float]:
    """Each silo's cumulative ε as mirrored to the coordinator, against one upload (empty without DP)."""
    if federation.privacy is None:
        return {}
    from fedsilo.privacy.budget import MIRROR_FILE
    from fedsilo.privacy.ledger import LedgerMirror

    path = Path(federation.state_dir) / MIRROR_FILE
    if not path.is_file():
        return {}
    mirror = LedgerMirror.open(path)
    try:
        out = {}
        for silo in mirror.silos():
            last = mirror.last(silo)
            if last is None:
                continue
            out[silo] = float(last.budget_epsilon())
        return out
    finally:
        mirror.close()


__all__ = ["SimulationError", "SimulationResult", "simulate"]
