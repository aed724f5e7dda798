"""Rounding values into a :class:`~hwport.formats.FloatFormat`, as hardware stores them.

``quantize(x, fmt, rounding)`` returns the value of each element of ``x`` after it is
written in ``fmt`` and read back, in ``x``'s own array type and dtype (a numpy array, a
torch tensor or a jax array; a Python float gives a float). The three give the same bits
for the same input and seed.

Semantics, per element (``round_scalar`` is the executable definition, exact arithmetic):

* ``nearest``: the nearer of the two neighbouring values of the format, ties to the even
  code (IEEE 754 roundTiesToEven, with an unbounded exponent before the overflow check).
* ``toward_zero``: the neighbour of smaller magnitude.
* ``stochastic``: the larger-magnitude neighbour with probability equal to the distance
  from the smaller one over the gap, resolved to ``rbits`` random bits; the bits come from
  a counter-based hash of (seed, element index), so a seed fixes the result.
* A rounded magnitude above the format's largest value overflows to inf, to the largest
  value, or to NaN (the format's ``overflow``, or ``saturate=True/False`` to override);
  under ``toward_zero`` a finite value never overflows to inf (IEEE).
* inf becomes inf, the largest value (saturating) or NaN; NaN stays NaN; zeros keep
  their sign; flush-to-zero formats turn nonzero results below the smallest normal to 0.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import struct
import sys
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Any, TypeVar, cast

import numpy as np

from hwport import formats as _formats
from hwport.errors import FormatError, HwportError
from hwport.formats import FloatFormat

try:
    from hwport import _kernels  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - a build without the C extension
    _kernels = None

NATIVE_KERNEL = _kernels is not None  # whether numpy and CPU torch use the C kernel
# threads the C kernel may use on a large buffer (results do not depend on it)
_THREADS = int(os.environ.get("HWPORT_THREADS", 0)) or (
    len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


A = TypeVar("A")

MAX_RBITS = 24


class Rounding(enum.Enum):
    """How a value between two representable neighbours is resolved."""

    NEAREST = "nearest"
    STOCHASTIC = "stochastic"
    TOWARD_ZERO = "toward_zero"


@dataclass(frozen=True)
class _Container:
    width: int  # 32 or 64
    mbits: int  # 23 or 52
    bias: int  # 127 or 1023

    @property
    def sign(self) -> int:
        return 1 << (self.width - 1)

    @property
    def inf(self) -> int:
        return ((1 << (self.width - 1 - self.mbits)) - 1) << self.mbits

    @property
    def quiet(self) -> int:
        return 1 << (self.mbits - 1)

    def bits(self, v: float) -> int:
        fmt = "<f" if self.width == 32 else "<d"
        ifmt = "<I" if self.width == 32 else "<Q"
        return int(struct.unpack(ifmt, struct.pack(fmt, v))[0])

    def value(self, bits: int) -> float:
        """The float whose bit pattern is ``bits`` (the inverse of :meth:`bits`)."""
        fmt = "<f" if self.width == 32 else "<d"
        ifmt = "<I" if self.width == 32 else "<Q"
        return float(struct.unpack(fmt, struct.pack(ifmt, bits))[0])


F32 = _Container(32, 23, 127)
F64 = _Container(64, 52, 1023)


@dataclass(frozen=True)
class KernelParams:
    """Everything the kernels need, derived once per (format, container, mode)."""

    width: int
    m: int
    emin: int
    esub: int
    ftz: int
    gap: int
    overflow: int  # 0 inf, 1 saturate, 2 nan
    mode: int  # 0 nearest, 1 stochastic, 2 toward_zero
    rbits: int
    max_bits: int
    inf_bits: int
    maxsub_bits: int
    minnorm_bits: int
    nan_bits: int
    key0: int
    key1: int


_MODES = {Rounding.NEAREST: 0, Rounding.STOCHASTIC: 1, Rounding.TOWARD_ZERO: 2}


def _splitmix64(seed: int) -> int:
    z = (seed + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def kernel_params(
    fmt: FloatFormat, width: int, rounding: Rounding, seed: int | None,
    saturate: bool | None, rbits: int,
) -> KernelParams:
    """The kernel parameters for rounding ``width``-bit floats into ``fmt``."""
    base = _base_params(fmt, width, rounding, saturate, rbits)
    return base if seed is None else with_seed(base, seed)


def with_seed(p: KernelParams, seed: int) -> KernelParams:
    """``p`` drawing its stochastic rounding bits from ``seed`` (unchanged for other modes)."""
    if p.mode != _MODES[Rounding.STOCHASTIC]:
        return p
    key = _splitmix64(seed & 0xFFFFFFFFFFFFFFFF)
    return dataclasses.replace(p, key0=key & 0xFFFFFFFF, key1=key >> 32)


@lru_cache(maxsize=4096)
def _base_params(
    fmt: FloatFormat, width: int, rounding: Rounding, saturate: bool | None, rbits: int,
) -> KernelParams:
    c = F32 if width == 32 else F64
    overflow = _overflow(fmt, saturate)
    nan_bits = c.inf | c.quiet
    ovf = {"inf": 0, "saturate": 1, "nan": 2}[overflow]
    if rounding is Rounding.TOWARD_ZERO:
        ovf = 1  # IEEE: toward zero, a finite value overflows to the largest finite value
    inf_bits = {0: c.inf, 1: c.bits(fmt.max), 2: nan_bits}[
        {"inf": 0, "saturate": 1, "nan": 2}[overflow]]
    key = _splitmix64(0)
    gap = int(fmt.subnormals and fmt.subnormal_exponent == "bias" and fmt.mantissa_bits > 0)
    return KernelParams(
        width=width, m=fmt.mantissa_bits, emin=fmt.min_exponent,
        esub=fmt.subnormal_base_exponent if fmt.subnormals and fmt.mantissa_bits
        else fmt.min_exponent,  # no subnormal values: round on the grid of min_normal
        ftz=int(not fmt.subnormals), gap=gap, overflow=ovf, mode=_MODES[rounding],
        rbits=rbits, max_bits=c.bits(fmt.max), inf_bits=inf_bits,
        maxsub_bits=c.bits(fmt.max_subnormal), minnorm_bits=c.bits(fmt.min_normal),
        nan_bits=nan_bits, key0=key & 0xFFFFFFFF, key1=key >> 32,
    )


# --------------------------------------------------------------------------------------
# The array-namespace kernel: one definition over numpy, torch (any device) and jax (jit).
# It computes in a signed integer type of ``width`` bits; shift amounts are clamped so
# that no operation depends on how a library treats over-wide or negative shifts.
# --------------------------------------------------------------------------------------
class _Ops:
    """Integer operations of one array library, in a signed type of ``width`` bits."""

    width: int

    def where(self, c: Any, x: Any, y: Any) -> Any:
        raise NotImplementedError

    def clip(self, s: Any) -> Any:
        raise NotImplementedError

    def random_bits(self, idx: Any, p: KernelParams) -> Any:
        raise NotImplementedError

    def float_bits(self, k: Any, width: int) -> Any:
        raise NotImplementedError

    def shl(self, v: Any, s: Any) -> Any:
        if isinstance(s, int):
            return v << min(max(s, 0), self.width - 2)
        return self.as_int(v) << self.clip(s)

    def shr(self, v: Any, s: Any) -> Any:
        if isinstance(s, int):
            return v >> min(max(s, 0), self.width - 2)
        return self.as_int(v) >> self.clip(s)

    def as_int(self, v: Any) -> Any:
        raise NotImplementedError


def _lowbias32(x: Any, mul: Any) -> Any:
    """lowbias32 (C. Wellons) on values in [0, 2**32); ``mul`` multiplies modulo 2**32."""
    x = x ^ (x >> 16)
    x = mul(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul(x, 0x846CA68B)
    return x ^ (x >> 16)


def _kernel(ops: _Ops, bits: Any, idx: Any, p: KernelParams) -> Any:
    """Round the float bit patterns ``bits`` (in ``ops``' integer type) as ``p`` says."""
    c = F32 if p.width == 32 else F64
    a = bits & (c.sign - 1)
    sign = bits & c.sign if ops.width > p.width else bits - a
    r = ops.random_bits(idx, p) if p.mode == 1 else None

    def up(v: Any, s: Any) -> Any:
        """1 where the bits of ``v`` below position ``s`` round the kept part up."""
        dropped = v & (ops.shl(1, s) - 1)
        if p.mode == 0:
            half = ops.shl(1, s - 1)
            odd = (ops.shr(v, s) & 1) == 1
            return ops.where((dropped > half) | ((dropped == half) & odd), 1, 0)
        if p.mode == 1:
            R = p.rbits
            if isinstance(s, int):
                frac = ops.shr(dropped, s - R) if s >= R else ops.shl(dropped, R - s)
            else:
                frac = ops.where(s >= R, ops.shr(dropped, s - R), ops.shl(dropped, R - s))
            return (r + frac) >> R
        return 0

    # normal range of the target: drop the low mantissa bits of the pattern itself
    s_n = c.mbits - p.m
    res_n = ((a >> s_n) << s_n) + ops.shl(up(a, s_n), s_n) if s_n else a
    # subnormal range: k quanta of 2**(esub - m)
    eb = a >> c.mbits
    implicit = 1 << c.mbits
    sig = (a & (implicit - 1)) | ops.where(eb > 0, implicit, 0)
    s_s = (c.mbits - p.m + p.esub + c.bias) - ops.where(eb > 1, eb, 1)
    k = ops.shr(sig, s_s) + up(sig, s_s)
    # the bits of k * 2**(esub - m), with no floating-point arithmetic on subnormals
    as_normal = ops.float_bits(k, p.width) - ((p.m - p.esub) << c.mbits)
    as_sub = ops.shl(k, p.esub - p.m + c.bias - 1 + c.mbits)
    normal_from = 1 << max(0, 1 - c.bias - p.esub + p.m)
    res_s = ops.where(k >= normal_from, as_normal, as_sub)
    emin_pattern = (p.emin + c.bias) << c.mbits
    res = ops.where(a >= emin_pattern, res_n, res_s)
    if p.gap:
        band = (a > p.maxsub_bits) & (a < emin_pattern)
        res = ops.where(band, _gap(ops, a, r, p, c), res)
    overflowed = {0: c.inf, 1: p.max_bits, 2: p.nan_bits}[p.overflow]
    res = ops.where(res > p.max_bits, overflowed, res)
    if p.ftz:
        res = ops.where(res < p.minnorm_bits, 0, res)
    res = ops.where(a == 0, 0, res)
    res = ops.where(a == c.inf, p.inf_bits, res)
    return ops.where(a > c.inf, bits | c.quiet, sign | res)


def _gap(ops: _Ops, a: Any, r: Any, p: KernelParams, c: _Container) -> Any:
    """Tesla "bias" subnormals: max_sub or min_normal for values in the band between."""
    # In units of 2**(emin - 2 - CM) the band's values and both neighbours are integers.
    eb = a >> c.mbits
    sig = (a & ((1 << c.mbits) - 1)) | ops.where(eb > 0, 1 << c.mbits, 0)
    x_units = ops.shl(sig, ops.where(eb > 1, eb, 1) - (c.bias + p.emin - 2))
    lo_units = ((1 << p.m) - 1) << (c.mbits + 1 - p.m)
    gap = (1 << (c.mbits + 2)) - lo_units
    d = x_units - lo_units
    if p.mode == 0:
        up = ops.where(2 * d >= gap, 1, 0)  # a tie goes to min_normal, the even code
    elif p.mode == 2:
        up = 0 * d
    else:
        frac = 0 * d
        for _ in range(p.rbits):  # floor(d * 2**R / gap), bit by bit, in range
            d = d << 1
            bit = ops.where(d >= gap, 1, 0)
            d = d - bit * gap
            frac = (frac << 1) | bit
        up = (r + frac) >> p.rbits
    return ops.where(up == 1, p.minnorm_bits, p.maxsub_bits)


class _NumpyOps(_Ops):
    width = 64

    def where(self, c: Any, x: Any, y: Any) -> Any:
        return np.where(c, x, y).astype(np.int64)

    def clip(self, s: Any) -> Any:
        return np.clip(s, 0, self.width - 2)

    def as_int(self, v: Any) -> Any:
        return np.int64(v) if isinstance(v, int) else v

    def random_bits(self, idx: Any, p: KernelParams) -> Any:
        def mul(x: Any, k: int) -> Any:
            return x * np.uint32(k)

        with np.errstate(over="ignore"):
            h = _lowbias32(_lowbias32(idx.astype(np.uint32) + np.uint32(p.key0), mul)
                           ^ np.uint32(p.key1), mul)
        return (h >> np.uint32(32 - p.rbits)).astype(np.int64)

    def float_bits(self, k: Any, width: int) -> Any:
        if width == 32:
            return k.astype(np.float32).view(np.uint32).astype(np.int64)
        return k.astype(np.float64).view(np.int64)


class _TorchOps(_Ops):
    width = 64

    def __init__(self) -> None:
        import torch

        self.torch = torch

    def where(self, c: Any, x: Any, y: Any) -> Any:
        return self.torch.where(c, x, y)

    def clip(self, s: Any) -> Any:
        return s.clamp(0, self.width - 2)

    def as_int(self, v: Any) -> Any:
        return v

    def shl(self, v: Any, s: Any) -> Any:
        if isinstance(v, int) and not isinstance(s, int):
            return self.torch.bitwise_left_shift(v, self.clip(s))
        return super().shl(v, s)

    def random_bits(self, idx: Any, p: KernelParams) -> Any:
        mask = 0xFFFFFFFF

        def mul(x: Any, k: int) -> Any:  # (x * k) mod 2**32 without int64 overflow
            lo, hi = x & 0xFFFF, x >> 16
            return (lo * k + (((hi * k) & 0xFFFF) << 16)) & mask

        h = _lowbias32(_lowbias32((idx + p.key0) & mask, mul) ^ p.key1, mul)
        return h >> (32 - p.rbits)

    def float_bits(self, k: Any, width: int) -> Any:
        t = self.torch
        if width == 32:
            return k.to(t.float32).view(t.int32).to(t.int64)
        return k.to(t.float64).view(t.int64)


class _JaxOps(_Ops):
    """The kernel's operations in JAX; stochastic-rounding keys from ``p`` or, when given,
    traced ``keys`` (a program that draws new keys each step without recompiling)."""

    def __init__(self, width: int, keys: tuple[Any, Any] | None = None) -> None:
        import jax.numpy as jnp

        self.jnp = jnp
        self.width = width
        self.itype = jnp.int32 if width == 32 else jnp.int64
        self.keys = keys

    def where(self, c: Any, x: Any, y: Any) -> Any:
        return self.jnp.where(c, x, y).astype(self.itype)

    def clip(self, s: Any) -> Any:
        return self.jnp.clip(s, 0, self.width - 2)

    def as_int(self, v: Any) -> Any:
        return self.jnp.asarray(v, self.itype) if isinstance(v, int) else v

    def random_bits(self, idx: Any, p: KernelParams) -> Any:
        jnp = self.jnp

        def mul(x: Any, k: int) -> Any:
            return x * jnp.uint32(k)

        k0, k1 = self.keys or (jnp.uint32(p.key0), jnp.uint32(p.key1))
        h = _lowbias32(_lowbias32(idx.astype(jnp.uint32) + k0, mul) ^ k1, mul)
        return (h >> (32 - p.rbits)).astype(self.itype)

    def float_bits(self, k: Any, width: int) -> Any:
        from jax import lax

        ftype = self.jnp.float32 if width == 32 else self.jnp.float64
        return lax.bitcast_convert_type(k.astype(ftype), self.itype)


# formats whose nearest rounding from float32 is XLA's own conversion (checked against the
# kernel over all 2**32 float32 inputs, docs/jax.md; tests/test_quantize.py on every run);
# also their flush-to-zero versions (IEEE rounding, then results below min_normal to zero)
_XLA_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "e5m2": "float8_e5m2",
               "e4m3fn": "float8_e4m3fn"}


