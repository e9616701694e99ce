"""Fixtures shared by the agent's tests."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest


@pytest.fixture
def fedsilo_logger() -> Iterator[None]:
    """``run_study`` points the "fedsilo" logger at its bench.log (and stops propagation): put it back."""
    logger = logging.getLogger("fedsilo")
    saved = (logger.level, logger.propagate, list(logger.handlers))
    try:
        yield
    finally:
        for h in logger.handlers:
            if h not in saved[2]:
                h.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.handlers[:] = saved[2]


class CoordinatorSum:
    """One round's aggregation as the coordinator runs it, for strategy tests: the real plaintext
    aggregator (weighted mean) or the real BFV path (each silo's ``he_vector`` encoded and encrypted,
    the ciphertexts added by the coordinator's ``HeAggregator``, the sum decrypted by a silo)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self._files = 0

    def _file(self) -> Path:
        self._files += 1
        return self.tmp / f"coordinator-sum-{self._files}.bin"

    def plain_mean(self, layout: Any, uploads: Sequence[Mapping[str, np.ndarray]],
                   weights: Sequence[float]) -> dict[str, np.ndarray]:
        """The weighted mean of raw uploads as ``PlainAggregator`` writes it (each tensor in its dtype);
        every upload must match ``layout`` exactly (what admission checks)."""
        from fedsilo.coordinator.aggregation.plain import PlainAggregator
        from fedsilo.core.tensors import Manifest

        agg = PlainAggregator(layout)
        agg.reset()
        for upload, w in zip(uploads, weights, strict=True):
            assert Manifest.of_arrays(upload).difference(layout) is None
            path = self._file()
            path.write_bytes(b"".join(np.ascontiguousarray(upload[t.name], dtype=t.dtype.numpy).tobytes()
                                      for t in layout.tensors))
            agg.validate(path)
            agg.add(path, float(w))
        out = self._file()
        agg.write_result(out, float(sum(weights)))
        data, pos, mean = out.read_bytes(), 0, {}
        for t in layout.tensors:
            mean[t.name] = np.frombuffer(data, dtype=t.dtype.numpy, count=t.numel, offset=pos).reshape(t.shape).copy()
            pos += t.nbytes
        return mean

    def he_sum(self, layout: Any, vectors: Sequence[np.ndarray], *, bound: float = 1.0,
               seed: int = 0) -> np.ndarray:
        """The decrypted sum of the silos' HE vectors (already scaled by their weights), through BFV."""
        from fedsilo.coordinator.aggregation.he import HeAggregator, framed, read_framed

        params, ctx, codec = _he(bound)
        rng = np.random.default_rng(seed)
        agg = HeAggregator(layout, params)
        agg.reset()
        for flat in vectors:
            assert flat.shape == (layout.numel,)
            ints, clipped = codec.encode(flat, rng)
            assert clipped == 0, "a value exceeded the HE bound"
            path = self._file()
            path.write_bytes(b"".join(framed(iter(ctx.encrypt(ints)))))
            agg.validate(path)
            agg.add(path, 1.0)
        out = self._file()
        agg.write_result(out, 1.0)
        blobs = list(read_framed(out, params.bytes_estimate(params.slots, aggregate=True)))
        return codec.decode(ctx.decrypt(blobs, layout.numel))

    def round(self, strategies: Sequence[Any], start: Mapping[str, Any], trained: Sequence[Mapping[str, Any]],
              sizes: Sequence[float], *, he: bool = False, bound: float = 1.0) -> dict[str, Any]:
        """One round of a method whose silos share every entry of ``start`` (the round's global model):
        each silo's strategy uploads its ``trained`` state_dict, the coordinator aggregates with weights
        ``sizes`` (plaintext, or BFV with HE ``bound``), and the first silo's strategy applies the result
        (``apply``, or ``apply_sum`` on the decrypted sum). Returns the new global model."""
        from fedsilo.core.tensors import Manifest
        from fedsilo.silo_agent.state import AgentState

        names = list(start)

        def state() -> AgentState:
            return AgentState(run_id="r", fingerprint="f", global_shared={k: start[k].clone() for k in names})

        layout = type(strategies[0]).upload_layout(Manifest.of_arrays({k: start[k].numpy() for k in names}), 1, 2)
        uploads = [s.upload(trained=t, state=state(), names=names, rnd=1, total_rounds=2)
                   for s, t in zip(strategies, trained, strict=True)]
        applied = state()
        if he:
            total = float(sum(sizes))
            vectors = [s.he_vector(u, state=applied, names=names, scale=n / total, rnd=1, total_rounds=2)
                       for s, u, n in zip(strategies, uploads, sizes, strict=True)]
            strategies[0].apply_sum(self.he_sum(layout, vectors, bound=bound), layout=layout, total_weight=total,
                                    weight_normalizer=total, state=applied, rnd=1, total_rounds=2)
        else:
            strategies[0].apply(mean=self.plain_mean(layout, uploads, sizes), state=applied, rnd=1, total_rounds=2)
        return applied.global_shared


@functools.cache
def _he(bound: float) -> tuple[Any, Any, Any]:
    from fedsilo.privacy.he import FixedPoint, HeParams, SecretContext

    params = HeParams(bound=bound)
    return params, SecretContext.generate(params), FixedPoint(params=params)


@pytest.fixture
def coordinator_sum(tmp_path: Path) -> CoordinatorSum:
    """Aggregates one round's uploads the way the coordinator does (:class:`CoordinatorSum`)."""
    return CoordinatorSum(tmp_path)


class LiveCoordinator:
    """A real coordinator gRPC server on 127.0.0.1 with mutual TLS (a plain two-silo run, no DP), and the
    certificates of its CA (``make_certs``: hospital-a, hospital-b and the admin ``ADMIN_NAME``)."""

    def __init__(self, server: Any, certs: Path) -> None:
        self.server = server
        self.certs = certs
        self.address = f"localhost:{server.port}"
        self._running = True

    def stop(self) -> None:
        """Stops the server (once)."""
        if self._running:
            self._running = False
            self.server.stop(grace=1.0)

    def files(self, name: str) -> tuple[Path, Path, Path]:
        """(ca, cert, key) of ``name``."""
        return self.certs / "ca.pem", self.certs / f"{name}.pem", self.certs / f"{name}.key"

    def client(self, name: str) -> Any:
        """A one-shot (no retry) ``CoordinatorClient`` holding ``name``'s certificate."""
        from fedsilo.silo_agent.client import CoordinatorClient, Credentials

        ca, cert, key = self.files(name)
        return CoordinatorClient(self.address, Credentials(ca=ca, cert=cert, key=key), retry=False)


@pytest.fixture
def live_coordinator(tmp_path: Path) -> Iterator[LiveCoordinator]:
    """A started ``CoordinatorServer`` nobody has joined yet; stopped afterwards."""
    from fedsilo.coordinator.config import AggregationMode, FederationConfig, TlsFiles
    from fedsilo.coordinator.server import CoordinatorServer
    from fedsilo.silo_agent.demo import make_certs

    certs = tmp_path / "certs"
    make_certs(certs, ["hospital-a", "hospital-b"])
    config = FederationConfig(
        run_id="dashboard-test", silos=("hospital-a", "hospital-b"), rounds=2, min_silos=1,
        aggregation=AggregationMode.PLAIN, round_deadline_s=30.0, quorum_timeout_s=600.0, start_grace_s=600.0,
        listen="127.0.0.1:0", state_dir=tmp_path / "coordinator",
        tls=TlsFiles(ca=certs / "ca.pem", cert=certs / "coordinator.pem", key=certs / "coordinator.key"),
        model={"name": "tiny"}, training={"epochs": 1})
    server = CoordinatorServer(config, max_workers=8)
    server.start()
    live = LiveCoordinator(server, certs)
    try:
        yield live
    finally:
        live.stop()
