"""The performance model for training at scale, against published tables and measurement."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hwport import estimate as est
from hwport import memory, plugins, published
from hwport.errors import HwportError


def test_parameter_counts_match_the_megatron_table() -> None:
    for r in published.MEGATRON_ROWS:
        model = est.GPT(r.layers, r.hidden, r.heads, 2048, 51200)
        assert round(model.params / 1e9, 1) == r.billions, r  # the table's own rounding


@pytest.mark.parametrize("check", [c for c in est.validate() if "ZeRO" in c.table],
                         ids=lambda c: c.row)
def test_zero_model_states_within_two_percent(check: est.Check) -> None:
    assert abs(check.error) <= 0.02, (check.predicted, check.published)


def test_megatron_throughput() -> None:
    """Calibrated on the first row (one constant, the sustained GEMM fraction), the other
    nine rows are predicted within 15%; the pure roofline over-predicts every row."""
    rows = [c for c in est.validate() if "Megatron" in c.table]
    assert len(rows) == 10
    assert abs(rows[0].error) < 0.01  # the calibration row
    for c in rows[1:]:
        assert abs(c.error) <= 0.15, (c.row, c.predicted, c.published)
    for c in est.validate(matmul_efficiency=1.0):
        if "Megatron" in c.table:
            assert c.predicted > c.published, c.row


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout that keeps a one-byte mask, as Megatron's fused kernels do (torch's CPU
    dropout keeps the mask in the input's dtype)."""
    keep = torch.rand(x.shape) >= p
    return x * keep * (1 / (1 - p))


class MegatronLayer(nn.Module):
    """One GPT block as Korthikanti et al. count it: pre-norm attention and MLP with
    dropout after the softmax, the projection and the MLP (no fused kernels)."""

    def __init__(self, h: int, a: int) -> None:
        super().__init__()
        self.a = a
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.up, self.down = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, b, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(s, b * self.a, 3 * h // self.a).transpose(0, 1) \
            .chunk(3, dim=-1)
        scores = torch.bmm(q, k.transpose(1, 2)) * (h // self.a) ** -0.5
        probs = dropout(torch.softmax(scores, dim=-1), 0.1)
        ctx = torch.bmm(probs, v).transpose(0, 1).reshape(s, b, h)
        x = x + dropout(self.proj(ctx), 0.1)
        return x + dropout(self.down(F.gelu(self.up(self.ln2(x)))), 0.1)


def test_korthikanti_activations_match_what_torch_saves() -> None:
    """sbh(34 + 5as/h) bytes for 16-bit activations, against the bytes autograd actually
    keeps for backward in a bf16 layer (unique storages, parameters excluded)."""
    s, b, h, a = 128, 2, 256, 4
    layer = MegatronLayer(h, a).to(torch.bfloat16)
    x = torch.randn(s, b, h, dtype=torch.bfloat16, requires_grad=True)
    with memory.SavedTensors(exclude=layer.parameters()) as saved:
        layer(x)
    model = est.GPT(1, h, a, s, 1)
    predicted = est.activations_per_layer(model, est.Parallelism(micro_batch=b), 2)
    assert predicted == s * b * h * (34 + 5 * a * s / h)
    assert saved.bytes == pytest.approx(predicted, rel=0.02)


def test_recompute_and_parallelism_shrink_activations() -> None:
    model = est.MODELS["gpt3-175b"]
    per = {name: est.activations_per_layer(model, est.Parallelism(**kw), 2) for name, kw in {
        "none": {}, "tp8": {"tensor": 8}, "tp8-sp": {"tensor": 8, "sequence_parallel": True},
        "selective": {"tensor": 8, "sequence_parallel": True, "recompute": "selective"},
        "full": {"recompute": "full"}}.items()}
    assert per["none"] > per["tp8"] > per["tp8-sp"] > per["selective"]
    assert per["full"] == 2 * 2048 * 12288
    # sequence parallelism divides everything by t (Korthikanti et al., eq. 4 and 5)
    assert per["tp8-sp"] == pytest.approx(per["none"] / 8)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tensor": 5}, "heads=96 is not divisible by tensor=5"),
    ({"pipeline": 7}, "layers=96 is not divisible by pipeline=7"),
    ({"global_batch": 10, "micro_batch": 4}, "global_batch=10 is not divisible by "
                                            "micro_batch x data = 4 x 1"),
    ({"zero": 4}, "zero=4 must be 0, 1, 2 or 3"),
    ({"recompute": "some"}, "recompute='some' must be one of"),
    ({"data": 0}, "data=0: must be positive"),
])
def test_bad_layouts_say_what_is_wrong(kwargs: dict[str, Any], message: str) -> None:
    kw: dict[str, Any] = {"global_batch": 8, **kwargs}
    with pytest.raises(HwportError, match=message.replace("(", r"\(")):
        par = est.Parallelism(**kw)
        est.estimate(est.MODELS["gpt3-175b"], par, plugins.get_backend("simgpu"),
                     plugins.registry().recipe("amp-bf16"))
    with pytest.raises(HwportError, match="hidden=100 is not divisible by heads=3"):
        est.GPT(2, 100, 3, 128, 1000)


