"""Backend specs: validation, provenance, round trips, units and TOML spec files."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import hwport
from hwport import HwportError, SpecError
from hwport.plugins import Registry
from hwport.spec import BackendSpec, MemoryHierarchy, parse_quantity

REPO = Path(__file__).parents[1]
EXAMPLE = REPO / "docs" / "examples" / "mychip.toml"
BUILTIN = ("reference", "simgpu", "dojo", "dataflow")

# A complete, valid spec file for a small custom chip (also in docs/examples/mychip.toml).
MYCHIP_TOML = """\
# mychip: a small custom accelerator, as an hwport backend spec.
# Load it with `hwport show docs/examples/mychip.toml` or `hwport.load_spec(path)`.
# Sizes, rates and times may be numbers (bytes, bytes/s, seconds, FLOP/s) or strings
# with a unit. Every figure needs a [sources] or an [assumptions] entry.
name = "mychip"
description = "A small custom accelerator: bf16 and its own 8-bit format, SRAM + HBM, 4x4 mesh."

# A format of this chip's own, usable by name in the rest of the spec.
[[formats]]
name = "my8"
exponent_bits = 4
mantissa_bits = 3
bias = 8
subnormals = true
inf = false
nan = "none"
overflow = "saturate"
subnormal_exponent = "ieee"
description = "mychip 8-bit: E4M3 with bias 8, no inf or NaN, overflow saturates"

[precision]
formats = ["fp32", "bf16", "my8"]
matmul_inputs = ["bf16", "my8"]
elementwise = ["fp32", "bf16"]
rounding = ["nearest", "stochastic"]
stochastic_rounding_bits = 8
accumulation_interval = 128
flush_to_zero = false
features = ["fp8_per_tensor_scaling"]

[precision.accumulators]
bf16 = "fp32"
my8 = "fp32"

# Memory tiers, fastest first.
[[memory.tiers]]
name = "sram"
capacity = "1.25 MiB"
count = 64
bandwidth = "20 TB/s"
latency = "5 ns"
scope = "core"
managed = "explicit"

[[memory.tiers]]
name = "hbm"
capacity = "32 GB"
bandwidth = "1.2 TB/s"
latency = "500 ns"
scope = "chip"
managed = "explicit"

[interconnect]
topology = "mesh2d"
devices = 16
shape = [4, 4]
links = 4
link_bandwidth = "100 GB/s"
link_latency = "1 us"
reduction_format = "fp32"
scale_out_bandwidth = "400 Gb/s"
scale_out_latency = "5 us"

[interconnect.collectives]
all_reduce = ["mesh2d", "ring"]
reduce_scatter = ["ring"]
all_gather = ["ring"]
send_recv = ["direct"]

[compute.peak_flops]
fp32 = "12.5 TFLOP/s"
bf16 = "200 TFLOP/s"
my8 = "400 TFLOP/s"

# Keys are field paths or glob patterns over them; quote them (they contain dots).
[sources]
"precision.*" = "mychip ISA manual rev 1.2, chapter 3 (number formats and rounding)"
"memory.tiers.sram.*" = "mychip datasheet rev 1.0, table 2 (on-chip SRAM)"
"memory.tiers.hbm.capacity" = "mychip datasheet rev 1.0, table 3 (HBM2e, 2 stacks)"
"memory.tiers.hbm.bandwidth" = "mychip datasheet rev 1.0, table 3"
"memory.tiers.hbm.scope" = "mychip datasheet rev 1.0, table 3"
"memory.tiers.hbm.managed" = "mychip programming guide, section 5 (explicit DMA)"
"memory.tiers.hbm.count" = "mychip datasheet rev 1.0, table 3"
"interconnect.topology" = "mychip system guide: 16 chips in a 4x4 mesh"
"interconnect.devices" = "mychip system guide: 16 chips in a 4x4 mesh"
"interconnect.shape" = "mychip system guide: 16 chips in a 4x4 mesh"
"interconnect.links" = "mychip datasheet: four mesh links per chip"
"interconnect.link_bandwidth" = "mychip datasheet: 100 GB/s per link per direction"
"interconnect.collectives.*" = "mychip collectives library documentation"
"interconnect.scale_out_bandwidth" = "mychip system guide: one 400 Gb/s NIC per chip"
"compute.peak_flops.bf16" = "mychip datasheet rev 1.0, table 1 (dense)"
"compute.peak_flops.my8" = "mychip datasheet rev 1.0, table 1 (dense)"

