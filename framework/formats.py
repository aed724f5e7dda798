"""Number formats as frozen data.

A :class:`FloatFormat` says which real numbers a binary floating-point format can hold and
what happens to values it cannot hold. Everything else (largest value, smallest subnormal,
epsilon, the value of a code) is derived from its fields. Formats are looked up by name in
one registry that holds the built-ins, the parametric Dojo families (``cfp8_143_b7``,
``cfp8_152_b31``, ``cfp16_shp_b15``) and formats that plugins contribute.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

from hwport.errors import FormatError, UnknownNameError

Overflow = Literal["inf", "saturate", "nan"]
NanEncoding = Literal["ieee", "fn", "none"]
SubnormalExponent = Literal["ieee", "bias"]

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class FloatFormat:
    """A signed binary floating-point format.

    A finite nonzero value is ``(-1)**s * 2**(E - bias) * (1 + M / 2**mantissa_bits)`` for a
    biased exponent ``E >= 1``; with ``E == 0`` it is subnormal,
    ``(-1)**s * 2**(e_sub) * (M / 2**mantissa_bits)``, where ``e_sub`` is ``1 - bias``
    (IEEE, ``subnormal_exponent="ieee"``) or ``-bias`` (the literal reading of Tesla's CFloat
    text, ``subnormal_exponent="bias"``), or zero when ``subnormals`` is false (flush to zero).

    Special encodings:

    * ``inf=True`` and ``nan="ieee"``: the all-ones exponent is reserved for inf and NaN.
    * ``nan="fn"``: only the all-ones code (``S.1111.111``) is NaN, no inf (OCP E4M3FN).
    * ``nan="none"``: every code is finite (Dojo CFloat); a NaN input stays NaN in the fp32
      container, which models the hardware's "invalid" exception being raised.

    ``overflow`` says what a value whose rounded magnitude exceeds :attr:`max` becomes:
    ``inf``, the largest finite value (``saturate``) or NaN.
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    subnormals: bool = True
    inf: bool = True
    nan: NanEncoding = "ieee"
    overflow: Overflow = "inf"
    subnormal_exponent: SubnormalExponent = "ieee"
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        problems = []
        for name in ("exponent_bits", "mantissa_bits", "bias"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                problems.append(f"{name}={v!r}: must be an integer")
        for name in ("subnormals", "inf"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name}={getattr(self, name)!r}: must be true or false")
        if not isinstance(self.name, str):
            problems.append(f"name={self.name!r}: must be a string")
        if problems:
            raise FormatError(f"format {self.name!r}: " + "; ".join(problems))
        if not _NAME.match(self.name):
            problems.append(f"name={self.name!r}: must match {_NAME.pattern}")
        if not 1 <= self.exponent_bits <= 8:
            problems.append(f"exponent_bits={self.exponent_bits}: must be 1..8 (fp32 container)")
        if not 0 <= self.mantissa_bits <= 23:
            problems.append(f"mantissa_bits={self.mantissa_bits}: must be 0..23 (fp32 container)")
        if self.nan not in ("ieee", "fn", "none"):
            problems.append(f"nan={self.nan!r}: must be 'ieee', 'fn' or 'none'")
        if self.overflow not in ("inf", "saturate", "nan"):
            problems.append(f"overflow={self.overflow!r}: must be 'inf', 'saturate' or 'nan'")
        if self.subnormal_exponent not in ("ieee", "bias"):
            problems.append(
                f"subnormal_exponent={self.subnormal_exponent!r}: must be 'ieee' or 'bias'"
            )
        if self.inf and self.nan != "ieee":
            problems.append("inf=True needs nan='ieee' (inf lives in the reserved exponent)")
        if self.overflow == "inf" and not self.inf:
            problems.append("overflow='inf' on a format without inf")
        if self.overflow == "nan" and self.nan == "none":
            problems.append("overflow='nan' on a format without NaN")
        if problems:
            raise FormatError(f"format {self.name!r}: " + "; ".join(problems))
        if self.max_exponent < self.min_exponent:
            raise FormatError(f"format {self.name!r}: exponent_bits={self.exponent_bits} with "
                              f"nan={self.nan!r} leaves no normal values")
        if not (self.min_exponent >= -126 and self.max_exponent <= 127):
            raise FormatError(
                f"format {self.name!r}: bias={self.bias} puts the exponent range "
                f"[{self.min_exponent}, {self.max_exponent}] outside fp32's [-126, 127]"
            )
        if math.log2(self.min_subnormal if self.subnormals else self.min_normal) < -149:
            raise FormatError(f"format {self.name!r}: smallest value is below fp32's")

    # -- derived quantities --------------------------------------------------------------
    @property
    def bits(self) -> int:
        """Width of the encoding in bits (sign, exponent, mantissa)."""
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def min_exponent(self) -> int:
        """Unbiased exponent of the smallest normal value."""
        return 1 - self.bias

    @property
    def max_exponent(self) -> int:
        """Unbiased exponent of the largest finite value."""
        top = (1 << self.exponent_bits) - 1
        return (top - 1 if self.nan == "ieee" else top) - self.bias

    @property
    def subnormal_base_exponent(self) -> int:
        """Exponent ``e_sub`` of the subnormal range: value = M / 2**m * 2**e_sub."""
        return self.min_exponent - (1 if self.subnormal_exponent == "bias" else 0)

    @property
    def max(self) -> float:
        """Largest finite value."""
        top_mantissa = (1 << self.mantissa_bits) - (2 if self.nan == "fn" else 1)
        return math.ldexp(1 + top_mantissa / (1 << self.mantissa_bits), self.max_exponent)

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value."""
        return math.ldexp(1.0, self.min_exponent)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive subnormal value (:attr:`min_normal` if there are none)."""
        if not self.subnormals or self.mantissa_bits == 0:
            return self.min_normal
        return math.ldexp(1.0, self.subnormal_base_exponent - self.mantissa_bits)

    @property
    def max_subnormal(self) -> float:
        """Largest subnormal value (0 if there are none)."""
        if not self.subnormals:
            return 0.0
        m = self.mantissa_bits
        return math.ldexp(((1 << m) - 1) / (1 << m), self.subnormal_base_exponent)

    @property
    def epsilon(self) -> float:
        """Distance from 1.0 to the next larger value."""
        return math.ldexp(1.0, -self.mantissa_bits)

    @property
    def has_nan(self) -> bool:
        """Whether some code is NaN."""
        return self.nan != "none"

    def contains(self, other: FloatFormat) -> bool:
        """Whether every finite value of ``other`` is a value of this format."""
        lowest = other.min_subnormal if other.subnormals else other.min_normal
        own_lowest = self.min_subnormal if self.subnormals else self.min_normal
        return (
            other.mantissa_bits <= self.mantissa_bits
            and other.max <= self.max
            and lowest >= own_lowest
            and other.min_exponent >= self.min_exponent
            and (other.subnormal_exponent == "ieee" or other.mantissa_bits == 0)
        )

    # -- the executable definition ---------------------------------------------------------
    def decode(self, code: int) -> float:
        """The value of the ``bits``-wide code (NaN, inf, or an exact finite value)."""
        if not 0 <= code < 1 << self.bits:
            raise FormatError(f"code {code} out of range for {self.bits}-bit {self.name}")
        m, e = self.mantissa_bits, self.exponent_bits
        sign = -1.0 if code >> (m + e) else 1.0
        exp = (code >> m) & ((1 << e) - 1)
        man = code & ((1 << m) - 1)
        top = (1 << e) - 1
        if self.nan == "ieee" and exp == top:
            return sign * math.inf if man == 0 and self.inf else math.nan
        if self.nan == "fn" and exp == top and man == (1 << m) - 1:
            return math.nan
        if exp == 0:
            if not self.subnormals:
                return sign * 0.0
            return sign * math.ldexp(man / (1 << m), self.subnormal_base_exponent)
        return sign * math.ldexp(1 + man / (1 << m), exp - self.bias)

    def finite_values(self) -> list[float]:
        """Every distinct finite non-negative value, ascending (formats up to 16 bits)."""
        if self.bits > 16:
            raise FormatError(f"{self.name} has {self.bits} bits: too many values to list")
        half = 1 << (self.bits - 1)
        vals = {self.decode(c) for c in range(half)}
        return sorted(v for v in vals if math.isfinite(v))

    def neighbours(self, x: float) -> tuple[float, float]:
        """The format's finite values ``lo <= |x| <= hi`` closest to ``|x|`` (exact).

        ``hi`` may be one step past :attr:`max` (the value rounding would reach with an
        unbounded exponent), which is how overflow is detected. A flush-to-zero format rounds
        on the IEEE subnormal grid, as hardware does before it flushes a subnormal result,
        so its neighbours below :attr:`min_normal` are points of that grid.
        """
        a = Fraction(abs(x))
        m = self.mantissa_bits
        e_sub = self.subnormal_base_exponent if self.subnormals else self.min_exponent
        if a == 0:
            return 0.0, 0.0
        # Grid points near a: subnormal multiples of 2**(e_sub - m) below min_normal, then
        # 2**m steps per binade.
        if a < Fraction(self.min_normal):
            q = Fraction(2) ** (e_sub - m)
            top_sub = Fraction(2) ** e_sub - q
            if a <= top_sub:
                k = math.floor(a / q)
                lo, hi = k * q, (k + 1) * q if k * q < a else k * q
            else:
                lo, hi = top_sub, Fraction(self.min_normal)
        else:
            e = math.floor(math.log2(a))
            while Fraction(2) ** e > a:
                e -= 1
            while Fraction(2) ** (e + 1) <= a:
                e += 1
            q = Fraction(2) ** (e - m)
            k = math.floor(a / q)
            lo, hi = k * q, (k + 1) * q if k * q < a else k * q
        return float(lo), float(hi)

    def is_even_value(self, v: float) -> bool:
        """Whether the (non-negative, representable or one-past-max) value has an even code."""
        if v == 0:
            return True
        m = self.mantissa_bits
        if v < self.min_normal:
            e_sub = self.subnormal_base_exponent if self.subnormals else self.min_exponent
            q = math.ldexp(1.0, e_sub - m)
            return int(v / q) % 2 == 0
        mant, _ = math.frexp(v)  # v = mant * 2**e, mant in [0.5, 1)
        return int(math.ldexp(mant, m + 1)) % 2 == 0

    def __str__(self) -> str:
        return self.name

    def to_dict(self) -> dict[str, object]:
        """The fields plus derived quantities, JSON-serialisable."""
        return {
            "name": self.name,
            "bits": self.bits,
            "exponent_bits": self.exponent_bits,
            "mantissa_bits": self.mantissa_bits,
            "bias": self.bias,
            "subnormals": self.subnormals,
            "inf": self.inf,
            "nan": self.nan,
            "overflow": self.overflow,
            "subnormal_exponent": self.subnormal_exponent,
            "max": self.max,
            "min_normal": self.min_normal,
            "min_subnormal": self.min_subnormal,
            "epsilon": self.epsilon,
            "description": self.description,
        }


def ieee_like(name: str, e: int, m: int, description: str = "") -> FloatFormat:
    """An IEEE 754-style format: bias 2**(e-1)-1, subnormals, inf and NaN."""
    return FloatFormat(name, e, m, (1 << (e - 1)) - 1, description=description)


fp32 = ieee_like("fp32", 8, 23, "IEEE 754 binary32")
tf32 = ieee_like("tf32", 8, 10, "NVIDIA TensorFloat-32: fp32 range, 10 mantissa bits")
bf16 = ieee_like("bf16", 8, 7, "bfloat16")
fp16 = ieee_like("fp16", 5, 10, "IEEE 754 binary16")
e5m2 = ieee_like("e5m2", 5, 2, "OCP FP8 E5M2 (IEEE-like, max 57344)")
e4m3fn = FloatFormat(
    "e4m3fn", 4, 3, 7, inf=False, nan="fn", overflow="nan",
    description="OCP FP8 E4M3FN: no inf, NaN only at S.1111.111, max 448",
)


def cfp8(layout: Literal["143", "152"], bias: int) -> FloatFormat:
    """Tesla CFloat8 in the 1-4-3 or 1-5-2 layout with a configurable bias (0..63).

    No inf or NaN, subnormals, overflow clamps to the largest value.
    """
    if layout not in ("143", "152"):
        raise FormatError(f"CFloat8 layout {layout!r}: must be '143' or '152'")
    if not 0 <= bias <= 63:
        raise FormatError(f"CFloat8 bias {bias}: must be 0..63 (6-bit field)")
    e, m = (4, 3) if layout == "143" else (5, 2)
    return FloatFormat(
        f"cfp8_{layout}_b{bias}", e, m, bias, inf=False, nan="none", overflow="saturate",
        description=f"Tesla CFloat8 1-{e}-{m}, exponent bias {bias}",
    )


def cfp16_shp(bias: int) -> FloatFormat:
    """Tesla CFloat16 signed half precision (1-5-10) with a configurable bias; clamps."""
    if not 0 <= bias <= 63:
        raise FormatError(f"CFloat16 bias {bias}: must be 0..63 (6-bit field)")
    return FloatFormat(
        f"cfp16_shp_b{bias}", 5, 10, bias, inf=False, nan="none", overflow="saturate",
        description=f"Tesla CFloat16 SHP 1-5-10, exponent bias {bias}",
    )


BUILTIN: tuple[FloatFormat, ...] = (fp32, tf32, bf16, fp16, e4m3fn, e5m2)

_FAMILIES: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], FloatFormat]], ...] = (
    (re.compile(r"^cfp8_(143|152)_b(\d+)$"), lambda mt: cfp8(mt[1], int(mt[2]))),  # type: ignore[arg-type]
    (re.compile(r"^cfp16_shp_b(\d+)$"), lambda mt: cfp16_shp(int(mt[1]))),
)

