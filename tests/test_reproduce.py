"""The published results, reproduced in their small (CI) configurations.

Each test asserts both sides: the failure (its outcome, and the telemetry that explains it,
measured in the run) and every fix; then the mechanism the paper names, in numbers."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hwport import plugins, reproduce
from hwport.errors import HwportError, UnknownNameError
from hwport.reproduce import REPRODUCTIONS, Reproduced

pytestmark = pytest.mark.usefixtures("reference_cache")


def small(name: str) -> Reproduced:
    (r,) = reproduce.reproduce([name], small=True)
    assert r.reproduction.name == name
    assert r.failure.outcome in r.reproduction.fails_with, r.problems
    assert r.reproduction.signal in r.evidence, r.problems
    for m, fixed in r.fixes.items():
        assert fixed.outcome == "converged", (m, fixed.metrics, fixed.reference_metrics)
    assert r.reproduced and r.problems == []
    json.dumps(r.to_dict(), allow_nan=False)
    return r


def rows(result: Any, prefix: str) -> dict[str, int]:
    """The rounding counters of ``result`` whose op class starts with ``prefix``, summed."""
    sel = [v for k, v in result.telemetry["rounding"].items() if k.startswith(prefix)]
    return {what: sum(v[what] for v in sel) for what in ("elements", "overflow", "underflow")}


def test_bf16_nearest_updates_fall_behind_and_stochastic_or_kahan_recover() -> None:
    r = small("bf16-updates")
    ref = r.failure.reference_metrics["val_loss"]
    assert r.failure.metrics["val_loss"] > 1.05 * ref
    # most updates vanish under nearest rounding; the fixes keep their effect in expectation
    # (stochastic) or exactly (Kahan), so both land on the reference's loss
    assert r.failure.telemetry["lost_update_fraction"] > 0.5
    for fixed in r.fixes.values():
        assert abs(fixed.metrics["val_loss"] - ref) < 0.01 * ref


def test_fp16_without_loss_scaling_underflows_and_loss_scaling_fixes_it() -> None:
    r = small("fp16-loss-scaling")
    before = rows(r.failure, "backward/")
    assert before["underflow"] > 0.9 * before["elements"] - 1_000  # nearly every gradient
    after = rows(r.fixes["loss-scaling"], "backward/")
    assert after["underflow"] < before["underflow"] / 10  # 97% of gradients -> about 5%
    # the scaler shifted the gradients: 2**16 at the start, no overflow to back off from
    assert r.fixes["loss-scaling"].telemetry["loss_scale"][0] == 2.0**16


def test_unscaled_fp8_flushes_gradients_and_per_tensor_scaling_fixes_it() -> None:
    r = small("fp8-scaling")
    before = rows(r.failure, "backward/matmul_input")
    assert before["underflow"] > 0.1 * before["elements"]
    for fixed in r.fixes.values():
        after = rows(fixed, "backward/matmul_input")
        assert after["underflow"] < 1e-3 * after["elements"]


def test_inf_based_scaler_is_blind_on_saturating_hardware_and_the_flag_check_is_not() -> None:
    r = small("saturating-loss-scaler")
    assert r.control is not None and r.control.outcome == "converged"
    fmax = plugins.get_backend("dojo").format("cfp16_shp_b15").max
    failed, fixed = r.failure.telemetry, r.fixes["loss-scaling"].telemetry
    # on dojo the scaler never saw an inf: no step skipped, the scale grew past the
    # format's largest value, and the backward pass saturated
    assert failed["skipped_steps"] == 0 and failed["loss_scale"][-1] > fmax
    assert rows(r.failure, "backward/")["overflow"] > 0
    # the same scaler on simgpu (fp16 overflows to inf) and the flag check on dojo back off
    assert r.control.telemetry["skipped_steps"] > 0
    assert fixed["skipped_steps"] > 0
    # both settle where the scaled gradients fit, a thousandth of the blind scaler's scale
    for settled in (fixed["loss_scale"][-1], r.control.telemetry["loss_scale"][-1]):
        assert settled < failed["loss_scale"][-1] / 2**10


def test_stochastic_rounding_in_software_where_the_hardware_has_none() -> None:
    """simgpu has no stochastic rounding: the hardware mitigation does not apply there, the
    software one does (at a higher effort) and recovers the same result as on Dojo."""
    m = plugins.registry().mitigations
    simgpu = plugins.get_backend("simgpu")
    assert not m["stochastic-updates"].applies_to(simgpu)
    assert m["software-stochastic-updates"].applies_to(simgpu)
    assert m["software-stochastic-updates"].effort > m["stochastic-updates"].effort
    base = next(r for r in REPRODUCTIONS if r.name == "bf16-updates")
    on_gpu = dataclasses.replace(base, name="bf16-updates-on-simgpu", backend="simgpu",
                                 fixes=("software-stochastic-updates",))
    (r,) = reproduce.reproduce([on_gpu], small=True)
    assert r.reproduced, r.problems
    fixed = r.fixes["software-stochastic-updates"]
    assert any("in software" in note for note in fixed.lowering)
    # the hardware mitigation is refused before anything runs: simgpu lacks what it needs
    with pytest.raises(HwportError, match="fix 'stochastic-updates' does not apply to "
                                          "training on simgpu"):
        reproduce.reproduce([dataclasses.replace(on_gpu, fixes=("stochastic-updates",))])


def test_a_claim_that_does_not_hold_is_reported_not_hidden() -> None:
    """A 'failure' that converges and a 'fix' that does not help: both are named."""
    base = next(r for r in REPRODUCTIONS if r.name == "fp16-loss-scaling")
    wrong = dataclasses.replace(base, name="wrong", recipe=plugins.registry().recipe("fp32"),
                                fixes=("lr-warmup",), small={"steps": 5})
    (r,) = reproduce.reproduce([wrong], small=True)
    assert not r.reproduced
    assert any("as ported it was converged" in p for p in r.problems)
    assert any("does not show gradient_underflow" in p for p in r.problems)


def test_unknown_reproduction() -> None:
    with pytest.raises(UnknownNameError, match="unknown reproduction 'nope'; known: "
                                               "bf16-updates"):
        reproduce.reproduce(["nope"])


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_cli_reproduce(tmp_path: Path, framework: str) -> None:
    env = {**os.environ, "HWPORT_CACHE": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "hwport.cli", "reproduce", "fp16-loss-scaling",
                        "--small", "--json", "-", "--framework", framework],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    (data,) = json.loads(r.stdout)
    assert data["name"] == "fp16-loss-scaling" and data["reproduced"] is True
    assert data["failure"]["outcome"] == "stalled"
    assert data["fixes"]["loss-scaling"]["outcome"] == "converged"
    assert "gradient_underflow" in data["evidence"]
    listed = subprocess.run([sys.executable, "-m", "hwport.cli", "reproduce", "--list"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert listed.returncode == 0
    for rep in REPRODUCTIONS:
        assert rep.name in listed.stdout


def test_reproduced_in_jax_as_in_torch() -> None:
    """The JAX twins through the JAX engine reproduce the same failures and fixes, with the
    same evidence (the same gradients underflow; the same share of updates is lost)."""
    names = ["fp16-loss-scaling", "bf16-updates"]
    in_jax = reproduce.reproduce(names, small=True, framework="jax")
    in_torch = reproduce.reproduce(names, small=True)
    for j, t in zip(in_jax, in_torch, strict=True):
        assert j.reproduced, j.problems
        assert j.failure.framework == "jax" and j.failure.outcome == t.failure.outcome
        assert {m: c.outcome for m, c in j.fixes.items()} == \
            {m: c.outcome for m, c in t.fixes.items()}
        assert j.evidence[j.reproduction.signal] == t.evidence[t.reproduction.signal]
