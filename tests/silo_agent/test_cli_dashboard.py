"""``fedsilo dashboard``: every bad input refused with a clear message and a non-zero exit before anything is
served (bad addresses, missing or wrong files, a silo's or another federation's certificate, no
coordinator, a taken port), and a real start and stop, loud when it is bound beyond loopback."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedsilo.cli.main import main
from fedsilo.silo_agent.demo import ADMIN_NAME, make_certs


def args(live, name: str = ADMIN_NAME, *, address: str | None = None, listen: str = "127.0.0.1:0",
         ca: Path | None = None, cert: Path | None = None, key: Path | None = None, extra: tuple = ()) -> list[str]:
    ca_, cert_, key_ = live.files(name)
    return ["dashboard", "--coordinator", address or live.address, "--ca", str(ca or ca_), "--cert", str(cert or cert_),
            "--key", str(key or key_), "--listen", listen, *extra]


def refused(argv: list[str], code: int, *fragments: str) -> str:
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == code, result.output
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert "fedsilo dashboard: http" not in result.output  # nothing was served
    return result.stderr


def test_bad_addresses_and_settings(live_coordinator) -> None:
    refused(args(live_coordinator, address="localhost"), 2, "error: --coordinator: 'localhost' is not host:port")
    refused(args(live_coordinator, address="localhost:0"), 2, "--coordinator: 'localhost:0': the port must be")
    refused(args(live_coordinator, listen="127.0.0.1:99999"), 2, "--listen: '127.0.0.1:99999': the port must be")
    refused(args(live_coordinator, listen="::1:8080"), 2, "--listen:", "IPv6 goes in brackets")
    refused(args(live_coordinator, extra=("--refresh", "0")), 2, "refresh_s must be in [0.2, 3600] seconds, got 0.0")
    refused(args(live_coordinator, extra=("--near-budget", "2")), 2, "near_budget_fraction must be in (0, 1], got 2.0")


def test_missing_and_wrong_files(live_coordinator, tmp_path: Path) -> None:
    refused(args(live_coordinator, ca=tmp_path / "nope.pem"), 2, "--ca", "does not exist")
    refused(args(live_coordinator, key=tmp_path / "nope.key"), 2, "--key", "does not exist")
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("hello")
    refused(args(live_coordinator, cert=not_pem), 2, "error: --cert/--key/--ca:", "notes.txt")
    # a silo's certificate: refused here, naming what is needed
    refused(args(live_coordinator, "hospital-a"), 2,
            "--cert: hospital-a.pem is a silo certificate ('hospital-a')", "needs an admin certificate")
    # the key of another certificate
    _, _, other_key = live_coordinator.files("hospital-a")
    refused(args(live_coordinator, key=other_key), 2, "does not belong to certificate")
    # an admin certificate of another federation, with this federation's CA
    other = tmp_path / "other"
    make_certs(other, [])
    refused(args(live_coordinator, cert=other / f"{ADMIN_NAME}.pem", key=other / f"{ADMIN_NAME}.key"), 2,
            "was not issued by the federation CA")


def test_a_coordinator_that_is_not_ours_or_not_there(live_coordinator, tmp_path: Path) -> None:
    # another federation's admin with its own CA: the coordinator's certificate is not trusted
    other = tmp_path / "other"
    make_certs(other, [])
    refused(args(live_coordinator, ca=other / "ca.pem", cert=other / f"{ADMIN_NAME}.pem",
                 key=other / f"{ADMIN_NAME}.key"), 1, f"refusing the coordinator at {live_coordinator.address}")
    live_coordinator.stop()
    refused(args(live_coordinator), 1, f"cannot read the run from the coordinator at {live_coordinator.address}: "
                                        "UNAVAILABLE", "is the coordinator running there")


def test_a_port_in_use(live_coordinator) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused(args(live_coordinator, listen=f"127.0.0.1:{port}"), 1, f"--listen: cannot serve on 127.0.0.1:{port}")


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "0.0.0.0:0"])
def test_serves_until_sigterm_and_is_loud_beyond_loopback(live_coordinator, listen: str) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "fedsilo", *args(live_coordinator, listen=listen)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("fedsilo dashboard: http://"), (line, proc.stderr.read() if proc.poll() else "")
        port = int(line.split()[2].rstrip("/").rsplit(":", 1)[1])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
            assert resp.status == 200 and "run dashboard-test" in resp.read().decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "fedsilo dashboard: stopped" in out
    if listen.startswith("127."):
        assert "WARNING" not in err
    else:
        assert f"WARNING: --listen {listen} is not a loopback address" in err and "without logging in" in err
