"""The ``fedsilo`` command line: certs, coordinator, pin-model, agent, status, demo.

Commands import torch only when they need it, so ``fedsilo certs`` and ``fedsilo coordinator``
run on a machine without torch.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import click

from fedsilo import __version__
from fedsilo.cli.audit import audit
from fedsilo.cli.common import fail as _fail
from fedsilo.cli.dashboard import dashboard
from fedsilo.cli.plugins import PluginError, load_plugins
from fedsilo.core.methods import method_names, methods
from fedsilo.privacy.accounting import BudgetAccountant
import fedsilo.silo_agent.methods  # noqa: F401 - registers the built-in methods
from fedsilo.silo_agent.bench.methods import GROUPED_REFERENCES, resolve, study_method_names, variable_tables
from fedsilo.silo_agent.bench.methods import methods as bench_methods

try:  # before the options below list the registered methods
    load_plugins()
    _PLUGIN_ERROR: PluginError | None = None
except PluginError as exc:
    _PLUGIN_ERROR = exc




@click.group()
@click.version_option(__version__, prog_name="fedsilo")
def main() -> None:
    """fedsilo: cross-silo federated learning for medical imaging."""
    if _PLUGIN_ERROR is not None:
        _fail(str(_PLUGIN_ERROR))


main.add_command(audit)
main.add_command(dashboard)


# -- certificates ------------------------------------------------------------------------
@main.group()
def certs() -> None:
    """Create the federation CA and issue certificates."""


@certs.command("init")
@click.option("--dir", "directory", type=click.Path(path_type=Path), default=Path("certs"), show_default=True,
              help="Folder for ca.pem and ca.key (keep ca.key offline).")
@click.option("--days", type=int, default=3650, show_default=True, help="CA validity in days.")
@click.option("--overwrite", is_flag=True, help="Replace an existing CA (invalidates every issued certificate).")
def certs_init(directory: Path, days: int, overwrite: bool) -> None:
    """Create the federation CA."""
    from fedsilo.privacy.pki import init_ca

    try:
        paths = init_ca(directory, valid_days=days, overwrite=overwrite)
    except (FileExistsError, ValueError) as exc:
        _fail(str(exc))
    click.echo(f"federation CA: {paths.cert} (key {paths.key}, mode 0600)")


@certs.command("issue")
@click.option("--dir", "directory", type=click.Path(path_type=Path), default=Path("certs"), show_default=True,
              help="Folder holding ca.pem and ca.key.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output folder (default: --dir).")
@click.option("--coordinator", "hosts", multiple=True, metavar="HOST",
              help="Issue the coordinator's server certificate for HOST (repeatable: DNS names or IPs).")
@click.option("--silo", metavar="NAME", help="Issue a silo (hospital) client certificate.")
@click.option("--admin", metavar="NAME", help="Issue an operator certificate for the admin service.")
@click.option("--days", type=int, default=365, show_default=True, help="Validity in days.")
@click.option("--overwrite", is_flag=True, help="Replace an existing certificate of that name.")
def certs_issue(directory: Path, out: Path | None, hosts: tuple[str, ...], silo: str | None, admin: str | None,
                days: int, overwrite: bool) -> None:
    """Issue a certificate signed by the federation CA."""
    from fedsilo.privacy.pki import CertificateError, Role, issue_certificate

    chosen = [x for x in (bool(hosts), silo is not None, admin is not None) if x]
    if len(chosen) != 1:
        _fail("give exactly one of --coordinator HOST, --silo NAME, --admin NAME")
    if hosts:
        role, name = Role.COORDINATOR, "coordinator"
    elif silo is not None:
        role, name = Role.SILO, silo
    else:
        role, name = Role.ADMIN, str(admin)
    try:
        paths = issue_certificate(directory, out or directory, role=role, name=name, hosts=hosts,
                                  valid_days=days, overwrite=overwrite)
    except (FileExistsError, FileNotFoundError, ValueError, CertificateError) as exc:
        _fail(str(exc))
    click.echo(f"{role.value} certificate: {paths.cert} (key {paths.key}, mode 0600)")


# -- daemons -----------------------------------------------------------------------------
_INSECURE_HELP = "Allow plaintext gRPC without TLS, as the config's insecure = true asks (development only)."


def _check_insecure(config_insecure: bool, flag: bool, key: str) -> None:
    """Plaintext needs both the config key and the command-line flag, so it is never an accident."""
    if config_insecure and not flag:
        _fail(f"{key} = true turns TLS off; pass --insecure as well if that is really intended")
    if flag and not config_insecure:
        _fail(f"--insecure given but the config does not set {key} = true; TLS settings would be ignored")


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True,
              help="federation.toml")
@click.option("--insecure", is_flag=True, help=_INSECURE_HELP)
def coordinator(config_path: Path, insecure: bool) -> None:
    """Run the coordinator service (no torch needed)."""
    from fedsilo.coordinator.config import ConfigError
    from fedsilo.coordinator.loading import load_federation_config
    from fedsilo.coordinator.server import serve

    try:
        cfg = load_federation_config(config_path)
        _check_insecure(cfg.insecure, insecure, "server.insecure")
        code = serve(cfg)
    except ConfigError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot start the coordinator: {exc}", 1)
    sys.exit(code)


@main.command("pin-model")
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True,
              help="federation.toml")
@click.option("--base-checkpoint", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="The frozen base of a LoRA run: the file the silos name as model.base_checkpoint.")
def pin_model(config_path: Path, base_checkpoint: Path | None) -> None:
    """Print the [run] lines that pin the study's model: built from the config as every agent builds it
    (needs torch), its fingerprint and the SHA-256 of its shared tensors."""
    from fedsilo.coordinator.config import ConfigError
    from fedsilo.coordinator.loading import load_federation_config

    try:
        cfg = load_federation_config(config_path)
    except ConfigError as exc:
        _fail(str(exc))
    from fedsilo.silo_agent.model_pin import ModelSettingsError, run_model_of_config
    from fedsilo.silo_agent.strategy import StrategyError

    if cfg.method.uses_lora and base_checkpoint is None:
        click.echo(f"note: run.strategy {cfg.strategy!r} trains LoRA adapters on a frozen base; without "
                   "--base-checkpoint this pins a freshly initialised base, which silos with a "
                   "model.base_checkpoint do not build", err=True)
    try:
        built = run_model_of_config(cfg, base_checkpoint=base_checkpoint)
    except ModelSettingsError as exc:
        _fail(f"model: the [model] settings of {config_path} are invalid for Task {cfg.task!r}: {exc}", 1)
    except StrategyError as exc:
        _fail(str(exc), 1)
    click.echo(f"# the model of run {cfg.run_id} ({cfg.task}, {cfg.strategy}, fedsilo {__version__}): "
               f"{len(built.shared)} shared tensors, {built.manifest.numel} parameters; paste under [run]")
    click.echo(built.pin_lines(), nl=False)
    if cfg.model_fingerprint is not None:
        same = (cfg.model_fingerprint, cfg.shared_tensors_sha256) == (built.fingerprint, built.manifest.digest())
        click.echo(f"note: {config_path} already pins " + ("this model" if same else
                   f"another model ({cfg.model_fingerprint[:12]}…): silos that build this one will be refused"),
                   err=True)


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True, help="silo.toml")
@click.option("--insecure", is_flag=True, help=_INSECURE_HELP)
@click.option("--node-rank", type=click.IntRange(min=0), default=0, show_default=True,
              help="This machine's place in a training group of agent.nodes machines (0: the agent's).")
def agent(config_path: Path, insecure: bool, node_rank: int) -> None:
    """Run a silo agent daemon (with agent.gpus or agent.nodes > 1: its training group, under torchrun)."""
    from fedsilo.coordinator.config import ConfigError
    from fedsilo.silo_agent.config import load_agent_config

    try:
        cfg = load_agent_config(config_path)
    except ConfigError as exc:
        _fail(str(exc))
    _check_insecure(cfg.insecure, insecure, "agent.insecure")
    if node_rank >= cfg.nodes:
        _fail(f"--node-rank {node_rank}: agent.nodes = {cfg.nodes} (node ranks 0..{cfg.nodes - 1})")
    from fedsilo.silo_agent import training_group

    if cfg.group_size > 1 and not training_group.in_group():
        try:
            training_group.check_devices(str(cfg.device), cfg.gpus)
        except training_group.GroupError as exc:
            _fail(str(exc), 1)
        cmd = training_group.torchrun_command(config_path=config_path.resolve(), gpus=cfg.gpus, nodes=cfg.nodes,
                                              master=cfg.master, node_rank=node_rank, insecure=insecure)
        click.echo(f"starting the training group ({cfg.gpus} process(es) on this node, {cfg.nodes} node(s)): "
                   + " ".join(cmd), err=True)
        sys.stdout.flush()
        os.execvpe(cmd[0], cmd, {**os.environ, training_group.GROUP_ENV: "1"})
    from fedsilo.coordinator.server import setup_logging
    from fedsilo.silo_agent.daemon import Agent, AgentError, load_data

    group = None
    if training_group.in_group():
        rank = int(os.environ["RANK"])
        setup_logging(Path(cfg.state_dir), "agent.log" if rank == 0 else f"trainer-rank{rank}.log")
        try:
            group = training_group.TrainingGroup.join(str(cfg.device))
        except training_group.GroupError as exc:
            _fail(str(exc), 1)
    else:
        setup_logging(Path(cfg.state_dir), "agent.log")
    if group is not None and group.rank > 0:  # a trainer: no coordinator, no keys, no ledger
        if cfg.threads:
            import torch

            torch.set_num_threads(cfg.threads)
        try:
            code = training_group.serve(group, lambda task: load_data(cfg.data, task).splits.train)
        finally:
            group.close()
        sys.exit(code)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    from fedsilo.silo_agent.metrics import AgentMetrics, serve

    metrics = AgentMetrics()
    endpoint = None
    if cfg.metrics is not None:
        try:
            endpoint = serve(metrics, cfg.metrics)
        except OSError as exc:
            if group is not None:
                group.close()
            _fail(f"cannot start the agent: {exc}", 1)
    try:
        code = Agent(cfg, stop=stop, group=group, metrics=metrics).run()
    except AgentError as exc:
        _fail(str(exc), 1)
    finally:
        if endpoint is not None:
            endpoint.stop()
        if group is not None:
            group.close()
    sys.exit(code)


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True, help="silo.toml")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="File to write (torch format).")
def export(config_path: Path, out: Path) -> None:
    """Export this silo's model after the run.

    A model leaves the federation through a silo, which decrypted the aggregates itself; the
    coordinator never holds a decrypted model (and never receives a decryption of what it holds).
    """
    from fedsilo.coordinator.config import ConfigError
    from fedsilo.silo_agent.config import load_agent_config
    from fedsilo.silo_agent.export import ExportError, export_model

    try:
        cfg = load_agent_config(config_path)
        info = export_model(Path(cfg.state_dir), out)
    except (ConfigError, ExportError) as exc:
        _fail(str(exc))
    click.echo(f"exported run {info['run_id']} after round {info['round']} to {out}")


@main.command()
@click.option("--coordinator", "address", required=True, help="host:port")
@click.option("--ca", type=click.Path(path_type=Path, exists=True), required=True)
@click.option("--cert", type=click.Path(path_type=Path, exists=True), required=True, help="An admin certificate.")
@click.option("--key", type=click.Path(path_type=Path, exists=True), required=True)
def status(address: str, ca: Path, cert: Path, key: Path) -> None:
    """Print the run's status and round history as JSON (admin certificate)."""
    import grpc

    from fedsilo.silo_agent.client import CoordinatorClient, Credentials

    client = CoordinatorClient(address, Credentials(ca=ca, cert=cert, key=key), retry=False)
    try:
        out = {"status": client.status(), "rounds": client.rounds()}
    except grpc.RpcError as err:
        _fail(f"{err.code().name}: {err.details()}", 1)
    finally:
        client.close()
    click.echo(json.dumps(out, indent=2))


