"""BFV encrypted aggregation: parameters, key-free sums, a fixed-point codec; CKKS baseline."""

from __future__ import annotations

import enum
import hashlib
import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal.sealapi as seal

__all__ = [
    "DEFAULT_COEFF_MODULUS_BITS",
    "DEFAULT_PLAIN_MODULUS",
    "DEFAULT_POLY_MODULUS_DEGREE",
    "CkksBaselineResult",
    "Ciphertext",
    "FixedPoint",
    "HeError",
    "HeParams",
    "HeScheme",
    "PublicContext",
    "SecretContext",
    "ckks_flare_roundtrip",
    "decrypt_mean",
    "encrypt_update",
]

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


# ---------------------------------------------------------------------------------------
# Parameters


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
        if (
            not isinstance(bound, (int, float))
            or isinstance(bound, bool)
            or not math.isfinite(bound)
            or bound <= 0
        ):
            raise ValueError(f"invalid bound {bound!r}: must be a finite number > 0")
        object.__setattr__(self, "bound", float(bound))

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


# ---------------------------------------------------------------------------------------
# SEAL's (de)serialization in this binding goes through file paths only. Each thread keeps
# one anonymous in-memory file (memfd; nothing touches a disk and it has no name another
# process could open), reached as /proc/self/fd/N. Elsewhere: a private 0700 temp dir.


class _Scratch(threading.local):
    def __init__(self) -> None:
        self.pid = -1
        self.file: Any = None  # an unbuffered FileIO; closing it (or GC at thread exit) frees it
        self.fd = -1
        self.path = ""

    def _ensure(self) -> None:
        if self.pid == os.getpid():
            return
        if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
            fd = os.memfd_create("fedsilo-he", os.MFD_CLOEXEC)
            path = f"/proc/self/fd/{fd}"
        else:  # pragma: no cover - non-Linux fallback
            path = os.path.join(tempfile.mkdtemp(prefix="fedsilo-he-"), "blob")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.file = os.fdopen(fd, "r+b", buffering=0)  # after a fork, drops the parent's
        self.fd, self.path, self.pid = fd, path, os.getpid()

    def save(self, obj: Any, *, sensitive: bool = False) -> bytes:
        self._ensure()
        obj.save(self.path)  # SEAL opens the file truncated
        try:
            return os.pread(self.fd, os.fstat(self.fd).st_size, 0)
        finally:
            if sensitive:
                os.ftruncate(self.fd, 0)

    def load(self, obj: Any, context: Any, data: bytes, *, sensitive: bool = False) -> None:
        self._ensure()
        os.pwrite(self.fd, data, 0)
        os.ftruncate(self.fd, len(data))
        try:
            obj.load(context, self.path)
        finally:
            if sensitive:
                os.ftruncate(self.fd, 0)


_scratch = _Scratch()


def _seal_parameters(params: HeParams) -> Any:
    if params.scheme is not HeScheme.BFV:
        raise HeError(
            f"{params.scheme.name} is only available as the FLARE baseline "
            "(ckks_flare_roundtrip); encrypted aggregation uses BFV"
        )
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.BFV)
    parms.set_poly_modulus_degree(params.poly_modulus_degree)
    parms.set_coeff_modulus(
        seal.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_modulus_bits))
    )
    parms.set_plain_modulus(seal.Modulus(params.plain_modulus))
    context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
    if not context.parameters_set():
        raise HeError(f"SEAL refused the parameters: {context.parameters_error_message()}")
    return context