@lru_cache(maxsize=1024)
def _xla_dtype(p: KernelParams) -> tuple[str, bool] | None:
    """(the JAX dtype whose float32 conversion rounds as ``p``, whether results below the
    smallest normal are then flushed), if there is one."""
    if p.width != 32 or p.mode != _MODES[Rounding.NEAREST]:
        return None
    for name, dtype in _XLA_DTYPES.items():
        fmt = getattr(_formats, name)
        for ftz, f in ((False, fmt), (True, dataclasses.replace(fmt, subnormals=False))):
            base = _base_params(f, 32, Rounding.NEAREST, None, p.rbits)
            if base == dataclasses.replace(p, key0=base.key0, key1=base.key1):
                return dtype, ftz
    return None


def round_jax(x: Any, p: KernelParams, keys: tuple[Any, Any] | None = None) -> Any:
    """``x`` (a float32 or float64 JAX array, traced or not) rounded as ``p`` says, bit for
    bit as the other kernels; stochastic bits from ``keys`` (two traced uint32) if given.

    Formats XLA converts to natively take that path, written in floating-point operations
    only (integer views of a value split XLA's fusions, making emulated programs several
    times slower). A select (which also quiets a NaN, as the kernel does) keeps the two
    conversions apart from the value's consumers: XLA folds a bare
    pair into a consumer, which then computes in the narrow type (a sum of rounded values
    accumulated in bf16, say). XLA's ``reduce_precision`` gives bf16's bits too, but was
    measured slower in emulated programs where most values are rounded (2x on the ``lm``
    step under pure bf16), and it flushes fp16's and e5m2's subnormals."""
    import jax.numpy as jnp
    from jax import lax

    native = _xla_dtype(p)
    if native is not None:
        dtype, ftz = native
        y = x.astype(getattr(jnp, dtype)).astype(x.dtype)
        if ftz:  # a result below the smallest normal is a zero of its sign
            y = jnp.where(jnp.abs(y) < F32.value(p.minnorm_bits), y * 0, y)
        # a NaN keeps its payload, quieted (as the kernel)
        return jnp.where(x != x, x + x, y)
    ops = _JaxOps(p.width, keys)
    bits = lax.bitcast_convert_type(x, ops.itype)
    idx = lax.iota(jnp.int32, x.size).reshape(x.shape)
    return lax.bitcast_convert_type(_kernel(ops, bits, idx, p), x.dtype)


