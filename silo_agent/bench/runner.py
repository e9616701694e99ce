"""``fedsilo bench``: runs every (method, seed, schedule) cell through the deployed code in one process, resumably."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from fedsilo.coordinator.config import DEFAULT_TASK
from fedsilo.core.atomic import atomic_write
from fedsilo.core.methods import get_method
from fedsilo.silo_agent.bench.cells import task_fields, upgrade_cell
from fedsilo.silo_agent.bench.methods import (
    CENTRALISED,
    LOCAL,
    ONE_FOR_ONE,
    Method,
    has_groups,
    model_of,
    resolve,
    task_refusal,
)

log = logging.getLogger("fedsilo.bench")

CELLS_DIR = "cells"
#: Written into every cell: a cell made under other study settings is not reused.
STUDY_KEYS = ("task", "model", "aggregation", "dp", "data", "held_out", "mu", "base")


class BenchError(Exception):
    """A bad bench setting or a failed cell; the message says what to change."""


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """One study.

    Attributes:
        methods: method names (see ``fedsilo.silo_agent.bench.methods``), in table order.
        seeds: the seeds; each gives other data splits, model initialisation and shuffling.
        rounds: rounds of the main schedule.
        local_epochs: local epochs per round of the main schedule.
        sweep: extra (rounds, local_epochs) schedules of the communication-frequency sweep, each
            with rounds × local_epochs equal to the main schedule's.
        silos: number of silos (built-in data: domains 0 … silos−1; folder data: the folders).
        aggregation: "he" (BFV, the deployed default) or "plain".
        dp: run with record-level DP (each method's plan, ε ≤ 8 per run; methods that cannot run
            under DP are skipped and the summary says so).
        mu: FedProx's μ.
        data: None for the built-in data, else a folder holding one sub-folder per silo.
        held_out: with ``data``: the sub-folder of the held-out (unseen) domain, or None.
        data_options: options of the Task's data loader every silo gets (its ``[data]`` table's other
            keys, e.g. ``{"modalities": "both"}`` for the glaucoma Task's built-in clinics); None: none.
        out: the output folder (cells, logs, results).
        task: the registered Task every cell runs (``[run] task``): data, model, loss and metrics;
            reports name its headline metric. An alias (``seg3d``) is stored as the canonical name.
        model: the runs' ``[model]`` table; None: the demo UNet for ``segmentation-2d``, else the
            Task's :meth:`~fedsilo.models.tasks.Task.default_model_config` for each seed. A variant
            ``base@model.key=value`` runs this table with those entries set (``fedavg@model.norm=pn``).
        base: the frozen base of the LoRA methods (a ``fedsilo pretrain`` or ``fedsilo export``
            checkpoint of the runs' model); None: one pretrained per seed on a built-in domain no
            silo holds, which suits the built-in data, not a user's (``fedsilo pretrain --data``).
    """

    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    rounds: int
    out: Path
    local_epochs: int = 1
    sweep: tuple[tuple[int, int], ...] = ()
    silos: int = 3
    aggregation: str = "he"
    dp: bool = False
    mu: float = 0.01
    data: Path | None = None
    held_out: str | None = None
    data_options: Mapping[str, Any] | None = None
    task: str = DEFAULT_TASK
    model: Mapping[str, Any] | None = None
    base: Path | None = None

    def __post_init__(self) -> None:
        from fedsilo.models.tasks import get_task
        from fedsilo.silo_agent.demo import model_table

        try:
            task = get_task(self.task)
        except ValueError as exc:
            raise BenchError(f"task: {exc}") from None
        object.__setattr__(self, "task", task.name)  # an alias (seg3d) becomes the canonical name
        if self.model is not None:
            try:
                model_table(task.name, 0, base=self.model)  # the study's whole table, as the Task parses it
            except ValueError as exc:
                raise BenchError(f"model: {exc}") from None
            object.__setattr__(self, "model", dict(self.model))
        if not self.methods:
            raise BenchError("methods: give at least one method")
        for m in self.methods:
            try:
                resolve(m, task=task.name, model=self.model)
            except ValueError as exc:
                raise BenchError(f"methods: {exc}") from None
        if len(set(self.methods)) != len(self.methods):
            raise BenchError(f"methods: {','.join(self.methods)} names a method twice")
        files: dict[str, str] = {}
        for m in self.methods:
            other = files.setdefault(cell_id(m, 0, 1, 1), m)
            if other != m:
                raise BenchError(f"methods: {other} and {m} would share cell files ({cell_id(m, 0, 1, 1)}.json); "
                                 "write one of them differently")
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise BenchError(f"seeds: {self.seeds!r} must be integers >= 0")
        if len(set(self.seeds)) != len(self.seeds):
            raise BenchError(f"seeds: {self.seeds!r} repeats a seed")
        for name, v, lo, hi in (("rounds", self.rounds, 1, 1000), ("local_epochs", self.local_epochs, 1, 100),
                                ("silos", self.silos, 2, 16)):
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise BenchError(f"{name}: {v!r} must be an integer in [{lo}, {hi}]")
        total = self.rounds * self.local_epochs
        for r, e in self.sweep:
            if r < 1 or e < 1 or r * e != total:
                raise BenchError(f"sweep: {r}x{e} must hold rounds x local epochs = {self.rounds}x{self.local_epochs} "
                                 f"= {total}")
        if self.aggregation not in ("he", "plain"):
            raise BenchError(f"aggregation: {self.aggregation!r} must be 'he' or 'plain'")
        if not isinstance(self.mu, (int, float)) or isinstance(self.mu, bool) or not (math.isfinite(self.mu)
                                                                                      and self.mu >= 0):
            raise BenchError(f"mu: {self.mu!r} must be a finite number >= 0")
        table = {m: resolve(m, task=self.task, model=self.model) for m in self.methods}
        if self.base is not None and not Path(self.base).is_file():
            raise BenchError(f"base: {self.base} is not a checkpoint file (make one with `fedsilo pretrain`)")
        if self.base is not None:
            for m in self.methods:
                if table[m].lora and table[m].model:
                    raise BenchError(f"methods: {m} changes the model, but the given base is a checkpoint of "
                                     "the study's model; run that variant in a study of its own --model-json "
                                     "and --base")
        for m in self.methods:
            why = task_refusal(table[m], self.task, model=self.model, base=self.base is not None)
            if why is not None:
                raise BenchError(f"methods: {why}")
        if self.aggregation == "plain":
            for m in self.methods:
                strategy = table[m].strategy
                if strategy is not None and get_method(strategy).needs_he:
                    raise BenchError(f"methods: {m} needs --aggregation he ({get_method(strategy).needs_he})")
        if self.data is not None:
            if "folder" not in task.data_sources:
                raise BenchError(f"data: task {self.task!r} reads no folder data (its sources: "
                                 f"{', '.join(task.data_sources)})")
            if not Path(self.data).is_dir():
                raise BenchError(f"data: {self.data} is not a folder")
            folders = silo_folders(Path(self.data), self.held_out)
            if len(folders) < 2:
                raise BenchError(f"data: {self.data} holds {len(folders)} silo folder(s); a federation needs >= 2")
            object.__setattr__(self, "silos", len(folders))
        elif self.held_out is not None:
            raise BenchError(f"held_out: {self.held_out!r} needs --data (the built-in data has its own unseen domain)")
        if self.data_options is not None:
            self._check_data_options(task)

    def _check_data_options(self, task: Any) -> None:
        """``data_options`` is a table of loader options (not the keys the bench sets) that the Task's loader
        takes: the first silo's data is loaded with them."""
        from fedsilo.models.tasks import DataSpec

        options = self.data_options
        if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
            raise BenchError(f"data_options: {options!r} must be a table of option names")
        fields = {f.name for f in dataclasses.fields(DataSpec)}  # a [data] table's other keys are options
        reserved = sorted(set(options) & fields)
        if reserved:
            raise BenchError(f"data_options: {', '.join(reserved)} is set by the bench for each silo, not an option")
        object.__setattr__(self, "data_options", dict(options))
        table = (agent_data_tables(self, 0, ["first"]) or [{}])[0]
        try:
            task.load_data(DataSpec.coerce({**{k: v for k, v in table.items() if k in fields},
                                            "options": {k: v for k, v in table.items() if k not in fields}}))
        except (ValueError, TypeError, OSError) as exc:
            raise BenchError(f"data_options: task {task.name!r} refuses them: {exc}") from None

    @property
    def schedules(self) -> list[tuple[int, int, bool]]:
        """(rounds, local_epochs, main) of every schedule, the main one first."""
        main = (self.rounds, self.local_epochs)
        return [(*main, True)] + [(r, e, False) for r, e in self.sweep if (r, e) != main]

    def study(self) -> dict[str, Any]:
        """The settings every cell of this study shares (stored in each cell)."""
        return {"task": self.task, "model": None if self.model is None else dict(self.model),
                "aggregation": self.aggregation, "dp": self.dp,
                "data": str(self.data) if self.data is not None else "builtin", "held_out": self.held_out,
                "mu": self.mu, "base": str(Path(self.base).resolve()) if self.base is not None else None,
                **({"data_options": dict(self.data_options)} if self.data_options else {})}


class Job(NamedTuple):
    """One cell to run: its method, seed and schedule."""

    method: Method
    seed: int
    rounds: int
    local_epochs: int


#: Runs a study's unfinished cells elsewhere (e.g. ``ray_runner.ray_executor``): given the study and its
#: jobs, yields each (job, cell) as it finishes, in any order; :func:`run_study` writes the cells. It
#: raises :class:`BenchError` for a failed cell (cells it yielded before are kept).
Executor = Callable[[BenchConfig, Sequence[Job]], Iterator[tuple[Job, dict[str, Any]]]]


def default_sweep(rounds: int, local_epochs: int = 1) -> tuple[tuple[int, int], ...]:
    """The communication-frequency sweep for a main schedule: every R' × E' with the same total
    epochs and E' ∈ {1, 2, 4, 5, 8, 10, …} dividing the total (at most 8 epochs per round, at least
    one round), e.g. 40 × 1 → 40×1, 20×2, 10×4, 8×5, 5×8; 3 × 1 → 3×1, 1×3."""
    total = rounds * local_epochs
    return tuple((total // e, e) for e in range(1, min(total, 8) + 1) if total % e == 0)


def parse_sweep(text: str) -> tuple[tuple[int, int], ...]:
    """"40x1,20x2" → ((40, 1), (20, 2)).

    Raises:
        BenchError: a malformed entry.
    """
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        m = re.fullmatch(r"(\d+)\s*[x×]\s*(\d+)", part)
        if not m:
            raise BenchError(f"sweep: {part!r} is not ROUNDSxEPOCHS (e.g. 20x2)")
        out.append((int(m.group(1)), int(m.group(2))))
    return tuple(out)


def parse_seeds(text: str) -> tuple[int, ...]:
    """"3" → (0, 1, 2) (a count); "0,4,7" → (0, 4, 7) (a list).

    Raises:
        BenchError: not a count or a list of integers.
    """
    try:
        if "," not in text:
            n = int(text)
            if n < 1:
                raise BenchError(f"seeds: {text!r}: a count must be >= 1")
            return tuple(range(n))
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise BenchError(f"seeds: {text!r} is neither a count nor a comma-separated list of seeds") from None


def silo_folders(root: Path, held_out: str | None) -> list[Path]:
    """The silo folders of a user dataset (sorted by name), without the held-out one."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if held_out is not None and not (root / held_out).is_dir():
        raise BenchError(f"held_out: {root / held_out} is not a folder")
    return [p for p in folders if p.name != held_out]


def cell_id(method: str, seed: int, rounds: int, local_epochs: int) -> str:
    """The file stem of a cell (a variant's ``@``, ``=`` and ``&`` become ``_``)."""
    return f"{re.sub(r'[^A-Za-z0-9+._-]', '_', method)}-seed{seed}-{rounds}x{local_epochs}"


# -- one cell -------------------------------------------------------------------------------
def agent_data_tables(cfg: BenchConfig, seed: int, names: Sequence[str]) -> list[dict[str, Any]] | None:
    """Each silo's ``[data]`` table: built-in domain i or folder i, with the study's ``data_options``
    (None: the demo's built-in tables, no options)."""
    options = dict(cfg.data_options or {})
    if cfg.data is None:
        if not options:
            return None
        return [{"source": "builtin", "domain": i, "seed": seed, **options} for i in range(len(names))]
    tables = []
    for folder in silo_folders(Path(cfg.data), cfg.held_out):
        t: dict[str, Any] = {"source": "folder", "path": str(folder.resolve()), "seed": seed, **options}
        if cfg.held_out is not None:
            t["unseen_path"] = str((Path(cfg.data) / cfg.held_out).resolve())
        tables.append(t)
    return tables


def _names(cfg: BenchConfig) -> list[str]:
    from fedsilo.silo_agent.demo import silo_names

    if cfg.data is not None:
        return [p.name for p in silo_folders(Path(cfg.data), cfg.held_out)]
    return silo_names(cfg.silos)


def _model_table(cfg: BenchConfig, seed: int, method: Method) -> dict[str, Any]:
    """The ``[model]`` table of ``method``'s runs of ``seed``: the study's (the demo UNet or the Task's
    default when it has none), with a variant's ``model.key=value`` entries set."""
    return model_of(method, task=cfg.task, model=cfg.model, seed=seed)


def _base_checkpoint(cfg: BenchConfig, seed: int, model: Mapping[str, Any]) -> Path:
    """The LoRA methods' frozen base for ``seed``: the study's ``base``, else one pretrained once per study
    on a built-in domain no silo holds, for the run's ``model`` table (a base loads only into the model
    it was made for, so a variant that changes the model gets a base of its own)."""
    from fedsilo.silo_agent.demo import make_base, model_table

    if cfg.base is not None:
        return Path(cfg.base).resolve()
    path = Path(cfg.out).resolve() / "bases" / f"base-seed{seed}.pt"
    if dict(model) != model_table(cfg.task, seed):  # not the demo UNet of this seed
        digest = hashlib.sha256(json.dumps(model, sort_keys=True).encode()).hexdigest()[:12]
        path = path.with_name(f"base-seed{seed}-{digest}.pt")
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.pt")  # cells of one seed may run at once (--ray)
        make_base(tmp, seed, model=model)
        tmp.replace(path)
    return path


def run_cell(cfg: BenchConfig, method: Method, seed: int, rounds: int, local_epochs: int, *,
             on_round: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Runs one cell and returns it (the report's cell format).

    Federated methods run through :func:`fedsilo.silo_agent.simulation.simulate`: the deployed
    coordinator, servicers and agents, with mTLS identities from a fresh federation CA, in this
    process. Reference methods (local, centralised, one-for-one) train with the agents' own training
    code. A cell of a Task with silo groups (:func:`~fedsilo.silo_agent.bench.methods.has_groups`)
    records each silo's group (``"groups": {silo: group}``).

    Raises:
        BenchError: the cell failed (the message names its log).
    """
    from fedsilo.coordinator.loading import load_federation_config
    from fedsilo.models.tasks import get_task
    from fedsilo.silo_agent.config import load_agent_config
    from fedsilo.silo_agent.demo import DEMO_BUDGET, DEMO_LORA, make_certs, write_configs
    from fedsilo.silo_agent.simulation import SimulationError, simulate

    out = Path(cfg.out).resolve()
    cid = cell_id(method.name, seed, rounds, local_epochs)
    work = out / "work" / cid
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    names = _names(cfg)
    t0 = time.monotonic()
    dp = cfg.dp and method.privacy is not None
    privacy = dict(method.privacy) if dp and method.privacy is not None else None
    if privacy is not None and "record_level" in privacy:
        privacy["steps_per_round"] *= local_epochs  # the same DP-SGD steps per local epoch in every schedule
    training = {"local_epochs": local_epochs, **method.training}
    make_certs(work / "certs", names)
    task = get_task(cfg.task)
    model_table = _model_table(cfg, seed, method)
    base = _base_checkpoint(cfg, seed, model_table) if method.lora else None
    fed_path, agent_paths = write_configs(
        work, names=names, rounds=rounds, strategy=method.strategy or "fedavg", seed=seed, port=1, insecure=False,
        aggregation=cfg.aggregation, privacy=privacy, budgets={n: DEMO_BUDGET for n in names} if privacy else None,
        min_silos=len(names), lora=dict(DEMO_LORA) if method.lora else None, base_checkpoint=base,
        tables=method.tables, training=training,
        he_bound=method.he_bound, data=agent_data_tables(cfg, seed, names), task=cfg.task, model=model_table)
    agents = [load_agent_config(p) for p in agent_paths]
    test_sizes: dict[str, int] = {}
    epsilon: dict[str, float] | None = None
    groups: dict[str, str] | None = None
    silos: list[Any] | None = None  # each silo's data as its agent loads it, where this process needs it
    if has_groups(task.name):
        from fedsilo.silo_agent.bench.grouped import silo_groups
        from fedsilo.silo_agent.bench.reference import load_silos

        silos = load_silos(agents, names, task)
        try:
            groups = silo_groups(silos, task)
        except ValueError as exc:  # some silo's data names no group: no per-group figures
            if method.name == ONE_FOR_ONE:
                raise BenchError(f"{cid}: {exc}") from None
    if method.strategy is None:
        from fedsilo.models import TrainConfig
        from fedsilo.silo_agent.bench.centralised import run_centralised
        from fedsilo.silo_agent.bench.grouped import run_grouped
        from fedsilo.silo_agent.bench.local import run_local
        from fedsilo.silo_agent.bench.reference import load_silos
        from fedsilo.silo_agent.demo import DEMO_TRAINING

        import torch

        torch.set_num_threads(1)  # as each simulated agent (threads = 1), so s/run compares like with like
        silos = silos if silos is not None else load_silos(agents, names, task)
        train_cfg = TrainConfig.from_mapping({**DEMO_TRAINING, "seed": seed, **training})
        run = {LOCAL: run_local, CENTRALISED: run_centralised, ONE_FOR_ONE: run_grouped}[method.name]
        rounds_log = run(silos, task=task, model_cfg=model_table, train_cfg=train_cfg, rounds=rounds,
                         on_round=on_round)
        test_sizes = {s.name: len(s.data.splits.test) for s in silos}  # type: ignore[arg-type]
    else:
        fed = load_federation_config(fed_path)

        def progress(status: Any) -> None:
            if on_round is not None:
                on_round(status.last_closed_round)

        try:
            result = simulate(fed, agents, unseen_every_round=True, progress=progress)
        except SimulationError as exc:
            raise BenchError(f"{cid}: {exc} (log: {out / 'logs' / 'bench.log'})") from None
        from fedsilo.silo_agent.bench.reference import round_entry

        rounds_log = []
        for summary in result.rounds:
            metrics = {silo: {k: (v, n) for k, v, n in values} for silo, values in summary.metrics.items()}
            head = task.headline_metric
            test_sizes.update({silo: int(m[head][1]) for silo, m in metrics.items() if head in m})
            rounds_log.append(round_entry(summary.round, metrics, task=task, bytes_up=summary.bytes_up,
                                          bytes_down=summary.bytes_down))
        epsilon = dict(result.epsilon) if dp else None
    shutil.rmtree(work, ignore_errors=True)
    note = method.note if not cfg.dp or dp else f"{method.note} [run WITHOUT DP: {method.why_no_dp}]"
    return {"method": method.name, "seed": seed, "rounds": rounds, "local_epochs": local_epochs,
            "main": (rounds, local_epochs) == (cfg.rounds, cfg.local_epochs), **cfg.study(), **task_fields(task),
            "silos": names, **({} if groups is None else {"groups": groups}), "test_sizes": test_sizes,
            "rounds_log": rounds_log, "epsilon": epsilon, "seconds": time.monotonic() - t0, "note": note}


# -- the study ------------------------------------------------------------------------------
def _load_cell(path: Path, cfg: BenchConfig, method: str) -> dict[str, Any] | None:
    """The finished cell of ``method`` in ``path``, or None when the file is torn or foreign (recompute it).

    Raises:
        BenchError: the cell was made under other study settings, or is another method's (a variant
            written so that its file name is the same).
    """
    try:
        cell = upgrade_cell(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None  # a torn or foreign file: recompute it
    if not isinstance(cell, dict):
        return None
    study = cfg.study()
    silos = cell.get("silos")
    if any(cell.get(k) != study[k] for k in STUDY_KEYS) or not isinstance(silos, list) or len(silos) != cfg.silos:
        made = ", ".join([f"{k}={cell.get(k)!r}" for k in STUDY_KEYS] + [f"silos={silos!r}"])
        raise BenchError(f"{path} was made with other study settings ({made}); use a new --out folder for this study")
    if cell.get("method") != method:
        raise BenchError(f"{path} holds a cell of method {cell.get('method')!r}, not {method!r} (their file names "
                         "are the same); write the variant differently or use a new --out folder")
    return cell


def run_study(cfg: BenchConfig, *, console: Any = None, executor: Executor | None = None) -> list[Path]:
    """Runs every cell not yet finished, then writes results.csv, summary.md and the plots.

    A finished cell is a JSON file in ``out/cells``, written atomically when the cell ends; an
    interrupted study started again with the same settings skips them.

    Args:
        cfg: the study.
        console: where progress goes (default: a rich console on stderr).
        executor: runs the unfinished cells elsewhere (e.g. as Ray tasks); None: one after another in
            this process. Either way this process writes the cells, the same files.

    Returns:
        The files written by the report.
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    out = Path(cfg.out).resolve()
    (out / CELLS_DIR).mkdir(parents=True, exist_ok=True)
    with _logs_to(out / "logs"):
        return _run_study(cfg, out, console, executor)


def _run_study(cfg: BenchConfig, out: Path, console: Any, executor: Executor | None) -> list[Path]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedsilo.silo_agent.bench.report import write_outputs
    table = {m: resolve(m, mu=cfg.mu, task=cfg.task, model=cfg.model) for m in cfg.methods}
    plan = [(table[m], s, r, e) for (r, e, _main) in cfg.schedules for m in cfg.methods for s in cfg.seeds]
    cells: list[dict[str, Any]] = []
    todo = []
    for method, seed, r, e in plan:
        path = out / CELLS_DIR / f"{cell_id(method.name, seed, r, e)}.json"
        cell = _load_cell(path, cfg, method.name) if path.is_file() else None
        if cell is not None:
            cells.append(cell)
        else:
            todo.append((method, seed, r, e, path))
    if cells:
        console.print(f"resuming: {len(cells)} of {len(plan)} cells already finished in {out / CELLS_DIR}")
    if cfg.dp:
        for name in cfg.methods:
            if table[name].privacy is None:
                console.print(f"[yellow]{name}: runs WITHOUT DP ({table[name].why_no_dp})[/]")
    if cfg.aggregation == "plain":
        console.print("[bold red]WARNING: --aggregation plain: the simulated coordinator sees every update in the "
                      "clear (fine for a benchmark on synthetic data, not for a deployment).[/]")

    def finish(path: Path, cell: dict[str, Any]) -> None:
        """The one place a finished cell is written (atomically) and counted."""
        atomic_write(path, json.dumps(cell, indent=1).encode())
        progress.advance(overall)
        console.print(f"{path.stem}: {cell['seconds']:.0f} s")
        cells.append(cell)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        overall = progress.add_task("cells", total=len(plan), completed=len(cells))
        if executor is not None:
            for job, cell in executor(cfg, [Job(method, seed, r, e) for method, seed, r, e, _path in todo]):
                finish(out / CELLS_DIR / f"{cell_id(job.method.name, job.seed, job.rounds, job.local_epochs)}.json",
                       cell)
            todo = []
        for method, seed, r, e, path in todo:
            cid = cell_id(method.name, seed, r, e)
            task = progress.add_task(f"  {cid}", total=r)
            try:
                cell = run_cell(cfg, method, seed, r, e,
                                on_round=lambda done, task=task: progress.update(task, completed=done))
            except BenchError:
                raise
            except Exception as exc:  # a bug or a bad user dataset: say which cell, keep the finished ones
                log.exception("cell %s failed", cid)
                raise BenchError(f"{cid} failed: {type(exc).__name__}: {exc} (details in "
                                 f"{out / 'logs' / 'bench.log'}; finished cells are kept, run again to resume)") from None
            progress.update(task, completed=r)
            progress.remove_task(task)
            finish(path, cell)
    order = {(m.name, s, r, e): i for i, (m, s, r, e) in enumerate(plan)}
    cells.sort(key=lambda c: order.get((c["method"], c["seed"], c["rounds"], c["local_epochs"]), len(order)))
    reference = "fedavg" if "fedavg" in cfg.methods else cfg.methods[0]
    return write_outputs(cells, out, reference=reference)


@contextlib.contextmanager
def _logs_to(folder: Path, name: str = "bench.log") -> Iterator[None]:
    """While running, fedsilo's log lines go to ``folder/name`` only (the console shows the
    progress); the logger's previous handlers and settings are restored afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger("fedsilo")
    saved = (root.level, root.propagate, list(root.handlers))
    handler = logging.FileHandler(folder / name)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s"))
    root.setLevel(logging.INFO)
    root.propagate = False
    root.handlers[:] = [handler]
    try:
        yield
    finally:
        handler.close()
        root.setLevel(saved[0])
        root.propagate = saved[1]
        root.handlers[:] = saved[2]


__all__ = ["BenchConfig", "BenchError", "Executor", "Job", "cell_id", "default_sweep", "parse_seeds", "parse_sweep",
           "run_cell", "run_study"]
