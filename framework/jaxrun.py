"""Training and inference of a pipeline's JAX twin under a backend: the JAX engine's step.

The training step does what the torch engine's :meth:`~hwport.engine.Emulator.train_step`
does, in JAX, with :func:`hwport.jax.emulate` for forward and backward:

* parameters stored in the weights format (fp32 master copies kept apart when the recipe
  has them); forward and backward emulated, the loss scale entering as the loss's
  cotangent; gradients rounded to the gradient format;
* loss scaling with GradScaler semantics (skip and back off on an inf or NaN gradient, or
  on any backward overflow with ``check="overflow_flags"``; grow after an interval);
* the twin's optimizer (AdamW or SGD) as torch's single-tensor implementation writes it,
  each of its writes rounded as the torch engine rounds them: optimizer state to the state
  format, each parameter write to the master (or weights) format with the recipe's update
  rounding (stochastic rounding keyed by seed, step and write, so a run is reproducible;
  in software or not, the same bits), lost updates counted; with Kahan updates each
  write's rounding error carried into the parameter's next write; natively when nothing
  needs rounding.

Forward-backward and the update are each one ``jax.jit`` program; the host reads the step's
overflow flags for loss scaling, as the torch engine does, the telemetry packed into one
array (:class:`hwport.jax.Packed`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hwport.engine import Telemetry, seeded
from hwport.errors import HwportError
from hwport.formats import FloatFormat
from hwport.jax import Packed, emulate
from hwport.pipelines.jaxnets import JaxPipeline
from hwport.recipes import Lowered, Recipe, compute_format
from hwport.rounding import Rounding, _lowbias32, kernel_params, round_counted_jax
from hwport.spec import BackendSpec


def check(lowered: Lowered, world_size: int = 1) -> None:
    """Refuse, by name, what the JAX engine does not model yet: per-tensor FP8 scaling in
    data-parallel runs (each device would keep its own amax histories)."""
    if lowered.recipe.fp8_scaling is not None and world_size > 1:
        raise HwportError(f"recipe {lowered.recipe.name!r} uses per-tensor FP8 scaling on "
                          f"backend {lowered.backend.name!r}, which --framework jax does not "
                          "model in data-parallel runs yet (docs/jax.md); run it with "
                          "--framework torch, or on one device")


def _counted(x: Any, fmt: FloatFormat | None, rounding: Rounding = Rounding.NEAREST,
             key: Any = None, rbits: int = 23) -> tuple[Any, Any]:
    """``x`` rounded into ``fmt`` and its [elements, overflow, underflow, nonfinite]."""
    n = jnp.asarray(x.size, jnp.int32)
    if fmt is None:
        return x, jnp.stack([n * 0, n * 0, n * 0, n * 0])
    p = kernel_params(fmt, 32, rounding, 0 if rounding is Rounding.STOCHASTIC else None,
                      None, rbits)
    y, counts = round_counted_jax(
        x.astype(jnp.float32), p, (key[0], key[1]) if rounding is Rounding.STOCHASTIC else None)
    return y, jnp.concatenate([n[None], counts])


def _keys(seed: Any, step: Any, site: int) -> tuple[Any, Any]:
    """Stochastic-rounding keys of one parameter write: a hash of (seed, step, write)."""
    def mul(x: Any, k: int) -> Any:
        return x * jnp.uint32(k)

    base = seed.astype(jnp.uint32) * jnp.uint32(0x9E3779B9) + jnp.uint32(
        (site * 0x85EBCA6B) & 0xFFFFFFFF)
    k0 = _lowbias32(_lowbias32(base, mul) ^ step.astype(jnp.uint32), mul)
    return k0, _lowbias32(k0 + jnp.uint32(0x6A09E667), mul)


def overflowed(totals: dict[str, Any]) -> bool:
    """Whether backward's overflow flags are up in :meth:`hwport.jax.Telemetry.totals`."""
    return any(int(v["overflow"]) + int(v["nonfinite"]) > 0
               for k, v in totals.items() if k.startswith("backward/"))


def _add(t: Telemetry, key: str, c: Any) -> None:
    """Add one [elements, overflow, underflow, nonfinite] row to ``t.rounding[key]``."""
    n, *rest = (int(v) for v in np.asarray(c).tolist())
    if n:  # nothing rounded (an fp32 format, no elements): no row, as in the torch engine
        t.rounding[key].add(n, rest)


