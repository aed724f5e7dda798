"""``hwport.quantize`` checked bit for bit against oracles that are not hwport's own code.

Oracles:

* ml_dtypes casts (``x.astype(dt).astype(np.float32)``) and numpy's float16 cast;
* torch's own casts (``.to(torch.float8_e4m3fn)`` and friends);
* numpy's float64 -> float32 / float16 casts for the 64-bit kernel;
* a table oracle: every finite value of the format, decoded in this file from the format's
  definition (sign, exponent field, mantissa field, bias), searched with ``np.searchsorted``;
* ``round_scalar`` (exact rational arithmetic) for float64 inputs, on a few thousand values.

The kernels (C on numpy and CPU torch, the array-namespace kernel on numpy, on torch with
``native=False`` and on jax) must also agree with each other to the bit, NaN payloads
included.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections.abc import Iterator
from functools import cache

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from formats_under_test import CFP8FTZ, FORMATS

import hwport
from hwport import formats as F
from hwport import rounding
from hwport.errors import FormatError, HwportError
from hwport.rounding import (
    Rounding,
    _quantize_torch,
    kernel_params,
    quantize_xp_numpy,
    round_scalar,
)

SEED = 20240531
MODES = ("nearest", "toward_zero", "stochastic")

ML_DTYPES = {
    "bf16": ml_dtypes.bfloat16,
    "fp16": np.float16,
    "e4m3fn": ml_dtypes.float8_e4m3fn,
    "e5m2": ml_dtypes.float8_e5m2,
}
TORCH_DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "e4m3fn": torch.float8_e4m3fn,
    "e5m2": torch.float8_e5m2,
}

# The definition of each format, written out by hand (independent of FloatFormat):
# exponent bits, mantissa bits, bias, special codes, subnormals, what overflow gives.
#   specials: "ieee" (all-ones exponent is inf/NaN), "fn" (only S.1111.111 is NaN),
#             "none" (every code finite)
#   subnormals: "ieee" (2**(1-bias) * M/2**m), "bias" (2**(-bias) * M/2**m), "ftz" (none)
DEFINITIONS: dict[str, tuple[int, int, int, str, str, str]] = {
    "bf16": (8, 7, 127, "ieee", "ieee", "inf"),
    "fp16": (5, 10, 15, "ieee", "ieee", "inf"),
    "e4m3fn": (4, 3, 7, "fn", "ieee", "nan"),
    "e5m2": (5, 2, 15, "ieee", "ieee", "inf"),
    "tf32": (8, 10, 127, "ieee", "ieee", "inf"),
    "cfp8_143_b0": (4, 3, 0, "none", "ieee", "saturate"),
    "cfp8_143_b7": (4, 3, 7, "none", "ieee", "saturate"),
    "cfp8_152_b15": (5, 2, 15, "none", "ieee", "saturate"),
    "cfp8_152_b63": (5, 2, 63, "none", "ieee", "saturate"),
    "cfp16_shp_b15": (5, 10, 15, "none", "ieee", "saturate"),
    "cfp8t": (4, 3, 7, "none", "bias", "saturate"),
    "cfp8ftz": (4, 3, 7, "none", "ftz", "saturate"),
}

# Values around and beyond the largest finite value, per the brief (both signs are added).
BEYOND_MAX: dict[str, list[float]] = {
    "e4m3fn": [448, 449, 463.99, 464, 464.01, 480, 1e4, math.inf],
    "e5m2": [57344, 57345, 61439.99, 61440, 61440.01, 65536, 1e5, math.inf],
    "fp16": [65504, 65505, 65519.99, 65520, 65520.01, 65536, 1e5, math.inf],
    "bf16": [3.3895313892515355e38, 3.3961775292304e38, 3.4028234663852886e38, math.inf],
}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """torch's spinning OpenMP threads and XLA's thread pool fight over a small machine
    (10-50x slowdowns of the torch kernel after a jax call); one torch thread avoids it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def f32(bits: np.ndarray | list[int]) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def hexbits(v: np.floating) -> str:
    arr = np.asarray(v)
    if arr.dtype == np.float64:
        return f"0x{int(arr.view(np.uint64)):016x}"
    return f"0x{int(arr.astype(np.float32).view(np.uint32)):08x}"


