"""Shared fixtures of the end-to-end tests: a federation of real coordinator and agent processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsilo.silo_agent.client import CoordinatorClient, Credentials
from fedsilo.silo_agent.demo import ADMIN_NAME, free_port, make_certs, silo_names, write_configs


class Federation:
    """A coordinator and agents as OS processes, plus an admin client."""

    def __init__(self, work: Path, *, silos: int, rounds: int, deadline_s: float, privacy: dict | None = None,
                 budgets: dict | None = None, strategy: str = "fedavg", resfim: dict | None = None,
                 data: list[dict] | None = None, training: dict | None = None) -> None:
        self.work = work
        self.names = silo_names(silos)
        make_certs(work / "certs", self.names)
        self.port = free_port()
        self.fed, agent_cfgs = write_configs(work, names=self.names, rounds=rounds, strategy=strategy, seed=0,
                                             port=self.port, insecure=False, round_deadline_s=deadline_s,
                                             privacy=privacy, budgets=budgets, resfim=resfim, data=data,
                                             training=training)
        self.agent_cfgs = dict(zip(self.names, agent_cfgs))
        self.procs: dict[str, subprocess.Popen] = {}
        c = work / "certs"
        self.admin = CoordinatorClient(f"localhost:{self.port}", Credentials(
            ca=c / "ca.pem", cert=c / f"{ADMIN_NAME}.pem", key=c / f"{ADMIN_NAME}.key"), max_backoff_s=0.5, quiet=True)

    def start(self, name: str) -> subprocess.Popen:
        args = ["coordinator", "--config", str(self.fed)] if name == "coordinator" else \
            ["agent", "--config", str(self.agent_cfgs[name])]
        log = open(self.work / f"{name}.out", "ab")  # noqa: SIM115
        p = subprocess.Popen([sys.executable, "-m", "fedsilo", *args], stdout=log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
        log.close()
        self.procs[name] = p
        return p

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def wait_for(self, predicate, timeout: float, what: str):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            status, rounds = self.admin.status(), self.admin.rounds()
            if predicate(status, rounds):
                return status, rounds
            for n, p in self.procs.items():
                if n != "coordinator" and p.poll() not in (None, 0):
                    pytest.fail(f"{n} exited with {p.returncode}:\n{self.log(n)}")
            time.sleep(0.2)
        pytest.fail(f"timed out waiting for {what}; status={self.admin.status()}\n{self.log('coordinator')}")

    def wait_agents(self, timeout: float) -> None:
        for n, p in self.procs.items():
            if n != "coordinator":
                assert p.wait(timeout=timeout) == 0, f"{n} failed:\n{self.log(n)}"

    def log(self, name: str) -> str:
        path = self.work / f"{name}.out"
        return "\n".join(path.read_text(errors="replace").splitlines()[-30:]) if path.exists() else ""

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        self.admin.close()


@pytest.fixture
def federation_factory(tmp_path: Path):
    made: list[Federation] = []

    def make(**kwargs) -> Federation:
        fed = Federation(tmp_path, **kwargs)
        made.append(fed)
        return fed

    yield make
    for fed in made:
        fed.close()




#: Debian's chromium and its chromedriver drive the dashboard's browser tests (installed by the test command).
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture
def chromium(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A headless Chromium under Selenium with a fresh profile, from the system's binaries only (Selenium
    Manager is never asked to download anything); quit (browser and driver ended) afterwards."""
    if not CHROMEDRIVER.exists():
        pytest.skip(f"{CHROMEDRIVER} is missing: install Debian's chromium-driver to run the browser tests")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, for tests to read
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
