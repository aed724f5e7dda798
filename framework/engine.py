"""The torch engine: an ordinary torch program executed with a backend's numerics.

:class:`Emulator` holds a lowered recipe and applies it at two levels:

* a ``TorchDispatchMode`` under which every aten op is classified once (view or data
  movement, matmul, op kept in fp32, other compute) and its results are rounded to the
  format of its class and phase (forward, backward, optimizer), with matmul operands
  rounded to the matmul input format (with per-tensor scaling when the recipe asks) and
  narrow accumulators modelled by summing K in groups and rounding the partial sums;
* the training step around it (:meth:`Emulator.train_step`): loss scaling with GradScaler
  semantics, gradients rounded to the gradient format, fp32 master weights swapped in for
  the optimizer, parameters stored back in the weights format.

Rounding happens in place with the C kernel on CPU tensors; its overflow/underflow counts
are the telemetry. The ``reference`` backend with the fp32 recipe runs with no mode at all:
it is native execution, the yardstick.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from hwport.formats import FloatFormat
from hwport.recipes import SCALE_EXPONENT, Lowered, compute_format
from hwport.rounding import (
    KernelParams,
    Rounding,
    _torch_xp,
    kernel_params,
    round_into,
    round_scalar,
    with_seed,
)

aten = torch.ops.aten

MATMUL = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.convolution,
          aten.convolution_backward, aten._scaled_dot_product_flash_attention_for_cpu,
          aten._scaled_dot_product_efficient_attention,
          aten._scaled_dot_product_flash_attention}
# operands of each matmul-like op (positions in args)
OPERANDS = {aten.mm: (0, 1), aten.addmm: (1, 2), aten.bmm: (0, 1), aten.baddbmm: (1, 2),
            aten.convolution: (0, 1), aten.convolution_backward: (0, 1, 2)}
FP32_GROUPS = {
    "softmax": {aten._softmax, aten._softmax_backward_data, aten._log_softmax,
                aten._log_softmax_backward_data},
    "normalization": {aten.native_layer_norm, aten.native_layer_norm_backward,
                      aten.native_batch_norm, aten.native_batch_norm_backward,
                      aten._native_batch_norm_legit, aten._native_batch_norm_legit_functional,
                      aten._native_batch_norm_legit_no_training, aten.native_group_norm,
                      aten.native_group_norm_backward, aten._fused_rms_norm,
                      aten._fused_rms_norm_backward},
    "loss": {aten.nll_loss_forward, aten.nll_loss_backward, aten.nll_loss2d_forward,
             aten.nll_loss2d_backward, aten.mse_loss, aten.mse_loss_backward,
             aten.binary_cross_entropy, aten.binary_cross_entropy_backward,
             aten.binary_cross_entropy_with_logits, aten.smooth_l1_loss,
             aten.smooth_l1_loss_backward, aten.huber_loss, aten.huber_loss_backward},
}
# Ops that move, select or copy the values of their first argument (and, for cat/stack,
# of every tensor in it), or introduce only zeros, ones and signs: never rounded, and
# their output holds a format its input is known to hold. Ops that write other values
# (full, fill_, masked_fill, clamp, where, padding, scatters) are compute ops.
PASSTHROUGH = {
    aten.detach, aten.clone, aten.copy_, aten._to_copy, aten.lift_fresh, aten.lift_fresh_copy,
    aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided,
    aten.zeros, aten.zeros_like, aten.new_zeros, aten.ones, aten.ones_like, aten.new_ones,
    aten.zero_, aten.arange, aten._local_scalar_dense, aten.cat, aten.stack,
    aten.index_select, aten.gather, aten.embedding, aten.index, aten.repeat, aten.tril,
    aten.triu, aten.flip, aten.roll, aten.relu, aten.threshold_backward, aten.max, aten.min,
    aten.amax, aten.amin, aten.argmax, aten.argmin, aten.topk, aten.sort, aten.eq, aten.ne,
    aten.lt, aten.le, aten.gt, aten.ge, aten.isnan, aten.isinf, aten.isfinite,
    aten.logical_not, aten.logical_and, aten.logical_or, aten.abs, aten.neg, aten.sign,
    aten.set_, aten.resize_, aten.randperm, aten.bernoulli, aten.uniform_, aten.normal_,
    aten.alias, aten.unbind, aten.split, aten.split_with_sizes, aten.chunk, aten._unsafe_view,
    aten.expand, aten.randint, aten.unsqueeze, aten.squeeze, aten.reshape, aten.contiguous,
}


# Rounding is one torch op, ``hwport::round``, so that a captured step's graph holds it:
# ``x`` rounded with the interned kernel parameters ``params`` into ``out`` (which may be
# ``x``), its (overflow, underflow, non-finite) counts written to row ``row`` of ``counts``;
# stochastic bits are keyed by ``step`` (seed and step) and ``index`` (the call in the step).
_PARAMS: list[KernelParams] = []
_PHASES = ("forward", "backward", "optimizer", "control", "outside")
_PARAM_IDS: dict[KernelParams, int] = {}


def _intern(p: KernelParams) -> int:
    i = _PARAM_IDS.get(p)
    if i is None:
        i = _PARAM_IDS[p] = len(_PARAMS)
        _PARAMS.append(p)
    return i


def _round(x: torch.Tensor, out: torch.Tensor, counts: torch.Tensor, row: int, params: int,
           step: torch.Tensor, index: int) -> None:
    p = _PARAMS[params]
    if p.mode == 1:  # stochastic
        p = with_seed(p, int(step) * 1_000_033 + index)
    src, dst = x.detach(), out.detach()
    dtype = torch.float64 if p.width == 64 else torch.float32
    if src.device.type == "cpu" and src.dtype == dtype == dst.dtype and src.is_contiguous() \
            and dst.is_contiguous():
        # one thread: between ops, torch's OpenMP workers spin on the other cores, and a
        # second kernel thread competing with them made the lm step slower, not faster
        counts.numpy()[row] = round_into(src.numpy(), dst.numpy(), p, threads=1)
        return
    wide = src.to(dtype).contiguous()
    if wide.device.type == "cpu":
        q = torch.empty_like(wide)
        c = round_into(wide.numpy(), q.numpy(), p, threads=1)
    else:
        q = _torch_xp(wide, p)
        top = torch.tensor([p.max_bits], dtype=torch.int64).to(
            torch.int32 if p.width == 32 else torch.int64).view(dtype).item()
        finite = torch.isfinite(wide)
        over = finite & (~torch.isfinite(q) | ((q.abs() == top) & (wide.abs() > top)))
        c = (int(over.sum()), int(((wide != 0) & (q == 0)).sum()), int((~finite).sum()))
    dst.copy_(q)
    counts.numpy()[row] = c


_LIB = torch.library.Library("hwport", "DEF")  # type: ignore[no-untyped-call]
_LIB.define(  # type: ignore[no-untyped-call]
    "round(Tensor x, Tensor(a!) out, Tensor(b!) counts, int row, int params, Tensor step, "
    "int index) -> ()")
_LIB.impl("round", _round, "CompositeExplicitAutograd")  # type: ignore[no-untyped-call]


@dataclass
class Counts:
    """Rounding events for one (phase, op class): elements rounded and what happened."""

    elements: int = 0
    overflow: int = 0
    underflow: int = 0
    nonfinite: int = 0

    def add(self, n: int, counts: Sequence[int]) -> None:
        self.elements += n
        self.overflow += counts[0]
        self.underflow += counts[1]
        self.nonfinite += counts[2]


@dataclass
class Telemetry:
    """What the numerics did during a run."""

    rounding: dict[str, Counts] = field(default_factory=lambda: defaultdict(Counts))
    updates_attempted: int = 0
    updates_lost: int = 0
    loss_scale: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    execution: str = ""  # how training steps ran: "captured", or "eager: why"

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: counts per ``phase/op class``, update losses, loss scales."""
        lost = self.updates_lost / self.updates_attempted if self.updates_attempted else 0.0
        return {
            "rounding": {k: vars(v) for k, v in sorted(self.rounding.items()) if v.elements},
            "updates_attempted": self.updates_attempted,
            "updates_lost": self.updates_lost,
            "lost_update_fraction": lost,
            "loss_scale": self.loss_scale,
            "skipped_steps": self.skipped_steps,
            "execution": self.execution,
        }