def assert_same(got: object, want: np.ndarray, x: np.ndarray, what: str,
                *, nan_bits: bool = False, want_is: str = "expected") -> None:
    """Bits equal where ``want`` is not NaN; NaN where it is (and equal bits if nan_bits).
    ``want_is`` names ``want`` in the message ("C kernel" when backends are compared)."""
    got = np.asarray(got)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, expected {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    utype = np.uint64 if want.dtype == np.float64 else np.uint32
    gb, wb = got.view(utype), want.view(utype)
    wn, gn = np.isnan(want), np.isnan(got)
    bad = gb != wb if nan_bits else (wn != gn) | (~wn & (gb != wb))
    if bad.any():
        lines = [
            f"  x={x.flat[i]!r} ({hexbits(x.flat[i])}): {want_is} {want.flat[i]!r} "
            f"({hexbits(want.flat[i])}), got {got.flat[i]!r} ({hexbits(got.flat[i])})"
            for i in np.flatnonzero(bad.ravel())[:12]
        ]
        pytest.fail(f"{what}: {int(bad.sum())} of {bad.size} differ\n" + "\n".join(lines))


def ml_cast(x: np.ndarray, dt: object) -> np.ndarray:
    """The oracle cast; numpy warns about overflow to inf, which is what it should do."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return x.astype(dt).astype(x.dtype)


def widen(x: np.ndarray) -> np.ndarray:
    """float32 -> float64; signalling NaNs raise FE_INVALID, which numpy reports."""
    with np.errstate(invalid="ignore"):
        return x.astype(np.float64)


def all_codes(dt: object) -> np.ndarray:
    """Every code of an 8- or 16-bit ml_dtypes/numpy dtype, decoded to float32."""
    width = np.dtype(dt).itemsize * 8
    codes = np.arange(1 << width, dtype=np.uint16 if width == 16 else np.uint8)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return codes.view(dt).astype(np.float32)


def np_kernel(x: np.ndarray, fmt: F.FloatFormat, mode: str, seed: int | None = SEED,
              saturate: bool | None = None, rbits: int = 23) -> np.ndarray:
    width = 32 if x.dtype == np.float32 else 64
    p = kernel_params(fmt, width, Rounding(mode), seed, saturate, rbits)
    return quantize_xp_numpy(x, p)


def torch_pure(x: np.ndarray, fmt: F.FloatFormat, mode: str, seed: int | None = SEED,
               saturate: bool | None = None, rbits: int = 23) -> np.ndarray:
    out = _quantize_torch(torch.from_numpy(x), fmt, Rounding(mode), seed, saturate, rbits,
                          native=False)
    return out.numpy()


# ------------------------------------------------------------------------------------------
# independent value tables
# ------------------------------------------------------------------------------------------
@cache
def table(name: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(finite non-negative values ascending, whether each one's mantissa field is even,
    overflow rule), decoded here from DEFINITIONS with float64 arithmetic (exact)."""
    e, m, bias, specials, sub, overflow = DEFINITIONS[name]
    codes = np.arange(1 << (e + m), dtype=np.int64)
    ex, man = codes >> m, codes & ((1 << m) - 1)
    frac = man / float(1 << m)
    normal = np.ldexp(1.0 + frac, (ex - bias).astype(np.int32))
    # flush-to-zero formats round on the IEEE subnormal grid, then flush (table_round)
    esub = {"ieee": 1 - bias, "bias": -bias, "ftz": 1 - bias}[sub]
    subn = np.ldexp(frac, esub)
    vals = np.where(ex == 0, subn, normal)
    keep = np.ones(codes.size, dtype=bool)
    top = (1 << e) - 1
    if specials == "ieee":
        keep &= ex != top
    elif specials == "fn":
        keep &= ~((ex == top) & (man == (1 << m) - 1))
    vals, even = vals[keep], (man[keep] % 2) == 0
    assert np.all(np.diff(vals) > 0), name
    assert np.all(vals.astype(np.float32) == vals), name  # every value fits fp32
    return vals, even, overflow


def table_round(x: np.ndarray, name: str, mode: str, *, saturate: bool = False) -> np.ndarray:
    """``x`` (float32) rounded into format ``name`` by looking it up in :func:`table`.

    nearest: the nearer neighbour, ties to the even mantissa field, with one more grid point
    past the largest value (the unbounded-exponent rule) to decide overflow.
    toward_zero: the largest table value <= |x|.  A rounded magnitude above the largest
    value overflows by the format's rule, except that under toward_zero an inf-overflowing
    format gives the largest value (IEEE 754 roundTowardZero).  inf keeps the format's
    rule (inf -> inf, the largest value, or NaN).  NaN stays NaN.
    """
    vals, even, overflow = table(name)
    if saturate:
        overflow = "saturate"
    mx = vals[-1]
    nxt = 2 * vals[-1] - vals[-2]  # the next grid point past max (same binade)
    ext = np.append(vals, nxt)
    ext_even = np.append(even, not even[-1])
    x64 = widen(x)
    a = np.abs(x64)
    fin = np.isfinite(a)
    af = np.where(fin, a, 0.0)
    i = np.searchsorted(ext, af, side="right") - 1
    j = np.minimum(i + 1, ext.size - 1)
    lo, hi = ext[i], ext[j]
    if mode == "toward_zero":
        v = lo
    else:
        d_lo, d_hi = af - lo, hi - af  # exact: Sterbenz, or lo == 0
        v = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(ext_even[i], lo, hi)))
    ovf = "saturate" if mode == "toward_zero" else overflow
    over_val = {"inf": math.inf, "saturate": mx, "nan": math.nan}
    v = np.where(v > mx, over_val[ovf], v)
    v = np.where(np.isinf(a), over_val[overflow], v)
    v = np.where(np.isnan(a), math.nan, v)
    bias = DEFINITIONS[name][2]
    if DEFINITIONS[name][4] == "ftz":  # subnormal results are flushed to zero
        v = np.where(v < 2.0 ** (1 - bias), 0.0, v)
    return np.copysign(v, x64).astype(np.float32)


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------
@cache
def specials() -> np.ndarray:
    """Zeros, fp32 subnormals, inf, NaNs with payloads, extremes; both signs."""
    pos = [
        0, 1, 2, 3, 0x7F, 0x80, 0x81, 0xFFFF, 0x10000, 0x3FFFFF, 0x400000, 0x400001,
        0x7FFFFE, 0x7FFFFF,  # fp32 subnormals
        0x800000, 0x800001, 0x7F7FFFFF, 0x7F7FFFFE, 0x3F800000,  # normals
        0x7F800000,  # inf
        0x7F800001, 0x7FA00000, 0x7FC00000, 0x7FC00001, 0x7FFFFFFF,  # NaNs
    ]
    return f32(pos + [b | 0x80000000 for b in pos])


@cache
def random_bits(n: int = 1 << 22) -> np.ndarray:
    """Uniformly random fp32 bit patterns: every exponent, subnormals, inf, NaN."""
    rng = np.random.default_rng(12345)
    return rng.integers(0, 1 << 32, size=n, dtype=np.uint32).view(np.float32)


