"""The dashboard's HTTP server (standard library): the page, its live fragment, its stylesheet and script.

Read-only (GET and HEAD), no cookies, a strict Content-Security-Policy, and a Host check so that a web
page elsewhere cannot read it through DNS rebinding. It binds loopback unless told otherwise: the page
shows study data fetched with the admin's credentials.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fedsilo.core.validators import is_loopback
from fedsilo.silo_agent.dashboard.assets import SCRIPT, STYLESHEET
from fedsilo.silo_agent.dashboard.data import Poller
from fedsilo.silo_agent.dashboard.page import render_fragment, render_no_data, render_page, render_waiting

log = logging.getLogger("fedsilo.dashboard")

__all__ = ["DashboardServer", "parse_host_port"]

_SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def parse_host_port(text: str, *, allow_port_zero: bool = False) -> tuple[str, int]:
    """Splits ``host:port`` (``[v6 address]:port`` for IPv6).

    Args:
        text: The address.
        allow_port_zero: Whether port 0 (any free port, for a listening address) is allowed.

    Returns:
        (host, port), the host without brackets.

    Raises:
        ValueError: naming the value: no port, a port out of range, an empty host, stray characters.
    """
    host, sep, port = text.strip().rpartition(":")
    low = 0 if allow_port_zero else 1
    if not sep or not host:
        raise ValueError(f"{text!r} is not host:port (e.g. localhost:50051)")
    if not port.isdigit() or not low <= int(port) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number in {low}..65535")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"{text!r}: an IPv6 address goes in brackets, e.g. [::1]:8080")
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host or not all(c.isalnum() or c in "-._" for c in host):
        raise ValueError(f"{text!r}: {host!r} is not a host name or address (IPv6 goes in brackets)")
    return host, int(port)


class DashboardServer:
    """Serves the dashboard of ``poller``'s snapshots on ``host:port`` (port 0: any free port).

    Args:
        poller: The source of snapshots.
        host: Address to bind.
        port: Port to bind.
        coordinator: The coordinator's address, shown in the page header.

    Raises:
        OSError: the address cannot be bound (in use, not an address of this machine).
    """

    def __init__(self, poller: Poller, *, host: str, port: int, coordinator: str) -> None:
        self.poller = poller
        self.coordinator = coordinator
        self._httpd = ThreadingHTTPServer((host.strip("[]"), port), _handler_class(self))
        self._httpd.daemon_threads = True
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The page's address."""
        host = f"[{self.host.strip('[]')}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def allowed_host(self, header: str | None) -> bool:
        """Whether a request's Host header names this server: any name when bound to a wildcard address,
        else the bound host or, on loopback, ``localhost``/``127.0.0.1``/``[::1]``, with its port."""
        if header is None:
            return False
        bound = self.host.strip("[]")
        if bound in ("0.0.0.0", "::", ""):
            return True
        names = {bound.lower()}
        if is_loopback(bound):
            names |= {"localhost", "127.0.0.1", "::1"}
        host, _, port = header.strip().rpartition(":")
        if not host or not port.isdigit() or int(port) != self.port:
            return False
        return host.strip("[]").lower() in names

    def serve_forever(self) -> None:
        """Serves until :meth:`stop` (from another thread or a signal handler)."""
        self._httpd.serve_forever(poll_interval=0.2)

    def start(self) -> None:
        """Serves in a daemon thread."""
        self._thread = threading.Thread(target=self.serve_forever, name="dashboard-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops serving and closes the socket."""
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- what each path answers -------------------------------------------------------------
    def respond(self, path: str) -> tuple[HTTPStatus, str, bytes]:
        """(status, content type, body) for a GET of ``path`` (its query string ignored)."""
        path = path.split("?", 1)[0]
        settings = self.poller.settings
        snap = self.poller.latest()
        if path == "/":
            if snap is None:
                text = render_waiting(coordinator=self.coordinator, refresh_s=settings.refresh_s, error="")
            else:
                text = render_page(snap, coordinator=self.coordinator, refresh_s=settings.refresh_s,
                                   near_budget_fraction=settings.near_budget_fraction)
            return HTTPStatus.OK, "text/html; charset=utf-8", text.encode("utf-8")
        if path == "/fragment":
            text = render_no_data("") if snap is None else render_fragment(
                snap, near_budget_fraction=settings.near_budget_fraction)
            return HTTPStatus.OK, "text/html; charset=utf-8", text.encode("utf-8")
        if path == "/static/dashboard.js":
            return HTTPStatus.OK, "text/javascript; charset=utf-8", SCRIPT.encode("utf-8")
        if path == "/static/dashboard.css":
            return HTTPStatus.OK, "text/css; charset=utf-8", STYLESHEET.encode("utf-8")
        if path == "/favicon.ico":  # browsers ask; no icon, and no error in the page's console
            return HTTPStatus.NO_CONTENT, "image/x-icon", b""
        return HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n"


def _handler_class(server: DashboardServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "fedsilo-dashboard"
        sys_version = ""

        def _send(self, status: HTTPStatus, ctype: str, body: bytes, *, head: bool = False) -> None:
            self.send_response(status)
            if status is not HTTPStatus.NO_CONTENT:
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
            for name, value in _SECURITY_HEADERS.items():
                self.send_header(name, value)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _answer(self, head: bool) -> None:
            if not server.allowed_host(self.headers.get("Host")):
                self._send(HTTPStatus.MISDIRECTED_REQUEST, "text/plain; charset=utf-8",
                           b"this dashboard answers only requests addressed to it (Host header)\n", head=head)
                return
            try:
                status, ctype, body = server.respond(self.path)
            except Exception:
                log.exception("dashboard: rendering %s failed", self.path)
                status, ctype, body = HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8", b"internal error\n"
            self._send(status, ctype, body, head=head)

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            self._answer(head=False)

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer(head=True)

        def _refuse(self) -> None:
            self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
            self.send_header("Allow", "GET, HEAD")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            log.debug("dashboard: %s " + format, self.address_string(), *args)

    return Handler