def _add_emulated(t: Telemetry, totals: dict[str, Any]) -> None:
    """Add :meth:`hwport.jax.Telemetry.totals` to ``t``."""
    for k, v in totals.items():
        _add(t, k, [v["elements"], v["overflow"], v["underflow"], v["nonfinite"]])


def _numerics(lowered: Lowered) -> tuple[Any, ...]:
    """What an emulated program depends on: the lowered recipe and the formats it computes
    in on this backend (two backends with the same numerics share a compilation)."""
    spec, r = lowered.backend, lowered.recipe
    names = (r.matmul_input, r.backward_input, r.activations, r.weights, r.gradients,
             r.master_weights, r.optimizer_state,
             spec.precision.accumulators.get(r.matmul_input, "fp32"))
    return (r, tuple(compute_format(spec, n) for n in names),
            spec.precision.accumulation_interval)


@dataclass
class _Programs:
    """The compiled programs of a training run (see :class:`Trainer`)."""

    fb: Packed  # forward and backward: ((loss, gradients, gradient counts, finite, amax),
    # totals), taking (params, batch, loss scale, delayed amax per FP8 scaling site)
    evaluate: Packed  # (metrics, totals), taking (params, delayed amax)
    update: Any
    cast: Any
    sites: dict[str, list[tuple[str, int]]]  # FP8 scaling sites of fb and evaluate


# compiled programs by what determines them (pipeline, optimizer, recipe, formats): a
# compare's cells on backends with the same numerics share one compilation
_PROGRAMS: dict[Any, Any] = {}


def _cached(key: Any, build: Callable[[], Any]) -> Any:
    """``_PROGRAMS[key]``, built on first use (the oldest entry dropped past 32)."""
    if key not in _PROGRAMS:
        if len(_PROGRAMS) >= 32:
            _PROGRAMS.pop(next(iter(_PROGRAMS)))
        _PROGRAMS[key] = build()
    return _PROGRAMS[key]