class PublicContext:
    """Everything the coordinator holds: the public parameters and an evaluator, no key.

    It can load ciphertexts, add them and serialize the sum; it cannot encrypt or decrypt.
    Not safe for concurrent use of one ciphertext from several threads.

    Args:
        params: BFV parameters (`HeParams`); CKKS is refused.

    Raises:
        HeError: If the parameters are not BFV or SEAL refuses them.
    """

    def __init__(self, params: HeParams) -> None:
        if not isinstance(params, HeParams):
            raise TypeError(f"params must be HeParams, got {type(params).__name__}")
        self._params = params
        self._context = _seal_parameters(params)
        self._parms_id = self._context.first_parms_id()
        self._evaluator = seal.Evaluator(self._context)
        self._max_blob = params.bytes_estimate(params.slots, aggregate=True)

    @property
    def params(self) -> HeParams:
        """The parameters this context was built from."""
        return self._params

    @property
    def has_secret_key(self) -> bool:
        """Whether this context can decrypt; always False for a `PublicContext`."""
        return False

    def load(self, blob: bytes) -> Ciphertext:
        """Deserializes and checks one ciphertext (a silo's seeded upload or a saved sum).

        Args:
            blob: Bytes from `SecretContext.encrypt` or `dump`.

        Returns:
            The ciphertext, ready for `add`.

        Raises:
            HeError: If the bytes are too large, do not deserialize, were made with other
                parameters, or are not a fresh-or-summed ciphertext of these parameters.
        """
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise HeError(f"a ciphertext must be bytes, got {type(blob).__name__}")
        if len(blob) > self._max_blob:
            raise HeError(
                f"ciphertext of {len(blob)} bytes is larger than any ciphertext of these "
                f"parameters can be ({self._max_blob} bytes)"
            )
        ct = seal.Ciphertext(self._context)
        try:
            _scratch.load(ct, self._context, bytes(blob))
        except _SEAL_ERRORS as exc:
            raise HeError(
                f"ciphertext ({len(blob)} bytes) does not deserialize with these HE parameters "
                f"(fingerprint {self._params.fingerprint()[:16]}): corrupt, or made with "
                f"other parameters ({exc})"
            ) from None
        if ct.parms_id() != self._parms_id:
            raise HeError("ciphertext was made with other HE parameters (parms_id differs)")
        if ct.size() != 2 or ct.is_ntt_form():
            raise HeError(
                f"ciphertext has size {ct.size()} (ntt={ct.is_ntt_form()}); a fresh or "
                "summed BFV ciphertext has size 2 and is not in NTT form"
            )
        if ct.is_transparent():
            raise HeError("ciphertext is transparent: its values are not encrypted")
        return ct

    def add(self, acc: Ciphertext | None, ct: Ciphertext) -> Ciphertext:
        """Adds ``ct`` into the running sum ``acc`` in place.

        Args:
            acc: The running sum, or None to start one (``ct`` itself is then returned,
                so do not reuse ``ct`` elsewhere).
            ct: A ciphertext from `load`.

        Returns:
            The running sum.

        Raises:
            HeError: If either ciphertext does not belong to these parameters.
        """
        for name, c in (("acc", acc), ("ct", ct)):
            if c is None and name == "acc":
                continue
            if not isinstance(c, seal.Ciphertext) or c.parms_id() != self._parms_id:
                raise HeError(f"{name} is not a ciphertext of these HE parameters; use load()")
        if acc is None:
            return ct
        self._evaluator.add_inplace(acc, ct)
        return acc

    def sum(self, blobs: Iterable[bytes]) -> Ciphertext:
        """Loads and adds ciphertexts (one chunk position from several silos).

        Raises:
            HeError: If there are none, or one fails `load`.
        """
        acc: Ciphertext | None = None
        for blob in blobs:
            acc = self.add(acc, self.load(blob))
        if acc is None:
            raise HeError("nothing to sum: no ciphertexts given")
        return acc

    def dump(self, ct: Ciphertext) -> bytes:
        """Serializes a ciphertext in full (unseeded), e.g. an aggregate or a checkpoint.

        Raises:
            HeError: If ``ct`` does not belong to these parameters.
        """
        if not isinstance(ct, seal.Ciphertext) or ct.parms_id() != self._parms_id:
            raise HeError("not a ciphertext of these HE parameters; use load()")
        return _scratch.save(ct)