@lru_cache(maxsize=1024)
def _thresholds(p: KernelParams) -> tuple[int, int]:
    """(largest magnitude pattern that ``p`` rounds to zero, smallest one it counts as
    overflowing; the container's inf if none), for a mode monotone in the magnitude
    (nearest, toward zero): found by bisection on the C kernel."""
    c = F32 if p.width == 32 else F64
    ftype, itype = (np.float32, np.uint32) if p.width == 32 else (np.float64, np.uint64)

    def first(which: int) -> int:
        """The smallest pattern in [1, inf] whose count ``which`` is 0 (nonzero result)
        or 1 (overflow); inf stands for "none"."""
        lo, hi = 0, c.inf
        while hi - lo > 1:
            mid = (lo + hi) // 2
            x = np.array([mid], itype).view(ftype)
            counts = round_into(x, np.empty_like(x), p, threads=1)
            lo, hi = (lo, mid) if (counts[1] == 0 if which == 0 else counts[0] == 1) \
                else (mid, hi)
        return hi

    return first(0) - 1, first(1)


def tally_jax(x: Any, p: KernelParams) -> Any:
    """[finite values that overflowed, nonzero values that became zero, inf/NaN inputs] of
    rounding ``x`` as ``p`` (nearest or toward zero), the counts of :func:`round_into`, as
    int32: they follow from ``x``'s magnitude alone, one pass. Compared as integers: XLA
    on CPU treats subnormal floats as zero in comparisons."""
    import jax.numpy as jnp
    from jax import lax

    if p.mode == _MODES[Rounding.STOCHASTIC]:
        raise ValueError("tally_jax: stochastic counts depend on the draws; "
                         "use round_counted_jax")
    c = F32 if p.width == 32 else F64
    itype = jnp.int32 if p.width == 32 else jnp.int64
    a = lax.bitcast_convert_type(x, itype) & (c.sign - 1)
    zero_upto, overflow_from = _thresholds(p)
    return _sums(x.ndim, (a >= overflow_from) & (a < c.inf), (a > 0) & (a <= zero_upto),
                 a >= c.inf)


