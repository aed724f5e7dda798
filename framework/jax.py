"""The JAX engine's core: a jaxpr transformation that gives a function a backend's numerics.

``emulate(fn, backend, recipe)`` returns a function that traces ``fn`` to a jaxpr and
evaluates that jaxpr again, equation by equation, with the lowered recipe's numerics, the
way the torch engine's dispatch mode treats aten ops (docs/jax.md):

* **matmul** (``dot_general``, ``conv_general_dilated``): floating operands rounded to the
  matmul input format (the backward one in backward), a narrow accumulator modelled by
  summing the contracted dimension in groups of ``accumulation_interval`` (or 32) products
  and rounding every partial sum, the output rounded to the activation format;
* **pass** (reshapes, slices, gathers, selections, casts, max/min, negation...): values
  unchanged, so their format is the input's;
* **fp32**: equations under a ``jax.named_scope`` (or inside a jitted function) named after
  one of the recipe's fp32 groups (``softmax``, ``normalization``, ``loss``; jax.nn's
  ``softmax`` and ``log_softmax`` count as ``softmax``) compute and stay in fp32;
* **compute** (every other floating-point primitive): outputs rounded to the activation
  format; with ``autocast``, only when every floating input already holds values of it.

The phase of an equation is *backward* when JAX's name stack says it is a transpose (so
``emulate(jax.grad(loss))`` rounds the backward pass with the backward formats), else
*forward*. Nested jaxprs (``jit``/``pjit``, ``custom_jvp_call``, ``custom_vjp_call``,
``checkpoint``, ``scan``, ``while``, ``cond``) are transformed recursively, so the result
is an ordinary JAX function: ``jax.jit`` compiles it with the rounding in the program and
no Python per operation at run time, and ``jax.grad`` differentiates it (each rounding
passes its tangent straight through, as a quantisation-aware program's would). A primitive
hwport does not know is an error naming it and the backend, never passed through unrounded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from hwport import plugins
from hwport.errors import HwportError
from hwport.formats import FloatFormat
from hwport.recipes import SCALE_EXPONENT, FP8Scaling, Lowered, Recipe, compute_format, lower
from hwport.rounding import KernelParams, Rounding, kernel_params, round_counted_jax
from hwport.spec import BackendSpec

__all__ = ["Emulated", "Packed", "UnsupportedPrimitive", "emulate", "pack", "unpack"]

MATMUL = {"dot_general", "conv_general_dilated", "ragged_dot_general"}
# values unchanged (or a choice among the inputs' values): the output keeps their format
PASS = {
    "reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "slice",
    "dynamic_slice", "dynamic_update_slice", "concatenate", "gather", "select_n", "rev",
    "pad", "copy", "copy_p", "convert_element_type", "reduce_max", "reduce_min", "max",
    "min", "neg", "abs", "stop_gradient", "sort", "clamp", "real", "imag", "tile",
    "optimization_barrier", "device_put", "sharding_constraint", "split", "reduce_precision",
    "cummax", "cummin", "sign", "floor", "ceil", "round", "select_and_gather_add", "top_k",
    "reduce_window_max", "reduce_window_min", "scatter-max", "scatter_max", "scatter-min",
    "scatter_min", "iota", "bitcast_convert_type",
}
# floating-point results that the backend computes and stores in its activation format
COMPUTE = {
    "add", "add_any", "sub", "mul", "div", "rem", "pow", "integer_pow", "square", "sqrt",
    "rsqrt", "cbrt", "exp", "exp2", "expm1", "log", "log1p", "logistic", "tanh", "sinh",
    "cosh", "sin", "cos", "tan", "asin", "acos", "atan", "atan2", "asinh", "acosh", "atanh",
    "erf", "erfc", "erf_inv", "lgamma", "digamma", "reduce_sum", "reduce_prod", "cumsum",
    "cumprod", "cumlogsumexp", "scatter-add", "scatter_add", "scatter", "scatter-mul",
    "scatter_mul", "select_and_scatter_add", "nextafter", "igamma", "random_gamma_grad",
    "reduce_window_sum", "reduce_window",
}
# higher-order primitives: their inner jaxprs are transformed
CALLS = {"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
         "custom_vjp_call_jaxpr", "checkpoint", "remat", "remat2", "custom_lin"}
LOOPS = {"scan", "while", "cond"}
# jax.nn's functions are one operation each, as aten's are to the torch engine: computed in
# fp32 inside, their outputs rounded once (and their own differentiation rules kept);
# those of an fp32 group are not rounded at all
FUSED = {"softmax": "softmax", "log_softmax": "softmax", "logsumexp": "softmax",
         "standardize": "normalization", "relu": None, "relu6": None, "gelu": None,
         "silu": None, "swish": None, "sigmoid": None, "softplus": None, "elu": None,
         "celu": None, "selu": None, "leaky_relu": None, "glu": None, "log_sigmoid": None,
         "hard_tanh": None, "squareplus": None, "mish": None}
# jax.nn's functions that choose among their input's values and zero (torch's relu is a
# passthrough op of its engine): never rounded, their output holding the input's format
FUSED_PASS = {"relu"}
# jax.random's samplers: exact constructions from random bits, never rounded (as torch's
# uniform_, normal_ and bernoulli pass through the torch engine)
EXACT = {"_uniform", "_normal", "_normal_real", "_bernoulli", "_truncated_normal",
         "_randint", "_gumbel", "_exponential", "_categorical", "_laplace", "_logistic",
         "_beta", "_gamma", "_poisson", "_cauchy", "_choice", "_permutation", "_shuffle",
         "_random_bits", "_threefry_split", "_threefry_fold_in", "threefry_2x32",
         "_dirichlet", "_t", "_chisquare", "_f", "_rademacher", "_maxwell",
         "_double_sided_maxwell", "_weibull_min", "_orthogonal", "_generalized_normal",
         "_ball", "_triangular", "_wald", "_geometric", "_binomial", "_loggamma"}


class UnsupportedPrimitive(HwportError):
    """A primitive that the JAX engine cannot classify: it would run unrounded."""

    def __init__(self, primitive: str, backend: str) -> None:
        super().__init__(f"hwport.jax: primitive {primitive!r} is not supported on backend "
                         f"{backend!r}: hwport does not know how its result is rounded, and "
                         "will not pass it through unrounded (docs/jax.md lists the "
                         "supported primitives)")
        self.primitive = primitive
        self.backend = backend


def _float(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


@cache
def _rounder(p: KernelParams) -> Callable[[Any], tuple[Any, Any]]:
    """``x`` (float32 or float64, as ``p`` says) rounded as ``p`` says, and its [overflow,
    underflow, nonfinite] counts (:func:`hwport.rounding.round_counted_jax`); the tangent
    passes straight through the rounding."""

    @jax.custom_jvp
    def rnd(x: Any) -> tuple[Any, Any]:
        return round_counted_jax(x, p)

    @rnd.defjvp
    def _jvp(primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> tuple[Any, Any]:
        y, counts = rnd(primals[0])
        return (y, counts), (tangents[0], np.zeros(counts.shape, jax.dtypes.float0))

    return rnd  # type: ignore[no-any-return]


COLUMNS = ("overflow", "underflow", "elements", "nonfinite")  # a loop's counts, per key


@dataclass
class Telemetry:
    """Overflow and underflow counts per rounding key (``phase/op class``), as traced
    values (sum them with :meth:`totals` inside or outside ``jit``)."""

    counts: dict[str, list[tuple[Any, Any, Any, Any]]] = field(default_factory=dict)

    def add(self, key: str, overflow: Any, underflow: Any, elements: Any,
            nonfinite: Any = 0) -> None:
        self.counts.setdefault(key, []).append((overflow, underflow, elements, nonfinite))

    def totals(self) -> dict[str, dict[str, Any]]:
        """{key: {"overflow", "underflow", "nonfinite", "elements", "roundings"}}, the
        torch engine's telemetry layout (``rounding`` in a run's JSON)."""
        return {k: {"overflow": sum(v[0] for v in rows), "underflow": sum(v[1] for v in rows),
                    "elements": sum(v[2] for v in rows), "nonfinite": sum(v[3] for v in rows),
                    "roundings": len(rows)}
                for k, rows in sorted(self.counts.items())}


Layout = tuple[tuple[str, int], ...]  # (key, roundings) per row of packed counts


def pack(totals: dict[str, dict[str, Any]]) -> tuple[Layout, Any]:
    """:meth:`Telemetry.totals` as (its static layout, one int32 array [keys, 4] of
    ``COLUMNS``): a program's telemetry leaves it as one array, not one per count."""
    layout = tuple((k, int(v["roundings"])) for k, v in totals.items())
    rows = [jnp.stack([jnp.asarray(v[c], jnp.int32) for c in COLUMNS]) for v in totals.values()]
    return layout, jnp.stack(rows) if rows else jnp.zeros((0, len(COLUMNS)), jnp.int32)


