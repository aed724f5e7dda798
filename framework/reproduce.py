"""Published results, reproduced: each one a failure and its fix, measured on small models.

A :class:`Reproduction` is a paper's claim made runnable: a backend, a pipeline
configuration, the recipe as a team would first port it (the failing side), the telemetry
signal that should explain the failure, and the mitigations that fix it (each applied on
its own). :func:`reproduce` runs every side and says whether the claim held:

- the recipe as ported ends in one of ``fails_with`` (not at parity with the fp32
  reference) and its telemetry shows ``signal`` (see :func:`hwport.porting.diagnose`);
- each fix, applied alone to that recipe, converges;
- the control backend, when there is one (the hardware the recipe was written for),
  converges with the recipe as written.

``small`` holds each reproduction's CI configuration (fewer steps, a smaller model); the
claim must hold there too. docs/porting.md lists the reproductions and their results.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hwport import plugins, runner
from hwport.errors import HwportError, UnknownNameError
from hwport.memory import finite
from hwport.porting import AT_PARITY, diagnose
from hwport.recipes import SIGNALS, LossScaling, Recipe, builtin

ZAMIRAI = "Zamirai et al. 2020, Revisiting BFloat16 Training; Gupta et al. 2015, Deep " \
    "Learning with Limited Numerical Precision"
MICIKEVICIUS18 = "Micikevicius et al. 2018, Mixed Precision Training"
MICIKEVICIUS22 = "Micikevicius et al. 2022, FP8 Formats for Deep Learning"
SATURATION = "torch.amp.GradScaler (skips a step on inf/NaN gradients); Tesla, A Guide to " \
    "Tesla's Configurable Floating Point Formats & Arithmetic (2021): CFloat16 overflow clamps"


@dataclass(frozen=True)
class Reproduction:
    """A published claim as a failure and its fixes (see the module docstring)."""

    name: str
    paper: str
    claim: str
    backend: str
    pipeline: str
    options: Mapping[str, Any]
    small: Mapping[str, Any]  # options for the small (CI) configuration
    recipe: Recipe
    signal: str
    fixes: tuple[str, ...]
    fails_with: tuple[str, ...] = ("stalled", "degraded", "diverged")
    control: str | None = None

    def __post_init__(self) -> None:
        if self.signal not in SIGNALS:
            raise UnknownNameError("signal", self.signal, SIGNALS)


_AMP_FP16 = builtin("amp-fp16")
_FP8 = builtin("fp8-hybrid")

REPRODUCTIONS: tuple[Reproduction, ...] = (
    Reproduction(
        "bf16-updates", ZAMIRAI,
        "pure bf16 with weight updates rounded to nearest loses the updates below half an "
        "ulp and falls behind fp32; stochastic rounding or Kahan-compensated updates recover",
        "dojo", "digits", {"optimizer": "sgd", "lr": 0.05}, {"optimizer": "sgd", "lr": 0.05},
        builtin("pure-bf16"), "lost_updates", ("stochastic-updates", "kahan-updates")),
    Reproduction(
        "fp16-loss-scaling", MICIKEVICIUS18,
        "fp16 without loss scaling loses gradients that lie below its smallest subnormal; "
        "dynamic loss scaling shifts them into range and training matches fp32",
        "simgpu", "tiny-gradients", {}, {"steps": 40},
        dataclasses.replace(_AMP_FP16, name="amp-fp16-unscaled", loss_scaling=None,
                            description="torch.autocast with fp16, no GradScaler"),
        "gradient_underflow", ("loss-scaling",)),
    Reproduction(
        "fp8-scaling", MICIKEVICIUS22,
        "E4M3 forward / E5M2 backward without per-tensor scaling flushes small gradients to "
        "zero; with per-tensor scaling (delayed or current) 8-bit training matches the "
        "reference",
        "simgpu", "lm", {}, {"d_model": 32, "layers": 1, "steps": 120},
        dataclasses.replace(_FP8, name="fp8-unscaled", fp8_scaling=None,
                            description="E4M3 forward / E5M2 backward matmuls, no scaling"),
        "matmul_input_range", ("fp8-delayed-scaling", "fp8-current-scaling")),
    Reproduction(
        "saturating-loss-scaler", SATURATION,
        "GradScaler finds overflow by looking for inf; on hardware whose fp16 saturates "
        "there is never an inf, the scale grows without bound, gradients clamp and training "
        "goes wrong while the same recipe trains on NVIDIA; a check that reads the overflow "
        "flags backs the scale off (the scaler grows every 20 steps, so that 400 steps see "
        "the growth of a long run)",
        "dojo", "digits", {"optimizer": "sgd", "lr": 0.1, "steps": 400},
        {"optimizer": "sgd", "lr": 0.1, "steps": 400},
        dataclasses.replace(_AMP_FP16, name="amp-fp16-fast-growth",
                            loss_scaling=LossScaling(growth_interval=20),
                            description="amp-fp16 whose GradScaler grows every 20 steps"),
        "gradient_overflow", ("loss-scaling",), control="simgpu"),
)


@dataclass
class Reproduced:
    """What one reproduction measured: the failure, its evidence, each fix and the control."""

    reproduction: Reproduction
    failure: runner.RunResult
    evidence: dict[str, str]
    fixes: dict[str, runner.RunResult]
    control: runner.RunResult | None
    problems: list[str] = field(default_factory=list)  # what did not hold; empty: reproduced

    @property
    def reproduced(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        r = self.reproduction

        def cell(c: runner.RunResult) -> dict[str, Any]:
            return {"recipe": c.recipe, "outcome": c.outcome, "metrics": c.metrics,
                    "reference_metrics": c.reference_metrics, "wall_s": c.wall_s}

        return finite({  # type: ignore[no-any-return]
            "name": r.name, "paper": r.paper, "claim": r.claim, "backend": r.backend,
            "pipeline": r.pipeline, "recipe": r.recipe.name, "signal": r.signal,
            "failure": cell(self.failure) | {"telemetry": self.failure.telemetry},
            "evidence": self.evidence,
            "fixes": {name: cell(c) for name, c in self.fixes.items()},
            "control": cell(self.control) | {"backend": self.control.backend}
            if self.control else None,
            "reproduced": self.reproduced, "problems": self.problems})


def reproduce(which: Sequence[str | Reproduction] | None = None, *, small: bool = False,
              seed: int = 0, on_run: Callable[[str], runner.Progress | None] | None = None,
              framework: str = "torch") -> list[Reproduced]:
    """Run the reproductions ``which`` (built-in ones by name, or your own; all built-in
    ones when None); ``small``: their CI configurations; ``framework``: the pipelines in
    torch, or their JAX twins through the JAX engine. ``on_run`` is told each run's label
    and may return a progress callback."""
    known = {r.name: r for r in REPRODUCTIONS}
    chosen = []
    for item in which or list(known):
        if isinstance(item, str) and item not in known:
            raise UnknownNameError("reproduction", item, known)
        chosen.append(known[item] if isinstance(item, str) else item)
    mitigations = plugins.registry().mitigations
    for r in chosen:  # every name is checked before any run
        spec = plugins.get_backend(r.backend)
        if r.control is not None:
            plugins.get_backend(r.control)
        runner.resolve_pipeline(r.pipeline, None, dict(r.small if small else r.options))
        for m in r.fixes:
            if m not in mitigations:
                raise UnknownNameError("mitigation", m, mitigations,
                                       f"It is a fix of reproduction {r.name!r}")
            if not mitigations[m].applies_to(spec) or "train" not in mitigations[m].modes:
                raise HwportError(f"reproduction {r.name!r}: fix {m!r} does not apply to "
                                  f"training on {r.backend} (it needs "
                                  f"{list(mitigations[m].needs)})")
    done = []
    for r in chosen:
        options = dict(r.small if small else r.options)

        def run(backend: str, recipe: Recipe, what: str, r: Reproduction = r,
                options: dict[str, Any] = options) -> runner.RunResult:
            progress = on_run(f"{r.name}: {what} on {backend}") if on_run else None
            return runner.run(backend, r.pipeline, "train", recipe, seed=seed,
                              options=options, progress=progress, framework=framework)

        failure = run(r.backend, r.recipe, "as ported")
        fixes = {m: run(r.backend, mitigations[m].apply(r.recipe), m) for m in r.fixes}
        control = run(r.control, r.recipe, "control") if r.control else None
        evidence = diagnose(failure)
        problems = []
        if failure.outcome not in r.fails_with:
            problems.append(f"as ported it was {failure.outcome}, expected one of "
                            f"{list(r.fails_with)}")
        if r.signal not in evidence:
            problems.append(f"its telemetry does not show {r.signal} "
                            f"({SIGNALS[r.signal]})")
        problems += [f"with {m} it was {c.outcome}" for m, c in fixes.items()
                     if c.outcome != AT_PARITY["train"]]
        if control is not None and control.outcome != AT_PARITY["train"]:
            problems.append(f"on {control.backend} (control) it was {control.outcome}")
        done.append(Reproduced(r, failure, evidence, fixes, control, problems))
    return done