@cache
def bf16_set() -> np.ndarray:
    """Every upper half with lower halves 0x0000, 0x7FFF, 0x8000, 0x8001, 0xFFFF."""
    upper = np.arange(1 << 16, dtype=np.uint32) << 16
    lower = np.array([0x0000, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint32)
    return f32((upper[:, None] | lower[None, :]).ravel())


def with_neighbourhood(values: np.ndarray) -> np.ndarray:
    """Sorted distinct finite values -> the values, every midpoint, midpoints +-1 fp32 ulp."""
    v = np.unique(values[np.isfinite(values)].astype(np.float64))
    mids64 = (v[:-1] + v[1:]) / 2
    flt_max = float(np.finfo(np.float32).max)
    v, mids64 = v[np.abs(v) <= flt_max], mids64[np.abs(mids64) <= flt_max]
    mids = mids64.astype(np.float32)
    assert np.all(mids.astype(np.float64) == mids64), "a midpoint is not exact in fp32"
    up = np.nextafter(mids, np.float32(np.inf))
    down = np.nextafter(mids, np.float32(-np.inf))
    return np.concatenate([v.astype(np.float32), mids, up, down])


@cache
def format_set(name: str) -> np.ndarray:
    """Every value of the format, every midpoint (also past max), midpoints +-1 ulp, values
    beyond max, and the special values; ml_dtypes formats also get every code decoded by
    ml_dtypes (NaN codes included)."""
    vals, _, _ = table(name)
    nxt = 2 * vals[-1] - vals[-2]
    ext = np.concatenate([vals, [nxt]])
    signed = np.concatenate([-ext[::-1], ext])
    parts = [with_neighbourhood(signed)]
    beyond = np.array([*BEYOND_MAX.get(name, []), vals[-1] * (1 + 2**-20), 2 * nxt, 1e30,
                       3.4e38], np.float64)
    with np.errstate(over="ignore"):
        beyond32 = beyond.astype(np.float32)
    parts += [beyond32, -beyond32, specials()]
    if name in ML_DTYPES:
        parts.append(all_codes(ML_DTYPES[name]))
    if name == "bf16":
        parts.append(bf16_set())
    return np.concatenate(parts)


@cache
def tie_grid() -> np.ndarray:
    """For every fp32 sign and exponent field and every bit position t, mantissas whose
    bits below t are a tie (1 << t), a tie +-1, all zeros and all ones."""
    rng = np.random.default_rng(777)
    eb = np.arange(256, dtype=np.uint32)
    t = np.arange(23, dtype=np.uint32)
    sign = np.array([0, 1], dtype=np.uint32)
    S, E, T = (a.ravel() for a in np.meshgrid(sign, eb, t, indexing="ij"))
    out = []
    for low in ("tie", "tie-1", "tie+1", "zero", "ones"):
        above = rng.integers(0, 1 << 23, size=S.size, dtype=np.uint32)
        above &= ~((np.uint32(2) << T) - np.uint32(1))
        lowbits = {
            "tie": np.uint32(1) << T,
            "tie-1": (np.uint32(1) << T) - np.uint32(1),
            "tie+1": (np.uint32(1) << T) + np.uint32(1),
            "zero": np.zeros_like(T),
            "ones": (np.uint32(2) << T) - np.uint32(1),
        }[low]
        out.append((S << np.uint32(31)) | (E << np.uint32(23)) | above | lowbits)
    return f32(np.concatenate(out))


@cache
def cross_set(name: str) -> np.ndarray:
    """Inputs for the backends-agree test: the tie grid (ties at every bit position in
    every fp32 binade), 2**16 random patterns, the specials, and the format's own
    exhaustive set unless it is tf32's (2M values; the tie grid covers its ties)."""
    parts = [tie_grid(), random_bits()[: 1 << 16], specials()]
    own = format_set(name)
    if own.size <= 1 << 20:
        parts.append(own)
    return np.concatenate(parts)


INPUT_SETS = ("exhaustive", "random")


def inputs(name: str, which: str, n_random: int = 1 << 22) -> np.ndarray:
    return format_set(name) if which == "exhaustive" else random_bits()[:n_random]


# ------------------------------------------------------------------------------------------
# the test's own oracles checked against the libraries' decoders
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ML_DTYPES))
def test_table_matches_ml_dtypes_decode(name: str) -> None:
    decoded = widen(all_codes(ML_DTYPES[name]))
    finite = np.unique(np.abs(decoded[np.isfinite(decoded)]))
    vals, _, _ = table(name)
    np.testing.assert_array_equal(vals, finite)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_table_matches_format_fields(name: str) -> None:
    """The hand-written DEFINITIONS describe the same format as hwport's FloatFormat."""
    fmt = FORMATS[name]
    vals, _, overflow = table(name)
    assert (fmt.exponent_bits, fmt.mantissa_bits, fmt.bias) == DEFINITIONS[name][:3]
    assert fmt.overflow == overflow
    assert fmt.max == vals[-1]


# ------------------------------------------------------------------------------------------
# library oracles
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", INPUT_SETS)
@pytest.mark.parametrize("name", sorted(ML_DTYPES))
def test_nearest_matches_ml_dtypes(name: str, which: str) -> None:
    x = inputs(name, which)
    want = ml_cast(x, ML_DTYPES[name])
    assert_same(hwport.quantize(x, name), want, x, f"{name} numpy vs ml_dtypes")


