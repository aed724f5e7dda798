"""Every run's memory plan and step time: measured from the run, placed by the spec."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hwport import plugins, profile, runner
from hwport.recipes import Recipe, lower

pytestmark = pytest.mark.usefixtures("reference_cache")

# 18 layers of the lm at context 256: about 460 MB of activations saved for backward
DEEP = {"context": 256, "d_model": 128, "layers": 18, "batch_size": 16}


def test_dojo_and_dataflow_place_the_same_run_differently() -> None:
    """The activations fit in the dataflow chip's on-chip SRAM but not in a D1's: on Dojo
    the rest streams from the DIP HBM, whose bandwidth then costs step time."""
    dojo, dataflow = plugins.get_backend("dojo"), plugins.get_backend("dataflow")
    got = {b: runner.run(b, "lm", "train", "amp-bf16", steps=1, options=DEEP, capture=False)
           for b in ("dojo", "dataflow")}
    acts = got["dojo"].memory["bytes"]["activations"]
    assert got["dataflow"].memory["bytes"]["activations"] == acts  # the same run
    # why, from the specs: 354 x 1.25 MB of SRAM per D1 < acts < 1,040 x 0.5 MB per SN40L
    assert dojo.memory.tiers[0].total_capacity < acts < dataflow.memory.tiers[0].total_capacity
    assert got["dataflow"].memory["placement"]["activations"] == {"sram": acts}
    on_dojo = got["dojo"].memory["placement"]["activations"]
    assert on_dojo["sram"] == dojo.memory.tiers[0].total_capacity
    assert on_dojo["dip_hbm"] == pytest.approx(acts - on_dojo["sram"])
    assert got["dojo"].memory["binding"] == "sram"
    # the step reads its activations where most of them live: HBM on Dojo, SRAM on dataflow
    assert got["dojo"].time["memory_s"]["dip_hbm"] > 0
    assert got["dataflow"].time["memory_s"]["hbm"] == 0
    for r in got.values():
        assert r.memory["fits"] and 0 < r.time["peak_fraction"] <= 1
        json.dumps(r.to_dict(), allow_nan=False)


def test_storage_formats_decide_the_bytes() -> None:
    """The same model's weights cost half as much in 8 bits as in 16, a quarter of fp32."""
    spec = plugins.get_backend("simgpu")
    p = runner.resolve_pipeline("digits", 1)
    sizes = {}
    for w in ("fp32", "bf16", "e4m3fn"):
        rec = Recipe(f"w-{w}", "", weights=w, matmul_input="bf16", activations="bf16")
        plan, _ = profile.measure(p, p.model(), lower(rec, spec), "train")
        sizes[w] = plan.bytes["weights"]
    assert sizes["fp32"] == 2 * sizes["bf16"] == 4 * sizes["e4m3fn"]
    n = sum(q.numel() for q in p.model().parameters())
    assert sizes["fp32"] == 4 * n


def test_the_step_time_follows_the_peaks() -> None:
    """FLOPs are counted by torch's own formulas; an 8-bit matmul format is timed against
    its own peak (simgpu: twice bf16's)."""
    spec = plugins.get_backend("simgpu")
    p = runner.resolve_pipeline("lm", 1, {"d_model": 256, "context": 256})
    times = {}
    for fmt in ("bf16", "e4m3fn"):
        rec = Recipe(f"mm-{fmt}", "", matmul_input=fmt, activations="bf16")
        _, t = profile.measure(p, p.model(), lower(rec, spec), "train")
        times[fmt] = t
        assert t.flops[fmt] > 0 and t.step_s > 0
    assert times["e4m3fn"].flops["e4m3fn"] == times["bf16"].flops["bf16"]
    assert times["e4m3fn"].compute_s == pytest.approx(times["bf16"].compute_s / 2, rel=0.3)
    assert times["e4m3fn"].bytes_moved < times["bf16"].bytes_moved


def test_inference_and_the_reference() -> None:
    r = runner.run("dataflow", "digits", "infer", "amp-bf16", steps=20)
    assert r.memory["bytes"]["activations"] == 0 and r.memory["bytes"]["weights"] > 0
    assert r.memory["bytes"]["optimizer_state"] == 0
    ref = runner.run("reference", "digits", "train", "fp32", steps=20)
    assert ref.time["bound"] == "unbounded" and ref.time["peak_fraction"] is None
    json.dumps(ref.to_dict(), allow_nan=False)


def test_flops_and_bytes_of_a_linear_layer_counted_by_hand() -> None:
    """One 32 -> 16 linear layer on 64 rows, mean-squared error, bf16 everywhere:
    forward 2*64*32*16 FLOPs, the weight gradient as many (the input needs none); bytes
    are every tensor each op reads and writes at 2 bytes (views move nothing); autograd
    keeps the input for the weight gradient, and the loss its two operands."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from hwport.pipeline import Pipeline

    x, y = torch.randn(64, 32), torch.randn(64, 16)

    def batches(seed: int) -> Any:
        while True:
            yield x, y

    p = Pipeline("linear", model=lambda: nn.Linear(32, 16, bias=False),
                 optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), batches=batches,
                 loss=lambda m, b: F.mse_loss(m(b[0]), b[1]),
                 evaluate=lambda m: {"val_loss": 0.0}, predict=lambda m: m(x), steps=1)
    rec = Recipe("bf16", "", matmul_input="bf16", activations="bf16", weights="bf16",
                 gradients="bf16")
    plan, t = profile.measure(p, p.model(), lower(rec, plugins.get_backend("simgpu")), "train")
    assert t.flops == {"bf16": 2 * 2 * 64 * 32 * 16}
    assert plan.bytes["activations"] == 2 * (64 * 32 + 64 * 16 + 64 * 16)
    assert plan.bytes["weights"] == plan.bytes["gradients"] == 2 * 32 * 16
    assert plan.bytes["optimizer_state"] == 0  # plain SGD keeps nothing
    # forward: mm reads x and W, writes 64x16; the loss reads two 64x16, writes a scalar;
    # backward: the loss's gradient (reads the incoming scalar gradient, its two inputs,
    # writes 64x16), mm for the weight gradient (reads 64x16 and x, writes 32x16), and
    # the scalar seed of backward
    elements = (64 * 32 + 32 * 16 + 64 * 16) + (2 * 64 * 16 + 1) \
        + (1 + 2 * 64 * 16 + 64 * 16) + (64 * 16 + 64 * 32 + 32 * 16) + 1
    assert t.bytes_moved == pytest.approx(2 * elements, abs=16)