def unpack(layout: Layout, counts: Any) -> dict[str, dict[str, int]]:
    """Packed counts (on the host) as :meth:`Telemetry.totals` lays them out."""
    rows = np.asarray(counts).tolist()
    return {k: {**dict(zip(COLUMNS, (int(v) for v in row), strict=True)), "roundings": n}
            for (k, n), row in zip(layout, rows, strict=True)}


class Packed:
    """A jitted program of ``fn`` (returning ``(outputs, totals)``, as
    :meth:`Emulated.with_telemetry`) whose counts leave it packed: calling it returns
    ``(outputs, totals)`` with the totals on the host, after one transfer. Trace it inside
    another program with :meth:`traced`, which records the layout (:attr:`layout`, the
    latest traced; a layout per argument shapes serves the calls)."""

    def __init__(self, fn: Callable[..., tuple[Any, dict[str, dict[str, Any]]]]) -> None:
        self.fn = fn
        self.layout: Layout = ()
        self._layouts: dict[tuple[Any, ...], Layout] = {}
        self.program = jax.jit(self.traced)

    def traced(self, *args: Any) -> tuple[Any, Any]:
        """``(outputs, packed counts)``, traceable."""
        out, totals = self.fn(*args)
        self.layout, counts = pack(totals)
        self._layouts[_signature(args)] = self.layout
        return out, counts

    def launch(self, *args: Any) -> tuple[Any, Callable[[], dict[str, dict[str, int]]]]:
        """Start the program: ``(outputs, read)``, the outputs still being computed and
        ``read()`` the totals on the host (it waits for them)."""
        out, counts = self.program(*args)
        # one traced layout serves every call (computing the signature costs about 0.2 ms
        # a call, on the host, every step)
        layouts = self._layouts
        layout = next(iter(layouts.values())) if len(layouts) == 1 else \
            layouts[_signature(args)]
        return out, lambda: unpack(layout, counts)

    def __call__(self, *args: Any) -> tuple[Any, dict[str, dict[str, int]]]:
        out, read = self.launch(*args)
        return out, read()