def _torch_saturates_e4m3fn() -> bool:
    """Recent torch casts to float8_e4m3fn saturate (1e4 and inf -> 448; NaN stays NaN)."""
    big = torch.tensor([1e4, math.inf]).to(torch.float8_e4m3fn).float()
    return bool(torch.all(big == 448))


@pytest.mark.parametrize("which", INPUT_SETS)
@pytest.mark.parametrize("name", sorted(TORCH_DTYPES))
def test_nearest_matches_torch_cast(name: str, which: str) -> None:
    x = inputs(name, which)
    t = torch.from_numpy(x)
    want = t.to(TORCH_DTYPES[name]).float().numpy()
    saturate = True if (name == "e4m3fn" and _torch_saturates_e4m3fn()) else None
    got = hwport.quantize(t, name, saturate=saturate)
    assert got.dtype == torch.float32
    assert_same(got.numpy(), want, x, f"{name} torch (saturate={saturate}) vs torch cast")


@pytest.mark.parametrize("which", INPUT_SETS)
@pytest.mark.parametrize("mode", ("nearest", "toward_zero"))
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_matches_value_table(name: str, mode: str, which: str) -> None:
    """Every format against its independently decoded value table."""
    x = inputs(name, which, 1 << 19)
    want = table_round(x, name, mode)
    assert_same(hwport.quantize(x, FORMATS[name], mode), want, x, f"{name} {mode} vs table")


def test_e4m3fn_toward_zero_never_overflows() -> None:
    """Under toward_zero a finite value never overflows (IEEE 754 roundTowardZero), whatever
    the format's overflow rule: e4m3fn truncates |x| >= 448 to 448; inf keeps the format's
    rule (NaN) unless saturating."""
    x = np.array([448, 479.99, 480, 1e4, -480, math.inf], np.float32)
    got = hwport.quantize(x, "e4m3fn", "toward_zero")
    assert list(got[:5]) == [448, 448, 448, 448, -448]
    assert np.isnan(got[5])
    assert list(hwport.quantize(x, "e4m3fn", "toward_zero", saturate=True)) == [
        448, 448, 448, 448, -448, 448]


# ------------------------------------------------------------------------------------------
# every backend gives the same bits
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_backends_agree(name: str, mode: str) -> None:
    fmt = FORMATS[name]
    x = cross_set(name)
    ref = hwport.quantize(x, fmt, mode, seed=SEED)
    assert ref.dtype == np.float32
    got_torch = hwport.quantize(torch.from_numpy(x), fmt, mode, seed=SEED)
    assert_same(got_torch.numpy(), ref, x, f"{name} {mode} torch C", nan_bits=True,
                want_is="C kernel")
    assert_same(torch_pure(x, fmt, mode), ref, x, f"{name} {mode} torch pure", nan_bits=True,
                want_is="C kernel")
    assert_same(np_kernel(x, fmt, mode), ref, x, f"{name} {mode} numpy pure", nan_bits=True,
                want_is="C kernel")
    got_jax = hwport.quantize(jnp.asarray(x), fmt, mode, seed=SEED)
    assert got_jax.dtype == jnp.float32
    assert_same(np.asarray(got_jax), ref, x, f"{name} {mode} jax", nan_bits=True,
                want_is="C kernel")


@pytest.mark.parametrize("name", ["bf16", "fp16", "e5m2", "e4m3fn"])
def test_jax_conversion_path_matches_the_kernel_with_flush_to_zero(name: str) -> None:
    """A flush-to-zero version of a format XLA converts to takes XLA's conversion and then
    flushes (hwport.rounding.round_jax); its bits are the C kernel's."""
    fmt = dataclasses.replace(FORMATS[name], name=f"{name}_ftz", subnormals=False)
    p = rounding.kernel_params(fmt, 32, rounding.Rounding.NEAREST, None, None, 23)
    assert rounding._xla_dtype(p) is not None and rounding._xla_dtype(p)[1]  # the fast path
    x = cross_set(name)
    ref = hwport.quantize(x, fmt)
    assert_same(np.asarray(hwport.quantize(jnp.asarray(x), fmt)), ref, x, f"{name} ftz jax",
                nan_bits=True, want_is="C kernel")


@pytest.mark.parametrize("ftz", (False, True))
@pytest.mark.parametrize("name", ["bf16", "fp16", "e5m2", "e4m3fn"])
def test_jax_program_rounding_matches_the_kernel(name: str, ftz: bool) -> None:
    """XLA's form of the rounding (what programs off CPU round with), jitted inside
    arithmetic that XLA could fold it into: the C kernel's bits for every input but a NaN,
    which stays a NaN."""
    fmt = FORMATS[name]
    if ftz:
        fmt = dataclasses.replace(fmt, name=f"{name}_ftz", subnormals=False)
    p = rounding.kernel_params(fmt, 32, rounding.Rounding.NEAREST, None, None, 23)
    x = cross_set(name)
    ref = hwport.quantize(x, fmt)
    got = jax.jit(lambda v: rounding.round_jax(v, p))(jnp.asarray(x))
    assert_same(np.asarray(got), ref, x, f"{name} program rounding", want_is="C kernel")
    # a rounded sum of rounded values (as an emulated reduction is): XLA rewrites a bare
    # pair of conversions around a reduction into a reduction in the narrow type. These
    # sums are exact in fp32 in any order, so only that rewrite could change them.
    v = np.random.default_rng(0).uniform(1, 2, (256, 64)).astype(np.float32)

    def rounded_sums(v: jax.Array) -> jax.Array:
        return rounding.round_jax(jnp.sum(rounding.round_jax(v * 1.5, p), axis=-1), p)

    exact = hwport.quantize(v * np.float32(1.5), fmt).astype(np.float64).sum(axis=-1)
    want = hwport.quantize(exact.astype(np.float32), fmt)
    assert_same(np.asarray(jax.jit(rounded_sums)(jnp.asarray(v))), want, exact, f"{name} sums",
                want_is="C kernel")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["bf16", "e4m3fn", "cfp8t", "cfp8ftz", "cfp8_152_b63"])