class Trainer:
    """A JAX twin trained under a lowered recipe (see the module docstring)."""

    def __init__(self, jp: JaxPipeline, lowered: Lowered, seed: int) -> None:
        check(lowered)
        self.jp, self.lowered, self.seed = jp, lowered, seed
        spec, r = lowered.backend, lowered.recipe
        def fmt(name: str | None) -> FloatFormat | None:
            return compute_format(spec, name)

        self.weights, self.grads = fmt(r.weights), fmt(r.gradients)
        self.master = fmt(r.master_weights) if r.master_weights else None
        self.state = fmt(r.optimizer_state)
        self.has_master = r.master_weights is not None
        self.target = self.master if self.has_master else self.weights  # what updates write
        self.rounding = Rounding(r.update_rounding)
        self.rbits = spec.precision.stochastic_rounding_bits or 23
        self.telemetry = Telemetry(execution="jit")
        self.scale = r.loss_scaling.init_scale if r.loss_scaling else 1.0
        self._growth = 0
        self.steps_applied = 0
        self._amax: dict[tuple[str, int], list[float]] = {}
        key = ("train", jp.torch.key(), jp.optimizer, _numerics(lowered), self.rbits)
        self.programs: _Programs = _cached(key, self._compile)

    def _compile(self) -> _Programs:
        spec, r, jp = self.lowered.backend, self.lowered.recipe, self.jp

        def scaled(params: Any, batch: Any, scale: Any) -> tuple[Any, Any]:
            value, vjp = jax.vjp(lambda q: jp.loss(q, batch), params)
            return value, vjp(scale.astype(value.dtype))[0]  # the scale seeds backward

        fb = emulate(scaled, spec, r)

        def forward_backward(params: Any, batch: Any, scale: Any, delayed: Any) -> Any:
            (value, grads), totals, amax = fb.with_scaling(delayed, params, batch, scale)
            rounded = {k: _counted(g, self.grads) for k, g in grads.items()}
            counts = sum(c for _, c in rounded.values())
            grads = {k: g for k, (g, _) in rounded.items()}
            finite = jnp.all(jnp.stack([jnp.isfinite(g).all() for g in grads.values()]))
            return (value, grads, counts, finite, amax), totals

        def cast(master: Any) -> Any:
            out = {k: _counted(v, self.weights) for k, v in master.items()}
            return {k: v for k, (v, _) in out.items()}, sum(c for _, c in out.values())

        sites: dict[str, list[tuple[str, int]]] = {"fb": [], "evaluate": []}
        if r.fp8_scaling is not None:  # found by tracing with the shapes training passes
            with seeded(self.seed):
                params = {k: jnp.zeros(v.shape, jnp.float32) for k, v in jp.init().items()}
            sites = {"fb": fb.sites(params, next(jp.batches(self.seed)), np.float32(1)),
                     "evaluate": emulate(jp.outputs, spec, r).sites(params)}
        return _Programs(Packed(forward_backward), Packed(_evaluation(jp, spec, r)),
                         jax.jit(self._update_fn), jax.jit(cast), sites)

    def forward_backward(self, params: Any, batch: Any, scale: Any) -> Any:
        """Traceable forward and backward (data parallelism maps it; per-tensor FP8 scaling
        there is refused by :func:`check`): (loss, gradients, packed telemetry counts,
        gradient rounding counts, finite); the counts' layout is
        ``self.programs.fb.layout`` once traced."""
        (value, grads, counts, finite, _), packed = self.programs.fb.traced(
            params, batch, scale, jnp.zeros(0, jnp.float32))
        return value, grads, packed, counts, finite

    # -- per-tensor FP8 scaling's amax histories (the torch engine's) ---------------------
    def _delayed(self, program: str) -> np.ndarray:
        """Each scaling site's history amax (-1: none yet), in ``program``'s site order."""
        policy = self.lowered.recipe.fp8_scaling
        sites = self.programs.sites[program]
        if policy is None or policy.history == 0:
            return np.full(len(sites), -1, np.float32)
        return np.array([max(self._amax[s]) if self._amax.get(s) else -1.0 for s in sites],
                        np.float32)

    def _record(self, amax: Any) -> None:
        """Append this step's amax of each training site to its history (None: the
        program has no FP8 scaling sites)."""
        policy = self.lowered.recipe.fp8_scaling
        if policy is None or amax is None:
            return
        for site, a in zip(self.programs.sites["fb"], np.asarray(amax).tolist(), strict=True):
            hist = self._amax.setdefault(site, [])
            hist.append(a)
            del hist[:-max(policy.history, 1)]

    # -- parameters -----------------------------------------------------------------------
    def prepare(self, init: dict[str, np.ndarray]) -> tuple[Any, Any, Any]:
        """(compute params in the weights format, master params or None, optimizer state;
        with Kahan updates its ``c``, each parameter's compensation)."""
        params = {k: jnp.asarray(v, jnp.float32) for k, v in init.items()}
        master = None
        if self.has_master:
            master = {k: self._round(v, self.master, "init/master") for k, v in params.items()}
        params = {k: self._round(v, self.weights, "init/weights") for k, v in params.items()}
        target = master if master is not None else params
        state = self.jp.optimizer.init_state(target)
        if self.lowered.recipe.kahan_updates:  # -0.0: adding it changes nothing, not even -0
            state["c"] = {k: jnp.full_like(v, -0.0) for k, v in target.items()}
        return params, master, state

    def _round(self, x: Any, fmt: FloatFormat | None, key: str) -> Any:
        y, c = _counted(x, fmt)
        _add(self.telemetry, key, c)
        return y

    # -- the step -------------------------------------------------------------------------
    def evaluate(self, params: Any) -> dict[str, float]:
        metrics, totals = self.programs.evaluate(params, self._delayed("evaluate"))
        _add_emulated(self.telemetry, totals)
        return {k: float(v) for k, v in metrics.items()}

    def batches(self, seed: int) -> Iterator[Any]:
        """The training batches, one per step."""
        return self.jp.batches(seed)

    def gradients(self, params: Any, batch: Any) -> tuple[Any, Any, dict[str, Any], Any, bool,
                                                             bool]:
        """Forward and backward at the current loss scale: (loss, gradients rounded to their
        format and still scaled, telemetry totals, gradient rounding counts, whether every
        gradient is finite, whether backward overflowed)."""
        (value, grads, counts, finite, amax), read = self._launch(params, batch)
        totals, over = read()
        self._record(amax)
        return value, grads, totals, counts, bool(finite), over

    def _launch(self, params: Any, batch: Any) -> tuple[tuple[Any, ...], Callable[[], Any]]:
        """Start forward and backward at the current loss scale: ((loss, gradients,
        gradient rounding counts, finite, amax per FP8 scaling site or None), ``read``), where
        ``read()`` waits for the telemetry totals and whether backward overflowed."""
        out, read = self.programs.fb.launch(params, batch, np.float32(self.scale),
                                            self._delayed("fb"))

        def totals() -> tuple[dict[str, Any], bool]:
            t = read()
            return t, overflowed(t)

        return out, totals

    def step(self, params: Any, master: Any, state: Any, batch: Any,
             index: int) -> tuple[float, Any, Any, Any]:
        """One training step; returns (loss, params, master, state). Without loss scaling
        no step is skipped, so the update is started before the host reads the step's
        telemetry (as a native step's update follows its gradients without waiting)."""
        (value, grads, counts, finite, amax), read = self._launch(params, batch)
        target = master if master is not None else params
        scale = self.scale
        update = None
        if self.lowered.recipe.loss_scaling is None:
            update = self._update(target, grads, state, index, scale)
        totals, over = read()
        self._record(amax)
        _add_emulated(self.telemetry, totals)
        _add(self.telemetry, "backward/gradients", counts)
        if self._skip(bool(finite), over):
            return float(value), params, master, state
        if update is None:
            update = self._update(target, grads, state, index, scale)
        new, state, counts = update
        c = np.asarray(counts)
        self.steps_applied += 1
        if self.target is not None:
            _add(self.telemetry, "optimizer/weights", c[0])
            self.telemetry.updates_attempted += int(c[2, 0])
            self.telemetry.updates_lost += int(c[2, 1])
        if self.state is not None:
            _add(self.telemetry, "optimizer/state", c[1])
        if master is not None:
            master = new
            params, c = self.programs.cast(new)
            _add(self.telemetry, "optimizer/weights_cast", c)
        else:
            params = new
        return float(value), params, master, state

    def _update(self, target: Any, grads: Any, state: Any, index: int,
                scale: float) -> tuple[Any, Any, Any]:
        """Start the optimizer step on gradients computed at loss scale ``scale`` (the
        scale before GradScaler's update of this step, as torch's ``scaler.step`` unscales
        before ``scaler.update``): (new target, new state, counts [weights, state, lost])."""
        lr = self.jp.optimizer.lr
        if self.lowered.recipe.warmup_steps:
            lr *= min(1.0, (self.steps_applied + 1) / self.lowered.recipe.warmup_steps)
        # numpy scalars: passed with the call, not put on the device one by one
        new, state, counts = self.programs.update(target, grads, state, np.float32(lr),
                                                  np.int32(index), np.float32(1.0 / scale),
                                                  np.int32(self.seed & 0x7FFFFFFF))
        return new, state, counts

    def _skip(self, finite: bool, over: bool) -> bool:
        """GradScaler's update; True when the step must be skipped."""
        policy = self.lowered.recipe.loss_scaling
        if policy is None:
            return False
        self.telemetry.loss_scale.append(self.scale)
        found = over if policy.check == "overflow_flags" else not finite
        self.scale, self._growth = policy.after(self.scale, self._growth, found)
        self.telemetry.skipped_steps += found
        return found

    def _update_fn(self, params: Any, grads: Any, state: Any, lr: Any, index: Any,
                   unscale: Any, seed: Any) -> tuple[Any, Any, Any]:
        """The twin's optimizer step (torch's algorithm, :mod:`hwport.pipelines.jaxnets`),
        each write rounded as the torch engine rounds it: parameter writes to the target
        format with the update rounding (with Kahan updates, the error each write leaves
        carried into the next, in ``state["c"]``), counting the writes whose rounding undid
        them; state writes (and the optimizer's other results) to the state format.
        Returns (params, state, counts [weights, state, lost]); rows stay zero for fp32,
        where the torch engine counts nothing."""
        kahan = self.lowered.recipe.kahan_updates
        zero = jnp.zeros(4, jnp.int32)
        w_counts, s_counts, lost = [zero], [zero], [zero]
        comp = dict(state.get("c", {}))
        site = [0]

        def write(name: str, old: Any, exact: Any) -> Any:  # a parameter written in place
            site[0] += 1
            if self.target is None:
                return exact
            changed = exact != old
            if kahan:
                exact = exact + comp[name]
            y, c = _counted(exact, self.target, self.rounding, _keys(seed, index, site[0]),
                            self.rbits)
            if kahan:
                comp[name] = exact - y
            w_counts.append(c)
            lost.append(jnp.stack([jnp.sum(changed), jnp.sum(changed & (y == old)),
                                   *zero[:2]]).astype(jnp.int32))
            return y

        def store(x: Any) -> Any:  # a state write, or another result of the optimizer
            if self.state is None:
                return x
            y, c = _counted(x, self.state)
            s_counts.append(c)
            return y

        grads = {k: g * unscale for k, g in grads.items()}
        new, opt_state = self.jp.optimizer.apply(
            params, grads, {k: v for k, v in state.items() if k != "c"}, lr, write, store)
        if kahan:
            opt_state["c"] = comp
        return new, opt_state, jnp.stack([sum(w_counts), sum(s_counts), sum(lost)])


