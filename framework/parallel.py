"""Data-parallel training through a backend's collectives.

``hwport run ... --world-size N`` trains on N processes joined in a gloo process group.
Every rank builds the same model from the same seed and draws its own batches; after each
backward pass, the gradients (rounded to the recipe's gradient format, still loss-scaled)
are reduced by the backend's all-reduce schedule (its first declared algorithm), every
addition rounded to its reduction format in the schedule's order, then averaged. Overflow
and NaN decisions are agreed by all ranks, so the replicas stay identical.

``--framework jax`` trains the same way on N JAX devices (:mod:`hwport.jaxparallel`).

The result's ``collectives`` reports the bytes all-reduced per step, the predicted
communication time per step (:func:`hwport.collectives.cost`) and its share of the step
(with the predicted compute step of :mod:`hwport.profile`), and the error of the reduced
gradients against their exact (float64) average, per step: the largest error over the
largest gradient, and the mean error over the gradients' RMS. The outcome is judged
against the same data-parallel training on the reference backend in fp32.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import torch

from hwport import collectives, profile, runner
from hwport.engine import seeded
from hwport.errors import HwportError
from hwport.pipeline import Pipeline, PipelineFactory
from hwport.recipes import Recipe, lower
from hwport.spec import BackendSpec


def _summary(spec: BackendSpec, p: Pipeline, model: torch.nn.Module, recipe: Recipe,
             seed: int, world: int, algorithm: str, red: str, elements: int,
             errors: list[tuple[float, float]]) -> dict[str, Any]:
    """A data-parallel run's memory plan, step time and ``collectives``."""
    sched = collectives.schedule("all_reduce", algorithm, world, spec.interconnect.shape)
    plan, step = profile.measure(p, model, lower(recipe, spec), "train", seed)
    nbytes = elements * spec.format(red).bits / 8
    comm = collectives.cost(sched, nbytes, spec).seconds
    total = comm + step.step_s
    return {
        "time": step.to_dict(), "memory": plan.to_dict(),
        "collectives": {
            "world_size": world, "op": "all_reduce", "algorithm": algorithm,
            "reduction_format": red, "bytes_per_step": nbytes,
            "predicted_s_per_step": comm,
            "share_of_step": comm / total if total > 0 else None,
            "gradient_error": {
                "max_relative": max((e[0] for e in errors), default=0.0),
                "mean_rms_relative": sum(e[1] for e in errors) / max(len(errors), 1)},
        },
    }


