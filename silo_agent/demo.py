"""``fedsilo demo``: a whole federation on one machine, every part a real OS process on loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from fedsilo.privacy.pki import Role, init_ca, issue_certificate
from fedsilo.silo_agent.client import CoordinatorClient, Credentials
from fedsilo.silo_agent.presets import (
    DEMO_MODEL,
    DEMO_TRAINING,
    DEMO_PRIVACY,
    DEMO_BUDGET,
    DEMO_LORA,
    DEMO_LORA_PRIVACY,
    DEMO_PRETRAIN_EPOCHS,
    DEMO_LORA_HE_BOUND,
    DEMO_RESFIM,
    DEMO_RESFIM_HE_BOUND,
    DEMO_RESFIM_PRIVACY,
)

console = Console(stderr=True)

ADMIN_NAME = "demo-operator"


class DemoError(Exception):
    """The demo could not complete; the message says where to look."""


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log: Path


def silo_names(k: int) -> list[str]:
    """hospital-a, hospital-b, …"""
    return [f"hospital-{chr(ord('a') + i)}" if i < 26 else f"hospital-{i}" for i in range(k)]


def free_port() -> int:
    """A currently free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml_value(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, bool) else ("true" if v else "false")


def _toml(sections: dict[str, dict[str, Any]]) -> str:
    lines = []
    for sec, values in sections.items():
        lines.append(f"[{sec}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def write_configs(work: Path, *, names: list[str], rounds: int, strategy: str, seed: int, port: int,
                  insecure: bool, round_deadline_s: float = 120.0,
                  aggregation: str = "he", privacy: dict[str, Any] | None = None,
                  budgets: dict[str, dict[str, Any]] | None = None,
                  min_silos: int | None = None, lora: dict[str, Any] | None = None,
                  base_checkpoint: Path | None = None, resfim: dict[str, Any] | None = None,
                  training: dict[str, Any] | None = None, he_bound: float | None = None,
                  data: list[dict[str, Any]] | None = None, task: str | None = None,
                  model: dict[str, Any] | None = None, pin_model: bool = True,
                  tables: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[Path, list[Path]]:
    """Writes federation.toml and one silo.toml per silo into ``work``; returns their paths.

    ``training`` overrides entries of the demo's ``[training]`` table, ``he_bound`` the HE
    bound, and ``data`` gives each silo's ``[data]`` table (default: built-in domain i); ``task``
    names the run's Task and ``model`` replaces the demo's ``[model]`` table (default: the demo UNet).

    ``tables`` are the method's own tables, each written as a federation.toml table of its name
    (``{"moon": {"mu": 5}}``); ``resfim`` and ``lora`` are tables of those names (with LoRA, a
    ``tables["lora"]`` entry replaces that entry of ``lora``; ``tables["resfim"]`` one of ``resfim``).
    A ``resfim`` or ``lora`` table raises the default HE bound, as its uploads need.

    ``privacy`` is the federation's ``[privacy]`` table (None: no DP); ``budgets`` maps a silo
    name to its silo.toml ``[privacy]`` table (its own budget).

    The run is pinned: ``[run] model_fingerprint`` and ``shared_tensors_sha256`` are those of the model
    every agent builds (``model_pin.build_run_model``, with ``base_checkpoint`` for LoRA methods);
    ``pin_model=False`` leaves them out (the first silo to join decides, as in an unpinned study).
    """
    certs = work / "certs"
    server: dict[str, Any] = {"listen": f"127.0.0.1:{port}", "state_dir": str(work / "coordinator")}
    if insecure:
        server["insecure"] = True
    else:
        server.update(ca=str(certs / "ca.pem"), cert=str(certs / "coordinator.pem"),
                      key=str(certs / "coordinator.key"))
    fed = work / "federation.toml"
    fed_sections: dict[str, dict[str, Any]] = {
        "run": {"id": f"demo-{seed}", "rounds": rounds,
                "min_silos": min_silos if min_silos is not None else max(1, len(names) - 1),
                "round_deadline_s": round_deadline_s, "start_grace_s": 60, "strategy": strategy,
                "aggregation": aggregation},
        "silos": {"enrolled": names},
        "server": server,
        "model": dict(model) if model is not None else {**DEMO_MODEL, "seed": seed},
        "training": {**DEMO_TRAINING, "seed": seed, **(training or {})},
    }
    if task is not None:
        fed_sections["run"]["task"] = task
    method_tables: dict[str, dict[str, Any]] = {}
    if resfim is not None:
        method_tables["resfim"] = dict(resfim)
    if lora is not None:
        method_tables["lora"] = dict(lora)
    for name, table in (tables or {}).items():
        if name in fed_sections or name in ("he", "privacy"):
            raise ValueError(f"tables: [{name}] is not a method table")
        method_tables[name] = {**method_tables.get(name, {}), **table}
    if "lora" in method_tables and aggregation == "he":
        # the noise regulator maps product-space noise to factor values well above 1
        fed_sections["he"] = {"bound": DEMO_LORA_HE_BOUND}
    elif "resfim" in method_tables and aggregation == "he":
        fed_sections["he"] = {"bound": DEMO_RESFIM_HE_BOUND}
    if he_bound is not None and aggregation == "he":
        fed_sections["he"] = {"bound": he_bound}
    fed_sections.update(method_tables)
    if privacy is not None:
        fed_sections["privacy"] = dict(privacy)
    if pin_model:
        fed_sections["run"].update(_model_pin(fed_sections, base_checkpoint))
    fed.write_text(_toml(fed_sections))
    agents = []
    for i, name in enumerate(names):
        agent: dict[str, Any] = {"coordinator": f"localhost:{port}", "state_dir": str(work / name), "threads": 1}
        sections: dict[str, dict[str, Any]] = {"agent": agent}
        if insecure:
            agent.update(insecure=True, name=name)
        else:
            sections["tls"] = {"ca": str(certs / "ca.pem"), "cert": str(certs / f"{name}.pem"),
                               "key": str(certs / f"{name}.key")}
        sections["data"] = dict(data[i]) if data is not None else {"source": "builtin", "domain": i, "seed": seed}
        if budgets and name in budgets:
            sections["privacy"] = dict(budgets[name])
        if base_checkpoint is not None:
            sections["model"] = {"base_checkpoint": str(base_checkpoint)}
        p = work / f"{name}.toml"
        p.write_text(_toml(sections))
        agents.append(p)
    return fed, agents


def _model_pin(sections: dict[str, dict[str, Any]], base_checkpoint: Path | None) -> dict[str, str]:
    """The ``[run]`` pin of the model that agents build for the federation.toml ``sections``; none for
    sections whose method, tables or model no agent can build (the coordinator or the agents then refuse
    the config with their own message)."""
    from fedsilo.coordinator.config import DEFAULT_TASK, ConfigError, parse_tables
    from fedsilo.core.methods import UnknownMethod, get_method
    from fedsilo.silo_agent.model_pin import ModelSettingsError, build_run_model
    from fedsilo.silo_agent.strategy import StrategyError

    run = sections["run"]
    try:
        method = get_method(run["strategy"])
        built = build_run_model(
            task=run.get("task", DEFAULT_TASK), model_config=sections["model"], strategy=method.name,
            tables=parse_tables(method, {k: v for k, v in sections.items() if k in method.tables}),
            record_level=bool(sections.get("privacy", {}).get("record_level", False)), base_checkpoint=base_checkpoint)
    except (UnknownMethod, ConfigError, ModelSettingsError, StrategyError):
        return {}
    return {"model_fingerprint": built.fingerprint, "shared_tensors_sha256": built.manifest.digest()}


def make_certs(certs: Path, names: list[str]) -> None:
    """A fresh federation CA, the coordinator's certificate for loopback, silo and admin certificates."""
    init_ca(certs)
    issue_certificate(certs, certs, role=Role.COORDINATOR, name="coordinator", hosts=["localhost", "127.0.0.1"])
    for name in names:
        issue_certificate(certs, certs, role=Role.SILO, name=name)
    issue_certificate(certs, certs, role=Role.ADMIN, name=ADMIN_NAME)


def make_base(path: Path, seed: int, model: Mapping[str, Any] | None = None) -> Path:
    """Pretrains the demo's frozen base on a source domain no demo silo holds (``fedsilo pretrain``).

    Args:
        path: The checkpoint file to write.
        seed: The data and training seed.
        model: The run's ``[model]`` table, whose network the base must be (None: the demo UNet for
            ``seed``); a base checkpoint loads only into the model config it was made for.

    Returns:
        ``path``.

    Raises:
        ValueError: ``model`` is not a 2-D model config.
    """
    from fedsilo.models import ModelConfig, TrainConfig
    from fedsilo.models.pretrain import PretrainConfig, pretrain, save_checkpoint

    table = dict(model) if model is not None else {**DEMO_MODEL, "seed": seed}
    cfg = PretrainConfig(model=ModelConfig.from_mapping(table),
                         training=TrainConfig.from_mapping({**DEMO_TRAINING, "seed": seed}),
                         epochs=DEMO_PRETRAIN_EPOCHS, seed=seed)
    console.print(f"pretraining the base model on source domain {cfg.domain} ({cfg.epochs} epochs)…")
    ckpt = pretrain(cfg)
    save_checkpoint(ckpt, path)
    console.print(f"base model: Dice {ckpt['pretrain']['dice']:.3f} on its source domain; {path}")
    return path


def _spawn(name: str, args: list[str], logs: Path) -> _Proc:
    log = logs / f"{name}.log"
    f = open(log, "wb")  # noqa: SIM115 - closed when the process is reaped
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    popen = subprocess.Popen([sys.executable, "-m", "fedsilo", *args], stdout=f, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env=env)
    f.close()
    return _Proc(name=name, popen=popen, log=log)


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def default_model_table(task: str | None, seed: int) -> dict[str, Any]:
    """The ``[model]`` table a demo or bench run of ``task`` uses when nobody changes it.

    Args:
        task: A registered Task name or alias (None: the default Task).
        seed: The run's seed (the initial weights follow it).

    Returns:
        The demo UNet (:data:`DEMO_MODEL` with ``seed``) for the default Task, else the Task's
        :meth:`~fedsilo.models.tasks.Task.default_model_config` for ``seed``.

    Raises:
        ValueError: ``task`` is not a registered Task.
    """
    from fedsilo.coordinator.config import DEFAULT_TASK
    from fedsilo.models.tasks import get_task

    the_task = get_task(task if task is not None else DEFAULT_TASK)
    if the_task.name == DEFAULT_TASK:
        return {**DEMO_MODEL, "seed": seed}
    return dict(the_task.default_model_config(seed))


def model_table(task: str | None, seed: int, entries: Mapping[str, Any] | None = None, *,
                base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A run's ``[model]`` table: ``entries`` merged onto a base table, checked by the Task's model config.

    The one rule for a changed model: ``fedsilo demo --model-json`` entries and a bench variant's
    ``model.key=value`` entries merge onto their base table this way, each entry replacing the base
    table's entry of that key (or adding it) while every other entry stays (``{"norm": "pn"}`` keeps
    the demo UNet's channels and seed); the result must parse with the Task's
    :meth:`~fedsilo.models.tasks.Task.model_config`. ``fedsilo bench --model-json``, the study's whole
    table, is checked as ``base`` with no entries.

    Args:
        task: A registered Task name or alias (None: the default Task).
        seed: The run's seed, for the default base table.
        entries: The entries to set (None or empty: the base table as it is).
        base: The table the entries change (None: :func:`default_model_table` of ``task`` and ``seed``).

    Returns:
        The merged table (a new dict, entries in the base table's order, new keys last).

    Raises:
        ValueError: ``entries`` or ``base`` is not a table of text keys, ``task`` is unknown, or the
            Task's model config refuses the merged table (the message names the key).
    """
    from fedsilo.coordinator.config import DEFAULT_TASK
    from fedsilo.models.tasks import get_task

    for table in (entries, base):
        if table is not None and (not isinstance(table, Mapping) or not all(isinstance(k, str) for k in table)):
            raise ValueError(f"{table!r} must be a table (a JSON object) of the Task's model keys")
    the_task = get_task(task if task is not None else DEFAULT_TASK)
    merged = {**(dict(base) if base is not None else default_model_table(the_task.name, seed)), **(entries or {})}
    try:
        the_task.model_config(merged)
    except TypeError as exc:  # a parser that trips over a value of the wrong kind
        raise ValueError(str(exc)) from None
    return merged


def results_from_rounds(rounds: list[dict[str, Any]], total_rounds: int,
                        metrics: Sequence[str] = ("dice", "hd95")) -> dict[str, Any]:
    """Turns the coordinator's round history into the demo's results.json structure.

    ``metrics`` are the run's Task's metric names, its headline first (segmentation: Dice, HD95):
    each silo's entry holds them, each round the headline's mean weighted by test examples
    (``mean_<headline>``), and the unseen domain their means over the silos.
    """
    headline = metrics[0]
    out_rounds = []
    unseen: dict[str, Any] = {}
    for r in rounds:
        silos = {}
        for silo, ms in sorted(r["metrics"].items()):
            entry: dict[str, Any] = {}
            if headline in ms:
                entry.update({m: ms[m]["value"] for m in metrics if m in ms}, n_test=ms[headline]["num_examples"])
            if "train_loss" in ms:
                entry["train_loss"] = ms["train_loss"]["value"]
            silos[silo] = entry
            if r["round"] == total_rounds and f"unseen_{headline}" in ms:
                unseen[silo] = {**{m: ms[f"unseen_{m}"]["value"] for m in metrics if f"unseen_{m}" in ms},
                                "n": ms[f"unseen_{headline}"]["num_examples"]}
        weighted = [(e[headline], e["n_test"]) for e in silos.values() if headline in e]
        n = sum(w for _, w in weighted)
        out_rounds.append({
            "round": r["round"], "silos": silos,
            f"mean_{headline}": (sum(d * w for d, w in weighted) / n) if n else None,
            "contributors": r["contributors"], "params_shared": r["params_shared"], "bytes_up": r["bytes_up"],
            "bytes_down": r["bytes_down"], "seconds": round(r["seconds"], 3),
        })
    result: dict[str, Any] = {"rounds": out_rounds}
    if unseen:
        result["unseen_domain"] = {headline: sum(v[headline] for v in unseen.values()) / len(unseen), "silos": unseen}
    return result


def _label(metric: str, hd95_unit: str) -> str:
    return {"dice": "Dice", "hd95": f"HD95 ({hd95_unit})", "accuracy": "accuracy", "macro_f1": "macro-F1"}.get(
        metric, metric)


def _table(status: dict[str, Any], rounds: list[dict[str, Any]], started: float, hd95_unit: str = "px",
           metrics: Sequence[str] = ("dice", "hd95")) -> Table:
    table = Table(title=f"fedsilo demo: run {status.get('run_id', '?')} - {status.get('state', '?')}, "
                        f"round {status.get('open_round') or status.get('last_closed_round', 0)}"
                        f"/{status.get('total_rounds', '?')} - {time.monotonic() - started:.0f} s")
    table.add_column("round", justify="right")
    table.add_column("silo")
    table.add_column("train loss", justify="right")
    for m in metrics:
        table.add_column(_label(m, hd95_unit), justify="right")
    for r in rounds:
        for silo, ms in sorted(r["metrics"].items()):
            loss = ms.get("train_loss", {}).get("value")
            values = [ms.get(m, {}).get("value") for m in metrics]
            table.add_row(str(r["round"]), silo, f"{loss:.4f}" if loss is not None else "-",
                          *(f"{v:.4f}" if v is not None else "-" for v in values))
    return table


def run_demo(*, silos: int = 3, rounds: int = 5, strategy: str = "fedavg", out: Path = Path("fedsilo-demo"),
             seed: int = 0, insecure: bool = False, aggregation: str = "he", dp: bool = True,
             timeout_s: float = 1800.0, task: str | None = None,
             model: Mapping[str, Any] | None = None, accountant: str = "rdp") -> dict[str, Any]:
    """Runs the demo and writes ``out/results.json`` (and, with DP, the audit report in ``out/audit``).

    ``task`` names a registered Task other than the default 2-D segmentation (its built-in data, silo i
    on domain i, and its default model for ``seed``); the run refuses methods the Task cannot run. An
    alias (``seg3d``) runs, and is recorded, as the Task's canonical name (``segmentation-3d``).

    ``model`` holds entries of the run's ``[model]`` table, e.g. ``{"norm": "pn"}``: each replaces that
    entry of the default table (the demo UNet for ``seed``, or the Task's default model) or adds it,
    and the others stay (:func:`model_table`). The run is pinned to, and a LoRA method's base is
    pretrained for, the changed model.

    Raises:
        DemoError: an unknown ``task``, ``model`` entries the Task refuses (before anything starts), a
            process failed or the run did not finish in ``timeout_s``.
    """
    if task is not None:
        from fedsilo.models.tasks import canonical_task_name

        try:
            task = canonical_task_name(task)
        except ValueError as exc:
            raise DemoError(f"--task: {exc}") from None
    try:
        the_model = model_table(task, seed, model)
    except ValueError as exc:
        raise DemoError(f"--model-json: {exc}") from None
    # 3-D Tasks score HD95 at each volume's spacing (mm); 2-D images in pixels
    from fedsilo.coordinator.config import DEFAULT_TASK
    from fedsilo.models.tasks import get_task

    the_task = get_task(task if task is not None else DEFAULT_TASK)
    hd95_unit = "mm" if the_task.spatial_dims == 3 else "px"
    metrics = (the_task.headline_metric, *(m for m in the_task.metric_names if m != the_task.headline_metric))
    out = Path(out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fedsilo-demo-"))
    names = silo_names(silos)
    procs: list[_Proc] = []
    if insecure:
        console.print("[bold red]WARNING: --insecure: plaintext gRPC, no TLS, silo identities unverified.[/]")
    if insecure and aggregation == "he":
        raise DemoError("--insecure has no certificates for the HE key ceremony; add --aggregation plain")
    if insecure and dp:
        raise DemoError("--insecure has no certificates to sign the privacy ledgers with; add --no-dp")
    if not dp:
        console.print("[bold red]WARNING: --no-dp: no differential privacy; the shared model can leak training "
                      "images.[/]")
    if aggregation == "plain":
        console.print("[bold red]WARNING: --aggregation plain: the coordinator sees every silo's update in the "
                      "clear.[/]")
    try:
        if not insecure:
            make_certs(work / "certs", names)
        port = free_port()
        from fedsilo.core.methods import DpLevel, get_method

        method = get_method(strategy)
        uses_lora, masked = method.uses_lora, method.masked
        if method.needs_he and aggregation != "he":
            raise DemoError(f"--strategy {strategy} needs --aggregation he ({method.needs_he})")
        silo_dp = uses_lora and not masked  # masked uploads are values: record-level DP-SGD only
        level = DpLevel.SILO if silo_dp else DpLevel.RECORD
        if dp and level in method.refuses:
            raise DemoError(f"--strategy {strategy} cannot run with the demo's {level.value} DP ({method.refuses[level]});"
                            " add --no-dp")
        try:
            base = make_base(work / "base.pt", seed, model=the_model) if uses_lora else None
        except ValueError as exc:  # a LoRA method on a Task whose model is not the 2-D UNet or UNETR
            raise DemoError(f"--strategy {strategy}: cannot pretrain its base for this model: {exc}") from None
        privacy = (DEMO_LORA_PRIVACY if silo_dp else DEMO_RESFIM_PRIVACY if masked else DEMO_PRIVACY) if dp else None
        if privacy is not None:  # the same accountant calibrates σ and governs every hospital's budget
            privacy = {**privacy, "accountant": accountant}
        budget = {**DEMO_BUDGET, "accountant": accountant}
        fed, agent_cfgs = write_configs(work, names=names, rounds=rounds, strategy=strategy, seed=seed, port=port,
                                        insecure=insecure, aggregation=aggregation, privacy=privacy,
                                        budgets={n: budget for n in names} if dp else None,
                                        lora=DEMO_LORA if uses_lora else None, base_checkpoint=base,
                                        resfim=DEMO_RESFIM if masked else None,
                                        he_bound=method.he_bound, task=task, model=the_model)
        console.print(f"[bold]fedsilo demo[/]: {silos} silos, {rounds} rounds, {strategy}, "
                      f"{'INSECURE plaintext' if insecure else 'mutual TLS'} on 127.0.0.1:{port}, "
                      f"{'homomorphic' if aggregation == 'he' else 'PLAINTEXT'} aggregation, "
                      f"{('silo-level DP (noise regulator)' if silo_dp else 'record-level DP-SGD') if dp else 'NO differential privacy'}"
                      + (f"; model with {json.dumps(dict(model))}" if model else "") + f"; work dir {work}")
        flag = ["--insecure"] if insecure else []
        coord = _spawn("coordinator", ["coordinator", "--config", str(fed), *flag], logs)
        procs.append(coord)
        if insecure:
            admin = CoordinatorClient(f"127.0.0.1:{port}", Credentials(insecure_identity=f"admin:{ADMIN_NAME}"),
                                      max_backoff_s=1.0, quiet=True)
        else:
            c = work / "certs"
            admin = CoordinatorClient(f"localhost:{port}", Credentials(ca=c / "ca.pem", cert=c / f"{ADMIN_NAME}.pem",
                                                                       key=c / f"{ADMIN_NAME}.key"), max_backoff_s=1.0, quiet=True)
        agents = [_spawn(name, ["agent", "--config", str(cfg), *flag], logs) for name, cfg in zip(names, agent_cfgs)]
        procs += agents
        started = time.monotonic()
        status: dict[str, Any] = {}
        history: list[dict[str, Any]] = []
        with Live(console=console, refresh_per_second=2) as live:
            while True:
                if coord.popen.poll() is not None:
                    raise DemoError(f"the coordinator exited ({coord.popen.returncode}):\n{_tail(coord.log)}")
                status, history = admin.status(), admin.rounds()
                live.update(_table(status, history, started, hd95_unit, metrics))
                done = [a for a in agents if a.popen.poll() is not None]
                for a in done:
                    if a.popen.returncode != 0:
                        raise DemoError(f"agent {a.name} exited with {a.popen.returncode}:\n{_tail(a.log)}")
                if len(done) == len(agents):
                    break
                if time.monotonic() - started > timeout_s:
                    raise DemoError(f"the run did not finish within {timeout_s:.0f} s; logs in {logs}")
                time.sleep(0.5)
            status, history = admin.status(), admin.rounds()
            live.update(_table(status, history, started, hd95_unit, metrics))
        admin.close()
        console.print()
        if status["state"] != "finished":
            raise DemoError(f"run ended as {status['state']}: {status['message']}")
        results = results_from_rounds(history, rounds, metrics)
        results["run"] = {"silos": names, "rounds": rounds, "strategy": strategy, "seed": seed,
                          "transport": "insecure" if insecure else "mtls", "aggregation": aggregation,
                          "dp": dp, "model": the_model, "wall_seconds": round(time.monotonic() - started, 1)}
        if dp:
            results["run"]["accountant"] = accountant
        if dp:
            from fedsilo.privacy.audit import build_report, write_report

            report = build_report(work / "coordinator")
            json_path, html_path = write_report(report, out / "audit")
            results["privacy"] = {
                s["silo"]: {rel: c["spent"] for rel, c in s["cumulative"].items()}
                for s in report["silos"]}
            results["privacy_by_accountant"] = {
                s["silo"]: {rel: {"rdp": c["single_upload"], "pld": c["single_upload_pld"]}
                            for rel, c in s["cumulative"].items()}
                for s in report["silos"]}
            first = next((s["releases"][0] for s in report["silos"] if s["releases"]), None)
            if first is not None:
                results["run"]["noise_multiplier"] = first["noise_multiplier"]
            console.print(f"privacy audit report: {html_path} (verify with: fedsilo audit verify {json_path})")
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, out / "results.json")
        head = metrics[0]
        first, last = results["rounds"][0][f"mean_{head}"], results["rounds"][-1][f"mean_{head}"]
        console.print(f"mean {_label(head, hd95_unit)}: round 1 {first:.4f} -> round {rounds} {last:.4f}; "
                      f"unseen domain {results.get('unseen_domain', {}).get(head, float('nan')):.4f}")
        for silo, spent in results.get("privacy", {}).items():
            both = results["privacy_by_accountant"][silo]
            console.print(f"  {silo}: " + ", ".join(
                f"{rel}-level ε = {eps:.3f} by {accountant.upper()} (RDP {both[rel]['rdp']:.3f}, PLD "
                + ("n/a" if both[rel]["pld"] is None else f"{both[rel]['pld']:.3f}") + ")"
                for rel, eps in spent.items())
                + f" (δ = {DEMO_BUDGET['delta']:g}, budget {DEMO_BUDGET['epsilon']:g})")
        console.print(f"results: {out / 'results.json'}; logs: {logs}")
        return results
    finally:
        for p in procs:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()
        shutil.rmtree(work, ignore_errors=True)