def _signature(args: Any) -> tuple[Any, ...]:
    """The shapes and dtypes of the array leaves of ``args`` (what a jit retraces on)."""
    return tuple((tuple(np.shape(a)), str(jax.dtypes.canonicalize_dtype(
        a.dtype if hasattr(a, "dtype") else np.result_type(a))))
        for a in jax.tree_util.tree_leaves(args))


@dataclass
class _Ctx:
    lowered: Lowered
    telemetry: Telemetry
    fmts: dict[str, FloatFormat | None]
    accumulator: FloatFormat | None
    interval: int | None
    # matmul operands rounded so far, by (id, format): (value, its rounded copy); backward
    # finds the forward's copy, as autocast's cast cache serves the torch engine
    copies: dict[tuple[int, str], tuple[Any, Any]] = field(default_factory=dict)
    scaling: _Scaling | None = None  # per-tensor FP8 scaling's sites, with its recipe

    def inner(self, telemetry: Telemetry) -> _Ctx:
        """The context of a nested trace (its own telemetry; no values of this trace)."""
        scaling = None if self.scaling is None else dataclasses.replace(self.scaling,
                                                                         nested=True)
        return dataclasses.replace(self, telemetry=telemetry, copies={}, scaling=scaling)

    @property
    def recipe(self) -> Recipe:
        return self.lowered.recipe

    @property
    def backend(self) -> str:
        return self.lowered.backend.name


def _rounded(x: Any, fmt: FloatFormat, saturate: bool | None = None) -> tuple[Any, Any]:
    """``x`` rounded into ``fmt`` (nearest; ``saturate`` as the kernels take it) and its
    [overflow, underflow, nonfinite] counts."""
    width = 64 if x.dtype == jnp.float64 else 32
    p = kernel_params(fmt, width, Rounding.NEAREST, None, saturate, 23)
    y, counts = _rounder(p)(x.astype(jnp.float32 if width == 32 else jnp.float64))
    return y.astype(x.dtype), counts


def _round(ctx: _Ctx, x: Any, fmt: FloatFormat | None, key: str) -> Any:
    """``x`` rounded into ``fmt`` (nearest), with its overflow and underflow counted."""
    if fmt is None or not _float(x) or x.size == 0:
        return x
    y, (overflow, underflow, nonfinite) = _rounded(x, fmt)
    ctx.telemetry.add(key, overflow, underflow, int(x.size), nonfinite)
    return y


@dataclass
class _Scaling:
    """Per-tensor FP8 scaling in one trace: each scaled matmul operand is a *site*
    (phase, its index among that phase's scaled operands), as the torch engine numbers
    them; ``delayed[i]`` is site i's amax from its history (negative: none, use the
    operand's own); ``amax`` collects each site's own amax."""

    policy: FP8Scaling
    delayed: Any  # f32[sites] or None (every site scales by its own amax)
    sites: list[tuple[str, int]] = field(default_factory=list)
    amax: list[Any] = field(default_factory=list)
    nested: bool = False  # inside a loop or conditional body


def _scale_exponent(amax: Any, fmt: FloatFormat, margin: int) -> Any:
    """floor(log2(fmt.max / amax)) - margin, exactly (the torch engine computes it in
    float64): from the two values' binary exponents and significands, no division; clipped
    as the torch engine clips it (:data:`hwport.recipes.SCALE_EXPONENT`)."""
    m_max, e_max = math.frexp(fmt.max)
    m_a, e_a = jnp.frexp(amax)
    e = e_max - e_a - margin - (m_a > m_max).astype(jnp.int32)
    return jnp.clip(e, -SCALE_EXPONENT, SCALE_EXPONENT)


def _scaled_operand(ctx: _Ctx, x: Any, fmt: FloatFormat, key: str, phase: str) -> Any:
    """A matmul operand under per-tensor scaling (Transformer Engine's recipe, as the torch
    engine's ``_operand``): ``q = round(x * s, fmt, saturating) / s`` with ``s`` the power
    of two ``2**floor(log2(max(fmt) / amax)) / 2**margin``; the amax is the site's
    history's (delayed scaling) or ``x``'s own (current scaling, or no history yet); an
    amax of 0 or not finite rounds ``x`` unscaled."""
    sc = ctx.scaling
    assert sc is not None
    if sc.nested:
        raise HwportError(f"hwport.jax: recipe {ctx.recipe.name!r} scales FP8 matmul inputs "
                          f"per tensor on backend {ctx.backend!r}, which the JAX engine does "
                          "not model inside loops or conditionals (scan, while, cond)")
    index = sum(1 for p, _ in sc.sites if p == phase) + 1
    own = jnp.max(jnp.abs(lax.stop_gradient(x)), initial=0.0).astype(jnp.float32)
    amax = own
    if sc.delayed is not None and sc.delayed.shape[0] and sc.policy.history > 0:
        # (a delayed of the wrong length is refused by with_scaling once traced)
        d = sc.delayed[len(sc.sites)]
        amax = jnp.where(d < 0, own, d)  # a NaN history stays NaN: unscaled, as in torch
    sc.sites.append((phase, index))
    sc.amax.append(own)
    ok = jnp.isfinite(amax) & (amax > 0)
    e = jnp.where(ok, _scale_exponent(jnp.where(ok, amax, 1.0), fmt, sc.policy.margin), 0)
    s = jnp.ldexp(jnp.ones((), x.dtype), e)
    inv = jnp.ldexp(jnp.ones((), x.dtype), -e)
    scaled, c_scaled = _rounded(x * s, fmt, saturate=True)
    plain, c_plain = _rounded(x, fmt)
    counts = jnp.where(ok, c_scaled, c_plain)
    ctx.telemetry.add(key, counts[0], counts[1], int(x.size), counts[2])
    return jnp.where(ok, scaled * inv, plain)


