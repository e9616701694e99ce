"""A silo's training group: ``[agent] gpus``/``nodes`` processes under ``torchrun`` train each round; rank 0 is the agent.

``fedsilo agent`` with ``gpus`` × ``nodes`` > 1 starts itself again under ``torchrun``
(:func:`torchrun_command`). In the group, rank 0 runs the agent as usual: it alone talks to
the coordinator and holds the HE keys, the privacy ledger and the checkpoint. Every other
rank runs :func:`serve`: it loads the silo's data itself (each node needs the same files) and
waits for round jobs. Each round, rank 0 sends the model, the round's view of the training
set and the training settings (:class:`TrainJob`, a pickle in which the training set itself
is a reference the ranks resolve to their own copy) and every rank, rank 0 included, trains
its share of each batch (:mod:`fedsilo.models.parallel`). All ranks end the round with the
same weights; rank 0 carries on with its own. Nothing of a round's result travels back.

The group's collectives run over NCCL on GPUs and gloo on CPUs; jobs travel over a gloo
group of their own, so the ranks wait between rounds on the CPU. A rank that fails ends the
group (torchrun stops the others): the agent restarts from its checkpoint as after any kill.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from fedsilo.models import TrainConfig, TrainResult, train_local
from fedsilo.models.parallel import DataParallel
from fedsilo.models.precision import Precision

log = logging.getLogger("fedsilo.agent.group")

GROUP_ENV = "FEDSILO_TRAINING_GROUP"  # set by torchrun_command for the processes it starts
# How long a rank waits for the next round's job (or a collective) before the group gives up;
# the agent's restart resumes the run. Rounds that wait longer for other silos are rare.
WAIT = timedelta(days=7)
_TRAIN_SET = "silo-train"  # the persistent id of the silo's training set inside a job


class GroupError(Exception):
    """The training group cannot start or go on (e.g. a rank without the GPU it needs); the message says why."""


@dataclass(frozen=True, kw_only=True)
class TrainJob:
    """One round's local training, as rank 0 sends it to the other ranks.

    Attributes:
        model: the network to train, as the agent holds it (trainable parameters marked).
        train: the round's training set as the model sees it (``Strategy.train_data``); the
            silo's own training set inside it travels as a reference.
        train_cfg: the run's training settings.
        dp: the DP-SGD settings of a record-level DP run (``DpSgdConfig``), or None.
        round_index: the round.
        task: the run's Task.
        precision: ``agent.precision`` of non-private training (DP-SGD runs in float32).
        objective: the strategy's local objective of the round (``Strategy.local_objective``,
            a picklable ``fedsilo.models.training.LocalObjective``), or None: the Task's loss.
    """

    model: torch.nn.Module
    train: Any
    train_cfg: TrainConfig
    dp: Any
    round_index: int
    task: Any
    precision: Precision = Precision.FP32
    objective: Any = None


def torchrun_command(*, config_path: Path, gpus: int, nodes: int, master: str | None, node_rank: int,
                     insecure: bool) -> list[str]:
    """The command that runs ``fedsilo agent --config config_path`` as this node's ranks of the group."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}", f"--nnodes={nodes}"]
    if nodes == 1:
        cmd.append("--standalone")
    else:
        assert master is not None
        host, _, port = master.rpartition(":")
        cmd += [f"--node-rank={node_rank}", f"--master-addr={host}", f"--master-port={port}"]
    cmd += ["-m", "fedsilo", "agent", "--config", str(config_path)]
    return cmd + (["--insecure"] if insecure else [])


def in_group() -> bool:
    """Whether this process is a rank that :func:`torchrun_command` started."""
    return os.environ.get(GROUP_ENV) == "1" and "RANK" in os.environ and "WORLD_SIZE" in os.environ


def train_job(job: TrainJob, *, parallel: DataParallel | None, device: torch.device) -> TrainResult:
    """Runs ``job``'s local training (DP-SGD when it has ``dp``) as one rank of ``parallel``, or alone."""
    if job.dp is not None:
        from fedsilo.models.dp_training import train_local_dp

        return train_local_dp(job.model, job.train, job.train_cfg, job.dp, round_index=job.round_index,
                              task=job.task, device=device, parallel=parallel, objective=job.objective)
    return train_local(job.model, job.train, job.train_cfg, round_index=job.round_index, task=job.task,
                       device=device, parallel=parallel, precision=job.precision, objective=job.objective)


def encode_job(job: TrainJob, train_set: Any) -> bytes:
    """``job`` as bytes for the other ranks; ``train_set`` (the silo's training set, which every rank
    loads itself) is written as a reference wherever ``job`` holds it."""
    buf = io.BytesIO()
    _JobPickler(buf, train_set).dump(job)
    return buf.getvalue()


def decode_job(data: bytes, train_set: Any) -> TrainJob:
    """The job :func:`encode_job` wrote, its training-set reference resolved to this rank's ``train_set``.

    Raises:
        pickle.UnpicklingError: a reference to anything else.
    """
    job = _JobUnpickler(io.BytesIO(data), train_set).load()
    if not isinstance(job, TrainJob):
        raise pickle.UnpicklingError(f"expected a TrainJob, got {type(job).__name__}")
    return job


