"""simgpu: an NVIDIA H100 SXM-like GPU, the platform mixed-precision recipes were tuned on.

Tensor cores take tf32, bf16, fp16 and both OCP FP8 formats; fp16/bf16 products are summed
in fp32, FP8 products in an accumulator that keeps about 14 bits (modelled as e8m13).
Conversions round to nearest even; there is no hardware stochastic rounding. E4M3 is the
OCP "fn" variant (no inf, NaN at S.1111.111); saturating conversion is an option of the
conversion instruction (cvt.rn.satfinite), not of the format.
"""

from __future__ import annotations

from hwport import FloatFormat, hookimpl
from hwport.spec import (
    BackendSpec,
    Compute,
    Interconnect,
    MemoryHierarchy,
    MemoryTier,
    PrecisionSemantics,
)

DATASHEET = "NVIDIA H100 Tensor Core GPU datasheet (2022), SXM5 column"
TUNING = "NVIDIA Hopper Tuning Guide (2022)"
OCP = "OCP 8-bit Floating Point Specification (OFP8) rev. 1.0 (2023); Micikevicius et al., FP8 Formats for Deep Learning (2022)"
DEEPSEEK = "DeepSeek-AI, DeepSeek-V3 Technical Report (2024), section 3.3.2: FP8 GEMM on Hopper keeps about 14 bits of accumulation"
DGX = "NVIDIA DGX H100 datasheet (2023): 8 GPUs, NVSwitch, 2 TB system memory, 400 Gb/s ConnectX-7 per GPU"

# About 14 bits of accumulation: an fp32-range format with 13 mantissa bits.
FP8_ACCUMULATOR = FloatFormat(
    "e8m13", 8, 13, 127, description="H100 FP8 tensor-core accumulator (~14 significant bits)"
)

SPEC = BackendSpec(
    name="simgpu",
    description="NVIDIA H100 SXM-like GPU: the NVIDIA path recipes were tuned on.",
    formats=(FP8_ACCUMULATOR,),
    precision=PrecisionSemantics(
        formats=("fp32", "tf32", "bf16", "fp16", "e4m3fn", "e5m2", "e8m13"),
        matmul_inputs=("fp32", "tf32", "bf16", "fp16", "e4m3fn", "e5m2"),
        accumulators={"fp32": "fp32", "tf32": "fp32", "bf16": "fp32", "fp16": "fp32",
                      "e4m3fn": "e8m13", "e5m2": "e8m13"},
        elementwise=("fp32", "bf16", "fp16"),
        rounding=("nearest", "toward_zero"),
        flush_to_zero=False,
        features=("dynamic_loss_scaling", "fp8_per_tensor_scaling"),
    ),
    memory=MemoryHierarchy(tiers=(
        MemoryTier("smem", 228e3, 132 * 128 * 1.755e9, 30e-9, scope="core", count=132,
                   managed="staging"),
        MemoryTier("l2", 50e6, 10e12, 200e-9, scope="chip", managed="cached"),
        MemoryTier("hbm", 80e9, 3.35e12, 600e-9, scope="chip"),
        MemoryTier("host", 256e9, 64e9, 2e-6, scope="host"),
    )),
    interconnect=Interconnect(
        topology="switch", devices=8, links=18, link_bandwidth=25e9, link_latency=2e-6,
        collectives={"all_reduce": ("ring", "tree"), "reduce_scatter": ("ring",),
                     "all_gather": ("ring",), "broadcast": ("ring", "tree"),
                     "send_recv": ("direct",), "all_to_all": ("direct",)},
        reduction_format="fp32",
        scale_out_bandwidth=50e9, scale_out_latency=5e-6,
    ),
    compute=Compute(peak_flops={
        "fp32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12,
        "e4m3fn": 1978.9e12, "e5m2": 1978.9e12,
    }),
    sources={
        "compute.*": f"{DATASHEET}; {TUNING} (dense, without sparsity)",
        "precision.formats": f"{DATASHEET}; {OCP}",
        "precision.matmul_inputs": TUNING,
        "precision.accumulators.e*": DEEPSEEK,
        "precision.accumulators.*": TUNING,
        "precision.elementwise": TUNING,
        "precision.rounding": "PTX ISA 8.x, cvt instruction: .rn and .rz rounding, no stochastic mode on sm_90",
        "precision.flush_to_zero": "PTX ISA 8.x: subnormals preserved unless .ftz is requested",
        "precision.features": "PyTorch AMP GradScaler (dynamic loss scaling); NVIDIA Transformer Engine (per-tensor FP8 scaling)",
        "memory.tiers.smem.capacity": TUNING,
        "memory.tiers.smem.count": DATASHEET,
        "memory.tiers.smem.scope": TUNING,
        "memory.tiers.smem.managed": f"{TUNING}; CUDA C++ Programming Guide: shared memory "
                                     "lives as long as its thread block",
        "memory.tiers.l2.capacity": TUNING,
        "memory.tiers.l2.scope": TUNING,
        "memory.tiers.l2.managed": TUNING,
        "memory.tiers.l2.count": TUNING,
        "memory.tiers.hbm.*": DATASHEET,
        "memory.tiers.host.capacity": DGX,
        "memory.tiers.host.bandwidth": f"{DATASHEET}: PCIe Gen5, 128 GB/s (64 GB/s per direction)",
        "memory.tiers.host.scope": DGX,
        "memory.tiers.host.managed": DGX,
        "memory.tiers.host.count": DGX,
        "interconnect.topology": DGX,
        "interconnect.devices": DGX,
        "interconnect.links": f"{DATASHEET}: NVLink 4, 18 links, 900 GB/s bidirectional",
        "interconnect.link_bandwidth": f"{DATASHEET}: 900 GB/s bidirectional over 18 links = 25 GB/s per link per direction",
        "interconnect.collectives.*": "NCCL 2.x documentation: ring and tree algorithms",
        "interconnect.reduction_format": "NCCL reduces in the buffer's dtype; fp32 gradient buffers in DDP",
        "interconnect.scale_out_bandwidth": DGX,
        "interconnect.shape": "a switch has no mesh shape",
    },
    assumptions={
        "memory.tiers.smem.bandwidth": "not published: 128 B/clock per SM at the 1.755 GHz boost clock",
        "memory.tiers.smem.latency": "not published: about 30 ns (microbenchmark folklore)",
        "memory.tiers.l2.bandwidth": "not published: about 10 TB/s assumed from microbenchmark reports",
        "memory.tiers.l2.latency": "not published: about 200 ns assumed",
        "memory.tiers.hbm.latency": "not published: about 600 ns assumed",
        "memory.tiers.host.latency": "not published: about 2 us over PCIe assumed",
        "interconnect.link_latency": "not published: 2 us per collective step (NCCL small-message latency) assumed",
        "interconnect.scale_out_latency": "not published: 5 us per step across InfiniBand assumed",
        "precision.accumulation_interval": "no hardware promotion: the accumulator format holds the whole K (promotion is a software mitigation)",
        "precision.stochastic_rounding_bits": "no stochastic rounding on Hopper",
    },
)


@hookimpl
def hwport_backends() -> list[BackendSpec]:
    return [SPEC]
