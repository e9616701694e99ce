"""``fedsilo dashboard``: the study lead's live web page over the coordinator's Admin API (no torch needed)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import click

from fedsilo.cli.common import fail as _fail

__all__ = ["dashboard"]

_FILE = click.Path(path_type=Path, exists=True, dir_okay=False)


@click.command()
@click.option("--coordinator", "address", required=True, metavar="HOST:PORT",
              help="The coordinator's gRPC address, as its certificate names it (e.g. localhost:50051).")
@click.option("--ca", type=_FILE, required=True, help="The federation CA certificate (ca.pem).")
@click.option("--cert", type=_FILE, required=True,
              help="An admin certificate (fedsilo certs issue --admin NAME).")
@click.option("--key", type=_FILE, required=True, help="The admin certificate's private key.")
@click.option("--listen", default="127.0.0.1:8080", show_default=True, metavar="HOST:PORT",
              help="Where to serve the page; port 0 picks a free port. Anything but a loopback address shows the "
                   "study's data to whoever can reach it, with no login.")
@click.option("--refresh", "refresh_s", type=float, default=2.0, show_default=True,
              help="Seconds between polls of the coordinator and page updates (0.2..3600).")
@click.option("--near-budget", "near_budget", type=float, default=0.8, show_default=True,
              help="Warn when a silo's ε reaches this fraction of its budget, in (0, 1].")
@click.option("--quiet-after", "quiet_after_s", type=float, default=120.0, show_default=True,
              help="Warn when a training silo has not been heard from for this many seconds.")
def dashboard(address: str, ca: Path, cert: Path, key: Path, listen: str, refresh_s: float, near_budget: float,
              quiet_after_s: float) -> None:
    """Serve a live web page of the run: state, round timeline, silos, metrics, ε against each budget, warnings."""
    import grpc

    from fedsilo.privacy.pki import CertificateError, Role, check_certificate
    from fedsilo.silo_agent.client import CoordinatorClient, Credentials, TlsRefused
    from fedsilo.silo_agent.dashboard.data import DashboardSettings, Poller
    from fedsilo.core.validators import is_loopback
    from fedsilo.silo_agent.dashboard.server import DashboardServer, parse_host_port

    try:
        parse_host_port(address)
    except ValueError as exc:
        _fail(f"--coordinator: {exc}")
    try:
        host, port = parse_host_port(listen, allow_port_zero=True)
    except ValueError as exc:
        _fail(f"--listen: {exc}")
    try:
        settings = DashboardSettings(refresh_s=refresh_s, near_budget_fraction=near_budget,
                                     quiet_after_s=quiet_after_s)
    except ValueError as exc:
        _fail(str(exc))
    try:
        who = check_certificate(cert, ca, key_path=key)
    except (CertificateError, OSError, ValueError) as exc:
        _fail(f"--cert/--key/--ca: {exc}")
    if who.role is not Role.ADMIN:
        _fail(f"--cert: {cert.name} is a {who.role.value} certificate ({who.name!r}); the dashboard reads the Admin "
              "API and needs an admin certificate (fedsilo certs issue --admin NAME)")

    client = CoordinatorClient(address, Credentials(ca=ca, cert=cert, key=key), retry=False)
    poller = Poller(client, settings)
    try:
        snap = poller.poll()
    except TlsRefused as exc:
        client.close()
        _fail(str(exc), 1)
    except grpc.RpcError as err:
        client.close()
        hint = {grpc.StatusCode.UNAVAILABLE: " (is the coordinator running there, and does its certificate name "
                                             "that host? A refused certificate looks the same)",
                grpc.StatusCode.PERMISSION_DENIED: " (the coordinator refuses this certificate for the Admin API)",
                grpc.StatusCode.UNIMPLEMENTED: " (the coordinator is older than this dashboard)"}.get(err.code(), "")
        _fail(f"cannot read the run from the coordinator at {address}: {err.code().name}: {err.details()}{hint}", 1)
    try:
        server = DashboardServer(poller, host=host, port=port, coordinator=address)
    except OSError as exc:
        client.close()
        _fail(f"--listen: cannot serve on {listen}: {exc}", 1)
    if not is_loopback(host):
        click.secho(f"WARNING: --listen {listen} is not a loopback address. Anyone who can reach this machine on "
                    f"port {server.port} sees this study's data (run, silos, metrics, privacy spend), read with the "
                    "admin certificate, without logging in. Prefer 127.0.0.1 and an SSH tunnel.",
                    fg="red", bold=True, err=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    poller.start()
    server.start()
    click.echo(f"fedsilo dashboard: {server.url} (run {snap.run_id} on {address}; Ctrl-C to stop)")
    try:
        stop.wait()
    finally:
        server.stop()
        poller.stop()
        client.close()
    click.echo("fedsilo dashboard: stopped")