def test_jax_counts_match_the_kernel(name: str, mode: str) -> None:
    """hwport.rounding.round_counted_jax counts what the C kernel counts (overflow,
    underflow, inf/NaN inputs), on inputs with all three (fp32 subnormals included)."""
    x = cross_set(name)
    p = rounding.kernel_params(FORMATS[name], 32, rounding.Rounding(mode),
                               SEED if mode == "stochastic" else None, None, 23)
    out = np.empty_like(x)
    want = rounding.round_into(x, out, p)
    y, counts = jax.jit(lambda v: rounding.round_counted_jax(v, p))(jnp.asarray(x))
    assert_same(np.asarray(y), out, x, f"{name} {mode}", want_is="C kernel")
    got = tuple(int(v) for v in counts)
    assert got == want
    # the inputs exercise each count (truncation cannot overflow bf16's fp32 range)
    assert want[1] > 0 and want[2] > 0 and (want[0] > 0 or (name, mode) == ("bf16", "toward_zero"))


@pytest.mark.parametrize("path", ["ffi", "xla"])
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_jax_program_paths_match_the_kernel(name: str, path: str) -> None:
    """Both ways a jitted program rounds and counts without stochastic bits give the C
    kernel's bits (NaN payloads included) and counts, for float32 and float64, nearest and
    toward zero, saturating or not: the C kernel called by XLA (``ffi``, CPU; it must not
    inherit XLA's flush-to-zero of subnormals) and XLA's own operations (``xla``, other
    platforms)."""
    if path == "ffi" and rounding._ffi_probe() is not None:
        pytest.skip(f"the kernel does not serve jitted programs here: {rounding._ffi_probe()}")
    fn = rounding._round_counted_ffi if path == "ffi" else rounding._round_counted_xla
    x32 = cross_set(name)
    x64 = np.concatenate([widen(x32), np.exp2(np.arange(-1080.0, 1023.5, 0.37))])
    for x in (x32, x64):
        width = 32 if x.dtype == np.float32 else 64
        for mode, saturate in itertools.product((Rounding.NEAREST, Rounding.TOWARD_ZERO),
                                                (None, True, False)):
            try:
                p = rounding.kernel_params(FORMATS[name], width, mode, None, saturate, 23)
            except FormatError:  # a format that can only saturate
                continue
            out = np.empty_like(x)
            want = rounding.round_into(x, out, p)
            with jax.enable_x64(width == 64):
                y, counts = jax.jit(lambda v, p=p: fn(v, p))(jnp.asarray(x))
            what = f"{name} {path} f{width} {mode.value} saturate={saturate}"
            assert_same(np.asarray(y), out, x, what, nan_bits=True, want_is="C kernel")
            assert tuple(int(c) for c in counts) == want, what