class SecretContext(PublicContext):
    """A silo's context: `PublicContext` plus the shared secret key (encrypt, decrypt).

    Build one with `generate` (the key holder) or `from_secret_key` (the other silos).
    Encryption is symmetric and seeded: the uniformly random half of each ciphertext is
    replaced by a PRNG seed on the wire, which halves the upload.
    """

    def __init__(self, params: HeParams, secret_key: Any) -> None:
        super().__init__(params)
        self._secret_key = secret_key
        self._encryptor = seal.Encryptor(self._context, secret_key)
        self._decryptor = seal.Decryptor(self._context, secret_key)
        self._encoder = seal.BatchEncoder(self._context)
        self._half = (params.plain_modulus - 1) // 2

    @classmethod
    def generate(cls, params: HeParams) -> SecretContext:
        """Creates a fresh secret key (the key holder, once per run)."""
        tmp = PublicContext(params)
        return cls(params, seal.KeyGenerator(tmp._context).secret_key())

    @classmethod
    def from_secret_key(cls, params: HeParams, data: bytes) -> SecretContext:
        """Rebuilds a context from `secret_key_bytes` output (after the key ceremony).

        Raises:
            HeError: If the bytes are not a secret key for these parameters.
        """
        tmp = PublicContext(params)
        key = seal.SecretKey()
        try:
            _scratch.load(key, tmp._context, bytes(data), sensitive=True)
        except _SEAL_ERRORS as exc:
            raise HeError(f"not a secret key for these HE parameters: {exc}") from None
        if not seal.is_valid_for(key, tmp._context):
            raise HeError("not a secret key for these HE parameters")
        return cls(params, key)

    @property
    def has_secret_key(self) -> bool:
        """Always True: this context can encrypt and decrypt."""
        return True

    def secret_key_bytes(self) -> bytes:
        """The secret key, serialized, for wrapping in the key ceremony. Handle with care."""
        return _scratch.save(self._secret_key, sensitive=True)

    def encrypt(self, ints: np.ndarray | Sequence[int]) -> list[bytes]:
        """Encrypts signed integers, one per slot, as seeded symmetric ciphertexts.

        Args:
            ints: A 1-D integer array with every ``|x| <= (t - 1) / 2``.

        Returns:
            ``params.n_chunks(len(ints))`` blobs; the last chunk is zero-padded.

        Raises:
            ValueError: If ``ints`` is not 1-D integers or a value is out of range.
        """
        x = np.asarray(ints)
        if x.ndim != 1 or not (np.issubdtype(x.dtype, np.integer) or x.size == 0):
            raise ValueError(
                f"invalid ints: need a 1-D integer array, got shape {x.shape} dtype {x.dtype} "
                "(quantize floats with FixedPoint.encode first)"
            )
        if x.size and (int(x.max()) > self._half or int(x.min()) < -self._half):
            raise ValueError(
                f"invalid ints: values span [{int(x.min())}, {int(x.max())}], outside "
                f"+-(t - 1) / 2 = +-{self._half}"
            )
        x = x.astype(np.int64, copy=False)
        slots = self._params.slots
        out = []
        for start in range(0, x.size, slots):
            pt = seal.Plaintext()
            self._encoder.encode(x[start : start + slots].tolist(), pt)
            out.append(_scratch.save(self._encryptor.encrypt_symmetric(pt)))
        return out

    def decrypt(self, blobs: Sequence[bytes], n: int, *, check_noise: bool = True) -> np.ndarray:
        """Decrypts chunks (typically the aggregate) back to signed integers.

        Args:
            blobs: Exactly ``params.n_chunks(n)`` ciphertexts, in order.
            n: How many values to return (the padding of the last chunk is dropped).
            check_noise: Refuse a ciphertext whose noise budget is spent (its decryption
                would be garbage, e.g. more than ``max_silos`` were added). Costs ~20%.

        Returns:
            int64 array of ``n`` values, centred modulo t (in ``[-(t-1)/2, (t-1)/2]``).

        Raises:
            HeError: Wrong number of chunks, a chunk fails `load`, or its noise is spent.
        """
        want = self._params.n_chunks(n)
        if len(blobs) != want:
            raise HeError(f"{n} values need {want} ciphertexts, got {len(blobs)}")
        out = np.empty(want * self._params.slots, dtype=np.int64)
        slots = self._params.slots
        for i, blob in enumerate(blobs):
            ct = self.load(blob)
            if check_noise and self._decryptor.invariant_noise_budget(ct) <= 0:
                raise HeError(
                    f"ciphertext {i} has no noise budget left: it cannot be decrypted "
                    f"(more than max_silos={self._params.max_silos} additions?)"
                )
            pt = seal.Plaintext()
            self._decryptor.decrypt(ct, pt)
            out[i * slots : (i + 1) * slots] = self._encoder.decode_int64(pt)
        return out[:n]

    def noise_budget(self, blob: bytes) -> int:
        """Bits of invariant noise budget left in a ciphertext (0: undecryptable)."""
        return self._decryptor.invariant_noise_budget(self.load(blob))