def _parse_json_object(ctx: click.Context, param: click.Parameter, value: str | None) -> dict | None:
    """The callback of ``--model-json`` (``fedsilo demo`` and ``fedsilo bench``) and ``--data-json`` (``fedsilo
    bench``): the JSON object, or None.

    Its entries are checked against the Task's model config or data loader by the command (``demo.model_table``,
    ``BenchConfig``), once the Task is known. A value that is not a JSON object is a usage error (exit 2)
    before anything starts.
    """
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        _fail(f"{param.opts[0]} is not JSON: {exc}")
    if not isinstance(parsed, dict):
        example = '{"modalities": "both"}' if param.name == "data_json" else '{"norm": "pn"}'
        kind = "[data] options" if param.name == "data_json" else "[model] keys"
        _fail(f"{param.opts[0]} must be a JSON object of {kind}, e.g. '{example}'; got {value!r}")
    return parsed


def _method_tables() -> list[str]:
    """The method tables a bench variant may vary, over every study method (sorted): each method's own."""
    return sorted({t for m in bench_methods().values() for t in variable_tables(m)} - {"training", "model"})


def _model_json_option(help_text: str):  # noqa: ANN202 - a click decorator
    """The ``--model-json JSON`` option, parsed by :func:`_parse_json_object` (the same for demo and bench)."""
    return click.option("--model-json", "model_json", default=None, metavar="JSON", callback=_parse_json_object,
                        help=help_text)


