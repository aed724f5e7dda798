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

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from hwport import plugins
from hwport.errors import HwportError
from hwport.formats import FloatFormat
from hwport.recipes import Lowered, Recipe, compute_format, lower
from hwport.rounding import KernelParams, Rounding, _JaxOps, _kernel, kernel_params
from hwport.spec import BackendSpec

__all__ = ["Emulated", "UnsupportedPrimitive", "emulate"]

MATMUL = {"dot_general", "conv_general_dilated"}
# values unchanged (or a choice among the inputs' values): the output keeps their format
PASS = {
    "reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "slice",
    "dynamic_slice", "dynamic_update_slice", "concatenate", "gather", "select_n", "rev",
    "pad", "copy", "copy_p", "convert_element_type", "reduce_max", "reduce_min", "max",
    "min", "neg", "abs", "stop_gradient", "sort", "clamp", "real", "imag",
    "optimization_barrier", "device_put", "sharding_constraint", "split", "reduce_precision",
    "cummax", "cummin", "sign", "floor", "ceil", "round", "select_and_gather_add",
}
# floating-point results that the backend computes and stores in its activation format
COMPUTE = {
    "add", "add_any", "sub", "mul", "div", "rem", "pow", "integer_pow", "square", "sqrt",
    "rsqrt", "cbrt", "exp", "exp2", "expm1", "log", "log1p", "logistic", "tanh", "sinh",
    "cosh", "sin", "cos", "tan", "asin", "acos", "atan", "atan2", "asinh", "acosh", "atanh",
    "erf", "erfc", "erf_inv", "lgamma", "digamma", "reduce_sum", "reduce_prod", "cumsum",
    "cumprod", "cumlogsumexp", "scatter-add", "scatter_add", "scatter", "scatter-mul",
    "scatter_mul", "select_and_scatter_add", "reduce_and", "reduce_or", "argmax", "argmin",
    "nextafter", "is_finite", "igamma", "random_gamma_grad",
}
# higher-order primitives: their inner jaxprs are transformed
CALLS = {"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
         "custom_vjp_call_jaxpr", "checkpoint", "remat", "remat2", "custom_lin"}