def _scope_of(eqn: Any) -> str:
    return str(eqn.source_info.name_stack)


def _tokens(scope: str) -> list[str]:
    return [t for t in re.split(r"[()/\s]+", scope) if t]


def _group(ctx: _Ctx, scope: str) -> str | None:
    """The recipe's fp32 group an equation belongs to: a ``jax.named_scope`` of that name
    around it (jitted functions' own names do not count: a model jitted as ``loss`` is not
    the loss)."""
    for name in _tokens(scope):
        if name in ctx.recipe.fp32_ops:
            return name
    return None


def _backward(scope: str) -> bool:
    """Whether JAX built the equation as a transpose (the backward pass); recomputed
    forward values of a checkpoint are forward."""
    tokens = _tokens(scope)
    return "transpose" in tokens and "rematted_computation" not in tokens


def _known_all(known: Sequence[FloatFormat | bool | None]) -> FloatFormat | None:
    """The one format every floating input holds, or None."""
    fmts = [k for k in known if k is not False]
    if fmts and all(f is fmts[0] and f is not None for f in fmts):
        return fmts[0]  # type: ignore[return-value]
    return None


Fmt = FloatFormat | None
Known = FloatFormat | bool | None  # False: not a floating array (no say in autocast)


def _eval(ctx: _Ctx, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], scope: str,
          fmts: Sequence[Fmt] | None = None) -> tuple[list[Any], list[Fmt]]:
    """Evaluate ``jaxpr`` on ``args`` (holding ``fmts``) with the recipe's numerics;
    ``scope`` is the name stack the jaxpr is nested in. Returns the outputs and the format
    each holds (None: not known to hold one)."""
    env: dict[Any, Any] = {}
    fmt_of: dict[Any, Fmt] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jcore.Literal) else env[v]

    def known(v: Any) -> Known:
        """The format a floating value holds (None: unknown), False if not floating."""
        val = read(v)
        if not _float(val):
            return False
        if isinstance(v, jcore.Literal) or getattr(val, "ndim", 1) == 0:
            return False  # scalars (constants, step sizes) do not decide autocast
        return fmt_of.get(v)

    roles = _roles(jaxpr, scope)
    for v, c in zip(jaxpr.constvars, consts, strict=True):
        env[v] = c
    for i, (v, a) in enumerate(zip(jaxpr.invars, args, strict=True)):
        env[v] = a
        fmt_of[v] = fmts[i] if fmts is not None else None
    for eqn in jaxpr.eqns:
        here = f"{scope}/{_scope_of(eqn)}" if _scope_of(eqn) else scope
        invals = [read(v) for v in eqn.invars]
        outs, out_fmts = _apply(ctx, eqn, invals, [known(v) for v in eqn.invars], here,
                                roles.get(id(eqn)))
        for v, o, f in zip(eqn.outvars, outs, out_fmts, strict=True):
            env[v] = o
            fmt_of[v] = f
    return [read(v) for v in jaxpr.outvars], [
        None if isinstance(v, jcore.Literal) else fmt_of.get(v) for v in jaxpr.outvars]


def _apply(ctx: _Ctx, eqn: Any, invals: list[Any], known: list[Known], scope: str,
           role: str | None = None) -> tuple[list[Any], list[Fmt]]:
    """One equation (with its :func:`_roles` role): its outputs under the recipe, and the
    format each holds."""
    name = eqn.primitive.name
    phase = "backward" if _backward(scope) else "forward"
    in_fmts: list[Fmt] = [k if isinstance(k, FloatFormat) else None for k in known]
    if name in CALLS or name in LOOPS:
        label = _label(eqn) if name in CALLS else None
        if label in EXACT:
            return _bind(eqn, invals), [None] * len(eqn.outvars)
        if label in FUSED_PASS:
            return _bind(eqn, invals), [_known_all(known)] * len(eqn.outvars)
        if label in FUSED:
            return _fused(ctx, eqn, invals, known, scope, phase, FUSED[label])
        return _nested(ctx, eqn, invals, in_fmts, scope)
    if not any(jnp.issubdtype(v.aval.dtype, jnp.floating) for v in eqn.outvars):
        return _bind(eqn, invals), [None] * len(eqn.outvars)  # nothing to round
    if name in MATMUL:  # a matmul is a matmul in any scope, as in the torch engine
        if role == "biased":  # rounded with its bias, below
            return [_matmul(ctx, eqn, invals, in_fmts, phase, rounded=False)], [None]
        return [_matmul(ctx, eqn, invals, in_fmts, phase)], [ctx.fmts["activations"]]
    outs = _bind(eqn, invals)
    if role == "inside":  # inside one jax.nn function: computed as it is, unrounded
        return outs, [_known_all(known)] * len(outs)
    if role == "result":  # that function's result: rounded once, like compute
        return _compute(ctx, outs, known, _group(ctx, scope), phase)
    if role == "bias":  # a bias add: the matmul's output, rounded as torch's addmm
        return [_round(ctx, outs[0], ctx.fmts["activations"], f"{phase}/matmul")], \
            [ctx.fmts["activations"]]
    if name in PASS or (name in ("reduce_sum", "reduce_prod") and all(
            eqn.invars[0].aval.shape[a] == 1 for a in eqn.params["axes"])):
        # (a sum over axes of one element adds nothing: JAX's transpose of a broadcast
        # makes one, where torch's bias gradient is one sum)
        return outs, [_known_all(known)] * len(outs)
    if name not in COMPUTE:
        raise UnsupportedPrimitive(name, ctx.backend)
    return _compute(ctx, outs, known, _group(ctx, scope), phase)


