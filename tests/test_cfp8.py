"""Tesla Dojo CFloat8 (1-4-3 and 1-5-2, configurable bias) against tables built here.

The expected value of each of the 256 codes is computed in this file, in exact rational
arithmetic, from Tesla's definition (sign s, exponent field E, mantissa field M, m mantissa
bits):

    E > 0:  (-1)**s * 2**(E - bias) * (1 + M / 2**m)
    E = 0:  (-1)**s * 2**(1 - bias) * (M / 2**m)

No code is inf or NaN; every code is finite; values past the largest clamp to it.
FloatFormat.decode is checked against this table, never used to build it.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import cache

import ml_dtypes
import numpy as np
import pytest
import torch

import hwport
from hwport import formats as F
from hwport.errors import FormatError
from hwport.rounding import round_scalar

LAYOUTS = {"143": (4, 3), "152": (5, 2)}
BIASES = (0, 7, 15, 63)
CASES = [(layout, bias) for layout in LAYOUTS for bias in BIASES]
IDS = [f"cfp8_{layout}_b{bias}" for layout, bias in CASES]
SEED = 7


def tesla_value(code: int, e: int, m: int, bias: int) -> Fraction:
    """The exact value of an 8-bit CFloat code (the sign of zero is not represented)."""
    s = code >> (e + m)
    ef = (code >> m) & ((1 << e) - 1)
    mf = code & ((1 << m) - 1)
    if ef > 0:
        mag = Fraction(2) ** (ef - bias) * (1 + Fraction(mf, 1 << m))
    else:
        mag = Fraction(2) ** (1 - bias) * Fraction(mf, 1 << m)
    return -mag if s else mag


@cache
def tesla_table(layout: str, bias: int) -> tuple[Fraction, ...]:
    e, m = LAYOUTS[layout]
    return tuple(tesla_value(c, e, m, bias) for c in range(256))


def fmt_of(layout: str, bias: int) -> F.FloatFormat:
    return F.get(f"cfp8_{layout}_b{bias}")


def to_f32(values: list[Fraction] | list[float]) -> np.ndarray:
    """Fractions -> float32, asserting that each is exact."""
    out = np.array([float(v) for v in values], np.float32)
    for v, o in zip(values, out, strict=True):
        assert Fraction(float(o)) == Fraction(v), f"{v} is not exact in float32"
    return out


def assert_bits(got: np.ndarray, want: np.ndarray, x: np.ndarray, what: str) -> None:
    got = np.asarray(got, np.float32)
    bad = got.view(np.uint32) != want.view(np.uint32)
    if bad.any():
        rows = [f"  x={x[i]!r}: expected {want[i]!r}, got {got[i]!r}"
                for i in np.flatnonzero(bad)[:10]]
        pytest.fail(f"{what}: {int(bad.sum())} differ\n" + "\n".join(rows))


@cache
def pairs(layout: str, bias: int) -> tuple[np.ndarray, ...]:
    """Midpoint cases for adjacent positive values (codes c, c + 1, 0 <= c < 127) and the
    same mirrored to negative: (lo, hi, mid, expected_mid) as float32 arrays, where the
    expected midpoint result is the neighbour whose mantissa field is even."""
    m = LAYOUTS[layout][1]
    tab = tesla_table(layout, bias)
    lo, hi, mid, even = [], [], [], []
    for c in range(127):
        a, b = tab[c], tab[c + 1]
        assert a < b
        lo.append(a)
        hi.append(b)
        mid.append((a + b) / 2)
        # codes c and c + 1 differ in parity; the even mantissa field wins the tie
        even.append(a if (c & ((1 << m) - 1)) % 2 == 0 else b)
    lo32, hi32, mid32, even32 = (to_f32(v) for v in (lo, hi, mid, even))
    neg = [np.negative(v) for v in (lo32, hi32, mid32, even32)]  # -0.0 for zero: sign kept
    return tuple(np.concatenate([p, n]) for p, n in zip((lo32, hi32, mid32, even32), neg,
                                                        strict=True))


# ------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,bias", CASES, ids=IDS)
def test_decode_matches_tesla_definition(layout: str, bias: int) -> None:
    fmt = fmt_of(layout, bias)
    assert fmt.bits == 8 and not fmt.inf and not fmt.has_nan
    for code, want in enumerate(tesla_table(layout, bias)):
        got = fmt.decode(code)
        assert math.isfinite(got), f"code {code:#04x} decodes to {got}"
        assert Fraction(got) == want, f"code {code:#04x}: {got} != {want}"
        assert math.copysign(1.0, got) == (-1.0 if code & 0x80 else 1.0)


@pytest.mark.parametrize("layout,bias", CASES, ids=IDS)
def test_table_shape(layout: str, bias: int) -> None:
    """Positive codes increase strictly; 255 distinct values (only zero has two codes)."""
    tab = tesla_table(layout, bias)
    assert all(tab[c] < tab[c + 1] for c in range(127))
    assert len(set(tab)) == 255
    fmt = fmt_of(layout, bias)
    assert [Fraction(v) for v in fmt.finite_values()] == list(tab[:128])
    assert Fraction(fmt.max) == tab[127]
    assert Fraction(fmt.min_subnormal) == tab[1]
    m = LAYOUTS[layout][1]
    assert Fraction(fmt.min_normal) == tab[1 << m]
    assert Fraction(fmt.max_subnormal) == tab[(1 << m) - 1]


# ------------------------------------------------------------------------------------------
# quantize on the table
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ("nearest", "toward_zero", "stochastic"))
@pytest.mark.parametrize("layout,bias", CASES, ids=IDS)
def test_table_values_are_fixed_points(layout: str, bias: int, mode: str) -> None:
    x = to_f32(list(tesla_table(layout, bias)))
    x[0x80] = -0.0
    fmt = fmt_of(layout, bias)
    assert_bits(hwport.quantize(x, fmt, mode, seed=SEED), x, x, f"{fmt} {mode} numpy")
    got_t = hwport.quantize(torch.from_numpy(x), fmt, mode, seed=SEED).numpy()
    assert_bits(got_t, x, x, f"{fmt} {mode} torch")
    assert_bits(hwport.quantize(x.astype(np.float64), fmt, mode, seed=SEED).astype(np.float32),
                x, x, f"{fmt} {mode} float64")


@pytest.mark.parametrize("layout,bias", CASES, ids=IDS)
def test_midpoints_go_to_even(layout: str, bias: int) -> None:
    mid, even = pairs(layout, bias)[2:]
    fmt = fmt_of(layout, bias)
    assert_bits(hwport.quantize(mid, fmt), even, mid, f"{fmt} midpoints")
    assert_bits(hwport.quantize(mid.astype(np.float64), fmt).astype(np.float32), even, mid,
                f"{fmt} midpoints float64")


@pytest.mark.parametrize("layout,bias", CASES, ids=IDS)
def test_nudged_midpoints_go_to_nearer(layout: str, bias: int) -> None:
    lo, hi, mid, _ = pairs(layout, bias)
    fmt = fmt_of(layout, bias)
    inward = np.nextafter(mid, np.float32(0))  # 1 fp32 ulp toward zero: nearer to lo
    outward = np.nextafter(mid, np.copysign(np.float32(np.inf), mid))
    assert_bits(hwport.quantize(inward, fmt), lo, inward, f"{fmt} mid - ulp")
    assert_bits(hwport.quantize(outward, fmt), hi, outward, f"{fmt} mid + ulp")
    # toward zero: everything strictly between lo and hi goes to lo
    for x in (inward, mid, outward):
        assert_bits(hwport.quantize(x, fmt, "toward_zero"), lo, x, f"{fmt} toward_zero")


def beyond_max(layout: str, bias: int) -> tuple[np.ndarray, np.ndarray]:
    tab = tesla_table(layout, bias)
    mx = tab[127]
    step = tab[127] - tab[126]  # spacing in the top binade
    nxt = mx + step
    vals = [mx * (1 + Fraction(1, 2**20)), mx + step / 2, nxt, 2 * mx, Fraction(2) ** 100]
    pos = to_f32(vals)
    pos = np.concatenate([pos, np.nextafter(pos[1:2], np.float32(np.inf)),
                          np.array([np.finfo(np.float32).max, np.inf], np.float32)])
    x = np.concatenate([pos, -pos])
    want = np.concatenate([np.full(pos.size, float(mx), np.float32),
                           np.full(pos.size, -float(mx), np.float32)])
    return x, want


@pytest.mark.parametrize("mode", ("nearest", "toward_zero", "stochastic"))
@pytest.mark.parametrize("layout,bias", CASES, ids=IDS)
def test_above_max_clamps(layout: str, bias: int, mode: str) -> None:
    x, want = beyond_max(layout, bias)
    fmt = fmt_of(layout, bias)
    assert_bits(hwport.quantize(x, fmt, mode, seed=SEED), want, x, f"{fmt} {mode} > max")
    assert_bits(hwport.quantize(x, fmt, mode, seed=SEED, saturate=True), want, x, "sat")
    nan = hwport.quantize(np.array([np.nan, -np.nan], np.float32), fmt, mode, seed=SEED)
    assert np.all(np.isnan(nan))  # NaN stays NaN (the hardware's invalid exception)


@pytest.mark.parametrize("layout,bias", CASES, ids=IDS)
def test_round_scalar_agrees(layout: str, bias: int) -> None:
    fmt = fmt_of(layout, bias)
    lo, hi, mid, even = pairs(layout, bias)
    inward = np.nextafter(mid, np.float32(0))
    outward = np.nextafter(mid, np.copysign(np.float32(np.inf), mid))
    above, above_want = beyond_max(layout, bias)
    table32 = to_f32(list(tesla_table(layout, bias)))
    cases = [(table32, table32), (mid, even), (inward, lo), (outward, hi), (above, above_want)]
    for x, want in cases:
        got = np.array([round_scalar(float(v), fmt) for v in x], np.float32)
        assert_bits(got, want, x, f"{fmt} round_scalar")
    for x, want in [(mid, lo), (inward, lo), (outward, lo)]:
        got = np.array([round_scalar(float(v), fmt, "toward_zero") for v in x], np.float32)
        assert_bits(got, want, x, f"{fmt} round_scalar toward_zero")


# ------------------------------------------------------------------------------------------
# derived properties
# ------------------------------------------------------------------------------------------
DERIVED = {
    # name: (max, min_normal, min_subnormal, epsilon), by hand
    "e4m3fn": (448.0, 2.0**-6, 2.0**-9, 2.0**-3),
    "e5m2": (57344.0, 2.0**-14, 2.0**-16, 2.0**-2),
    "fp16": (65504.0, 2.0**-14, 2.0**-24, 2.0**-10),
    "bf16": ((2 - 2.0**-7) * 2.0**127, 2.0**-126, 2.0**-133, 2.0**-7),
    "tf32": ((2 - 2.0**-10) * 2.0**127, 2.0**-126, 2.0**-136, 2.0**-10),
    "cfp8_143_b7": (480.0, 2.0**-6, 2.0**-9, 2.0**-3),  # E=15, M=7: 2**8 * 1.875
    "cfp8_143_b0": (61440.0, 2.0, 0.25, 2.0**-3),  # 2**15 * 1.875
    "cfp8_152_b15": (114688.0, 2.0**-14, 2.0**-16, 2.0**-2),  # 2**16 * 1.75
    "cfp8_152_b63": (1.75 * 2.0**-32, 2.0**-62, 2.0**-64, 2.0**-2),
}


@pytest.mark.parametrize("name", sorted(DERIVED))
def test_derived_properties(name: str) -> None:
    fmt = F.get(name)
    assert (fmt.max, fmt.min_normal, fmt.min_subnormal, fmt.epsilon) == DERIVED[name]


@pytest.mark.parametrize("name,dt", [
    ("e4m3fn", ml_dtypes.float8_e4m3fn), ("e5m2", ml_dtypes.float8_e5m2),
    ("fp16", np.float16), ("bf16", ml_dtypes.bfloat16),
])
def test_derived_properties_match_ml_dtypes_finfo(name: str, dt: type) -> None:
    fmt, fi = F.get(name), ml_dtypes.finfo(dt)
    assert fmt.max == float(fi.max)
    assert fmt.min_normal == float(fi.smallest_normal)
    assert fmt.min_subnormal == float(fi.smallest_subnormal)
    assert fmt.epsilon == float(fi.eps)
    assert fmt.bits == fi.bits


def test_cfp8_parameter_errors() -> None:
    with pytest.raises(FormatError):
        F.cfp8("143", 64)
    with pytest.raises(FormatError):
        F.cfp8("143", -1)
    with pytest.raises(FormatError):
        F.cfp8("134", 7)  # type: ignore[arg-type]
    with pytest.raises(FormatError):
        F.get("cfp8_152_b64")
    assert F.get("cfp8_152_b63") == F.cfp8("152", 63)