LOOPS = {"scan", "while", "cond"}
# jax.nn functions (jitted under these names) that belong to an fp32 group
NAMED_GROUPS = {"softmax": "softmax", "log_softmax": "softmax", "_softmax": "softmax",
                "logsumexp": "softmax", "layer_norm": "normalization",
                "standardize": "normalization"}


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
def _rounder(p: KernelParams) -> Callable[[Any], Any]:
    """Round a float32/float64 array as ``p`` says; the tangent passes straight through."""
    ops = _JaxOps(p.width)
    ftype = jnp.float32 if p.width == 32 else jnp.float64

    @jax.custom_jvp
    def rnd(x: Any) -> Any:
        src = x.astype(ftype)
        bits = lax.bitcast_convert_type(src, ops.itype)
        idx = lax.iota(jnp.int32, src.size).reshape(src.shape)
        return lax.bitcast_convert_type(_kernel(ops, bits, idx, p), ftype).astype(x.dtype)

    @rnd.defjvp
    def _jvp(primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> tuple[Any, Any]:
        return rnd(primals[0]), tangents[0]

    return rnd  # type: ignore[no-any-return]


@dataclass
class Telemetry:
    """Overflow and underflow counts per rounding key (``phase/op class``), as traced
    values (sum them with :meth:`totals` inside or outside ``jit``)."""

    counts: dict[str, list[tuple[Any, Any, int]]] = field(default_factory=dict)

    def add(self, key: str, overflow: Any, underflow: Any, elements: int) -> None:
        self.counts.setdefault(key, []).append((overflow, underflow, elements))

    def totals(self) -> dict[str, dict[str, Any]]:
        """{key: {"overflow", "underflow", "elements", "roundings"}}, the torch engine's
        telemetry layout (``rounding`` in a run's JSON)."""
        return {k: {"overflow": sum(v[0] for v in rows), "underflow": sum(v[1] for v in rows),
                    "elements": sum(v[2] for v in rows), "roundings": len(rows)}
                for k, rows in sorted(self.counts.items())}


@dataclass
class _Ctx:
    lowered: Lowered
    telemetry: Telemetry
    fmts: dict[str, FloatFormat | None]
    accumulator: FloatFormat | None
    interval: int

    @property
    def recipe(self) -> Recipe:
        return self.lowered.recipe

    @property
    def backend(self) -> str:
        return self.lowered.backend.name


def _round(ctx: _Ctx, x: Any, fmt: FloatFormat | None, key: str) -> Any:
    """``x`` rounded into ``fmt`` (nearest), with its overflow and underflow counted."""
    if fmt is None or not _float(x) or x.size == 0:
        return x
    width = 64 if x.dtype == jnp.float64 else 32
    p = kernel_params(fmt, width, Rounding.NEAREST, None, None, 23)
    y = _rounder(p)(x)
    xs, ys = lax.stop_gradient(x), lax.stop_gradient(y)
    finite = jnp.isfinite(xs)
    overflow = jnp.sum(finite & ((~jnp.isfinite(ys)) | (jnp.abs(xs) > fmt.max)))
    underflow = jnp.sum((xs != 0) & (ys == 0))
    ctx.telemetry.add(key, overflow, underflow, int(x.size))
    return y


def _scope_of(eqn: Any) -> str:
    return str(eqn.source_info.name_stack)


def _group(ctx: _Ctx, scope: str) -> str | None:
    """The recipe's fp32 group an equation belongs to, from the names it is nested in."""
    for name in re.split(r"[()/\s]+", scope):
        group = NAMED_GROUPS.get(name, name)
        if group in ctx.recipe.fp32_ops:
            return group
    return None


def _known_all(known: Sequence[FloatFormat | bool | None]) -> FloatFormat | None:
    """The one format every floating input holds, or None."""
    fmts = [k for k in known if k is not False]
    if fmts and all(f is fmts[0] and f is not None for f in fmts):
        return fmts[0]  # type: ignore[return-value]
    return None


def _eval(ctx: _Ctx, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any],
          scope: str) -> list[Any]:
    """Evaluate ``jaxpr`` on ``args`` with the recipe's numerics; ``scope`` is the name
    stack the jaxpr is nested in."""
    env: dict[Any, Any] = {}
    fmt_of: dict[Any, FloatFormat | None] = {}  # what each value is known to hold

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jcore.Literal) else env[v]

    def known(v: Any) -> FloatFormat | bool | None:
        """The format a floating value holds (None: unknown), False if not floating."""
        val = read(v)
        if not _float(val):
            return False
        if isinstance(v, jcore.Literal) or getattr(val, "ndim", 1) == 0:
            return False  # scalars (constants, step sizes) do not decide autocast
        return fmt_of.get(v)

    for v, c in zip(jaxpr.constvars, consts, strict=True):
        env[v] = c
    for v, a in zip(jaxpr.invars, args, strict=True):
        env[v] = a
    for eqn in jaxpr.eqns:
        here = f"{scope}/{_scope_of(eqn)}" if _scope_of(eqn) else scope
        invals = [read(v) for v in eqn.invars]
        outs, fmt = _apply(ctx, eqn, invals, [known(v) for v in eqn.invars], here)
        if not eqn.primitive.multiple_results:
            outs = [outs]
        for v, o in zip(eqn.outvars, outs, strict=True):
            env[v] = o
            fmt_of[v] = fmt
    return [read(v) for v in jaxpr.outvars]


def _apply(ctx: _Ctx, eqn: Any, invals: list[Any], known: list[FloatFormat | bool | None],
           scope: str) -> tuple[Any, FloatFormat | None]:
    """One equation: its outputs under the recipe, and the format they hold."""
    name = eqn.primitive.name
    backward = "transpose" in scope
    phase = "backward" if backward else "forward"
    params = eqn.params
    if name in CALLS or name in LOOPS:
        return _nested(ctx, eqn, invals, scope), None
    out = eqn.primitive.bind(*invals, **params)
    outs = out if eqn.primitive.multiple_results else [out]
    if not any(_float(o) for o in outs):
        return out, None  # integers and booleans: nothing to round
    group = _group(ctx, scope)
    if name in PASS:
        return out, _known_all(known)
    if name in MATMUL:
        if group is not None:
            return out, None
        return _matmul(ctx, eqn, invals, phase), ctx.fmts["activations"]
    if name not in COMPUTE:
        raise UnsupportedPrimitive(name, ctx.backend)
    if group is not None:
        return out, None
    fmt = _known_all(known) if ctx.recipe.autocast else ctx.fmts["activations"]
    if ctx.recipe.autocast and fmt is not ctx.fmts["activations"]:
        return out, None
    key = f"{phase}/elementwise"
    rounded = [_round(ctx, o, fmt, key) for o in outs]
    return (rounded if eqn.primitive.multiple_results else rounded[0]), fmt


