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
from torch import nn

from hwport import plugins, porting, runner
from hwport.errors import HwportError, UnknownNameError
from hwport.pipeline import Pipeline
from hwport.recipes import FP8Scaling, LossScaling, Mitigation
from hwport.reproduce import REPRODUCTIONS

pytestmark = pytest.mark.usefixtures("reference_cache")


# autocast fp16 without GradScaler, on least squares whose gradients lie below fp16's range
FP16_UNSCALED = next(r.recipe for r in REPRODUCTIONS if r.name == "fp16-loss-scaling")


def test_mitigations_are_registered_plugins_and_validated() -> None:
    names = set(plugins.registry().mitigations)
    assert {"loss-scaling", "fp32-master-weights", "stochastic-updates", "kahan-updates",
            "fp32-sensitive-ops", "fp8-delayed-scaling", "fp8-current-scaling",
            "cfp8-bias-selection", "lr-warmup"} <= names
    with pytest.raises(HwportError, match="unknown recipe fields \\['wieghts'\\]"):
        Mitigation("typo", "", {"wieghts": "fp32"})
    with pytest.raises(HwportError, match="unknown signals"):
        Mitigation("bad", "", {"weights": "fp32"}, signals=("vibes",))


def test_a_policy_change_keeps_the_recipes_other_settings() -> None:
    m = plugins.registry().mitigations
    fast = next(r.recipe for r in REPRODUCTIONS if r.name == "saturating-loss-scaler")
    # the recipe's own scaler keeps its schedule; only the overflow check changes
    assert m["loss-scaling"].apply(fast).loss_scaling == LossScaling(growth_interval=20,
                                                                     check="overflow_flags")
    # a recipe with no scaler gets the policy's defaults
    assert m["loss-scaling"].apply(FP16_UNSCALED).loss_scaling == \
        LossScaling(check="overflow_flags")
    fp8 = plugins.registry().recipe("fp8-hybrid")
    assert m["cfp8-bias-selection"].apply(fp8).fp8_scaling == \
        FP8Scaling(history=0, mechanism="bias")
    with pytest.raises(HwportError, match=r"unknown recipe fields \['loss_scaling\.chek'\]"):
        Mitigation("typo", "", {"loss_scaling.chek": "overflow_flags"})


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
    result = porting.port("simgpu", "tiny-gradients", FP16_UNSCALED, budget=3)
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
    result = porting.port("simgpu", "tiny-gradients", "fp32", budget=3)
    assert (result.outcome_before, result.effort, result.trials) == ("converged", 0, 1)
    assert result.mitigations == []


def test_inference_is_not_offered_training_mitigations() -> None:
    """A weight-update or gradient policy cannot change a forward pass: an inference port
    only tries what acts on the forward pass."""
    fp8_unscaled = next(r.recipe for r in REPRODUCTIONS if r.name == "fp8-scaling")
    tried: list[tuple[str, ...]] = []
    result = porting.port("simgpu", "tiny-gradients", fp8_unscaled, "infer", budget=8,
                          on_trial=lambda t: tried.append(t.mitigations))
    assert result.outcome_before == "degraded" and len(tried) > 2
    offered = {m for t in tried for m in t}
    # two policies for the same field are never tried together (one would undo the other)
    assert ("fp8-current-scaling", "fp8-delayed-scaling") not in tried
    assert offered <= {"fp32-sensitive-ops", "fp8-delayed-scaling", "fp8-current-scaling"}
    assert "cfp8-bias-selection" in result.not_applicable  # simgpu has no CFP8 bias
    assert "loss-scaling" not in result.not_applicable  # not a backend's lack: not offered
    # the recipe already keeps softmax, norms and loss in fp32: that mitigation changes
    # nothing and is never run; the two scalings are; no pair makes a new recipe
    assert ("fp32-sensitive-ops",) not in tried
    assert result.trials == 3 and result.searched_all and result.effort is None
    with pytest.raises(HwportError, match="modes \\['serve'\\]"):
        Mitigation("bad", "", {"weights": "fp32"}, modes=("serve",))


def test_budget_exhausted_says_so() -> None:
    # only mitigations that cannot help: the search spends its budget and reports no fix
    result = porting.port("simgpu", "tiny-gradients", FP16_UNSCALED, budget=2,
                          mitigations=["lr-warmup", "fp32-master-weights"])
    assert result.effort is None and result.trials == 2 and not result.searched_all
    assert result.outcome_after == "stalled"
    assert len(result.rejected) == 1 and result.rejected[0].outcome == "stalled"


def test_bad_arguments() -> None:
    with pytest.raises(UnknownNameError, match="mitigation"):
        porting.port("simgpu", "tiny-gradients", "fp32", mitigations=["nope"])
    with pytest.raises(HwportError, match="budget 0"):
        porting.port("simgpu", "tiny-gradients", "fp32", budget=0)


def test_cli_port_json(tmp_path: Path) -> None:
    env = {**os.environ, "HWPORT_CACHE": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "hwport.cli", "port", "-b", "simgpu", "-p",
                        "tiny-gradients", "--recipe", "amp-fp16", "--budget",
                        "2", "--json", "-"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    data: dict[str, Any] = json.loads(r.stdout)
    assert data["backend"] == "simgpu" and data["recipe"] == "amp-fp16"
    # amp-fp16 already scales the loss: the tiny gradients survive and it ports as is
    assert data["outcome_before"] == "converged" and data["effort"] == 0
    assert "trial (as written): converged" in r.stderr


def test_compare_port_gives_every_cell_its_effort() -> None:
    """The comparison's story in miniature: training needs loss scaling on both chips,
    inference ports as is."""
    comparison = runner.compare(["simgpu", "dojo"], ["tiny-gradients"], recipe=FP16_UNSCALED)
    found = {(p.backend, p.mode): p for p in porting.efforts(comparison, budget=3)}
    for backend in ("simgpu", "dojo"):
        train, infer = found[backend, "train"], found[backend, "infer"]
        assert (train.outcome_before, train.outcome_after) == ("stalled", "converged")
        assert [m["name"] for m in train.mitigations] == ["loss-scaling"]
        assert train.effort == 1
        assert (infer.outcome_before, infer.effort, infer.trials) == ("parity", 0, 1)


def test_cli_compare_port(tmp_path: Path) -> None:
    env = {**os.environ, "HWPORT_CACHE": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "hwport.cli", "compare", "--backends",
                        "simgpu", "--pipelines", "tiny-gradients", "--recipe", "amp-fp16",
                        "--port", "--json", "-"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert [(p["mode"], p["effort"]) for p in data["port"]] == [("train", 0), ("infer", 0)]
    assert len(data["cells"]) == 2


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