def _sums(ndim: int, *flags: Any) -> Any:
    """The counts of true ``flags`` (one pass: a variadic reduction), int32."""
    import jax.numpy as jnp
    from jax import lax

    zero = jnp.int32(0)
    sums = lax.reduce(tuple(f.astype(jnp.int32) for f in flags), (zero,) * len(flags),
                      lambda u, v: tuple(s + t for s, t in zip(u, v, strict=True)),
                      tuple(range(ndim)))
    return jnp.stack(sums)


FFI_TARGET = "hwport_round"  # the C kernel as an XLA FFI handler (CPU)


def ffi_kernel() -> str | None:
    """Why jitted JAX programs on CPU do not round with the C kernel (:data:`FFI_TARGET`),
    or None when they do: its handler is registered with XLA on first use. The environment
    variable ``HWPORT_JAX_KERNEL=xla`` makes them use XLA's operations (``ffi``, the
    default: the C kernel where it works)."""
    choice = os.environ.get("HWPORT_JAX_KERNEL", "ffi")
    if choice not in ("ffi", "xla"):
        raise HwportError(f"environment variable HWPORT_JAX_KERNEL={choice!r}: expected "
                          "'ffi' (the C kernel in jitted JAX programs on CPU) or 'xla'")
    if choice == "xla":
        return "HWPORT_JAX_KERNEL=xla"
    return _ffi_probe()