def _matmul(ctx: _Ctx, eqn: Any, invals: list[Any], phase: str) -> Any:
    fmt = ctx.fmts["matmul_input_backward" if phase == "backward" else "matmul_input"]
    key = f"{phase}/matmul"
    if ctx.recipe.fp8_scaling is not None and fmt is not None:
        raise HwportError(f"hwport.jax: recipe {ctx.recipe.name!r} asks for per-tensor FP8 "
                          f"scaling on backend {ctx.backend!r}, which the JAX engine does not "
                          "model yet (docs/jax.md)")
    ops = [_round(ctx, x, fmt, f"{phase}/matmul_input") if i < 2 and fmt is not None else x
           for i, x in enumerate(invals)]
    narrow = ctx.accumulator is not None and fmt is not None
    if narrow and eqn.primitive.name == "dot_general":
        out = _accumulate(ctx, eqn, ops, phase)
    else:
        out = eqn.primitive.bind(*ops, **eqn.params)
    return _round(ctx, out, ctx.fmts["activations"], key)


def _accumulate(ctx: _Ctx, eqn: Any, ops: list[Any], phase: str) -> Any:
    """dot_general with partial sums in the accumulator format: the contracted dimension
    summed in groups of ``interval`` products, each group exactly, every running sum
    rounded (as the torch engine's matmuls)."""
    (lc, rc), _ = eqn.params["dimension_numbers"]
    a, b = ops[0], ops[1]
    if len(lc) != 1:  # several contracted dimensions: contract all but one first? no:
        raise HwportError(f"hwport.jax: a narrow accumulator on backend {ctx.backend!r} is "
                          "modelled for dot_general with one contracted dimension; this "
                          f"one contracts {len(lc)}")
    k = a.shape[lc[0]]
    acc = None
    for k0 in range(0, k, ctx.interval):
        k1 = min(k0 + ctx.interval, k)
        part = eqn.primitive.bind(lax.slice_in_dim(a, k0, k1, axis=lc[0]),
                                  lax.slice_in_dim(b, k0, k1, axis=rc[0]), **eqn.params)
        acc = part if acc is None else acc + part
        acc = _round(ctx, acc, ctx.accumulator, f"{phase}/accumulator")
    return acc


def _closed(x: Any) -> tuple[Any, list[Any]]:
    """(jaxpr, consts) of a ClosedJaxpr or an open Jaxpr."""
    if hasattr(x, "jaxpr") and hasattr(x, "consts"):
        return x.jaxpr, list(x.consts)
    return x, []


