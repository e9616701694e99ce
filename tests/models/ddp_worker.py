"""One rank of the data-parallel equality tests (tests/models/test_models_parallel.py), run by ``torchrun``.

Usage: ``torchrun --standalone --nproc-per-node 2 ddp_worker.py OUTDIR``. For every case of
``parallel_cases.MODES`` every rank trains the cases' small UNet on the same built-in data with
``parallel=DataParallel.current()`` and writes the trained state_dict and result to
``OUTDIR/MODE.rankN.pt`` (``torch.save``); then DP-SGD with OS-entropy randomness
(``secure.rankN.pt``). Last, the ranks train on training sets of different
sizes, and each writes the refusal's message to ``OUTDIR/mismatch.rankN.txt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from fedsilo.models import SyntheticConfig, silo_splits, train_local
from fedsilo.models.parallel import DataParallel
from fedsilo.models.dp_training import train_local_dp
from parallel_cases import DATA, DP_NOISY, MODES, NET, TRAIN, run_case
from fedsilo.models import build_model


def main() -> int:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        parallel = DataParallel.current()
        assert parallel is not None, "run me with torchrun --nproc-per-node 2 or more"
        for mode in MODES:
            state, result = run_case(mode, parallel=parallel)
            torch.save({"state": state, "loss": result.loss, "steps": result.steps, "examples": result.examples},
                       out / f"{mode}.rank{parallel.rank}.pt")
        # production randomness: Poisson draws from rank 0's OS-entropy seed, noise from rank 0 alone
        model = build_model(NET)
        result = train_local_dp(model, silo_splits(DATA, 0).train, TRAIN, DP_NOISY, round_index=1, parallel=parallel)
        torch.save({"state": model.state_dict(), "examples": result.examples}, out / f"secure.rank{parallel.rank}.pt")
        train = silo_splits(SyntheticConfig(image_size=32, n_train=5 + parallel.rank, n_val=0, n_test=0), 0).train
        try:
            train_local(build_model(NET), train, TRAIN, round_index=0, parallel=parallel)
            message = "no error"
        except ValueError as exc:
            message = str(exc)
        (out / f"mismatch.rank{parallel.rank}.txt").write_text(message)
    finally:
        dist.barrier()  # every rank done with its collectives before any tears the group down
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
