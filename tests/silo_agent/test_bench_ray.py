"""``fedsilo bench --ray``: a study run as Ray tasks on a local Ray instance writes the same cells and
results.csv as the serial run (all but wall time, and upload bytes to within a few bytes, as two serial
runs differ), resumes from its finished cells, logs each cell to its own file, and refuses bad resource
settings or a missing Ray with a clear message."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedsilo.cli.main import main
from fedsilo.silo_agent.bench.runner import cell_id

#: The cheapest study with a federated and a reference method and two seeds: 4 cells.
STUDY = ["bench", "--methods", "fedavg,local", "--seeds", "2", "--rounds", "1", "--silos", "2", "--sweep", "none",
         "--aggregation", "plain"]
CELLS = {cell_id(m, s, 1, 1) for m in ("fedavg", "local") for s in (0, 1)}
#: Columns of results.csv (and keys of a cell) that differ between any two runs, serial ones too: wall time.
TIMING = ("seconds",)
#: Upload byte counts: each upload's signed statement carries the cell's certificate, made by a fresh
#: federation CA whose ECDSA signature (DER) is 70 to 72 bytes long, so two serial runs of one cell
#: differ by a few bytes per upload (measured: 425360 and 425352 bytes up for fedavg, seed 0, 2 silos).
BYTES_UP = ("bytes_total", "bytes_to_95")
#: At most this many bytes apart per cell: a few base64 characters per upload (2 silos x 1 round).
BYTES_SLACK = 64


def _csv(path: Path) -> tuple[list[dict[str, str]], list[tuple[int, ...]]]:
    """results.csv's rows without the timing and byte columns, and the byte columns."""
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert rows and all(c in rows[0] for c in (*TIMING, *BYTES_UP))
    return ([{k: v for k, v in row.items() if k not in TIMING + BYTES_UP} for row in rows],
            [tuple(int(row[k]) for k in BYTES_UP) for row in rows])


def _cells(out: Path) -> tuple[dict[str, dict], dict[str, int]]:
    """The cells by id without their wall time and bytes up, and each cell's bytes up."""
    cells = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    up = {}
    for cid, cell in cells.items():
        for k in TIMING:
            cell.pop(k)
        up[cid] = sum(r.pop("bytes_up") for r in cell["rounds_log"])
    return cells, up


def _assert_same(on_ray: Path, serial: Path) -> None:
    (cells, up), (cells_serial, up_serial) = _cells(on_ray), _cells(serial)
    assert set(cells) == CELLS
    assert cells == cells_serial  # metrics, selection, bytes down, silos, ... exactly
    assert up.keys() == up_serial.keys()
    assert all(abs(up[c] - up_serial[c]) <= BYTES_SLACK for c in up), (up, up_serial)
    assert any(up.values()), "the federated cells upload something"
    (rows, nbytes), (rows_serial, nbytes_serial) = _csv(on_ray / "results.csv"), _csv(serial / "results.csv")
    assert rows == rows_serial
    assert len(nbytes) == len(nbytes_serial)
    assert all(abs(a - b) <= BYTES_SLACK for x, y in zip(nbytes, nbytes_serial) for a, b in zip(x, y))


@pytest.mark.e2e
@pytest.mark.xdist_group("e2e")
def test_ray_study_equals_the_serial_one_and_resumes(tmp_path: Path, fedsilo_logger: None) -> None:
    pytest.importorskip("ray", reason="fedsilo bench --ray needs ray (pip install -e '.[dev]')")
    runner = CliRunner()
    serial, on_ray = tmp_path / "serial", tmp_path / "ray"

    result = runner.invoke(main, [*STUDY, "--out", str(serial)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, [*STUDY, "--ray", "--cell-cpus", "1", "--out", str(on_ray)])
    assert result.exit_code == 0, result.output
    assert "resuming" not in result.output

    _assert_same(on_ray, serial)
    assert (on_ray / "summary.md").is_file() and not list((on_ray / "work").glob("*"))
    # each cell logged to its own file on the worker, not into the driver's bench.log
    for cid in CELLS:
        assert (on_ray / "logs" / f"{cid}.log").is_file(), cid
    for seed in (0, 1):
        text = (on_ray / "logs" / f"fedavg-seed{seed}-1x1.log").read_text()
        assert "fedsilo.coordinator" in text and f"/work/fedavg-seed{seed}-1x1/" in text, text
    assert "fedsilo.coordinator" not in (on_ray / "logs" / "bench.log").read_text()

    # resumable on Ray: only the missing cell runs again, the others are not touched
    cells_dir = on_ray / "cells"
    gone = cells_dir / "local-seed1-1x1.json"
    gone.unlink()
    kept = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in cells_dir.glob("*.json")}
    result = runner.invoke(main, [*STUDY, "--ray", "--out", str(on_ray)])
    assert result.exit_code == 0, result.output
    assert "resuming: 3 of 4" in " ".join(result.output.split()), result.output
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in cells_dir.glob("*.json") if p != gone} == kept
    assert gone.is_file()
    _assert_same(on_ray, serial)


@pytest.mark.e2e
@pytest.mark.xdist_group("e2e")
def test_ray_refuses_a_cell_no_node_can_hold(tmp_path: Path, fedsilo_logger: None) -> None:
    """More GPUs per cell than the local instance has: refused before any cell runs, not a hang."""
    pytest.importorskip("ray", reason="fedsilo bench --ray needs ray (pip install -e '.[dev]')")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [*STUDY, "--ray", "--cell-gpus", "64", "--out", str(out)])
    assert result.exit_code != 0 and "error:" in result.output, result.output
    assert "--cell-gpus: 64 per cell, but the local Ray instance has" in " ".join(result.output.split())
    assert not list((out / "cells").glob("*.json"))


@pytest.mark.parametrize(("args", "fragment"), [
    (["--ray", "--cell-cpus", "0"], "--cell-cpus: 0.0 must be a number > 0"),
    (["--ray", "--cell-gpus", "-1"], "--cell-gpus: -1.0 must be a number >= 0"),
    (["--ray", "--cell-gpus", "1.5"], "more than one must be a whole number"),
    (["--cell-cpus", "2"], "apply to --ray only"),
])
def test_cli_bench_refuses_bad_ray_resources(tmp_path: Path, args: list[str], fragment: str,
                                             fedsilo_logger: None) -> None:
    pytest.importorskip("ray", reason="fedsilo bench --ray needs ray (pip install -e '.[dev]')")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [*STUDY, *args, "--out", str(out)])
    assert result.exit_code != 0
    assert "error:" in result.output and fragment in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_cli_bench_ray_without_ray_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   fedsilo_logger: None) -> None:
    """Without Ray (its import fails, as Python does for a ``None`` entry of sys.modules) ``--ray`` says
    how to install it and runs nothing."""
    monkeypatch.setitem(sys.modules, "ray", None)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [*STUDY, "--ray", "--out", str(out)])
    assert result.exit_code != 0
    assert "error:" in result.output and "pip install 'fedsilo[cluster]'" in result.output, result.output
    assert "Traceback" not in result.output
    assert not out.exists()
