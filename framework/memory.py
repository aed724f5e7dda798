"""Memory plans: bytes per device by role, placed on a backend's memory tiers.

The placement policy (docs/performance-model.md):

1. Resident data lives only in ``explicit`` tiers (a ``cached`` tier holds copies of a
   slower tier; a ``staging`` tier holds data for one kernel only), fastest first, each
   with its capacity summed over its instances.
2. Roles are placed in the order a step touches them most: activations saved for backward
   (written and read every micro-batch), weights (read by every forward and backward),
   gradients (accumulated every micro-batch), master weights and optimizer state (read and
   written once per step). A role takes what is left of the fastest tier; the remainder
   spills to the next. What no tier holds is ``unplaced``: the plan does not fit.
3. The *binding tier* is the fastest tier that filled up: the one whose capacity decides
   where the rest goes. Every byte a step moves to or from a tier is counted against it
   (``traffic``), in proportion to the share of each role that tier holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from hwport.errors import HwportError
from hwport.spec import BackendSpec, MemoryTier

if TYPE_CHECKING:
    import torch

ROLES = ("activations", "weights", "gradients", "master_weights", "optimizer_state")


@dataclass(frozen=True)
class MemoryPlan:
    """Where a device's bytes live: per role, per tier (see the module docstring)."""

    bytes: dict[str, float]  # per role
    placement: dict[str, dict[str, float]]  # role -> tier -> bytes
    capacity: dict[str, float]  # resident tiers, fastest first
    traffic: dict[str, float]  # tier -> bytes moved per step
    unplaced: float
    binding: str | None

    @property
    def total(self) -> float:
        return sum(self.bytes.values())

    @property
    def fits(self) -> bool:
        return self.unplaced == 0

    def used(self, tier: str) -> float:
        """Bytes resident in ``tier``."""
        return sum(p.get(tier, 0.0) for p in self.placement.values())

    def tier_of(self, role: str) -> str | None:
        """The tier holding most of ``role`` (None when nothing of it is placed)."""
        where = self.placement.get(role, {})
        return max(where, key=lambda t: where[t]) if where else None

    def to_dict(self) -> dict[str, Any]:
        """Plain, strict-JSON data (an unbounded capacity as "inf")."""
        plain: dict[str, Any] = finite(asdict(self) | {"total": self.total, "fits": self.fits})
        return plain


def finite(x: Any) -> Any:
    """``x`` as strict JSON data: non-finite floats become the strings "inf", "-inf", "nan"."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [finite(v) for v in x]
    return x


def infinite(x: Any) -> Any:
    """The inverse of :func:`finite`: the strings "inf", "-inf", "nan" back as floats."""
    if isinstance(x, str) and x in ("inf", "-inf", "nan"):
        return float(x)
    if isinstance(x, dict):
        return {k: infinite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [infinite(v) for v in x]
    return x


def resident_tiers(spec: BackendSpec) -> list[MemoryTier]:
    """The tiers where a plan may keep data, fastest first."""
    return [t for t in spec.memory.tiers if t.managed == "explicit"]


def plan(spec: BackendSpec, roles: Mapping[str, float],
         moved: Mapping[str, float] | None = None) -> MemoryPlan:
    """Place ``roles`` (bytes per device) on ``spec``'s tiers; ``moved`` is the bytes each
    role moves per step (reads plus writes), for the traffic per tier."""
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise HwportError(f"memory roles {unknown} unknown; roles are {list(ROLES)}")
    tiers = resident_tiers(spec)
    if not tiers:
        raise HwportError(f"backend {spec.name!r}: no explicit memory tier to place data in")
    free = {t.name: t.total_capacity for t in tiers}
    placement: dict[str, dict[str, float]] = {}
    binding: str | None = None
    unplaced = 0.0
    for role in ROLES:
        need = float(roles.get(role, 0.0))
        if not (math.isfinite(need) and need >= 0):
            raise HwportError(f"memory role {role}: {need} bytes must be finite and >= 0")
        where: dict[str, float] = {}
        for t in tiers:
            if need <= 0:
                break
            take = min(need, free[t.name])
            if take > 0:
                where[t.name] = take
                free[t.name] -= take
                need -= take
            if free[t.name] <= 0 and binding is None and need > 0:
                binding = t.name
        unplaced += need
        placement[role] = where
    traffic = {t.name: 0.0 for t in tiers}
    for role, total in (moved or {}).items():
        size = float(roles.get(role, 0.0))
        for tier, b in placement.get(role, {}).items():
            traffic[tier] += total * b / size
    return MemoryPlan({r: float(roles.get(r, 0.0)) for r in ROLES}, placement,
                      {t.name: t.total_capacity for t in tiers}, traffic, unplaced, binding)


class SavedTensors:
    """While active, counts the bytes autograd keeps for backward: each storage once (views
    of one tensor share it), none of ``exclude`` (the parameters). ``element_bytes`` gives
    the bytes per element a saved tensor costs (default: its dtype's; the emulator passes
    the storage format's)."""

    def __init__(self, exclude: Iterable[torch.Tensor] = (),
                 element_bytes: Callable[[torch.Tensor], float] | None = None) -> None:
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._size = element_bytes
        self._seen: dict[int, float] = {}
        self._hooks: Any = None

    @property
    def bytes(self) -> float:
        return sum(self._seen.values())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self._exclude and key not in self._seen:
            per = self._size(t) if self._size else t.element_size()
            self._seen[key] = storage.nbytes() / t.element_size() * per
        return t

    def __enter__(self) -> SavedTensors:
        import torch

        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
