"""dojo: a Tesla Dojo D1-like training chip, one D1 of a 5x5 training tile per device.

Numbers live in bf16, fp32 and Tesla's configurable formats: CFloat8 in the 1-4-3 and
1-5-2 layouts and CFloat16 SHP, each with a per-tensor exponent bias (no inf or NaN;
overflow clamps). Rounding is to nearest or stochastic. Memory is 1.25 MB of SRAM per node
(354 nodes) with HBM only on the interface processors (DIPs) at the tile's edge.
"""

from __future__ import annotations

from hwport import hookimpl
from hwport.spec import (
    BackendSpec,
    Compute,
    Interconnect,
    MemoryHierarchy,
    MemoryTier,
    PrecisionSemantics,
)

HC34 = "Talpes et al., DOJO: The Microarchitecture of Tesla's Exa-Scale Computer, Hot Chips 34 (2022)"
AIDAY = "Tesla AI Day 2021 and 2022 presentations (D1 chip, training tile, DIP)"
CFP = "Tesla, A Guide to Tesla's Configurable Floating Point Formats & Arithmetic (whitepaper, 2021)"

SPEC = BackendSpec(
    name="dojo",
    description="Tesla Dojo D1-like chip: CFloat8/CFloat16 with configurable bias, SRAM-only "
                "compute nodes, HBM on interface processors, 2D mesh.",
    precision=PrecisionSemantics(
        formats=("fp32", "bf16", "cfp16_shp_b15", "cfp8_143_b7", "cfp8_152_b15"),
        matmul_inputs=("fp32", "bf16", "cfp16_shp_b15", "cfp8_143_b7", "cfp8_152_b15"),
        accumulators={"fp32": "fp32", "bf16": "fp32", "cfp16_shp_b15": "fp32",
                      "cfp8_143_b7": "fp32", "cfp8_152_b15": "fp32"},
        elementwise=("fp32", "bf16"),
        rounding=("nearest", "stochastic"),
        stochastic_rounding_bits=16,
        features=("configurable_exponent_bias", "exception_flags"),
    ),
    memory=MemoryHierarchy(tiers=(
        MemoryTier("sram", 1.25e6, 354 * 400e9, 5e-9, scope="core", count=354),
        MemoryTier("dip_hbm", 5 * 32e9 / 25, 5 * 800e9 / 25, 1e-6, scope="node"),
    )),
    interconnect=Interconnect(
        topology="mesh2d", devices=25, shape=(5, 5), links=4,
        link_bandwidth=18 * 512e9, link_latency=0.5e-6,
        collectives={"all_reduce": ("mesh2d", "ring"), "reduce_scatter": ("mesh2d", "ring"),
                     "all_gather": ("mesh2d", "ring"), "broadcast": ("mesh2d",),
                     "send_recv": ("direct",), "all_to_all": ("direct",)},
        reduction_format="fp32",
        scale_out_bandwidth=36e12 / 25, scale_out_latency=2e-6,
    ),
    compute=Compute(peak_flops={
        "bf16": 362e12, "cfp8_143_b7": 362e12, "cfp8_152_b15": 362e12,
        "cfp16_shp_b15": 362e12, "fp32": 22.6e12,
    }),
    sources={
        "precision.formats": CFP,
        "precision.matmul_inputs": f"{HC34}; {CFP}",
        "precision.elementwise": HC34,
        "precision.rounding": f"{CFP}: round to nearest or seeded, reproducible stochastic rounding",
        "precision.flush_to_zero": f"{CFP}: denormals supported",
        "precision.features": f"{CFP}: configurable exponent bias; exception flags invalid, denormal, overflow, underflow",
        "compute.peak_flops.bf16": f"{HC34}: D1 362 TFLOP/s BF16/CFP8",
        "compute.peak_flops.cfp8_*": f"{HC34}: D1 362 TFLOP/s BF16/CFP8",
        "compute.peak_flops.fp32": f"{HC34}: D1 22.6 TFLOP/s FP32",
        "memory.tiers.sram.capacity": f"{HC34}: 1.25 MB SRAM per node",
        "memory.tiers.sram.count": f"{HC34}: 354 nodes per D1",
        "memory.tiers.sram.scope": HC34,
        "memory.tiers.sram.managed": HC34,
        "memory.tiers.sram.bandwidth": f"{HC34}: 400 GB/s load per node (x354 nodes)",
        "memory.tiers.dip_hbm.scope": AIDAY,
        "memory.tiers.dip_hbm.managed": AIDAY,
        "memory.tiers.dip_hbm.count": AIDAY,
        "interconnect.topology": f"{HC34}: 2D mesh",
        "interconnect.devices": f"{AIDAY}: training tile of 5x5 D1",
        "interconnect.shape": f"{AIDAY}: training tile of 5x5 D1",
        "interconnect.links": f"{HC34}: a D1 connects to its four mesh neighbours",
        "interconnect.collectives.*": f"{HC34}: collectives over the 2D mesh",
        "interconnect.scale_out_bandwidth": f"{AIDAY}: 36 TB/s off-tile, shared by 25 D1",
    },
    assumptions={
        "compute.peak_flops.cfp16_shp_b15": "not published: CFloat16 at the BF16 rate assumed",
        "precision.accumulators.*": "not published: fp32 accumulation assumed",
        "precision.stochastic_rounding_bits": "not published: 16 random bits assumed",
        "precision.accumulation_interval": "not published: no promotion interval assumed",
        "memory.tiers.sram.latency": "not published: a few ns for local SRAM assumed",
        "memory.tiers.dip_hbm.capacity": "derived: 5 DIPs per tile edge x 32 GB, assuming one edge's DIPs serve the tile's 25 D1",
        "memory.tiers.dip_hbm.bandwidth": "derived: 5 DIPs x 800 GB/s shared by 25 D1 (same assumption)",
        "memory.tiers.dip_hbm.latency": "not published: about 1 us across the mesh assumed",
        "interconnect.link_bandwidth": "derived: 18 edge nodes x 512 GB/s per mesh direction (Hot Chips 34) per D1 edge",
        "interconnect.link_latency": "not published: 0.5 us per collective step assumed",
        "interconnect.reduction_format": "not published: fp32 reductions on the nodes' SIMD units assumed",
        "interconnect.scale_out_latency": "not published: 2 us assumed",
    },
)


@hookimpl
def hwport_backends() -> list[BackendSpec]:
    return [SPEC]