@lru_cache(maxsize=1)
def _ffi_probe() -> str | None:
    """Register the handler with XLA and probe it (once): None if it serves, else why not."""
    if _kernels is None:
        return "hwport was built without its C extension"
    import jax

    # a probe with each count and float32-subnormal results (which a flushing floating-point
    # environment would zero): the handler must give the kernel's bits in a compiled
    # program, or XLA's operations serve (an XLA of another FFI version may refuse it)
    x = np.array([1.0, -1e-39, 3e-39, 1e-45, 3.4e38, np.inf, np.nan], np.float32)
    p = kernel_params(_formats.bf16, 32, Rounding.NEAREST, None, None, 23)
    want = np.empty_like(x)
    counts = round_into(x, want, p, threads=1)
    try:
        jax.ffi.register_ffi_target(FFI_TARGET, _kernels.ffi_round, platform="cpu")
        with jax.ensure_compile_time_eval():  # run now, even when called while tracing
            cpu = jax.device_put(x, jax.devices("cpu")[0])
            y, c = jax.jit(lambda v: _round_counted_ffi(v, p))(cpu)
            got = np.asarray(y), tuple(int(v) for v in np.asarray(c))
    except Exception as e:  # whatever XLA raises, its own operations serve
        return f"XLA refused the FFI handler: {type(e).__name__}: {e}"
    if got[0].view(np.uint32).tolist() != want.view(np.uint32).tolist() or got[1] != counts:
        return "the FFI handler's probe gave other bits or counts than the C kernel"
    return None