def test_jax_programs_round_with_the_kernel_unless_told_not_to(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU a jitted program rounds through the C kernel's FFI handler; the environment
    variable HWPORT_JAX_KERNEL=xla makes it use XLA's operations, and a value it does not
    know is an error naming it."""
    if rounding._ffi_probe() is not None:
        pytest.skip(f"the kernel does not serve jitted programs here: {rounding._ffi_probe()}")
    monkeypatch.delenv("HWPORT_JAX_KERNEL", raising=False)
    p = rounding.kernel_params(FORMATS["bf16"], 32, Rounding.NEAREST, None, None, 23)

    def program() -> str:
        return str(jax.jit(lambda v: rounding.round_counted_jax(v, p)).lower(
            jnp.ones(4, jnp.float32)).as_text())

    assert rounding.ffi_kernel() is None
    assert rounding.FFI_TARGET in program()
    monkeypatch.setenv("HWPORT_JAX_KERNEL", "xla")
    assert rounding.ffi_kernel() == "HWPORT_JAX_KERNEL=xla"
    assert rounding.FFI_TARGET not in program()
    monkeypatch.setenv("HWPORT_JAX_KERNEL", "fast")
    with pytest.raises(HwportError, match="HWPORT_JAX_KERNEL='fast'"):
        program()


@pytest.mark.parametrize("mode", MODES)
def test_backends_agree_float64(mode: str) -> None:
    """The 64-bit kernels (C and the numpy array kernel) agree on random doubles."""
    rng = np.random.default_rng(99)
    x = rng.integers(0, 1 << 64, size=1 << 14, dtype=np.uint64).view(np.float64)
    scale = rng.standard_normal(1 << 14) * np.exp2(rng.integers(-160, 140, 1 << 14))
    x = np.concatenate([x, scale, widen(specials())])
    for name in ("bf16", "e4m3fn", "cfp8t", "cfp8_152_b63", "tf32"):
        fmt = FORMATS[name]
        ref = hwport.quantize(x, fmt, mode, seed=SEED)
        assert ref.dtype == np.float64
        assert_same(np_kernel(x, fmt, mode), ref, x, f"{name} {mode} f64 numpy pure",
                    nan_bits=True, want_is="C kernel")
        got = _quantize_torch(torch.from_numpy(x), fmt, Rounding(mode), SEED, None, 23,
                              native=False)
        assert_same(got.numpy(), ref, x, f"{name} {mode} f64 torch pure", nan_bits=True,
                    want_is="C kernel")


# ------------------------------------------------------------------------------------------
# saturation
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(ML_DTYPES))
def test_saturate_definition(name: str, mode: str) -> None:
    """saturate=True: finite |x| > max -> +-max, +-inf -> +-max, NaN -> NaN, everything
    else as without saturation (same mode, same seed)."""
    fmt = FORMATS[name]
    x = np.concatenate([format_set(name), random_bits()[: 1 << 18]])
    plain = hwport.quantize(x, fmt, mode, seed=SEED)
    sat = hwport.quantize(x, fmt, mode, seed=SEED, saturate=True)
    big = np.isinf(x) | (np.abs(x) > fmt.max)
    want = np.where(big, np.copysign(np.float32(fmt.max), x), plain)
    want = np.where(np.isnan(x), np.float32(np.nan), want).astype(np.float32)
    assert_same(sat, want, x, f"{name} {mode} saturate=True")
    assert_same(np_kernel(x, fmt, mode, saturate=True), sat, x, "pure", nan_bits=True)
    if mode == "nearest":  # and a library oracle: clamp first, then cast
        clamped = np.clip(x, -np.float32(fmt.max), np.float32(fmt.max))
        assert_same(sat, ml_cast(clamped, ML_DTYPES[name]), x, f"{name} clip+ml_dtypes")


def test_saturate_false_rules() -> None:
    """kernel_params: saturate=False turns a saturating format's overflow into inf (if it
    has inf) or NaN (if it has NaN); a format with neither (Dojo CFloat) cannot do it."""
    x = np.array([1.0, 1e6, -1e6, math.inf, -math.inf, math.nan], np.float32)
    for name in ("cfp8_143_b7", "cfp8_152_b15", "cfp16_shp_b15"):
        with pytest.raises(FormatError, match="can only saturate"):
            hwport.quantize(x, name, saturate=False)
        # the default (and saturate=True) clamps
        fmt = F.get(name)
        want = np.array([1, fmt.max, -fmt.max, fmt.max, -fmt.max, math.nan], np.float32)
        assert_same(hwport.quantize(x, name), want, x, f"{name} default")
        assert_same(hwport.quantize(x, name, saturate=True), want, x, f"{name} saturate")
    e5m2s = dataclasses.replace(F.e5m2, name="e5m2s", overflow="saturate")
    assert_same(hwport.quantize(x, e5m2s, saturate=False), hwport.quantize(x, "e5m2"), x,
                "e5m2s saturate=False")
    assert_same(hwport.quantize(x, e5m2s), hwport.quantize(x, "e5m2", saturate=True), x,
                "e5m2s default")
    e4m3s = dataclasses.replace(F.e4m3fn, name="e4m3s", overflow="saturate")
    assert_same(hwport.quantize(x, e4m3s, saturate=False), hwport.quantize(x, "e4m3fn"), x,
                "e4m3s saturate=False")
    # saturate=False on a non-saturating format changes nothing
    for name in ("bf16", "fp16", "e4m3fn", "e5m2"):
        assert_same(hwport.quantize(x, name, saturate=False), hwport.quantize(x, name), x,
                    name)


def test_round_scalar_saturate_false_on_cfloat_agrees_with_quantize() -> None:
    """round_scalar is documented as the definition of quantize, so it should refuse
    saturate=False on a format that has neither inf nor NaN, as quantize does."""
    with pytest.raises(FormatError):
        hwport.quantize(np.array([1e6], np.float32), "cfp8_143_b7", saturate=False)
    with pytest.raises(FormatError):
        round_scalar(1e6, "cfp8_143_b7", saturate=False)


# ------------------------------------------------------------------------------------------
# float64 inputs: the 64-bit kernel
# ------------------------------------------------------------------------------------------
@cache
def random_doubles() -> np.ndarray:
    """Random float64 values across each format's range, float64-only ties, and specials."""
    rng = np.random.default_rng(4242)
    n = 600
    mant = 1 + rng.random(n)
    exps = rng.integers(-140, 20, n)
    sign = rng.choice([-1.0, 1.0], n)
    parts = [sign * np.ldexp(mant, exps)]
    # values on and just off the ties of bf16/fp16/e4m3fn: midpoint * (1 +- 2**-40)
    for name in ("bf16", "fp16", "e4m3fn", "cfp8t"):
        vals, _, _ = table(name)
        pick = np.sort(rng.choice(vals.size - 1, 100, replace=False))
        mids = (vals[pick] + vals[pick + 1]) / 2
        parts += [mids, mids * (1 + 2**-40), mids * (1 - 2**-40), -mids * (1 + 2**-45)]
    parts.append(rng.integers(0, 1 << 64, 200, dtype=np.uint64).view(np.float64))
    parts.append(np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 5e-324, -5e-324, 1e308,
                           2.0**-149, 2.0**-150, 2.0**-150 * (1 + 2**-40)]))
    return np.concatenate(parts)


@pytest.mark.parametrize("name", ("bf16", "fp16", "e4m3fn", "e5m2", "cfp8t", "cfp8_143_b0"))
def test_float64_matches_round_scalar(name: str) -> None:
    fmt = FORMATS[name]
    x = random_doubles()
    for mode in ("nearest", "toward_zero"):
        want = np.array([round_scalar(float(v), fmt, mode) for v in x], np.float64)
        got = hwport.quantize(x, fmt, mode)
        assert_same(got, want, x, f"{name} {mode} float64 C vs round_scalar")
        assert_same(np_kernel(x, fmt, mode), want, x, f"{name} {mode} float64 pure")