@lru_cache(maxsize=256)
def _holds(fmt: FloatFormat, value: float) -> bool:
    """Whether ``value`` is a value of ``fmt`` (a fill value that needs no rounding)."""
    v = float(value)
    if math.isnan(v):
        return True
    if math.isinf(v):
        return fmt.inf
    return round_scalar(v, fmt) == v


def _is_float(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Torch's CPU random state seeded with ``seed`` inside, restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class Emulator:
    """Runs torch programs with a lowered recipe on a backend (see the module docstring)."""

    def __init__(self, lowered: Lowered, seed: int = 0, capture: bool = True) -> None:
        self.lowered = lowered
        self.spec = lowered.backend
        recipe = lowered.recipe
        self.recipe = recipe
        self.seed = seed
        self.rbits = self.spec.precision.stochastic_rounding_bits or 23
        self._telemetry = Telemetry()
        fmt = self._fmt
        self.mm_fwd, self.mm_bwd = fmt(recipe.matmul_input), fmt(recipe.backward_input)
        self.acts = fmt(recipe.activations)
        self.weights, self.grads = fmt(recipe.weights), fmt(recipe.gradients)
        self.master = fmt(recipe.master_weights) if recipe.master_weights else None
        self.state = fmt(recipe.optimizer_state)
        self.fp32_ops = set().union(*(FP32_GROUPS[g] for g in recipe.fp32_ops))
        self.native = all(f is None for f in (self.mm_fwd, self.mm_bwd, self.acts, self.weights,
                                                  self.grads, self.state)) \
            and self.master is None and recipe.loss_scaling is None
        acc_name = self.spec.precision.accumulators.get(recipe.matmul_input, "fp32")
        self.accumulator = fmt(acc_name)
        self.interval = self.spec.precision.accumulation_interval
        self.phase = "forward"
        self.step_index = 0
        self.capture = capture
        # data parallelism: called with the step's (scaled) gradients after they are rounded
        # to the gradient format; it replaces them, in place, with their reduction over ranks
        self.reduce_gradients: Callable[[list[torch.Tensor]], None] | None = None
        # and told whether this rank found an overflow; returns whether any rank did
        self.any_rank: Callable[[bool], bool] | None = None
        self._graphs: dict[Any, _Captured | str] = {}
        self._tracing = False
        self._why_not: str | None = None
        self._counts = torch.zeros(4096, 3, dtype=torch.int64)
        self._rows: list[tuple[str, int]] = []  # (telemetry key, elements) per counts row
        self._op_index = 0
        self._step_key = torch.zeros((), dtype=torch.int64)
        self.scale = recipe.loss_scaling.init_scale if recipe.loss_scaling else 1.0
        self._growth_tracker = 0
        self._overflows_before = 0
        self._amax: dict[tuple[str, int, int], list[float]] = {}
        self._site = 0
        self._masters: dict[torch.Tensor, torch.Tensor] = {}
        self._params: set[int] = set()  # data pointers of parameters during the update
        self._compensation: dict[int, torch.Tensor] = {}  # Kahan: per parameter storage
        self._base_lr: list[float] = []
        self._applied = 0  # optimizer steps taken (skipped steps excluded)
        self._kinds: dict[Any, str] = {}
        self._known: dict[int, tuple[torch.Tensor, int, FloatFormat]] = {}
        self._copies: dict[tuple[int, str], tuple[torch.Tensor, int, torch.Tensor]] = {}
        self._param_ids: list[int] = []
        self._outer: list[str] = []
        self._mode = _Mode(self)

    def _fmt(self, name: str | None) -> FloatFormat | None:
        return compute_format(self.spec, name)

    # -- rounding -------------------------------------------------------------------------
    def round_(self, t: torch.Tensor, fmt: FloatFormat | None, key: str,
               rounding: Rounding = Rounding.NEAREST,
               saturate: bool | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Round ``t`` into ``fmt`` in place, or into ``out`` (contiguous, like ``t``) and
        return that; a no-op for fp32. Counts go to ``key``.

        Stochastic rounding draws its bits from (seed, step, index of the rounding in the
        step), so a step gives the same bits however it is executed."""
        if fmt is None or not t.is_floating_point() or t.numel() == 0:
            return t if out is None else out.copy_(t)
        dst = t if out is None else out
        width = 64 if t.dtype == torch.float64 else 32
        params = _intern(kernel_params(fmt, width, rounding, None, saturate, self.rbits))
        row = len(self._rows)
        if row == len(self._counts):  # grow: rows stay where they are until folded
            if self._tracing:  # the graph holds the old buffer
                self._why_not = "more roundings in one step than the capture buffer holds"
            self._counts = torch.cat([self._counts, torch.zeros_like(self._counts)])
        self._rows.append((key, t.numel()))
        index, self._op_index = self._op_index, self._op_index + 1
        if self._tracing:  # recorded in the step's graph
            torch.ops.hwport.round(t, dst, self._counts, row, params, self._step_key, index)
        else:
            _round(t, dst, self._counts, row, params, self._step_key, index)
        self.mark(dst, fmt)
        return dst

    @property
    def telemetry(self) -> Telemetry:
        """What the numerics did so far."""
        self._fold()
        return self._telemetry

    def _fold(self) -> None:
        """Move the rounding counts of the calls so far into the telemetry."""
        if not self._rows:
            return
        counts = self._counts[:len(self._rows)]
        for (key, n), c in zip(self._rows, counts.tolist(), strict=True):
            self._telemetry.rounding[key].add(n, c)
        counts.zero_()
        self._rows.clear()

    def rounded(self, t: torch.Tensor, fmt: FloatFormat | None, key: str) -> torch.Tensor:
        """``t`` in ``fmt``: itself if it is known to hold ``fmt`` values already, else a
        rounded copy (operands must not be changed in place). Copies are cached for the
        step, as autocast caches its casts: backward finds the forward's copy."""
        if fmt is None or not _is_float(t) or self.known(t) is fmt:
            return t
        # round the view's base once, and serve every view of it from that copy
        root = t._base if t._base is not None and t._base.dtype == t.dtype else t
        hit = self._copies.get((id(root), fmt.name))
        if hit is not None and hit[0] is root and hit[1] == root._version:
            copy = hit[2]
        else:
            src = root.detach()
            if src.is_contiguous():  # one pass: read the source, write the rounded copy
                copy = self.round_(src, fmt, key, out=torch.empty_like(src))
            else:
                copy = self.round_(src.clone(memory_format=torch.preserve_format), fmt, key)
            if copy.stride() != root.stride():  # not dense: round just this view
                return self.round_(t.detach().clone(memory_format=torch.contiguous_format),
                                   fmt, key)
            self._copies[(id(root), fmt.name)] = (root, root._version, copy)
        if root is t:
            return copy
        return copy.as_strided(t.size(), t.stride(), t.storage_offset() - root.storage_offset())

    # Tensors known to hold values of a format, so that operands already in the matmul format
    # are not copied and rounded again: id -> (tensor, version, format). The entries hold
    # their tensors until the step ends: the Python object of a tensor saved for backward
    # then stays the one seen in forward (ids cannot be reused), and a hit needs the same
    # version (an in-place change bumps it).
    def known(self, t: torch.Tensor) -> FloatFormat | None:
        entry = self._known.get(id(t))
        if entry is not None and entry[0] is t and entry[1] == t._version:
            return entry[2]
        base = t._base  # a view holds a subset of its base's values (same version counter)
        return self.known(base) if base is not None and base.dtype == t.dtype else None

    def _known_all(self, x: Any) -> FloatFormat | None:
        """The format a tensor, or every tensor of a list, is known to hold."""
        if isinstance(x, torch.Tensor):
            return self.known(x)
        if isinstance(x, list | tuple) and x and all(isinstance(t, torch.Tensor) for t in x):
            fmts = {self.known(t) for t in x}
            return fmts.pop() if len(fmts) == 1 else None
        return None

    def mark(self, t: Any, fmt: FloatFormat | None) -> None:
        if fmt is not None and isinstance(t, torch.Tensor):
            self._known[id(t)] = (t, t._version, fmt)

    def end_step(self) -> None:
        """Forget what the step kept (rounded copies, known formats but the parameters'),
        and bring the telemetry up to date."""
        self._fold()
        self._forget()

    def _forget(self) -> None:
        self._copies.clear()
        params = set(self._param_ids)
        self._known = {k: v for k, v in self._known.items() if k in params}

    # -- op handling ----------------------------------------------------------------------
    def kind(self, func: Any) -> str:
        """How ``func`` is emulated: pass, matmul, fp32 or compute (cached per overload)."""
        kind = self._kinds.get(func)
        if kind is None:
            packet = func.overloadpacket
            schema = func._schema
            aliasing = any(r.alias_info is not None for r in schema.returns)
            out_variant = any(a.is_out for a in schema.arguments)  # writes into out=
            if packet in MATMUL:
                kind = "matmul"
            elif packet in self.fp32_ops:
                kind = "fp32"
            elif packet in PASSTHROUGH or (aliasing and not out_variant
                                           and torch.Tag.inplace not in func.tags):
                kind = "pass"
            else:
                kind = "compute"
            self._kinds[func] = kind
        return kind

    def dispatch(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        phase = self.phase
        if phase == "control" or phase == "outside":
            return func(*args, **kwargs)
        kind = self.kind(func)
        if self._tracing and (func is aten._local_scalar_dense.default
                              or torch.Tag.data_dependent_output in func.tags
                              or torch.Tag.dynamic_output_shape in func.tags):
            self._why_not = f"it reads tensor values on the host ({func})"
        if kind == "pass":
            out = func(*args, **kwargs)
            if args:  # views, copies, selections and concatenations keep the format
                fmt = self._known_all(args[0])
                if fmt is not None:
                    dtype = args[0].dtype if isinstance(args[0], torch.Tensor) else None
                    for o in (out if isinstance(out, tuple | list) else (out,)):
                        if isinstance(o, torch.Tensor) and o.dtype == (dtype or o.dtype):
                            self.mark(o, fmt)  # a cast to another dtype may round again
            return out
        if phase == "optimizer":
            return self._optimizer_op(func, args, kwargs)
        if kind == "matmul":
            return self._matmul(func, args, kwargs)
        fmt = self._autocast_format(args) if self.recipe.autocast else self.acts
        out = func(*args, **kwargs)
        if kind == "fp32":
            return out
        if func is aten.masked_fill.Scalar and fmt is not None and self.known(args[0]) is fmt \
                and _holds(fmt, args[2]):  # values of fmt and a value of fmt: nothing to round
            self.mark(out, fmt)
            return out
        return self._round_outputs(func, args, kwargs, out, fmt, f"{phase}/elementwise")

    def _autocast_format(self, args: tuple[Any, ...]) -> FloatFormat | None:
        """autocast: an op computes in its inputs' precision, so its output is in the
        activation format only if every (non-scalar) float input is; else fp32."""
        seen = False
        for a in args:
            for t in (a if isinstance(a, list | tuple) else (a,)):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 0:
                    if self.known(t) is not self.acts:
                        return None
                    seen = True
        return self.acts if seen else None

    def _round_outputs(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any,
                       fmt: FloatFormat | None, key: str) -> Any:
        if fmt is None:
            return out
        if torch.Tag.inplace in func.tags:
            for t in (args[0] if isinstance(args[0], list | tuple) else (args[0],)):
                if _is_float(t):  # _foreach_*_ ops write a list of tensors
                    self.round_(t, fmt, key)
        elif isinstance(out, torch.Tensor):
            self.round_(out, fmt, key)
        elif isinstance(out, tuple | list):
            for o in out:
                if _is_float(o):
                    self.round_(o, fmt, key)
        return out

    def _matmul(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        backward = self.phase == "backward"
        fmt = self.mm_bwd if backward else self.mm_fwd
        packet = func.overloadpacket
        positions = OPERANDS.get(packet, (0, 1, 2))
        operands = list(args)
        if fmt is not None:
            for i in positions:
                if i < len(operands) and _is_float(operands[i]):
                    operands[i] = self._operand(operands[i], fmt, i)
        narrow = self.accumulator is not None or self.interval is not None
        if fmt is not None and narrow and packet in (aten.mm, aten.addmm, aten.bmm, aten.baddbmm):
            out = self._accumulate(packet, operands, kwargs)
        else:
            out = func(*operands, **kwargs)
        key = f"{self.phase}/matmul"
        return self._round_outputs(func, tuple(operands), kwargs, out, self.acts, key)

    def _operand(self, x: torch.Tensor, fmt: FloatFormat, position: int) -> torch.Tensor:
        key = f"{self.phase}/matmul_input"
        scaling = self.recipe.fp8_scaling
        if scaling is None:
            return self.rounded(x, fmt, key)
        self._site += 1
        site = (self.phase, self._site, position)
        amax_now = float(x.detach().abs().max()) if x.numel() else 0.0
        hist = self._amax.setdefault(site, [])
        amax = amax_now if scaling.history == 0 or not hist else max(hist)
        if not self._outer:  # evaluation passes use the scales, they do not update them
            hist.append(amax_now)
            del hist[:-max(scaling.history, 1)]
        if not math.isfinite(amax) or amax == 0:
            return self.rounded(x, fmt, key)
        s = fmt.max / amax / 2.0**scaling.margin
        # power-of-two scales are exact; kept where s and 1/s are normal float32 values
        s = 2.0 ** min(max(math.floor(math.log2(s)), -SCALE_EXPONENT), SCALE_EXPONENT)
        # scaled casts saturate (Transformer Engine converts with satfinite)
        q = self.round_(x.detach() * s, fmt, key, saturate=True)
        return q.mul_(1.0 / s)

    def _accumulate(self, packet: Any, args: list[Any], kwargs: dict[str, Any]) -> torch.Tensor:
        """A matmul whose partial sums live in the accumulator format: K is summed in groups
        of ``accumulation_interval`` (or 32) products, each group exactly, and every partial
        sum is rounded to the accumulator format."""
        if packet in (aten.addmm, aten.baddbmm):
            bias, a, b = args[0], args[1], args[2]
            beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
        else:
            bias, a, b, beta, alpha = None, args[0], args[1], 0, 1
        k = a.shape[-1]
        group = self.interval or 32
        acc = torch.zeros(*a.shape[:-1], b.shape[-1], dtype=a.dtype, device=a.device)
        fmt = self.accumulator
        for k0 in range(0, k, group):
            acc += a[..., k0:k0 + group] @ b[..., k0:k0 + group, :]
            if fmt is not None:
                self.round_(acc, fmt, f"{self.phase}/accumulator")
        if alpha != 1:
            acc = acc * alpha
        if bias is not None and beta != 0:
            acc = acc + (bias * beta if beta != 1 else bias)
        return acc

    # -- optimizer phase ------------------------------------------------------------------
    def _optimizer_op(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Optimizer ops: a parameter written in place is rounded to the weights (or master)
        format with the recipe's update rounding; everything else to the state format."""
        targets: list[torch.Tensor] = []
        if torch.Tag.inplace in func.tags and args:
            first = args[0]
            targets = [first] if isinstance(first, torch.Tensor) else [
                t for t in first if isinstance(t, torch.Tensor)]  # _foreach_*_ ops
        fmt = self.master if self._masters else self.weights
        params = [t for t in targets if t.data_ptr() in self._params] if fmt is not None else []
        before = [t.detach().clone() for t in params]
        out = func(*args, **kwargs)
        rounding = Rounding(self.recipe.update_rounding)
        for t, old in zip(params, before, strict=True):
            exact_changed = t != old
            if self.recipe.kahan_updates:  # the error this write leaves goes into the next
                comp = self._compensation.get(t.data_ptr())
                if comp is not None:
                    t.add_(comp)
                exact = t.clone()
                self.round_(t, fmt, "optimizer/weights", rounding)
                self._compensation[t.data_ptr()] = exact.sub_(t)
            else:
                self.round_(t, fmt, "optimizer/weights", rounding)
            self.telemetry.updates_attempted += int(exact_changed.sum())
            self.telemetry.updates_lost += int((exact_changed & (t == old)).sum())
        # optimizer state: not parameters, not scalars (a step counter stays exact, as in
        # every mixed-precision optimizer)
        state = [t for t in targets if t.data_ptr() not in self._params
                 and t.is_floating_point() and t.dim() > 0]
        if targets:
            for t in state:
                self.round_(t, self.state, "optimizer/state")
            return out
        if isinstance(out, torch.Tensor) and out.dim() == 0:
            return out
        return self._round_outputs(func, args, kwargs, out, self.state, "optimizer/state")

    # -- the training step ----------------------------------------------------------------
    @contextlib.contextmanager
    def phase_(self, phase: str) -> Iterator[None]:
        """Run the block with ops attributed to ``phase`` (``control``: not emulated)."""
        old, self.phase = self.phase, phase
        self._site = 0
        # stochastic bits are keyed per phase, so that no phase's draws depend on how many
        # roundings another phase made
        self._op_index = _PHASES.index(phase) << 24
        try:
            if phase == "control":
                with _disable_current_modes():
                    yield
            else:
                yield
        finally:
            self.phase = old

    @contextlib.contextmanager
    def model_only(self, model: torch.nn.Module) -> Iterator[None]:
        """Emulate only inside ``model``'s forward: what the block computes from the model's
        outputs (metrics, comparisons) is measurement, not part of the program."""
        def enter(*_: Any) -> None:
            self._outer.append(self.phase)
            self.phase = "forward"
            self._site = 0

        def leave(*_: Any) -> None:
            self.phase = self._outer.pop()

        hooks = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave)]
        old, self.phase = self.phase, "outside"
        try:
            yield
        finally:
            self.phase = old
            for h in hooks:
                h.remove()

    @contextlib.contextmanager
    def active(self) -> Iterator[Emulator]:
        """Emulate every torch op in the block (native when the recipe needs nothing)."""
        if self.native:
            yield self
            return
        with self._mode:
            yield self

    def prepare(self, model: torch.nn.Module) -> None:
        """Store the model's parameters in the weights format, master copies kept apart."""
        with torch.no_grad():
            for p in model.parameters():
                if self.recipe.master_weights is not None:
                    self._masters[p] = self.round_(p.detach().clone(), self.master, "init/master")
                self.round_(p.data, self.weights, "init/weights")
                self.mark(p, self.weights)
                self._param_ids.append(id(p))
        self._fold()

    def train_step(self, model: torch.nn.Module, loss: Callable[[Any, Any], torch.Tensor],
                   batch: Any, optimizer: torch.optim.Optimizer) -> float:
        """One step: forward ``loss(model, batch)``, (scaled) backward, gradient checks,
        optimizer update.

        Forward and backward are captured as a graph the first time a step sees a batch of
        its shapes, with the emulation's roundings in it, and that graph is replayed for
        later batches of the same shapes (like a CUDA graph: the step must do the same
        thing each time; see :attr:`capture`). A step that reads tensor values on the host
        runs eagerly under the dispatch mode instead, with the same results.

        Returns the loss (NaN or inf when training diverged: that is an outcome)."""
        self.end_step()
        self._step_key.fill_(self.seed * 1_000_003 + self.step_index)
        params = [p for p in model.parameters() if p.requires_grad]
        self._overflows_before = self._backward_overflows()
        with self.phase_("control"):
            scale = torch.tensor(self.scale)
            value, grads = self._forward_backward(model, loss, batch, params, scale)
        with self.phase_("control"), torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.grad = None if g is None else g.to(p.dtype)
            params = [p for p in params if p.grad is not None]
            for p in params:
                assert p.grad is not None
                self.round_(p.grad, self.grads, "backward/gradients")
            self._fold()
            if self.reduce_gradients is not None:
                self.reduce_gradients([p.grad for p in params if p.grad is not None])
            scaled_by = self.scale  # GradScaler unscales by it before it updates the scale
            skip = self._loss_scaling(params)
            if not skip:
                if scaled_by != 1.0:
                    for p in params:
                        assert p.grad is not None
                        p.grad.mul_(1.0 / scaled_by)
                for w, master in self._masters.items():
                    w.data, self._masters[w] = master, w.data
        if not skip:
            self._params = {p.data_ptr() for p in model.parameters()}
            if self.recipe.warmup_steps:
                self._warmup(optimizer)
            with self.phase_("control" if self._update_is_native() else "optimizer"):
                optimizer.step()
            with self.phase_("control"), torch.no_grad():
                for w, low in self._masters.items():
                    master = w.data
                    low.copy_(master)
                    self.round_(low, self.weights, "optimizer/weights_cast")
                    w.data, self._masters[w] = low, master
                for w in model.parameters():  # every write to a parameter was rounded
                    self.mark(w, self.weights)
        optimizer.zero_grad(set_to_none=True)
        self.step_index += 1
        self.end_step()
        return value

    def _forward_backward(self, model: torch.nn.Module, loss: Callable[[Any, Any], torch.Tensor],
                          batch: Any, params: list[torch.nn.Parameter], scale: torch.Tensor,
                          ) -> tuple[float, Sequence[torch.Tensor | None]]:
        """The loss and the (scaled) gradients of ``params``: replayed from a captured graph,
        captured now, or computed eagerly. Runs with no dispatch mode active."""
        self._fold()  # a captured graph writes the counts from row 0
        leaves, tree = pytree.tree_flatten(batch)
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        buffers = list(model.buffers())
        key = (loss, tuple(m.training for m in model.modules()), str(tree),
               tuple(id(p) for p in params), tuple(id(b) for b in buffers),
               tuple((tuple(x.shape), x.stride(), x.dtype, x.device, x.requires_grad)
                     for x in tensors),
               tuple(next(i for i, y in enumerate(tensors) if y is x) for x in tensors),
               tuple(repr(x) for x in leaves if not isinstance(x, torch.Tensor)))
        graph = self._graphs.get(key)
        if not self.capture:
            graph = self._telemetry.execution = "eager: capture is off"
        elif graph is None and len(self._graphs) >= 8:
            graph = self._telemetry.execution = "eager: the step changed shape or non-tensor " \
                "batch values more than 8 times"
        elif self.recipe.fp8_scaling is not None:
            graph = self._telemetry.execution = \
                "eager: per-tensor scaling reads each operand's amax on the host"
        if isinstance(graph, _Captured):
            with torch.no_grad():
                out, grads = graph.module(params, buffers, tensors, scale, self._step_key,
                                          self._counts)
            self._rows.extend(graph.rows)
            return float(out), grads

        def step(params: list[torch.nn.Parameter], buffers: list[torch.Tensor],
                 tensors: list[torch.Tensor], scale: torch.Tensor, step_key: torch.Tensor,
                 counts: torch.Tensor) -> tuple[torch.Tensor, Sequence[torch.Tensor | None]]:
            it = iter(tensors)
            b = pytree.tree_unflatten(
                [next(it) if isinstance(x, torch.Tensor) else x for x in leaves], tree)
            with self._mode:
                with self.phase_("forward"):
                    out = loss(model, b)
                with self.phase_("backward"):
                    # the scale enters as the loss's gradient (GradScaler multiplies the fp32
                    # loss; no fp16 op ever holds the scale itself)
                    grads = torch.autograd.grad(out, params, scale.to(out.dtype).expand_as(out),
                                                allow_unused=True)
            results.append((out.detach(), grads))
            return out.detach(), grads

        args = (params, buffers, tensors, scale, self._step_key, self._counts)
        results: list[tuple[torch.Tensor, Sequence[torch.Tensor | None]]] = []
        if graph is not None:  # eager: capture is off, or this step cannot be captured
            out, grads = step(*args)
            return float(out), grads
        self._tracing, self._why_not = True, None
        rng = torch.get_rng_state()
        saved = [b.clone() for b in buffers]
        try:
            module = make_fx(step, tracing_mode="real")(*args)
        except Exception as e:  # what the tracer cannot follow runs eagerly
            # undo what the attempt did, then run the step as if no capture was tried (the
            # counts were folded before it, so every row is the attempt's)
            self._counts[:len(self._rows)].zero_()
            self._rows.clear()
            self._forget()  # its rounded copies would go uncounted in the rerun
            torch.set_rng_state(rng)
            with torch.no_grad():
                for b, old in zip(buffers, saved, strict=True):
                    b.copy_(old)
            why = self._why_not or f"capture failed ({type(e).__name__}: {e})"
            self._graphs[key] = self._telemetry.execution = f"eager: {why}"
            out, grads = step(*args)
            return float(out), grads
        finally:
            self._tracing = False
        # a tensor the step reads from outside (not a parameter, buffer or in the batch)
        # would be frozen into the graph; constants the step creates itself are fine
        if self._why_not is None and any(
                n.op == "get_attr" and any(u.target is not aten.lift_fresh_copy.default
                                           for u in n.users) for n in module.graph.nodes):
            self._why_not = "it reads a tensor that is neither a parameter, a buffer nor " \
                "part of the batch"
        if self._why_not is None:
            for n in module.graph.nodes:  # replay calls the kernel with no dispatch around it
                if n.target is torch.ops.hwport.round.default:
                    n.target = _round
            module.recompile()
            self._graphs[key] = _Captured(module, tuple(self._rows))
            if self._telemetry.execution == "":
                self._telemetry.execution = "captured"
        else:
            self._graphs[key] = self._telemetry.execution = f"eager: {self._why_not}"
        out, grads = results[-1]  # the traced run computed this step's results
        return float(out), grads

    def _warmup(self, optimizer: torch.optim.Optimizer) -> None:
        """Linear learning-rate warmup over the recipe's ``warmup_steps`` (applied steps)."""
        if not self._base_lr:
            self._base_lr = [float(g["lr"]) for g in optimizer.param_groups]
        factor = min(1.0, (self._applied + 1) / self.recipe.warmup_steps)
        for g, lr in zip(optimizer.param_groups, self._base_lr, strict=True):
            g["lr"] = lr * factor
        self._applied += 1

    def _update_is_native(self) -> bool:
        """Whether the optimizer's arithmetic needs no rounding (fp32 master and state)."""
        target = self.master if self._masters else self.weights
        return target is None and self.state is None

    def _backward_overflows(self) -> int:
        """Overflow and invalid (inf/NaN) events while computing gradients: what hardware
        exception flags would report."""
        return sum(c.overflow + c.nonfinite for k, c in self.telemetry.rounding.items()
                   if k.startswith("backward/"))

    def _loss_scaling(self, params: list[torch.nn.Parameter]) -> bool:
        """GradScaler's update; True when the step must be skipped."""
        policy = self.recipe.loss_scaling
        if policy is None:
            return False
        self.telemetry.loss_scale.append(self.scale)
        if policy.check == "overflow_flags":  # any overflow while computing gradients
            found = self._backward_overflows() > self._overflows_before
        else:  # GradScaler: an inf or NaN in some gradient
            found = any(not bool(torch.isfinite(p.grad).all()) for p in params
                        if p.grad is not None)
        if self.any_rank is not None:  # every rank skips, or none does
            found = self.any_rank(found)
        self.scale, self._growth_tracker = policy.after(self.scale, self._growth_tracker, found)
        self.telemetry.skipped_steps += found
        return found


@dataclass(frozen=True)
class _Captured:
    """A step's forward and backward as a graph, and the telemetry rows its roundings fill."""

    module: torch.fx.GraphModule
    rows: tuple[tuple[str, int], ...]


class _Mode(TorchDispatchMode):  # type: ignore[no-untyped-call]
    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Emulated programs are never compiled, so __torch_dispatch__ needs no per-op
        # wrapper that disables dynamo (it costs microseconds on every op).
        return False

    def __init__(self, emulator: Emulator) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.emulator = emulator

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return self.emulator.dispatch(func, args, kwargs or {})
