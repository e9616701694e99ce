"""The ``[metrics]`` config table and the stoppable HTTP endpoint that serves one process's own metrics registry."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from fedsilo.core.configfile import ConfigError
from fedsilo.core.validators import is_loopback

__all__ = ["NON_LOOPBACK_WARNING", "MetricsConfig", "MetricsServer", "parse_metrics"]

NON_LOOPBACK_WARNING = (
    "metrics.listen = %r is not a loopback address: the metrics endpoint has no TLS and no authentication, and its "
    "metrics name silos and their privacy spend (ε). Expose it only to the monitoring network."
)


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    """Where a process serves its Prometheus metrics (``[metrics] listen``); absent table: no endpoint.

    Attributes:
        listen: ``host:port`` (``[::1]:9464`` for an IPv6 address); port 0 takes any free port.
    """

    listen: str

    def __post_init__(self) -> None:
        want = "must be host:port, e.g. \"127.0.0.1:9464\""
        if not isinstance(self.listen, str):
            raise ConfigError(f"metrics.listen: {self.listen!r} {want}")
        host, sep, port = self.listen.rpartition(":")
        bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if (not sep or not bare or any(c.isspace() or c in "[]/@" for c in bare)
                or (":" in bare and bare == host)):  # an IPv6 address needs its brackets
            raise ConfigError(f"metrics.listen: {self.listen!r} {want}")
        if not port.isascii() or not port.isdigit() or len(port) > 5:
            raise ConfigError(f"metrics.listen: port {port!r} of {self.listen!r} is not a number in 0..65535")
        if not 0 <= int(port) <= 65535:
            raise ConfigError(f"metrics.listen: port {int(port)} of {self.listen!r} is out of range 0..65535")

    @property
    def host(self) -> str:
        """The address to bind (an IPv6 address without its brackets)."""
        host = self.listen.rpartition(":")[0]
        return host[1:-1] if host.startswith("[") else host

    @property
    def port(self) -> int:
        """The port to bind (0: any free port)."""
        return int(self.listen.rpartition(":")[2])

    @property
    def loopback(self) -> bool:
        """Whether only this machine can reach the endpoint (``localhost`` or a loopback address)."""
        return is_loopback(self.host)


def parse_metrics(table: Any) -> MetricsConfig:
    """The ``[metrics]`` table of a config file (its keys already checked against ``{"listen"}``).

    Raises:
        ConfigError: naming ``metrics.listen`` and the bad value.
    """
    if not isinstance(table, Mapping):
        raise ConfigError("metrics: must be a table with listen = \"host:port\"")
    if "listen" not in table:
        raise ConfigError("metrics.listen: missing (e.g. listen = \"127.0.0.1:9464\"; remove [metrics] to serve none)")
    return MetricsConfig(listen=table["listen"])


class MetricsServer:
    """A running HTTP endpoint serving one registry at ``/metrics``; use :meth:`start`, end with :meth:`stop`."""

    def __init__(self, httpd: Any, thread: threading.Thread, log: logging.Logger) -> None:
        self._httpd, self._thread, self._log = httpd, thread, log

    @classmethod
    def start(cls, config: MetricsConfig, registry: CollectorRegistry, *, log: logging.Logger,
              what: str) -> MetricsServer:
        """Binds ``config.listen`` and serves ``registry`` from a daemon thread; warns when not on loopback.

        Raises:
            OSError: the address cannot be bound (the message names ``metrics.listen``).
        """
        if not config.loopback:
            log.warning(NON_LOOPBACK_WARNING, config.listen)
        try:
            httpd, thread = start_http_server(config.port, config.host, registry=registry)
        except OSError as exc:
            raise OSError(f"metrics.listen = {config.listen!r}: cannot serve metrics there: {exc}") from None
        server = cls(httpd, thread, log)
        log.info("%s metrics at http://%s/metrics", what, server.address)
        return server

    @property
    def port(self) -> int:
        """The bound port (the one taken when the config said 0)."""
        return int(self._httpd.server_port)

    @property
    def address(self) -> str:
        """``host:port`` as bound."""
        host = str(self._httpd.server_address[0])
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def stop(self) -> None:
        """Stops serving and frees the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)
