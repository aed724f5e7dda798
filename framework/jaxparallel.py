"""Data-parallel training of a pipeline's JAX twin over virtual CPU devices.

``hwport run ... --framework jax --world-size N`` is :mod:`hwport.parallel` in JAX, with
its semantics: every device holds the same parameters and draws its own batches (device r
those of torch's rank r); forward and backward run on every device under ``shard_map``; the
gradients, rounded to the gradient format and still loss-scaled, are all-reduced by the
backend's all-reduce schedule (:func:`hwport.collectives.schedule`, its first declared
algorithm) executed transfer by transfer with ``lax.ppermute``, every addition rounded to
the reduction format in the schedule's order, then averaged and rounded to the gradient
format: the bits of :func:`hwport.collectives.execute` on torch.distributed (a test holds
them equal). A step is skipped, and training stops, when any device says so.

The devices are XLA's host-platform devices, whose number is fixed when JAX starts, so a
run happens in a fresh process. The update runs once, on the reduced gradients, which every
device must hold bit for bit (checked each step: replicas that would diverge end the run
with an error). Telemetry is device 0's, as torch's data-parallel run reports rank 0's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from hwport import collectives, jaxrun
from hwport.errors import HwportError
from hwport.jax import unpack
from hwport.pipelines.jaxnets import JaxPipeline
from hwport.recipes import Lowered, Recipe, lower
from hwport.rounding import quantize
from hwport.spec import BackendSpec

AXIS = "ranks"
SHARDED: Any = PartitionSpec(AXIS)  # type: ignore[no-untyped-call]
REPLICATED: Any = PartitionSpec()  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class _Round:
    """One ``ppermute``: the (source, destination) pairs and, per rank, the chunk it sends,
    the chunk it receives into, whether it adds what it receives, whether it receives."""

    perm: tuple[tuple[int, int], ...]
    send: tuple[int, ...]
    to: tuple[int, ...]
    reduce: tuple[bool, ...]
    on: tuple[bool, ...]


def rounds(sched: collectives.Schedule) -> list[list[_Round]]:
    """Each step of ``sched`` as rounds in which every rank sends at most one chunk and
    receives at most one; a rank receives a step's transfers in the order
    :func:`hwport.collectives.execute` adds them (by source, then chunk)."""
    n = sched.ranks
    plan = []
    for step in sched.steps:
        placed: list[list[collectives.Transfer]] = []
        last: dict[int, int] = {}
        for t in sorted(step, key=lambda t: (t.dst, t.src, t.chunk)):
            r = last.get(t.dst, -1) + 1
            while r < len(placed) and any(u.src == t.src for u in placed[r]):
                r += 1
            if r == len(placed):
                placed.append([])
            placed[r].append(t)
            last[t.dst] = r
        out = []
        for ts in placed:
            send, to, red, on = [0] * n, [0] * n, [False] * n, [False] * n
            for t in ts:
                send[t.src] = t.chunk
                to[t.dst] = t.to_chunk if t.to_chunk is not None else t.chunk
                red[t.dst], on[t.dst] = t.reduce, True
            out.append(_Round(tuple((t.src, t.dst) for t in ts), tuple(send), tuple(to),
                              tuple(red), tuple(on)))
        plan.append(out)
    return plan


def _layout(n: int, chunks: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each of ``n`` elements sits in a [chunks, L] array split as torch.tensor_split
    splits (the first ``n % chunks`` chunks one longer; padding reads element ``n``), and
    the way back."""
    bounds = np.cumsum([0] + [n // chunks + (c < n % chunks) for c in range(chunks)])
    width = max(int(np.diff(bounds).max()), 1)
    index = np.full((chunks, width), n, np.int32)
    for c in range(chunks):
        index[c, :bounds[c + 1] - bounds[c]] = np.arange(bounds[c], bounds[c + 1])
    back = np.concatenate([c * width + np.arange(bounds[c + 1] - bounds[c])
                           for c in range(chunks)]).astype(np.int32)
    return index, back


def _mapped(fn: Any, world: int, in_specs: Any) -> Any:
    """``fn`` jitted on the first ``world`` devices, one call per device under
    ``shard_map`` over :data:`AXIS`, its outputs stacked along a leading device axis."""
    mesh = Mesh(np.array(jax.devices()[:world]), (AXIS,))
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=SHARDED,
                                 check_vma=False))


