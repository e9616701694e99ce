"""BFV encrypted aggregation: parameters, key-free sums, a fixed-point codec; CKKS baseline."""

from fedsilo.privacy.he.params import (
    Ciphertext,
    DEFAULT_COEFF_MODULUS_BITS,
    DEFAULT_PLAIN_MODULUS,
    DEFAULT_POLY_MODULUS_DEGREE,
    HeError,
    HeParams,
    HeScheme,
)
from fedsilo.privacy.he.ckks import CkksBaselineResult, ckks_flare_roundtrip
from fedsilo.privacy.he.codec import (
    FixedPoint,
    decrypt_masked_mean,
    decrypt_mean,
    encrypt_masked_update,
    encrypt_update,
)
from fedsilo.privacy.he.contexts import PublicContext, SecretContext

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