def _label(eqn: Any) -> str | None:
    """The name of a call: a jit's own, or, for a custom differentiation rule around one
    jitted function (``jax.nn.relu``), that function's."""
    name = eqn.params.get("name")
    if name is not None or not eqn.primitive.name.startswith("custom_"):
        return name  # type: ignore[no-any-return]
    inner, _ = _closed(eqn.params.get("call_jaxpr") or eqn.params.get("fun_jaxpr"))
    if inner is not None and len(inner.eqns) == 1:
        return inner.eqns[0].params.get("name")  # type: ignore[no-any-return]
    return None


def _bind(eqn: Any, invals: list[Any]) -> list[Any]:
    """The equation run natively (as jax.core.eval_jaxpr runs it)."""
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    return list(out) if eqn.primitive.multiple_results else [out]


def _compute(ctx: _Ctx, outs: list[Any], known: list[Known], group: str | None,
             phase: str) -> tuple[list[Any], list[Fmt]]:
    """Outputs of a computing operation, rounded to the activation format (autocast: only
    when every floating input holds it; an fp32 group: never)."""
    if group is not None:
        return outs, [None] * len(outs)
    fmt = _known_all(known) if ctx.recipe.autocast else ctx.fmts["activations"]
    if ctx.recipe.autocast and fmt is not ctx.fmts["activations"]:
        return outs, [None] * len(outs)
    return [_round(ctx, o, fmt, f"{phase}/elementwise") for o in outs], [fmt] * len(outs)


def _fused(ctx: _Ctx, eqn: Any, invals: list[Any], known: list[Known], scope: str,
           phase: str, group: str | None) -> tuple[list[Any], list[Fmt]]:
    """A jax.nn function as one operation: computed natively (its own differentiation
    rules kept), its outputs rounded once, unless its group is kept in fp32."""
    if group is not None and group not in ctx.recipe.fp32_ops:
        group = None
    return _compute(ctx, _bind(eqn, invals), known, group or _group(ctx, scope), phase)


def _operand(ctx: _Ctx, x: Any, holds: Fmt, fmt: FloatFormat, key: str) -> Any:
    """A matmul operand in ``fmt``: itself if it holds ``fmt`` values already, else its
    rounded copy (made once per value and format in a trace)."""
    if ctx.scaling is not None:  # every operand scaled anew, as in the torch engine
        return _scaled_operand(ctx, x, fmt, key, key.split("/")[0])
    if holds is fmt:
        return x
    hit = ctx.copies.get((id(x), fmt.name))
    if hit is not None and hit[0] is x:
        return hit[1]
    y = _round(ctx, x, fmt, key)
    ctx.copies[(id(x), fmt.name)] = (x, y)
    return y


def _roles(jaxpr: Any, scope: str) -> dict[int, str]:
    """What some equations of ``jaxpr`` are part of, by ``id(eqn)`` (valid while the jaxpr
    is being evaluated):

    * ``"biased"`` / ``"bias"``: a ``dot_general`` whose one use adds a bias vector along
      its last axis, and that add: one operation, its output rounded once after the bias,
      as torch's addmm (every nn.Linear) is;
    * ``"inside"`` / ``"result"``: equations JAX inlined from one of jax.nn's functions
      (marked by :func:`_one_op_each`'s scope, forward and backward alike) whose results
      stay inside it (intermediates, and the residuals its backward reads), and those
      whose results leave it: a function is one operation, rounded once where its
      results leave, as torch's ``gelu`` and ``gelu_backward`` are."""
    users: dict[Any, list[Any]] = {}
    producer: dict[Any, Any] = {}
    label: dict[int, str] = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if not isinstance(v, jcore.Literal):
                users.setdefault(v, []).append(eqn)
        for v in eqn.outvars:
            producer[v] = eqn
        names = [t for t in _tokens(f"{scope}/{_scope_of(eqn)}") if t.startswith(_OP_SCOPE)]
        if names and eqn.primitive.name not in MATMUL:
            label[id(eqn)] = names[-1]
    returned = {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}
    roles: dict[int, str] = {}
    for eqn in jaxpr.eqns:
        name = label.get(id(eqn))
        if name is not None:
            stays = all(v not in returned and all(label.get(id(u)) == name
                                                  for u in users.get(v, []))
                        for v in eqn.outvars)
            roles[id(eqn)] = "inside" if stays else "result"
            continue
        if eqn.primitive.name != "dot_general":
            continue
        out = eqn.outvars[0]
        uses = users.get(out, [])
        if out in returned or len(uses) != 1 or uses[0].primitive.name not in ("add",
                                                                              "add_any"):
            continue
        others = [v for v in uses[0].invars if v is not out]
        src = producer.get(others[0]) if len(others) == 1 else None
        if src is not None and src.primitive.name == "broadcast_in_dim" \
                and src.invars[0].aval.ndim == 1 \
                and tuple(src.params["broadcast_dimensions"]) == (out.aval.ndim - 1,):
            roles[id(eqn)], roles[id(uses[0])] = "biased", "bias"
    return roles


