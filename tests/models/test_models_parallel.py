"""Data-parallel local training (fedsilo.models.parallel): 2 gloo processes under torchrun equal one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedsilo.models.parallel import DataParallel

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from parallel_cases import MODES, outputs, run_case  # noqa: E402

WORLD = 2
# Measured on this machine: parameters within 2e-7 (SGD; sums in another order), logits within 2.4e-6.
PARAM_ATOL = 1e-6
OUTPUT_ATOL = 1e-4


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs ddp_worker.py under torchrun with 2 gloo processes; the folder of what the ranks wrote."""
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
         str(HERE / "ddp_worker.py"), str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("mode", MODES)
def test_two_processes_train_what_one_does(ranks: Path, mode: str) -> None:
    torch.set_num_threads(1)
    single, result = run_case(mode)
    got = [torch.load(ranks / f"{mode}.rank{r}.pt") for r in range(WORLD)]
    for other in got[1:]:  # every rank ends with the same weights
        assert all(torch.equal(other["state"][k], got[0]["state"][k]) for k in single)
    ddp = got[0]
    assert (ddp["steps"], ddp["examples"]) == (result.steps, result.examples)
    assert ddp["loss"] == pytest.approx(result.loss, rel=1e-6)
    torch.testing.assert_close(outputs(ddp["state"]), outputs(single), atol=OUTPUT_ATOL, rtol=0)
    if mode != "adam":  # see parallel_cases: Adam turns rounding-sized gradients into ±lr steps
        for k, v in single.items():
            torch.testing.assert_close(ddp["state"][k], v, atol=PARAM_ATOL, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_secure_randomness_keeps_the_ranks_in_step(ranks: Path) -> None:
    """Without seeds every rank still draws rank 0's batches (its secret seed) and applies its noise."""
    got = [torch.load(ranks / f"secure.rank{r}.pt") for r in range(WORLD)]
    assert got[0]["examples"] == got[1]["examples"] > 0
    assert all(torch.equal(got[0]["state"][k], got[1]["state"][k]) for k in got[0]["state"])
    seeded, _ = run_case("dp-noisy")
    assert not all(torch.equal(seeded[k], got[0]["state"][k]) for k in seeded)


def test_ranks_with_other_data_are_refused(ranks: Path) -> None:
    for r in range(WORLD):
        message = (ranks / f"mismatch.rank{r}.txt").read_text()
        assert "disagree on the number of training examples: from 5 to 6" in message


def test_training_without_a_group_is_unchanged() -> None:
    assert DataParallel.current() is None


@given(world=st.integers(2, 9), n=st.integers(0, 40))
def test_shares_partition_the_batch(world: int, n: int) -> None:
    batch = list(range(100, 100 + n))
    shares = [DataParallel(rank=r, world=world).share(batch) for r in range(world)]
    assert sorted(i for s in shares for i in s) == batch
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize(("rank", "world", "field"), [(0, 1, "world"), (2, 2, "rank"), (-1, 2, "rank"),
                                                     (True, 2, "rank"), (0, 2.0, "world")])
def test_bad_places_are_refused(rank: object, world: object, field: str) -> None:
    with pytest.raises(ValueError, match=f"DataParallel.{field}"):
        DataParallel(rank=rank, world=world)  # type: ignore[arg-type]
