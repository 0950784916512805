"""The CKKS recipe of pacegate's confidential analytics (TenSEAL / Microsoft SEAL).

One place decides the parameters, creates contexts, serializes the *public* context,
refuses a context that carries a secret key, and packs, encrypts, loads and decrypts
vectors. The hospital (key holder) and the cloud worker (public context only) both call it.

Parameters (justified in docs/analytics.md):

* ``N = 8192`` polynomial degree: 4,096 slots per ciphertext.
* coefficient modulus ``[60, 60, 60]`` bits = 180 bits, under the 218-bit bound the
  Homomorphic Encryption Standard gives for N = 8192 at 128-bit classical security
  (ternary secret). SEAL enforces that bound itself (``sec_level = tc128``).
* scale ``2**40``. The cloud does one ciphertext x ciphertext multiplication and **never
  rescales or relinearizes** (so no relinearization or Galois keys are shipped): a product
  has scale ``2**80`` and size 3, sums of products stay at that scale, and the hospital
  decrypts size-3 ciphertexts directly. The two data primes (120 bits) hold
  ``2**80 * max slot value``, which stays below ``2**119`` for any realistic session
  (see :data:`MAX_SLOT_MAGNITUDE_BITS`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import tenseal as ts

from pacegate.analytics_wire import AnalyticsProtocolError

POLY_MODULUS_DEGREE = 8192
COEFF_MOD_BIT_SIZES = (60, 60, 60)
SCALE_BITS = 40
GLOBAL_SCALE = float(2**SCALE_BITS)
SLOTS = POLY_MODULUS_DEGREE // 2
# Homomorphic Encryption Standard (2018), table for 128-bit classical security with a
# ternary secret: the largest total coefficient-modulus size per polynomial degree.
HE_STANDARD_128_MAX_BITS = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
# Data-level modulus (all primes but the special one) = 120 bits. A product of two fresh
# ciphertexts has scale 2**80; the decryptor needs |value| * 2**80 < 2**119 (sign bit),
# so a slot may accumulate values up to 2**39 in magnitude. hospital/analysis bounds its
# inputs (heart rate <= 250, age <= 120, so a product <= 2**15) and the worker caps the
# number of batches per session, which keeps every slot under this bound.
MAX_SLOT_MAGNITUDE_BITS = sum(COEFF_MOD_BIT_SIZES[:-1]) - 1 - 2 * SCALE_BITS
# Bounds on peer input sizes: a public context (public key only) is ~0.4 MB, a fresh
# ciphertext ~0.26 MB, a size-3 product ~0.39 MB. Anything far larger is refused unread.
MAX_CONTEXT_BYTES = 4 << 20
MAX_CIPHERTEXT_BYTES = 1 << 20

# The parameters must stay inside the HE standard's 128-bit bound: checked at import, so a
# change that breaks it cannot run at all (an assert would vanish under python -O).
if sum(COEFF_MOD_BIT_SIZES) > HE_STANDARD_128_MAX_BITS[POLY_MODULUS_DEGREE]:
    raise ImportError(
        f"pacegate.ckks: coefficient modulus of {sum(COEFF_MOD_BIT_SIZES)} bits exceeds the "
        f"128-bit bound {HE_STANDARD_128_MAX_BITS[POLY_MODULUS_DEGREE]} for N={POLY_MODULUS_DEGREE}"
    )

FloatArray = npt.NDArray[np.float64]


def create_context() -> ts.Context:
    """A fresh private context (holds the secret key): the hospital's, never shipped.

    Automatic relinearization, rescaling and modulus switching are off: the recipe's
    computation needs none of them, and the flags travel with the public context."""
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        POLY_MODULUS_DEGREE,
        coeff_mod_bit_sizes=list(COEFF_MOD_BIT_SIZES),
    )
    ctx.global_scale = GLOBAL_SCALE
    ctx.auto_relin = False
    ctx.auto_rescale = False
    ctx.auto_mod_switch = False
    return ctx


def public_context_bytes(ctx: ts.Context) -> bytes:
    """Serialize the public part only: public key, no secret, no Galois, no relin keys.

    The result is reloaded and checked before it is returned, so a bug here cannot ship
    a secret key to the cloud."""
    data: bytes = ctx.serialize(
        save_public_key=True,
        save_secret_key=False,
        save_galois_keys=False,
        save_relin_keys=False,
    )
    check = ts.context_from(data)
    if check.is_private() or check.has_secret_key():
        raise RuntimeError("serialized public CKKS context still holds a secret key")
    return data


@functools.cache
def _reference_parms_id() -> tuple[int, ...]:
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS, POLY_MODULUS_DEGREE, coeff_mod_bit_sizes=list(COEFF_MOD_BIT_SIZES)
    )
    return tuple(ctx.seal_context().data.key_parms_id())


def load_public_context(data: bytes) -> ts.Context:
    """Load a context received from a peer, or raise :class:`AnalyticsProtocolError`.

    Refused: anything that does not deserialize, a context holding a secret key, a scheme
    other than CKKS, parameters other than this recipe's, a scale other than 2**40."""
    if len(data) > MAX_CONTEXT_BYTES:
        raise AnalyticsProtocolError(
            f"CKKS context of {len(data)} bytes exceeds {MAX_CONTEXT_BYTES} "
            "(Galois keys are not accepted: send the public key only)",
            reason="context_too_large",
        )
    try:
        ctx = ts.context_from(data)
    except Exception as exc:  # TenSEAL raises ValueError/RuntimeError from C++
        raise AnalyticsProtocolError(
            f"CKKS context does not deserialize: {exc}", reason="bad_context"
        ) from None
    if ctx.is_private() or ctx.has_secret_key():
        del ctx
        raise AnalyticsProtocolError(
            "CKKS context contains a secret key: refused; the hospital must send the "
            "public context only (pacegate.ckks.public_context_bytes)",
            reason="secret_key_in_context",
        )
    try:
        parms = ctx.seal_context().data.key_context_data().parms()
        degree = int(parms.poly_modulus_degree())
        scheme = parms.scheme()
        parms_id = tuple(ctx.seal_context().data.key_parms_id())
        scale = float(ctx.global_scale)
    except Exception as exc:
        raise AnalyticsProtocolError(
            f"CKKS context has no usable parameters: {exc}", reason="bad_context"
        ) from None
    if scheme != ts.SCHEME_TYPE.CKKS.value:
        raise AnalyticsProtocolError(f"context scheme is {scheme}, not CKKS", reason="bad_context")
    if degree != POLY_MODULUS_DEGREE or parms_id != _reference_parms_id():
        raise AnalyticsProtocolError(
            f"CKKS context parameters differ from pacegate's recipe (N={degree}; expected "
            f"N={POLY_MODULUS_DEGREE}, coefficient moduli {list(COEFF_MOD_BIT_SIZES)} bits)",
            reason="wrong_parameters",
        )
    if not math.isclose(scale, GLOBAL_SCALE):
        raise AnalyticsProtocolError(
            f"CKKS context scale is {scale}, expected 2**{SCALE_BITS}", reason="wrong_parameters"
        )
    if not ctx.has_public_key():
        raise AnalyticsProtocolError("CKKS context has no public key", reason="bad_context")
    if ctx.auto_relin and not ctx.has_relin_keys():
        raise AnalyticsProtocolError(
            "CKKS context asks for automatic relinearization but carries no relin keys",
            reason="wrong_parameters",
        )
    # Settable on a public context (auto_relin is not, hence the check above).
    ctx.auto_rescale = False
    ctx.auto_mod_switch = False
    return ctx


