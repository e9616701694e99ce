"""``fedsilo demo --model-json``: model options merged onto the demo's model table, refused before
anything starts when the Task's model config refuses them, and the run pinned to the changed model
(the pin ``fedsilo pin-model`` prints for the federation.toml the demo writes)."""

from __future__ import annotations

import re
import shutil
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedsilo.cli.main import main
from fedsilo.silo_agent import demo
from fedsilo.silo_agent.demo import DEMO_MODEL, DemoError, default_model_table, model_table

PIN_RE = re.compile(r'^model_fingerprint = "([0-9a-f]{64})"\nshared_tensors_sha256 = "([0-9a-f]{64})"$', re.M)


def test_model_entries_replace_or_add_entries_of_the_default_table() -> None:
    assert default_model_table(None, 3) == {**DEMO_MODEL, "seed": 3}
    assert model_table(None, 3) == {**DEMO_MODEL, "seed": 3}
    # {"norm": "pn"} keeps the demo UNet's channels and the run's seed
    assert model_table("segmentation-2d", 3, {"norm": "pn"}) == {**DEMO_MODEL, "seed": 3, "norm": "pn"}
    assert model_table(None, 3, {"seed": 7, "channels": [8, 16], "strides": [2]}) == {
        **DEMO_MODEL, "seed": 7, "channels": [8, 16], "strides": [2]}
    # another Task: its own default model is the base (an alias names the same Task)
    assert model_table("seg3d", 2) == default_model_table("segmentation-3d", 2)
    assert model_table(None, 0, {"norm": "pn"}, base={"num_res_units": 0}) == {"num_res_units": 0, "norm": "pn"}


@pytest.mark.parametrize(("task", "entries", "fragment"), [
    (None, {"norm": "bogus"}, "ModelConfig: key 'norm' must be one of 'instance', 'group', 'pn', got 'bogus'"),
    (None, {"nrm": "pn"}, "ModelConfig: unknown key(s) 'nrm'"),
    (None, {"channels": [8, 16]}, "strides must have len(channels) - 1"),
    ("segmentation-3d", {"norm": "pn"}, "UNet3DConfig: unknown key(s) 'norm'"),
    (None, ["norm"], "['norm'] must be a table (a JSON object) of the Task's model keys"),
])
def test_entries_the_task_refuses_are_refused_naming_them(task: str | None, entries, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        model_table(task, 0, entries)


@pytest.mark.parametrize(("args", "fragment"), [
    (["--model-json", "{norm"], "error: --model-json is not JSON"),
    (["--model-json", '["norm", "pn"]'], "error: --model-json must be a JSON object of [model] keys"),
    (["--model-json", '{"norm": "bogus"}'], "error: --model-json: ModelConfig: key 'norm' must be one of"),
    (["--model-json", '{"nrm": "pn"}'], "error: --model-json: ModelConfig: unknown key(s) 'nrm'"),
    (["--model-json", '{"norm": "pn"}', "--task", "segmentation-3d"], "UNet3DConfig: unknown key(s) 'norm'"),
])
def test_cli_demo_refuses_bad_model_json_before_anything_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                args: list[str], fragment: str) -> None:
    def never(**kw):
        raise AssertionError("run_demo started")

    monkeypatch.setattr(demo, "run_demo", never)
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output, result.output
    assert not out.exists()


def test_cli_demo_writes_and_pins_the_changed_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole path from the option to the federation.toml the coordinator is started with (HE and
    record-level DP, the defaults): [model] is the demo UNet with norm = "pn" and the run's seed, and
    its pin is the one ``fedsilo pin-model`` prints for it; the demo stops before any process starts."""
    kept = tmp_path / "federation.toml"

    def stop_at_coordinator(name: str, args: list[str], logs: Path):
        """Keeps the config and the certificates it names (the demo removes its work folder), then stops."""
        assert name == "coordinator"
        fed = Path(args[args.index("--config") + 1])
        shutil.rmtree(tmp_path / "certs", ignore_errors=True)
        shutil.copytree(fed.parent / "certs", tmp_path / "certs")
        kept.write_text(fed.read_text().replace(str(fed.parent), str(tmp_path)))
        raise DemoError("stopped before the coordinator starts")

    monkeypatch.setattr(demo, "_spawn", stop_at_coordinator)
    result = CliRunner().invoke(main, ["demo", "--model-json", '{"norm": "pn"}', "--silos", "2", "--rounds", "1",
                                       "--seed", "4", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 1 and "stopped before the coordinator starts" in result.output, result.output
    fed = tomllib.loads(kept.read_text())
    assert fed["model"] == {**DEMO_MODEL, "seed": 4, "norm": "pn"}
    assert fed["run"]["aggregation"] == "he" and fed["privacy"]["record_level"] is True
    printed = CliRunner().invoke(main, ["pin-model", "--config", str(kept)])
    assert printed.exit_code == 0, printed.output
    found = PIN_RE.search(printed.stdout)
    assert found is not None, printed.stdout
    assert (fed["run"]["model_fingerprint"], fed["run"]["shared_tensors_sha256"]) == found.groups()
    assert "already pins this model" in printed.stderr
    # and it is not the pin of the demo's default model
    default = CliRunner().invoke(main, ["demo", "--silos", "2", "--rounds", "1", "--seed", "4",
                                        "--out", str(tmp_path / "demo")])
    assert default.exit_code == 1, default.output
    plain = tomllib.loads(kept.read_text())
    assert "norm" not in plain["model"] and plain["run"]["model_fingerprint"] != fed["run"]["model_fingerprint"]
