"""dataflow: a SambaNova SN40L-like reconfigurable dataflow unit (one socket per device).

Compute units take bf16 and fp32 with stochastic rounding in their final stage; a fused
pipeline of operators keeps its intermediates in 520 MB of on-chip SRAM, backed by 64 GB
of HBM and up to 1.5 TB of DDR. INT8/INT32 compute exists but is not modelled here.
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

HC24 = "Prabhakar et al., SambaNova SN40L, Hot Chips 2024"
PAPER = "SambaNova SN40L: Scaling the AI Memory Wall with Dataflow and Composition of Experts, arXiv 2405.07518"
SAMBAFLOW = "SambaFlow documentation: mixed-precision presets mp0 (all fp32), mp1 (GEMM inputs bf16), mp4 (all bf16)"

SPEC = BackendSpec(
    name="dataflow",
    description="SambaNova SN40L-like dataflow accelerator: bf16 with stochastic rounding, "
                "SRAM/HBM/DDR tiers, peer-to-peer sockets.",
    precision=PrecisionSemantics(
        formats=("fp32", "bf16"),
        matmul_inputs=("fp32", "bf16"),
        accumulators={"fp32": "fp32", "bf16": "fp32"},
        elementwise=("fp32", "bf16"),
        rounding=("nearest", "stochastic"),
        stochastic_rounding_bits=16,
    ),
    memory=MemoryHierarchy(tiers=(
        MemoryTier("sram", 0.5e6, 1040 * 64 * 1.6e9, 10e-9, scope="core", count=1040),
        MemoryTier("hbm", 64e9, 25.6e12 / 16, 500e-9, scope="chip"),
        MemoryTier("ddr", 1.5e12, 1.6e12 / 16, 1e-6, scope="chip"),
    )),
    interconnect=Interconnect(
        topology="ring", devices=8, links=2, link_bandwidth=64e9, link_latency=3e-6,
        collectives={"all_reduce": ("ring",), "reduce_scatter": ("ring",),
                     "all_gather": ("ring",), "broadcast": ("ring",),
                     "send_recv": ("direct",), "all_to_all": ("direct",)},
        reduction_format="fp32",
    ),
    compute=Compute(peak_flops={"bf16": 638e12}),
    sources={
        "precision.formats": f"{HC24}: compute types BF16, FP32, INT32, INT8",
        "precision.matmul_inputs": f"{HC24}; {SAMBAFLOW}",
        "precision.elementwise": SAMBAFLOW,
        "precision.rounding": f"{HC24}: stochastic rounding in the PCU's final stage",
        "compute.peak_flops.bf16": f"{HC24}; {PAPER}: 638 BF16 TFLOP/s",
        "memory.tiers.sram.capacity": f"{PAPER}: 520 MB SRAM in 1,040 PMUs",
        "memory.tiers.sram.count": f"{PAPER}: 1,040 PMUs",
        "memory.tiers.sram.scope": PAPER,
        "memory.tiers.sram.managed": f"{PAPER}: software-placed dataflow buffers",
        "memory.tiers.hbm.capacity": f"{PAPER}: 64 GB HBM",
        "memory.tiers.hbm.scope": PAPER,
        "memory.tiers.hbm.managed": PAPER,
        "memory.tiers.hbm.count": PAPER,
        "memory.tiers.ddr.capacity": f"{PAPER}: up to 1.5 TB DDR",
        "memory.tiers.ddr.scope": PAPER,
        "memory.tiers.ddr.managed": PAPER,
        "memory.tiers.ddr.count": PAPER,
        "interconnect.collectives.*": f"{PAPER}: sockets talk peer to peer",
        "interconnect.topology": f"{PAPER}: peer-to-peer sockets (a ring over them)",
        "interconnect.devices": f"{PAPER}: 8 sockets per node",
        "interconnect.shape": "a ring has no mesh shape",
    },
    assumptions={
        "precision.accumulators.*": "not published: fp32 accumulation assumed",
        "precision.stochastic_rounding_bits": "not published: 16 random bits assumed",
        "precision.accumulation_interval": "not published: no promotion interval assumed",
        "precision.flush_to_zero": "not published: subnormals preserved assumed",
        "precision.features": "no hardware loss scaling or FP8 scaling published",
        "memory.tiers.sram.bandwidth": "not published: 64 B per clock per PMU at 1.6 GHz assumed",
        "memory.tiers.sram.latency": "not published: about 10 ns assumed",
        "memory.tiers.hbm.bandwidth": "derived: 25.6 TB/s for a 16-socket system / 16 (per socket not published)",
        "memory.tiers.hbm.latency": "not published: about 500 ns assumed",
        "memory.tiers.ddr.bandwidth": "derived: 1.6 TB/s for a 16-socket system / 16 (per socket not published)",
        "memory.tiers.ddr.latency": "not published: about 1 us assumed",
        "interconnect.links": "assumed: two ring neighbours per socket",
        "interconnect.link_bandwidth": "not published: PCIe Gen5 x16 (64 GB/s per direction) assumed",
        "interconnect.link_latency": "not published: 3 us per collective step assumed",
        "interconnect.reduction_format": "not published: fp32 reductions assumed",
        "interconnect.scale_out_*": "no scale-out network modelled",
    },
)


@hookimpl
def hwport_backends() -> list[BackendSpec]:
    return [SPEC]