@main.command()
@click.option("--silos", type=click.IntRange(1, 16), default=3, show_default=True, help="Number of silo agents.")
@click.option("--rounds", type=click.IntRange(1, 1000), default=5, show_default=True)
@click.option("--strategy", type=click.Choice(method_names()), default="fedavg", show_default=True,
              help="The method (registered in fedsilo.core.methods): " + "; ".join(
                  f"{m.name}: {m.summary}" for m in methods()) + ".")
@click.option("--out", type=click.Path(path_type=Path), default=Path("fedsilo-demo"), show_default=True,
              help="Where results.json (and the run's logs) go.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--aggregation", type=click.Choice(["he", "plain"]), default="he", show_default=True,
              help="he: the coordinator adds ciphertexts it cannot read; plain: it sees every update (insecure).")
@click.option("--insecure", is_flag=True,
              help="Plaintext gRPC without TLS (development only; needs --aggregation plain and --no-dp).")
@click.option("--dp/--no-dp", default=True, show_default=True,
              help="Record-level DP-SGD with per-silo ledgers and an audit report in OUT/audit.")
@click.option("--task", "task_name", default="segmentation-2d", show_default=True,
              help="The registered Task (its built-in data and default model), e.g. segmentation-3d.")
@_model_json_option('Model options as a JSON object, e.g. \'{"norm": "pn"}\' (population normalization): each '
                    "entry replaces or adds that key of the run's [model] table (the demo UNet, or the Task's "
                    "default model); the others stay. The run is pinned to the changed model.")