def test_placement_follows_the_tiers_of_each_spec() -> None:
    """The same activations land in dataflow's on-chip SRAM and stream from Dojo's DIP HBM:
    dataflow has 1,040 x 0.5 MB of SRAM per chip, a D1 354 x 1.25 MB."""
    dojo, dataflow = plugins.get_backend("dojo"), plugins.get_backend("dataflow")
    sram = {s.name: s.memory.tiers[0].total_capacity for s in (dojo, dataflow)}
    assert sram["dojo"] < 480e6 < sram["dataflow"]
    roles = {"activations": 480e6, "weights": 100e6}
    on_dojo, on_dataflow = memory.plan(dojo, roles), memory.plan(dataflow, roles)
    assert on_dataflow.placement["activations"] == {"sram": 480e6}
    assert on_dataflow.tier_of("weights") == "hbm" and on_dataflow.binding == "sram"
    assert on_dojo.placement["activations"] == {"sram": sram["dojo"],
                                                "dip_hbm": 480e6 - sram["dojo"]}
    assert on_dojo.tier_of("weights") == "dip_hbm"
    # simgpu's shared memory is a per-kernel scratchpad and its L2 a cache: nothing stays
    on_gpu = memory.plan(plugins.get_backend("simgpu"), roles)
    assert on_gpu.tier_of("activations") == "hbm" and on_gpu.binding is None
    too_big = memory.plan(dojo, {"optimizer_state": 1e12})
    assert not too_big.fits and too_big.unplaced > 0


def test_gpt3_on_a_dgx_a_tile_and_an_sn40l_node() -> None:
    """The question the issue asks, per device: GPT-3 175B with ZeRO 3 and full recompute
    on 8 H100s, 25 D1s and 8 SN40L sockets."""
    model = est.MODELS["gpt3-175b"]
    rec = plugins.registry().recipe("amp-bf16")
    got = {}
    for name, devices in (("simgpu", 8), ("dojo", 25), ("dataflow", 8)):
        par = est.Parallelism(global_batch=devices, data=devices, zero=3, recompute="full")
        got[name] = est.estimate(model, par, plugins.get_backend(name), rec)
    # 16 bytes per parameter (fp32 weights, gradients and moments) over the devices
    for name, devices in (("simgpu", 8), ("dojo", 25), ("dataflow", 8)):
        states = got[name].memory.total - got[name].memory.bytes["activations"]
        assert states == pytest.approx(16 * model.params / devices)
    assert not got["simgpu"].memory.fits and got["simgpu"].memory.binding == "hbm"
    assert not got["dojo"].memory.fits  # 6.4 GB of DIP HBM per D1
    assert got["dataflow"].memory.fits  # 1.5 TB of DDR per socket
    assert got["dataflow"].memory.tier_of("optimizer_state") == "ddr"
    assert got["dojo"].devices_to_fit is not None and got["dojo"].devices_to_fit > 1000
    for e in got.values():
        assert e.step_s > 0 and 0 < e.mfu < 1
        json.dumps(e.to_dict(), allow_nan=False)


def test_cli_estimate(tmp_path: Any) -> None:
    env = {**os.environ, "HWPORT_CACHE": str(tmp_path)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hwport.cli", "estimate", *args],
                              capture_output=True, text=True, env=env, timeout=300)

    r = cli("--model", "gpt3-175b", "-b", "all", "--tensor", "8", "--global-batch", "8",
            "--recompute", "full", "--json", "-")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert {e["backend"] for e in data["estimates"]} >= {"simgpu", "dojo", "dataflow"}
    assert any(s.startswith("reference:") for s in data["skipped"])  # unbounded peak
    v = cli("--validate")
    assert v.returncode == 0 and "Narayanan" in v.stdout and "+0.0%" in v.stdout
    bad = cli("--model", "gpt3-175b", "--tensor", "5")
    assert bad.returncode == 1 and "heads=96 is not divisible by tensor=5" in bad.stderr
    assert "unknown model preset" in cli("--model", "gpt5").stderr
    assert "give --model or all of" in cli("--layers", "2").stderr


def test_a_spec_variant_changes_the_answer() -> None:
    """Memory figures drive the plan: double Dojo's DIP HBM and fewer D1s are needed."""
    dojo = plugins.get_backend("dojo")
    tiers = dojo.memory.tiers
    bigger = dataclasses.replace(dojo, name="dojo-2x", memory=dataclasses.replace(
        dojo.memory, tiers=(tiers[0], dataclasses.replace(tiers[1],
                                                          capacity=2 * tiers[1].capacity))))
    model, rec = est.MODELS["gpt3-6.7b"], plugins.registry().recipe("amp-bf16")
    par = est.Parallelism(zero=3, recompute="full")
    need = [est.estimate(model, par, s, rec).devices_to_fit for s in (dojo, bigger)]
    assert need[0] is not None and need[1] is not None and need[1] < need[0]