def _matmul(ctx: _Ctx, eqn: Any, invals: list[Any], fmts: list[Fmt], phase: str,
            rounded: bool = True) -> Any:
    """A matmul's output (rounded to the activation format unless ``rounded`` is False:
    its bias add rounds it)."""
    fmt = ctx.fmts["matmul_input_backward" if phase == "backward" else "matmul_input"]
    key = f"{phase}/matmul"
    ops = [_operand(ctx, x, fmts[i], fmt, f"{phase}/matmul_input")
           if i < 2 and fmt is not None else x for i, x in enumerate(invals)]
    narrow = ctx.accumulator is not None or ctx.interval is not None
    if fmt is not None and narrow and eqn.primitive.name == "dot_general":
        out = _accumulate(ctx, eqn, ops, phase)
    else:
        out = eqn.primitive.bind(*ops, **eqn.params)
    return _round(ctx, out, ctx.fmts["activations"], key) if rounded else out


def _accumulate(ctx: _Ctx, eqn: Any, ops: list[Any], phase: str) -> Any:
    """dot_general with partial sums in the accumulator format: the contracted dimensions
    (flattened into one, as a matmul unit sees them) summed in groups of
    ``accumulation_interval`` (or 32) products, each group exactly, every running sum
    rounded (as the torch engine's matmuls)."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    a, b = ops[0], ops[1]
    lfree = [d for d in range(a.ndim) if d not in (*lc, *lb)]
    rfree = [d for d in range(b.ndim) if d not in (*rc, *rb)]
    k = math.prod(a.shape[d] for d in lc)
    # batch, free, contracted (one dimension) | batch, contracted (one dimension), free
    a = a.transpose(*lb, *lfree, *lc).reshape(
        *(a.shape[d] for d in (*lb, *lfree)), k)
    b = b.transpose(*rb, *rc, *rfree).reshape(
        *(b.shape[d] for d in rb), k, *(b.shape[d] for d in rfree))
    nb = len(lb)
    dims = (((a.ndim - 1,), (nb,)), (tuple(range(nb)), tuple(range(nb))))
    params = {**eqn.params, "dimension_numbers": dims}
    group = ctx.interval or 32
    acc = None
    for k0 in range(0, k, group):
        k1 = min(k0 + group, k)
        part = eqn.primitive.bind(lax.slice_in_dim(a, k0, k1, axis=a.ndim - 1),
                                  lax.slice_in_dim(b, k0, k1, axis=nb), **params)
        acc = part if acc is None else acc + part
        acc = _round(ctx, acc, ctx.accumulator, f"{phase}/accumulator")
    if acc is None:  # nothing to contract: zeros of the output's shape
        return eqn.primitive.bind(a, b, **params)
    return acc


def _closed(x: Any) -> tuple[Any, list[Any]]:
    """(jaxpr, consts) of a ClosedJaxpr or an open Jaxpr."""
    if hasattr(x, "jaxpr") and hasattr(x, "consts"):
        return x.jaxpr, list(x.consts)
    return x, []


def _nested(ctx: _Ctx, eqn: Any, invals: list[Any], fmts: list[Fmt],
            scope: str) -> tuple[list[Any], list[Fmt]]:
    """A higher-order primitive with its inner jaxprs transformed. A call's outputs keep
    the formats its body gives them; a loop's are not known to hold any (the carry may
    change format from one iteration to the next)."""
    name, params = eqn.primitive.name, eqn.params
    if name in CALLS:
        inner = params.get("jaxpr") or params.get("call_jaxpr") or params.get("fun_jaxpr")
        if inner is None:
            raise UnsupportedPrimitive(name, ctx.backend)
        jaxpr, consts = _closed(inner)
        return _eval(ctx, jaxpr, consts, invals, scope, fmts)
    outs = _loop(ctx, eqn, invals, scope)
    return outs, [None] * len(outs)


def _loop(ctx: _Ctx, eqn: Any, invals: list[Any], scope: str) -> list[Any]:
    """scan, while or cond, re-emitted around transformed bodies."""
    name, params = eqn.primitive.name, eqn.params
    if name == "scan":
        jaxpr, consts = _closed(params["jaxpr"])
        nc, ncarry = params["num_consts"], params["num_carry"]
        cst, carry, xs = invals[:nc], invals[nc:nc + ncarry], invals[nc + ncarry:]

        def step(inner: _Ctx, c: Any, x: Any) -> Any:
            return _eval(inner, jaxpr, consts, [*cst, *c, *x], scope)[0]

        keys = _probe(ctx, step, carry, [v[0] for v in xs])
        counted = _counting(ctx, step, keys)

        def body(c: Any, x: Any) -> tuple[Any, Any]:
            outs, counts = counted(c, x)
            return outs[:ncarry], (outs[ncarry:], counts)

        c, (ys, counts) = lax.scan(body, carry, xs, length=params["length"],
                                   reverse=params["reverse"], unroll=params["unroll"])
        _merge(ctx, keys, counts.sum(axis=0))
        return [*c, *ys]
    if name == "while":
        cj, cc = _closed(params["cond_jaxpr"])
        bj, bc = _closed(params["body_jaxpr"])
        ncond, nbody = params["cond_nconsts"], params["body_nconsts"]
        cconsts, bconsts, init = invals[:ncond], invals[ncond:ncond + nbody], \
            invals[ncond + nbody:]

        def body_of(inner: _Ctx, c: Any) -> Any:
            return _eval(inner, bj, bc, [*bconsts, *c], scope)[0]

        def cond_of(c: Any) -> Any:  # the loop test's own roundings are not counted
            return _eval(ctx.inner(Telemetry()), cj, cc,
                         [*cconsts, *c], scope)[0][0]

        keys = _probe(ctx, body_of, init)
        counted = _counting(ctx, body_of, keys)

        def loop(state: Any) -> Any:
            c, total, n = state
            outs, counts = counted(c)
            return outs, total + counts, n + 1

        zero = jnp.zeros((len(keys), len(COLUMNS)), jnp.int32)
        out, total, _ = lax.while_loop(lambda st: cond_of(st[0]), loop,
                                       (list(init), zero, jnp.int32(0)))
        _merge(ctx, keys, total)
        return list(out)
    # cond: the first operand picks the branch; every branch reports the same counts
    branches = [_closed(b) for b in params["branches"]]
    index, ops = invals[0], invals[1:]

    def branch(j: Any, c: list[Any]) -> Callable[[_Ctx, list[Any]], Any]:
        return lambda inner, o: _eval(inner, j, c, list(o), scope)[0]

    fns = [branch(j, c) for j, c in branches]
    keys = {k: n for f in fns for k, n in _probe(ctx, f, ops).items()}
    results = lax.switch(index, [lambda o, f=f: _counting(ctx, f, keys)(o) for f in fns], ops)
    _merge(ctx, keys, results[1])
    return list(results[0])


def _probe(ctx: _Ctx, fn: Callable[..., Any], *args: Any) -> dict[str, int]:
    """The rounding keys (and elements rounded under each) of ``fn(ctx, *args)``, found by
    tracing it once with a scratch telemetry."""
    scratch = Telemetry()
    jax.make_jaxpr(lambda *a: fn(ctx.inner(scratch), *a))(*args)
    # elements only: the counts themselves are tracers of that throwaway trace
    return {k: sum(r[2] for r in rows if isinstance(r[2], int))
            for k, rows in sorted(scratch.counts.items())}


def _counting(ctx: _Ctx, fn: Callable[..., Any], keys: dict[str, int]
              ) -> Callable[..., tuple[Any, Any]]:
    """``fn(ctx, *args)`` as a function returning ``(outputs, counts)``: the overflow and
    underflow counts of its roundings as an int32 array, one row per key (a loop body's
    counts cannot leave it but as values)."""
    def counted(*args: Any) -> tuple[Any, Any]:
        inner = Telemetry()
        outs = fn(ctx.inner(inner), *args)
        tot = inner.totals()
        rows = [jnp.stack([jnp.asarray(tot[k][c], jnp.int32) for c in COLUMNS])
                if k in tot else jnp.zeros(len(COLUMNS), jnp.int32) for k in keys]
        return outs, jnp.stack(rows) if rows else jnp.zeros((0, len(COLUMNS)), jnp.int32)

    return counted




def _merge(ctx: _Ctx, keys: dict[str, int], counts: Any) -> None:
    """Add a loop's summed counts (one row per key: overflow, underflow, elements) to the
    telemetry."""
    for i, k in enumerate(keys):
        ctx.telemetry.add(k, *(counts[i, j] for j in range(len(COLUMNS))))


def _is_array(v: Any) -> bool:
    return isinstance(v, jax.Array | np.ndarray | np.generic | jax.core.Tracer)


# jax.nn functions that JAX does not jit (so a jaxpr has no name for them), and their
# static arguments: wrapped in a named jit while a function is traced for emulation, so
# that each appears as one operation
_UNNAMED = {"softmax": ("axis",), "logsumexp": ("axis", "keepdims", "return_sign")}


# the name scope that marks a jax.nn function's equations (JAX inlines its jit when
# differentiating, so its own name is gone from the equations it leaves)
_OP_SCOPE = "hwport-op-"


def _scoped(f: Callable[..., Any], name: str) -> Callable[..., Any]:
    @functools.wraps(f)
    def op(*args: Any, **kwargs: Any) -> Any:
        with jax.named_scope(_OP_SCOPE + name):
            return f(*args, **kwargs)

    return op


@contextlib.contextmanager
def _one_op_each() -> Iterator[None]:
    """While tracing: jax.nn's softmax and logsumexp as named jitted functions, and every
    other function of FUSED in a scope that survives differentiation."""
    import jax.nn
    import jax.scipy.special

    saved = [(m, n, getattr(m, n)) for m in (jax.nn, jax.scipy.special) for n in _UNNAMED
             if hasattr(m, n)]
    scoped = [(jax.nn, n, getattr(jax.nn, n)) for n, group in FUSED.items()
              if group is None and n not in FUSED_PASS and hasattr(jax.nn, n)]
    try:
        for m, n, f in saved:
            setattr(m, n, jax.jit(f, static_argnames=_UNNAMED[n]))
        for m, n, f in scoped:
            setattr(m, n, _scoped(f, n))
        yield
    finally:
        for m, n, f in saved + scoped:
            setattr(m, n, f)


class Emulated:
    """``fn`` with a backend's numerics (see the module docstring). Call it like ``fn``;
    :meth:`with_telemetry` also returns the overflow and underflow counts."""

    def __init__(self, fn: Callable[..., Any], lowered: Lowered) -> None:
        self.fn = fn
        self.lowered = lowered
        spec, recipe = lowered.backend, lowered.recipe
        self.formats: dict[str, FloatFormat | None] = {
            "matmul_input": compute_format(spec, recipe.matmul_input),
            "matmul_input_backward": compute_format(spec, recipe.backward_input),
            "activations": compute_format(spec, recipe.activations)}
        self.accumulator = compute_format(
            spec, spec.precision.accumulators.get(recipe.matmul_input, "fp32"))
        self.interval = spec.precision.accumulation_interval

    @property
    def notes(self) -> list[str]:
        """What lowering the recipe onto the backend changed (as every engine reports)."""
        return list(self.lowered.notes)

    def with_telemetry(self, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        """``(fn's outputs, {rounding key: overflow, underflow, elements, roundings})``.
        Array arguments are traced; any other argument (a flag, a size) is passed as is.
        Under per-tensor FP8 scaling each operand is scaled by its own amax (current
        scaling: a call has no history; see :meth:`with_scaling`)."""
        result, totals, _ = self._run(args, kwargs, None)
        return result, totals

    def with_scaling(self, delayed: Any, *args: Any, **kwargs: Any
                     ) -> tuple[Any, dict[str, Any], Any]:
        """:meth:`with_telemetry` with per-tensor FP8 scaling from histories:
        ``delayed[i]`` is the amax of scaling site i's history (:meth:`sites`; negative:
        none yet, the operand's own amax serves; empty: no histories at all); also returns
        each site's own amax this call (f32[sites]), for the caller's histories."""
        delayed = jnp.asarray(delayed, jnp.float32)
        result, totals, sc = self._run(args, kwargs, delayed)
        n = len(sc.sites) if sc is not None else 0
        if delayed.shape[0] not in (0, n):
            raise HwportError(f"hwport.jax: {delayed.shape[0]} delayed amax values for "
                              f"{n} per-tensor scaling sites (Emulated.sites lists them)")
        amax = jnp.stack(sc.amax) if sc is not None and sc.amax else jnp.zeros(0, jnp.float32)
        return result, totals, amax

    def sites(self, *args: Any, **kwargs: Any) -> list[tuple[str, int]]:
        """The per-tensor scaled matmul operands of ``fn(*args)``, as (phase, index) in the
        order the program scales them (empty without per-tensor FP8 scaling); traces once,
        compiles nothing."""
        if self.lowered.recipe.fp8_scaling is None:
            return []
        found: list[tuple[str, int]] = []

        def trace(*a: Any, **k: Any) -> Any:
            result, _, sc = self._run(a, k, None)
            found.extend(sc.sites if sc is not None else [])
            return result

        jax.eval_shape(trace, *args, **kwargs)
        return found

    def _run(self, args: tuple[Any, ...], kwargs: dict[str, Any], delayed: Any
             ) -> tuple[Any, dict[str, Any], _Scaling | None]:
        leaves, tree = jax.tree_util.tree_flatten((args, kwargs))
        traced = [i for i, v in enumerate(leaves) if _is_array(v)]
        telemetry = Telemetry()
        policy = self.lowered.recipe.fp8_scaling
        scaling = _Scaling(policy, delayed) if policy is not None else None
        ctx = _Ctx(self.lowered, telemetry, self.formats, self.accumulator, self.interval,
                   scaling=scaling)

        def run(*arrays: Any) -> Any:
            full = list(leaves)
            for i, v in zip(traced, arrays, strict=True):
                full[i] = v
            a, k = jax.tree_util.tree_unflatten(tree, full)
            with _one_op_each():
                return self.fn(*a, **k)

        closed, shape = jax.make_jaxpr(run, return_shape=True)(*(leaves[i] for i in traced))
        outs, _ = _eval(ctx, closed.jaxpr, closed.consts, [leaves[i] for i in traced], "")
        result = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shape), outs)
        return result, telemetry.totals(), scaling

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.with_telemetry(*args, **kwargs)[0]


def emulate(fn: Callable[..., Any], backend: str | BackendSpec,
            recipe: str | Recipe = "amp-bf16") -> Emulated:
    """``fn`` computed with ``backend``'s numerics under ``recipe`` (lowered onto it, with
    the same notes as the torch engine's). The result traces ``fn`` anew for each set of
    argument shapes, so wrap it in ``jax.jit`` for speed."""
    spec = backend if isinstance(backend, BackendSpec) else plugins.get_backend(backend)
    rec = recipe if isinstance(recipe, Recipe) else plugins.registry().recipe(recipe)
    return Emulated(fn, lower(rec, spec))