@click.option("--accountant", type=click.Choice([a.value for a in BudgetAccountant]), default="rdp", show_default=True,
              help="Whose ε the DP plan's σ is calibrated against and the hospitals' budgets are enforced on "
                   "(every ledger entry states both).")
def demo(silos: int, rounds: int, strategy: str, out: Path, seed: int, aggregation: str, insecure: bool,
         dp: bool, task_name: str, model_json: dict | None, accountant: str) -> None:
    """Run a whole federation on this machine: CA, coordinator and agents as processes, mTLS on loopback."""
    from fedsilo.models.tasks import get_task
    from fedsilo.silo_agent.demo import DemoError, model_table, run_demo

    try:
        get_task(task_name)
    except ValueError as exc:
        _fail(f"--task: {exc}")
    try:
        model_table(task_name, seed, model_json)
    except ValueError as exc:
        _fail(f"--model-json: {exc}")
    try:
        run_demo(silos=silos, rounds=rounds, strategy=strategy, out=out, seed=seed, insecure=insecure,
                 aggregation=aggregation, dp=dp, task=task_name, model=model_json, accountant=accountant)
    except DemoError as exc:
        _fail(str(exc), 1)


# -- base checkpoints for LoRA -----------------------------------------------------------
def _json_mapping(option: str, text: str | None) -> dict:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        _fail(f"{option}: not valid JSON: {exc}")
    if not isinstance(value, dict):
        _fail(f"{option}: expected a JSON object, got {text!r}")
    return value


