"""What a port costs: mitigations, the porting search, and the effort score.

A :class:`Mitigation` is a named change to a recipe (data: the recipe fields it sets), with
what it needs from the backend, the telemetry signals that point to it, and an effort
weight. :func:`port` runs a recipe on a backend; when the cell is not at parity with the
reference it diagnoses the run's telemetry, then tries mitigations (those the evidence
points to first, singly, then in pairs and triples) until one set restores parity or the
trial budget is spent. docs/porting.md defines the effort score.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hwport import plugins, runner, store
from hwport.errors import HwportError, UnknownNameError
from hwport.hookspecs import hookimpl
from hwport.pipeline import Pipeline, PipelineFactory
from hwport.recipes import FP32_OP_GROUPS, Mitigation, Recipe, lower
from hwport.spec import BackendSpec
from hwport.store import Session

TRAIN = ("train",)  # weight-update and gradient policies: nothing to change in inference

BUILTIN: tuple[Mitigation, ...] = (
    Mitigation("loss-scaling", "dynamic loss scaling whose overflow check reads the backward "
               "pass's overflow flags, so it also works on hardware that saturates instead of "
               "producing inf (a recipe's own scaler keeps its schedule)",
               {"loss_scaling.check": "overflow_flags"},
               signals=("gradient_underflow", "gradient_overflow"), effort=1, modes=TRAIN),
    Mitigation("fp32-master-weights", "keep an fp32 copy of the weights for the optimizer; "
               "cast to the weight format after each update",
               {"master_weights": "fp32", "optimizer_state": "fp32"},
               signals=("lost_updates",), effort=1, modes=TRAIN),
    Mitigation("stochastic-updates", "round weight updates stochastically (hardware "
               "stochastic rounding)", {"update_rounding": "stochastic"},
               needs=("stochastic_rounding",), signals=("lost_updates",), effort=1, modes=TRAIN),
    Mitigation("software-stochastic-updates", "round weight updates stochastically in the "
               "optimizer's code where the hardware cannot (a random draw and an add per "
               "updated weight)", {"update_rounding": "stochastic", "software_stochastic": True},
               signals=("lost_updates",), effort=2, modes=TRAIN),
    Mitigation("kahan-updates", "Kahan-compensated weight updates: each parameter's rounding "
               "error is carried into its next update (one extra buffer per parameter)",
               {"kahan_updates": True}, signals=("lost_updates",), effort=2, modes=TRAIN),
    Mitigation("fp32-sensitive-ops", "keep softmax, normalisation and the loss in fp32",
               {"fp32_ops": FP32_OP_GROUPS}, signals=("forward_overflow", "diverged"),
               effort=1),
    Mitigation("fp8-delayed-scaling", "per-tensor scaling of 8-bit matmul inputs from an amax "
               "history of 16 steps",
               {"fp8_scaling.history": 16, "fp8_scaling.mechanism": "scale"},
               needs=("fp8_per_tensor_scaling",), signals=("matmul_input_range",), effort=2),
    Mitigation("fp8-current-scaling", "per-tensor scaling of 8-bit matmul inputs from the "
               "tensor's own amax", {"fp8_scaling.history": 0, "fp8_scaling.mechanism": "scale"},
               needs=("fp8_per_tensor_scaling",), signals=("matmul_input_range",), effort=2),
    Mitigation("cfp8-bias-selection", "choose each 8-bit tensor's exponent bias from its "
               "observed amax (Dojo CFP8's configurable bias)",
               {"fp8_scaling.history": 0, "fp8_scaling.mechanism": "bias"},
               needs=("configurable_exponent_bias",), signals=("matmul_input_range",),
               effort=2),
    Mitigation("fp32-gradient-reduction", "accumulate data-parallel gradient all-reduces in "
               "fp32 (the gradients cast to fp32 for the collective: twice the bytes of "
               "bf16 on the network)", {"reduction_format": "fp32"},
               signals=("reduction_error",), effort=2, modes=TRAIN),
    Mitigation("lr-warmup", "ramp the learning rate up linearly over the first 20 steps",
               {"warmup_steps": 20}, signals=("diverged", "gradient_overflow"), effort=1,
               modes=TRAIN),
)


@hookimpl
def hwport_mitigations() -> list[Mitigation]:
    return list(BUILTIN)


def diagnose(result: runner.RunResult) -> dict[str, str]:
    """The signals a run's telemetry shows, each with its evidence in words."""
    t = result.telemetry
    found: dict[str, str] = {}
    rounding: dict[str, dict[str, int]] = t.get("rounding", {})

    def total(prefix: str, what: str) -> tuple[int, int]:
        rows = [v for k, v in rounding.items() if k.startswith(prefix)]
        return sum(r[what] for r in rows), sum(r["elements"] for r in rows)

    under, n = total("backward/", "underflow")
    if under and under / max(n, 1) > 1e-5:
        found["gradient_underflow"] = f"{under:,} of {n:,} backward values underflowed to zero"
    over, _ = total("backward/", "overflow")
    bad, _ = total("backward/", "nonfinite")
    if over or bad or t.get("skipped_steps"):
        found["gradient_overflow"] = (f"{over:,} overflows and {bad:,} inf/NaN in backward, "
                                      f"{t.get('skipped_steps', 0)} skipped steps")
    fover, _ = total("forward/elementwise", "overflow")
    if fover:
        found["forward_overflow"] = f"{fover:,} forward activations overflowed"
    for phase in ("forward", "backward"):
        row = rounding.get(f"{phase}/matmul_input")
        if row and (row["overflow"] or row["underflow"] / max(row["elements"], 1) > 1e-3):
            found["matmul_input_range"] = (f"{phase} matmul inputs: {row['overflow']:,} "
                                           f"overflows, {row['underflow']:,} underflows of "
                                           f"{row['elements']:,}")
    lost = t.get("lost_update_fraction", 0.0)
    if lost > 0.01:
        found["lost_updates"] = f"{lost:.1%} of weight updates were lost to rounding"
    if result.outcome == "diverged":
        found["diverged"] = "the loss became NaN or inf"
    reduced = result.collectives.get("gradient_error", {}).get("max_relative", 0.0)
    if reduced > 1e-5:
        found["reduction_error"] = (f"the all-reduced gradients were off their exact average "
                                    f"by up to {reduced:.2g} (relative)")
    return found