def train(jp: JaxPipeline, lowered: Lowered, seed: int,
          progress: Callable[[int, int], None] | None = None,
          trainer: Trainer | None = None) -> dict[str, Any]:
    """Train ``jp`` under ``lowered`` (with ``trainer``, default a one-device
    :class:`Trainer`): curve, metrics, initial metrics, telemetry, params."""
    trainer = trainer or Trainer(jp, lowered, seed)
    with seeded(seed):  # the torch model's initial weights, as the torch run draws them
        init = jp.init()
    params, master, state = trainer.prepare(init)
    initial = trainer.evaluate(params)
    batches = trainer.batches(seed)
    curve: list[dict[str, float]] = []
    finite = True
    for step in range(jp.steps):
        loss, params, master, state = trainer.step(params, master, state, next(batches), step)
        point: dict[str, float] = {"step": step + 1, "loss": loss}
        finite = math.isfinite(loss)
        last = step + 1 == jp.steps or not finite
        if (step + 1) % jp.eval_every == 0 or last:
            point.update(trainer.evaluate(params))
        curve.append(point)
        if progress:
            progress(step + 1, jp.steps)
        if not finite:
            break
    metrics = {k: v for k, v in curve[-1].items() if k not in ("step", "loss")}
    return {"curve": curve, "metrics": metrics, "initial": initial, "finite": finite,
            "telemetry": trainer.telemetry.to_dict(), "params": params}