def _nested(ctx: _Ctx, eqn: Any, invals: list[Any], scope: str) -> list[Any] | Any:
    """A higher-order primitive with its inner jaxprs transformed."""
    name, params = eqn.primitive.name, eqn.params
    if name in CALLS:
        inner = params.get("jaxpr") or params.get("call_jaxpr") or params.get("fun_jaxpr")
        if inner is None:
            raise UnsupportedPrimitive(name, ctx.backend)
        jaxpr, consts = _closed(inner)
        label = params.get("name")
        outs = _eval(ctx, jaxpr, consts, invals, f"{scope}/{label}" if label else scope)
        return outs if eqn.primitive.multiple_results else outs[0]
    if name == "scan":
        jaxpr, consts = _closed(params["jaxpr"])
        nc, ncarry = params["num_consts"], params["num_carry"]
        cst, carry, xs = invals[:nc], invals[nc:nc + ncarry], invals[nc + ncarry:]

        def step(inner: _Ctx, c: Any, x: Any) -> Any:
            return _eval(inner, jaxpr, consts, [*cst, *c, *x], scope)

        keys = _probe(ctx, step, carry, [v[0] for v in xs])
        counted = _counting(ctx, step, keys)

        def body(c: Any, x: Any) -> tuple[Any, Any]:
            outs, counts = counted(c, x)
            return outs[:ncarry], (outs[ncarry:], counts)

        c, (ys, counts) = lax.scan(body, carry, xs, length=params["length"],
                                   reverse=params["reverse"], unroll=params["unroll"])
        _merge(ctx, keys, counts.sum(axis=0), params["length"])
        return [*c, *ys]
    if name == "while":
        cj, cc = _closed(params["cond_jaxpr"])
        bj, bc = _closed(params["body_jaxpr"])
        ncond, nbody = params["cond_nconsts"], params["body_nconsts"]
        cconsts, bconsts, init = invals[:ncond], invals[ncond:ncond + nbody], \
            invals[ncond + nbody:]

        def body_of(inner: _Ctx, c: Any) -> Any:
            return _eval(inner, bj, bc, [*bconsts, *c], scope)

        def cond_of(c: Any) -> Any:  # the loop test's own roundings are not counted
            return _eval(dataclasses.replace(ctx, telemetry=Telemetry()), cj, cc,
                         [*cconsts, *c], scope)[0]

        keys = _probe(ctx, body_of, init)
        counted = _counting(ctx, body_of, keys)

        def loop(state: Any) -> Any:
            c, total, n = state
            outs, counts = counted(c)
            return outs, total + counts, n + 1

        zero = jnp.zeros((len(keys), 2), jnp.int32)
        out, total, n = lax.while_loop(lambda st: cond_of(st[0]), loop,
                                       (list(init), zero, jnp.int32(0)))
        _merge(ctx, keys, total, n)
        return list(out)
    # cond: the first operand picks the branch; every branch reports the same counts
    branches = [_closed(b) for b in params["branches"]]
    index, ops = invals[0], invals[1:]

    def branch(j: Any, c: list[Any]) -> Callable[[_Ctx, list[Any]], Any]:
        return lambda inner, o: _eval(inner, j, c, list(o), scope)

    fns = [branch(j, c) for j, c in branches]
    keys = {k: n for f in fns for k, n in _probe(ctx, f, ops).items()}
    results = lax.switch(index, [lambda o, f=f: _counting(ctx, f, keys)(o) for f in fns], ops)
    _merge(ctx, keys, results[1], 1)
    return list(results[0])


def _probe(ctx: _Ctx, fn: Callable[..., Any], *args: Any) -> dict[str, int]:
    """The rounding keys (and elements rounded under each) of ``fn(ctx, *args)``, found by
    tracing it once with a scratch telemetry."""
    scratch = Telemetry()
    jax.make_jaxpr(lambda *a: fn(dataclasses.replace(ctx, telemetry=scratch), *a))(*args)
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
        outs = fn(dataclasses.replace(ctx, telemetry=inner), *args)
        tot = inner.totals()
        rows = [jnp.stack([jnp.asarray(tot[k]["overflow"], jnp.int32),
                           jnp.asarray(tot[k]["underflow"], jnp.int32)])
                if k in tot else jnp.zeros(2, jnp.int32) for k in keys]
        return outs, jnp.stack(rows) if rows else jnp.zeros((0, 2), jnp.int32)

    return counted


def _merge(ctx: _Ctx, keys: dict[str, int], counts: Any, times: Any) -> None:
    """Add a loop's summed counts (one row per key) to the telemetry."""
    for i, (k, elements) in enumerate(keys.items()):
        ctx.telemetry.add(k, counts[i, 0], counts[i, 1], elements * times)


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
        self.interval = spec.precision.accumulation_interval or 32

    @property
    def notes(self) -> list[str]:
        """What lowering the recipe onto the backend changed (as every engine reports)."""
        return list(self.lowered.notes)

    def with_telemetry(self, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        """``(fn's outputs, {rounding key: overflow, underflow, elements, roundings})``."""
        flat, tree = jax.tree_util.tree_flatten((args, kwargs))
        telemetry = Telemetry()
        ctx = _Ctx(self.lowered, telemetry, self.formats, self.accumulator, self.interval)

        def run(*leaves: Any) -> Any:
            a, k = jax.tree_util.tree_unflatten(tree, leaves)
            return self.fn(*a, **k)

        closed, shape = jax.make_jaxpr(run, return_shape=True)(*flat)
        outs = _eval(ctx, closed.jaxpr, closed.consts, flat, "")
        result = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shape), outs)
        return result, telemetry.totals()

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
