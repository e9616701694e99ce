"""``fedsilo bench --ray``: a study's unfinished cells as Ray tasks, each calling :func:`run_cell`.

The driver (:func:`~fedsilo.silo_agent.bench.runner.run_study`) still plans the study, skips the
finished cells and writes every cell file, results.csv and the reports; only the cells themselves
run elsewhere. A cell's work folder (``out/work/<cell>``) is its own, so cells run side by side;
the LoRA methods' per-seed base is written under a per-process temporary name and moved into
place, so two cells of one seed may make it at once. Each cell's log lines go to
``out/logs/<cell>.log`` (on the node that ran it), not to the driver's ``bench.log``.

Ray is optional (``pip install 'fedsilo[cluster]'``) and imported only when a study runs on it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fedsilo.silo_agent.bench.runner import BenchConfig, BenchError, Executor, Job, _logs_to, cell_id, run_cell

log = logging.getLogger("fedsilo.bench")

INSTALL_HINT = "pip install 'fedsilo[cluster]'"


def import_ray() -> Any:
    """The ``ray`` module.

    Raises:
        BenchError: Ray is not installed (the message names the extra that installs it).
    """
    try:
        import ray
    except ImportError as exc:
        raise BenchError(f"--ray needs Ray, which is not installed ({exc}); install it with: {INSTALL_HINT}") from None
    return ray


def _run_job(cfg: BenchConfig, job: Job, cwd: str) -> dict[str, Any]:
    """One cell on a Ray worker: :func:`run_cell` in the driver's folder ``cwd`` (where relative
    ``--out``, ``--data`` and ``--base`` paths start), its log lines in ``out/logs/<cell>.log``.

    Raises:
        BenchError: the cell failed (the message names the cell and its log).
    """
    with contextlib.suppress(OSError):  # a node without that folder: absolute paths still work
        os.chdir(cwd)
    out = Path(cfg.out).resolve()
    cid = cell_id(job.method.name, job.seed, job.rounds, job.local_epochs)
    cell_log = out / "logs" / f"{cid}.log"
    with _logs_to(cell_log.parent, cell_log.name):
        try:
            return run_cell(cfg, job.method, job.seed, job.rounds, job.local_epochs)
        except BenchError as exc:
            raise BenchError(f"{exc} (this cell's log: {cell_log})") from None
        except Exception as exc:  # a bug or a bad user dataset: say which cell
            log.exception("cell %s failed", cid)
            raise BenchError(f"{cid} failed: {type(exc).__name__}: {exc} (details in {cell_log})") from None


def ray_executor(address: str | None = None, *, cell_cpus: float = 1, cell_gpus: float = 0) -> Executor:
    """An executor for :func:`~fedsilo.silo_agent.bench.runner.run_study` that runs each cell as a Ray task.

    Args:
        address: the Ray cluster to join (``ray.init(address=...)``, e.g. ``"auto"`` or
            ``"ray://head:10001"``); None starts a local instance with this machine's cores and no
            dashboard. An instance already started in this process is used as it is.
        cell_cpus: CPUs Ray reserves for each cell (``num_cpus``; > 0).
        cell_gpus: GPUs Ray reserves for each cell (``num_gpus``; >= 0). Ray hides the GPUs from a
            cell that reserved none, so its agents then train on the CPU.

    Raises:
        BenchError: a bad resource value, or Ray is not installed.
    """
    for name, value, low_ok in (("--cell-cpus", cell_cpus, False), ("--cell-gpus", cell_gpus, True)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 if low_ok else value > 0):
            raise BenchError(f"{name}: {value!r} must be a number {'>= 0' if low_ok else '> 0'}")
        if value > 1 and value != int(value):
            raise BenchError(f"{name}: {value!r}: more than one must be a whole number (Ray's rule)")
    import_ray()  # fail before the study starts, not after its first cells

    def execute(cfg: BenchConfig, jobs: Sequence[Job]) -> Iterator[tuple[Job, dict[str, Any]]]:
        if not jobs:
            return
        ray = import_ray()
        started = not ray.is_initialized()
        if started:
            try:
                if address is None:
                    ray.init(include_dashboard=False, num_cpus=os.cpu_count() or 1, log_to_driver=False)
                else:
                    ray.init(address=address, log_to_driver=False)
            except Exception as exc:  # no cluster at that address, a port in use, ...
                what = "start a local Ray instance" if address is None else f"join the Ray cluster at {address!r}"
                raise BenchError(f"--ray: cannot {what}: {type(exc).__name__}: {exc}") from None
        pending: list[Any] = []
        try:
            if address is None:
                have = ray.cluster_resources()
                for key, want, flag in (("CPU", cell_cpus, "--cell-cpus"), ("GPU", cell_gpus, "--cell-gpus")):
                    if want > have.get(key, 0):
                        raise BenchError(f"{flag}: {want:g} per cell, but the local Ray instance has "
                                         f"{have.get(key, 0):g} {key}(s): no cell could ever start")
            task = ray.remote(num_cpus=cell_cpus, num_gpus=cell_gpus)(_run_job)
            cfg_ref = ray.put(cfg)
            refs = {task.remote(cfg_ref, job, os.getcwd()): job for job in jobs}
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                job = refs[done[0]]
                cid = cell_id(job.method.name, job.seed, job.rounds, job.local_epochs)
                try:
                    cell = ray.get(done[0])
                except ray.exceptions.RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    why = str(cause) if isinstance(cause, BenchError) else f"{cid} failed: {exc}"
                    raise BenchError(f"{why}; finished cells are kept, run again to resume") from None
                except ray.exceptions.RayError as exc:  # a lost worker or node, out of memory, ...
                    raise BenchError(f"{cid} failed on Ray: {type(exc).__name__}: {exc}; finished cells are kept, "
                                     f"run again to resume") from None
                yield job, cell
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            if started:
                ray.shutdown()

    return execute


__all__ = ["INSTALL_HINT", "import_ray", "ray_executor"]
