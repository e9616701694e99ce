"""The coordinator imports and serves without torch (and without any other ML library)."""

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECK = Path(__file__).with_name("no_torch_check.py")


def test_coordinator_serves_with_torch_unimportable(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(CHECK), str(tmp_path / "state")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "served and audited without" in out.stdout


@pytest.mark.e2e
def test_coordinator_dependency_set_installs_and_serves_without_torch(tmp_path: Path) -> None:
    """pip-installs fedsilo's base dependencies (the coordinator set) into a fresh venv: no torch there."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
    inst = subprocess.run([str(py), "-m", "pip", "install", "-q", str(ROOT)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert inst.returncode == 0, inst.stdout[-3000:] + inst.stderr[-3000:]
    probe = subprocess.run([str(py), "-c", "import importlib.util as u; print(u.find_spec('torch'))"],
                           capture_output=True, text=True, env=env)
    assert probe.stdout.strip() == "None", "the coordinator set pulled in torch"
    out = subprocess.run([str(py), str(CHECK), str(tmp_path / "state")], capture_output=True, text=True,
                         timeout=120, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    cli = subprocess.run([str(env_dir / "bin" / "fedsilo"), "coordinator", "--help"], capture_output=True, text=True,
                         env=env)
    assert cli.returncode == 0 and "coordinator" in cli.stdout, cli.stderr