@pytest.mark.parametrize("name,dt", [("fp32", np.float32), ("fp16", np.float16)])
def test_float64_matches_numpy_casts(name: str, dt: type) -> None:
    """numpy's float64 -> float32 / float16 casts round directly (one rounding): an oracle
    for the 64-bit kernel over millions of random doubles (bit patterns and in-range)."""
    rng = np.random.default_rng(5)
    n = 1 << 20
    x = np.concatenate([
        rng.integers(0, 1 << 64, n, dtype=np.uint64).view(np.float64),
        rng.standard_normal(n) * np.exp2(rng.integers(-160, 140, n)),
        rng.standard_normal(n) * np.exp2(rng.integers(-28, 18, n)),
        random_doubles(),
    ])
    want = ml_cast(x, dt)
    assert_same(hwport.quantize(x, name), want, x, f"float64 -> {name} vs numpy cast")


def test_float64_avoids_double_rounding() -> None:
    """1 + 2**-8 + 2**-40 is just above a bf16 tie: rounding the double gives 1 + 2**-7;
    casting to float32 first lands exactly on the tie, which then goes to even (1.0)."""
    x = np.array([1 + 2**-8 + 2**-40, -(1 + 2**-8 + 2**-40)])
    exact = [round_scalar(float(v), "bf16") for v in x]
    assert exact == [1 + 2**-7, -(1 + 2**-7)]
    direct = hwport.quantize(x, "bf16")
    via_f32 = hwport.quantize(x.astype(np.float32), "bf16")
    assert list(direct) == exact
    assert list(via_f32) == [1.0, -1.0]
    # older ml_dtypes double-round this case (through float32); 0.7 rounds the double
    # directly, as hwport does: either way it is one of the two answers, never a third
    assert list(ml_cast(x, ml_dtypes.bfloat16)) in ([1.0, -1.0], exact)
    assert list(ml_cast(x.astype(np.float32), ml_dtypes.bfloat16)) == [1.0, -1.0]
    # in e4m3fn: 1 + 2**-4 + 2**-40 -> 1.125 directly, 1.0 via float32
    y = np.array([1 + 2**-4 + 2**-40])
    assert hwport.quantize(y, "e4m3fn")[0] == 1.125 == round_scalar(float(y[0]), "e4m3fn")
    assert hwport.quantize(y.astype(np.float32), "e4m3fn")[0] == 1.0


# ------------------------------------------------------------------------------------------
# types, dtypes, errors
# ------------------------------------------------------------------------------------------
VALUES = np.array([0.1, -2.7, 300.0, 1e-3, 0.0, -0.0, 1e5, 3.0e-6], np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, ml_dtypes.bfloat16])
def test_numpy_dtype_preserved(dtype: type) -> None:
    with np.errstate(over="ignore"):
        x = VALUES.astype(dtype).reshape(2, 4)
    for name in ("e4m3fn", "e5m2"):  # both fit every container
        got = hwport.quantize(x, name)
        assert isinstance(got, np.ndarray) and got.dtype == x.dtype and got.shape == x.shape
        want = hwport.quantize(x.astype(np.float32), name).astype(dtype)
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def test_numpy_non_contiguous() -> None:
    x = random_bits()[:4000].reshape(40, 100)[::3, ::7]
    got = hwport.quantize(x, "bf16")
    assert got.shape == x.shape
    assert_same(got, ml_cast(np.ascontiguousarray(x), ml_dtypes.bfloat16), x, "strided")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_torch_dtype_preserved(dtype: torch.dtype) -> None:
    x = torch.from_numpy(VALUES).to(dtype).reshape(4, 2)
    got = hwport.quantize(x, "e4m3fn")
    assert isinstance(got, torch.Tensor) and got.dtype == dtype and got.shape == x.shape
    want = hwport.quantize(x.float(), "e4m3fn").to(dtype)
    itype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[want.element_size()]
    assert torch.equal(got.view(itype), want.view(itype))
    pure = _quantize_torch(x, F.e4m3fn, Rounding.NEAREST, None, None, 23, native=False)
    assert pure.dtype == dtype and torch.equal(pure.view(itype), want.view(itype))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_jax_dtype_preserved(dtype: object) -> None:
    x = jnp.asarray(VALUES).astype(dtype)
    got = hwport.quantize(x, "e4m3fn")
    assert got.dtype == dtype and got.shape == x.shape
    want = hwport.quantize(VALUES, "e4m3fn")
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), want)


def test_python_float() -> None:
    got = hwport.quantize(0.3, "bf16")
    assert type(got) is float and got == 0.30078125
    assert hwport.quantize(3, "e4m3fn") == 3.0
    assert hwport.quantize(1 + 2**-8 + 2**-40, "bf16") == 1 + 2**-7  # float64, no f32 step


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_zero_dim_keeps_shape(dtype: type) -> None:
    """A 0-d array gives a 0-d array and a numpy scalar gives a scalar of its dtype."""
    arr = np.array(0.3, dtype)
    got = hwport.quantize(arr, "bf16")
    assert np.shape(got) == ()
    assert float(got) == 0.30078125
    scalar = dtype(0.3)
    got = hwport.quantize(scalar, "bf16")
    assert np.shape(got) == () and got.dtype == np.dtype(dtype)


def test_narrow_container_format_errors() -> None:
    with pytest.raises(FormatError):
        hwport.quantize(torch.ones(3, dtype=torch.bfloat16), "fp16")
    with pytest.raises(FormatError):
        hwport.quantize(torch.ones(3, dtype=torch.float16), "bf16")
    with pytest.raises(FormatError):
        hwport.quantize(np.ones(3, np.float16), "bf16")
    with pytest.raises(FormatError):
        hwport.quantize(np.ones(3, ml_dtypes.bfloat16), "tf32")
    with pytest.raises(FormatError):
        hwport.quantize(jnp.ones(3, jnp.bfloat16), "fp16")
    with pytest.raises(FormatError):  # cfp16 holds values past fp16's max
        hwport.quantize(np.ones(3, np.float16), "cfp16_shp_b15")


