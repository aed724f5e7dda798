"""Training at scale, estimated: memory per device by role and tier, step time, MFU.

For a GPT-style transformer that nobody can run here, :func:`estimate` applies published
formulas (docs/performance-model.md has each with its source):

- parameters and model FLOPs per iteration: Narayanan et al. 2021 (Megatron-LM), eqs. 2-3;
- model states per device under ZeRO stages 0-3: Rajbhandari et al. 2019, from the
  recipe's bytes per parameter of each role;
- activations saved for backward per device: Korthikanti et al. 2022, with tensor and
  sequence parallelism and selective or full recomputation, 1F1B pipeline schedule;
- a step-time model: a roofline per transformer op (GEMMs against the matmul peak of the
  recipe's matmul format, elementwise ops against the bandwidth of the tier their data
  lives in), tensor-parallel all-reduces, the pipeline bubble, the data-parallel gradient
  all-reduce and the optimizer step, none overlapped (an upper bound on the step time).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from hwport import collectives, memory
from hwport.errors import HwportError
from hwport.recipes import Recipe, lower
from hwport.spec import BackendSpec

RECOMPUTE = ("none", "selective", "full")


def _positive_ints(where: str, **values: int) -> None:
    bad = [f"{k}={v!r}" for k, v in values.items()
           if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    if bad:
        raise HwportError(f"{where}: {', '.join(bad)}: must be positive integers")


@dataclass(frozen=True)
class GPT:
    """A GPT-style decoder: ``layers`` blocks of width ``hidden`` with ``heads`` attention
    heads, sequences of ``seq`` tokens, a ``vocab``-entry embedding tied to the output."""

    layers: int
    hidden: int
    heads: int
    seq: int
    vocab: int

    def __post_init__(self) -> None:
        _positive_ints("model", layers=self.layers, hidden=self.hidden, heads=self.heads,
                       seq=self.seq, vocab=self.vocab)
        if self.hidden % self.heads:
            raise HwportError(f"model: hidden={self.hidden} is not divisible by "
                              f"heads={self.heads}")

    @property
    def params(self) -> int:
        """12 L h^2 + 13 L h (blocks) + (V + s) h (token and position embeddings)."""
        L, h = self.layers, self.hidden
        return 12 * L * h * h + 13 * L * h + (self.vocab + self.seq) * h

    def model_flops(self, batch: int) -> float:
        """FLOPs of one iteration over ``batch`` sequences without recomputation:
        3 x forward, 72 B s L h^2 (1 + s/(6h) + V/(12 L h))."""
        B, s, L, h, V = batch, self.seq, self.layers, self.hidden, self.vocab
        return 72.0 * B * s * L * h * h * (1 + s / (6 * h) + V / (12 * L * h))

    def hardware_flops(self, batch: int, recompute: str) -> float:
        """FLOPs one iteration executes: the model's, plus the recomputed forward (full:
        96 B s L h^2 (1 + s/(6h) + V/(16 L h)), Narayanan et al. eq. 3; selective: the
        attention core, 4 B s^2 L h)."""
        B, s, L, h, V = batch, self.seq, self.layers, self.hidden, self.vocab
        if recompute == "full":
            return 96.0 * B * s * L * h * h * (1 + s / (6 * h) + V / (16 * L * h))
        extra = 4.0 * B * s * s * L * h if recompute == "selective" else 0.0
        return self.model_flops(batch) + extra


@dataclass(frozen=True)
class Parallelism:
    """How the training job is laid out: ``data`` x ``tensor`` x ``pipeline`` devices,
    micro-batches of ``micro_batch`` sequences, ``global_batch`` sequences per step,
    ZeRO ``zero`` stage, activation ``recompute`` and ``sequence_parallel``."""

    micro_batch: int = 1
    global_batch: int | None = None  # None: one micro-batch per data-parallel rank
    data: int = 1
    tensor: int = 1
    pipeline: int = 1
    zero: int = 0
    recompute: str = "none"
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        if self.global_batch is None:
            object.__setattr__(self, "global_batch", self.micro_batch * self.data)
        _positive_ints("parallelism", micro_batch=self.micro_batch,
                       global_batch=self.batch, data=self.data, tensor=self.tensor,
                       pipeline=self.pipeline)
        if self.zero not in (0, 1, 2, 3):
            raise HwportError(f"parallelism: zero={self.zero!r} must be 0, 1, 2 or 3")
        if self.recompute not in RECOMPUTE:
            raise HwportError(f"parallelism: recompute={self.recompute!r} must be one of "
                              f"{list(RECOMPUTE)}")
        if self.batch % (self.micro_batch * self.data):
            raise HwportError(f"parallelism: global_batch={self.batch} is not "
                              f"divisible by micro_batch x data = {self.micro_batch} x "
                              f"{self.data}")

    @property
    def batch(self) -> int:
        """Sequences per step."""
        return self.global_batch if self.global_batch is not None else \
            self.micro_batch * self.data

    @property
    def devices(self) -> int:
        return self.data * self.tensor * self.pipeline

    @property
    def microbatches(self) -> int:
        """Micro-batches each pipeline runs per step."""
        return self.batch // (self.micro_batch * self.data)

    def check(self, model: GPT) -> None:
        """Raise unless the model splits evenly over this layout."""
        problems = []
        if model.heads % self.tensor:
            problems.append(f"heads={model.heads} is not divisible by tensor={self.tensor}")
        if model.hidden % self.tensor:
            problems.append(f"hidden={model.hidden} is not divisible by tensor={self.tensor}")
        if model.layers % self.pipeline:
            problems.append(f"layers={model.layers} is not divisible by "
                            f"pipeline={self.pipeline}")
        if self.sequence_parallel and model.seq % self.tensor:
            problems.append(f"seq={model.seq} is not divisible by tensor={self.tensor} "
                            "(sequence parallelism)")
        if problems:
            raise HwportError("model and parallelism do not fit: " + "; ".join(problems))


def bytes_per_param(recipe: Recipe, spec: BackendSpec) -> dict[str, float]:
    """Bytes each parameter costs per role under ``recipe`` (formats as ``spec`` stores
    them); the optimizer is Adam: two moments in the optimizer-state format."""
    def size(name: str) -> float:
        return spec.format(name).bits / 8

    return {"weights": size(recipe.weights), "gradients": size(recipe.gradients),
            "master_weights": size(recipe.master_weights) if recipe.master_weights else 0.0,
            "optimizer_state": 2 * size(recipe.optimizer_state)}


def model_states(params: float, per_param: dict[str, float], zero: int,
                 data: int) -> dict[str, float]:
    """Bytes per device of each model-state role for ``params`` parameters on one
    model-parallel shard, partitioned over ``data`` ranks by ZeRO stage ``zero``: stage 1
    the optimizer state and master weights, 2 also gradients, 3 also weights."""
    sharded = {"master_weights": 1, "optimizer_state": 1, "gradients": 2, "weights": 3}
    return {role: params * b / (data if zero >= sharded[role] else 1)
            for role, b in per_param.items()}


def activations_per_layer(model: GPT, par: Parallelism, act_bytes: float) -> float:
    """Bytes of activations one layer saves for backward for one micro-batch (Korthikanti
    et al. 2022, Table 2). Their count is for 16-bit activations and one-byte dropout masks;
    other activation formats scale the activations, not the masks."""
    s, b, h, a, t = model.seq, par.micro_batch, model.hidden, model.heads, par.tensor
    sbh, att = s * b * h, a * s * s * b  # att: one value per head per pair of positions
    sp = t if par.sequence_parallel else 1  # sequence parallelism shards the rest too
    if par.recompute == "full":
        total, masks = 2 * sbh / sp, 0.0  # the layer's input only
    elif par.recompute == "selective":  # the attention core is recomputed
        total = 34 * sbh / t if par.sequence_parallel else sbh * (10 + 24 / t)
        masks = 2 * sbh / sp
    elif par.sequence_parallel:
        total, masks = (34 * sbh + 5 * att) / t, (2 * sbh + att) / t
    else:
        total, masks = sbh * (10 + 24 / t) + 5 * att / t, 2 * sbh + att / t
    return (total - masks) * act_bytes / 2 + masks


def activations(model: GPT, par: Parallelism, act_bytes: float) -> float:
    """Activations the first pipeline stage holds at its peak: under 1F1B it has
    min(pipeline, microbatches) micro-batches in flight, each over layers/pipeline layers."""
    in_flight = min(par.pipeline, par.microbatches)
    return activations_per_layer(model, par, act_bytes) * model.layers / par.pipeline \
        * in_flight


@dataclass
class Estimate:
    """One backend's answer for one model and layout (per device unless named)."""

    backend: str
    model: dict[str, int]
    parallelism: dict[str, Any]
    recipe: str
    params: int
    memory: memory.MemoryPlan
    step_s: float
    breakdown: dict[str, float]  # seconds per component of the step
    bound: str  # what the largest component is limited by
    tokens_per_s: float  # the whole job's
    devices_to_fit: int | None  # fewest devices (more data parallelism, the batch growing
    # with it) that fit; None: none do
    mfu: float  # model FLOPs (no recomputation) per second per device / the matmul peak
    achieved_flops: float  # FLOPs executed (recomputation included) per second per device
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["memory"] = self.memory.to_dict()
        plain: dict[str, Any] = memory.finite(d)
        return plain