def _rank(rank: int, world: int, spec_data: dict[str, Any], recipe: Recipe, pipeline: str,
          steps: int | None, options: dict[str, Any] | None, seed: int, capture: bool
          ) -> dict[str, Any] | None:
    import torch.distributed as dist

    from hwport.rounding import quantize

    torch.set_num_threads(1)  # the ranks share this machine's cores
    spec = BackendSpec.from_dict(spec_data)  # plain data crosses the process boundary
    p = runner.resolve_pipeline(pipeline, steps, options)
    ic = spec.interconnect
    algorithm = ic.collectives["all_reduce"][0]
    sched = collectives.schedule("all_reduce", algorithm, world, ic.shape)
    lowered = lower(recipe, spec).recipe
    red, grads_fmt = lowered.reduction_format or ic.reduction_format, lowered.gradients
    errors: list[tuple[float, float]] = []
    sizes: list[int] = []

    def reduce(grads: list[torch.Tensor]) -> None:
        flat = torch.cat([g.reshape(-1) for g in grads])
        exact = flat.double()
        dist.all_reduce(exact)  # float64: the exact sum for comparison
        collectives.execute(sched, flat, red, rank)
        flat = quantize(flat / world, grads_fmt)
        errors.append(collectives.relative_error(flat.numpy(), (exact / world).numpy()))
        sizes.append(flat.numel())
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def any_rank(flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def setup(em: Any) -> None:
        em.reduce_gradients, em.any_rank = reduce, any_rank

    trained, notes = runner._train(p, spec, recipe, seed, None, capture, shard=rank + 1,
                                   setup=setup)
    # every replica must hold the same weights: a digest of their bytes, compared by the host
    digest = hashlib.sha256(b"".join(q.detach().numpy().tobytes()
                                     for q in trained.model.parameters())).hexdigest()
    if rank:
        return {"digest": digest}
    return {
        "digest": digest, "curve": trained.curve, "metrics": trained.metrics,
        "initial": trained.initial, "telemetry": trained.telemetry,
        "finite": trained.finite, "notes": notes,
        **_summary(spec, p, trained.model, recipe, seed, world, algorithm, red,
                   sizes[-1] if sizes else 0, errors)}


def run(spec: BackendSpec, pipeline: str | Pipeline | PipelineFactory, mode: str,
        recipe: Recipe, *, steps: int | None, seed: int, options: dict[str, Any] | None,
        rules: runner.OutcomeRules, world_size: int, capture: bool = True,
        timeout: float = 1800.0, framework: str = "torch") -> runner.RunResult:
    """One data-parallel training cell (see the module docstring; ``framework="jax"``:
    :mod:`hwport.jaxparallel`)."""
    if mode != "train":
        raise HwportError(f"world_size={world_size}: data parallelism applies to training; "
                          f"mode {mode!r} runs on one device")
    if not isinstance(world_size, int) or world_size < 2:
        raise HwportError(f"world_size={world_size!r}: must be a positive integer")
    if not isinstance(pipeline, str):
        raise HwportError("a data-parallel run needs its pipeline by name or as "
                          "'package.module:factory': each rank is a separate process")
    if "all_reduce" not in spec.interconnect.collectives:
        raise HwportError(f"backend {spec.name!r} declares no all_reduce "
                          "(interconnect.collectives): it cannot train data-parallel")
    p = runner.resolve_pipeline(pipeline, steps, options)  # bad names fail here, not in ranks
    from hwport import plugins

    reference = plugins.get_backend("reference")
    fp32 = plugins.registry().recipe("fp32")

    def train(on: BackendSpec, rec: Recipe) -> dict[str, Any]:
        if framework == "jax":
            from hwport import jaxparallel

            got = jaxparallel.train(on, rec, pipeline, steps, options, seed, world_size,
                                    timeout)
            with seeded(seed):  # the same model's memory and time, as for one device
                model = p.model()
            got.update(_summary(on, p, model, rec, seed, world_size, got["algorithm"],
                                got["reduction_format"], got["elements"], got["errors"]))
            return got
        ranks = collectives.launch(world_size, _rank, on.to_dict(), rec, pipeline, steps,
                                   options, seed, capture, timeout=timeout)
        if len({r["digest"] for r in ranks}) != 1:
            raise HwportError(f"data-parallel run on {on.name}: the {world_size} replicas "
                              "ended with different weights")
        first: dict[str, Any] = ranks[0]
        return first

    key = (pipeline, steps, repr(sorted((options or {}).items())), seed, world_size, capture,
           framework)
    ref = _REFERENCE.get(key) or _REFERENCE.setdefault(key, train(reference, fp32))
    t0 = time.perf_counter()
    got = ref if (spec.name, recipe.name) == ("reference", "fp32") else train(spec, recipe)
    wall = time.perf_counter() - t0
    outcome = rules.train(got["initial"]["val_loss"], got["metrics"].get("val_loss", 0.0)
                          if got["finite"] else float("nan"), ref["metrics"]["val_loss"],
                          got["finite"])
    result = runner.RunResult(spec.name, p.name, mode, recipe.name, seed, p.steps, outcome,
                              got["metrics"], ref["metrics"], got["curve"], got["telemetry"],
                              got["notes"], wall, framework=framework, metric=p.metric,
                              reference_curve=ref["curve"])
    result.memory, result.time = got["memory"], got["time"]
    result.collectives = got["collectives"]
    return result


# data-parallel fp32 training on the reference, per configuration, for this process's cells
_REFERENCE: dict[tuple[Any, ...], dict[str, Any]] = {}