@dataclass
class Trial:
    """One run of the search: the mitigations applied and the outcome."""

    mitigations: tuple[str, ...]
    outcome: str
    metric: float | None
    wall_s: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PortResult:
    """What porting a recipe to a backend took."""

    backend: str
    pipeline: str
    mode: str
    recipe: str
    outcome_before: str
    outcome_after: str
    mitigations: list[dict[str, str]]  # the set found: name, what it changes, evidence
    rejected: list[Trial]
    trials: int
    emulated_s: float  # wall time of every trial's emulated run
    effort: int | None  # None: no set within the budget restores parity
    evidence: dict[str, str] = field(default_factory=dict)
    not_applicable: list[str] = field(default_factory=list)  # mitigations the backend lacks
    searched_all: bool = False  # every distinct set of up to MAX_SET was tried (budget left)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rejected"] = [t.to_dict() for t in self.rejected]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PortResult:
        """The result :meth:`to_dict` described."""
        d = dict(data)
        d["rejected"] = [Trial(**{**t, "mitigations": tuple(t["mitigations"])})
                         for t in d["rejected"]]
        return cls(**d)


AT_PARITY = {"train": "converged", "infer": "parity"}
MAX_SET = 3  # the search tries sets of up to this many mitigations


def port(backend: str | BackendSpec, pipeline: str | Pipeline | PipelineFactory,
         recipe: str | Recipe = "amp-bf16", mode: str = "train", *, budget: int = 8,
         steps: int | None = None, seed: int = 0, options: dict[str, Any] | None = None,
         mitigations: Sequence[str] | None = None,
         on_trial: Callable[[Trial], None] | None = None,
         before: runner.RunResult | None = None, world_size: int = 1,
         session: Session | None = None, framework: str = "torch") -> PortResult:
    """Run ``recipe`` on ``backend``; if it is not at parity, find the smallest set of
    mitigations (at most ``budget`` runs in all, the first included) that restores it.
    ``before``: that first run, when it was already made (a comparison's cell).
    ``mitigations`` limits the search to those names. ``session`` stores the first run as
    the stored run's cell (unless ``before`` is given), every other trial and the result;
    with resume, a search already stored is not run again, and nor is any stored trial.
    See the module docstring."""
    if budget < 1:
        raise HwportError(f"budget {budget}: must be at least 1 (the run before mitigations)")
    spec = backend if isinstance(backend, BackendSpec) else plugins.get_backend(backend)
    rec = recipe if isinstance(recipe, Recipe) else plugins.registry().recipe(recipe)
    p = runner.resolve_pipeline(pipeline, steps, options)
    pool = dict(plugins.registry().mitigations)
    if mitigations is not None:
        unknown = [m for m in mitigations if m not in pool]
        if unknown:
            raise UnknownNameError("mitigation", unknown[0], pool)
        pool = {m: pool[m] for m in mitigations}

    cell = store.cell_key(spec, p, mode, rec, seed, world_size, framework=framework)
    key = store.digest({"cell": cell, "budget": budget, "max_set": MAX_SET,
                        "pool": {n: repr(m) for n, m in sorted(pool.items())}})
    if session is not None:
        hit = session.reuse_port(key)
        if hit is not None and (before is not None or session.reuse(0, cell) is not None):
            return PortResult.from_dict(hit)  # with the run it started from as the cell

    def trial(chosen: tuple[Mitigation, ...]) -> tuple[runner.RunResult, Trial]:
        r = rec
        for m in chosen:
            r = m.apply(r)
        result = runner.run(spec, pipeline if world_size > 1 else p, mode, r, seed=seed,
                            steps=steps if world_size > 1 else None,
                            options=options if world_size > 1 else None,
                            world_size=world_size, session=session,
                            position=None if chosen else 0, framework=framework)
        t = Trial(tuple(m.name for m in chosen), result.outcome,
                  result.metrics.get(result.metric), result.wall_s)
        if on_trial:
            on_trial(t)
        return result, t

    if before is None:
        before, first = trial(())
    else:
        first = Trial((), before.outcome, before.metrics.get(before.metric), before.wall_s)
    evidence = diagnose(before)
    pool = {n: m for n, m in pool.items() if mode in m.modes}
    usable = [m for m in pool.values() if m.applies_to(spec)]
    skipped = sorted(m for m in pool if pool[m] not in usable)
    out = PortResult(spec.name, p.name, mode, rec.name, before.outcome, before.outcome, [], [],
                     1, first.wall_s, 0 if before.outcome == AT_PARITY[mode] else None,
                     evidence, skipped)
    if out.effort != 0:
        _search(out, rec, spec, mode, usable, evidence, budget, trial)
    if session is not None:
        session.add_port(key, out)
    return out


