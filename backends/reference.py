"""reference: exact fp32 with no emulation, the yardstick every other backend is judged by.

It models an ideal machine (unbounded memory and bandwidth, no latency) so that memory and
time reports of other backends have a baseline that no hardware limit distorts.
"""

from __future__ import annotations

import math

from hwport import hookimpl
from hwport.spec import (
    BackendSpec,
    Compute,
    Interconnect,
    MemoryHierarchy,
    MemoryTier,
    PrecisionSemantics,
)

IDEAL = "ideal machine: the reference judges numerics and models no hardware"

SPEC = BackendSpec(
    name="reference",
    description="Exact fp32 everywhere, no emulation: the baseline of every comparison.",
    precision=PrecisionSemantics(
        formats=("fp32",),
        matmul_inputs=("fp32",),
        accumulators={"fp32": "fp32"},
        elementwise=("fp32",),
    ),
    memory=MemoryHierarchy(
        tiers=(MemoryTier("ideal", math.inf, math.inf, 0.0, scope="host"),),
    ),
    interconnect=Interconnect(
        topology="switch", devices=1 << 20, link_bandwidth=math.inf, link_latency=0.0,
        collectives={"all_reduce": ("ring", "tree"), "reduce_scatter": ("ring",),
                     "all_gather": ("ring",), "broadcast": ("tree",),
                     "send_recv": ("direct",), "all_to_all": ("direct",)},
        reduction_format="fp32",
    ),
    compute=Compute(peak_flops={"fp32": math.inf}),
    sources={"precision.*": "IEEE 754-2019 binary32 arithmetic (definition of the baseline)"},
    assumptions={"memory.*": IDEAL, "interconnect.*": IDEAL, "compute.*": IDEAL},
)


@hookimpl
def hwport_backends() -> list[BackendSpec]:
    return [SPEC]
