"""Stochastic rounding: only the two neighbours, unbiased, seeded, the same on every backend.

Neighbours come from ``FloatFormat.neighbours`` (exact rational arithmetic) and the
probabilities from exact fractions; the statistical bounds are 5 sigma of the Bernoulli
count plus the documented resolution bias: with ``rbits`` = R random bits the kernel
rounds up with probability floor(frac * 2**R) / 2**R, which is below frac by less than
2**-R.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from fractions import Fraction

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from formats_under_test import FORMATS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hwport
from hwport import formats as F
from hwport.rounding import (
    Rounding,
    _quantize_torch,
    kernel_params,
    quantize_xp_numpy,
    round_scalar,
)

N = 200_000
SIGMAS = 5.0


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """Avoid torch OpenMP / XLA thread-pool contention on small machines."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def stochastic(x: np.ndarray, fmt: F.FloatFormat, seed: int, rbits: int = 23) -> np.ndarray:
    return hwport.quantize(x, fmt, "stochastic", seed=seed, rbits=rbits)


def pure_numpy(x: np.ndarray, fmt: F.FloatFormat, seed: int, rbits: int = 23) -> np.ndarray:
    width = 32 if x.dtype == np.float32 else 64
    return quantize_xp_numpy(x, kernel_params(fmt, width, Rounding.STOCHASTIC, seed, None,
                                              rbits))


def in_range_values(fmt: F.FloatFormat, n: int, seed: int) -> np.ndarray:
    """float32 values spread over every binade of the format (subnormals included), with
    |x| <= max, both signs."""
    rng = np.random.default_rng(seed)
    lo_e = fmt.subnormal_base_exponent - fmt.mantissa_bits - 2
    e = rng.integers(max(lo_e, -149), fmt.max_exponent + 1, n)
    x = rng.choice([-1.0, 1.0], n) * np.ldexp(1 + rng.random(n), e)
    x = x.astype(np.float32)
    return x[np.abs(x) <= fmt.max]


# ------------------------------------------------------------------------------------------
# (a) only the two neighbours
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_rounds_to_a_neighbour(name: str) -> None:
    fmt = FORMATS[name]
    x = in_range_values(fmt, 1500, seed=1)
    ups = 0
    for seed in (1, 2):
        got = stochastic(x, fmt, seed)
        for v, r in zip(x.tolist(), got.tolist(), strict=True):
            lo, hi = fmt.neighbours(v)
            if not fmt.subnormals:  # subnormal results are flushed to zero
                lo = 0.0 if lo < fmt.min_normal else lo
                hi = 0.0 if hi < fmt.min_normal else hi
            s = math.copysign(1.0, v)
            assert r in (s * lo, s * hi), f"{name}: {v!r} -> {r!r}, neighbours {lo!r}, {hi!r}"
            assert math.copysign(1.0, r) == s
            ups += r != s * lo
    assert ups > 0  # both neighbours do occur


# ------------------------------------------------------------------------------------------
# (b), (c) unbiased: mean and fraction rounded up
# ------------------------------------------------------------------------------------------
BIAS_CASES = [
    # (format, x, container): lo and hi are computed from FloatFormat.neighbours
    ("bf16", 1 + 0.3 * 2**-7, np.float32),  # p = 0.3 in [1, 1 + eps]
    ("bf16", 5.62 * 2**-133, np.float32),  # bf16 subnormal range (fp32 subnormal input)
    ("e4m3fn", 3.7 * 2**-9, np.float32),  # e4m3fn subnormal range
    ("e5m2", 1.7, np.float32),  # p = 0.8
    ("fp16", -1000.37, np.float32),
    ("cfp8t", (7 / 8 * 2**-7) * 0.6 + 2**-6 * 0.4, np.float32),  # "bias" band max_sub..min_n
    ("cfp8_152_b63", 1.3 * 2**-40, np.float32),
    ("cfp8ftz", 1.2 * 2**-6, np.float32),  # flush-to-zero format, normal range
    ("bf16", 1 + 0.3 * 2**-7, np.float64),
    ("e4m3fn", 3.7 * 2**-9, np.float64),
    ("bf16", 1.5 * 2**-150, np.float64),  # 2**-17 of bf16's smallest subnormal: p ~ 1e-5
    ("bf16", 1e-300, np.float64),  # p ~ 1e-260: never rounds up
]
BIAS_IDS = [f"{n}-{x:.4g}-{np.dtype(t).name}" for n, x, t in BIAS_CASES]