def pack(values: Sequence[float] | npt.NDArray[Any]) -> FloatArray:
    """Pad ``values`` with zeros to a full vector of :data:`SLOTS` slots."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.shape[0] > SLOTS:
        raise ValueError(f"a CKKS vector holds at most {SLOTS} values, got shape {arr.shape}")
    out = np.zeros(SLOTS, dtype=np.float64)
    out[: arr.shape[0]] = arr
    return out


def encrypt_vector(ctx: ts.Context, values: Sequence[float] | npt.NDArray[Any]) -> bytes:
    """Encrypt a packed vector (zero padding to :data:`SLOTS`) and serialize it."""
    data: bytes = ts.ckks_vector(ctx, pack(values)).serialize()
    return data


def load_ciphertext(ctx: ts.Context, data: bytes, *, degree: int = 1) -> ts.CKKSVector:
    """Load a peer's ciphertext for ``ctx``, or raise :class:`AnalyticsProtocolError`.

    ``degree`` 1: a fresh ciphertext or a sum of them (what the hospital sends, and the
    cloud's linear sums) must be one SEAL ciphertext of size 2 at the first data level,
    scale 2**40, holding :data:`SLOTS` slots. ``degree`` 2: a sum of products, size 3,
    scale 2**80. SEAL itself
    refuses data whose parameters differ from the context's or whose coefficients are out
    of range. A ciphertext made under *another key* with the same parameters cannot be
    told apart by a party without the secret key; the hospital's plaintext cross-check
    catches that (docs/analytics.md)."""
    if len(data) > MAX_CIPHERTEXT_BYTES:
        raise AnalyticsProtocolError(
            f"ciphertext of {len(data)} bytes exceeds {MAX_CIPHERTEXT_BYTES}",
            reason="ciphertext_too_large",
        )
    try:
        vec = ts.ckks_vector_from(ctx, data)
        cts = vec.ciphertext()
        size = vec.size()
    except Exception as exc:
        raise AnalyticsProtocolError(
            f"ciphertext does not load under this session's context: {exc}",
            reason="bad_ciphertext",
        ) from None
    if len(cts) != 1 or size != SLOTS:
        raise AnalyticsProtocolError(
            f"ciphertext must be one vector of {SLOTS} slots, got {len(cts)} x {size}",
            reason="bad_ciphertext",
        )
    ct = cts[0]
    if degree not in (1, 2):
        raise ValueError(f"degree must be 1 or 2, got {degree}")
    expected_scale = GLOBAL_SCALE**degree
    expected_size = degree + 1
    if ct.poly_modulus_degree() != POLY_MODULUS_DEGREE or ct.is_transparent():
        raise AnalyticsProtocolError(
            "ciphertext is transparent or mis-sized", reason="bad_ciphertext"
        )
    if ct.parms_id() != ctx.seal_context().data.first_parms_id():
        raise AnalyticsProtocolError(
            "ciphertext is not at the context's first data level", reason="bad_ciphertext"
        )
    if ct.size() != expected_size:
        raise AnalyticsProtocolError(
            f"ciphertext has {ct.size()} polynomials, expected {expected_size}",
            reason="bad_ciphertext",
        )
    if not math.isclose(float(ct.scale), expected_scale, rel_tol=1e-12):
        raise AnalyticsProtocolError(
            f"ciphertext scale is 2**{math.log2(max(float(ct.scale), 1.0)):.1f}, "
            f"expected 2**{round(math.log2(expected_scale))}",
            reason="bad_ciphertext",
        )
    return vec


def decrypt_vector(ctx: ts.Context, data: bytes, *, degree: int = 1) -> FloatArray:
    """Validate and decrypt a serialized result with the private context (hospital only)."""
    if not ctx.is_private():
        raise ValueError("decrypting needs the private context (the hospital's)")
    vec = load_ciphertext(ctx, data, degree=degree)
    return np.asarray(vec.decrypt(), dtype=np.float64)