def _evaluation(jp: JaxPipeline, spec: BackendSpec, recipe: Recipe
                ) -> Callable[[Any, Any], tuple[dict[str, Any], dict[str, Any]]]:
    """The twin's validation metrics with the model emulated and the metrics computed
    from its outputs natively (as the torch engine evaluates), and the model's telemetry."""
    model = emulate(jp.outputs, spec, recipe)

    def evaluation(params: Any, delayed: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        out, totals, _ = model.with_scaling(delayed, params)
        return jp.measure(out), totals

    return evaluation


def infer(jp: JaxPipeline, lowered: Lowered, params: Any) -> dict[str, Any]:
    """The trained ``params`` served under ``lowered``: logits, metrics, telemetry."""
    check(lowered)
    spec, r = lowered.backend, lowered.recipe
    fmt = compute_format(spec, r.weights)
    telemetry = Telemetry(execution="jit")
    stored = {}
    for k, v in params.items():
        stored[k], c = _counted(jnp.asarray(v), fmt)
        _add(telemetry, "init/weights", c)
    predict, evaluation = _cached(
        ("infer", jp.torch.key(), _numerics(lowered)),
        lambda: (Packed(emulate(jp.predict, spec, r).with_telemetry),
                 Packed(_evaluation(jp, spec, r))))
    logits, t1 = predict(stored)  # served: no amax history, every operand its own amax
    metrics, t2 = evaluation(stored, np.zeros(0, np.float32))
    _add_emulated(telemetry, t1)
    _add_emulated(telemetry, t2)
    return {"logits": np.asarray(logits, np.float64),
            "metrics": {k: float(v) for k, v in metrics.items()},
            "telemetry": telemetry.to_dict()}


__all__ = ["Trainer", "check", "infer", "train"]
