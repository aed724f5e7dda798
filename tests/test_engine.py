"""The torch engine: that recipes are really applied, op by op, to what a program computes.

Oracles are independent of the engine: torch's own bf16 conversion, ``hwport.quantize``
(tested against exact arithmetic in test_quantize.py) and exact sums in Python.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hwport
from hwport import runner
from hwport.engine import Emulator
from hwport.formats import FloatFormat
from hwport.pipeline import Pipeline
from hwport.recipes import LossScaling, Recipe, builtin, lower

TRAIN_OUTCOMES = {"converged", "degraded", "stalled", "diverged"}


pytestmark = pytest.mark.usefixtures("reference_cache")


# -- helpers ---------------------------------------------------------------------------------
def bf16_oracle(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.bfloat16).to(t.dtype)


def hwport_oracle(fmt: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: hwport.quantize(t.detach(), fmt)


def representable(t: torch.Tensor, oracle: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether every element of ``t`` is a value of the oracle's format (NaN counts)."""
    q = oracle(t)
    return bool(((q == t) | (q.isnan() & t.isnan())).all())


def float_tensors(x: Any) -> list[torch.Tensor]:
    items = x if isinstance(x, tuple | list) else (x,)
    out: list[torch.Tensor] = []
    for i in items:
        if isinstance(i, tuple | list):
            out.extend(float_tensors(i))
        elif isinstance(i, torch.Tensor) and i.is_floating_point():
            out.append(i)
    return out