def _round_counted_xla(x: Any, p: KernelParams) -> tuple[Any, Any]:
    """(``x`` rounded, its counts) in XLA's operations (nearest or toward zero)."""
    return round_jax(x, p), tally_jax(x, p)


def _round_counted_ffi(x: Any, p: KernelParams) -> tuple[Any, Any]:
    """(``x`` rounded, its counts): the C kernel's one pass, called from the XLA program."""
    import jax
    import jax.numpy as jnp

    params = np.array([p.width, p.m, p.emin, p.esub, p.ftz, p.gap, p.overflow, p.mode,
                       p.rbits, p.max_bits, p.inf_bits, p.maxsub_bits, p.minnorm_bits,
                       p.nan_bits], np.int64)
    shapes = (jax.ShapeDtypeStruct(x.shape, x.dtype),  # type: ignore[no-untyped-call]
              jax.ShapeDtypeStruct((3,), jnp.int32))  # type: ignore[no-untyped-call]
    call = jax.ffi.ffi_call(FFI_TARGET, shapes, vmap_method="sequential",
                            input_output_aliases={0: 0})
    y, counts = call(x, params=params)
    return y, counts


def round_counted_jax(x: Any, p: KernelParams, keys: tuple[Any, Any] | None = None
                      ) -> tuple[Any, Any]:
    """(``x`` rounded as :func:`round_jax`, its :func:`tally_jax` counts), in any mode.

    Nearest and toward-zero rounding on CPU run the C kernel inside the program (an XLA FFI
    call, :func:`ffi_kernel`): one pass that rounds and counts, where XLA's own operations
    need a reduction per rounded array that its CPU backend cannot fuse with the rounding
    (measured in docs/jax.md). Other platforms, and a build without the C extension, take
    XLA's operations, with the same bits. A stochastic rounding is computed with overflow
    to inf, which shows what overflowed, and then given the format's overflow value."""
    import jax.numpy as jnp
    from jax import lax

    if p.mode != _MODES[Rounding.STOCHASTIC]:
        if ffi_kernel() is not None:
            return _round_counted_xla(x, p)
        return lax.platform_dependent(  # type: ignore[no-any-return]
            x, cpu=lambda v: _round_counted_ffi(v, p), default=lambda v: _round_counted_xla(
                v, p))
    c = F32 if p.width == 32 else F64
    itype = jnp.int32 if p.width == 32 else jnp.int64
    bits = lax.bitcast_convert_type(x, itype)
    a = bits & (c.sign - 1)
    y = lax.bitcast_convert_type(round_jax(x, dataclasses.replace(p, overflow=0), keys),
                                 itype)
    over = (a < c.inf) & ((y & (c.sign - 1)) == c.inf)
    value = {0: c.inf, 1: p.max_bits, 2: p.nan_bits}[p.overflow]
    y = jnp.where(over, (bits - a) | value, y).astype(itype)  # bits - a: the sign bit
    counts = _sums(x.ndim, over, (a > 0) & ((y & (c.sign - 1)) == 0), a >= c.inf)
    return lax.bitcast_convert_type(y, x.dtype), counts


# --------------------------------------------------------------------------------------
# quantize: dispatch on the array kind
# --------------------------------------------------------------------------------------
_CONTAINERS = {"float32": 32, "float64": 64}
_UPCAST = {"float16": _formats.fp16, "bfloat16": _formats.bf16}


def _array_kind(x: object) -> str:
    if isinstance(x, np.ndarray | np.generic | float | int):
        return "numpy"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return "torch"
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.Array):
        return "jax"
    raise TypeError(
        "quantize: expected a numpy array, torch tensor, jax array or float, "
        f"got {type(x).__name__}"
    )