# ---------------------------------------------------------------------------------------
# Fixed-point codec


@dataclass(frozen=True, kw_only=True)
class FixedPoint:
    """Fixed-point quantizer between float updates and BFV plaintext integers.

    Each silo clips its weighted values to ``[-bound, bound]`` and maps them to integers
    ``|x| <= cap`` with ``cap = floor((t - 1) / 2 / max_silos)`` by scaling with
    ``scale = (cap - 1) / bound`` and unbiased stochastic rounding. Every silo's encoding
    is bounded on its own, so any sum of at most ``max_silos`` encodings stays within
    ``(t - 1) / 2`` and never wraps modulo t, whatever the weights. With the defaults
    (bound 1) the scale is about 2^36: a per-silo rounding error below 1.5e-11.

    Attributes:
        params: BFV parameters (t and max_silos).
        bound: The clip bound; defaults to ``params.bound``. A separate codec with its own
            bound may share the same ciphertext parameters (e.g. bound 1 for a weight mask).
    """

    params: HeParams
    bound: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.params, HeParams) or self.params.scheme is not HeScheme.BFV:
            raise ValueError(f"invalid params {self.params!r}: FixedPoint needs BFV HeParams")
        bound = self.params.bound if self.bound is None else self.bound
        if (
            not isinstance(bound, (int, float))
            or isinstance(bound, bool)
            or not math.isfinite(bound)
            or bound <= 0
        ):
            raise ValueError(f"invalid bound {bound!r}: must be a finite number > 0")
        object.__setattr__(self, "bound", float(bound))

    @property
    def cap(self) -> int:
        """The largest |integer| one silo's encoding can take."""
        return (self.params.plain_modulus - 1) // 2 // self.params.max_silos

    @property
    def scale(self) -> float:
        """Integers per unit: ``encode`` maps v to about ``v * scale``."""
        return (self.cap - 1) / self.bound

    def encode(self, values: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """Clips to ``[-bound, bound]`` and quantizes with unbiased stochastic rounding.

        Args:
            values: Finite real values, any shape.
            rng: Randomness for the rounding (E[decode(encode(v))] = clip(v)).

        Returns:
            The int64 encoding (same shape) and how many values were clipped.

        Raises:
            ValueError: If a value is NaN or infinite.
        """
        v = np.asarray(values, dtype=np.float64)
        finite = np.isfinite(v)
        if not finite.all():
            raise ValueError(f"invalid values: {int(v.size - finite.sum())} are NaN or infinite")
        n_clipped = int(np.count_nonzero(np.abs(v) > self.bound))
        y = np.clip(v, -self.bound, self.bound)
        y *= self.scale
        floor = np.floor(y)
        y -= floor  # the fractional part, in [0, 1)
        floor += rng.random(v.shape) < y
        np.clip(floor, -self.cap, self.cap, out=floor)
        return floor.astype(np.int64), n_clipped

    def decode(self, ints: np.ndarray) -> np.ndarray:
        """Maps integers (an encoding or a sum of encodings) back to float64."""
        return np.asarray(ints, dtype=np.int64).astype(np.float64) / self.scale


def encrypt_update(
    ctx: SecretContext, q: FixedPoint, weighted: np.ndarray, rng: np.random.Generator
) -> tuple[list[bytes], int]:
    """A silo's upload: quantizes ``w_i * u_i`` (flattened) and encrypts it.

    Args:
        ctx: The silo's secret context.
        q: The codec (same parameters as ``ctx``).
        weighted: The weighted update ``w_i * u_i``, any shape (flattened in C order).
        rng: Randomness for the stochastic rounding.

    Returns:
        The seeded ciphertext blobs and how many values were clipped to ``q.bound``.

    Raises:
        ValueError: If ``q`` and ``ctx`` disagree on parameters or a value is not finite.
    """
    _same_params(ctx, q)
    ints, n_clipped = q.encode(np.ravel(weighted), rng)
    return ctx.encrypt(ints), n_clipped


def decrypt_mean(
    ctx: SecretContext, q: FixedPoint, blobs: Sequence[bytes], n: int, total_weight: float
) -> np.ndarray:
    """Decrypts an aggregate and divides by the contributors' total weight.

    Args:
        ctx: A silo's secret context.
        q: The codec the contributions were encoded with.
        blobs: The aggregate's chunks.
        n: Number of values.
        total_weight: Sum of the weights of the silos that are in the sum (> 0).

    Returns:
        The weighted mean, float64, ``n`` values.

    Raises:
        ValueError: If ``total_weight`` is not finite and > 0, or parameters disagree.
        HeError: If the aggregate does not decrypt (see `SecretContext.decrypt`).
    """
    _same_params(ctx, q)
    if (
        not isinstance(total_weight, (int, float))
        or isinstance(total_weight, bool)
        or not math.isfinite(total_weight)
        or total_weight <= 0
    ):
        raise ValueError(f"invalid total_weight {total_weight!r}: must be a finite number > 0")
    return q.decode(ctx.decrypt(blobs, n)) / float(total_weight)


def _same_params(ctx: PublicContext, q: FixedPoint) -> None:
    a, b = ctx.params, q.params
    same = (a.poly_modulus_degree, a.coeff_modulus_bits, a.plain_modulus, a.max_silos) == (
        b.poly_modulus_degree,
        b.coeff_modulus_bits,
        b.plain_modulus,
        b.max_silos,
    )
    if not same:
        raise ValueError(
            f"FixedPoint parameters ({b.fingerprint()[:16]}) differ from the context's "
            f"({a.fingerprint()[:16]})"
        )


# ---------------------------------------------------------------------------------------
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


def encrypt_masked_update(
    ctx: SecretContext, q: FixedPoint, weighted: np.ndarray, weight_mask: np.ndarray, rng: np.random.Generator
) -> tuple[list[bytes], list[bytes], int]:
    """A silo's masked upload: Enc(w·m⊙u) and Enc(w·m), so the mask itself stays encrypted.

    Used when only some elements are shared (a personalisation mask m ∈ {0, 1} per element):
    the weighted mean is then per element, Σ_i w_i m_i u_i / Σ_i w_i m_i.

    Args:
        ctx: The silo's secret context.
        q: The codec.
        weighted: ``w_i * u_i`` (any shape; the mask is applied here).
        weight_mask: ``w_i * m_i``, same shape, values in [0, bound].
        rng: Randomness for the stochastic rounding.

    Returns:
        (numerator blobs, denominator blobs, values clipped).

    Raises:
        ValueError: Shapes differ, or a weight-mask value is negative.
    """
    values = np.ravel(np.asarray(weighted, dtype=np.float64))
    wm = np.ravel(np.asarray(weight_mask, dtype=np.float64))
    if values.shape != wm.shape:
        raise ValueError(f"weighted update has {values.size} values, weight mask {wm.size}")
    if (wm < 0).any():
        raise ValueError("invalid weight mask: values must be >= 0 (a weight times a 0/1 mask)")
    num, clipped = encrypt_update(ctx, q, np.where(wm > 0, values, 0.0), rng)
    den, clipped_den = encrypt_update(ctx, q, wm, rng)
    return num, den, clipped + clipped_den


def decrypt_masked_mean(
    ctx: SecretContext, q: FixedPoint, num_blobs: Sequence[bytes], den_blobs: Sequence[bytes], n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Decrypts the sums of a masked round and divides element by element.

    Returns:
        (mean, shared): ``mean`` is Σ w m u / Σ w m where ``shared`` is True; where no
        contributor shared the element (Σ w m decrypts to exactly 0, e.g. an all-zero mask
        column) ``shared`` is False and ``mean`` is NaN: the caller keeps its local value.
    """
    _same_params(ctx, q)
    num = q.decode(ctx.decrypt(num_blobs, n))
    den_ints = ctx.decrypt(den_blobs, n)
    shared = den_ints != 0
    mean = np.full(n, np.nan)
    mean[shared] = num[shared] / q.decode(den_ints[shared])
    return mean, shared
