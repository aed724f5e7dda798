"""Backend specs: what a chip offers, as validated data.

A :class:`BackendSpec` has four parts, each a frozen dataclass validated on construction:
:class:`PrecisionSemantics` (formats per op class, accumulators, rounding, features),
:class:`MemoryHierarchy` (tiers), :class:`Interconnect` (topology and collectives) and
:class:`Compute` (peak FLOP/s per format). Every figure should carry a source: ``sources``
and ``assumptions`` map field paths (glob patterns such as ``"memory.tiers.hbm.*"``) to a
citation or to the reason a figure is assumed. Units: bytes, bytes/s, seconds, FLOP/s;
spec files may write them as strings (``"80 GB"``, ``"3.35 TB/s"``, ``"2 us"``).

A spec round-trips through :meth:`BackendSpec.to_dict` / :meth:`BackendSpec.from_dict`;
:func:`load_spec` reads the same schema from TOML (docs/spec-format.md) and reports bad
fields with their line in the file.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, get_args

from hwport import formats as _formats
from hwport.errors import FormatError, SpecError, UnknownNameError
from hwport.formats import FloatFormat

ROUNDING_MODES = ("nearest", "stochastic", "toward_zero")
FEATURES = (
    "dynamic_loss_scaling",  # inf/NaN checks of gradients and skipped steps in the stack
    "fp8_per_tensor_scaling",  # scaled 8-bit matmuls with per-tensor scale factors
    "configurable_exponent_bias",  # per-tensor exponent bias of 8/16-bit formats (Dojo)
    "exception_flags",  # overflow/underflow/invalid flags readable by software
)
Scope = Literal["core", "chip", "node", "host"]
Managed = Literal["explicit", "cached", "staging"]
Topology = Literal["ring", "mesh2d", "torus2d", "switch"]
COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "send_recv",
               "all_to_all")
ALGORITHMS = ("ring", "tree", "mesh2d", "direct")
_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")

Problem = tuple[str, Any, str]  # (field path, value, what is wrong)


def _fail(problems: list[Problem], where: str = "") -> None:
    if problems:
        raise SpecError.from_problems(problems, where)


def _positive(problems: list[Problem], path: str, v: Any, *, zero: bool = False,
              integer: bool = False) -> None:
    ok_type = isinstance(v, int) if integer else isinstance(v, int | float)
    if isinstance(v, bool) or not ok_type:
        problems.append((path, v, "must be an integer" if integer else "must be a number"))
    elif math.isnan(v) or (v < 0 if zero else v <= 0):
        problems.append((path, v, "must be >= 0" if zero else "must be > 0"))


def _known_format(name: str, own: Mapping[str, FloatFormat]) -> bool:
    if name in own:
        return True
    try:
        _formats.get(name)
    except (UnknownNameError, FormatError):
        return False
    return True


def _seq(obj: Any, name: str, p: list[Problem]) -> None:
    """Normalise the list field ``name`` of a frozen dataclass to a tuple."""
    v = getattr(obj, name)
    if isinstance(v, str | bytes) or not isinstance(v, Sequence):
        p.append((name, v, "must be a list"))
        v = ()
    object.__setattr__(obj, name, tuple(v))


def _map(obj: Any, name: str, p: list[Problem]) -> None:
    """Normalise the table field ``name`` of a frozen dataclass to a read-only mapping."""
    v = getattr(obj, name)
    if not isinstance(v, Mapping):
        p.append((name, v, "must be a table (key = value pairs)"))
        v = {}
    object.__setattr__(obj, name, MappingProxyType(dict(v)))


@dataclass(frozen=True, eq=True)
class PrecisionSemantics:
    """What the hardware does with numbers.

    ``formats``: every format it stores and computes in. ``matmul_inputs``: formats its
    matrix units accept; ``accumulators`` maps each to the format partial sums are kept in,
    and ``accumulation_interval`` (if set) is the number of products summed in that format
    before the partial sum is added into an fp32 total. ``elementwise``: formats of vector
    units. ``rounding``: modes the hardware can round results with, with
    ``stochastic_rounding_bits`` random bits when stochastic. ``flush_to_zero``: subnormal
    results become zero. ``features``: mixed-precision features it provides (see FEATURES).
    """

    formats: tuple[str, ...]
    matmul_inputs: tuple[str, ...]
    accumulators: Mapping[str, str]
    elementwise: tuple[str, ...]
    rounding: tuple[str, ...] = ("nearest",)
    stochastic_rounding_bits: int | None = None
    accumulation_interval: int | None = None
    flush_to_zero: bool = False
    features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        p: list[Problem] = []
        for name in ("formats", "matmul_inputs", "elementwise", "rounding", "features"):
            _seq(self, name, p)
        _map(self, "accumulators", p)
        _fail(p)  # shapes first: the checks below assume them
        if not self.formats:
            p.append(("formats", self.formats, "must list at least one format"))
        for group in ("matmul_inputs", "elementwise"):
            for f in getattr(self, group):
                if f not in self.formats:
                    p.append((group, f, f"{f!r} is not in formats {list(self.formats)}"))
        for f in self.matmul_inputs:
            if f not in self.accumulators:
                p.append((f"accumulators.{f}", None, "every matmul input needs an accumulator"))
        for r in self.rounding:
            if r not in ROUNDING_MODES:
                p.append(("rounding", r, f"must be one of {list(ROUNDING_MODES)}"))
        if "nearest" not in self.rounding:
            p.append(("rounding", self.rounding, "must include 'nearest'"))
        if "stochastic" in self.rounding:
            bits = self.stochastic_rounding_bits
            if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 24:
                p.append(("stochastic_rounding_bits", bits,
                          "stochastic rounding needs a number of random bits in 1..24"))
        elif self.stochastic_rounding_bits is not None:
            p.append(("stochastic_rounding_bits", self.stochastic_rounding_bits,
                      "set, but 'stochastic' is not in rounding"))
        if self.accumulation_interval is not None:
            _positive(p, "accumulation_interval", self.accumulation_interval, integer=True)
        for feat in self.features:
            if feat not in FEATURES:
                p.append(("features", feat, f"unknown feature; known: {list(FEATURES)}"))
        if not isinstance(self.flush_to_zero, bool):
            p.append(("flush_to_zero", self.flush_to_zero, "must be true or false"))
        _fail(p)

    @property
    def stochastic_rounding(self) -> bool:
        """Whether the hardware can round stochastically."""
        return "stochastic" in self.rounding


@dataclass(frozen=True)
class MemoryTier:
    """One level of memory: ``count`` instances of ``capacity`` bytes each per device.

    ``bandwidth`` (bytes/s) and ``latency`` (s) are per device, all instances together.
    ``scope`` says who shares one instance; ``managed`` is ``explicit`` (software places
    data, and it may stay there across a step, as in a dataflow chip's SRAM), ``cached``
    (hardware-managed: it holds copies of a slower tier's data) or ``staging`` (software
    places data only for the duration of one kernel, as in a GPU's shared memory: nothing
    resides there). Only ``explicit`` tiers hold a memory plan's resident data.
    """

    name: str
    capacity: float
    bandwidth: float
    latency: float
    scope: Scope
    managed: Managed = "explicit"
    count: int = 1

    def __post_init__(self) -> None:
        p: list[Problem] = []
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            p.append(("name", self.name, f"must match {_NAME.pattern}"))
        _positive(p, "capacity", self.capacity)
        _positive(p, "bandwidth", self.bandwidth)
        _positive(p, "latency", self.latency, zero=True)
        _positive(p, "count", self.count, integer=True)
        if self.scope not in get_args(Scope):
            p.append(("scope", self.scope, f"must be one of {list(get_args(Scope))}"))
        if self.managed not in get_args(Managed):
            p.append(("managed", self.managed, f"must be one of {list(get_args(Managed))}"))
        _fail(p)

    @property
    def total_capacity(self) -> float:
        """Bytes of this tier per device, all instances together."""
        return self.capacity * self.count


@dataclass(frozen=True)
class MemoryHierarchy:
    """Memory tiers of one device, fastest first."""

    tiers: tuple[MemoryTier, ...]

    def __post_init__(self) -> None:
        p: list[Problem] = []
        _seq(self, "tiers", p)
        _fail(p)  # shapes first: the checks below assume them
        if not self.tiers:
            p.append(("tiers", (), "must list at least one tier"))
        names = [t.name for t in self.tiers]
        for n in {n for n in names if names.count(n) > 1}:
            p.append(("tiers", n, "tier names must be unique"))
        for i in range(1, len(self.tiers)):
            if self.tiers[i].bandwidth > self.tiers[i - 1].bandwidth:
                p.append((f"tiers[{i}].bandwidth", self.tiers[i].bandwidth,
                          f"tiers go fastest first, but {self.tiers[i].name!r} is faster than "
                          f"{self.tiers[i - 1].name!r}"))
        _fail(p)

    def tier(self, name: str) -> MemoryTier:
        """The tier called ``name``."""
        for t in self.tiers:
            if t.name == name:
                return t
        raise UnknownNameError("memory tier", name, [t.name for t in self.tiers])


@dataclass(frozen=True)
class Interconnect:
    """How devices talk: a topology of ``devices`` with per-link bandwidth and latency.

    ``link_bandwidth`` is bytes/s per direction of one link; ``links`` is the number of
    such links per device (their bandwidths add). ``shape`` gives the mesh or torus
    dimensions. ``collectives`` maps each supported collective to its algorithms;
    reductions are computed in ``reduction_format``. ``scale_out_bandwidth`` and
    ``scale_out_latency`` describe the network between groups of ``devices`` (0: none).
    """

    topology: Topology
    devices: int
    link_bandwidth: float
    link_latency: float
    collectives: Mapping[str, tuple[str, ...]]
    reduction_format: str
    links: int = 1
    shape: tuple[int, ...] = ()
    scale_out_bandwidth: float = 0.0
    scale_out_latency: float = 0.0

    def __post_init__(self) -> None:
        p: list[Problem] = []
        _seq(self, "shape", p)
        _map(self, "collectives", p)
        algos_by_op = {}
        for op, algos in self.collectives.items():
            if isinstance(algos, str) or not isinstance(algos, Sequence):
                p.append((f"collectives.{op}", algos, "must be a list of algorithms"))
                algos = ()
            algos_by_op[op] = tuple(algos)
        object.__setattr__(self, "collectives", MappingProxyType(algos_by_op))
        _fail(p)  # shapes first: the checks below assume them
        if self.topology not in get_args(Topology):
            p.append(("topology", self.topology, f"must be one of {list(get_args(Topology))}"))
        _positive(p, "devices", self.devices, integer=True)
        _positive(p, "link_bandwidth", self.link_bandwidth)
        _positive(p, "link_latency", self.link_latency, zero=True)
        _positive(p, "links", self.links, integer=True)
        _positive(p, "scale_out_bandwidth", self.scale_out_bandwidth, zero=True)
        _positive(p, "scale_out_latency", self.scale_out_latency, zero=True)
        if self.topology in ("mesh2d", "torus2d") and (
                len(self.shape) != 2 or math.prod(self.shape) != self.devices):
            p.append(("shape", list(self.shape),
                      f"a {self.topology} needs two dimensions whose product is devices "
                      f"({self.devices})"))
        for op, algos in self.collectives.items():
            if op not in COLLECTIVES:
                p.append((f"collectives.{op}", list(algos),
                          f"unknown collective; known: {list(COLLECTIVES)}"))
            for a in algos:
                if a not in ALGORITHMS:
                    p.append((f"collectives.{op}", a,
                              f"unknown algorithm; known: {list(ALGORITHMS)}"))
            if not algos:
                p.append((f"collectives.{op}", [], "must list at least one algorithm"))
        if "mesh2d" in sum(self.collectives.values(), ()) and self.topology not in (
                "mesh2d", "torus2d"):
            p.append(("collectives", "mesh2d", f"needs a mesh topology, not {self.topology}"))
        _fail(p)


@dataclass(frozen=True)
class Compute:
    """Dense peak FLOP/s per format of the matmul inputs (or vector units for others)."""

    peak_flops: Mapping[str, float]

    def __post_init__(self) -> None:
        p: list[Problem] = []
        _map(self, "peak_flops", p)
        _fail(p)  # shapes first: the checks below assume them
        if not self.peak_flops:
            p.append(("peak_flops", {}, "must give at least one format's peak"))
        for k, v in self.peak_flops.items():
            _positive(p, f"peak_flops.{k}", v)
        _fail(p)


@dataclass(frozen=True)
class BackendSpec:
    """A hardware backend: precision, memory, interconnect and compute, with sources.

    ``formats`` defines formats of this spec's own (a chip's custom 8-bit format, say);
    every format name the spec uses must be one of these or a registered format.
    ``sources`` and ``assumptions`` map field-path patterns to citations and reasons.
    """

    name: str
    description: str
    precision: PrecisionSemantics
    memory: MemoryHierarchy
    interconnect: Interconnect
    compute: Compute
    sources: Mapping[str, str] = field(default_factory=dict)
    assumptions: Mapping[str, str] = field(default_factory=dict)
    formats: tuple[FloatFormat, ...] = ()

    def __post_init__(self) -> None:
        p: list[Problem] = []
        _map(self, "sources", p)
        _map(self, "assumptions", p)
        _seq(self, "formats", p)
        _fail(p, self._where())  # shapes first: the checks below assume them
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            p.append(("name", self.name, f"must match {_NAME.pattern}"))
        parts = (("precision", PrecisionSemantics), ("memory", MemoryHierarchy),
                 ("interconnect", Interconnect), ("compute", Compute))
        for part, cls in parts:
            if not isinstance(getattr(self, part), cls):
                p.append((part, type(getattr(self, part)).__name__, f"must be a {cls.__name__}"))
        for i, f in enumerate(self.formats):
            if not isinstance(f, FloatFormat):
                p.append((f"formats[{i}]", f, "must be a FloatFormat"))
        _fail(p, self._where())
        own = self.own_formats
        prec = self.precision
        for fname in prec.formats:
            if not _known_format(fname, own):
                p.append(("precision.formats", fname,
                          "unknown format (define it in the spec's formats or register it)"))
        for src, acc in prec.accumulators.items():
            if not _known_format(acc, own):
                p.append((f"precision.accumulators.{src}", acc, "unknown format"))
        if self.interconnect.reduction_format not in prec.formats:
            p.append(("interconnect.reduction_format", self.interconnect.reduction_format,
                      f"must be one of precision.formats {list(prec.formats)}"))
        for fname in self.compute.peak_flops:
            if fname not in prec.formats:
                p.append((f"compute.peak_flops.{fname}", self.compute.peak_flops[fname],
                          f"{fname!r} is not in precision.formats"))
        figures = list(self.figures())
        for table in ("sources", "assumptions"):
            for pattern, text in getattr(self, table).items():
                if not isinstance(text, str) or not text.strip():
                    p.append((f"{table}.{pattern}", text, "must be a non-empty text"))
                if not any(fnmatch.fnmatchcase(f, pattern) for f in figures):
                    p.append((f"{table}.{pattern}", text,
                              "matches no figure of the spec (see BackendSpec.figures())"))
        _fail(p, self._where())

    def _where(self) -> str:
        return f"backend spec {self.name!r}"

    @property
    def own_formats(self) -> dict[str, FloatFormat]:
        """The formats this spec defines itself, by name."""
        return {f.name: f for f in self.formats}

    def format(self, name: str) -> FloatFormat:
        """The format called ``name``, as this spec knows it."""
        return self.own_formats.get(name) or _formats.get(name)

    # -- provenance ---------------------------------------------------------------------
    def figures(self) -> Iterator[str]:
        """Paths of every figure in the spec (what sources and assumptions must cover)."""
        prec = self.precision
        for f in fields(PrecisionSemantics):
            if f.name == "accumulators":
                yield from (f"precision.accumulators.{k}" for k in prec.accumulators)
            else:
                yield f"precision.{f.name}"
        for t in self.memory.tiers:
            yield from (f"memory.tiers.{t.name}.{f.name}" for f in fields(MemoryTier)
                        if f.name != "name")
        for f in fields(Interconnect):
            if f.name == "collectives":
                yield from (f"interconnect.collectives.{k}" for k in self.interconnect.collectives)
            else:
                yield f"interconnect.{f.name}"
        yield from (f"compute.peak_flops.{k}" for k in self.compute.peak_flops)

    def provenance(self, figure: str) -> tuple[str, str] | None:
        """``("source", citation)`` or ``("assumption", why)`` for a figure path, or None."""
        for kind, table in (("source", self.sources), ("assumption", self.assumptions)):
            for pattern, text in table.items():
                if fnmatch.fnmatchcase(figure, pattern):
                    return kind, text
        return None

    def unsourced(self) -> list[str]:
        """Figures that neither a source nor an assumption covers."""
        return [f for f in self.figures() if self.provenance(f) is None]

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data (the TOML schema); ``from_dict`` inverts it."""
        plain: dict[str, Any] = _plain(self)
        return plain

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "") -> BackendSpec:
        """Build a spec from plain data. Every bad field of a part is named in one
        SpecError; checks across parts (format names, sources patterns) run once the parts
        themselves are valid."""
        return _build(data, where)

    @property
    def capabilities(self) -> frozenset[str]:
        """What the backend declares it has, as names tests can require: its features,
        ``stochastic_rounding``, ``flush_to_zero``, ``format:<name>`` for each format,
        ``matmul:<name>`` for each matmul input, ``collective:<op>`` for each collective."""
        prec = self.precision
        caps = set(prec.features)
        caps |= {f"format:{f}" for f in prec.formats}
        caps |= {f"matmul:{f}" for f in prec.matmul_inputs}
        caps |= {f"collective:{op}" for op in self.interconnect.collectives}
        if prec.stochastic_rounding:
            caps.add("stochastic_rounding")
        if prec.flush_to_zero:
            caps.add("flush_to_zero")
        return frozenset(caps)