def execute(sched: collectives.Schedule, flat: Any, fmt: str) -> Any:
    """Run ``sched`` on this device's ``flat`` float32 vector inside ``shard_map`` over
    :data:`AXIS`, every reduction rounded to ``fmt`` to nearest in the schedule's order."""
    me = jax.lax.axis_index(AXIS)
    index, back = _layout(flat.shape[0], sched.chunks)
    parts = jnp.concatenate([flat, jnp.zeros(1, flat.dtype)])[index]

    def mine(table: tuple[Any, ...]) -> Any:
        return jnp.asarray(table)[me]

    for step in rounds(sched):
        # every round of a step sends the values from before the step
        got = [jax.lax.ppermute(parts[mine(r.send)], AXIS, r.perm)  # type: ignore[no-untyped-call]
               for r in step]
        for r, x in zip(step, got, strict=True):
            target = mine(r.to)
            cur = parts[target]
            new = jnp.where(mine(r.reduce), quantize(cur + x, fmt), x)
            parts = parts.at[target].set(jnp.where(mine(r.on), new, cur))
    return parts.reshape(-1)[back]


class DataParallel(jaxrun.Trainer):
    """A JAX twin trained data-parallel on ``world`` devices (see the module docstring)."""

    def __init__(self, jp: JaxPipeline, lowered: Lowered, seed: int, world: int) -> None:
        super().__init__(jp, lowered, seed)
        if jax.device_count() < world:
            raise HwportError(f"--world-size {world} with --framework jax needs {world} JAX "
                              f"devices; this process has {jax.device_count()}")
        spec, r = lowered.backend, lowered.recipe
        ic = spec.interconnect
        self.world = world
        self.algorithm = ic.collectives["all_reduce"][0]
        self.schedule = collectives.schedule("all_reduce", self.algorithm, world, ic.shape)
        self.reduction = r.reduction_format or ic.reduction_format
        self.errors: list[tuple[float, float]] = []
        self.shapes: dict[str, tuple[int, ...]] = {}  # in torch's order: the reduced layout
        self._program: Any = None

    @property
    def elements(self) -> int:
        """The gradient elements all-reduced per step."""
        return sum(math.prod(s) for s in self.shapes.values())

    def prepare(self, init: dict[str, np.ndarray]) -> tuple[Any, Any, Any]:
        self.shapes = {k: tuple(v.shape) for k, v in init.items()}
        return super().prepare(init)

    def batches(self, seed: int) -> Iterator[Any]:
        streams = [self.jp.batches(seed * 1_000_003 + r + 1) for r in range(self.world)]
        for parts in zip(*streams, strict=False):
            yield tuple(np.concatenate(xs) for xs in zip(*parts, strict=True))

    def _build(self) -> Any:
        order, sched, red, world = list(self.shapes), self.schedule, self.reduction, self.world
        grads_fmt = self.lowered.recipe.gradients

        def device(params: Any, batch: Any, scale: Any) -> Any:
            value, grads, totals, counts, _ = self.forward_backward(params, batch, scale)
            flat = jnp.concatenate([grads[k].reshape(-1) for k in order])
            reduced = quantize(execute(sched, flat, red) / world, grads_fmt)
            out = {"value": value, "totals": totals, "counts": counts, "local": flat,
                   "reduced": reduced}
            return jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], out)

        return _mapped(device, world, (REPLICATED, SHARDED, REPLICATED))

    def _launch(self, params: Any, batch: Any) -> tuple[tuple[Any, ...], Callable[[], Any]]:
        if self._program is None:
            self._program = self._build()
        out = jax.device_get(self._program(params, batch, np.float32(self.scale)))
        reduced = out["reduced"]
        if not all(np.array_equal(reduced[0], x, equal_nan=True) for x in reduced[1:]):
            raise HwportError(f"data-parallel JAX run on {self.lowered.backend.name}: the "
                              f"{self.world} devices reduced to different gradients")
        exact = out["local"].astype(np.float64).sum(0) / self.world
        self.errors.append(collectives.relative_error(reduced[0], exact))
        grads, offset = {}, 0
        for k, shape in self.shapes.items():
            size = math.prod(shape)
            grads[k] = jnp.asarray(reduced[0][offset:offset + size].reshape(shape))
            offset += size
        devices = [unpack(self.programs.fb.layout, t) for t in out["totals"]]
        values = out["value"]
        value = values[0] if np.isfinite(values).all() else np.float32("nan")
        over = any(jaxrun.overflowed(t) for t in devices)
        return ((value, grads, out["counts"][0], bool(np.isfinite(reduced[0]).all()), None),
                lambda: (devices[0], over))


