"""Running pipelines on backends: one cell (:func:`run`) or a grid (:func:`compare`).

A training cell trains the pipeline from the same seed under the backend's lowered recipe
and classifies the result against the reference backend's fp32 training. An inference
cell takes the model trained once in fp32 on the reference (cached on disk, keyed by the
pipeline's configuration and seed) and runs its forward passes on the backend, comparing
outputs with the reference's. Outcomes follow :class:`OutcomeRules` (docs/pipelines.md).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from hwport import plugins, profile, store
from hwport.engine import Emulator, seeded
from hwport.errors import HwportError
from hwport.memory import finite, infinite
from hwport.pipeline import Pipeline, PipelineFactory, check_options
from hwport.recipes import Recipe, lower
from hwport.spec import BackendSpec
from hwport.store import Session

MODES = ("train", "infer")
FRAMEWORKS = ("torch", "jax")
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class OutcomeRules:
    """How a cell is classified against the reference (fp32 on the reference backend).

    Training, on the final validation loss ``L`` against the reference's ``L_ref`` and the
    untrained model's ``L_0``: *diverged* if any loss is NaN/inf or ``L > L_0``;
    *converged* if ``L <= L_ref * (1 + converged_tolerance)``; else *degraded* if the run
    made at least ``degraded_progress`` of the reference's progress
    ``(L_0 - L) / (L_0 - L_ref)``; else *stalled*.

    Inference, on the outputs against the reference model's: *broken* if any output is
    NaN/inf or top-1 agreement is below ``broken_agreement``; *parity* if the validation
    loss is within ``parity_loss_tolerance`` (relative) of the reference's and the outputs
    agree: top-1 agreement at least ``parity_agreement``, or a mean KL divergence from the
    reference's output distribution of at most ``parity_kl`` nats (near-ties flip the top-1
    choice of a wide softmax without changing the distribution); else *degraded*.
    """

    converged_tolerance: float = 0.05
    degraded_progress: float = 0.5
    parity_agreement: float = 0.99
    parity_loss_tolerance: float = 0.02
    broken_agreement: float = 0.9
    parity_kl: float = 1e-3

    def train(self, initial: float, final: float, reference: float, finite: bool) -> str:
        if not finite or not math.isfinite(final) or final > initial:
            return "diverged"
        if final <= reference * (1 + self.converged_tolerance):
            return "converged"
        progress = (initial - final) / max(initial - reference, 1e-12)
        return "degraded" if progress >= self.degraded_progress else "stalled"

    def infer(self, agreement: float, loss: float, reference: float, finite: bool,
              kl: float = math.inf) -> str:
        if not finite or not math.isfinite(loss) or agreement < self.broken_agreement:
            return "broken"
        outputs_agree = agreement >= self.parity_agreement or kl <= self.parity_kl
        if outputs_agree and abs(loss - reference) <= self.parity_loss_tolerance * abs(reference):
            return "parity"
        return "degraded"


@dataclass
class RunResult:
    """One cell: a pipeline in one mode on one backend under one recipe."""

    backend: str
    pipeline: str
    mode: str
    recipe: str
    seed: int
    steps: int
    outcome: str
    metrics: dict[str, float]
    reference_metrics: dict[str, float]
    curve: list[dict[str, float]]
    telemetry: dict[str, Any]
    lowering: list[str]
    wall_s: float
    framework: str = "torch"
    agreement: dict[str, float] = field(default_factory=dict)
    metric: str = "val_loss"  # the pipeline's headline metric, one of ``metrics``
    memory: dict[str, Any] = field(default_factory=dict)  # hwport.memory.MemoryPlan
    time: dict[str, Any] = field(default_factory=dict)  # hwport.profile.StepTime
    collectives: dict[str, Any] = field(default_factory=dict)  # data parallel: hwport.parallel
    reference_curve: list[dict[str, float]] = field(default_factory=list)  # train: fp32's

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (non-finite numbers as strings)."""
        return finite(asdict(self))  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        """The result :meth:`to_dict` described (non-finite numbers back as floats)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise HwportError(f"run result has unknown fields {unknown}")
        numeric = ("metrics", "reference_metrics", "curve", "reference_curve", "agreement",
                   "telemetry", "memory", "time", "collectives")
        return cls(**{k: infinite(v) if k in numeric else v for k, v in data.items()})


def cache_dir() -> Path:
    """Where trained reference models are kept: $HWPORT_CACHE or ~/.cache/hwport."""
    return Path(os.environ.get("HWPORT_CACHE") or Path.home() / ".cache" / "hwport")


def resolve_pipeline(pipeline: str | Pipeline | PipelineFactory, steps: int | None = None,
                     options: dict[str, Any] | None = None) -> Pipeline:
    """A built pipeline from a name, a ``module:factory`` reference, a factory or itself."""
    options = dict(options or {})
    if steps is not None:
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise HwportError(f"steps={steps!r}: must be a positive integer")
        options["steps"] = steps
    if isinstance(pipeline, Pipeline):
        if options:
            raise HwportError("options and steps apply to a pipeline name or factory, not to "
                              "a built Pipeline")
        return pipeline
    factory = pipeline if isinstance(pipeline, PipelineFactory) else \
        plugins.registry().pipeline(pipeline)
    check_options(factory.name, factory.build, options)
    built = factory.build(**options)
    if not isinstance(built, Pipeline):
        raise HwportError(f"pipeline factory {factory.name!r} returned "
                          f"{type(built).__name__}, not a hwport.Pipeline")
    return built


def _spec(backend: str | BackendSpec) -> BackendSpec:
    return backend if isinstance(backend, BackendSpec) else plugins.get_backend(backend)


def _recipe(recipe: str | Recipe) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else plugins.registry().recipe(recipe)


@dataclass
class _Trained:
    model: torch.nn.Module
    curve: list[dict[str, float]]
    metrics: dict[str, float]
    initial: dict[str, float]
    telemetry: dict[str, Any]
    finite: bool


def _evaluate(p: Pipeline, model: torch.nn.Module, em: Emulator) -> dict[str, float]:
    try:
        with em.model_only(model), torch.no_grad():
            return {k: float(v) for k, v in p.evaluate(model).items()}
    finally:
        em.end_step()


def _train(p: Pipeline, spec: BackendSpec, recipe: Recipe, seed: int,
           progress: Progress | None, capture: bool = True, shard: int = 0,
           setup: Callable[[Emulator], None] | None = None) -> tuple[_Trained, list[str]]:
    """Train ``p`` under ``recipe`` on ``spec``. ``shard`` > 0 draws that rank's own batches
    (data parallelism; ``setup`` installs the emulator's hooks)."""
    lowered = lower(recipe, spec)
    em = Emulator(lowered, seed, capture)
    if setup is not None:
        setup(em)
    with seeded(seed):
        model = p.model()
        batches = p.batches(seed if shard == 0 else seed * 1_000_003 + shard)
        with em.active():
            em.prepare(model)
            optimizer = p.optimizer(model.parameters())
            initial = _evaluate(p, model, em)
            curve: list[dict[str, float]] = []
            finite = True
            for step in range(p.steps):
                with em.phase_("control"):  # loading data is not part of the emulated step
                    batch = next(batches)
                loss = em.train_step(model, p.loss, batch, optimizer)
                point: dict[str, float] = {"step": step + 1, "loss": loss}
                if not math.isfinite(loss):
                    finite = False
                if em.any_rank is not None:  # every rank stops, or none does
                    finite = not em.any_rank(not finite)
                last = step + 1 == p.steps or not finite
                if (step + 1) % p.eval_every == 0 or last:
                    point.update(_evaluate(p, model, em))
                curve.append(point)
                if progress:
                    progress(step + 1, p.steps)
                if not finite:  # a NaN is an outcome: stop, keep what was measured
                    break
            metrics = {k: v for k, v in curve[-1].items() if k not in ("step", "loss")}
    return _Trained(model, curve, metrics, initial, em.telemetry.to_dict(), finite), \
        list(lowered.notes)


def _reference(p: Pipeline, seed: int, progress: Progress | None = None) -> _Trained:
    """The pipeline trained in fp32 on the reference backend (cached in memory and on disk)."""
    key = (p.key(), seed)
    hit = _REFERENCE.get(key)
    if hit is not None:
        return hit
    path = cache_dir() / "models" / f"{p.name}-{p.key()}-s{seed}.pt"
    if path.exists():
        try:
            saved = torch.load(path, weights_only=False)
            with seeded(seed):
                model = p.model()
            model.load_state_dict(saved["state"])
            trained = _Trained(model, saved["curve"], saved["metrics"], saved["initial"],
                               saved["telemetry"], saved["finite"])
            _REFERENCE[key] = trained
            return trained
        except Exception:  # a stale or corrupt cache entry is retrained, never fatal
            path.unlink(missing_ok=True)
    trained, _ = _train(p, plugins.get_backend("reference"), plugins.registry().recipe("fp32"),
                        seed, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    os.close(fd)
    try:  # written under a name of its own, then renamed: concurrent runs never clash
        torch.save({"state": trained.model.state_dict(), "curve": trained.curve,
                    "metrics": trained.metrics, "initial": trained.initial,
                    "telemetry": trained.telemetry, "finite": trained.finite}, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    _REFERENCE[key] = trained
    return trained


_REFERENCE: dict[tuple[str, int], _Trained] = {}


def run(backend: str | BackendSpec, pipeline: str | Pipeline | PipelineFactory,
        mode: str = "train", recipe: str | Recipe = "amp-bf16", *, steps: int | None = None,
        seed: int = 0, options: dict[str, Any] | None = None,
        rules: OutcomeRules | None = None, progress: Progress | None = None,
        capture: bool = True, world_size: int = 1, session: Session | None = None,
        position: int | None = 0, framework: str = "torch") -> RunResult:
    """Run one cell and classify it against the reference (see the module docstring).

    ``capture=False`` runs every training step eagerly under the dispatch mode (same results,
    slower): for a step whose Python does something different from one call to the next
    with the same batch shapes (see :meth:`Emulator.train_step`). ``world_size`` > 1 trains
    data-parallel on that many processes (:mod:`hwport.parallel`; JAX: devices,
    :mod:`hwport.jaxparallel`).

    ``session`` (:meth:`hwport.store.Store.begin`) commits the result to a results store as
    the cell at ``position`` of that run (None: a porting search's trial); with the
    session's ``resume``, a cell already stored with the same key is returned from the
    store instead of being run. Observers (the ``hwport_run_started`` and
    ``hwport_run_finished`` hooks) are told of every cell that runs.

    ``framework="jax"`` runs the pipeline's JAX twin (:mod:`hwport.pipelines.jaxnets`:
    the same data, architecture, initial weights and optimizer) through the JAX engine
    (:mod:`hwport.jaxrun`), judged against the twin's own fp32 reference training."""
    if mode not in MODES:
        raise HwportError(f"mode {mode!r}: must be one of {list(MODES)}")
    if framework not in FRAMEWORKS:
        raise HwportError(f"framework {framework!r}: must be one of {list(FRAMEWORKS)}")
    spec, rec = _spec(backend), _recipe(recipe)
    rules = rules or OutcomeRules()
    p = resolve_pipeline(pipeline, steps, options)
    if framework == "jax":
        _check_jax(p, spec, rec, world_size)
    key = store.cell_key(spec, p, mode, rec, seed, world_size, rules, framework)
    if session is not None:
        hit = session.reuse(position, key)
        if hit is not None:
            if progress:
                progress(1, 1)
            return hit
    info = RunInfo(spec.name, p.name, mode, rec.name, seed, p.steps, world_size, key,
                   session.run_id if session is not None else None)
    observers = plugins.registry().observers
    observers.started(info)
    if world_size != 1:
        from hwport import parallel

        result = parallel.run(spec, pipeline, mode, rec, steps=steps, seed=seed,
                              options=options, rules=rules, world_size=world_size,
                              capture=capture, framework=framework)
    elif framework == "jax":
        result = _run_jax(spec, p, mode, rec, seed, rules, progress)
    else:
        result = _run(spec, p, mode, rec, seed, rules, progress, capture)
    if session is not None:
        session.add(position, key, result, spec)
    observers.finished(info, result)
    return result


@dataclass(frozen=True)
class RunInfo:
    """What observers are told of a cell when it starts (and again when it finishes):
    ``key`` identifies the measurement (:func:`hwport.store.cell_key`), ``run_id`` the
    stored run it belongs to (None when nothing is stored)."""

    backend: str
    pipeline: str
    mode: str
    recipe: str
    seed: int
    steps: int
    world_size: int
    key: str
    run_id: int | None

    @property
    def label(self) -> str:
        return f"{self.pipeline} {self.mode} on {self.backend} ({self.recipe}, seed {self.seed})"


def _run(spec: BackendSpec, p: Pipeline, mode: str, rec: Recipe, seed: int,
         rules: OutcomeRules, progress: Progress | None, capture: bool) -> RunResult:
    ref = _reference(p, seed, progress if spec.name == "reference" else None)
    t0 = time.perf_counter()  # wall_s is the cell's own time, not the reference's training
    if mode == "train":
        if spec.name == "reference" and rec.name == "fp32":
            got, notes = ref, list[str]()
        else:
            got, notes = _train(p, spec, rec, seed, progress, capture)
        outcome = rules.train(got.initial["val_loss"], got.metrics.get("val_loss", math.nan),
                              ref.metrics["val_loss"], got.finite)
        result = RunResult(spec.name, p.name, mode, rec.name, seed, p.steps, outcome,
                           got.metrics, ref.metrics, got.curve, got.telemetry, notes,
                           time.perf_counter() - t0, metric=p.metric,
                           reference_curve=ref.curve)
        model = got.model
    else:
        result = _infer(p, spec, rec, seed, ref, rules, t0, progress)
        model = ref.model
    plan, step = profile.measure(p, model, lower(rec, spec), mode, seed)
    result.memory, result.time = plan.to_dict(), step.to_dict()
    return result


def _infer(p: Pipeline, spec: BackendSpec, rec: Recipe, seed: int, ref: _Trained,
           rules: OutcomeRules, t0: float, progress: Progress | None) -> RunResult:
    lowered = lower(rec, spec)
    em = Emulator(lowered, seed)
    model = ref.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            ref_logits = p.predict(model).double()
            ref_metrics = {k: float(v) for k, v in p.evaluate(model).items()}
        with em.active(), torch.no_grad():
            em.prepare(model)
            with em.model_only(model):
                logits = p.predict(model).double()
            metrics = _evaluate(p, model, em)
    finally:
        model.load_state_dict(state)
    if progress:
        progress(1, 1)
    finite, agree, kl = _agreement(logits, ref_logits)
    outcome = rules.infer(agree, metrics.get("val_loss", math.nan), ref_metrics["val_loss"],
                          finite, kl)
    return RunResult(spec.name, p.name, "infer", rec.name, seed, p.steps, outcome, metrics,
                     ref_metrics, [], em.telemetry.to_dict(), list(lowered.notes),
                     time.perf_counter() - t0, agreement={"top1": agree, "kl": kl},
                     metric=p.metric)


def _agreement(logits: torch.Tensor, ref_logits: torch.Tensor) -> tuple[bool, float, float]:
    """(all finite, top-1 agreement, mean KL divergence from the reference's outputs)."""
    finite = bool(torch.isfinite(logits).all())
    agree = float((logits.argmax(-1) == ref_logits.argmax(-1)).double().mean())
    logp_ref = torch.log_softmax(ref_logits, -1)
    logp = torch.log_softmax(logits, -1)
    kl = float((logp_ref.exp() * (logp_ref - logp)).sum(-1).mean()) if finite else math.inf
    return finite, agree, kl


def _run_jax(spec: BackendSpec, p: Pipeline, mode: str, rec: Recipe, seed: int,
             rules: OutcomeRules, progress: Progress | None) -> RunResult:
    """One cell of the pipeline's JAX twin (see :func:`run`). The memory plan and step time
    are the same model's, measured as for torch: they depend on the model and the backend,
    not on the framework."""
    from hwport import jaxrun
    from hwport.pipelines.jaxnets import twin

    jp = twin(p)
    lowered = lower(rec, spec)
    ref = _reference_jax(p, seed)
    t0 = time.perf_counter()
    if mode == "train":
        native = spec.name == "reference" and rec.name == "fp32"
        got = ref if native else jaxrun.train(jp, lowered, seed, progress)
        outcome = rules.train(got["initial"]["val_loss"], got["metrics"].get("val_loss",
                                                                             math.nan),
                              ref["metrics"]["val_loss"], got["finite"])
        result = RunResult(spec.name, p.name, mode, rec.name, seed, p.steps, outcome,
                           got["metrics"], ref["metrics"], got["curve"], got["telemetry"],
                           [] if native else list(lowered.notes), time.perf_counter() - t0,
                           framework="jax", metric=p.metric, reference_curve=ref["curve"])
    else:
        served = jaxrun.infer(jp, lowered, ref["params"])
        finite, agree, kl = _agreement(torch.from_numpy(served["logits"]),
                                       torch.from_numpy(ref["logits"]))
        metrics = served["metrics"]
        outcome = rules.infer(agree, metrics.get("val_loss", math.nan),
                              ref["metrics"]["val_loss"], finite, kl)
        if progress:
            progress(1, 1)
        result = RunResult(spec.name, p.name, mode, rec.name, seed, p.steps, outcome,
                           metrics, ref["metrics"], [], served["telemetry"],
                           list(lowered.notes), time.perf_counter() - t0, framework="jax",
                           agreement={"top1": agree, "kl": kl}, metric=p.metric)
    with seeded(seed):
        model = p.model()
    plan, step = profile.measure(p, model, lowered, mode, seed)
    result.memory, result.time = plan.to_dict(), step.to_dict()
    return result


def _check_jax(p: Pipeline, spec: BackendSpec, rec: Recipe, world_size: int) -> None:
    """Refuse, before any reference trains, a JAX cell that cannot run: JAX missing, the
    pipeline without a twin, a recipe feature the JAX engine does not model."""
    try:
        from hwport import jaxrun
        from hwport.pipelines.jaxnets import twin
    except ImportError as e:
        raise HwportError(f"--framework jax needs JAX ({e}): pip install 'hwport[jax]'") \
            from None
    twin(p)
    jaxrun.check(lower(rec, spec), world_size)


def _reference_jax(p: Pipeline, seed: int) -> dict[str, Any]:
    """The JAX twin trained in fp32 on the reference backend (cached in this process)."""
    from hwport import jaxrun
    from hwport.pipelines.jaxnets import twin

    key = (p.key(), seed, "jax")
    hit = _REFERENCE_JAX.get(key)
    if hit is None:
        jp = twin(p)
        native = lower(plugins.registry().recipe("fp32"), plugins.get_backend("reference"))
        hit = jaxrun.train(jp, native, seed)
        hit["logits"] = jaxrun.infer(jp, native, hit["params"])["logits"]
        _REFERENCE_JAX[key] = hit
    return hit


_REFERENCE_JAX: dict[tuple[str, int, str], dict[str, Any]] = {}


@dataclass
class Comparison:
    """Backends x pipelines x modes, each cell a :class:`RunResult`."""

    recipe: str
    seed: int
    cells: list[RunResult]
    definition: Recipe | None = None  # the recipe itself, registered or not
    run_id: int | None = None  # the stored run (hwport.store), if it was stored

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "seed": self.seed, "run_id": self.run_id,
                "cells": [c.to_dict() for c in self.cells]}


def compare(backends: Sequence[str] | None = None, pipelines: Sequence[str] | None = None,
            modes: Sequence[str] = MODES, recipe: str | Recipe = "amp-bf16", *,
            steps: int | None = None, seed: int = 0, rules: OutcomeRules | None = None,
            on_cell: Callable[[str, Progress | None], Progress | None] | None = None,
            capture: bool = True, world_size: int = 1,
            session: Session | None = None, framework: str = "torch") -> Comparison:
    """Every (pipeline, mode, backend) cell; default: all registered backends, the
    built-in pipelines, both modes. ``session`` stores each cell as it finishes (and, with
    resume, takes the cells already stored from the store: see :func:`run`)."""
    reg = plugins.registry()
    names = list(backends) if backends else sorted(reg.backends)
    for n in names:
        reg.get(n)  # unknown names fail before any work
    pipes = list(pipelines) if pipelines else ["digits", "lm"]
    for m in modes:
        if m not in MODES:
            raise HwportError(f"mode {m!r}: must be one of {list(MODES)}")
    rec = _recipe(recipe)
    built = {name: resolve_pipeline(name, steps) for name in pipes}
    cells = []
    position = 0
    for pname, p in built.items():
        for mode in modes:
            for b in names:
                label = f"{pname} {mode} on {b}"
                progress = on_cell(label, None) if on_cell else None
                if world_size != 1 and mode == "train":  # ranks rebuild it by name
                    cells.append(run(b, pname, mode, rec, steps=steps, seed=seed, rules=rules,
                                     capture=capture, world_size=world_size, session=session,
                                     position=position, framework=framework))
                else:
                    cells.append(run(b, p, mode, rec, seed=seed, rules=rules,
                                     progress=progress, capture=capture, session=session,
                                     position=position, framework=framework))
                position += 1
    return Comparison(rec.name, seed, cells, rec,
                      session.run_id if session is not None else None)
