"""Data-parallel JAX over virtual CPU devices: torch.distributed's bits, torch's outcomes."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from hwport import collectives, jaxparallel, plugins, runner

pytestmark = pytest.mark.usefixtures("reference_cache")


@pytest.mark.parametrize(("algorithm", "shape"), [("ring", ()), ("tree", ()), ("mesh2d", (2, 2))])
def test_device_all_reduce_has_the_bits_of_gloo_ranks(algorithm: str, shape: tuple[int, ...]
                                                     ) -> None:
    """The same schedule run with lax.ppermute on 4 JAX devices and with torch.distributed
    point-to-point calls on 4 gloo processes: every rank ends with the same bits (bf16
    additions, so the order of every addition shows; 1001 elements split unevenly)."""
    n = 1001
    inputs = np.stack([collectives._inputs(3, r, n, "bf16").numpy() for r in range(4)])
    got = jaxparallel.all_reduce(algorithm, inputs, "bf16", shape)
    want = collectives.launch(4, collectives._job, "all_reduce", algorithm, "bf16", n, 3,
                              shape)
    assert np.array_equal(got.view(np.uint32), np.stack([w.numpy() for w in want]).view(
        np.uint32))
    exact = inputs.astype(np.float64).sum(0)
    assert 0 < np.abs(got[0] - exact).max() < 0.05 * np.abs(exact).max()  # bf16: off, a little


def test_rounds_are_permutations_in_the_order_ranks_add() -> None:
    for algorithm, ranks in [("ring", 5), ("tree", 6), ("mesh2d", 6)]:
        sched = collectives.schedule("all_reduce", algorithm, ranks)
        plan = jaxparallel.rounds(sched)
        assert len(plan) == len(sched.steps)
        for step, rounds in zip(sched.steps, plan, strict=True):
            assert sum(len(r.perm) for r in rounds) == len(step)
            for r in rounds:
                assert len({s for s, _ in r.perm}) == len({d for _, d in r.perm}) == len(r.perm)
            for dst in range(ranks):  # a rank's receives keep execute's (source, chunk) order
                order = [(s, r.send[s]) for r in rounds for s, d in r.perm if d == dst]
                assert order == sorted(order)


def test_jax_data_parallel_agrees_with_torch_and_shows_a_bf16_reduction() -> None:
    """Two JAX devices against two torch ranks on a Dojo variant reducing in bf16: the same
    outcome, the reduction's error at bf16's precision in both, the same bytes and cost."""
    dojo = plugins.get_backend("dojo")
    bf16 = dataclasses.replace(dojo, name="dojo-bf16-reduce", interconnect=dataclasses.replace(
        dojo.interconnect, reduction_format="bf16"))
    j = runner.run(bf16, "lm", "train", "amp-bf16", steps=3, world_size=2, framework="jax")
    t = runner.run(bf16, "lm", "train", "amp-bf16", steps=3, world_size=2)
    assert j.framework == "jax" and j.outcome == t.outcome
    jc, tc = j.collectives, t.collectives
    assert jc["reduction_format"] == "bf16" and jc["algorithm"] == "mesh2d"
    for c in (jc, tc):
        assert 1e-4 < c["gradient_error"]["max_relative"] < 1e-2
    for k in ("bytes_per_step", "predicted_s_per_step", "world_size"):
        assert jc[k] == tc[k]
    assert j.metrics["val_loss"] == pytest.approx(t.metrics["val_loss"], rel=2e-3)
    assert len(j.curve) == 3 and j.telemetry["rounding"]
    json.dumps(j.to_dict(), allow_nan=False)