_registered: dict[str, FloatFormat] = {f.name: f for f in BUILTIN}


def register(fmt: FloatFormat) -> bool:
    """Make ``fmt`` known by name; True if the name is new.

    Registering an equal format again is a no-op; a different format under a taken name is
    an error.
    """
    old = _registered.get(fmt.name)
    if old is not None:
        if old != fmt:
            raise FormatError(f"format name {fmt.name!r} is already taken by a different format")
        return False
    _registered[fmt.name] = fmt
    return True


def unregister(name: str) -> None:
    """Forget a registered (non built-in) format."""
    if any(f.name == name for f in BUILTIN):
        raise FormatError(f"format {name!r} is built in")
    _registered.pop(name, None)


def get(name: str | FloatFormat) -> FloatFormat:
    """The format called ``name`` (registered, built in, or a parametric CFloat name)."""
    if isinstance(name, FloatFormat):
        return name
    fmt = _registered.get(name)
    if fmt is not None:
        return fmt
    for pattern, make in _FAMILIES:
        mt = pattern.match(name)
        if mt:
            return make(mt)
    families = ["cfp8_143_b<0..63>", "cfp8_152_b<0..63>", "cfp16_shp_b<0..63>"]
    raise UnknownNameError("format", name, [*_registered, *families])


def known() -> Iterator[FloatFormat]:
    """Every registered format (parametric families are listed by :func:`get` only)."""
    return iter(sorted(_registered.values(), key=lambda f: (-f.bits, f.name)))
