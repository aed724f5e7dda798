"""What changed between two stored runs (``hwport diff A B``).

Cells are matched by (pipeline, mode, backend). For each pair the diff reports the outcome,
the headline metric (absolute and relative change), the porting effort when either run
searched it, and cells present in only one run. Runs made on different versions of a
backend's spec, recipe or hwport say which figures, fields or versions differ, so that a
changed outcome can be traced to the change that caused it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from hwport.memory import finite
from hwport.store import StoredRun


@dataclass(frozen=True)
class CellChange:
    """One (pipeline, mode, backend) of either run; ``None`` where that run lacks it."""

    pipeline: str
    mode: str
    backend: str
    outcome: tuple[str | None, str | None]
    metric: str
    value: tuple[float | None, float | None]
    effort: tuple[Any, Any]  # an int, None (no fix) or "-" (not searched)

    @property
    def changed(self) -> bool:
        """Whether anything a reader would act on differs (outcome, effort, presence, or the
        metric by more than one part in a million)."""
        a, b = self.value
        moved = (a is None) != (b is None) or (
            a is not None and b is not None and not _close(a, b))
        return self.outcome[0] != self.outcome[1] or self.effort[0] != self.effort[1] or moved

    @property
    def relative(self) -> float | None:
        """(B - A) / |A| of the headline metric, when both runs have it."""
        a, b = self.value
        if a is None or b is None or a == 0 or not (math.isfinite(a) and math.isfinite(b)):
            return None
        return (b - a) / abs(a)


@dataclass(frozen=True)
class Diff:
    """Two runs compared (``a`` is the older, or the first named)."""

    a: int
    b: int
    cells: list[CellChange]
    specs: dict[str, list[tuple[str, Any, Any]]]  # backend: (figure, in A, in B)
    recipe: list[tuple[str, Any, Any]]  # field, in A, in B
    versions: tuple[str, str]
    settings: list[tuple[str, Any, Any]] = field(default_factory=list)  # seed, steps, ...

    @property
    def changed(self) -> list[CellChange]:
        return [c for c in self.cells if c.changed]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cells"] = [{**asdict(c), "changed": c.changed, "relative": c.relative}
                      for c in self.cells]
        return finite(d)  # type: ignore[no-any-return]


def _close(a: float, b: float) -> bool:
    if math.isnan(a) and math.isnan(b):
        return True
    return a == b or math.isclose(a, b, rel_tol=1e-6, abs_tol=0.0)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested data as {dotted path: leaf}; list items of dicts with a ``name`` go by name."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(data, list) and data and all(isinstance(v, dict) and "name" in v
                                                 for v in data):
        for v in data:
            out.update(flatten({k: x for k, x in v.items() if k != "name"},
                               f"{prefix}{v['name']}."))
    else:
        out[prefix.rstrip(".")] = data
    return out


def _changes(a: Any, b: Any) -> list[tuple[str, Any, Any]]:
    fa, fb = flatten(a), flatten(b)
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb))
            if fa.get(k) != fb.get(k)]


def diff(a: StoredRun, b: StoredRun) -> Diff:
    """What changed from run ``a`` to run ``b``."""
    def effort(run: StoredRun, key: tuple[str, str, str]) -> Any:
        port = run.ports.get(key)
        return "-" if port is None else port["effort"]

    keys: list[tuple[str, str, str]] = []
    for run in (a, b):
        for c in run.cells:
            k = (c.pipeline, c.mode, c.backend)
            if k not in keys:
                keys.append(k)
    cells = []
    for pipeline, mode, backend in keys:
        ca, cb = a.cell(backend, pipeline, mode), b.cell(backend, pipeline, mode)
        metric = (ca or cb).metric  # type: ignore[union-attr]
        cells.append(CellChange(
            pipeline, mode, backend,
            (ca.outcome if ca else None, cb.outcome if cb else None), metric,
            (ca.metrics.get(metric) if ca else None, cb.metrics.get(metric) if cb else None),
            (effort(a, (backend, pipeline, mode)), effort(b, (backend, pipeline, mode)))))
    specs = {name: _changes(a.specs[name], b.specs[name])
             for name in sorted(set(a.specs) & set(b.specs))}
    ra, rb = a.record, b.record
    settings = [(k, getattr(ra, k), getattr(rb, k)) for k in ("kind", "seed", "steps",
                                                               "world_size", "framework")
                if getattr(ra, k) != getattr(rb, k)]
    settings += _changes({"params": ra.params}, {"params": rb.params})
    return Diff(ra.id, rb.id, cells, {k: v for k, v in specs.items() if v},
                _changes(a.recipe, b.recipe), (ra.hwport_version, rb.hwport_version), settings)