@main.command()
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="Checkpoint file to write (torch format, as `fedsilo export` writes).")
@click.option("--domain", type=int, default=None, help="Built-in source domain (default 16: outside every demo silo).")
@click.option("--epochs", type=int, default=None, help="Training epochs (default 30).")
@click.option("--seed", type=int, default=None, help="Seed of the built-in data; use the federation's (default 0).")
@click.option("--model", "model_json", default=None, metavar="JSON",
              help='Model config as a JSON object, e.g. \'{"architecture": "unetr"}\' (default: the default UNet).')
@click.option("--training", "training_json", default=None, metavar="JSON",
              help='Training config as a JSON object, e.g. \'{"lr": 0.001}\'.')
@click.option("--image-size", type=int, default=None, help="Image height and width (default 64).")
@click.option("--n-train", type=int, default=None, help="Source training images (default 48).")
@click.option("--n-test", type=int, default=None, help="Source test images for the Dice (default 24).")
@click.option("--data", "folder", type=click.Path(path_type=Path), default=None,
              help="Pretrain on your own data instead: a folder of images/ + masks/ (or a MONAI datalist JSON), "
                   "like the federation's but holding none of its silos' patients.")
def pretrain(out: Path, domain: int | None, epochs: int | None, seed: int | None, model_json: str | None,
             training_json: str | None, image_size: int | None, n_train: int | None, n_test: int | None,
             folder: Path | None) -> None:
    """Pretrain a base network on one built-in domain, or on your own data (--data): the frozen base of a
    LoRA run (no downloads)."""
    import time

    from fedsilo.models.pretrain import PretrainConfig, pretrain as run_pretrain, save_checkpoint

    values: dict = {"model": _json_mapping("--model", model_json),
                    "training": _json_mapping("--training", training_json)}
    if folder is not None:
        given = [f"--{k.replace('_', '-')}" for k, v in (("domain", domain), ("n_train", n_train), ("n_test", n_test))
                 if v is not None]
        if given:
            _fail(f"{', '.join(given)}: settings of the built-in data; with --data the folder gives the images")
        if not folder.exists():
            _fail(f"--data: {folder} does not exist")
        values["folder"] = str(folder)
    for key, value in (("domain", domain), ("epochs", epochs), ("seed", seed), ("image_size", image_size),
                       ("n_train", n_train), ("n_test", n_test)):
        if value is not None:
            values[key] = value
    model = values["model"]
    if (image_size is not None and "image_size" not in model
            and str(model.get("architecture", "")).strip().lower() == "unetr"):
        model["image_size"] = image_size  # UNETR is built for one image size: follow --image-size
    try:
        cfg = PretrainConfig.from_mapping(values)
    except ValueError as exc:
        _fail(str(exc))
    started = time.perf_counter()
    try:
        ckpt = run_pretrain(cfg)
    except (ValueError, OSError) as exc:
        _fail(f"--data: {exc}" if cfg.folder is not None else str(exc), 1)
    seconds = time.perf_counter() - started
    try:
        save_checkpoint(ckpt, out)
    except OSError as exc:
        _fail(f"cannot write {out}: {exc}", 1)
    info = ckpt["pretrain"]
    source = (f"{cfg.folder} (split seed {cfg.seed}, images resized to {cfg.image_size}x{cfg.image_size}"
              if cfg.folder is not None else
              f"built-in domain {cfg.domain} (data seed {cfg.seed}, {cfg.n_train} images of "
              f"{cfg.image_size}x{cfg.image_size}")
    click.echo(f"pretrained {cfg.model.architecture.value} ({info['parameters']} parameters) on {source}, "
               f"{cfg.epochs} epochs) in {seconds:.1f} s")
    click.echo(f"source-domain test Dice {info['dice']:.4f} (HD95 {info['hd95']:.2f} px, {info['n_test']} images)")
    click.echo(f"base checkpoint: {out} (run {ckpt['run_id']})")


