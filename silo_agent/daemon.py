"""The silo agent: joins a run, trains each round, uploads, applies aggregates, evaluates, reports."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import torch
from torch.utils.data import Dataset

from fedsilo import __version__
from fedsilo.core.tensors import Manifest
from fedsilo.coordinator.config import DEFAULT_TASK
from fedsilo.coordinator.records import MAX_METRICS
from fedsilo.models import Precision, TrainConfig
from fedsilo.models.tasks import SiloData, Task, get_task
from fedsilo.privacy.pki import CertificateError, Role, check_certificate
from fedsilo.silo_agent.client import CoordinatorClient, Credentials, Stopped, TlsRefused
from fedsilo.silo_agent.config import AgentConfig, DataConfig
from fedsilo.silo_agent.metrics import AgentMetrics
from fedsilo.silo_agent.state import AgentState
from fedsilo.coordinator.config import AggregationMode
from fedsilo.privacy.he import HeError, HeParams
from fedsilo.silo_agent.secure import HeSession, KeyCeremonyError
from fedsilo.silo_agent.model_pin import ModelSettingsError, RunModel, build_run_model
from fedsilo.silo_agent.strategy import RunContext, StrategyError
from fedsilo.core.phases import SharePhase, phase_manifest
from fedsilo.silo_agent.wire import Activity, Aggregate, RunInfo
from fedsilo.silo_agent.privacy import PrivacyError, PrivacySession
from fedsilo.silo_agent.training_group import TrainingGroup, TrainJob, train_job

log = logging.getLogger("fedsilo.agent")

EXIT_OK = 0
EXIT_RUN_FAILED = 3


class AgentError(Exception):
    """A condition the agent cannot continue from; the message says what to fix."""


def load_data(cfg: DataConfig, task: Task | None = None) -> SiloData:
    """Loads the silo's data as configured, the way the run's Task reads it (default: 2-D segmentation).

    Raises:
        AgentError: a bad data setting or unreadable folder.
    """
    task = task if task is not None else get_task(DEFAULT_TASK)
    try:
        return task.load_data(cfg)
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise AgentError(f"data: {exc}") from None


def _len(ds: Dataset) -> int:
    return len(ds)  # type: ignore[arg-type]


class Agent:
    """One silo's daemon.

    Args:
        cfg: the validated agent config.
        stop: set it (e.g. from a SIGTERM handler) to stop at the next safe point.
        connect: makes the coordinator client from (address, credentials, stop); the default dials
            gRPC. ``fedsilo bench`` passes an in-process transport to the same servicers.
        unseen_every_round: evaluate the unseen domain after every round, not only the last
            (``fedsilo bench`` selects models by validation Dice over rounds).
        group: the silo's training group when this agent is its rank 0 (``agent.gpus`` or
            ``agent.nodes`` > 1): local training runs on every rank of it, on this rank's device.
        metrics: where the agent records training time, uploads, rounds and ε (``fedsilo agent`` serves
            it at ``[metrics] listen``); None: an unserved recorder of its own.
    """

    def __init__(self, cfg: AgentConfig, *, stop: threading.Event | None = None,
                 connect: Callable[[str, Credentials, threading.Event], CoordinatorClient] | None = None,
                 unseen_every_round: bool = False, group: TrainingGroup | None = None,
                 metrics: AgentMetrics | None = None) -> None:
        self.cfg = cfg
        self._metrics = metrics if metrics is not None else AgentMetrics()
        self._group = group
        self.stop = stop or threading.Event()
        self._connect = connect or (lambda address, creds, stop: CoordinatorClient(address, creds, stop=stop))
        self._unseen_every_round = unseen_every_round
        self._round = 0
        self._activity = Activity.IDLE
        self._name = cfg.name or ""
        self._he: HeSession | None = None
        self._manifest: Manifest | None = None
        self._dp: PrivacySession | None = None
        self._ctx: RunContext | None = None
        self._beat: threading.Thread | None = None
        self._beat_stop = threading.Event()
        self._run_id: str | None = None
        self._signer = None
        self._device = torch.device("cpu")  # where training and evaluation run; set from agent.device by run()

    def _credentials(self) -> Credentials:
        if self.cfg.insecure:
            log.warning("INSECURE: talking plaintext gRPC to the coordinator, without TLS or a certificate")
            return Credentials(insecure_identity=f"{Role.SILO.value}:{self.cfg.name}")
        tls = self.cfg.tls
        assert tls is not None
        try:
            ident = check_certificate(Path(tls.cert), Path(tls.ca), key_path=Path(tls.key))
        except CertificateError as exc:
            raise AgentError(f"certificate check failed: {exc}") from None
        if ident.role is not Role.SILO:
            raise AgentError(f"{tls.cert} is a {ident.role.value} certificate; an agent needs a silo certificate")
        log.info("this is silo %s (from %s)", ident.name, tls.cert)
        self._name = ident.name
        return Credentials(ca=Path(tls.ca), cert=Path(tls.cert), key=Path(tls.key))

    def run(self) -> int:
        """Runs until the run ends or ``stop`` is set.

        Returns:
            EXIT_OK when the run finished (or the agent was stopped), EXIT_RUN_FAILED when the
            coordinator ended the run as failed.

        Raises:
            AgentError: a condition that needs a person (bad certificate, bad config, refused join).
        """
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        self._device = self._group.device if self._group is not None else self._training_device()
        client = self._connect(self.cfg.coordinator, self._credentials(), self.stop)
        try:
            return self._run(client)
        except Stopped:
            log.info("stopped")
            return EXIT_OK
        except (TlsRefused, StrategyError) as exc:
            raise AgentError(str(exc)) from None
        except grpc.RpcError as err:
            raise AgentError(f"the coordinator refused: {err.code().name}: {err.details()}") from None
        finally:
            self._stop_heartbeats()  # before the channel closes under a heartbeat in flight
            client.close()

    def _training_device(self) -> torch.device:
        """The torch device of ``agent.device``; the model visits it for training and evaluation only.

        Raises:
            AgentError: the setting names a device this process cannot use (e.g. ``"cuda"`` without CUDA).
        """
        from fedsilo.models.training import resolve_device

        try:
            device = resolve_device(str(self.cfg.device))
        except ValueError as exc:
            raise AgentError(f"agent.device = {str(self.cfg.device)!r}: {exc}") from None
        log.info("training and evaluation on %s (agent.device = %r)", device, str(self.cfg.device))
        return device

    def _run(self, client: CoordinatorClient) -> int:
        info = client.get_run()
        self._run_id = info.run_id
        built, train_cfg = self._build(info)
        model, fingerprint, shared = built.model, built.fingerprint, list(built.shared)
        data = load_data(self.cfg.data, self._task)
        n_train = _len(data.splits.train)
        manifest = built.manifest  # what the study's run.shared_tensors_sha256 pins
        method = self._strategy
        method.hold_modalities(getattr(data.splits.train, "modalities", None), manifest=manifest,
                               silo_level_dp=info.privacy is not None and info.privacy.silo_level)
        lacking = method.lacking_modalities(manifest)
        if lacking:
            log.info("this silo's data has no %s: it neither trains nor uploads those tensors (zeros and a "
                     "count of 0; the federation averages them over the silos that have it)", ", ".join(lacking))
        state_dir = Path(self.cfg.state_dir)
        state = self._open_state(info, model, fingerprint, shared)
        model.load_state_dict(state.model)
        self._manifest = manifest
        if info.aggregation is AggregationMode.HE:
            if self.cfg.tls is None:
                raise AgentError("the run uses HE aggregation, which needs this silo's TLS certificate and key")
            try:
                params = HeParams.from_bytes(info.he_parameters)
            except ValueError as exc:
                raise AgentError(f"the coordinator sent HE parameters this agent refuses: {exc}") from None
            self._he = HeSession(run_id=info.run_id, me=self._name, params=params, key_holder=info.key_holder,
                                 state_dir=state_dir, tls=self.cfg.tls)
        if info.privacy is not None:
            try:
                self._dp = PrivacySession.open(cfg=self.cfg, plan=info.privacy, run_id=info.run_id,
                                               silo=self._name, n_train=n_train, strategy=info.strategy)
            except PrivacyError as exc:
                raise AgentError(str(exc)) from None
        silo_name = client.join(fingerprint=fingerprint, num_train_examples=n_train, manifest=manifest,
                                agent_version=__version__,
                                kem_announcement=self._he.announcement if self._he else b"",
                                budget_statement=self._dp.budget_statement if self._dp else b"")
        if self._dp is not None:
            self._dp.sync(client)
            log.info("privacy: %s", self._dp.describe())
            self._metrics.privacy(self._dp.spent(), self._dp.budget.epsilon)
        self._metrics.round_done(state.done_round)
        self._metrics.applied(state.applied_round)
        log.info("joined run %s as %s: %s, %d rounds, %d of %d tensors shared (%d parameters)", info.run_id,
                 silo_name, info.strategy, info.total_rounds, len(shared), len(state.model),
                 manifest.numel)
        self._beat = threading.Thread(target=self._heartbeats, args=(client,), name="heartbeat", daemon=True)
        self._beat.start()
        holder = self._he is not None and self._he.is_key_holder
        if self._he is not None:
            try:
                self._he.ensure_key(client, self.stop)
            except KeyCeremonyError as exc:
                raise AgentError(str(exc)) from None
        if method.needs_he and self._he is None:
            raise AgentError(f"strategy {info.strategy} needs HE aggregation ({method.needs_he})")
        disclosures = [*self._strategy.disclosures(train=data.splits.train, plan=self._dp.plan if self._dp else None),
                       *method.modality_disclosures(manifest, he=self._he is not None)]
        if self._dp is not None and disclosures:  # what this silo's audit reports state beside the ledger
            from fedsilo.privacy.audit import write_disclosures

            write_disclosures(state_dir, disclosures)
        self._ctx = RunContext(client=client, he=self._he, train=data.splits.train, state=state, state_dir=state_dir,
                               stop=self.stop, idle=self._serve_keys(client), privacy=self._dp,
                               train_cfg=train_cfg)
        try:
            self._strategy.prepare(self._ctx)
        except PrivacyError as exc:
            raise AgentError(str(exc)) from None
        while True:
            self._activity = Activity.IDLE
            if holder:
                assert self._he is not None
                self._he.serve_recipients(client)
            task = client.get_task(state.done_round, wait_s=2 if holder else 10)
            if task.kind == "wait":
                continue
            target = task.last_closed_round if task.kind == "stop" else task.base_round
            self._catch_up(client, model, state, data, target, info.total_rounds)
            if task.kind == "stop":
                if task.failed:
                    log.error("the coordinator ended the run: %s", task.message)
                    return EXIT_RUN_FAILED
                log.info("run finished: %s", task.message)
                return EXIT_OK
            self._train_round(client, model, state, data, task.round, train_cfg, n_train,
                              task.weight_normalizer, task.phase)

    def _build(self, info: RunInfo) -> tuple[RunModel, TrainConfig]:
        """The run's Task, strategy and network with its fingerprint and shared manifest, built by the
        one rule `fedsilo pin-model` uses too (``model_pin.build_run_model``), and its training settings."""
        invalid = "the run's model/training settings are invalid for this agent"
        try:
            built = build_run_model(task=info.task, model_config=info.model_config, strategy=info.strategy,
                                    tables=info.tables,
                                    record_level=info.privacy is not None and info.privacy.record_level,
                                    base_checkpoint=self.cfg.base_checkpoint)
        except ModelSettingsError as exc:
            raise AgentError(f"{invalid}: {exc}") from None
        try:
            train_cfg = TrainConfig.from_mapping(info.training_config)
        except ValueError as exc:
            raise AgentError(f"{invalid}: {exc}") from None
        self._task, self._strategy, self._train_cfg = built.task, built.strategy, train_cfg
        if self.cfg.precision is not Precision.FP32 and info.privacy is not None and info.privacy.record_level:
            log.warning("agent.precision = %r does not apply to this run: DP-SGD trains in float32",
                        self.cfg.precision.value)
        self._total_rounds = info.total_rounds
        self._trainable = frozenset(n for n, p in built.model.named_parameters() if p.requires_grad)
        return built, train_cfg

    def _open_state(self, info: RunInfo, model: torch.nn.Module, fingerprint: str, shared: list[str]) -> AgentState:
        """This silo's persistent state: new for a new run, resumed for the same run and model, else refused."""
        state_dir = Path(self.cfg.state_dir)
        state = AgentState.load(state_dir)
        if state is None:
            sd = model.state_dict()
            state = AgentState(run_id=info.run_id, fingerprint=fingerprint, model_config=dict(info.model_config),
                               global_shared={k: sd[k].detach().clone() for k in shared},
                               model={k: v.detach().clone() for k, v in sd.items()})
            state.save(state_dir)
        elif state.run_id != info.run_id or state.fingerprint != fingerprint:
            raise AgentError(f"state dir {state_dir} belongs to run {state.run_id!r} with model "
                             f"{state.fingerprint[:12]}…, not run {info.run_id!r} with model {fingerprint[:12]}…; "
                             "use a new agent.state_dir for a new run")
        else:
            log.info("resuming: aggregates applied up to round %d, last round done %d",
                     state.applied_round, state.done_round)
        return state

    def _heartbeats(self, client: CoordinatorClient) -> None:
        while not self._beat_stop.wait(self.cfg.heartbeat_s) and not self.stop.is_set():
            try:
                client.heartbeat(self._round, self._activity)
            except grpc.RpcError:
                pass

    def _stop_heartbeats(self) -> None:
        """Ends the heartbeat thread and waits for a heartbeat in flight, so the client can close.

        (Closing the channel under a call in flight made a finished agent abort at exit.)"""
        self._beat_stop.set()
        if self._beat is not None:
            self._beat.join(timeout=30)

    def _catch_up(self, client: CoordinatorClient, model: torch.nn.Module, state: AgentState,
                  data: SiloData, target: int, total_rounds: int) -> None:
        """Applies aggregates up to ``target`` in order, then evaluates and reports once."""
        self._activity = Activity.EVALUATING
        while state.applied_round < target:
            rnd = state.applied_round + 1
            agg = client.fetch(rnd)
            if agg.failed:
                log.error("round %d failed; skipping it (this silo keeps its model from the last good round): %s",
                          rnd, agg.failed)
            else:
                problem = self._apply(agg, state, rnd, total_rounds)
                if problem is None:
                    log.info("applied aggregate of round %d (%d contributors)", rnd, agg.num_contributors)
                else:
                    failed = client.report_aggregate_failure(rnd, problem)
                    log.error("round %d: the aggregate is unusable (%s); reported to the coordinator (round marked "
                              "failed: %s) and skipped: this silo keeps its model from the last good round",
                              rnd, problem, "yes" if failed else "not yet")
            state.applied_round = rnd
            state.save(Path(self.cfg.state_dir))
            self._metrics.applied(rnd)
        self._load_global(model, state)
        if state.applied_round > state.reported_round:
            rnd = state.applied_round
            metrics: dict[str, tuple[float, int]] = {}
            strategy = self._strategy
            if rnd == total_rounds:  # the final model: a strategy may personalise it once more (e.g. fine-tune it)
                strategy.after_final_aggregate(model=model, state=state, data=data, task=self._task,
                                               train_cfg=self._train_cfg, rnd=rnd, device=self._device)
            model.load_state_dict(strategy.eval_state_dict(state))
            task = self._task
            if _len(data.splits.test):
                metrics.update(task.evaluate_split(model, strategy.eval_data(data.splits.test, state=state), "test",
                                                   device=self._device))
            if _len(data.splits.val):
                metrics.update(task.evaluate_split(model, strategy.eval_data(data.splits.val, state=state), "val",
                                                   device=self._device))
            if state.last_train_loss is not None and state.done_round == rnd:
                metrics["train_loss"] = (state.last_train_loss, _len(data.splits.train))
            if state.shared_fraction is not None:
                metrics["shared_fraction"] = (state.shared_fraction, _len(data.splits.train))
            if (rnd == total_rounds or self._unseen_every_round) and data.unseen is not None:
                model.load_state_dict(strategy.unseen_state_dict(state))
                metrics.update(task.evaluate_split(model, strategy.unseen_data(data.unseen, state=state), "unseen",
                                                   device=self._device))
            self._load_global(model, state)
            kept = task.trim_report(metrics, MAX_METRICS)
            if len(kept) < len(metrics):
                log.warning("round %d: %d detail metrics left out of the report (a report holds at most %d)",
                            rnd, len(metrics) - len(kept), MAX_METRICS)
            metrics = kept
            if metrics:
                client.report_metrics(rnd, metrics)
                log.info("round %d: %s", rnd, ", ".join(f"{k}={v:.4f}" for k, (v, _) in metrics.items()))
            state.reported_round = rnd
            state.save(Path(self.cfg.state_dir))

    def _apply(self, agg: Aggregate, state: AgentState, rnd: int, total_rounds: int) -> str | None:
        """Applies a fetched aggregate; returns why it is unusable instead (then nothing changed).

        An HE aggregate that does not decrypt (an upload encrypted under another key) or that
        decrypts beyond the public bound is unusable: the agent reports it rather than crash, so a
        poisoned round never stops the silo (nor, restarted, stops it again).
        """
        if agg.arrays is not None:  # plain aggregation: the weighted mean of the round's shared tensors
            self._strategy.apply(mean={t.name: agg.arrays[t.name] for t in agg.manifest.tensors}, state=state,
                                 rnd=rnd, total_rounds=total_rounds)
            return None
        if self._he is None or agg.ciphertexts is None:
            raise AgentError("received an encrypted aggregate but this silo has no HE key")
        try:
            total = self._he.decrypt_sum(agg.ciphertexts, agg.manifest.numel, contributors=agg.num_contributors)
        except HeError as exc:
            return f"round {rnd}'s aggregate does not decrypt: {exc}"
        self._strategy.apply_sum(total, layout=agg.manifest, total_weight=agg.total_weight,
                                 weight_normalizer=agg.weight_normalizer, state=state, rnd=rnd,
                                 total_rounds=total_rounds)
        return None

    @staticmethod
    def _load_global(model: torch.nn.Module, state: AgentState) -> None:
        """Model = the federation's shared values + this silo's local values."""
        model.load_state_dict(state.personal_state_dict())

    def _train_round(self, client: CoordinatorClient, model: torch.nn.Module, state: AgentState,
                     data: SiloData, rnd: int, train_cfg: TrainConfig, n_train: int,
                     weight_normalizer: float, phase: SharePhase = SharePhase.ALL) -> None:
        """One round as a pipeline: budget check → train → ``strategy.upload`` → privacy (noise,
        ledger reserve) → codec → submit → ledger commit. Every method-specific step is a hook of
        the run's strategy; the daemon never asks which method it runs."""
        self._round = rnd
        assert self._manifest is not None
        shared = [t.name for t in phase_manifest(self._manifest, phase).tensors]  # the round's shared tensors
        dp = self._dp
        if dp is not None and not self._budget_allows(client, state, rnd):
            return
        if state.pending_round == rnd:
            log.info("round %d: resending the update saved before the restart (its ledger entries stand)", rnd)
            update = {k: v.numpy() for k, v in state.pending_update.items()}
            loss = state.last_train_loss if state.last_train_loss is not None else float("nan")
        else:
            update, loss = self._train(model, state, data, rnd, train_cfg, phase, shared)
            if dp is not None:
                update = dp.noise_update(update, phase=phase, model=model, frozen=state.global_shared)
                state.pending_round = rnd
                state.pending_update = {k: torch.from_numpy(np.ascontiguousarray(v)).clone()
                                        for k, v in update.items()}
                state.save(Path(self.cfg.state_dir))  # the exact release is durable before it is accounted and sent
        if dp is not None:
            dp.account_round(rnd, self._strategy.extra_releases(state, rnd))
            dp.sync(client)
        weight = 1.0 if dp is not None and dp.plan.silo_level else float(n_train)
        sent = self._submit(client, state, rnd, update, shared, weight, weight_normalizer, loss)
        if dp is not None:
            if sent:
                dp.commit_round(rnd)
            else:
                dp.abandon_round(rnd)
            state.pending_round, state.pending_update = 0, {}
            self._metrics.privacy(dp.spent(), dp.budget.epsilon)
        state.done_round = rnd
        state.save(Path(self.cfg.state_dir))
        self._metrics.round_done(rnd)

    def _budget_allows(self, client: CoordinatorClient, state: AgentState, rnd: int) -> bool:
        """Drops a reservation whose round closed while this agent was away, then declines ``rnd`` (and
        retires) if its releases would take this silo past its budget."""
        dp = self._dp
        assert dp is not None
        if state.pending_round and state.pending_round != rnd:
            dp.abandon_round(state.pending_round)
            state.pending_round, state.pending_update = 0, {}
            state.save(Path(self.cfg.state_dir))
        if state.pending_round != rnd:
            refusal = dp.refusal(self._strategy.extra_releases(state, rnd, ahead=True))
            if refusal is not None:
                self._decline(client, state, rnd, refusal)
                return False
        return True

    def _train(self, model: torch.nn.Module, state: AgentState, data: SiloData, rnd: int, train_cfg: TrainConfig,
               phase: SharePhase, shared: list[str]) -> tuple[dict[str, np.ndarray], float]:
        """Local training (DP-SGD when the plan is record-level) and the strategy's upload of it."""
        self._activity = Activity.TRAINING
        strategy = self._strategy
        assert self._ctx is not None and self._manifest is not None
        strategy.before_training(self._ctx, model=model, state=state, rnd=rnd, trainable=self._trainable,
                                 shared_names=[t.name for t in self._manifest.tensors])
        strategy.set_trainable(model, phase, self._trainable)
        train = strategy.train_data(data.splits.train, state=state, rnd=rnd)
        dp = self._dp
        job = TrainJob(model=model, train=train, train_cfg=train_cfg, round_index=rnd, task=self._task,
                       dp=dp.dpsgd_config() if dp is not None and dp.plan.record_level else None,
                       precision=self.cfg.precision,
                       objective=strategy.local_objective(model=model, state=state, train=train, rnd=rnd))
        started = time.perf_counter()
        if self._group is not None:  # every rank trains its share; all end with these weights
            result = self._group.train(job, train_set=data.splits.train)
        else:  # moves the model to the device for the call and back to the CPU after it
            result = train_job(job, parallel=None, device=self._device)
        self._metrics.trained(time.perf_counter() - started)
        if self.stop.is_set():
            raise Stopped("training")
        sd = model.state_dict()
        update = strategy.upload(trained=sd, state=state, names=shared, rnd=rnd, total_rounds=self._total_rounds)
        strategy.after_training(model=model, state=state, train=train, train_cfg=train_cfg, rnd=rnd)
        state.model = {k: v.detach().cpu().clone() for k, v in sd.items()}
        state.last_train_loss = result.loss
        return update, result.loss

    def _submit(self, client: CoordinatorClient, state: AgentState, rnd: int, update: dict[str, np.ndarray],
                shared: list[str], weight: float, weight_normalizer: float, loss: float) -> bool:
        """Encodes (the strategy's HE vector under the method's layout, or raw tensors) and uploads.

        Returns:
            Whether the coordinator has this silo's upload (False: it refused the round's upload).
        """
        self._activity = Activity.UPLOADING
        strategy = self._strategy
        assert self._manifest is not None
        try:
            if self._he is not None:
                flat = strategy.he_vector(update, state=state, names=shared, scale=weight / weight_normalizer,
                                          rnd=rnd, total_rounds=self._total_rounds)
                layout = strategy.upload_layout(self._manifest, rnd, self._total_rounds)
                blobs = self._he.encrypt(flat)
                payload = sum(len(b) for b in blobs)
                uploads_in = client.submit_he(rnd, weight, layout, blobs, self._upload_signer())
            else:
                payload = sum(int(np.asarray(v).nbytes) for v in update.values())
                uploads_in = client.submit(rnd, weight, update, self._upload_signer())
            log.info("round %d: uploaded (train loss %.4f; %d upload(s) in so far)", rnd, loss, uploads_in)
            self._metrics.uploaded(payload)
        except grpc.RpcError as err:
            if err.code() is grpc.StatusCode.ALREADY_EXISTS:
                log.info("round %d: the coordinator already has this silo's upload", rnd)
            elif err.code() is grpc.StatusCode.FAILED_PRECONDITION:
                log.warning("round %d: upload not accepted (%s); skipping this round", rnd, err.details())
                return False
            else:
                raise
        return True

    def _upload_signer(self):  # -> wire.UploadSigner | None
        """Signs each upload's statement (run, round, silo, SHA-256, size) with this silo's certificate
        key, so the study can hold it to what it sent; None without TLS."""
        tls = self.cfg.tls
        if tls is None or self._run_id is None:
            return None
        if self._signer is None:
            from fedsilo.privacy.upload_statement import statement_signer

            self._signer = statement_signer(run_id=self._run_id, silo=self._name,
                                            certificate_pem=Path(tls.cert).read_bytes(),
                                            private_key_pem=Path(tls.key).read_bytes())
        return self._signer

    def _serve_keys(self, client: CoordinatorClient):
        """While this silo waits (e.g. for style banks), the key holder keeps wrapping keys for late joiners."""
        he = self._he
        if he is None or not he.is_key_holder:
            return None
        return lambda: he.serve_recipients(client)

    def _decline(self, client: CoordinatorClient, state: AgentState, rnd: int, reason: str) -> None:
        """Declines ``rnd`` and every later round: the privacy budget would be exceeded."""
        log.warning("round %d: declining: %s", rnd, reason)
        try:
            left = client.decline(rnd, reason, final=True)
            log.warning("round %d declined; %d silo(s) still training", rnd, left)
        except grpc.RpcError as err:
            if err.code() not in (grpc.StatusCode.FAILED_PRECONDITION,):
                raise
            log.warning("round %d: the coordinator did not take the decline (%s)", rnd, err.details())
        state.retired = True
        state.done_round = rnd
        state.save(Path(self.cfg.state_dir))