[assumptions]
"memory.tiers.hbm.latency" = "not published: about 500 ns assumed"
"interconnect.link_latency" = "not published: 1 us per collective step assumed"
"interconnect.reduction_format" = "not published: fp32 reductions assumed"
"interconnect.scale_out_latency" = "not published: 5 us per step assumed"
"compute.peak_flops.fp32" = "not published: 1/16 of the bf16 rate assumed"
"""


def spec(name: str) -> BackendSpec:
    return hwport.get_backend(name)


def line_of(text: str, startswith: str, nth: int = 0) -> int:
    """1-based number of the ``nth`` line of ``text`` that starts with ``startswith``."""
    hits = [no for no, line in enumerate(text.splitlines(), 1) if line.startswith(startswith)]
    assert len(hits) > nth, f"{startswith!r} not in the text"
    return hits[nth]


def accumulators_as_list() -> str:
    """MYCHIP_TOML with ``accumulators = ["fp32"]``: a list where a table belongs."""
    text = MYCHIP_TOML.replace('[precision.accumulators]\nbf16 = "fp32"\nmy8 = "fp32"\n', "")
    new = 'flush_to_zero = false\naccumulators = ["fp32"]\n'
    assert text != MYCHIP_TOML
    return text.replace("flush_to_zero = false\n", new)


def write(tmp_path: Path, text: str, name: str = "chip.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- the built-in backends ---------------------------------------------------------------
def test_builtin_backends_are_listed() -> None:
    assert set(BUILTIN) <= {s.name for s in hwport.list_backends()}


def test_round_trips_through_dict(hwport_backend: BackendSpec) -> None:
    s = hwport_backend
    assert isinstance(s, BackendSpec)
    d = s.to_dict()
    assert BackendSpec.from_dict(d) == s
    # also through JSON text: strict JSON (no NaN/Infinity), and it reads back equal
    text = json.dumps(d, allow_nan=False)
    assert BackendSpec.from_dict(json.loads(text)) == s
    assert BackendSpec.from_dict(json.loads(text)).to_dict() == d


def test_figures_all_have_provenance(hwport_backend: BackendSpec) -> None:
    s = hwport_backend
    assert s.unsourced() == []
    for figure in s.figures():
        kind, text = s.provenance(figure)  # type: ignore[misc]
        assert kind in ("source", "assumption")
        assert text.strip()


@pytest.mark.parametrize(("name", "figure", "kind"), [
    ("dojo", "memory.tiers.dip_hbm.capacity", "assumption"),
    ("dojo", "compute.peak_flops.cfp16_shp_b15", "assumption"),
    ("dojo", "memory.tiers.sram.capacity", "source"),
    ("simgpu", "compute.peak_flops.bf16", "source"),
    ("simgpu", "memory.tiers.l2.bandwidth", "assumption"),
    ("dataflow", "precision.stochastic_rounding_bits", "assumption"),
    ("reference", "memory.tiers.ideal.capacity", "assumption"),
    ("reference", "precision.formats", "source"),
])
def test_assumptions_are_marked(name: str, figure: str, kind: str) -> None:
    prov = spec(name).provenance(figure)
    assert prov is not None
    assert prov[0] == kind
    assert isinstance(prov[1], str) and prov[1]


def test_provenance_of_unknown_figure_is_none() -> None:
    assert spec("simgpu").provenance("memory.tiers.nosuch.capacity") is None


def test_replace_gives_a_registrable_spec() -> None:
    variant = dataclasses.replace(spec("simgpu"), name="x")
    assert variant.name == "x"
    assert variant.unsourced() == []
    reg = Registry()
    reg.register(variant)
    got = reg.get("x")
    assert got.spec is variant
    assert got.name == "x"
    with pytest.raises(HwportError, match="'x'"):
        reg.register(dataclasses.replace(spec("dojo"), name="x"))
    assert reg.get("x").spec is variant


def test_register_rejects_non_specs() -> None:
    with pytest.raises(TypeError):
        Registry().register({"name": "x"})  # type: ignore[arg-type]


def test_register_does_not_touch_the_process_registry() -> None:
    Registry().register(dataclasses.replace(spec("reference"), name="only-here"))
    with pytest.raises(hwport.UnknownNameError):
        hwport.get_backend("only-here")


# -- invalid fields: Python dataclasses and from_dict -------------------------------------
Make = Callable[[], Any]
Mutate = Callable[[dict[str, Any]], None]


def _sim_tier(i: int, **changes: Any) -> Make:
    return lambda: dataclasses.replace(spec("simgpu").memory.tiers[i], **changes)


def _sim_prec(**changes: Any) -> Make:
    return lambda: dataclasses.replace(spec("simgpu").precision, **changes)


def _dojo_ic(**changes: Any) -> Make:
    return lambda: dataclasses.replace(spec("dojo").interconnect, **changes)


def _sim_tiers(order: tuple[int, ...], rename: dict[int, str] | None = None) -> Make:
    def make() -> Any:
        tiers = spec("simgpu").memory.tiers
        picked = [dataclasses.replace(tiers[i], name=(rename or {}).get(i, tiers[i].name))
                  for i in order]
        return dataclasses.replace(spec("simgpu").memory, tiers=tuple(picked))
    return make


def _set(*path: Any) -> Mutate:
    *keys, last, value = path

    def mutate(d: dict[str, Any]) -> None:
        for k in keys:
            d = d[k]
        d[last] = value
    return mutate


def _swap_sim_tiers(d: dict[str, Any]) -> None:
    tiers = d["memory"]["tiers"]
    tiers[1], tiers[2] = tiers[2], tiers[1]


def _drop_accumulator(d: dict[str, Any]) -> None:
    del d["precision"]["accumulators"]["bf16"]


def _add_matmul_input(d: dict[str, Any]) -> None:
    d["precision"]["matmul_inputs"].append("fp64")
    d["precision"]["accumulators"]["fp64"] = "fp32"


SIM_ACC = dict(spec("simgpu").precision.accumulators)
SIM_MM = spec("simgpu").precision.matmul_inputs
DOJO_COLL = dict(spec("dojo").interconnect.collectives)

# (id, base backend, dataclass builder, dict mutation, dataclass path, dict path, value,
#  text the message must show for the value)
BAD: list[tuple[str, str, Make, Mutate, str, str, Any, str]] = [
    ("negative tier bandwidth", "simgpu",
     _sim_tier(2, bandwidth=-3.0e12), _set("memory", "tiers", 2, "bandwidth", -3.0e12),
     "bandwidth", "memory.tiers[2].bandwidth", -3.0e12, "-3000000000000.0"),
    ("zero capacity", "simgpu",
     _sim_tier(2, capacity=0), _set("memory", "tiers", 2, "capacity", 0),
     "capacity", "memory.tiers[2].capacity", 0, "= 0"),
    ("unknown scope", "simgpu",
     _sim_tier(1, scope="rack"), _set("memory", "tiers", 1, "scope", "rack"),
     "scope", "memory.tiers[1].scope", "rack", "'rack'"),
    ("matmul input not in formats", "simgpu",
     _sim_prec(matmul_inputs=(*SIM_MM, "fp64"), accumulators={**SIM_ACC, "fp64": "fp32"}),
     _add_matmul_input, "matmul_inputs", "precision.matmul_inputs", "fp64", "'fp64'"),
    ("matmul input without accumulator", "simgpu",
     _sim_prec(accumulators={k: v for k, v in SIM_ACC.items() if k != "bf16"}),
     _drop_accumulator, "accumulators.bf16", "precision.accumulators.bf16", None, "bf16"),
    ("unknown rounding mode", "simgpu",
     _sim_prec(rounding=("nearest", "round_up")),
     _set("precision", "rounding", ["nearest", "round_up"]),
     "rounding", "precision.rounding", "round_up", "'round_up'"),
    ("stochastic rounding without bits", "simgpu",
     _sim_prec(rounding=("nearest", "stochastic")),
     _set("precision", "rounding", ["nearest", "stochastic"]),
     "stochastic_rounding_bits", "precision.stochastic_rounding_bits", None, "stochastic"),
    ("unknown feature", "simgpu",
     _sim_prec(features=("dynamic_loss_scaling", "warp_drive")),
     _set("precision", "features", ["dynamic_loss_scaling", "warp_drive"]),
     "features", "precision.features", "warp_drive", "'warp_drive'"),
    ("mesh2d shape product", "dojo",
     _dojo_ic(shape=(5, 4)), _set("interconnect", "shape", [5, 4]),
     "shape", "interconnect.shape", [5, 4], "[5, 4]"),
    ("unknown collective", "dojo",
     _dojo_ic(collectives={**DOJO_COLL, "all_shout": ("ring",)}),
     _set("interconnect", "collectives", "all_shout", ["ring"]),
     "collectives.all_shout", "interconnect.collectives.all_shout", ["ring"], "['ring']"),
    ("unknown algorithm", "dojo",
     _dojo_ic(collectives={**DOJO_COLL, "all_reduce": ("ring", "telepathy")}),
     _set("interconnect", "collectives", "all_reduce", ["ring", "telepathy"]),
     "collectives.all_reduce", "interconnect.collectives.all_reduce", "telepathy",
     "'telepathy'"),
    ("reduction_format not in formats", "dojo",
     lambda: dataclasses.replace(spec("dojo"), interconnect=dataclasses.replace(
         spec("dojo").interconnect, reduction_format="fp16")),
     _set("interconnect", "reduction_format", "fp16"),
     "interconnect.reduction_format", "interconnect.reduction_format", "fp16", "'fp16'"),
    ("unknown format name", "reference",
     lambda: dataclasses.replace(spec("reference"), precision=dataclasses.replace(
         spec("reference").precision, formats=("fp32", "fp64"))),
     _set("precision", "formats", ["fp32", "fp64"]),
     "precision.formats", "precision.formats", "fp64", "'fp64'"),
    ("sources pattern matching nothing", "simgpu",
     lambda: dataclasses.replace(spec("simgpu"), sources={
         **spec("simgpu").sources, "memory.tiers.hmb.*": "HBM datasheet"}),
     _set("sources", "memory.tiers.hmb.*", "HBM datasheet"),
     "sources.memory.tiers.hmb.*", "sources.memory.tiers.hmb.*", "HBM datasheet",
     "'HBM datasheet'"),
    ("tiers not fastest first", "simgpu",
     _sim_tiers((0, 2, 1, 3)), _swap_sim_tiers,
     "tiers[2].bandwidth", "memory.tiers[2].bandwidth", 10e12, repr(10e12)),
    ("duplicate tier names", "simgpu",
     _sim_tiers((0, 1, 2, 3), rename={3: "hbm"}), _set("memory", "tiers", 3, "name", "hbm"),
     "tiers", "memory.tiers", "hbm", "'hbm'"),
]
BAD_IDS = [case[0] for case in BAD]


def _check(err: SpecError, path: str, value: Any, shown: str) -> None:
    message = str(err)
    assert path in message
    assert shown in message
    assert err.problems, "SpecError.problems is empty"
    for problem in err.problems:
        assert isinstance(problem, tuple) and len(problem) == 3
        assert isinstance(problem[0], str) and isinstance(problem[2], str) and problem[2]
    assert (path, value) in [(p, v) for p, v, _ in err.problems], err.problems
    if value is not None:  # the row reads "path = value: why"
        assert f"{path} = {value!r}" in message


@pytest.mark.parametrize(("make", "path", "value", "shown"),
                         [(c[2], c[4], c[6], c[7]) for c in BAD], ids=BAD_IDS)
def test_bad_field_via_dataclasses(make: Make, path: str, value: Any, shown: str) -> None:
    with pytest.raises(SpecError) as info:
        make()
    _check(info.value, path, value, shown)


@pytest.mark.parametrize(("base", "mutate", "path", "value", "shown"),
                         [(c[1], c[3], c[5], c[6], c[7]) for c in BAD], ids=BAD_IDS)
def test_bad_field_via_from_dict(base: str, mutate: Mutate, path: str, value: Any,
                                 shown: str) -> None:
    data = copy.deepcopy(spec(base).to_dict())
    mutate(data)
    with pytest.raises(SpecError) as info:
        BackendSpec.from_dict(data)
    _check(info.value, path, value, shown)


def test_spec_error_is_a_hwport_value_error() -> None:
    assert issubclass(SpecError, HwportError)
    assert issubclass(SpecError, ValueError)


def test_from_dict_reports_every_problem_at_once() -> None:
    data = spec("simgpu").to_dict()
    data["memory"]["tiers"][0]["capacity"] = -1
    data["precision"]["rounding"] = ["nearest", "banker"]
    data["interconnect"]["devices"] = 0
    with pytest.raises(SpecError) as info:
        BackendSpec.from_dict(data)
    paths = {p for p, _, _ in info.value.problems}
    assert {"memory.tiers[0].capacity", "precision.rounding", "interconnect.devices"} <= paths
    assert "3 problems" in str(info.value)


def test_from_dict_unknown_and_missing_fields() -> None:
    data = spec("simgpu").to_dict()
    data["memory"]["tiers"][1]["bandwith"] = data["memory"]["tiers"][1].pop("bandwidth")
    data["colour"] = "green"
    del data["description"]
    with pytest.raises(SpecError) as info:
        BackendSpec.from_dict(data)
    message = str(info.value)
    for path in ("memory.tiers[1].bandwith", "memory.tiers[1].bandwidth", "colour",
                 "description"):
        assert path in message
    assert "unknown field" in message and "missing" in message


def test_from_dict_where_names_the_origin() -> None:
    data = spec("simgpu").to_dict()
    data["memory"]["tiers"][0]["latency"] = -1
    with pytest.raises(SpecError, match=r"somewhere\.json: memory\.tiers\[0\]\.latency = -1"):
        BackendSpec.from_dict(data, where="somewhere.json")


# -- unit strings --------------------------------------------------------------------------
def test_from_dict_accepts_unit_strings() -> None:
    data = spec("simgpu").to_dict()
    tiers = data["memory"]["tiers"]
    tiers[0]["capacity"] = "1.25 MiB"
    tiers[2]["capacity"] = "80 GB"
    tiers[2]["bandwidth"] = "3.35 TB/s"
    tiers[3]["latency"] = "2 us"
    tiers[3]["capacity"] = "inf"
    data["interconnect"]["scale_out_bandwidth"] = "400 Gb/s"
    data["compute"]["peak_flops"]["bf16"] = "989.4 TFLOP/s"
    s = BackendSpec.from_dict(data)
    smem, _, hbm, host = s.memory.tiers
    assert smem.capacity == 1.25 * 2**20
    assert hbm.capacity == pytest.approx(80e9, rel=1e-12)
    assert hbm.bandwidth == pytest.approx(3.35e12, rel=1e-12)
    assert host.latency == pytest.approx(2e-6, rel=1e-12)
    assert math.isinf(host.capacity) and host.capacity > 0
    assert s.interconnect.scale_out_bandwidth == pytest.approx(50e9, rel=1e-12)
    assert s.compute.peak_flops["bf16"] == pytest.approx(989.4e12, rel=1e-12)
    # an infinite figure is written back as the string "inf" (strict JSON) and reads back
    out = s.to_dict()
    assert out["memory"]["tiers"][3]["capacity"] == "inf"
    json.dumps(out, allow_nan=False)
    assert BackendSpec.from_dict(out) == s


@pytest.mark.parametrize(("value", "kind", "expected"), [
    ("80 GB", "bytes", 80e9), ("1.25 MiB", "bytes", 1.25 * 2**20), ("3.35 TB/s", "rate", 3.35e12),
    ("2 us", "seconds", 2e-6), ("500 ns", "seconds", 5e-7), ("989.4 TFLOP/s", "flops", 989.4e12),
    ("inf", "bytes", math.inf), ("400 Gb/s", "rate", 50e9), (7, "bytes", 7), (2.5, "rate", 2.5),
    ("1e3 B", "bytes", 1e3),
])
def test_parse_quantity(value: Any, kind: str, expected: float) -> None:
    assert parse_quantity(value, kind) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("value", "kind"), [
    ("80 parsecs", "bytes"), ("3 GB", "seconds"), ("fast", "rate"), (True, "bytes"),
    ([1], "bytes"), ("", "bytes"),
])
def test_parse_quantity_rejects(value: Any, kind: str) -> None:
    with pytest.raises(ValueError):
        parse_quantity(value, kind)


def test_from_dict_rejects_unknown_unit_naming_the_field() -> None:
    data = spec("simgpu").to_dict()
    data["memory"]["tiers"][2]["capacity"] = "80 parsecs"
    with pytest.raises(SpecError) as info:
        BackendSpec.from_dict(data)
    message = str(info.value)
    assert "memory.tiers[2].capacity" in message
    assert "80 parsecs" in message
    assert ("memory.tiers[2].capacity", "80 parsecs") in [(p, v) for p, v, _ in
                                                          info.value.problems]


def test_from_dict_rejects_unknown_flops_unit() -> None:
    data = spec("simgpu").to_dict()
    data["compute"]["peak_flops"]["bf16"] = "989 TOPS"
    with pytest.raises(SpecError, match=r"compute\.peak_flops.*989 TOPS"):
        BackendSpec.from_dict(data)


# -- TOML spec files -------------------------------------------------------------------------
def test_load_valid_toml(tmp_path: Path) -> None:
    s = hwport.load_spec(write(tmp_path, MYCHIP_TOML))
    assert s.name == "mychip"
    assert s.unsourced() == []
    assert s.precision.formats == ("fp32", "bf16", "my8")
    assert s.format("my8").max == 240.0  # E4M3, bias 8, no NaN code: 1.875 * 2**7
    assert s.own_formats["my8"].overflow == "saturate"
    sram, hbm = s.memory.tiers
    assert (sram.capacity, sram.count, sram.scope) == (1.25 * 2**20, 64, "core")
    assert hbm.bandwidth == pytest.approx(1.2e12)
    assert hbm.latency == pytest.approx(500e-9)
    assert s.interconnect.shape == (4, 4)
    assert s.interconnect.scale_out_bandwidth == pytest.approx(50e9)
    assert s.compute.peak_flops["my8"] == pytest.approx(400e12)
    assert s.provenance("memory.tiers.sram.latency")[0] == "source"  # type: ignore[index]
    assert s.provenance("memory.tiers.hbm.latency")[0] == "assumption"  # type: ignore[index]
    assert BackendSpec.from_dict(s.to_dict()) == s
    json.dumps(s.to_dict(), allow_nan=False)
    # a spec file's own format is not registered globally
    with pytest.raises(hwport.UnknownNameError):
        hwport.formats.get("my8")


def test_load_spec_accepts_str_paths(tmp_path: Path) -> None:
    assert hwport.load_spec(str(write(tmp_path, MYCHIP_TOML))).name == "mychip"


def test_docs_example_is_the_tested_spec(tmp_path: Path) -> None:
    assert EXAMPLE.is_file(), f"{EXAMPLE} is missing"
    assert hwport.load_spec(EXAMPLE) == hwport.load_spec(write(tmp_path, MYCHIP_TOML))


def test_malformed_toml_names_file_and_line(tmp_path: Path) -> None:
    text = MYCHIP_TOML.replace("\n[interconnect]\n", "\n[interconnect\n")
    line = line_of(text, "[interconnect")
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        hwport.load_spec(path)
    message = str(info.value)
    assert str(path) in message
    assert f"line {line}" in message


def test_bad_value_in_second_tier_reports_its_line(tmp_path: Path) -> None:
    text = MYCHIP_TOML.replace('bandwidth = "1.2 TB/s"', 'bandwidth = "-1.2 TB/s"')
    assert text != MYCHIP_TOML
    line = line_of(text, 'bandwidth = "-1.2 TB/s"')
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        hwport.load_spec(path)
    assert f"{path}:{line}: memory.tiers[1].bandwidth = -1200000000000.0" in str(info.value)
    assert [(p, v) for p, v, _ in info.value.problems] == [
        ("memory.tiers[1].bandwidth", -1.2e12)]


def test_unknown_key_reports_its_line(tmp_path: Path) -> None:
    text = MYCHIP_TOML.replace('bandwidth = "1.2 TB/s"', 'bandwith = "1.2 TB/s"')
    typo_line = line_of(text, "bandwith =")
    header_line = line_of(text, "[[memory.tiers]]", nth=1)
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        hwport.load_spec(path)
    message = str(info.value)
    assert f"{path}:{typo_line}: memory.tiers[1].bandwith = '1.2 TB/s': unknown field" in message
    # the field it lacks now is reported at the start of its table
    assert f"{path}:{header_line}: memory.tiers[1].bandwidth: missing" in message


@pytest.mark.parametrize(("old", "new", "key_line", "path"), [
    ('scope = "chip"', 'scope = "rack"', 'scope = "rack"', "memory.tiers[1].scope"),
    ("devices = 16", "devices = 15", "shape = [4, 4]", "interconnect.shape"),
    ('send_recv = ["direct"]', 'send_recv = ["pigeon"]', "send_recv =",
     "interconnect.collectives.send_recv"),
    ('my8 = "fp32"', 'my8 = "fp64"', 'my8 = "fp64"', "precision.accumulators.my8"),
    ('"memory.tiers.hbm.count"', '"memory.tiers.hmb.count"', '"memory.tiers.hmb.count"',
     "sources.memory.tiers.hmb.count"),
    ("bias = 8", "bias = 200", "[[formats]]", "formats[0]"),
    ("stochastic_rounding_bits = 8", "stochastic_rounding_bits = 0",
     "stochastic_rounding_bits", "precision.stochastic_rounding_bits"),
])
def test_toml_problems_report_their_line(tmp_path: Path, old: str, new: str, key_line: str,
                                         path: str) -> None:
    assert old in MYCHIP_TOML
    text = MYCHIP_TOML.replace(old, new, 1)
    line = line_of(text, key_line)
    file = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        hwport.load_spec(file)
    assert f"{file}:{line}: {path}" in str(info.value)


def test_bad_peak_flops_unit_reports_entry_and_line(tmp_path: Path) -> None:
    # Like every other figure, a bad peak is reported as its own field at its own line,
    # not as the whole [compute.peak_flops] table at the table's header.
    text = MYCHIP_TOML.replace('my8 = "400 TFLOP/s"', 'my8 = "400 TOPS"')
    line = line_of(text, 'my8 = "400 TOPS"')
    file = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        hwport.load_spec(file)
    assert f"{file}:{line}: compute.peak_flops.my8 = '400 TOPS'" in str(info.value)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "chip.toml"
    with pytest.raises(SpecError, match="cannot read") as info:
        hwport.load_spec(path)
    assert str(path) in str(info.value)


def test_toml_round_trip_through_dict_equals(tmp_path: Path) -> None:
    s = hwport.load_spec(write(tmp_path, MYCHIP_TOML))
    again = BackendSpec.from_dict(json.loads(json.dumps(s.to_dict(), allow_nan=False)))
    assert again == s
    assert again.format("my8") == s.format("my8")


def test_memory_hierarchy_needs_a_tier() -> None:
    with pytest.raises(SpecError, match="tiers"):
        MemoryHierarchy(tiers=())


# -- a value of the wrong shape (a string for a list, a list for a table) -------------------
WRONG_SHAPE: list[tuple[str | None, str, Any, str]] = [
    ("precision", "rounding", "nearest", "precision.rounding"),
    ("precision", "formats", "fp32", "precision.formats"),
    ("precision", "accumulators", ["fp32"], "precision.accumulators"),
    ("interconnect", "collectives", ["ring"], "interconnect.collectives"),
    ("interconnect", "shape", 5, "interconnect.shape"),
    ("compute", "peak_flops", ["bf16"], "compute.peak_flops"),
    (None, "sources", "see the datasheet", "sources"),
    (None, "assumptions", "see the datasheet", "assumptions"),
]


@pytest.mark.parametrize(("section", "key", "value", "path"), WRONG_SHAPE,
                         ids=[case[3] for case in WRONG_SHAPE])
def test_wrong_shape_is_one_spec_error_naming_the_field(section: str | None, key: str,
                                                        value: Any, path: str) -> None:
    # Writing `rounding = "nearest"` or `sources = "..."` is an easy slip in a spec file:
    # it must be one SpecError naming the field (not a bare ValueError, and not one
    # problem per character of the string).
    data = spec("simgpu").to_dict()
    (data[section] if section else data)[key] = value
    with pytest.raises(SpecError) as info:
        BackendSpec.from_dict(data)
    paths = [p for p, _, _ in info.value.problems]
    assert paths == [path], str(info.value)


def test_wrong_shape_in_toml_is_reported_with_its_line(tmp_path: Path) -> None:
    text = accumulators_as_list()
    line = line_of(text, "accumulators = ")
    file = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        hwport.load_spec(file)
    assert f"{file}:{line}: precision.accumulators" in str(info.value)


@pytest.mark.hwport_requires("stochastic_rounding")
def test_stochastic_rounding_is_declared_with_its_bits(hwport_backend: BackendSpec) -> None:
    """Runs only on backends that declare stochastic rounding (dojo, dataflow), by
    capability: the spec must say how many random bits it uses."""
    bits = hwport_backend.precision.stochastic_rounding_bits
    assert bits is not None and 1 <= bits <= 24