def check_unbiased(got: np.ndarray, x: float, lo: float, hi: float, rbits: int,
                   what: str) -> None:
    a = abs(x)
    s = math.copysign(1.0, x)
    n = got.size
    assert np.all((got == s * lo) | (got == s * hi)), f"{what}: not a neighbour"
    p = float((Fraction(a) - Fraction(lo)) / (Fraction(hi) - Fraction(lo)))
    k = int(np.count_nonzero(got == s * hi))
    sigma = math.sqrt(p * (1 - p) / n)
    bound = SIGMAS * sigma + 2.0**-rbits
    assert abs(k / n - p) <= bound, (
        f"{what}: rounded up {k}/{n} = {k / n:.6g}, expected p = {p:.6g} +- {bound:.3g}")
    mean = float(np.mean(got, dtype=np.float64))
    mean_bound = (hi - lo) * bound
    assert abs(mean - x) <= mean_bound, (
        f"{what}: mean {mean!r} vs x = {x!r}: off by {abs(mean - x):.3g} > {mean_bound:.3g}")


@pytest.mark.parametrize("name,x,dtype", BIAS_CASES, ids=BIAS_IDS)
def test_unbiased(name: str, x: float, dtype: type) -> None:
    fmt = FORMATS[name]
    x = float(dtype(x))  # the value actually rounded
    lo, hi = fmt.neighbours(x)
    assert lo < abs(x) < hi and hi <= fmt.max
    arr = np.full(N, x, dtype)
    check_unbiased(stochastic(arr, fmt, seed=11).astype(np.float64), x, lo, hi, 23,
                   f"{name} C")
    check_unbiased(pure_numpy(arr, fmt, seed=11).astype(np.float64), x, lo, hi, 23,
                   f"{name} numpy pure")


@pytest.mark.parametrize("rbits", (1, 2, 4, 8))
def test_rbits_resolution(rbits: int) -> None:
    """With R random bits the probability of rounding up is floor(frac * 2**R) / 2**R:
    frac = 0.3 gives 0 (R=1), 0.25 (R=2, 4), 0.296875 (R=8)."""
    x = np.float32(1 + 0.3 * 2**-7)
    lo, hi = F.bf16.neighbours(float(x))
    frac = (Fraction(float(x)) - Fraction(lo)) / (Fraction(hi) - Fraction(lo))
    p = math.floor(frac * 2**rbits) / 2**rbits
    got = stochastic(np.full(N, x), F.bf16, seed=3, rbits=rbits)
    k = np.count_nonzero(got == hi) / N
    assert abs(k - p) <= SIGMAS * math.sqrt(max(p * (1 - p), 1e-12) / N), (rbits, k, p)
    if rbits <= 4:
        assert abs(k - float(frac)) > 0.04  # the bias is really there at low resolution


# ------------------------------------------------------------------------------------------
# (d) reproducible by seed, counter-based by element index
# ------------------------------------------------------------------------------------------
def test_same_seed_same_bits_other_seed_other_bits() -> None:
    x = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
    for name in ("bf16", "e4m3fn", "cfp8t"):
        fmt = FORMATS[name]
        a, b = stochastic(x, fmt, 5), stochastic(x, fmt, 5)
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))
        c = stochastic(x, fmt, 6)
        assert np.mean(a != c) > 0.15, name  # each inexact value flips with prob 2p(1-p)
    # results depend on (seed, flat index) only: a prefix or a reshape changes nothing
    full = stochastic(x, F.bf16, 9)
    np.testing.assert_array_equal(stochastic(x[:1000], F.bf16, 9), full[:1000])
    np.testing.assert_array_equal(stochastic(x.reshape(100, 1000), F.bf16, 9).ravel(), full)
    # large seeds are fine
    stochastic(x[:10], F.bf16, 2**64 - 1)


