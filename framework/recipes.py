"""Recipes: how a training or inference program uses numerics, as data.

A :class:`Recipe` names the format of each tensor role (matmul inputs, activations,
weights, master weights, gradients, optimizer state), the op groups kept in fp32, how
weight updates are rounded, and the scaling policies (dynamic loss scaling with GradScaler
semantics, per-tensor FP8 scaling with an amax history). Recipes are written for the NVIDIA
path (simgpu); :func:`lower` maps one onto another backend, recording every substitution.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hwport.errors import HwportError, UnknownNameError
from hwport.formats import FloatFormat
from hwport.hookspecs import hookimpl
from hwport.spec import BackendSpec

FP32_OP_GROUPS = ("softmax", "normalization", "loss")


@dataclass(frozen=True)
class LossScaling:
    """Dynamic loss scaling with torch.amp.GradScaler semantics.

    The loss is multiplied by ``scale`` before backward. If any gradient is inf or NaN the
    step is skipped and the scale multiplied by ``backoff``; after ``growth_interval``
    finite steps in a row it is multiplied by ``growth``. ``check`` says how overflow is
    detected: ``"nonfinite"`` (an inf or NaN in a gradient, as GradScaler does; blind on
    hardware that saturates) or ``"overflow_flags"`` (any overflow while computing
    gradients, as hardware exception flags report it: works when overflow saturates).
    """

    init_scale: float = 2.0**16
    growth: float = 2.0
    backoff: float = 0.5
    growth_interval: int = 2000
    check: str = "nonfinite"

    def __post_init__(self) -> None:
        if self.check not in ("nonfinite", "overflow_flags"):
            raise HwportError(f"loss scaling check={self.check!r}: must be 'nonfinite' or "
                              "'overflow_flags'")
        if not (self.init_scale > 0 and self.growth >= 1 and 0 < self.backoff <= 1
                and self.growth_interval >= 1):
            raise HwportError(f"loss scaling {self}: needs init_scale > 0, growth >= 1, "
                              "0 < backoff <= 1 and growth_interval >= 1")

    def after(self, scale: float, tracker: int, found: bool) -> tuple[float, int]:
        """GradScaler's update after a step that ``found`` an overflow (and is skipped) or
        did not: the new scale and the new count of finite steps in a row."""
        if found:
            return scale * self.backoff, 0
        tracker += 1
        if tracker >= self.growth_interval:
            return scale * self.growth, 0
        return scale, tracker


# the largest exponent of a per-tensor FP8 scale, either sign: 2**e and 2**-e both normal
# float32 values (a tensor whose amax is below max(fmt) * 2**-126 is scaled by 2**126, not
# by an infinite scale)
SCALE_EXPONENT = 126


@dataclass(frozen=True)
class FP8Scaling:
    """Per-tensor scaling of 8-bit matmul inputs (Transformer Engine's delayed scaling).

    ``scale = max(fmt) / amax / 2**margin``, with ``amax`` the largest magnitude seen at
    that matmul input over the last ``history`` steps (``history=0``: the current tensor's,
    "current scaling"). The scale is a power of two, so choosing it is the same as choosing
    a per-tensor exponent bias (``mechanism="bias"``: Dojo's configurable CFP8 bias, which
    needs ``configurable_exponent_bias``; ``"scale"`` needs ``fp8_per_tensor_scaling``).
    """

    history: int = 16
    margin: int = 0
    mechanism: str = "scale"  # or "bias": Dojo CFP8's per-tensor exponent-bias selection

    def __post_init__(self) -> None:
        if self.mechanism not in ("scale", "bias"):
            raise HwportError(f"fp8 scaling mechanism {self.mechanism!r}: must be 'scale' "
                              "(a scale factor per tensor) or 'bias' (an exponent bias per "
                              "tensor)")


@dataclass(frozen=True)
class Recipe:
    """Formats per tensor role and the mixed-precision policies of a program.

    ``matmul_input`` is the format of matmul operands in forward (``matmul_input_backward``
    in backward); ``activations`` of every other op's output (and matmul outputs), except op
    groups in ``fp32_ops`` which compute and store in fp32. With ``autocast`` (torch.autocast
    semantics) an op other than a matmul computes in its inputs' precision: its output is in
    ``activations`` only when every input already is, else it stays fp32 (a residual stream
    or a scaled loss stays fp32). ``weights`` is the format the
    model's parameters are stored in for compute; ``master_weights`` (None: no master copy)
    the format the optimizer updates; ``gradients`` and ``optimizer_state`` likewise.
    ``update_rounding`` rounds the results of optimizer updates (nearest or stochastic;
    ``software_stochastic`` keeps stochastic update rounding on a backend without it in
    hardware, as the optimizer's own code would: a random draw and an add per update);
    ``reduction_format`` (None: the backend's) is the format data-parallel gradient
    reductions accumulate in, when the training code casts the gradients for the
    all-reduce itself (fp32 reductions of bf16 gradients, say);
    ``kahan_updates`` carries each parameter's rounding error into its next update
    (compensated summation); ``warmup_steps`` ramps the learning rate linearly from
    1/warmup_steps of its value over that many steps.
    """

    name: str
    description: str
    matmul_input: str = "fp32"
    matmul_input_backward: str | None = None
    activations: str = "fp32"
    fp32_ops: tuple[str, ...] = ()
    weights: str = "fp32"
    master_weights: str | None = None
    gradients: str = "fp32"
    optimizer_state: str = "fp32"
    update_rounding: str = "nearest"
    loss_scaling: LossScaling | None = None
    fp8_scaling: FP8Scaling | None = None
    autocast: bool = False
    kahan_updates: bool = False
    warmup_steps: int = 0
    software_stochastic: bool = False
    reduction_format: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "fp32_ops", tuple(self.fp32_ops))
        bad = [g for g in self.fp32_ops if g not in FP32_OP_GROUPS]
        if bad:
            raise HwportError(f"recipe {self.name!r}: fp32_ops {bad} unknown; "
                              f"groups are {list(FP32_OP_GROUPS)}")
        if self.update_rounding not in ("nearest", "stochastic"):
            raise HwportError(f"recipe {self.name!r}: update_rounding="
                              f"{self.update_rounding!r} must be 'nearest' or 'stochastic'")

    @property
    def backward_input(self) -> str:
        """The matmul operand format in backward."""
        return self.matmul_input_backward or self.matmul_input

    def formats(self) -> dict[str, str]:
        """Every role's format, by role."""
        roles = {"matmul_input": self.matmul_input, "matmul_input_backward": self.backward_input,
                 "activations": self.activations, "weights": self.weights,
                 "gradients": self.gradients, "optimizer_state": self.optimizer_state}
        if self.master_weights is not None:
            roles["master_weights"] = self.master_weights
        return roles

    def to_dict(self) -> dict[str, object]:
        """Plain data for JSON."""
        return dataclasses.asdict(self)


_AMP = ("softmax", "normalization", "loss")

BUILTIN: tuple[Recipe, ...] = (
    Recipe("fp32", "everything in fp32: the reference recipe"),
    Recipe("amp-bf16", "torch.autocast with bf16: fp32 parameters, gradients and optimizer "
           "state; matmuls in bf16; softmax, norms and loss in fp32; other ops in their "
           "inputs' precision", matmul_input="bf16", activations="bf16", fp32_ops=_AMP,
           autocast=True),
    Recipe("amp-fp16", "torch.autocast with fp16 and dynamic loss scaling (GradScaler "
           "defaults: 2**16, x2 every 2000 finite steps, x0.5 and skip on inf/NaN)",
           matmul_input="fp16", activations="fp16", fp32_ops=_AMP, autocast=True,
           loss_scaling=LossScaling()),
    Recipe("fp8-hybrid", "FP8 matmuls, E4M3 forward and E5M2 backward, per-tensor delayed "
           "scaling with an amax history (Transformer Engine); bf16 autocast elsewhere",
           matmul_input="e4m3fn", matmul_input_backward="e5m2", activations="bf16",
           fp32_ops=_AMP, autocast=True, fp8_scaling=FP8Scaling()),
    Recipe("pure-bf16", "everything in bf16 (weights, gradients, optimizer state), no master "
           "weights, weight updates rounded to nearest",
           matmul_input="bf16", activations="bf16", weights="bf16", gradients="bf16",
           optimizer_state="bf16"),
)


_POLICIES: dict[str, type[LossScaling] | type[FP8Scaling]] = {
    "loss_scaling": LossScaling, "fp8_scaling": FP8Scaling}

# Telemetry signals (see diagnose): what a run's counters say went wrong.
SIGNALS = {
    "gradient_underflow": "nonzero gradient values flushed to zero in backward",
    "gradient_overflow": "overflow or inf/NaN while computing gradients",
    "forward_overflow": "overflow or inf/NaN in forward activations",
    "matmul_input_range": "8-bit matmul inputs overflowed or underflowed",
    "lost_updates": "weight updates lost to rounding",
    "diverged": "training diverged (NaN or inf loss)",
    "reduction_error": "data-parallel gradient reductions measurably off the exact sum",
}


@dataclass(frozen=True)
class Mitigation:
    """A documented change to a recipe that a port may need.

    ``changes`` are the recipe fields it sets; a dotted name sets one field of a policy
    (``"loss_scaling.check"``), keeping the recipe's other settings of that policy, or the
    policy's defaults when the recipe has none. ``needs`` the backend capabilities it
    requires (``BackendSpec.capabilities``), ``signals`` the telemetry signals that point
    to it, ``effort`` its weight in the effort score (1: a configuration switch, 2: a change
    to the training code, 3: a change to the model or optimizer's numerics), ``modes`` the
    modes it can change (a weight-update policy does nothing to inference).
    """

    name: str
    description: str
    changes: Mapping[str, Any]
    needs: tuple[str, ...] = ()
    signals: tuple[str, ...] = ()
    effort: int = 1
    modes: tuple[str, ...] = ("train", "infer")

    def __post_init__(self) -> None:
        object.__setattr__(self, "modes", tuple(self.modes))
        if not self.modes or not set(self.modes) <= {"train", "infer"}:
            raise HwportError(f"mitigation {self.name!r}: modes {list(self.modes)} must be "
                              "'train', 'infer' or both")
        known = {f.name for f in dataclasses.fields(Recipe)} - {"name", "description"}
        known |= {f"{k}.{f.name}" for k, policy in _POLICIES.items()
                  for f in dataclasses.fields(policy)}
        bad = sorted(set(self.changes) - known)
        if bad:
            raise HwportError(f"mitigation {self.name!r}: changes unknown recipe fields {bad}; "
                              f"fields are {sorted(known)}")
        unknown = sorted(set(self.signals) - set(SIGNALS))
        if unknown:
            raise HwportError(f"mitigation {self.name!r}: unknown signals {unknown}; "
                              f"signals are {sorted(SIGNALS)}")
        if self.effort < 1:
            raise HwportError(f"mitigation {self.name!r}: effort {self.effort} must be >= 1")
        for key, value in self.changes.items():  # each policy setting must make a policy
            if "." in key:
                name, _, attr = key.partition(".")
                try:
                    dataclasses.replace(_POLICIES[name](), **{attr: value})
                except HwportError as e:
                    raise HwportError(f"mitigation {self.name!r}: {key}={value!r}: {e}") \
                        from None

    def applies_to(self, spec: BackendSpec) -> bool:
        return set(self.needs) <= spec.capabilities

    def apply(self, recipe: Recipe) -> Recipe:
        """``recipe`` with this mitigation's changes."""
        changes: dict[str, Any] = {k: v for k, v in self.changes.items() if "." not in k}
        for key, value in self.changes.items():
            if "." in key:
                name, _, attr = key.partition(".")
                policy = changes.get(name) or getattr(recipe, name) or _POLICIES[name]()
                changes[name] = dataclasses.replace(policy, **{attr: value})
        return dataclasses.replace(recipe, **changes)


@dataclass(frozen=True)
class Lowered:
    """A recipe as one backend can run it, with the notes of what changed."""

    recipe: Recipe
    original: Recipe
    backend: BackendSpec
    notes: tuple[str, ...] = field(default=())


def _nearest_format(want: FloatFormat, have: list[FloatFormat]) -> FloatFormat:
    """The format of ``have`` closest to ``want``: itself, else one of the same width with
    the closest exponent width, else the narrowest wider one, else the widest."""
    if want in have:
        return want

    def closeness(f: FloatFormat) -> tuple[int, int]:
        return (abs(f.exponent_bits - want.exponent_bits), -f.mantissa_bits)

    same = [f for f in have if f.bits == want.bits]
    if same:
        return min(same, key=closeness)
    wider = [f for f in have if f.bits > want.bits]
    if wider:
        return min(wider, key=lambda f: (f.bits, *closeness(f)))
    return max(have, key=lambda f: f.bits)


def compute_format(spec: BackendSpec, name: str | None) -> FloatFormat | None:
    """The format called ``name`` as ``spec``'s hardware computes in it (flushing subnormal
    results on flush-to-zero hardware), or None for fp32 without flushing: nothing to round.
    Every engine rounds into these."""
    if name is None:
        return None
    f = spec.format(name)
    if spec.precision.flush_to_zero and f.subnormals:
        return dataclasses.replace(f, name=f"{f.name}_ftz", subnormals=False)
    return None if (f.exponent_bits, f.mantissa_bits, f.bias) == (8, 23, 127) else f


def lower(recipe: Recipe, spec: BackendSpec) -> Lowered:
    """``recipe`` as ``spec`` can run it: formats it lacks become its nearest ones, hardware
    features it lacks are dropped; each change is a note."""
    notes: list[str] = []
    changes: dict[str, object] = {}
    storage = [spec.format(f) for f in spec.precision.formats]
    matmul = [spec.format(f) for f in spec.precision.matmul_inputs]
    for role in ("matmul_input", "matmul_input_backward", "activations", "weights",
                 "master_weights", "gradients", "optimizer_state", "reduction_format"):
        name = getattr(recipe, role)
        if name is None:
            continue
        target = _nearest_format(spec.format(name), matmul if role.startswith("matmul")
                                 else storage).name
        if target != name:
            changes[role] = target
            notes.append(f"{role}: {name} -> {target} ({spec.name} has no {name}"
                         f"{' matmul' if role.startswith('matmul') else ''})")
    if recipe.update_rounding == "stochastic" and not spec.precision.stochastic_rounding:
        if recipe.software_stochastic:
            notes.append(f"update_rounding: stochastic, in software ({spec.name} has no "
                         "stochastic rounding: a random draw and an add per update)")
        else:
            changes["update_rounding"] = "nearest"
            notes.append(f"update_rounding: stochastic -> nearest ({spec.name} has no "
                         "stochastic rounding)")
    need = {"scale": "fp8_per_tensor_scaling", "bias": "configurable_exponent_bias"}
    if recipe.fp8_scaling is not None \
            and need[recipe.fp8_scaling.mechanism] not in spec.precision.features:
        changes["fp8_scaling"] = None
        what = {"scale": "per-tensor FP8 scaling", "bias": "configurable exponent bias"}
        notes.append(f"fp8_scaling dropped ({spec.name} has no "
                     f"{what[recipe.fp8_scaling.mechanism]})")
    lowered = dataclasses.replace(recipe, **changes) if changes else recipe  # type: ignore[arg-type]
    return Lowered(lowered, recipe, spec, tuple(notes))


def builtin(name: str) -> Recipe:
    """The built-in recipe called ``name``."""
    for r in BUILTIN:
        if r.name == name:
            return r
    raise UnknownNameError("recipe", name, [r.name for r in BUILTIN])


@hookimpl
def hwport_recipes() -> list[Recipe]:
    return list(BUILTIN)