def check_devices(device_setting: str, gpus: int) -> None:
    """Refuses, before any process starts, a group this machine cannot run: ``agent.gpus`` GPUs are
    needed unless ``agent.device`` is ``"cpu"`` (or ``"auto"`` without CUDA, where the ranks are CPU
    processes, logged loudly).

    Raises:
        GroupError: naming both settings and the GPUs this process sees.
    """
    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device_setting == "cpu" or (device_setting == "auto" and seen == 0):
        if device_setting == "auto":
            log.warning("agent.device = 'auto' sees no GPU: the %d ranks of this node train on the CPU", gpus)
        return
    if seen < gpus:
        raise GroupError(f"agent.gpus = {gpus} with agent.device = {device_setting!r}, but this machine shows "
                         f"{seen} GPU(s) to this process; lower agent.gpus or set agent.device = 'cpu'")


class _JobPickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, train_set: Any) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._train_set = train_set

    def persistent_id(self, obj: Any) -> str | None:
        return _TRAIN_SET if obj is self._train_set else None


class _JobUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, train_set: Any) -> None:
        super().__init__(file)
        self._train_set = train_set

    def persistent_load(self, pid: Any) -> Any:
        if pid != _TRAIN_SET:
            raise pickle.UnpicklingError(f"unknown reference {pid!r} in a training job")
        return self._train_set


class TrainingGroup:
    """This process's place in the silo's training group (see the module doc).

    Use :meth:`join` in a process that :func:`torchrun_command` started.

    Attributes:
        rank: this process's rank (0: the agent).
        world: the group's size.
        device: where this rank trains: ``cuda:LOCAL_RANK``, or the CPU when ``agent.device``
            is ``"cpu"`` (or ``"auto"`` without CUDA).
        parallel: the data-parallel place handed to the training loops.
    """

    def __init__(self, *, rank: int, world: int, device: torch.device, control: Any) -> None:
        self.rank, self.world, self.device = rank, world, device
        self.parallel = DataParallel(rank=rank, world=world)
        self._control = control
        self._closed = False

    @classmethod
    def join(cls, device_setting: str) -> TrainingGroup:
        """Joins the group torchrun describes in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``…).

        Args:
            device_setting: ``agent.device`` (``"auto"``, ``"cpu"``, ``"cuda"``).

        Raises:
            GroupError: no torchrun environment, or a GPU this rank cannot use.
        """
        import torch.distributed as dist

        if not in_group():
            raise GroupError("not started by torchrun (fedsilo agent starts it when agent.gpus or agent.nodes > 1)")
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = device_setting == "cuda" or (device_setting == "auto" and torch.cuda.is_available())
        if cuda:
            if not torch.cuda.is_available() or local >= torch.cuda.device_count():
                raise GroupError(f"rank {rank} needs GPU {local} of its node (agent.device = {device_setting!r}), "
                                 f"but this process sees {torch.cuda.device_count() if torch.cuda.is_available() else 0}")
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        dist.init_process_group("nccl" if cuda else "gloo", timeout=WAIT)
        control = dist.new_group(backend="gloo", timeout=WAIT) if cuda else None
        log.info("training group: rank %d of %d on %s (%s)", rank, world, device, "nccl" if cuda else "gloo")
        return cls(rank=rank, world=world, device=device, control=control)

    # -- rank 0 ---------------------------------------------------------------------------
    def train(self, job: TrainJob, *, train_set: Any) -> TrainResult:
        """Rank 0: sends ``job`` to the other ranks and trains its own share of it.

        Args:
            job: the round's training.
            train_set: the silo's training set as every rank loaded it; it travels as a reference.
        """
        self._send([job.task, encode_job(job, train_set)])
        return train_job(job, parallel=self.parallel, device=self.device)

    def close(self) -> None:
        """Rank 0: tells the other ranks to stop, then leaves the group. Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        import torch.distributed as dist

        try:
            if self.rank == 0:
                self._send(None)
            # every rank past its last collective before any tears the group down: without it gloo
            # aborted a rank at exit now and then ("terminate called without an active exception")
            dist.barrier(group=self._control)
            dist.destroy_process_group()
        except Exception as exc:  # the others may be gone already (torchrun stopping the group)
            log.warning("training group: leaving it failed (%s); the other ranks end with torchrun", exc)

    def _send(self, message: Any) -> None:
        import torch.distributed as dist

        box = [message]
        dist.broadcast_object_list(box, src=0, group=self._control)

    # -- ranks > 0 ------------------------------------------------------------------------
    def receive(self) -> Any:
        """Ranks > 0: the next message from rank 0 (``[task, job bytes]``, or None to stop)."""
        import torch.distributed as dist

        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]


def serve(group: TrainingGroup, load_train_set: Any) -> int:
    """Ranks > 0: trains every round rank 0 sends until it says stop.

    Args:
        group: this rank's group.
        load_train_set: ``task -> the silo's training set`` (loaded once per Task).

    Returns:
        0 when rank 0 ended the group.
    """
    loaded: dict[str, Any] = {}
    rounds = 0
    while True:
        message = group.receive()
        if message is None:
            log.info("training group: rank %d stops after %d round(s)", group.rank, rounds)
            return 0
        task, body = message
        if task.name not in loaded:
            loaded[task.name] = load_train_set(task)
        job = decode_job(body, loaded[task.name])
        result = train_job(job, parallel=group.parallel, device=group.device)
        rounds += 1
        log.info("training group: rank %d trained round %d (%d steps)", group.rank, job.round_index, result.steps)