@main.command()
@click.option("--methods", "methods_csv", default="fedavg,fedbn,resfim", show_default=True,
              help="Comma-separated methods: " + ", ".join(study_method_names()) + " ('all' for every one of them "
                   "the Task can run, alone or with variants; " + ", ".join(sorted(GROUPED_REFERENCES)) + " only for a "
                   "Task whose silos have groups, e.g. species), or variants base@table.key=value[&...], table "
                   "training, model or one of the base method's own tables (" + ", ".join(_method_tables()) + ") "
                   "(e.g. fedavg@model.norm=pn: FedAvg of the study's model with population normalization; "
                   "moon@moon.mu=5), each a row of its own.")
@click.option("--seeds", default="1", show_default=True,
              help="A count (3 = seeds 0, 1, 2) or a comma-separated list of seeds.")
@click.option("--rounds", type=int, default=10, show_default=True, help="Rounds of the main schedule.")
@click.option("--local-epochs", type=int, default=1, show_default=True, help="Local epochs per round (main schedule).")
@click.option("--sweep", default=None,
              help="Communication-frequency sweep, e.g. 40x1,20x2,10x4,5x8 (rounds x local epochs, same product "
                   "as the main schedule). Default: every split with at most 8 local epochs; 'none' for none.")
@click.option("--silos", type=int, default=3, show_default=True, help="Silos (built-in data: domains 0..n-1).")
@click.option("--aggregation", type=click.Choice(["he", "plain"]), default="he", show_default=True)
@click.option("--dp/--no-dp", default=False, show_default=True,
              help="Record-level DP-SGD (each method's plan, epsilon <= 8 per run); the table reports epsilon per silo.")
@click.option("--mu", type=float, default=0.01, show_default=True, help="FedProx's mu.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="A user dataset: one sub-folder per silo (images/ + masks/, or a datalist), instead of the "
                   "built-in data.")
@click.option("--held-out", default=None, help="With --data: the sub-folder of a domain no silo trains on.")
@click.option("--data-json", "data_json", default=None, metavar="JSON", callback=_parse_json_object,
              help="Options of the Task's data loader as a JSON object, given to every silo (built-in or --data), "
                   "e.g. '{\"modalities\": \"both\"}' (the glaucoma Task's clinics all with OCT).")
@click.option("--task", "task_name", default="segmentation-2d", show_default=True,
              help="The registered Task every run learns ([run] task); reports name its headline metric.")
@_model_json_option("The runs' whole [model] table as a JSON object (default: the demo UNet for segmentation-2d, "
                    "else the Task's default model config, each seed its own weights); a method variant's "
                    "model.key=value entries replace entries of it.")