# ------------------------------------------------------------------------------------------
# (e) the same bits on every backend
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rbits", (1, 24))
@pytest.mark.parametrize("name", ("bf16", "fp16", "e4m3fn", "cfp8t", "cfp8_152_b63", "cfp8ftz"))
def test_backends_agree(name: str, rbits: int) -> None:
    """rbits 23 is covered for every format in test_quantize.py; here the extremes."""
    fmt = FORMATS[name]
    rng = np.random.default_rng(rbits)
    x = np.concatenate([
        in_range_values(fmt, 30_000, seed=rbits),
        rng.integers(0, 1 << 32, 20_000, dtype=np.uint32).view(np.float32),
    ])
    seed = 1234
    ref = stochastic(x, fmt, seed, rbits)
    bits = ref.view(np.uint32)
    t = torch.from_numpy(x)
    others = {
        "numpy pure": pure_numpy(x, fmt, seed, rbits),
        "torch C": hwport.quantize(t, fmt, "stochastic", seed=seed, rbits=rbits).numpy(),
        "torch pure": _quantize_torch(t, fmt, Rounding.STOCHASTIC, seed, None, rbits,
                                      native=False).numpy(),
        "jax": np.asarray(hwport.quantize(jnp.asarray(x), fmt, "stochastic", seed=seed,
                                          rbits=rbits)),
    }
    for what, got in others.items():
        bad = got.view(np.uint32) != bits
        assert not bad.any(), (
            f"{name} rbits={rbits} {what}: {int(bad.sum())} differ, first x={x[bad][:5]!r} "
            f"C={ref[bad][:5]!r} {what}={got[bad][:5]!r}")


def test_backends_agree_float64() -> None:
    """64-bit containers: C and the array kernels (values within the formats' ranges)."""
    for name in ("bf16", "e4m3fn", "cfp8t", "fp16"):
        fmt = FORMATS[name]
        x = in_range_values(fmt, 30_000, seed=8).astype(np.float64)
        x = x * (1 + np.random.default_rng(8).random(x.size) * 2**-30)  # low bits in use
        ref = stochastic(x, fmt, 77)
        np.testing.assert_array_equal(pure_numpy(x, fmt, 77).view(np.int64),
                                      ref.view(np.int64))
        got = _quantize_torch(torch.from_numpy(x), fmt, Rounding.STOCHASTIC, 77, None, 23,
                              native=False)
        np.testing.assert_array_equal(got.numpy().view(np.int64), ref.view(np.int64))


# ------------------------------------------------------------------------------------------
# (f) hypothesis: the C kernel against round_scalar
# ------------------------------------------------------------------------------------------
U_MAX = math.nextafter(1.0, 0.0)  # the largest u: hi whenever frac > 0
FLT_MAX = float(np.finfo(np.float32).max)


def interesting_floats(fmt: F.FloatFormat) -> st.SearchStrategy[float]:
    """Any float32, values in the format's range, and exact ties / near-ties of its grid."""
    m = fmt.mantissa_bits
    lo_e = max(fmt.subnormal_base_exponent - m - 3, -149)
    hi_e = fmt.max_exponent + 2
    sign = st.sampled_from([1.0, -1.0])
    in_range = st.builds(
        lambda s, k, e: s * math.ldexp(1 + k / 2**23, e),
        sign, st.integers(0, 2**23 - 1), st.integers(lo_e, hi_e))
    # (2j + 1) * 2**(e - m - 1): exactly halfway between grid points of binade e
    ties = st.builds(
        lambda s, j, e, d: s * math.ldexp(2 * j + 1, e - m - 1) * (1 + d * 2**-23),
        sign, st.integers(0, 2**m - 1), st.integers(lo_e, hi_e), st.sampled_from([-1, 0, 1]))
    return st.one_of(st.floats(width=32), in_range, ties).map(
        lambda v: float(np.float32(v)) if not abs(v) > FLT_MAX else math.copysign(math.inf, v))


def same(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_c_kernel_matches_round_scalar(name: str) -> None:
    fmt = FORMATS[name]

    @settings(max_examples=120, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(interesting_floats(fmt), min_size=1, max_size=4),
           st.integers(0, 2**64 - 1))
    def check(values: list[float], seed: int) -> None:
        x = np.array(values, np.float32)
        near = hwport.quantize(x, fmt, "nearest")
        tz = hwport.quantize(x, fmt, "toward_zero")
        sto = hwport.quantize(x, fmt, "stochastic", seed=seed)
        for v, n, z, s in zip(values, near.tolist(), tz.tolist(), sto.tolist(), strict=True):
            want_n = round_scalar(v, fmt, "nearest")
            assert same(n, want_n), f"{name} nearest {v!r}: {n!r} != round_scalar {want_n!r}"
            want_z = round_scalar(v, fmt, "toward_zero")
            assert same(z, want_z), f"{name} toward_zero {v!r}: {z!r} != {want_z!r}"
            lo = round_scalar(v, fmt, "stochastic", u=0.0)
            hi = round_scalar(v, fmt, "stochastic", u=U_MAX)
            assert same(s, lo) or same(s, hi), f"{name} stochastic {v!r}: {s!r} not {lo}/{hi}"

    check()
