"""BFV parameters: validated ring, moduli and bound, their fingerprint, and the HE errors."""

from __future__ import annotations

import enum
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import tenseal.sealapi as seal


Ciphertext = seal.Ciphertext
"""A loaded SEAL ciphertext; opaque to callers, produced by `PublicContext.load`."""


# Defaults chosen by measurement (benchmarks/he_codec_probe.py; TenSEAL 0.3.18 / SEAL 4.1):
# one 56-bit data prime serializes (SEAL's zstd) to 7.60 B per slot seeded and 15.1 B per
# slot unseeded; 57-bit is 7.71, 60-bit 8.05. A 43-bit plain modulus leaves q/t = 2^13,
# 2.9x the worst-case noise of a sum of 64 fresh ciphertexts (see _NOISE_MAX), and a
# fixed-point scale of 2^36 per unit of bound.
DEFAULT_POLY_MODULUS_DEGREE = 4096
DEFAULT_COEFF_MODULUS_BITS: tuple[int, ...] = (56,)


# The largest prime below 2^43 that is 1 mod 8192 (SEAL's PlainModulus.Batching(4096, 43)).
DEFAULT_PLAIN_MODULUS = 8796092858369


# SEAL samples fresh-encryption noise from a centred binomial distribution on [-21, 21]
# (or a normal clipped at 6 sigma = 19.2 when built with SEAL_USE_GAUSSIAN_NOISE), and BFV's
# scaling of the plaintext by q/t rounds with error <= 1/2. A sum of K fresh ciphertexts
# therefore carries noise <= K * (21 + 1), and decrypts exactly while that is < q / (2t).
_NOISE_MAX = 21
_FORMAT = "fedsilo.he.params/1"
_MIN_DEGREE = 1024
_MAX_DEGREE = 32768
_MAX_PRIME_BITS = 60  # SEAL's limit for one coefficient-modulus prime
_MAX_PLAIN_BITS = 60
_FRAMING_BYTES = 1024  # SEAL header, metadata, PRNG seed and compression framing, generous


# What pybind11 turns SEAL's C++ exceptions into (std::exception, invalid_argument,
# out_of_range, overflow_error, bad_alloc).
_SEAL_ERRORS = (RuntimeError, ValueError, IndexError, OverflowError, MemoryError)


class HeScheme(enum.Enum):
    """Which homomorphic scheme a parameter set is for."""

    BFV = "bfv"
    """Our default: exact integer sums mod t, seeded symmetric ciphertexts."""
    CKKS = "ckks"
    """Only as the comparison baseline (NVIDIA FLARE's default); see `ckks_flare_roundtrip`."""


class HeError(Exception):
    """A ciphertext, key or parameter blob is unusable: corrupt, foreign or out of range."""


# Parameters


