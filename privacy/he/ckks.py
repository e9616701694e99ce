"""Baseline only: NVIDIA FLARE's default CKKS round through TenSEAL, measured for the benchmark."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsilo.privacy.he.params import HeParams, HeScheme


# Baseline only: NVIDIA FLARE's default CKKS, through TenSEAL's high-level API. Nothing in
# fedsilo aggregates with this; it exists so the benchmark can print the comparison row.


@dataclass(frozen=True, kw_only=True)
class CkksBaselineResult:
    """One FLARE-default CKKS aggregation round, measured (baseline only).

    Attributes:
        n_values: Parameters per silo.
        n_silos: Silos in the sum.
        upload_bytes_per_value: Serialized CKKS bytes of one silo's upload / n_values.
        download_bytes_per_value: Serialized aggregate bytes / n_values.
        max_abs_error: max |decrypted mean - float64 weighted mean|.
        max_rel_error: ``max_abs_error / max |float64 weighted mean|``.
        encrypt_s: Seconds to encrypt and serialize one silo's values (mean over silos).
        aggregate_s: Coordinator seconds to deserialize and add all uploads and
            serialize the sum (public context, no secret key), all silos together.
        decrypt_s: Seconds to deserialize, decrypt and divide the aggregate.
    """

    n_values: int
    n_silos: int
    upload_bytes_per_value: float
    download_bytes_per_value: float
    max_abs_error: float
    max_rel_error: float
    encrypt_s: float
    aggregate_s: float
    decrypt_s: float


def ckks_flare_roundtrip(
    values_per_silo: Sequence[np.ndarray],
    weights: Sequence[float],
    *,
    params: HeParams | None = None,
    n_threads: int = 1,
) -> CkksBaselineResult:
    """Runs one FLARE-style CKKS round (baseline): encrypt ``w_i * u_i``, add, decrypt.

    Public-key encryption with TenSEAL's ``ckks_vector``, as FLARE does; the coordinator
    side uses a copy of the context made public (no secret key).

    Args:
        values_per_silo: One 1-D float array per silo, all the same length.
        weights: One weight per silo (> 0); the mean divides by their sum.
        params: A CKKS parameter set; defaults to `HeParams.flare_default`.
        n_threads: TenSEAL worker threads (1 for a one-core comparison).

    Returns:
        Sizes, errors and timings.

    Raises:
        ValueError: If the inputs are empty, ragged, or the weights are not positive.
    """
    import tenseal as ts  # the high-level API is needed only here

    params = HeParams.flare_default() if params is None else params
    if params.scheme is not HeScheme.CKKS:
        raise ValueError(f"invalid params: the baseline needs CKKS, got {params.scheme.name}")
    arrays = [np.ravel(np.asarray(v, dtype=np.float64)) for v in values_per_silo]
    if not arrays or len(arrays) != len(weights):
        raise ValueError(
            f"need one weight per silo and at least one silo: {len(arrays)} arrays, "
            f"{len(weights)} weights"
        )
    n = arrays[0].size
    if n == 0 or any(a.size != n for a in arrays):
        sizes = [a.size for a in arrays]
        raise ValueError(f"all silos need the same non-zero number of values: {sizes}")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"invalid weights {weights!r}: must be finite and > 0")

    secret = ts.context(
        ts.SCHEME_TYPE.CKKS,
        params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_modulus_bits),
        n_threads=n_threads,
    )
    secret.global_scale = 2.0**params.scale_bits
    public = secret.copy()
    public.make_context_public()

    # One vector per ciphertext (params.slots values), streamed like fedsilo's BFV chunks;
    # one big vector would serialize to the same ciphertexts but makes TenSEAL print
    # warnings. Uploads are added as they arrive: memory does not grow with the silos.
    slots = params.slots
    upload_bytes, enc_s, agg_s = 0, 0.0, 0.0
    acc: list[Any] = [None] * (-(-n // slots))
    for wi, a in zip(w, arrays, strict=True):
        start = time.perf_counter()
        blobs = [
            ts.ckks_vector(secret, (wi * a[i : i + slots]).tolist()).serialize()
            for i in range(0, n, slots)
        ]
        enc_s += time.perf_counter() - start
        upload_bytes = sum(map(len, blobs))
        start = time.perf_counter()
        for i, blob in enumerate(blobs):
            vec = ts.ckks_vector_from(public, blob)
            acc[i] = vec if acc[i] is None else acc[i] + vec
        agg_s += time.perf_counter() - start
    start = time.perf_counter()
    aggregate = [vec.serialize() for vec in acc]
    agg_s += time.perf_counter() - start

    start = time.perf_counter()
    mean = np.concatenate(
        [np.asarray(ts.ckks_vector_from(secret, b).decrypt(), dtype=np.float64) for b in aggregate]
    )
    mean /= w.sum()
    dec_s = time.perf_counter() - start

    exact = sum(wi * a for wi, a in zip(w, arrays, strict=True)) / w.sum()
    abs_err = float(np.max(np.abs(mean - exact)))
    scale = float(np.max(np.abs(exact)))
    return CkksBaselineResult(
        n_values=n,
        n_silos=len(arrays),
        upload_bytes_per_value=upload_bytes / n,
        download_bytes_per_value=sum(map(len, aggregate)) / n,
        max_abs_error=abs_err,
        max_rel_error=abs_err / scale if scale > 0 else abs_err,
        encrypt_s=enc_s / len(arrays),
        aggregate_s=agg_s,
        decrypt_s=dec_s,
    )