def _plain(obj: Any) -> Any:
    if isinstance(obj, FloatFormat):
        d = obj.to_dict()
        return {f.name: d[f.name] for f in fields(FloatFormat)}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and math.isinf(obj):
        return "inf" if obj > 0 else "-inf"  # valid JSON and TOML strings; read back as inf
    return obj


# -- building from plain data, with units and field paths --------------------------------
_UNITS = {
    "bytes": {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "PB": 1e15,
              "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40},
    "rate": {"B/s": 1, "KB/s": 1e3, "MB/s": 1e6, "GB/s": 1e9, "TB/s": 1e12,
             "Gb/s": 1e9 / 8, "Tb/s": 1e12 / 8},
    "seconds": {"s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9},
    "flops": {"FLOP/s": 1, "GFLOP/s": 1e9, "TFLOP/s": 1e12, "PFLOP/s": 1e15,
              "GFLOPS": 1e9, "TFLOPS": 1e12, "PFLOPS": 1e15},
}
def si(value: float, unit: str) -> str:
    """``value`` with an SI prefix, the inverse of :func:`parse_quantity` for people:
    si(3.35e12, "B/s") == "3.35 TB/s"; inf is "unbounded", NaN "n/a"."""
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "unbounded"
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.4g} {prefix}{unit}"
    return f"{value:.4g} {unit}"


def seconds(value: float) -> str:
    """A duration in s, ms, us, ns or ps ("0" for zero; inf is "unbounded", NaN "n/a")."""
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "unbounded"
    for factor, unit in ((1, "s"), (1e-3, "ms"), (1e-6, "us"), (1e-9, "ns"), (1e-12, "ps")):
        if value >= factor:
            return f"{value / factor:.3g} {unit}"
    return "0" if value == 0 else f"{value:.3g} s"


_QUANTITY = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|inf)\s*([A-Za-zµ/]*)\s*$")