def quantize(
    x: A, fmt: FloatFormat | str, rounding: Rounding | str = Rounding.NEAREST, *,
    seed: int | None = None, saturate: bool | None = None, rbits: int = 23,
) -> A:
    """``x`` rounded into ``fmt`` and read back, in ``x``'s own array type and dtype.

    ``rounding`` is ``"nearest"`` (ties to even), ``"stochastic"`` (needs ``seed``; uses
    ``rbits`` random bits, 1..24) or ``"toward_zero"``. ``saturate`` overrides the format's
    overflow behaviour (True: clamp to the largest value; False: inf or NaN). Containers are
    float32 and float64; float16 and bfloat16 are widened exactly, rounded and narrowed,
    which needs ``fmt`` to fit in them (else the narrowing would round a second time).
    """
    fmt = _formats.get(fmt)
    mode = Rounding(rounding)
    if mode is Rounding.STOCHASTIC and seed is None:
        raise ValueError("stochastic rounding needs a seed (an int) to be reproducible")
    if not 1 <= rbits <= MAX_RBITS:
        raise ValueError(f"rbits={rbits}: must be 1..{MAX_RBITS}")
    impl = {"numpy": _quantize_numpy, "torch": _quantize_torch, "jax": _quantize_jax}
    return cast(A, impl[_array_kind(x)](x, fmt, mode, seed, saturate, rbits))


def _container(dtype_name: str, fmt: FloatFormat) -> tuple[int, FloatFormat | None]:
    """(width of the working container, narrower storage format or None)."""
    if dtype_name in _CONTAINERS:
        return _CONTAINERS[dtype_name], None
    narrow = _UPCAST.get(dtype_name)
    if narrow is None:
        raise TypeError(f"quantize: dtype {dtype_name} is not a floating-point container")
    if not narrow.contains(fmt):
        raise FormatError(
            f"cannot hold {fmt.name} values in a {dtype_name} array without rounding twice; "
            f"pass float32"
        )
    return 32, narrow


def _quantize_numpy(x: Any, fmt: FloatFormat, mode: Rounding, seed: int | None,
                    saturate: bool | None, rbits: int) -> Any:
    if isinstance(x, float | int) and not isinstance(x, np.generic):
        return float(_quantize_numpy(np.array(float(x)), fmt, mode, seed, saturate, rbits))
    arr = np.asarray(x)
    name = "bfloat16" if arr.dtype.name == "bfloat16" else arr.dtype.name
    width, narrow = _container(name, fmt)
    src = np.require(arr, np.float32 if width == 32 else np.float64, "C")
    p = kernel_params(fmt, width, mode, seed, saturate, rbits)
    out = np.empty_like(src)
    round_into(src, out, p)
    out = out.astype(arr.dtype) if narrow is not None else out
    return out if isinstance(x, np.ndarray) else out[()]


def round_into(src: np.ndarray, arr: np.ndarray, p: KernelParams,
               threads: int | None = None) -> tuple[int, int, int]:
    """Write ``src`` rounded into ``arr`` (C-contiguous, same shape and dtype; ``arr`` may
    be ``src``, rounding in place), with up to ``threads`` threads (default: the available
    cores, ``HWPORT_THREADS``). Returns the counts of (finite values that overflowed,
    nonzero values that became zero, inf/NaN inputs)."""
    if _kernels is not None:
        counts: tuple[int, int, int] = _kernels.quantize(
            src, arr, p.width, p.m, p.emin, p.esub, p.ftz, p.gap, p.overflow, p.mode, p.rbits,
            p.max_bits, p.inf_bits, p.maxsub_bits, p.minnorm_bits, p.nan_bits, p.key0, p.key1,
            threads or _THREADS)
        return counts
    before = src.copy()  # pragma: no cover - the C kernel is missing
    arr[...] = quantize_xp_numpy(before, p)
    finite = np.isfinite(before)
    top = np.array([p.max_bits], np.uint32 if p.width == 32 else np.uint64).view(arr.dtype)[0]
    over = finite & (~np.isfinite(arr) | ((np.abs(arr) == top) & (np.abs(before) > top)))
    return int(over.sum()), int(((before != 0) & (arr == 0)).sum()), int((~finite).sum())


def quantize_xp_numpy(src: np.ndarray, p: KernelParams) -> np.ndarray:
    """The array-namespace kernel on numpy (the C kernel's twin, for tests and fallback)."""
    ops = _NumpyOps()
    utype = np.uint32 if p.width == 32 else np.uint64
    bits = src.view(utype).astype(np.int64) if p.width == 32 else src.view(np.int64)
    idx = np.arange(src.size, dtype=np.int64).reshape(src.shape)
    res = _kernel(ops, bits, idx, p)
    if p.width == 32:
        return np.asarray(res).astype(np.uint32).view(np.float32)
    return np.asarray(res).astype(np.int64).view(np.float64)


