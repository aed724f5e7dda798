"""What one step of a run holds and how long it would take on the backend, measured.

:func:`measure` runs one step of the pipeline natively on a copy of the run's model (the
run itself is untouched) and records:

- **bytes by role**, in the backend's storage formats as the lowered recipe assigns them:
  parameters (weights), gradients, master weights, the optimizer's state after one update,
  and the activations autograd keeps for backward (each storage once; floating-point
  values in the activation format, masks and indices at their own size);
- **every op's FLOPs and bytes**: FLOPs of matmul-class ops (torch's own FLOP formulas),
  bytes of every tensor read and written, matmul operands in the matmul input format.

The memory plan places the roles on the spec's tiers (:mod:`hwport.memory`). The step
time is a roofline per op, ``max(FLOPs / peak of its format, bytes / bandwidth of the
tier holding the activations)``, summed over the step with no overlap between ops, plus the
optimizer reading and writing every model state where it lives. docs/performance-model.md
states these assumptions.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from hwport import memory
from hwport.engine import seeded
from hwport.pipeline import Pipeline
from hwport.recipes import Lowered


@dataclass
class StepTime:
    """A step's predicted time on the backend (see the module docstring)."""

    step_s: float
    compute_s: float  # ops bound by their FLOPs
    memory_s: dict[str, float]  # ops (and the optimizer) bound by a tier's bandwidth
    flops: dict[str, float]  # matmul FLOPs by operand format
    bytes_moved: float
    peak_fraction: float | None  # (matmul FLOPs at their formats' peaks) / step time
    bound: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Count(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Records each op's FLOPs and bytes (as the recipe would store its tensors)."""

    def __init__(self, fmt_bytes: dict[str, float]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.fmt_bytes = fmt_bytes
        self.phase = "forward"
        self.ops: list[tuple[float, float, str]] = []  # (flops, bytes, operand role)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _moves_nothing(func):
            return out
        counter = flop_registry.get(func.overloadpacket)
        flops = 0.0
        if counter is not None:
            flops = float(counter(*args, **kwargs, out_val=out))
        role = "matmul_input" if self.phase == "forward" else "matmul_input_backward"
        operand = self.fmt_bytes[role]
        moved = 0.0
        for i, t in enumerate(tree_flatten((args, kwargs))[0]):
            if isinstance(t, torch.Tensor):
                moved += t.numel() * (operand if counter is not None and i < 3
                                      else self._size(t))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                moved += t.numel() * self._size(t)
        self.ops.append((flops, moved, role))
        return out

    def _size(self, t: torch.Tensor) -> float:
        return self.fmt_bytes["activations"] if t.is_floating_point() else t.element_size()


_NO_DATA = {"detach", "alias", "lift_fresh"}


def _moves_nothing(func: Any) -> bool:
    """Ops that only make a view or an alias of their input (view, transpose, expand,
    detach, ...): no data moves."""
    schema = func._schema
    return func.overloadpacket.__name__ in _NO_DATA or (
        bool(schema.returns) and all(r.alias_info is not None and not r.alias_info.is_write
                                     for r in schema.returns)
        and not any(a.alias_info is not None and a.alias_info.is_write
                    for a in schema.arguments))


def _bytes(spec: Any, name: str | None) -> float:
    return spec.format(name).bits / 8 if name else 0.0


def measure(p: Pipeline, model: torch.nn.Module, lowered: Lowered, mode: str,
            seed: int = 0) -> tuple[memory.MemoryPlan, StepTime]:
    """The memory plan and predicted time of one ``mode`` step (see the module docstring)."""
    spec, recipe = lowered.backend, lowered.recipe
    fmt = {role: _bytes(spec, name) for role, name in recipe.formats().items()}
    fmt.setdefault("master_weights", 0.0)
    counter = _Count(fmt)
    work = copy.deepcopy(model)
    params = [q for q in work.parameters() if q.requires_grad]
    n = sum(q.numel() for q in params)
    roles = {"weights": n * fmt["weights"]}
    with seeded(seed):
        if mode == "train":
            batch = next(p.batches(seed))
            work.train()
            with memory.SavedTensors(exclude=work.parameters(), element_bytes=counter._size
                                     ) as saved, counter:
                loss = p.loss(work, batch)
            counter.phase = "backward"
            with counter:
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            for q, g in zip(params, grads, strict=True):
                q.grad = g
            optimizer = p.optimizer(work.parameters())
            optimizer.step()
            state = sum(v.numel() for s in optimizer.state.values() for v in s.values()
                        if isinstance(v, torch.Tensor) and v.is_floating_point()
                        and v.dim() > 0)
            kahan = 4 * n if recipe.kahan_updates else 0  # one fp32 compensation each
            roles |= {"gradients": n * fmt["gradients"],
                      "master_weights": n * fmt["master_weights"],
                      "optimizer_state": state * fmt["optimizer_state"] + kahan,
                      "activations": saved.bytes}
            moved = {"activations": 2 * saved.bytes, "weights": 2 * roles["weights"]}
        else:
            work.eval()
            with torch.no_grad(), counter:
                p.predict(work)
            moved = {"weights": roles["weights"]}
    plan = memory.plan(spec, roles, moved)
    return plan, _time(plan, counter.ops, lowered, mode)


def _time(plan: memory.MemoryPlan, ops: list[tuple[float, float, str]], lowered: Lowered,
          mode: str) -> StepTime:
    spec, recipe = lowered.backend, lowered.recipe
    tiers = {t.name: t for t in memory.resident_tiers(spec)}
    act_tier = plan.tier_of("activations") or plan.tier_of("weights") or next(iter(tiers))
    bw = tiers[act_tier].bandwidth
    notes = []
    peaks = spec.compute.peak_flops
    formats = {"matmul_input": recipe.matmul_input,
               "matmul_input_backward": recipe.backward_input}

    def peak_of(fmt: str) -> float:
        if fmt in peaks:
            return peaks[fmt]
        note = f"{spec.name} gives no peak for {fmt} matmuls: its lowest peak is used"
        if note not in notes:
            notes.append(note)
        return min(peaks.values())

    compute_s, memory_s = 0.0, {t: 0.0 for t in tiers}
    flops: dict[str, float] = {}
    moved = 0.0
    for f, b, role in ops:
        fmt = formats[role]
        moved += b
        tc, tm = (f / peak_of(fmt) if f else 0.0), b / bw
        if f:
            flops[fmt] = flops.get(fmt, 0.0) + f
        if tc >= tm and f:
            compute_s += tc
        else:
            memory_s[act_tier] += tm
    if mode == "train":  # the optimizer reads and writes every model state where it lives
        for role in ("weights", "gradients", "master_weights", "optimizer_state"):
            for tier, nbytes in plan.placement[role].items():
                memory_s[tier] += 2 * nbytes / tiers[tier].bandwidth
    step = compute_s + sum(memory_s.values())
    finite = math.isfinite(step) and step > 0
    mm = recipe.matmul_input
    parts = {f"compute ({mm})": compute_s, **{f"memory ({t})": v for t, v in memory_s.items()}}
    ideal = sum(f / peak_of(fmt) for fmt, f in flops.items())  # every FLOP at its peak
    return StepTime(step if finite else 0.0, compute_s, memory_s, flops, moved,
                    ideal / step if finite and math.isfinite(ideal) else None,
                    max(parts, key=lambda k: parts[k]) if finite else "unbounded", notes)
