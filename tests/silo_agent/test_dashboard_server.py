"""The dashboard's HTTP server and poller over a REAL coordinator (gRPC, mutual TLS, loopback): what each
path answers, its security headers and Host check, a silo's hostile text escaped on the way, and the
last good data kept (marked) when the coordinator goes away."""

from __future__ import annotations

import http.client
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from fedsilo.core.tensors import Manifest
from fedsilo.silo_agent.dashboard.data import AlertKind, DashboardSettings, Poller
from fedsilo.core.validators import is_loopback
from fedsilo.silo_agent.dashboard.server import DashboardServer, parse_host_port
from fedsilo.silo_agent.demo import ADMIN_NAME

HOSTILE_REASON = "<script>alert('budget')</script> & out"
ARRAYS = {"layer.weight": np.zeros((3, 4), np.float32)}


@pytest.fixture
def served(live_coordinator) -> Iterator[DashboardServer]:
    """hospital-a joined and hospital-b joined then retired with a hostile reason; the dashboard on a free port."""
    for silo in ("hospital-a", "hospital-b"):
        client = live_coordinator.client(silo)
        client.join(fingerprint="5e" * 32, num_train_examples=10, manifest=Manifest.of_arrays(ARRAYS),
                    agent_version="test")
        if silo == "hospital-b":
            client.decline(1, HOSTILE_REASON, final=True)
        client.close()
    admin = live_coordinator.client(ADMIN_NAME)
    poller = Poller(admin, DashboardSettings(refresh_s=0.5))
    poller.poll()
    server = DashboardServer(poller, host="127.0.0.1", port=0, coordinator=live_coordinator.address)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        admin.close()


def get(server: DashboardServer, path: str, *, method: str = "GET", host: str | None = None) -> tuple[int, dict, str]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True)
        conn.putheader("Host", host if host is not None else f"127.0.0.1:{server.port}")
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode()
    finally:
        conn.close()


def test_page_fragment_and_assets(served: DashboardServer) -> None:
    status, headers, page = get(served, "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert "run dashboard-test" in page and 'id="live"' in page and 'data-refresh-ms="500"' in page
    assert "script-src 'self'" in headers["content-security-policy"] and "default-src 'none'" in headers[
        "content-security-policy"]
    assert (headers["x-content-type-options"], headers["cache-control"], headers["x-frame-options"]) == (
        "nosniff", "no-store", "DENY")
    status, _, fragment = get(served, "/fragment")
    assert status == 200 and fragment.startswith('<section id="run">') and "<html" not in fragment
    for silo in ("hospital-a", "hospital-b"):
        assert f'data-silo="{silo}"' in fragment
    assert 'data-round="1"' in fragment
    # the reason hospital-b gave travelled through the coordinator and arrives escaped
    assert "&lt;script&gt;alert(&#x27;budget&#x27;)&lt;/script&gt; &amp; out" in fragment
    assert "<script>" not in fragment
    status, headers, script = get(served, "/static/dashboard.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript") and 'fetch("fragment"' in script
    status, headers, _ = get(served, "/static/dashboard.css")
    assert status == 200 and headers["content-type"].startswith("text/css")


def test_refusals(served: DashboardServer) -> None:
    assert get(served, "/nope")[0] == 404
    assert get(served, "/favicon.ico")[:3:2] == (204, "")
    assert get(served, "/", method="POST")[0] == 405
    status, headers, body = get(served, "/", method="HEAD")
    assert status == 200 and body == "" and int(headers["content-length"]) > 0
    # DNS rebinding: a page elsewhere that points its own name at 127.0.0.1 gets nothing
    for host in ("evil.example", f"evil.example:{served.port}", "127.0.0.1:1"):
        status, _, body = get(served, "/", host=host)
        assert status == 421 and "dashboard-test" not in body
    for host in (f"localhost:{served.port}", f"[::1]:{served.port}"):
        assert get(served, "/fragment", host=host)[0] == 200


def test_the_last_good_data_is_kept_and_marked_when_the_coordinator_goes_away(live_coordinator,
                                                                              served: DashboardServer) -> None:
    live_coordinator.stop()
    snap = served.poller.poll()
    assert snap.run_id == "dashboard-test" and [s.name for s in snap.silos] == ["hospital-a", "hospital-b"]
    assert snap.error.startswith("UNAVAILABLE")
    assert snap.alerts[0].kind is AlertKind.UNREACHABLE
    _, _, fragment = get(served, "/fragment")
    assert "(latest poll failed)" in fragment and 'data-kind="unreachable"' in fragment


def test_a_first_poll_that_fails_raises(live_coordinator) -> None:
    admin = live_coordinator.client(ADMIN_NAME)
    live_coordinator.stop()
    poller = Poller(admin, DashboardSettings())
    with pytest.raises(grpc.RpcError) as err:
        poller.poll()
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert poller.latest() is None
    admin.close()


@pytest.mark.parametrize(("text", "zero", "expected"), [
    ("localhost:50051", False, ("localhost", 50051)),
    ("127.0.0.1:0", True, ("127.0.0.1", 0)),
    ("[::1]:8080", False, ("::1", 8080)),
    ("coordinator.example.org:443", False, ("coordinator.example.org", 443)),
])
def test_parse_host_port(text: str, zero: bool, expected: tuple[str, int]) -> None:
    assert parse_host_port(text, allow_port_zero=zero) == expected


@pytest.mark.parametrize(("text", "fragment"), [
    ("localhost", "is not host:port"),
    (":8080", "is not host:port"),
    ("localhost:0", "1..65535"),
    ("localhost:65536", "1..65535"),
    ("localhost:http", "1..65535"),
    ("::1:8080", "IPv6 goes in brackets"),
    ("[::g]:8080", "is not an IPv6 address"),
    ("bad host:1", "is not a host name or address"),
])
def test_parse_host_port_refuses_naming_the_value(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_host_port(text)
    assert fragment in str(err.value) and repr(text) in str(err.value)


def test_is_loopback() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost", "LOCALHOST"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "example.org", ""))
