"""SEAL contexts: the key-free public side that adds ciphertexts, and the secret side that decrypts."""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tenseal.sealapi as seal

from fedsilo.privacy.he.params import Ciphertext, HeError, HeParams, HeScheme, _SEAL_ERRORS


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