def _search(out: PortResult, rec: Recipe, spec: BackendSpec, mode: str,
            usable: list[Mitigation], evidence: dict[str, str], budget: int,
            trial: Callable[[tuple[Mitigation, ...]], tuple[runner.RunResult, Trial]]) -> None:
    """Try sets of ``usable`` mitigations until one restores parity (recorded in ``out``)
    or the budget is spent."""

    # evidence first (the more signals a mitigation answers, the earlier), then cheap ones
    def rank(m: Mitigation) -> tuple[int, int, str]:
        return (-sum(s in evidence for s in m.signals), m.effort, m.name)

    ordered = sorted(usable, key=rank)
    def compatible(combo: tuple[Mitigation, ...]) -> bool:
        """No two of them set the same recipe field (one would undo the other)."""
        fields = [{k.partition(".")[0] for k in m.changes} for m in combo]
        return sum(map(len, fields)) == len(set().union(*fields))

    # a set that leaves the recipe (as the backend runs it) unchanged, or as an earlier set
    # left it, is not run again
    tried = {lower(rec, spec).recipe}
    for size in range(1, MAX_SET + 1):
        combos = sorted(filter(compatible, itertools.combinations(ordered, size)),
                        key=lambda c: (sum(rank(m)[0] for m in c), sum(m.effort for m in c)))
        for combo in combos:
            changed = rec
            for m in combo:
                changed = m.apply(changed)
            if lower(changed, spec).recipe in tried:
                continue
            tried.add(lower(changed, spec).recipe)
            if out.trials >= budget:
                return
            result, t = trial(combo)
            out.trials += 1
            out.emulated_s += t.wall_s
            if result.outcome == AT_PARITY[mode]:
                out.outcome_after = result.outcome
                out.effort = sum(m.effort for m in combo)
                out.mitigations = [
                    {"name": m.name, "changes": ", ".join(f"{k}={v!r}" for k, v in
                                                          m.changes.items()),
                     "evidence": "; ".join(evidence[s] for s in m.signals if s in evidence)
                     or "no signal pointed to it: found by search"} for m in combo]
                return
            out.rejected.append(t)
    out.searched_all = True


def efforts(comparison: runner.Comparison, budget: int = 8,
            on_trial: Callable[[Trial], None] | None = None,
            session: Session | None = None) -> list[PortResult]:
    """The porting search for every cell of a comparison (cells at parity cost no trial);
    ``session`` stores each search as it finishes (see :func:`port`)."""
    recipe = comparison.definition or comparison.recipe
    return [port(c.backend, c.pipeline, recipe, c.mode, budget=budget,
                 steps=c.steps, seed=c.seed, on_trial=on_trial, before=c,
                 world_size=c.collectives.get("world_size", 1), session=session,
                 framework=c.framework)
            for c in comparison.cells]
