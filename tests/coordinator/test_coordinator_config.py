"""``load_federation_config``: a valid file loads; every malformed one raises ConfigError naming the field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedsilo.coordinator.config import AggregationMode, ConfigError
from fedsilo.coordinator.loading import load_federation_config
from fedsilo.silo_agent.methods.resfim import ResFimSettings

VALID = """\
[run]
id = "study-2025"
rounds = 5
min_silos = 2
round_deadline_s = 120.5
quorum_timeout_s = 600
start_grace_s = 0
strategy = "fedbn"
aggregation = "plain"

[silos]
enrolled = ["hospital-a", "hospital-b", "hospital-c"]

[server]
listen = "127.0.0.1:50099"
state_dir = "state"
ca = "tls/ca.pem"
cert = "tls/coordinator.pem"
key = "tls/coordinator.key"
max_upload_bytes = 1048576
max_chunk_bytes = 65536

[model]
name = "unet"
channels = [16, 32]

[training]
epochs = 1
lr = 0.01
"""


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    tls = tmp_path / "tls"
    tls.mkdir()
    for name in ("ca.pem", "coordinator.pem", "coordinator.key"):
        (tls / name).write_text("-----BEGIN PLACEHOLDER-----\n")
    return tmp_path


def write(config_dir: Path, text: str) -> Path:
    path = config_dir / "federation.toml"
    path.write_text(text)
    return path


def replace_line(text: str, old: str, new: str) -> str:
    """Replaces the one line starting with ``old`` (new may be empty to delete it)."""
    lines = text.splitlines()
    hits = [i for i, line in enumerate(lines) if line.startswith(old)]
    assert len(hits) == 1, (old, hits)
    lines[hits[0]] = new
    return "\n".join(lines) + "\n"


def test_valid_file_loads_with_paths_resolved_against_its_folder(config_dir: Path) -> None:
    cfg = load_federation_config(write(config_dir, VALID))
    assert cfg.run_id == "study-2025"
    assert cfg.silos == ("hospital-a", "hospital-b", "hospital-c")
    assert (cfg.rounds, cfg.min_silos) == (5, 2)
    assert (cfg.round_deadline_s, cfg.quorum_timeout_s, cfg.start_grace_s) == (120.5, 600, 0)
    assert cfg.strategy == "fedbn" and cfg.aggregation is AggregationMode.PLAIN
    assert cfg.listen == "127.0.0.1:50099"
    assert cfg.state_dir == config_dir / "state"
    assert cfg.tls is not None and cfg.tls.ca == config_dir / "tls" / "ca.pem"
    assert cfg.tls.key == config_dir / "tls" / "coordinator.key"
    assert (cfg.max_upload_bytes, cfg.max_chunk_bytes) == (1048576, 65536)
    assert dict(cfg.model) == {"name": "unet", "channels": [16, 32]}
    assert dict(cfg.training) == {"epochs": 1, "lr": 0.01}
    assert not cfg.insecure


def test_minimal_insecure_file_uses_defaults(config_dir: Path) -> None:
    text = ('[run]\nid = "r"\nrounds = 1\nmin_silos = 1\naggregation = "plain"\n[silos]\nenrolled = ["a"]\n'
            '[server]\ninsecure = true\n')
    cfg = load_federation_config(write(config_dir, text))
    assert cfg.insecure and cfg.tls is None
    assert cfg.strategy == "fedavg"
    assert cfg.state_dir == config_dir / "coordinator-state"


def test_he_is_the_default_and_needs_tls(config_dir: Path) -> None:
    text = '[run]\nid = "r"\nrounds = 1\nmin_silos = 1\n[silos]\nenrolled = ["a"]\n[server]\ninsecure = true\n'
    with pytest.raises(ConfigError, match=r"^run\.aggregation: 'he' needs TLS"):
        load_federation_config(write(config_dir, text))


BAD_CASES = {
    "unknown-section": (VALID + "\n[extras]\nx = 1\n", r"unknown section \[extras\]"),
    "unknown-key": (replace_line(VALID, "rounds =", "rounds = 5\nroundz = 6"), r"^run\.roundz: unknown key"),
    "unknown-server-key": (replace_line(VALID, "listen =", 'listn = "127.0.0.1:1"'), r"^server\.listn: unknown key"),
    "missing-rounds": (replace_line(VALID, "rounds =", ""), r"^run\.rounds: missing"),
    "missing-id": (replace_line(VALID, "id =", ""), r"^run\.id: missing"),
    "missing-enrolled": (replace_line(VALID, "enrolled =", ""), r"^silos\.enrolled: missing"),
    "min-silos-above-silos": (replace_line(VALID, "min_silos =", "min_silos = 4"), r"^run\.min_silos: 4 "),
    "min-silos-zero": (replace_line(VALID, "min_silos =", "min_silos = 0"), r"^run\.min_silos: 0 "),
    "rounds-zero": (replace_line(VALID, "rounds =", "rounds = 0"), r"^run\.rounds: 0 "),
    "rounds-not-int": (replace_line(VALID, "rounds =", 'rounds = "5"'), r"^run\.rounds: '5' "),
    "rounds-bool": (replace_line(VALID, "rounds =", "rounds = true"), r"^run\.rounds: True "),
    "bad-strategy": (replace_line(VALID, "strategy =", 'strategy = "fedsgd"'),
                     r"^run\.strategy: 'fedsgd' is not one of"),
    "strategy-not-a-name": (replace_line(VALID, "strategy =", "strategy = 3"),
                            r"^run\.strategy: 3 must be a method name \(one of \[.*'fedavg'"),
    "bad-aggregation": (replace_line(VALID, "aggregation =", 'aggregation = "ckks"'), r"^run\.aggregation: 'ckks'"),
    "negative-deadline": (replace_line(VALID, "round_deadline_s =", "round_deadline_s = -1"),
                          r"^run\.round_deadline_s: -1 "),
    "nan-timeout": (replace_line(VALID, "quorum_timeout_s =", "quorum_timeout_s = nan"),
                    r"^run\.quorum_timeout_s: nan"),
    "listen-no-port": (replace_line(VALID, "listen =", 'listen = "localhost"'), r"^server\.listen: 'localhost'"),
    "listen-port-range": (replace_line(VALID, "listen =", 'listen = "0.0.0.0:70000"'), r"^server\.listen: "),
    "listen-no-host": (replace_line(VALID, "listen =", 'listen = ":50051"'), r"^server\.listen: "),
    "listen-not-string": (replace_line(VALID, "listen =", "listen = 50051"), r"^server\.listen: 50051"),
    "tls-key-missing": (replace_line(VALID, "key =", ""), r"^server\.key: missing"),
    "tls-cert-file-absent": (replace_line(VALID, "cert =", 'cert = "tls/nope.pem"'),
                             r"^server\.cert: file .*nope\.pem does not exist"),
    "duplicate-silos": (replace_line(VALID, "enrolled =", 'enrolled = ["hospital-a", "hospital-b", "hospital-a"]'),
                        r"^silos\.enrolled: duplicate"),
    "bad-silo-name": (replace_line(VALID, "enrolled =", 'enrolled = ["Hospital A", "hospital-b"]'),
                      r"^silos\.enrolled: 'Hospital A'"),
    "enrolled-not-list": (replace_line(VALID, "enrolled =", 'enrolled = "hospital-a"'),
                          r"^silos\.enrolled: must be a list"),
    "empty-enrolled": (replace_line(VALID, "enrolled =", "enrolled = []"), r"^silos\.enrolled: at least one"),
    "bad-run-id": (replace_line(VALID, "id =", 'id = "my study"'), r"^run\.id: 'my study'"),
    "chunk-too-big": (replace_line(VALID, "max_chunk_bytes =", "max_chunk_bytes = 8388608"),
                      r"^server\.max_chunk_bytes: 8388608"),
    "insecure-not-bool": (replace_line(VALID, "max_upload_bytes =", 'insecure = "yes"'), r"^server\.insecure: 'yes'"),
    "run-not-table": ('run = 5\n[silos]\nenrolled = ["a"]\n', r"\[run\] must be a table"),
    "model-not-table": ('model = "unet"\n' + VALID.replace('[model]\nname = "unet"\nchannels = [16, 32]\n', ""),
                        r"^model: must be a table"),
    "invalid-toml": (VALID.replace('id = "study-2025"', 'id = "study-2025'), r"not valid TOML"),
}


@pytest.mark.parametrize("text, pattern", list(BAD_CASES.values()), ids=list(BAD_CASES))
def test_malformed_file_raises_config_error_naming_the_field(config_dir: Path, text: str, pattern: str) -> None:
    path = write(config_dir, text)
    with pytest.raises(ConfigError) as info:
        load_federation_config(path)
    assert re.search(pattern, str(info.value)), str(info.value)


def test_invalid_toml_message_names_the_file(config_dir: Path) -> None:
    path = write(config_dir, "[run\n")
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_federation_config(path)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_federation_config(tmp_path / "absent.toml")


RESFIM = replace_line(replace_line(VALID, "strategy =", 'strategy = "resfim"'), "aggregation =", 'aggregation = "he"')

RESFIM_BAD = {
    "resfim-needs-he": (replace_line(VALID, "strategy =", 'strategy = "resfim"'),
                        r"^run\.strategy: 'resfim' needs run\.aggregation = 'he'"),
    "resfim-table-without-resfim": (VALID + "\n[resfim]\nrho = 0.2\n", r"^resfim: set, but run\.strategy 'fedbn'"),
    "resfim-rho-range": (RESFIM + "\n[resfim]\nrho = 1.5\n", r"^resfim\.rho: 1\.5 must be a number in \(0, 1\)"),
    "resfim-rho-zero": (RESFIM + "\n[resfim]\nrho = 0\n", r"^resfim\.rho: 0 "),
    "resfim-unknown-key": (RESFIM + "\n[resfim]\nrhoo = 0.2\n", r"^resfim\.rhoo: unknown key"),
    "resfim-recompute-zero": (RESFIM + "\n[resfim]\nrecompute_every = 0\n", r"^resfim\.recompute_every: 0 "),
    "resfim-beta": (RESFIM + "\n[resfim]\nbeta = 0.7\n", r"^resfim\.beta: 0\.7 "),
    "resfim-norm-not-bool": (RESFIM + '\n[resfim]\nlocal_norm_layers = "yes"\n', r"^resfim\.local_norm_layers: 'yes'"),
    "resfim-silo-level-dp": (RESFIM + "\n[privacy]\nsilo_level = true\nupdate_clip_norm = 1.0\n"
                             "update_noise_multiplier = 1.0\ndelta = 1e-5\n",
                             r"^privacy\.silo_level: not supported with run\.strategy 'resfim'"),
    "resfim-one-silo": (replace_line(replace_line(RESFIM, "enrolled =", 'enrolled = ["hospital-a"]'),
                                     "min_silos =", "min_silos = 1"), r"^run\.strategy: 'resfim' needs at least 2"),
}


@pytest.mark.parametrize("text, pattern", list(RESFIM_BAD.values()), ids=list(RESFIM_BAD))
def test_bad_resfim_settings_name_the_field(config_dir: Path, text: str, pattern: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_federation_config(write(config_dir, text))
    assert re.search(pattern, str(info.value)), str(info.value)


def test_resfim_defaults_schedule_and_fingerprint(config_dir: Path) -> None:
    cfg = load_federation_config(write(config_dir, RESFIM))
    assert cfg.strategy == "resfim" and cfg.method.masked and not cfg.method.uses_lora
    assert cfg.tables["resfim"]["rho"] == 0.1 and cfg.tables["resfim"]["recompute_every"] == 5
    assert [r for r in range(1, 13) if ResFimSettings.from_mapping(cfg.tables["resfim"]).recompute(r)] == [1, 6, 11]
    other = load_federation_config(write(config_dir, RESFIM + "\n[resfim]\nrho = 0.2\n"))
    assert other.tables["resfim"]["rho"] == 0.2 and other.run_fingerprint() != cfg.run_fingerprint()
    deer = load_federation_config(write(config_dir, replace_line(RESFIM, "strategy =", 'strategy = "deer+resfim"')))
    assert deer.method.uses_lora and deer.method.alternates and deer.method.masked


RESFIM_DP = RESFIM + """
[privacy]
record_level = true
sample_rate = 0.25
steps_per_round = 12
max_grad_norm = 1.0
target_epsilon = 8.0
delta = 1e-5
"""
FISHER = "fisher_noise_multiplier = 5.0\nfisher_clip_norm = 1.0\nstyle_noise_multiplier = 3.0\n"

RESFIM_DP_BAD = {
    "fisher-missing": (RESFIM_DP, r"^privacy\.fisher_noise_multiplier: missing \(run\.strategy 'resfim' with "
                                  r"record-level DP.*resfim\.masks_without_dp = true"),
    "fisher-without-resfim": (replace_line(RESFIM_DP + FISHER, "strategy =", 'strategy = "fedbn"'),
                              r"^privacy\.fisher_noise_multiplier: set, but run\.strategy 'fedbn' plans no release it configures "
                              r"\(it belongs to resfim or deer\+resfim\)"),
    "fisher-with-masks-without-dp": (RESFIM_DP + FISHER + "\n[resfim]\nmasks_without_dp = true\n",
                                     r"^privacy\.fisher_noise_multiplier: set, but resfim\.masks_without_dp = true"),
    "fisher-negative": (RESFIM_DP + FISHER.replace("= 5.0", "= -5.0"), r"^privacy\.fisher_noise_multiplier: -5\.0"),
}


@pytest.mark.parametrize("text, pattern", list(RESFIM_DP_BAD.values()), ids=list(RESFIM_DP_BAD))
def test_bad_resfim_privacy_names_the_field(config_dir: Path, text: str, pattern: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_federation_config(write(config_dir, text))
    assert re.search(pattern, str(info.value)), str(info.value)


def test_resfim_target_epsilon_covers_the_masks_and_the_bank(config_dir: Path) -> None:
    from fedsilo.privacy.ledger import Neighbouring
    from fedsilo.privacy.plan import projected_spend

    cfg = load_federation_config(write(config_dir, RESFIM_DP + FISHER))
    plan = cfg.privacy
    assert (plan.resfim_every, plan.fisher_noise_multiplier, plan.style_clip_norm) == (5, 5.0, 40.0)
    total = projected_spend([], plan.round_releases(), delta=1e-5, repeats=cfg.rounds,
                            extra=plan.run_extras(cfg.rounds))[Neighbouring.RECORD]
    assert 7.9 < total <= 8.0
    unaccounted = load_federation_config(write(config_dir, RESFIM_DP + "\n[resfim]\nmasks_without_dp = true\n"))
    assert unaccounted.privacy.resfim_every == 0
    assert unaccounted.privacy.noise_multiplier < plan.noise_multiplier  # DP-SGD gets the whole target


RECORD_DP = """
[privacy]
record_level = true
sample_rate = 0.25
steps_per_round = 12
max_grad_norm = 1.0
noise_multiplier = 1.0
delta = 1e-5
"""
SILO_DP = "\n[privacy]\nsilo_level = true\nupdate_clip_norm = 1.0\nupdate_noise_multiplier = 1.0\ndelta = 1e-5\n"


def _strategy(name: str, aggregation: str = "he") -> str:
    return replace_line(replace_line(VALID, "strategy =", f'strategy = "{name}"'), "aggregation =",
                        f'aggregation = "{aggregation}"')


PERSONAL_BAD = {
    "ditto-record-dp": (_strategy("ditto") + RECORD_DP,
                        r"^privacy\.record_level: not supported with run\.strategy 'ditto': its personal model"),
    "pfa-silo-dp": (_strategy("pfa") + SILO_DP,
                    r"^privacy\.silo_level: not supported with run\.strategy 'pfa': its uploads are spectrum"),
    "fedrdn-plain": (_strategy("fedrdn", "plain"),
                     r"^run\.strategy: 'fedrdn' needs run\.aggregation = 'he': the silos' normalisation statistics"),
}


@pytest.mark.parametrize("text, pattern", list(PERSONAL_BAD.values()), ids=list(PERSONAL_BAD))
def test_personalised_strategies_refuse_what_they_cannot_do(config_dir: Path, text: str, pattern: str) -> None:
    """Ditto's personal pass is unaccounted under record-level DP; PFA's amplitudes are no clippable update;
    FedRDN's statistics need the run's HE key to travel sealed."""
    with pytest.raises(ConfigError) as info:
        load_federation_config(write(config_dir, text))
    assert re.search(pattern, str(info.value)), str(info.value)


@pytest.mark.parametrize("text", [_strategy("ditto"), _strategy("pfa") + RECORD_DP, _strategy("fedrdn") + RECORD_DP,
                                  _strategy("ditto", "plain"), _strategy("pfa", "plain")],
                         ids=["ditto", "pfa-record-dp", "fedrdn-record-dp", "ditto-plain", "pfa-plain"])
def test_personalised_strategies_load_where_they_work(config_dir: Path, text: str) -> None:
    cfg = load_federation_config(write(config_dir, text))
    assert cfg.strategy in ("ditto", "pfa", "fedrdn")
    assert bool(cfg.method.relays) is (cfg.strategy == "fedrdn")


def test_fedprox_needs_its_mu(config_dir: Path) -> None:
    """FedProx is a registered method whose run states μ > 0 in [training] (with μ = 0 it would be FedAvg)."""
    text = replace_line(VALID, "strategy =", 'strategy = "fedprox"')
    with pytest.raises(ConfigError, match=r"^training\.proximal_mu: run\.strategy 'fedprox' needs mu > 0"):
        load_federation_config(write(config_dir, text))
    cfg = load_federation_config(write(config_dir, text.replace("[training]\n", "[training]\nproximal_mu = 0.01\n")))
    assert cfg.strategy == "fedprox" and cfg.method.name == "fedprox" and cfg.training["proximal_mu"] == 0.01


def _sizes(*lines: str) -> str:
    """VALID with ``lines`` added under [silos] (after ``enrolled``)."""
    enrolled = 'enrolled = ["hospital-a", "hospital-b", "hospital-c"]'
    return replace_line(VALID, "enrolled =", "\n".join((enrolled, *lines)))


SIZES_BAD = {
    "unknown-silo": (_sizes("train_examples = { hospital-x = 100 }"),
                     r"^silos\.train_examples\.hospital-x: not an enrolled silo"),
    "zero": (_sizes("train_examples = { hospital-a = 0 }"),
             r"^silos\.train_examples\.hospital-a: 0 must be an integer in \[1, 1000000000\]"),
    "negative": (_sizes("train_examples = { hospital-a = -120 }"), r"^silos\.train_examples\.hospital-a: -120 "),
    "float": (_sizes("train_examples = { hospital-a = 120.0 }"),
              r"^silos\.train_examples\.hospital-a: 120\.0 must be an integer"),
    "string": (_sizes('train_examples = { hospital-a = "120" }'),
               r"^silos\.train_examples\.hospital-a: '120' must be an integer"),
    "bool": (_sizes("train_examples = { hospital-a = true }"),
             r"^silos\.train_examples\.hospital-a: True must be an integer"),
    "above-10-to-the-9": (_sizes("train_examples = { hospital-a = 1000000001 }"),
                          r"^silos\.train_examples\.hospital-a: 1000000001 must be an integer in \[1, 1000000000\]"),
    "above-max": (_sizes("train_examples = { hospital-a = 120, hospital-b = 501 }", "max_train_examples = 500"),
                  r"^silos\.train_examples\.hospital-b: 501 must be an integer in \[1, 500\]"),
    "not-a-table": (_sizes("train_examples = 120"), r"^silos\.train_examples: must be a table"),
    "max-zero": (_sizes("max_train_examples = 0"), r"^silos\.max_train_examples: 0 must be an integer in \[1, 1000000000\]"),
    "max-above-10-to-the-9": (_sizes("max_train_examples = 1000000001"), r"^silos\.max_train_examples: 1000000001 "),
    "max-float": (_sizes("max_train_examples = 500.5"), r"^silos\.max_train_examples: 500\.5 must be an integer"),
    "misspelt-key": (_sizes("train_example = { hospital-a = 120 }"), r"^silos\.train_example: unknown key"),
}


@pytest.mark.parametrize("text, pattern", list(SIZES_BAD.values()), ids=list(SIZES_BAD))
def test_bad_training_set_sizes_name_the_setting(config_dir: Path, text: str, pattern: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_federation_config(write(config_dir, text))
    assert re.search(pattern, str(info.value)), str(info.value)


def test_training_set_sizes_load_and_enter_the_run_fingerprint(config_dir: Path) -> None:
    plain = load_federation_config(write(config_dir, VALID))
    assert (dict(plain.train_examples), plain.max_train_examples) == ({}, None)
    cfg = load_federation_config(write(config_dir, _sizes("train_examples = { hospital-a = 120, hospital-c = 500 }",
                                                          "max_train_examples = 500")))
    assert dict(cfg.train_examples) == {"hospital-a": 120, "hospital-c": 500} and cfg.max_train_examples == 500
    assert cfg.declared_size_error("hospital-a", 120) is None
    assert "silos.train_examples" in (cfg.declared_size_error("hospital-a", 121) or "")
    assert cfg.declared_size_error("hospital-b", 500) is None
    assert "silos.max_train_examples" in (cfg.declared_size_error("hospital-b", 501) or "")
    # A restart may not change the sizes the run's weights rest on.
    other = load_federation_config(write(config_dir, _sizes("train_examples = { hospital-a = 121, hospital-c = 500 }",
                                                            "max_train_examples = 500")))
    fingerprints = {plain.run_fingerprint(), cfg.run_fingerprint(), other.run_fingerprint()}
    assert len(fingerprints) == 3


# -- [server] call limits and stall timeouts (operational: not part of the run's fingerprint) ------

SERVER_LIMITS = "max_chunk_bytes = 65536\nstall_timeout_s = 5\nmin_transfer_bytes_per_s = 0\nmax_calls_per_identity = 16\n"


def test_server_limits_load_with_defaults_and_stay_out_of_the_fingerprint(config_dir: Path) -> None:
    default = load_federation_config(write(config_dir, VALID))
    assert (default.stall_timeout_s, default.min_transfer_bytes_per_s, default.max_calls_per_identity) == (30.0, 16384, 8)
    tuned = load_federation_config(write(config_dir, VALID.replace("max_chunk_bytes = 65536\n", SERVER_LIMITS)))
    assert (tuned.stall_timeout_s, tuned.min_transfer_bytes_per_s, tuned.max_calls_per_identity) == (5, 0, 16)
    assert tuned.run_fingerprint() == default.run_fingerprint()  # a restart may retune them


@pytest.mark.parametrize("line, pattern", [
    ("stall_timeout_s = 0", r"server\.stall_timeout_s: 0 must be a finite number > 0"),
    ("stall_timeout_s = nan", r"server\.stall_timeout_s: nan must be a finite number > 0"),
    ("stall_timeout_s = \"30\"", r"server\.stall_timeout_s: '30' must be a finite number > 0"),
    ("stall_timeout_s = 0.5", r"server\.stall_timeout_s: 0\.5 must be at least 1"),
    ("min_transfer_bytes_per_s = -1", r"server\.min_transfer_bytes_per_s: -1 must be an integer in \[0, "),
    ("min_transfer_bytes_per_s = 1.5", r"server\.min_transfer_bytes_per_s: 1\.5 must be an integer"),
    ("max_calls_per_identity = 3", r"server\.max_calls_per_identity: 3 must be an integer in \[4, 1024\]"),
    ("max_calls_per_identity = true", r"server\.max_calls_per_identity: True must be an integer"),
], ids=["stall-zero", "stall-nan", "stall-string", "stall-below-1s", "rate-negative", "rate-float", "calls-3",
        "calls-bool"])
def test_bad_server_limit_is_a_config_error_naming_it(config_dir: Path, line: str, pattern: str) -> None:
    text = VALID.replace("max_chunk_bytes = 65536\n", f"max_chunk_bytes = 65536\n{line}\n")
    with pytest.raises(ConfigError, match=pattern):
        load_federation_config(write(config_dir, text))