def test_argument_errors() -> None:
    x = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="seed"):
        hwport.quantize(x, "bf16", "stochastic")
    for rbits in (0, 25, -1):
        with pytest.raises(ValueError, match="rbits"):
            hwport.quantize(x, "bf16", "stochastic", seed=1, rbits=rbits)
    for rbits in (1, 24):
        hwport.quantize(x, "bf16", "stochastic", seed=1, rbits=rbits)
    with pytest.raises(ValueError):
        hwport.quantize(x, "bf16", "upward")
    with pytest.raises(TypeError):
        hwport.quantize(np.arange(4), "bf16")
    with pytest.raises(TypeError):
        hwport.quantize([1.0, 2.0], "bf16")


# ------------------------------------------------------------------------------------------
# definitions that disagree with each other
# ------------------------------------------------------------------------------------------
def test_flush_to_zero_nearest_matches_round_scalar() -> None:
    """Flush-to-zero hardware rounds on the subnormal grid and then flushes a subnormal
    result: 0.9 * min_normal rounds to 0.875 * min_normal and becomes 0, while 0.97 *
    min_normal rounds up to min_normal and stays."""
    mn = CFP8FTZ.min_normal
    x = np.array([0.6 * mn, 0.75 * mn, 0.9 * mn, 0.97 * mn, -0.75 * mn], np.float32)
    want = np.array([round_scalar(float(v), CFP8FTZ) for v in x], np.float32)
    np.testing.assert_array_equal(want, [0, 0, 0, mn, -0.0])
    assert_same(hwport.quantize(x, CFP8FTZ), want, x, "ftz nearest C vs round_scalar")


def test_bias_subnormals_at_fp32_floor() -> None:
    """A legal format whose "bias" subnormal band (max_subnormal, min_normal) lies in fp32's
    subnormal range: the C kernel agrees with round_scalar; the array kernels must too."""
    fmt = hwport.FloatFormat("sub127", 8, 3, 127, subnormal_exponent="bias")
    lo, hi = fmt.max_subnormal, fmt.min_normal
    x = np.array([lo * 1.01, lo * 1.05, (lo + hi) / 2, hi * 0.95, hi * 0.99], np.float32)
    want = np.array([round_scalar(float(v), fmt) for v in x], np.float32)
    assert_same(hwport.quantize(x, fmt), want, x, "C")
    assert_same(np_kernel(x, fmt, "nearest"), want, x, "numpy pure")
    assert_same(torch_pure(x, fmt, "nearest"), want, x, "torch pure")
    assert_same(np.asarray(hwport.quantize(jnp.asarray(x), fmt)), want, x, "jax")


@pytest.mark.parametrize("name,x,mx", [
    ("fp16", 131072.0, 65504.0),  # 2**17: on fp16's grid extended past max
    ("fp16", 2.0**200, 65504.0),
    ("e5m2", 65536.0, 57344.0),
    ("bf16", 2.0**128, 3.3895313892515355e38),
], ids=["fp16-2^17", "fp16-2^200", "e5m2-2^16", "bf16-2^128"])
def test_round_scalar_toward_zero_never_overflows_to_inf(name: str, x: float, mx: float) -> None:
    """IEEE roundTowardZero (and the module docstring): a finite value never becomes inf.
    The kernels give max; round_scalar must too, also when |x| lies exactly on the grid
    extended past max (there neighbours() returns lo == hi)."""
    assert hwport.quantize(np.array([x, -x]), name, "toward_zero").tolist() == [mx, -mx]
    assert round_scalar(x * (1 + 2**-30), name, "toward_zero") == mx  # off the grid: fine
    assert round_scalar(x, name, "toward_zero") == mx
    assert round_scalar(-x, name, "toward_zero") == -mx


@pytest.mark.parametrize("width", [32, 64])
@pytest.mark.parametrize("mode", MODES)
def test_threads_do_not_change_a_bit(width: int, mode: str) -> None:
    """The C kernel splits large buffers across threads: results and counts are those of
    one thread, whatever the split (an odd length, so the last range is partial)."""
    from hwport import rounding

    if rounding._kernels is None:
        pytest.skip("built without the C kernel")
    dtype = np.float32 if width == 32 else np.float64
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(300_001) * 2.0 ** rng.integers(-150, 20, 300_001)).astype(dtype)
    x[::997] = np.inf
    x[::1009] = np.nan
    p = kernel_params(F.get("e4m3fn"), width, Rounding(mode), SEED, None, 23)
    args = (p.width, p.m, p.emin, p.esub, p.ftz, p.gap, p.overflow, p.mode, p.rbits,
            p.max_bits, p.inf_bits, p.maxsub_bits, p.minnorm_bits, p.nan_bits, p.key0, p.key1)
    outs, counts = [], []
    for threads in (1, 2, 3, 8):
        out = np.empty_like(x)
        counts.append(rounding._kernels.quantize(x, out, *args, threads))
        outs.append(out.view(np.uint32 if width == 32 else np.uint64))
    assert all(np.array_equal(outs[0], o) for o in outs[1:])
    assert len(set(counts)) == 1 and counts[0][0] > 0 and counts[0][2] > 0
    want = quantize_xp_numpy(x, p).view(outs[0].dtype)
    assert np.array_equal(outs[0], want)