def _allreduce_s(nbytes: float, ranks: int, bandwidth: float, latency: float) -> float:
    """A ring all-reduce (:func:`hwport.collectives.thakur_all_reduce`, no reduction cost)."""
    return collectives.thakur_all_reduce(nbytes, ranks, latency, 1 / bandwidth) if ranks > 1 \
        else 0.0


# The fraction of the matmul peak that large GEMMs sustain, calibrated once on the first
# row of Narayanan et al. 2021, Table 1 (1.7B parameters, data parallel only, where the
# step is almost all GEMMs and elementwise ops); the other nine rows validate it
# (docs/performance-model.md). 1.0 gives the pure roofline, an upper bound.
MATMUL_EFFICIENCY = 0.64


def estimate(model: GPT, par: Parallelism, spec: BackendSpec, recipe: Recipe, *,
             matmul_efficiency: float = MATMUL_EFFICIENCY) -> Estimate:
    """Memory and step time of training ``model`` laid out as ``par`` on devices like
    ``spec`` under ``recipe`` (see the module docstring); GEMMs run at
    ``matmul_efficiency`` of the matmul peak."""
    if not 0 < matmul_efficiency <= 1:
        raise HwportError(f"matmul_efficiency={matmul_efficiency!r} must be in (0, 1]")
    par.check(model)
    lowered = lower(recipe, spec)
    recipe, notes = lowered.recipe, list(lowered.notes)
    L, h, s, V, a = model.layers, model.hidden, model.seq, model.vocab, model.heads
    t, p, d, b, m = par.tensor, par.pipeline, par.data, par.micro_batch, par.microbatches
    mm = spec.format(recipe.matmul_input)
    act_b = spec.format(recipe.activations).bits / 8
    nominal = spec.compute.peak_flops.get(mm.name)
    if nominal is None or not math.isfinite(nominal):
        raise HwportError(f"backend {spec.name!r} gives no finite peak FLOP/s for "
                          f"{mm.name} (compute.peak_flops): nothing to estimate against")
    peak = nominal * matmul_efficiency
    # per device: one tensor shard of one pipeline stage (the embedding counted on it)
    shard = (12 * L * h * h + 13 * L * h) / (t * p) + (V + s) * h / t
    per_param = bytes_per_param(recipe, spec)
    states = model_states(shard, per_param, par.zero, d)
    acts = activations(model, par, act_b)
    roles = {**states, "activations": acts}
    moved = {  # bytes each role moves per step (reads + writes)
        "activations": 2 * acts / min(p, m) * m,
        "weights": states["weights"] * m * (3 if par.recompute != "none" else 2),
        "gradients": 2 * states["gradients"] * m,
        "master_weights": 2 * states["master_weights"],
        "optimizer_state": 2 * states["optimizer_state"],
    }
    plan = memory.plan(spec, roles, moved)
    tiers = {tier.name: tier for tier in memory.resident_tiers(spec)}
    fastest = next(iter(tiers))

    def bandwidth(role: str) -> float:
        return tiers[plan.tier_of(role) or fastest].bandwidth

    # one micro-batch through one layer's forward, per device (docs/performance-model.md)
    sbh, att = s * b * h, a * s * s * b / t  # att: attention scores, one per head per pair
    gemm_flops = (24 * sbh * h + 4 * sbh * s) / t
    gemm_act = act_b * (sbh * (4 + 15 / t) + 2 * att)  # operands read, outputs written
    gemm_w = mm.bits / 8 * 12 * h * h / t
    gemm_memory_s = gemm_act / bandwidth("activations") + gemm_w / bandwidth("weights")
    gemm_s = max(gemm_flops / peak, gemm_memory_s)
    weights_first = gemm_w / bandwidth("weights") > gemm_act / bandwidth("activations")
    gemm_bound = f"{mm.name} compute" if gemm_flops / peak >= gemm_memory_s else \
        f"{plan.tier_of('weights' if weights_first else 'activations')} bandwidth"
    # layer norms, softmax, dropouts, residual adds, GeLU: each reads and writes its tensors
    # once; dropout masks are one byte per element
    row = sbh / t if par.sequence_parallel else sbh
    elementwise_s = (act_b * (10 * row + 8 * sbh / t + 4 * att) + 2 * row + att) \
        / bandwidth("activations")
    recompute_s = {"none": 0.0, "full": gemm_s + elementwise_s,
                   "selective": (4 * sbh * s / t) / peak + act_b * 4 * att
                   / bandwidth("activations")}[par.recompute]
    # backward: two GEMMs per forward GEMM; elementwise backward reads twice, writes once
    layer_s = 3 * gemm_s + 3 * elementwise_s + recompute_s
    links = spec.interconnect
    intra = collectives.link_bandwidth(spec)  # to one peer: the links a ring step uses
    # tensor parallel: the layer's output all-reduced twice in forward, twice in backward
    # (six with full recomputation, which runs the forward again)
    tp_s = (6 if par.recompute == "full" else 4) \
        * _allreduce_s(act_b * sbh, t, intra, links.link_latency)
    logits_s = 3 * 2 * s * b * h * V / t / peak  # the output layer, on the last stage
    # 1F1B: the slowest stage (the last, with the output layer) sets the pace; p - 1
    # micro-batch slots of it are idle per step
    microbatch_s = L / p * (layer_s + tp_s) + logits_s
    bubble_s = (p - 1) * microbatch_s
    # data parallel: one shard's gradients reduced across the data-parallel ranks
    inter_bw, inter_lat = intra, links.link_latency
    if par.devices > links.devices:
        if links.scale_out_bandwidth:
            inter_bw, inter_lat = links.scale_out_bandwidth, links.scale_out_latency
        else:
            notes.append(f"{par.devices} devices exceed {spec.name}'s group of "
                         f"{links.devices} and it models no scale-out network: the "
                         "group's own bandwidth is used")
    # (ZeRO 2 and 3 reduce-scatter instead: half an all-reduce; ZeRO 3 also gathers the
    # weights before forward and before backward: one all-reduce's worth)
    # (Rajbhandari et al. 2019, section 7: stages 1 and 2 reduce-scatter the gradients and
    # all-gather the updated weights, as much as one all-reduce; stage 3 gathers the
    # weights for backward too, 1.5 times as much)
    grads_ar = _allreduce_s(per_param["gradients"] * shard, d, inter_bw, inter_lat)
    weights_ar = _allreduce_s(per_param["weights"] * shard, d, inter_bw, inter_lat)
    dp_s = {0: grads_ar, 1: 0.5 * (grads_ar + weights_ar), 2: 0.5 * (grads_ar + weights_ar),
            3: 0.5 * grads_ar + weights_ar}[par.zero]
    # the optimizer reads and writes every model state once, where it lives
    opt_s = sum(2 * nbytes / tiers[tier].bandwidth
                for r in ("weights", "gradients", "master_weights", "optimizer_state")
                for tier, nbytes in plan.placement[r].items())
    breakdown = {
        "matmul": m * L / p * (3 * gemm_s + (gemm_s if par.recompute == "full" else 0.0)
                               + (recompute_s if par.recompute == "selective" else 0.0)),
        "elementwise": m * L / p * (3 * elementwise_s
                                    + (elementwise_s if par.recompute == "full" else 0.0)),
        "logits": m * logits_s,
        "tensor_parallel": m * L / p * tp_s,
        "pipeline_bubble": bubble_s,
        "data_parallel": dp_s,
        "optimizer": opt_s,
    }
    if not plan.fits:
        notes.append(f"does not fit: {plan.unplaced / 1e9:,.4g} GB per device have no tier; "
                     "the step time counts only what was placed")
    step = sum(breakdown.values())
    achieved = model.hardware_flops(par.batch, par.recompute) / step / par.devices
    mfu = model.model_flops(par.batch) / step / par.devices / nominal
    bound = max(breakdown, key=lambda k: breakdown[k])
    what = {"matmul": gemm_bound, "logits": f"{mm.name} compute",
            "elementwise": f"{plan.tier_of('activations')} bandwidth",
            "tensor_parallel": "interconnect", "data_parallel": "interconnect",
            "pipeline_bubble": "pipeline depth", "optimizer": "memory bandwidth"}[bound]
    return Estimate(spec.name, dataclasses.asdict(model), dataclasses.asdict(par), recipe.name,
                    model.params, plan, step, breakdown,
                    f"{bound.replace('_', ' ')} ({what})",
                    par.batch * s / step, _devices_to_fit(plan, roles, spec, par),
                    mfu, achieved, notes)