class Recorder:
    """Wraps ``em.dispatch``: checks the outputs of every op of the forward and backward
    phases against ``oracle`` as the op returns them."""

    def __init__(self, em: Emulator, oracle: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.em, self.oracle, self.orig = em, oracle, em.dispatch
        self.bad: list[str] = []
        self.checked: Counter[str] = Counter()
        self.fp32_ops: Counter[str] = Counter()
        self.fp32_unrepresentable = 0
        self.promoted: Counter[str] = Counter()
        em.dispatch = self  # type: ignore[method-assign]

    def __call__(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        inputs_ok = all(representable(t, self.oracle) for t in float_tensors(args))
        had_inputs = bool(float_tensors(args))
        out = self.orig(func, args, kwargs)
        phase = self.em.phase
        if phase not in ("forward", "backward"):
            return out
        kind = self.em.kind(func)
        outs = float_tensors(out)
        if kind == "fp32":
            self.fp32_ops[str(func)] += 1
            self.fp32_unrepresentable += sum(not representable(o, self.oracle) for o in outs)
            return out
        if (kind == "pass" and not (had_inputs and inputs_ok)) or "empty" in str(func):
            # moving values that are not in the format (a view of an fp32 output), or memory
            # allocated uninitialised
            return out
        if kind == "compute" and self.em.recipe.autocast and not (had_inputs and inputs_ok):
            # autocast: an op with an fp32 input computes and stays in fp32
            self.promoted[str(func)] += 1
            return out
        for o in outs:
            self.checked[f"{phase}/{kind}"] += 1
            if not representable(o, self.oracle):
                self.bad.append(f"{phase} {func} ({kind})")
        return out


def digits(steps: int = 5, **options: Any) -> Pipeline:
    return runner.resolve_pipeline("digits", steps, {"hidden": 32, **options})


def emulator(backend: str, recipe: str | Recipe, seed: int = 0) -> Emulator:
    rec = builtin(recipe) if isinstance(recipe, str) else recipe
    return Emulator(lower(rec, hwport.get_backend(backend)), seed)


def train(em: Emulator, p: Pipeline, steps: int,
          after_step: Callable[[nn.Module, torch.optim.Optimizer], None] | None = None,
          before: Callable[[], None] | None = None) -> tuple[nn.Module, list[float]]:
    """The runner's training loop, with a hook after each step."""
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(em.seed)
        model = p.model()
        batches = p.batches(em.seed)
        with em.active():
            em.prepare(model)
            optimizer = p.optimizer(model.parameters())
            if before:
                before()
            for _ in range(steps):
                with em.phase_("control"):
                    batch = next(batches)
                losses.append(em.train_step(model, p.loss, batch, optimizer))
                if after_step:
                    with em.phase_("control"):
                        after_step(model, optimizer)
    return model, losses


# -- emulation is really applied ---------------------------------------------------------------
def test_amp_bf16_rounds_every_op_output_except_fp32_groups() -> None:
    em = emulator("simgpu", "amp-bf16")
    assert not em.native
    p = digits()
    rec: list[Recorder] = []
    params_bad: list[str] = []

    def check_params(model: nn.Module, _: torch.optim.Optimizer) -> None:
        params_bad.extend(n for n, q in model.named_parameters()
                          if not representable(q, bf16_oracle))  # autocast: fp32 params

    _, losses = train(em, p, 4, check_params, lambda: rec.append(Recorder(em, bf16_oracle)))
    r = rec[0]
    assert not r.bad, r.bad[:10]
    assert r.checked["forward/matmul"] and r.checked["backward/matmul"]
    assert r.checked["backward/compute"]  # bias gradients (sum)
    # the fp32 groups (log-softmax, NLL loss) ran and really stayed fp32
    assert any("log_softmax" in k for k in r.fp32_ops)
    assert any("nll_loss" in k for k in r.fp32_ops)
    assert r.fp32_unrepresentable > 0
    # autocast keeps the parameters in fp32 (matmuls cast them): they leave bf16's grid
    assert params_bad
    assert all(math.isfinite(v) for v in losses)


def test_pure_bf16_rounds_everything_and_loses_updates() -> None:
    em = emulator("simgpu", "pure-bf16")
    p = digits()
    rec: list[Recorder] = []
    bad_state: list[str] = []

    def check(model: nn.Module, opt: torch.optim.Optimizer) -> None:
        for n, q in model.named_parameters():
            if not representable(q, bf16_oracle):
                bad_state.append(f"param {n}")
            for k, v in opt.state[q].items():
                if k != "step" and isinstance(v, torch.Tensor) and \
                        not representable(v, bf16_oracle):
                    bad_state.append(f"state {n}.{k}")

    train(em, p, 4, check, lambda: rec.append(Recorder(em, bf16_oracle)))
    r = rec[0]
    assert not r.bad, r.bad[:10]
    assert not r.fp32_ops  # no fp32 groups in pure-bf16: softmax and loss are rounded too
    assert r.checked["forward/compute"] or r.checked["forward/matmul"]
    assert not bad_state, bad_state[:10]
    t = em.telemetry.to_dict()
    assert t["updates_attempted"] > 0
    assert t["updates_lost"] > 0
    assert 0 < t["lost_update_fraction"] < 1


def test_pure_bf16_does_not_round_the_optimizer_step_counter() -> None:
    """AdamW keeps its step count in an fp32 tensor whatever the parameters' dtype (a real
    bf16 program's ``state['step']`` counts past 256); bias correction depends on it."""
    em = emulator("simgpu", "pure-bf16")
    p = digits()
    seen: list[float] = []

    def bump(model: nn.Module, opt: torch.optim.Optimizer) -> None:
        step = opt.state[next(model.parameters())]["step"]
        seen.append(float(step))
        if float(step) == 1:  # jump ahead, as if 255 more steps had run
            for s in opt.state.values():
                s["step"].fill_(256.0)

    train(em, p, 3, bump)
    assert seen == [1.0, 257.0, 258.0]


def test_dojo_amp_fp16_lowers_to_cfloat16_and_rounds_to_it() -> None:
    lowered = lower(builtin("amp-fp16"), hwport.get_backend("dojo"))
    notes = " | ".join(lowered.notes)
    assert "fp16 -> cfp16_shp_b15" in notes
    assert lowered.recipe.matmul_input == "cfp16_shp_b15"
    assert lowered.recipe.activations == "cfp16_shp_b15"
    em = Emulator(lowered)
    oracle = hwport_oracle("cfp16_shp_b15")
    rec: list[Recorder] = []
    params_bad: list[str] = []

    last_params: list[torch.Tensor] = []

    def check_params(model: nn.Module, _: torch.optim.Optimizer) -> None:
        params_bad.extend(n for n, q in model.named_parameters() if not representable(q, oracle))
        last_params[:] = [q.detach().clone() for q in model.parameters()]

    train(em, digits(), 4, check_params, lambda: rec.append(Recorder(em, oracle)))
    r = rec[0]
    assert not r.bad, r.bad[:10]
    assert r.checked["forward/matmul"] and r.checked["backward/matmul"]
    assert r.fp32_unrepresentable > 0
    assert params_bad  # autocast keeps parameters in fp32; matmuls cast them
    assert em.telemetry.loss_scale[0] == 2.0**16


# -- narrow accumulators ------------------------------------------------------------------------
def accumulate_oracle(a: np.ndarray, b: np.ndarray, acc: FloatFormat,
                      group: int = 32) -> np.ndarray:
    """Sum K in groups of ``group`` products, each group exactly (float64: exact for these
    inputs), and round the running sum to ``acc`` after each group."""
    m, k = a.shape
    n = b.shape[1]
    out = np.zeros((m, n))
    for i in range(m):
        for j in range(n):
            running = 0.0
            for k0 in range(0, k, group):
                g = math.fsum(float(a[i, kk]) * float(b[kk, j])
                              for kk in range(k0, min(k0 + group, k)))
                running = float(hwport.quantize(running + g, acc))
            out[i, j] = running
    return out


def narrow_spec(acc: FloatFormat, matmul_input: str = "bf16") -> hwport.BackendSpec:
    """simgpu with ``acc`` as the accumulator of ``matmul_input`` products."""
    sim = hwport.get_backend("simgpu")
    prec = dataclasses.replace(
        sim.precision, formats=(*sim.precision.formats, acc.name),
        accumulators={**sim.precision.accumulators, matmul_input: acc.name})
    return dataclasses.replace(sim, name="narrowacc", formats=(*sim.formats, acc),
                               precision=prec)


def test_narrow_accumulator_drops_small_addends() -> None:
    acc = FloatFormat("e8m4", 8, 4, 127)  # half an ulp of 1.0: 2**-5
    spec = narrow_spec(acc)
    recipe = Recipe("acc-test", "bf16 matmul inputs, fp32 outputs", matmul_input="bf16")
    em = Emulator(lower(recipe, spec))
    assert em.accumulator == acc
    tiny = 2.0**-12  # a bf16 value; 32 of them (2**-7) are still below half an ulp of 1.0
    a = torch.full((2, 1024), tiny)
    a[0, 0] = 1.0
    g = torch.Generator().manual_seed(0)
    a[1] = bf16_oracle(torch.rand(1024, generator=g))
    b = torch.ones(1024, 3)
    b[:, 1:] = bf16_oracle(torch.randn(1024, 2, generator=g))
    with em.active(), em.phase_("forward"):
        got = a @ b
    exact = a.double() @ b.double()
    want = accumulate_oracle(a.double().numpy(), b.double().numpy(), acc)
    assert got[0, 0].item() == 1.0  # every group of tiny products was rounded away
    assert exact[0, 0].item() == 1.0 + 1023 * tiny
    assert torch.equal(got.double(), torch.from_numpy(want))
    assert not torch.equal(got, a @ b)  # differs from the fp32 result
    assert em.telemetry.rounding["forward/accumulator"].elements > 0


E8M13 = FloatFormat("e8m13", 8, 13, 127)  # simgpu's FP8 accumulator, defined here again


def test_simgpu_fp8_accumulator_matches_grouped_oracle() -> None:
    """fp8-hybrid without per-tensor scaling on simgpu: E4M3 products summed in e8m13."""
    recipe = dataclasses.replace(builtin("fp8-hybrid"), fp8_scaling=None, activations="fp32")
    em = emulator("simgpu", recipe)
    assert em.accumulator == E8M13
    g = torch.Generator().manual_seed(1)
    # E4M3 values in [0.5, 4) with random signs: group sums and running sums are exact in
    # fp32, so the only rounding is the accumulator's
    a = hwport.quantize(torch.rand(4, 1024, generator=g) * 3.5 + 0.5, "e4m3fn")
    b = hwport.quantize(torch.rand(1024, 5, generator=g) * 3.5 + 0.5, "e4m3fn")
    a = a * (torch.randint(0, 2, a.shape, generator=g) * 2 - 1)
    b = b * (torch.randint(0, 2, b.shape, generator=g) * 2 - 1)
    # plus a crafted element: 448 * 1 + 1023 x (2**-9 * 2**-9), the smallest E4M3 values;
    # a group of 32 such products (2**-13) is far below half an ulp of 448 in e8m13 (2**-6)
    a[0] = 2.0**-9
    a[0, 0] = 448.0
    b[:, 0] = 2.0**-9
    b[0, 0] = 1.0
    with em.active(), em.phase_("forward"):
        got = a @ b
    want = accumulate_oracle(a.double().numpy(), b.double().numpy(), E8M13)
    assert torch.equal(got.double(), torch.from_numpy(want))
    exact = a.double() @ b.double()  # (fp32 BLAS may lose the tiny products too, by its order)
    assert got[0, 0].item() == 448.0
    assert exact[0, 0].item() > 448.0
    assert (got.double() != exact).sum() > 1


@pytest.mark.parametrize("backend", ["simgpu", "dojo"])
def test_fp32_accumulator_gives_the_plain_fp32_result(backend: str) -> None:
    # simgpu: bf16 inputs, fp32 accumulator; dojo: its CFloat8 inputs, fp32 accumulator
    recipe = dataclasses.replace(builtin("fp8-hybrid"), fp8_scaling=None, activations="fp32") \
        if backend == "dojo" else Recipe("bf16-mm", "bf16 matmul inputs", matmul_input="bf16")
    em = emulator(backend, recipe)
    assert em.accumulator is None
    fmt = em.mm_fwd
    assert fmt is not None
    g = torch.Generator().manual_seed(2)
    a = hwport.quantize(torch.randn(8, 1024, generator=g), fmt)
    b = hwport.quantize(torch.randn(1024, 6, generator=g), fmt)
    with em.active(), em.phase_("forward"):
        got = a @ b
    assert torch.equal(got, a @ b)
    assert "forward/accumulator" not in em.telemetry.to_dict()["rounding"]


# -- loss scaling --------------------------------------------------------------------------------
def test_amp_fp16_records_the_loss_scale() -> None:
    r = runner.run("simgpu", digits(12), "train", "amp-fp16")
    scales = r.telemetry["loss_scale"]
    assert len(scales) == 12
    assert scales[0] == 2.0**16
    assert r.outcome in TRAIN_OUTCOMES


def tiny_loop(backend: str, recipe: Recipe, steps: int, factor: float = 1.0,
              loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
              ) -> tuple[Emulator, nn.Linear, torch.Tensor]:
    """A zero-initialised Linear(4, 1) on small data: its loss is about 1e-4 (times
    ``factor``), its gradients far from any format's range, unless ``factor`` is large."""
    em = Emulator(lower(recipe, hwport.get_backend(backend)))
    g = torch.Generator().manual_seed(3)
    x = 0.1 * torch.randn(16, 4, generator=g)
    y = torch.full((16, 1), 0.01)
    m = nn.Linear(4, 1)
    with torch.no_grad():
        m.weight.zero_()
        m.bias.zero_()
    w0 = m.weight.detach().clone()

    def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(model(x), y) * factor

    fn = loss or mse
    with em.active():
        em.prepare(m)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=False)
        for _ in range(steps):
            em.train_step(m, lambda m, b: fn(m, *b), (x, y), opt)
    return em, m, w0


def test_gradient_overflow_skips_the_step_and_halves_the_scale() -> None:
    em, m, w0 = tiny_loop("simgpu", builtin("amp-fp16"), 3, factor=1e6)
    t = em.telemetry
    assert t.skipped_steps == 3
    assert t.loss_scale == [2.0**16, 2.0**15, 2.0**14]
    assert em.scale == 2.0**13
    assert torch.equal(m.weight.detach(), w0)  # no update was applied


def test_loss_scale_of_a_well_scaled_model_does_not_overflow_fp16() -> None:
    """The scaled loss is fp32 in AMP (the loss is an fp32 op, GradScaler multiplies it in
    fp32): its gradient, the scale itself (65536 > fp16's max 65504), must not be rounded
    to fp16. Here every true gradient is below 100 x 65536 / 16, nothing overflows."""
    em, m, w0 = tiny_loop("simgpu", builtin("amp-fp16"), 2)
    t = em.telemetry.to_dict()
    assert t["skipped_steps"] == 0, t
    assert t["loss_scale"] == [2.0**16, 2.0**16]
    assert not torch.equal(m.weight.detach(), w0)


def test_loss_scale_growth_unscales_by_the_scale_the_gradients_carry() -> None:
    """GradScaler unscales a step's gradients by the scale they were computed with, then
    grows the scale (``scaler.step`` before ``scaler.update``). In exact fp32 arithmetic
    a power-of-two loss scale changes nothing, growth steps included: the weights are the
    unscaled run's to the bit (unscaling by the grown scale halved every growth step)."""
    growing = dataclasses.replace(builtin("fp32"), loss_scaling=LossScaling(
        init_scale=2.0**4, growth_interval=1))
    em, m, _ = tiny_loop("reference", growing, 4)
    assert em.telemetry.loss_scale == [2.0**4, 2.0**5, 2.0**6, 2.0**7]
    _, plain, _ = tiny_loop("reference", builtin("fp32"), 4)
    assert torch.equal(m.weight.detach(), plain.weight.detach())
    assert torch.equal(m.bias.detach(), plain.bias.detach())


def test_saturating_hardware_hides_overflow_from_gradscaler() -> None:
    """dojo's CFloat16 saturates: GradScaler's inf/NaN check never fires, the step is
    applied with clamped gradients; the overflow-flag check skips it."""
    em, m, w0 = tiny_loop("dojo", builtin("amp-fp16"), 3, factor=1e6)
    t = em.telemetry.to_dict()
    assert t["skipped_steps"] == 0
    assert t["loss_scale"] == [2.0**16] * 3
    assert sum(c["overflow"] for k, c in t["rounding"].items() if k.startswith("backward/")) > 0
    assert not torch.equal(m.weight.detach(), w0)  # garbage was applied

    flags = dataclasses.replace(builtin("amp-fp16"),
                                loss_scaling=LossScaling(check="overflow_flags"))
    em, m, w0 = tiny_loop("dojo", flags, 3, factor=1e6)
    assert em.telemetry.skipped_steps == 3
    assert em.telemetry.loss_scale == [2.0**16, 2.0**15, 2.0**14]
    assert torch.equal(m.weight.detach(), w0)


def test_overflow_flag_check_also_catches_invalid_operations() -> None:
    """A 0/0 in backward (the classic NaN gradient through ``where(x > 0, sqrt(x), 0)``)
    raises the invalid flag on hardware with exception flags; GradScaler's check skips the
    step, and the flag-based check must too rather than apply NaN to the weights."""
    def nan_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = model(x)
        z = out - out.detach()  # zeros with a gradient path
        return F.mse_loss(out, y) + torch.where(z > 0, z.sqrt(), 0.0).sum()

    em, m, _ = tiny_loop("dojo", builtin("amp-fp16"), 1, loss=nan_grad)
    assert em.telemetry.skipped_steps == 1  # GradScaler semantics
    flags = dataclasses.replace(builtin("amp-fp16"),
                                loss_scaling=LossScaling(check="overflow_flags"))
    em, m, _ = tiny_loop("dojo", flags, 1, loss=nan_grad)
    assert bool(torch.isfinite(m.weight).all()), m.weight
    assert em.telemetry.skipped_steps == 1


# -- FP8 -----------------------------------------------------------------------------------------
def test_fp8_hybrid_trains_on_simgpu() -> None:
    r = runner.run("simgpu", digits(30), "train", "fp8-hybrid")
    assert r.outcome in {"converged", "degraded"}, (r.outcome, r.metrics, r.reference_metrics)
    assert r.lowering == []
    rounding = r.telemetry["rounding"]
    assert rounding["forward/matmul_input"]["elements"] > 0
    assert rounding["forward/accumulator"]["elements"] > 0


def test_fp8_hybrid_lowering_on_dojo() -> None:
    lowered = lower(builtin("fp8-hybrid"), hwport.get_backend("dojo"))
    notes = " | ".join(lowered.notes)
    assert "e4m3fn -> cfp8_143_b7" in notes
    assert "e5m2 -> cfp8_152_b15" in notes
    assert "fp8_scaling dropped" in notes
    assert lowered.recipe.fp8_scaling is None
    assert lowered.original.fp8_scaling is not None


# -- the reference is native ----------------------------------------------------------------------
def test_reference_fp32_is_native_and_bit_identical_to_plain_torch() -> None:
    em = emulator("reference", "fp32")
    assert em.native is True
    p = digits(6)
    model, losses = train(em, p, 6)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        plain = p.model()
        batches = p.batches(0)
        opt = p.optimizer(plain.parameters())
        plain_losses = []
        for _ in range(6):
            batch = next(batches)
            loss = p.loss(plain, batch)
            plain_losses.append(float(loss.detach()))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert losses == plain_losses
    for (n, a), (_, b) in zip(model.named_parameters(), plain.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    assert em.telemetry.to_dict()["rounding"] == {}


# -- NaN is an outcome -----------------------------------------------------------------------------
def nan_pipeline(nan_at: int = 3) -> Pipeline:
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g)

    def batches(seed: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        step = 0
        while True:
            step += 1
            yield step, x, y

    def loss(m: nn.Module, batch: tuple[int, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        step, bx, by = batch
        value = F.cross_entropy(m(bx), by)
        return value * float("nan") if step >= nan_at else value

    def evaluate(m: nn.Module) -> dict[str, float]:
        return {"val_loss": float(F.cross_entropy(m(x), y))}

    return Pipeline(name="nan-at-3", model=lambda: nn.Linear(4, 3),
                    optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1),
                    batches=batches, loss=loss, evaluate=evaluate, predict=lambda m: m(x),
                    steps=10, eval_every=5)


@pytest.mark.parametrize("backend", ["simgpu", "dojo"])
def test_nan_loss_is_the_diverged_outcome(backend: str) -> None:
    r = runner.run(backend, nan_pipeline(), "train", "amp-bf16")
    assert r.outcome == "diverged"
    assert [pt["step"] for pt in r.curve] == [1, 2, 3]
    assert math.isnan(r.curve[-1]["loss"])
    assert all(math.isfinite(pt["loss"]) for pt in r.curve[:-1])
    d = r.to_dict()
    assert d["curve"][-1]["loss"] == "nan"


# -- captured steps are the eager steps ----------------------------------------------------------
def lm(steps: int = 4) -> Pipeline:
    return runner.resolve_pipeline("lm", steps, {"d_model": 32, "heads": 2, "layers": 1,
                                                 "context": 16, "batch_size": 4})


def run_both(backend: str, recipe: str | Recipe, p: Pipeline, steps: int
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same training with captured steps and with eager steps: losses, parameter bits,
    telemetry."""
    out = []
    for capture in (True, False):
        em = emulator(backend, recipe)
        em.capture = capture
        model, losses = train(em, p, steps)
        tele = em.telemetry.to_dict()
        out.append({"losses": losses, "execution": tele.pop("execution"), "telemetry": tele,
                    "params": [q.detach().clone() for q in model.parameters()]})
    return out[0], out[1]


STOCHASTIC_UPDATES = Recipe("sr-bf16", "pure bf16, stochastically rounded updates",
                            matmul_input="bf16", activations="bf16",
                            weights="bf16", gradients="bf16", optimizer_state="bf16",
                            update_rounding="stochastic")


@pytest.mark.parametrize(("backend", "recipe", "pipeline"), [
    ("simgpu", "amp-bf16", "lm"), ("simgpu", "amp-fp16", "digits"),
    ("dojo", "amp-fp16", "lm"), ("dojo", STOCHASTIC_UPDATES, "digits"),
    ("dataflow", "pure-bf16", "lm"), ("dataflow", "amp-bf16", "digits"),
])
def test_captured_steps_are_bit_identical_to_eager_steps(backend: str, recipe: str | Recipe,
                                                         pipeline: str) -> None:
    p = lm() if pipeline == "lm" else digits()
    captured, eager = run_both(backend, recipe, p, 4)
    assert captured["execution"] == "captured"
    assert eager["execution"] == "eager: capture is off"
    assert captured["losses"] == eager["losses"]
    assert captured["telemetry"] == eager["telemetry"]
    assert captured["telemetry"]["rounding"]  # the emulation did round
    for a, b in zip(captured["params"], eager["params"], strict=True):
        assert torch.equal(a, b)


def test_a_step_that_reads_values_on_the_host_runs_eagerly() -> None:
    base = digits()

    def loss(m: nn.Module, batch: Any) -> torch.Tensor:
        value = base.loss(m, batch)
        return value * 2 if value.item() > 100 else value  # data-dependent control flow

    p = dataclasses.replace(base, loss=loss)
    captured, eager = run_both("simgpu", "amp-bf16", p, 3)
    assert captured["execution"].startswith("eager: it reads tensor values on the host")
    assert captured["losses"] == eager["losses"]
    assert captured["telemetry"] == eager["telemetry"]  # the failed attempt left nothing


def test_a_step_that_reads_an_outside_tensor_runs_eagerly() -> None:
    base = digits()
    weight = torch.ones(())

    def loss(m: nn.Module, batch: Any) -> torch.Tensor:
        weight.add_(1.0)  # state the step does not receive as input: not capturable
        return base.loss(m, batch) * weight

    p = dataclasses.replace(base, loss=loss)
    em = emulator("simgpu", "amp-bf16")
    _, losses = train(em, p, 3)
    assert em.telemetry.execution.startswith("eager: it reads a tensor that is neither")
    weight.fill_(1.0)
    _, again = train(emulator("simgpu", "amp-bf16"), p, 3)
    assert losses == again
