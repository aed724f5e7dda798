"""Collectives: schedules executed on real processes (gloo), their bits and their cost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch

from hwport import collectives as coll
from hwport import plugins
from hwport.errors import HwportError


def _ring(rank: int, world: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = coll._inputs(7, rank, 1000, fmt)
    return coll.execute(coll.schedule("all_reduce", "ring", world), x.clone(), fmt, rank), x


@pytest.mark.parametrize("world", [2, 4])
def test_bf16_ring_all_reduce_gives_the_bits_of_its_order_of_additions(world: int) -> None:
    """Chunk c starts at rank c and travels the ring, each rank adding its own value and
    rounding to bf16 (ml_dtypes, an independent rounding): every rank ends with those bits,
    which differ from the exact sum."""
    results = coll.launch(world, _ring, "bf16", timeout=120)
    inputs = [x.numpy() for _, x in results]
    chunks = np.array_split(np.arange(1000), world)
    want = np.empty(1000, dtype=np.float32)
    for c, idx in enumerate(chunks):
        acc = inputs[c][idx].astype(ml_dtypes.bfloat16)
        for k in range(1, world):
            mine = inputs[(c + k) % world][idx]
            acc = (mine.astype(np.float32) + acc.astype(np.float32)).astype(ml_dtypes.bfloat16)
        want[idx] = acc.astype(np.float32)
    for out, _ in results:
        np.testing.assert_array_equal(out.numpy(), want)
    exact = np.sum([x.astype(np.float64) for x in inputs], axis=0)
    assert np.abs(want - exact).max() > 1e-3  # measurably not the fp32 sum


def _every_op(rank: int, world: int) -> dict[str, torch.Tensor]:
    # small integers: every sum is exact in fp32, so any wrong routing shows
    x = torch.arange(12, dtype=torch.float32) + 100 * rank
    out = {}
    for op, algo in (("all_reduce", "ring"), ("all_reduce", "tree"), ("all_reduce", "mesh2d"),
                     ("reduce_scatter", "ring"), ("all_gather", "ring"),
                     ("broadcast", "tree"), ("broadcast", "ring"), ("all_to_all", "direct")):
        out[f"{op}/{algo}"] = coll.execute(coll.schedule(op, algo, world, (2, 2)), x.clone(),
                                           "fp32", rank)
    return out


def test_every_schedule_routes_every_chunk_on_four_ranks() -> None:
    results = coll.launch(4, _every_op, timeout=120)
    inputs = [torch.arange(12, dtype=torch.float32) + 100 * r for r in range(4)]
    total = sum(inputs)
    for r, got in enumerate(results):
        for algo in ("ring", "tree", "mesh2d"):
            assert torch.equal(got[f"all_reduce/{algo}"], total), algo
        assert torch.equal(got["reduce_scatter/ring"][3 * r:3 * r + 3], total[3 * r:3 * r + 3])
        assert torch.equal(got["all_gather/ring"],
                           torch.cat([inputs[j][3 * j:3 * j + 3] for j in range(4)]))
        assert torch.equal(got["broadcast/tree"], inputs[0])
        assert torch.equal(got["broadcast/ring"], inputs[0])
        assert torch.equal(got["all_to_all/direct"],
                           torch.cat([inputs[j][3 * r:3 * r + 3] for j in range(4)]))


def test_ring_cost_is_the_thakur_rabenseifner_gropp_formula() -> None:
    spec = plugins.get_backend("simgpu")
    ic = spec.interconnect
    for n, size in ((2, 1e3), (8, 1 << 30), (5, 12345.0)):
        c = coll.cost(coll.schedule("all_reduce", "ring", n), size, spec)
        want = coll.thakur_all_reduce(size, n, ic.link_latency, 1 / coll.link_bandwidth(spec))
        assert c.seconds == pytest.approx(want, rel=1e-12)
        assert c.steps == 2 * (n - 1)
        assert c.busbw == pytest.approx(c.algbw * 2 * (n - 1) / n)
    # 8 H100s: 18 NVLink links of 25 GB/s per direction; nccl-tests measures about 370 GB/s
    big = coll.cost(coll.schedule("all_reduce", "ring", 8), 1 << 30, spec)
    assert 370e9 < big.busbw < 450e9


def test_topology_decides_the_cost() -> None:
    """On Dojo's mesh each neighbour has its own link: the 2D algorithm's steps are shorter
    than a ring's over the same 25 devices."""
    dojo = plugins.get_backend("dojo")
    ring = coll.cost(coll.schedule("all_reduce", "ring", 25), 1 << 28, dojo)
    mesh = coll.cost(coll.schedule("all_reduce", "mesh2d", 25, (5, 5)), 1 << 28, dojo)
    assert mesh.steps < ring.steps and mesh.seconds < ring.seconds


def _fails(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("boom on rank one")


def test_a_failing_rank_ends_the_run_with_its_error() -> None:
    with pytest.raises(HwportError, match=r"rank 1 failed: .*boom on rank one"):
        coll.launch(2, _fails, timeout=30)


def test_bad_requests() -> None:
    with pytest.raises(HwportError, match="algorithm 'tree' is not defined"):
        coll.schedule("all_to_all", "tree", 4)
    with pytest.raises(HwportError, match="must be one of"):
        coll.schedule("all_sum", "ring", 4)
    with pytest.raises(HwportError, match="send_recv: ranks=3 must be 2"):
        coll.schedule("send_recv", "direct", 3)


def test_cli_collectives(tmp_path: Any) -> None:
    env = {**os.environ, "HWPORT_CACHE": str(tmp_path)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hwport.cli", "collectives", *args],
                              capture_output=True, text=True, env=env, timeout=600)

    r = cli("-b", "simgpu", "--world-size", "2", "--sizes", "1K,1G", "--reduction-format",
            "bf16", "--json", "-")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    small, big = data["sizes"]
    assert small["bytes"] == 1024 and big["bytes"] == 1 << 30
    assert 0 < small["measured"]["max_relative_error"] < 0.02  # bf16 sums: measurably off
    assert small["measured"]["ranks_agree"] and "measured" not in big
    v = cli("--validate")
    assert v.returncode == 0 and "nccl-tests" in v.stdout and "error +" in v.stdout
    bad = cli("-b", "dojo", "--op", "all_reduce", "--algorithm", "tree")
    assert bad.returncode == 1 and "declares all_reduce algorithms" in bad.stderr
    assert "is not a size" in cli("--sizes", "lots").stderr