def _quantize_torch(x: Any, fmt: FloatFormat, mode: Rounding, seed: int | None,
                    saturate: bool | None, rbits: int, native: bool = True) -> Any:
    import torch

    name = str(x.dtype).removeprefix("torch.")
    width, narrow = _container(name, fmt)
    src = x.detach().to(torch.float32 if width == 32 else torch.float64).contiguous()
    p = kernel_params(fmt, width, mode, seed, saturate, rbits)
    if native and _kernels is not None and src.device.type == "cpu":
        out = torch.empty_like(src)
        round_into(src.numpy(), out.numpy(), p)
    else:
        out = _torch_xp(src, p)
    return out.to(x.dtype) if narrow is not None else out


def _torch_xp(src: Any, p: KernelParams) -> Any:
    import torch

    if p.width == 32:
        bits = src.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    else:
        bits = src.view(torch.int64)
    idx = torch.arange(src.numel(), dtype=torch.int64, device=src.device).reshape(src.shape)
    res = _kernel(_TorchOps(), bits, idx, p)
    if p.width == 32:
        res = torch.where(res >= 1 << 31, res - (1 << 32), res)
        return res.to(torch.int32).view(torch.float32)
    return res.view(torch.float64)


def _quantize_jax(x: Any, fmt: FloatFormat, mode: Rounding, seed: int | None,
                  saturate: bool | None, rbits: int) -> Any:
    name = str(x.dtype)
    width, narrow = _container(name, fmt)
    p = kernel_params(fmt, width, mode, seed, saturate, rbits)
    return _jax_fn(p, narrow is not None)(x)


@lru_cache(maxsize=1024)
def _jax_fn(p: KernelParams, narrowed: bool) -> Any:
    import jax
    import jax.numpy as jnp

    ftype = jnp.float32 if p.width == 32 else jnp.float64

    @jax.jit
    def fn(x: Any) -> Any:
        out = round_jax(x.astype(ftype), p)
        return out.astype(x.dtype) if narrowed else out

    return fn


def _overflow(fmt: FloatFormat, saturate: bool | None) -> str:
    """What overflow becomes: the format's rule, or the ``saturate`` override."""
    if saturate is None:
        return fmt.overflow
    if saturate:
        return "saturate"
    if fmt.overflow != "saturate":
        return fmt.overflow
    if not (fmt.inf or fmt.has_nan):
        raise FormatError(f"{fmt.name} has neither inf nor NaN: it can only saturate")
    return "inf" if fmt.inf else "nan"


def round_scalar(
    x: float, fmt: FloatFormat | str, rounding: Rounding | str = Rounding.NEAREST, *,
    u: float = 0.0, saturate: bool | None = None,
) -> float:
    """The definition of :func:`quantize` for one value, in exact arithmetic.

    ``u`` in [0, 1) stands for the random draw of stochastic rounding: the result is the
    larger neighbour iff ``u + (|x| - lo) / (hi - lo) >= 1``.
    """
    fmt = _formats.get(fmt)
    mode = Rounding(rounding)
    overflow = _overflow(fmt, saturate)
    if math.isnan(x):
        return math.nan
    sign = math.copysign(1.0, x)
    if math.isinf(x):
        return {"inf": x, "saturate": sign * fmt.max, "nan": math.nan}[overflow]
    if x == 0:
        return x
    if mode is Rounding.TOWARD_ZERO:
        overflow = "saturate"  # IEEE: toward zero, a finite value never overflows
    lo, hi = fmt.neighbours(x)
    a = abs(x)
    if lo == hi or mode is Rounding.TOWARD_ZERO:
        v = lo
    elif mode is Rounding.NEAREST:
        d_lo, d_hi = Fraction(a) - Fraction(lo), Fraction(hi) - Fraction(a)
        if d_lo != d_hi:
            v = lo if d_lo < d_hi else hi
        else:
            v = lo if fmt.is_even_value(lo) else hi
    else:
        frac = (Fraction(a) - Fraction(lo)) / (Fraction(hi) - Fraction(lo))
        v = hi if Fraction(u) + frac >= 1 else lo
    if v > fmt.max:
        v = {"inf": math.inf, "saturate": fmt.max, "nan": math.nan}[overflow]
    elif not fmt.subnormals and 0 < v < fmt.min_normal:
        v = 0.0
    return sign * v