def _all_reduce(algorithm: str, inputs: np.ndarray, fmt: str, shape: tuple[int, ...]
                ) -> np.ndarray:
    world = inputs.shape[0]
    jax.config.update("jax_num_cpu_devices", world)  # type: ignore[no-untyped-call]
    sched = collectives.schedule("all_reduce", algorithm, world, shape)
    run = _mapped(lambda v: execute(sched, v[0], fmt)[None], world, SHARDED)
    return np.asarray(run(jnp.asarray(inputs, jnp.float32)))


def all_reduce(algorithm: str, inputs: np.ndarray, fmt: str, shape: tuple[int, ...] = (),
               timeout: float = 300.0) -> np.ndarray:
    """All-reduce row r of ``inputs`` ([ranks, n] float32) from JAX device r by
    ``algorithm``, in a fresh process with that many devices; every device's result."""
    out: np.ndarray = collectives.launch(1, _all_reduce, algorithm, np.asarray(inputs),
                                         fmt, shape, timeout=timeout, group=False)[0]
    return out


def _child(world: int, spec_data: dict[str, Any], recipe: Recipe, pipeline: str,
           steps: int | None, options: dict[str, Any] | None, seed: int) -> dict[str, Any]:
    """The run, in a fresh process whose JAX has ``world`` CPU devices."""
    jax.config.update("jax_num_cpu_devices", world)  # type: ignore[no-untyped-call]
    from hwport import runner
    from hwport.pipelines.jaxnets import twin

    spec = BackendSpec.from_dict(spec_data)
    p = runner.resolve_pipeline(pipeline, steps, options)
    jp = twin(p)
    lowered = lower(recipe, spec)
    trainer = DataParallel(jp, lowered, seed, world)
    got = jaxrun.train(jp, lowered, seed, trainer=trainer)
    del got["params"]
    got.update(notes=list(lowered.notes), algorithm=trainer.algorithm,
               reduction_format=trainer.reduction, errors=trainer.errors,
               elements=trainer.elements)
    return got


def train(spec: BackendSpec, recipe: Recipe, pipeline: str, steps: int | None,
          options: dict[str, Any] | None, seed: int, world: int,
          timeout: float = 1800.0) -> dict[str, Any]:
    """Train ``pipeline``'s twin on ``world`` JAX devices of a fresh process: its curve,
    metrics, initial metrics, finiteness, telemetry, notes, the all-reduce's algorithm and
    reduction format, the per-step gradient errors and the elements reduced per step."""
    got: dict[str, Any] = collectives.launch(1, _child, world, spec.to_dict(), recipe,
                                             pipeline, steps, options, seed, timeout=timeout,
                                             group=False)[0]
    return got


__all__ = ["AXIS", "DataParallel", "all_reduce", "execute", "rounds", "train"]