@click.option("--base", type=click.Path(path_type=Path), default=None,
              help="The LoRA methods' frozen base: a checkpoint of the runs' model (`fedsilo pretrain --data` on "
                   "data like yours). Default: pretrained on a built-in synthetic domain.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("fedsilo-bench"), show_default=True,
              help="Output folder: results.csv, summary.md, plots; finished cells are kept and reused.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Run the cells as Ray tasks: on a local Ray instance (no ADDRESS) or the cluster at ADDRESS "
                   "(e.g. auto, ray://head:10001). Same cells, results and reports as a serial run. "
                   "Needs pip install 'fedsilo[cluster]'.")
@click.option("--cell-cpus", type=float, default=1, show_default=True, help="With --ray: CPUs reserved per cell.")
@click.option("--cell-gpus", type=float, default=0, show_default=True, help="With --ray: GPUs reserved per cell.")
def bench(methods_csv: str, seeds: str, rounds: int, local_epochs: int, sweep: str | None, silos: int,
          aggregation: str, dp: bool, mu: float, data_dir: Path | None, held_out: str | None,
          data_json: dict | None, task_name: str, model_json: dict | None, base: Path | None, out: Path,
          ray_address: str | None, cell_cpus: float, cell_gpus: float) -> None:
    """Compare methods on the same data, measured the same way (simulated in one process through the
    deployed coordinator, agents, aggregation, DP and ledgers). Resumable: run it again to continue."""
    from fedsilo.silo_agent.bench.runner import (
        BenchConfig,
        BenchError,
        default_sweep,
        parse_seeds,
        parse_sweep,
        run_study,
    )

    try:
        items = [m.strip() for m in methods_csv.split(",") if m.strip()]
        named = set(items)  # 'all' adds every study method not named beside it; a name given twice is refused
        try:
            runnable = study_method_names(task_name)
        except ValueError:  # an unknown Task: BenchConfig names it
            runnable = study_method_names()
        names = tuple(n for m in items for n in ([s for s in runnable if s not in named] if m == "all" else [m]))
        if sweep is None:
            schedules = default_sweep(rounds, local_epochs) if rounds >= 1 and local_epochs >= 1 else ()
        elif sweep.strip().lower() == "none":
            schedules = ()
        else:
            schedules = parse_sweep(sweep)
        cfg = BenchConfig(methods=names, seeds=parse_seeds(seeds), rounds=rounds, local_epochs=local_epochs,
                          sweep=schedules, silos=silos, aggregation=aggregation, dp=dp, mu=mu, data=data_dir,
                          held_out=held_out, data_options=data_json, task=task_name, model=model_json, base=base,
                          out=out)
        executor = None
        if ray_address is not None:
            from fedsilo.silo_agent.bench.ray_runner import ray_executor

            executor = ray_executor(ray_address or None, cell_cpus=cell_cpus, cell_gpus=cell_gpus)
        elif (cell_cpus, cell_gpus) != (1, 0):
            raise BenchError("--cell-cpus/--cell-gpus: they apply to --ray only")
    except BenchError as exc:
        _fail(str(exc))
    lora = [m for m in cfg.methods if resolve(m, task=cfg.task, model=cfg.model).lora]
    if lora and data_dir is not None and base is None:
        click.echo(f"warning: {', '.join(lora)} fine-tune(s) a base pretrained on the built-in synthetic images, "
                   "unrelated to your data; pass --base (made with `fedsilo pretrain --data`) for a fair comparison",
                   err=True)
    started = time.perf_counter()
    try:
        written = run_study(cfg, executor=executor)
    except BenchError as exc:
        _fail(str(exc), 3)
    click.echo(f"fedsilo bench: {len(cfg.methods)} method(s) x {len(cfg.seeds)} seed(s) x "
               f"{len(cfg.schedules)} schedule(s) in {time.perf_counter() - started:.0f} s")
    for path in written:
        click.echo(f"  {path}")


if __name__ == "__main__":
    main()