def _devices_to_fit(plan: memory.MemoryPlan, roles: dict[str, float], spec: BackendSpec,
                    par: Parallelism) -> int | None:
    """The fewest devices that hold the plan, growing data parallelism only (which shrinks
    the model states ZeRO partitions) with the global batch growing along, so that each
    rank keeps its micro-batches; None when no data-parallel degree does."""
    if plan.fits:
        return par.devices
    sharded = {0: (), 1: ("master_weights", "optimizer_state"),
               2: ("master_weights", "optimizer_state", "gradients"),
               3: ("master_weights", "optimizer_state", "gradients", "weights")}[par.zero]

    def fits(d: int) -> bool:
        scaled = {r: v * (par.data / d if r in sharded else 1.0) for r, v in roles.items()}
        return memory.plan(spec, scaled).fits

    hi = par.data
    while not fits(hi):
        hi *= 2
        if hi > 1 << 24:
            return None
    lo = max(par.data, hi // 2)
    while lo < hi:  # the smallest degree that fits, between the last two powers
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if not fits(mid) else (lo, mid)
    return hi * par.tensor * par.pipeline


MODELS = {  # GPT-style presets: (layers, hidden, heads, sequence, vocabulary)
    "gpt2-1.5b": GPT(48, 1600, 25, 1024, 50257),  # Radford et al. 2019
    "gpt3-6.7b": GPT(32, 4096, 32, 2048, 50257),  # Brown et al. 2020, Table 2.1
    "gpt3-175b": GPT(96, 12288, 96, 2048, 50257),  # Brown et al. 2020, Table 2.1
}


@dataclass(frozen=True)
class Check:
    """One published figure next to the model's prediction."""

    table: str
    row: str
    predicted: float
    published: float
    unit: str

    @property
    def error(self) -> float:
        """Relative error of the prediction, (predicted - published) / published."""
        return (self.predicted - self.published) / self.published

    def to_dict(self) -> dict[str, Any]:
        plain: dict[str, Any] = memory.finite(dataclasses.asdict(self) | {"error": self.error})
        return plain


def validate(matmul_efficiency: float = MATMUL_EFFICIENCY) -> list[Check]:
    """The model against the published tables (:mod:`hwport.published`)."""
    from hwport import published as pub

    checks = []
    per_param = bytes_per_param(pub.MIXED_ADAM, pub.A100)
    for z in pub.ZERO_ROWS:
        states = model_states(z.params, per_param, z.stage, z.devices)
        checks.append(Check(pub.ZERO, f"stage {z.stage}, {z.params / 1e9:g}B on "
                            f"{z.devices} devices", sum(states.values()) / 1e9, z.gigabytes,
                            "GB"))
    for r in pub.MEGATRON_ROWS:
        model = GPT(r.layers, r.hidden, r.heads, 2048, 51200)
        par = Parallelism(micro_batch=1, global_batch=r.batch,
                          data=r.gpus // (r.tensor * r.pipeline), tensor=r.tensor,
                          pipeline=r.pipeline, recompute="full")
        e = estimate(model, par, pub.A100, pub.MIXED_ADAM, matmul_efficiency=matmul_efficiency)
        checks.append(Check(pub.MEGATRON, f"{r.billions:g}B, t={r.tensor} p={r.pipeline} "
                            f"on {r.gpus} GPUs", e.achieved_flops / 1e12, r.tflops,
                            "TFLOP/s per GPU"))
    return checks