def finite_positive(name: str, value: Any) -> float:
    """``value`` as a float if it is a finite number > 0, else ValueError naming ``name``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"invalid {name} {value!r}: must be a finite number > 0")
    return float(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin, exact for every n < 3.3e24 (far beyond 2^64)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for p in small:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d //= 2
        r += 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


@dataclass(frozen=True, kw_only=True)
class HeParams:
    """Public homomorphic-encryption parameters; what the coordinator and every silo share.

    The defaults are the BFV set fedsilo uses: N=4096, one 56-bit coefficient prime (far
    under the 109 bits HomomorphicEncryption.org allows for 128-bit security at N=4096;
    it is even under the 58-bit limit for 256-bit security), t = 8796092858369 (a 43-bit
    batching prime). Each slot carries one fixed-point value; a seeded ciphertext costs
    about 7.6 bytes per value on the wire, an aggregate (unseeded) about 15.1.

    Attributes:
        scheme: BFV (fedsilo's scheme) or CKKS (the FLARE baseline only).
        poly_modulus_degree: N, a power of two in [1024, 32768]; BFV has N slots per
            ciphertext, CKKS N/2.
        coeff_modulus_bits: Bit sizes of the coefficient-modulus primes (each 2..60). With
            more than one prime the last is SEAL's special prime and ciphertexts carry the
            others; with one prime, ciphertexts carry it. The total must not exceed
            ``CoeffModulus.MaxBitCount(N, TC128)``.
        plain_modulus: BFV only: t, a prime that is 1 mod 2N (so batching works). None for
            CKKS.
        scale_bits: CKKS only: log2 of the encoding scale. None for BFV.
        bound: B > 0, the public elementwise clip bound of the weighted values each silo
            encrypts (`FixedPoint` clips to [-B, B] before quantizing).
        max_silos: How many ciphertexts may be added into one sum. BFV parameters are
            refused when such a sum could fail to decrypt exactly, and `FixedPoint` picks
            its scale so that it cannot wrap modulo t.
    """

    scheme: HeScheme = HeScheme.BFV
    poly_modulus_degree: int = DEFAULT_POLY_MODULUS_DEGREE
    coeff_modulus_bits: tuple[int, ...] = DEFAULT_COEFF_MODULUS_BITS
    plain_modulus: int | None = DEFAULT_PLAIN_MODULUS
    scale_bits: int | None = None
    bound: float = 1.0
    max_silos: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.scheme, HeScheme):
            raise ValueError(
                f"invalid scheme {self.scheme!r}: must be a HeScheme "
                f"({', '.join(s.name for s in HeScheme)})"
            )
        n = self.poly_modulus_degree
        if not _is_int(n) or n < _MIN_DEGREE or n > _MAX_DEGREE or n & (n - 1):
            raise ValueError(
                f"invalid poly_modulus_degree {n!r}: must be a power of two in "
                f"[{_MIN_DEGREE}, {_MAX_DEGREE}]"
            )
        bits = self.coeff_modulus_bits
        if isinstance(bits, list):
            bits = tuple(bits)
            object.__setattr__(self, "coeff_modulus_bits", bits)
        if (
            not isinstance(bits, tuple)
            or not bits
            or not all(_is_int(b) and 2 <= b <= _MAX_PRIME_BITS for b in bits)
        ):
            raise ValueError(
                f"invalid coeff_modulus_bits {bits!r}: must be a non-empty tuple of prime "
                f"bit sizes, each in [2, {_MAX_PRIME_BITS}]"
            )
        max_bits = seal.CoeffModulus.MaxBitCount(n, seal.SEC_LEVEL_TYPE.TC128)
        if sum(bits) > max_bits:
            raise ValueError(
                f"insecure coeff_modulus_bits {bits!r}: {sum(bits)} bits in total, but the "
                f"HomomorphicEncryption.org standard allows at most {max_bits} bits at "
                f"poly_modulus_degree={n} for 128-bit security"
            )
        try:
            primes = seal.CoeffModulus.Create(n, list(bits))
        except (ValueError, RuntimeError) as exc:
            raise ValueError(
                f"invalid coeff_modulus_bits {bits!r}: SEAL cannot find such primes for "
                f"poly_modulus_degree={n} ({exc})"
            ) from None
        data_primes = primes[:-1] if len(primes) > 1 else primes
        q_data = math.prod(p.value() for p in data_primes)

        if not _is_int(self.max_silos) or self.max_silos < 1:
            raise ValueError(f"invalid max_silos {self.max_silos!r}: must be an integer >= 1")
        bound = self.bound
        object.__setattr__(self, "bound", finite_positive("bound", bound))

        if self.scheme is HeScheme.BFV:
            self._check_bfv(q_data)
        else:
            self._check_ckks(data_primes)

    def _check_bfv(self, q_data: int) -> None:
        n, t = self.poly_modulus_degree, self.plain_modulus
        if self.scale_bits is not None:
            raise ValueError(f"invalid scale_bits {self.scale_bits!r}: BFV takes none (None)")
        if not _is_int(t) or t < 3 or t.bit_length() > _MAX_PLAIN_BITS:
            raise ValueError(
                f"invalid plain_modulus {t!r}: BFV needs an integer prime of at most "
                f"{_MAX_PLAIN_BITS} bits"
            )
        if not _is_prime(t):
            raise ValueError(f"invalid plain_modulus {t}: not prime")
        if t % (2 * n) != 1:
            raise ValueError(
                f"invalid plain_modulus {t}: must be 1 mod 2N = {2 * n} for batching "
                f"(t mod 2N = {t % (2 * n)})"
            )
        needed = 2 * t * self.max_silos * (_NOISE_MAX + 1)
        if q_data <= needed:
            raise ValueError(
                f"invalid plain_modulus {t} for coeff_modulus_bits {self.coeff_modulus_bits} "
                f"and max_silos={self.max_silos}: a sum of {self.max_silos} ciphertexts could "
                f"fail to decrypt exactly (q/t = 2^{math.log2(q_data / t):.1f}, needs more "
                f"than 2^{math.log2(needed / t):.1f}); use a smaller plain_modulus or "
                "max_silos, or a larger coefficient modulus"
            )
        if (t - 1) // 2 // self.max_silos < 2:
            raise ValueError(
                f"invalid plain_modulus {t}: too small for max_silos={self.max_silos}"
            )

    def _check_ckks(self, data_primes: Sequence[Any]) -> None:
        if self.plain_modulus is not None:
            raise ValueError(
                f"invalid plain_modulus {self.plain_modulus!r}: CKKS takes none (None)"
            )
        sb = self.scale_bits
        if not _is_int(sb) or not 1 <= sb <= _MAX_PRIME_BITS:
            raise ValueError(
                f"invalid scale_bits {sb!r}: CKKS needs an integer in [1, {_MAX_PRIME_BITS}]"
            )
        if len(self.coeff_modulus_bits) < 2:
            raise ValueError(
                f"invalid coeff_modulus_bits {self.coeff_modulus_bits!r}: CKKS needs at "
                "least a data prime and a special prime"
            )
        if sb >= max(p.bit_count() for p in data_primes):
            raise ValueError(
                f"invalid scale_bits {sb}: must be below the largest data prime "
                f"({self.coeff_modulus_bits})"
            )

    @classmethod
    def flare_default(cls) -> HeParams:
        """NVIDIA FLARE's default CKKS set (the baseline): N=8192, [60, 40, 40], scale 2^40."""
        return cls(
            scheme=HeScheme.CKKS,
            poly_modulus_degree=8192,
            coeff_modulus_bits=(60, 40, 40),
            plain_modulus=None,
            scale_bits=40,
        )

    @property
    def slots(self) -> int:
        """Values per ciphertext: N for BFV, N/2 for CKKS."""
        n = self.poly_modulus_degree
        return n if self.scheme is HeScheme.BFV else n // 2

    def n_chunks(self, n_values: int) -> int:
        """How many ciphertexts ``n_values`` values take (the last one zero-padded).

        Raises:
            ValueError: If ``n_values`` is not an integer >= 0.
        """
        if not _is_int(n_values) or n_values < 0:
            raise ValueError(f"invalid n_values {n_values!r}: must be an integer >= 0")
        return -(-n_values // self.slots)

    def bytes_estimate(self, n_values: int, *, aggregate: bool = False) -> int:
        """Upper bound on the serialized size of ``n_values`` encrypted values.

        The bound is the uncompressed ciphertext size plus generous framing, so a receiver
        can refuse anything larger; SEAL's zstd makes real sizes a little smaller (defaults:
        7.6 B/value measured against a bound of 8.25 per value).

        Args:
            n_values: How many values (they take ``n_chunks(n_values)`` ciphertexts).
            aggregate: Size of a full (unseeded) ciphertext, as the coordinator sends
                back, instead of a silo's seeded upload. CKKS uploads are never seeded.

        Returns:
            Bytes, summed over all chunks.
        """
        data_primes = max(1, len(self.coeff_modulus_bits) - 1)
        polys = 2 if (aggregate or self.scheme is HeScheme.CKKS) else 1
        per_ct = polys * self.poly_modulus_degree * data_primes * 8 + _FRAMING_BYTES
        return self.n_chunks(n_values) * per_ct

    def to_bytes(self) -> bytes:
        """Canonical JSON (sorted keys, no spaces): what travels on the wire."""
        doc = {
            "format": _FORMAT,
            "scheme": self.scheme.value,
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_modulus_bits": list(self.coeff_modulus_bits),
            "plain_modulus": self.plain_modulus,
            "scale_bits": self.scale_bits,
            "bound": self.bound,
            "max_silos": self.max_silos,
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> HeParams:
        """Parses and validates `to_bytes` output.

        Raises:
            HeError: If the bytes are not such JSON, or describe invalid or insecure
                parameters (the message names the field).
        """
        try:
            doc = json.loads(bytes(data).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, TypeError) as exc:
            raise HeError(f"HE parameters are not valid JSON: {exc}") from None
        expected = {
            "format",
            "scheme",
            "poly_modulus_degree",
            "coeff_modulus_bits",
            "plain_modulus",
            "scale_bits",
            "bound",
            "max_silos",
        }
        if not isinstance(doc, dict) or set(doc) != expected:
            got = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
            raise HeError(f"HE parameters must have exactly the keys {sorted(expected)}; got {got}")
        if doc["format"] != _FORMAT:
            raise HeError(f"unknown HE parameter format {doc['format']!r} (expected {_FORMAT!r})")
        try:
            scheme = HeScheme(doc["scheme"])
        except ValueError:
            raise HeError(f"invalid scheme {doc['scheme']!r} in HE parameters") from None
        bits = doc["coeff_modulus_bits"]
        try:
            return cls(
                scheme=scheme,
                poly_modulus_degree=doc["poly_modulus_degree"],
                coeff_modulus_bits=tuple(bits) if isinstance(bits, list) else bits,
                plain_modulus=doc["plain_modulus"],
                scale_bits=doc["scale_bits"],
                bound=doc["bound"],
                max_silos=doc["max_silos"],
            )
        except ValueError as exc:
            raise HeError(f"HE parameters refused: {exc}") from None

    def fingerprint(self) -> str:
        """SHA-256 (hex) of `to_bytes`; equal fingerprints mean interchangeable ciphertexts."""
        return hashlib.sha256(self.to_bytes()).hexdigest()
