"""Porting: mitigations as data, the diagnosis, and the search on a case where the answer is
known from first principles (fp16 gradients below its smallest subnormal)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hwport import plugins, porting
from hwport.errors import HwportError, UnknownNameError
from hwport.pipeline import Pipeline
from hwport.recipes import Mitigation, Recipe

pytestmark = pytest.mark.usefixtures("reference_cache")


# fp16 with no loss scaling: every op in fp16, gradients too
FP16_UNSCALED = Recipe("fp16-unscaled", "fp16 everywhere, no loss scaling",
                       matmul_input="fp16", activations="fp16", gradients="fp16")
TINY = 2.0**-30  # the loss's weight: its gradients sit far below fp16's 2**-24


def tiny_gradients(steps: int = 60) -> Pipeline:
    """Least squares whose loss is multiplied by 2**-30 (a loss averaged over a huge batch,
    say): in fp32 Adam does not care about the gradient's scale and fits; in fp16 every
    gradient rounds to zero and nothing moves."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)

    def batches(seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield x, y

    def evaluate(m: nn.Module) -> dict[str, float]:
        return {"val_loss": float(F.mse_loss(m(x), y))}

    return Pipeline(name="tiny-gradients", model=lambda: nn.Linear(8, 1, bias=False),
                    optimizer=lambda ps: torch.optim.Adam(ps, lr=0.05), batches=batches,
                    loss=lambda m, b: F.mse_loss(m(b[0]), b[1]) * TINY, evaluate=evaluate,
                    predict=lambda m: m(x), steps=steps, eval_every=steps)


def test_mitigations_are_registered_plugins_and_validated() -> None:
    names = set(plugins.registry().mitigations)
    assert {"loss-scaling", "fp32-master-weights", "stochastic-updates", "kahan-updates",
            "fp32-sensitive-ops", "fp8-delayed-scaling", "fp8-current-scaling",
            "cfp8-bias-selection", "lr-warmup"} <= names
    with pytest.raises(HwportError, match="unknown recipe fields \\['wieghts'\\]"):
        Mitigation("typo", "", {"wieghts": "fp32"})
    with pytest.raises(HwportError, match="unknown signals"):
        Mitigation("bad", "", {"weights": "fp32"}, signals=("vibes",))


def test_capabilities_decide_what_applies() -> None:
    reg = plugins.registry()
    m = reg.mitigations
    dojo, simgpu = plugins.get_backend("dojo"), plugins.get_backend("simgpu")
    assert m["cfp8-bias-selection"].applies_to(dojo)
    assert not m["cfp8-bias-selection"].applies_to(simgpu)
    assert m["fp8-delayed-scaling"].applies_to(simgpu)
    assert not m["fp8-delayed-scaling"].applies_to(dojo)
    assert m["kahan-updates"].applies_to(dojo) and m["kahan-updates"].applies_to(simgpu)


def test_fp16_without_loss_scaling_stalls_and_the_search_finds_loss_scaling() -> None:
    """The failure and the fix: unscaled fp16 loses every gradient (underflow telemetry says
    so), and the search, led by that evidence, needs exactly dynamic loss scaling."""
    p = tiny_gradients()
    result = porting.port("simgpu", p, FP16_UNSCALED, budget=3)
    assert result.outcome_before == "stalled"
    assert "gradient_underflow" in result.evidence
    assert result.outcome_after == "converged"
    assert [m["name"] for m in result.mitigations] == ["loss-scaling"]
    assert "underflowed" in result.mitigations[0]["evidence"]
    assert result.trials == 2 and result.effort == 1  # evidence first: one guess, right
    d = result.to_dict()
    assert {"backend", "pipeline", "mode", "outcome_before", "outcome_after", "mitigations",
            "trials"} <= d.keys()
    json.dumps(d, allow_nan=False)


def test_a_cell_at_parity_costs_one_run_and_no_effort() -> None:
    p = tiny_gradients()
    result = porting.port("simgpu", p, "fp32", budget=3)
    assert (result.outcome_before, result.effort, result.trials) == ("converged", 0, 1)
    assert result.mitigations == []


def test_budget_exhausted_says_so() -> None:
    p = tiny_gradients()
    # only mitigations that cannot help: the search spends its budget and reports no fix
    result = porting.port("simgpu", p, FP16_UNSCALED, budget=2,
                          mitigations=["lr-warmup", "fp32-master-weights"])
    assert result.effort is None and result.trials == 2
    assert result.outcome_after == "stalled"
    assert len(result.rejected) == 1 and result.rejected[0].outcome == "stalled"


def test_bad_arguments() -> None:
    with pytest.raises(UnknownNameError, match="mitigation"):
        porting.port("simgpu", tiny_gradients(), "fp32", mitigations=["nope"])
    with pytest.raises(HwportError, match="budget 0"):
        porting.port("simgpu", tiny_gradients(), "fp32", budget=0)


def test_cli_port_json(tmp_path: Path) -> None:
    env = {**os.environ, "HWPORT_CACHE": str(tmp_path), "PYTHONPATH": str(Path(__file__).parent)}
    r = subprocess.run([sys.executable, "-m", "hwport.cli", "port", "-b", "simgpu", "-p",
                        "test_porting:tiny_gradients", "--recipe", "amp-fp16", "--budget",
                        "2", "--json", "-"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    data: dict[str, Any] = json.loads(r.stdout)
    assert data["backend"] == "simgpu" and data["recipe"] == "amp-fp16"
    # amp-fp16 already scales the loss: the tiny gradients survive and it ports as is
    assert data["outcome_before"] == "converged" and data["effort"] == 0
    assert "trial (as written): converged" in r.stderr


def constant_gradient(steps: int) -> Pipeline:
    """One weight at 1.0, a constant gradient of 1, plain SGD with lr 2**-12: each update is a
    sixteenth of bf16's spacing at 1.0 (2**-7 above 1), so nearest rounding loses every one."""
    x = torch.ones(1, 1)

    def batches(seed: int) -> Iterator[torch.Tensor]:
        while True:
            yield x

    def model() -> nn.Module:
        m = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            m.weight.fill_(1.0)
        return m

    return Pipeline(name="constant-gradient", model=model,
                    optimizer=lambda ps: torch.optim.SGD(ps, lr=2.0**-12), batches=batches,
                    loss=lambda m, b: m(b).sum(), evaluate=lambda m: {"val_loss": 0.0},
                    predict=lambda m: m(x), steps=steps, eval_every=steps)


@pytest.mark.parametrize(("kahan", "expected"), [(False, 1.0), (True, 1.0 - 2.0**-8 * 2)])
def test_kahan_updates_recover_what_nearest_rounding_loses(kahan: bool, expected: float) -> None:
    from test_engine import emulator, train

    rec = dataclasses.replace(plugins.registry().recipe("pure-bf16"), kahan_updates=kahan)
    em = emulator("simgpu", rec)
    model, _ = train(em, constant_gradient(32), 32)
    # 32 updates of -2**-12 sum to -2**-7: two ulps below 1.0 (spacing 2**-8 there)
    assert model.weight.item() == expected
    lost = em.telemetry.to_dict()["lost_update_fraction"]
    if kahan:
        assert lost < 1.0
    else:
        assert lost == 1.0


def test_warmup_ramps_the_learning_rate() -> None:
    from test_engine import emulator, train

    rec = dataclasses.replace(plugins.registry().recipe("amp-bf16"), warmup_steps=4)
    seen: list[float] = []
    train(emulator("simgpu", rec), constant_gradient(6), 6,
          after_step=lambda m, opt: seen.append(opt.param_groups[0]["lr"]))
    base = 2.0**-12
    assert seen == [base / 4, base / 2, base * 3 / 4, base, base, base]
