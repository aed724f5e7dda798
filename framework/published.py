"""Published figures the performance model is validated against (``hwport estimate
--validate``), with an A100-like preset for the Megatron-LM table.

Each table row is transcribed from its source; docs/performance-model.md shows the
predictions next to them with their errors.
"""

from __future__ import annotations

from dataclasses import dataclass

from hwport.recipes import Recipe
from hwport.spec import (
    BackendSpec,
    Compute,
    Interconnect,
    MemoryHierarchy,
    MemoryTier,
    PrecisionSemantics,
)

A100_DATASHEET = "NVIDIA A100 Tensor Core GPU datasheet (2021), 80GB SXM column"
DGX_A100 = "NVIDIA DGX A100 datasheet (2020): 8 GPUs, NVSwitch; Selene: 8 HDR 200 Gb/s " \
    "InfiniBand adapters per node (Narayanan et al. 2021, section 5)"

A100 = BackendSpec(
    name="a100",
    description="NVIDIA A100 80GB SXM-like GPU in DGX A100 nodes (Selene): the hardware of "
                "Narayanan et al. 2021, for validating the performance model.",
    precision=PrecisionSemantics(
        formats=("fp32", "tf32", "bf16", "fp16"),
        matmul_inputs=("fp32", "tf32", "bf16", "fp16"),
        accumulators={"fp32": "fp32", "tf32": "fp32", "bf16": "fp32", "fp16": "fp32"},
        elementwise=("fp32", "bf16", "fp16"),
        rounding=("nearest", "toward_zero"),
        features=("dynamic_loss_scaling",),
    ),
    memory=MemoryHierarchy(tiers=(
        MemoryTier("l2", 40e6, 5e12, 200e-9, scope="chip", managed="cached"),
        MemoryTier("hbm", 80e9, 2.039e12, 600e-9, scope="chip"),
    )),
    interconnect=Interconnect(
        topology="switch", devices=8, links=12, link_bandwidth=25e9, link_latency=2e-6,
        collectives={"all_reduce": ("ring",), "all_gather": ("ring",),
                     "reduce_scatter": ("ring",), "send_recv": ("direct",)},
        reduction_format="fp32", scale_out_bandwidth=25e9, scale_out_latency=5e-6,
    ),
    compute=Compute(peak_flops={"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12,
                                "fp16": 312e12}),
    sources={
        "compute.*": f"{A100_DATASHEET} (dense, without sparsity)",
        "precision.*": A100_DATASHEET,
        "memory.tiers.l2.capacity": A100_DATASHEET,
        "memory.tiers.l2.scope": A100_DATASHEET,
        "memory.tiers.l2.managed": A100_DATASHEET,
        "memory.tiers.l2.count": A100_DATASHEET,
        "memory.tiers.hbm.capacity": A100_DATASHEET,
        "memory.tiers.hbm.bandwidth": f"{A100_DATASHEET}: 2,039 GB/s",
        "memory.tiers.hbm.scope": A100_DATASHEET,
        "memory.tiers.hbm.managed": A100_DATASHEET,
        "memory.tiers.hbm.count": A100_DATASHEET,
        "interconnect.topology": DGX_A100,
        "interconnect.devices": DGX_A100,
        "interconnect.links": f"{A100_DATASHEET}: NVLink 3, 12 links, 600 GB/s bidirectional",
        "interconnect.link_bandwidth": f"{A100_DATASHEET}: 600 GB/s over 12 links = 25 GB/s "
                                       "per link per direction",
        "interconnect.collectives.*": "NCCL 2.x documentation: ring algorithm",
        "interconnect.reduction_format": "NCCL reduces in the buffer's dtype",
        "interconnect.scale_out_bandwidth": f"{DGX_A100}: 200 Gb/s = 25 GB/s per GPU",
        "interconnect.shape": "a switch has no mesh shape",
    },
    assumptions={
        "memory.tiers.l2.bandwidth": "not published: about 5 TB/s assumed",
        "memory.tiers.*.latency": "not published: as simgpu",
        "interconnect.link_latency": "not published: as simgpu",
        "interconnect.scale_out_latency": "not published: as simgpu",
        "precision.flush_to_zero": "PTX ISA: subnormals preserved unless .ftz is requested",
        "precision.accumulation_interval": "fp32 accumulation of the whole K",
        "precision.stochastic_rounding_bits": "no stochastic rounding on Ampere",
    },
)

# The mixed-precision Adam of both papers: fp16 weights and gradients, fp32 master weights
# and moments (2 + 2 + 12 bytes per parameter).
MIXED_ADAM = Recipe("mixed-precision-adam", "fp16 weights and gradients, fp32 master "
                    "weights and Adam moments (ZeRO's and Megatron-LM's accounting)",
                    matmul_input="fp16", activations="fp16", weights="fp16",
                    master_weights="fp32", gradients="fp16", optimizer_state="fp32")


@dataclass(frozen=True)
class ZeroRow:
    """Rajbhandari et al. 2019, Figure 1: model-state bytes per device."""

    params: float
    devices: int
    stage: int
    gigabytes: float


ZERO = "Rajbhandari et al. 2019, ZeRO, Figure 1 (7.5B parameters, 64 devices, K = 12)"
ZERO_ROWS = (ZeroRow(7.5e9, 64, 0, 120.0), ZeroRow(7.5e9, 64, 1, 31.4),
             ZeroRow(7.5e9, 64, 2, 16.6), ZeroRow(7.5e9, 64, 3, 1.9))


@dataclass(frozen=True)
class MegatronRow:
    """Narayanan et al. 2021, Table 1: a GPT model, its layout on A100s and the measured
    throughput (teraFLOP/s per GPU, recomputation included)."""

    billions: float
    heads: int
    hidden: int
    layers: int
    tensor: int
    pipeline: int
    gpus: int
    batch: int
    tflops: float


MEGATRON = "Narayanan et al. 2021, Efficient Large-Scale Language Model Training on GPU " \
    "Clusters Using Megatron-LM, Table 1 (sequence 2048, vocabulary 51,200)"
MEGATRON_ROWS = (
    MegatronRow(1.7, 24, 2304, 24, 1, 1, 32, 512, 137),
    MegatronRow(3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    MegatronRow(7.5, 32, 4096, 36, 4, 1, 128, 512, 142),
    MegatronRow(18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    MegatronRow(39.1, 64, 8192, 48, 8, 2, 512, 1536, 138),
    MegatronRow(76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    MegatronRow(145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148),
    MegatronRow(310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    MegatronRow(529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163),
    MegatronRow(1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
)