def parse_quantity(value: Any, kind: str) -> float:
    """A number, or a string with a unit of ``kind`` (bytes, rate, seconds, flops)."""
    if isinstance(value, bool):
        raise ValueError("must be a number")
    if isinstance(value, int | float):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a number or a string with a unit")
    mt = _QUANTITY.match(value)
    units = _UNITS[kind]
    if not mt or (mt[2] and mt[2] not in units):
        raise ValueError(f"cannot read {value!r} as {kind}; units: {', '.join(units)}")
    return float(mt[1]) * (units[mt[2]] if mt[2] else 1)


_KINDS = {
    ("MemoryTier", "capacity"): "bytes", ("MemoryTier", "bandwidth"): "rate",
    ("MemoryTier", "latency"): "seconds", ("Interconnect", "link_bandwidth"): "rate",
    ("Interconnect", "link_latency"): "seconds", ("Interconnect", "scale_out_bandwidth"): "rate",
    ("Interconnect", "scale_out_latency"): "seconds",
}


def _construct(cls: Any, data: Any, path: str, problems: list[Problem]) -> Any:
    """``cls(**data)`` with unknown/missing keys and field errors recorded under ``path``."""
    prefix = f"{path}." if path else ""
    if not isinstance(data, Mapping):
        problems.append((path or cls.__name__, data, "must be a table"))
        return None
    names = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        if k not in names:
            problems.append((prefix + k, v, f"unknown field; {cls.__name__} has {sorted(names)}"))
            continue
        kind = _KINDS.get((cls.__name__, k))
        if cls is Compute and k == "peak_flops" and isinstance(v, Mapping):
            peaks = {}
            for fk, fv in v.items():
                try:
                    peaks[fk] = parse_quantity(fv, "flops")
                except ValueError as e:
                    problems.append((f"{prefix}{k}.{fk}", fv, str(e)))
            if len(peaks) < len(v):
                continue
            v = peaks
        elif kind is not None:
            try:
                v = parse_quantity(v, kind)
            except ValueError as e:
                problems.append((prefix + k, v, str(e)))
                continue
        kwargs[k] = v
    missing = [n for n, f in names.items() if n not in kwargs and n not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for n in missing:
        problems.append((prefix + n, None, "missing"))
    if missing or len(kwargs) < len([k for k in data if k in names]):
        return None
    try:
        return cls(**kwargs)
    except SpecError as e:
        problems.extend((prefix + fp, v, msg) for fp, v, msg in e.problems)
    except (FormatError, TypeError) as e:
        problems.append((path or cls.__name__, None, str(e)))
    return None


def _build(data: Mapping[str, Any], where: str) -> BackendSpec:
    problems: list[Problem] = []
    if not isinstance(data, Mapping):
        raise SpecError.from_problems([("", data, "a spec must be a table")], where)
    parts: dict[str, Any] = dict(data)
    precision = _construct(PrecisionSemantics, data.get("precision", {}), "precision", problems)
    mem = data.get("memory")
    tiers_data = mem.get("tiers") if isinstance(mem, Mapping) else None
    memory = None
    if not isinstance(tiers_data, list):
        problems.append(("memory.tiers", tiers_data, "must be a list of tiers ([[memory.tiers]])"))
    else:
        extra = set(data["memory"]) - {"tiers"}
        problems.extend((f"memory.{k}", data["memory"][k], "unknown field") for k in extra)
        tiers = [_construct(MemoryTier, t, f"memory.tiers[{i}]", problems)
                 for i, t in enumerate(tiers_data)]
        if all(t is not None for t in tiers):
            memory = _construct(MemoryHierarchy, {"tiers": tiers}, "memory", problems)
    interconnect = _construct(Interconnect, data.get("interconnect", {}), "interconnect", problems)
    compute = _construct(Compute, data.get("compute", {}), "compute", problems)
    own_data = data.get("formats", [])
    if not isinstance(own_data, list):
        problems.append(("formats", own_data, "must be a list of formats ([[formats]])"))
        own_data = []
    own = [_construct(FloatFormat, f, f"formats[{i}]", problems) for i, f in enumerate(own_data)]
    known = {f.name for f in fields(BackendSpec)}
    problems.extend((k, v, f"unknown field; a spec has {sorted(known)}")
                    for k, v in data.items() if k not in known)
    for k in ("name", "description"):
        if k not in data:
            problems.append((k, None, "missing"))
    if problems:
        raise SpecError.from_problems(problems, where)
    parts.update(precision=precision, memory=memory, interconnect=interconnect,
                 compute=compute, formats=tuple(own))
    return BackendSpec(**parts)


def load_spec(path: str | Path) -> BackendSpec:
    """Read a backend spec from a TOML file; errors name the file, line and field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(f"{path}: cannot read spec file: {e.strerror or e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: malformed TOML: {e}") from None
    try:
        return BackendSpec.from_dict(data)
    except SpecError as e:
        lines = _key_lines(text)
        raise SpecError.from_problems(e.problems, str(path), lambda p: _line_of(p, lines)) from None


def _key_lines(text: str) -> dict[str, int]:
    """Map TOML key paths (``a.b[1].c``) to the line that defines them."""
    out: dict[str, int] = {}
    table = ""
    counts: dict[str, int] = {}
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip() if not raw.strip().startswith('"') else raw.strip()
        if mt := re.match(r"^\[\[\s*([^\]]+?)\s*\]\]", line):
            key = mt[1].replace('"', "")
            counts[key] = counts.get(key, -1) + 1
            table = f"{key}[{counts[key]}]"
            out.setdefault(table, no)
        elif mt := re.match(r"^\[\s*([^\]]+?)\s*\]", line):
            table = mt[1].replace('"', "")
            out.setdefault(table, no)
        elif mt := re.match(r'^("[^"]*"|[A-Za-z0-9_.-]+)\s*=', line):
            key = mt[1].strip('"')
            out.setdefault(f"{table}.{key}" if table else key, no)
    return out


def _line_of(problem_path: str, lines: dict[str, int]) -> int | None:
    parts = problem_path.split(".")
    while parts:
        hit = lines.get(".".join(parts))
        if hit is not None:
            return hit
        parts.pop()
    return None
