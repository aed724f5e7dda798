"""hwport.jax: a backend's numerics as a jaxpr transformation, checked against oracles."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from test_engine import E8M13, accumulate_oracle

import hwport
from hwport.jax import UnsupportedPrimitive, emulate
from hwport.recipes import builtin

RNG = np.random.default_rng(0)


def grid(shape: tuple[int, ...], bits: int = 3) -> np.ndarray:
    """Values with ``bits`` significant bits in [1/8, 8) and random signs: products and
    short sums are exact in fp32, so the only rounding is the emulated one."""
    mant = RNG.integers(1 << (bits - 1), 1 << bits, shape) / (1 << (bits - 1))
    exp = RNG.integers(-3, 3, shape)
    sign = RNG.choice([-1.0, 1.0], shape)
    return (sign * mant * 2.0**exp).astype(np.float32)


def bf16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def test_rounding_bits_match_ml_dtypes_and_torch_under_jit() -> None:
    x = np.concatenate([RNG.standard_normal(1 << 14).astype(np.float32) * 3,
                        (RNG.standard_normal(1 << 10) * 1e-6).astype(np.float32),
                        np.array([0.0, -0.0, np.inf, -np.inf, 1e30, -1e30], np.float32)])
    for fmt, dtype, tdtype in (("bf16", ml_dtypes.bfloat16, torch.bfloat16),
                               ("fp16", np.float16, torch.float16),
                               ("e5m2", ml_dtypes.float8_e5m2, torch.float8_e5m2)):
        got = np.asarray(jax.jit(emulate(lambda v: v * 1.0, "simgpu", dataclasses.replace(
            builtin("fp32"), name="t", activations=fmt)))(jnp.asarray(x)))
        with np.errstate(over="ignore"):  # 1e30 overflows fp16 and e5m2: that is the test
            want = x.astype(dtype).astype(np.float32)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), fmt
        via_torch = torch.from_numpy(x).to(tdtype).float().numpy()
        assert np.array_equal(got.view(np.uint32), via_torch.view(np.uint32)), fmt


def test_matmul_operands_and_output_rounded_as_bf16_autocast() -> None:
    a, b = RNG.standard_normal((16, 24)).astype(np.float32), grid((24, 8))

    def f(a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.tanh(a @ b) * 3.0

    got = np.asarray(jax.jit(emulate(f, "simgpu", "amp-bf16"))(a, b))
    mm = bf16(bf16(a).astype(np.float64) @ bf16(b).astype(np.float64))  # exact, then bf16
    want = bf16(bf16(np.tanh(mm)) * 3.0)  # tanh of bf16 values: bf16 (autocast), and the mul
    # tanh is XLA's, not numpy's: allow its own last-ulp differences, nothing more
    ulps = np.abs(got.view(np.int32) - want.view(np.int32)) >> 16
    assert ulps.max() <= 1 and (ulps == 0).mean() > 0.95
    assert not np.array_equal(got, np.asarray(f(a, b)))


def test_a_bias_is_added_before_the_matmul_output_is_rounded() -> None:
    """x @ W.T + b is one operation, as torch's addmm (nn.Linear) is: its output rounded
    once, after the bias; an add of anything else (a residual) is an operation of its own."""
    x, w = grid((8, 3, 16)), grid((4, 16))
    b, r = RNG.standard_normal(4).astype(np.float32), RNG.standard_normal(
        (8, 3, 4)).astype(np.float32)
    exact = x.astype(np.float64) @ w.T.astype(np.float64)  # bf16 operands: x, w are grids
    linear = emulate(lambda x, w, b: x @ w.T + b, "dojo", "pure-bf16")
    got, telemetry = jax.jit(linear.with_telemetry)(x, w, b)
    assert np.array_equal(np.asarray(got), bf16(exact + b))
    assert set(telemetry) == {"forward/matmul", "forward/matmul_input"}
    assert int(telemetry["forward/matmul"]["roundings"]) == 1
    residual = emulate(lambda x, w, r: x @ w.T + r, "dojo", "pure-bf16")
    got, telemetry = jax.jit(residual.with_telemetry)(x, w, r)
    assert np.array_equal(np.asarray(got), bf16(bf16(exact) + r))  # two roundings
    assert int(telemetry["forward/elementwise"]["roundings"]) == 1


def test_a_differentiated_gelu_is_one_operation_as_in_torch() -> None:
    """Linear, GELU, Linear and a mean squared error, differentiated under bf16 autocast:
    the JAX engine rounds what the torch engine rounds (gelu and gelu_backward one op
    each, each bias inside its matmul, the loss in fp32), so every rounding key counts the
    same elements in both engines."""
    from hwport import plugins, recipes
    from hwport.engine import Emulator
    from hwport.pipelines.jaxnets import mse

    x, y = RNG.standard_normal((32, 16)).astype(np.float32), grid((32, 4))
    w1, w2 = grid((8, 16)), grid((4, 8))
    b1, b2 = (RNG.standard_normal(n).astype(np.float32) for n in (8, 4))

    def loss(w1: jax.Array, b1: jax.Array, w2: jax.Array, b2: jax.Array) -> jax.Array:
        h = jax.nn.gelu(x @ w1.T + b1, approximate=False)
        return mse(h @ w2.T + b2, y)

    _, telemetry = jax.jit(emulate(jax.grad(loss, (0, 1, 2, 3)), "simgpu",
                                   "amp-bf16").with_telemetry)(w1, b1, w2, b2)
    layers = [torch.nn.Linear(16, 8), torch.nn.Linear(8, 4)]
    with torch.no_grad():
        for layer, w, b in zip(layers, (w1, w2), (b1, b2), strict=True):
            layer.weight.copy_(torch.from_numpy(w))
            layer.bias.copy_(torch.from_numpy(b))
    em = Emulator(recipes.lower(plugins.registry().recipe("amp-bf16"),
                                plugins.get_backend("simgpu")), capture=False)
    with em.active():
        with em.phase_("forward"):
            h = torch.nn.functional.gelu(layers[0](torch.from_numpy(x)))
            out = torch.nn.functional.mse_loss(layers[1](h), torch.from_numpy(y))
        with em.phase_("backward"):
            out.backward()
    want = {k: c.elements for k, c in em.telemetry.rounding.items() if c.elements}
    assert {k: int(v["elements"]) for k, v in telemetry.items()} == want
    assert want["backward/elementwise"] == 32 * 8 + 8  # gelu_backward, the bias's gradient


def test_packed_counts_keep_a_layout_per_shape() -> None:
    """A packed program traced for two shapes unpacks each call with its own layout (a
    narrow accumulator rounds once per 32 products: two K, two counts of roundings)."""
    from hwport.jax import Packed

    f = Packed(emulate(lambda a, b: a @ b, "simgpu", "fp8-hybrid").with_telemetry)
    small, large = (grid((4, 64)), grid((64, 2))), (grid((4, 128)), grid((128, 2)))
    for a, b in (small, large, small):
        _, totals = f(a, b)
        assert totals["forward/accumulator"]["roundings"] == a.shape[1] // 32
        assert totals["forward/accumulator"]["elements"] == 8 * a.shape[1] // 32


def test_narrow_accumulator_matches_grouped_oracle() -> None:
    """simgpu FP8 matmuls accumulate in e8m13: the crafted element of the torch engine's
    test loses its tiny products; every element matches the grouped oracle."""
    recipe = dataclasses.replace(builtin("fp8-hybrid"), fp8_scaling=None, activations="fp32")
    a = np.asarray(hwport.quantize(RNG.random((4, 1024)).astype(np.float32) * 3.5 + 0.5,
                                   "e4m3fn")) * RNG.choice([-1.0, 1.0], (4, 1024))
    b = np.asarray(hwport.quantize(RNG.random((1024, 5)).astype(np.float32) * 3.5 + 0.5,
                                   "e4m3fn")) * RNG.choice([-1.0, 1.0], (1024, 5))
    a, b = a.astype(np.float32), b.astype(np.float32)
    a[0], a[0, 0], b[:, 0], b[0, 0] = 2.0**-9, 448.0, 2.0**-9, 1.0
    em = emulate(lambda x, y: x @ y, "simgpu", recipe)
    assert em.accumulator == E8M13
    got, telemetry = jax.jit(em.with_telemetry)(a, b)
    want = accumulate_oracle(a.astype(np.float64), b.astype(np.float64), E8M13)
    assert np.array_equal(np.asarray(got, np.float64), want)
    assert float(got[0, 0]) == 448.0 and telemetry["forward/accumulator"]["roundings"] == 32


def test_fp32_accumulator_is_one_matmul_with_one_rounding_per_operand() -> None:
    """simgpu keeps bf16 products in fp32 with no promotion interval: the matmul is one
    dot of the rounded operands, not split over K (as the torch engine); backward uses
    forward's rounded copy of x instead of rounding it again."""
    x = RNG.standard_normal((8, 512)).astype(np.float32)
    w = RNG.standard_normal((512, 16)).astype(np.float32)
    em = emulate(lambda a, b: jnp.dot(a, b), "simgpu", dataclasses.replace(
        builtin("amp-bf16"), autocast=False, activations="fp32"))
    eqns = jax.make_jaxpr(em)(x, w).jaxpr.eqns
    assert [e.primitive.name for e in eqns].count("dot_general") == 1
    exact = bf16(x).astype(np.float64) @ bf16(w).astype(np.float64)  # products are exact
    err = np.abs(np.asarray(jax.jit(em)(x, w), np.float64) - exact)
    assert err.max() <= 512 * 2.0**-24 * (np.abs(bf16(x)) @ np.abs(bf16(w))).max()

    def loss_and_grad(w: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        value, vjp = jax.vjp(lambda q: jnp.sum(jnp.tanh(x @ q)), w)
        return value, vjp(jnp.float32(1.0))[0]

    _, telemetry = jax.jit(emulate(loss_and_grad, "simgpu", "amp-bf16").with_telemetry)(w, x)
    assert telemetry["forward/matmul_input"]["roundings"] == 2  # x and w
    assert telemetry["backward/matmul_input"]["roundings"] == 1  # the cotangent only


def test_nested_jaxprs_are_emulated_like_straight_line_code() -> None:
    x = RNG.standard_normal((8, 8)).astype(np.float32)

    @jax.custom_vjp
    def twice(v: jax.Array) -> jax.Array:
        return v * 2.0 + 0.1

    twice.defvjp(lambda v: (twice(v), None), lambda _, g: (g * 2.0,))

    def nested(v: jax.Array) -> jax.Array:
        v = jax.jit(lambda u: jnp.sin(u) * 1.1)(v)
        v = lax_scan(v)
        v = jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] * 0.9 + 0.01),
                               (0, v))[1]
        v = jax.lax.cond(v.sum() > 0, lambda u: jnp.exp(u * 0.1), lambda u: u / 3.0, v)
        return twice(jax.nn.relu(v))  # relu is a custom_jvp function

    def lax_scan(v: jax.Array) -> jax.Array:
        return jax.lax.scan(lambda c, _: (jnp.tanh(c) * 1.3, None), v, length=4)[0]

    def flat(v: jax.Array) -> jax.Array:
        v = jnp.sin(v) * 1.1
        for _ in range(4):
            v = jnp.tanh(v) * 1.3
        for _ in range(3):
            v = v * 0.9 + 0.01
        v = jnp.where(v.sum() > 0, jnp.exp(v * 0.1), v / 3.0)  # both rounded, one kept
        return jnp.maximum(v, 0.0) * 2.0 + 0.1

    got = np.asarray(jax.jit(emulate(nested, "dojo", "pure-bf16"))(x))
    want = np.asarray(jax.jit(emulate(flat, "dojo", "pure-bf16"))(x))
    assert np.array_equal(got, want)  # (every op rounded: no fusion can tell them apart)
    assert np.array_equal(bf16(got), got)
    # autocast without a matmul stays in fp32: the loops run exactly as natively
    amp = np.asarray(jax.jit(emulate(nested, "simgpu", "amp-fp16"))(x))
    assert np.array_equal(amp, np.asarray(jax.jit(nested)(x)))
    # loop bodies report their counts through the loop: 2 roundings of 64 elements per
    # iteration, 4 iterations of the scan and 3 of the while loop; the cond's taken branch
    def loops(v: jax.Array) -> jax.Array:
        v = jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] * 0.9 + 0.01),
                               (0, lax_scan(v)))[1]
        return jax.lax.cond(v[0, 0] > 100, lambda u: jnp.exp(u * 0.1), lambda u: u / 3.0, v)

    _, t = jax.jit(emulate(loops, "dojo", "pure-bf16").with_telemetry)(x)
    assert int(t["forward/elementwise"]["elements"]) == (4 * 2 + 3 * 2 + 1) * 64


def test_grad_of_an_emulated_function_and_an_emulated_gradient() -> None:
    x = grid((32,))
    em = emulate(lambda v: jnp.sum(v * v), "dojo", "pure-bf16")
    assert np.array_equal(np.asarray(jax.jit(jax.grad(em))(x)), 2 * x)  # straight through
    w, v = RNG.standard_normal((16, 8)).astype(np.float32), grid((4, 16))
    recipe = dataclasses.replace(builtin("fp8-hybrid"), fp8_scaling=None)

    def loss(w: jax.Array, v: jax.Array) -> jax.Array:
        return jnp.mean(jnp.tanh(v @ w) ** 2)

    grads, telemetry = jax.jit(emulate(jax.grad(loss), "simgpu", recipe).with_telemetry)(w, v)
    assert {"forward/matmul_input", "backward/matmul_input"} <= set(telemetry)
    assert np.isfinite(np.asarray(grads)).all()
    assert not np.array_equal(np.asarray(grads), np.asarray(jax.grad(loss)(w, v)))


def test_fp32_groups_and_autocast() -> None:
    x = RNG.standard_normal((4, 32)).astype(np.float32)

    def f(v: jax.Array) -> jax.Array:
        with jax.named_scope("normalization"):
            n = (v - v.mean()) / jnp.sqrt(v.var() + 1e-5)
        return jax.nn.softmax(n * 2.0)

    got = np.asarray(jax.jit(emulate(f, "dojo", "pure-bf16"))(x))  # fp32_ops=(): all bf16
    amp = np.asarray(jax.jit(emulate(f, "dojo", "amp-bf16"))(x))  # norm, softmax: fp32
    assert not np.array_equal(got, amp)
    assert np.array_equal(bf16(got), got)
    # amp: the ops between run in their inputs' precision: fp32 in, fp32 out
    assert np.array_equal(amp, np.asarray(jax.jit(f)(x)))


def test_unsupported_primitive_is_named_with_the_backend() -> None:
    spd = np.eye(4, dtype=np.float32) * 2.0
    with pytest.raises(UnsupportedPrimitive, match=r"primitive 'cholesky' is not supported "
                                                   r"on backend 'dojo'"):
        emulate(jnp.linalg.cholesky, "dojo", "amp-bf16")(spd)


def test_same_inputs_same_bits() -> None:
    x = RNG.standard_normal((64, 64)).astype(np.float32)
    em = jax.jit(emulate(lambda v: jnp.tanh(v @ v) @ v, "dataflow", "pure-bf16"))
    assert np.array_equal(np.asarray(em(x)), np.asarray(em(x)))


def holds_bf16(x: jax.Array) -> bool:
    v = np.asarray(x)
    return bool(np.array_equal(bf16(v), v))


def test_autocast_follows_values_through_calls_and_jax_nn() -> None:
    """Under amp-bf16 what follows a matmul is bf16, through jitted functions and jax.nn's
    (one operation each, as aten's are); softmax, an fp32 group, is not rounded."""
    x, w = RNG.standard_normal((8, 32)).astype(np.float32), grid((32, 16))
    for f in (lambda x, w: jax.nn.relu(x @ w) * 3.0, lambda x, w: jax.nn.silu(x @ w),
              lambda x, w: jax.jit(lambda a, b: a @ b)(x, w) * 3.0,
              lambda x, w: jax.nn.gelu(x @ w) + 1.0):
        out = jax.jit(emulate(f, "simgpu", "amp-bf16"))(x, w)
        assert holds_bf16(out) and not np.array_equal(np.asarray(out), np.asarray(f(x, w)))
    mm = jax.jit(emulate(lambda x, w: x @ w, "simgpu", "amp-bf16"))(x, w)
    sm = jax.jit(emulate(lambda x, w: jax.nn.softmax(x @ w), "simgpu", "amp-bf16"))(x, w)
    assert np.array_equal(np.asarray(sm), np.asarray(jax.jit(jax.nn.softmax)(mm)))
    assert not holds_bf16(sm)
    # jax.nn's functions keep their own differentiation rules: relu'(0) is 0
    g = jax.grad(emulate(lambda v: jnp.sum(jax.nn.relu(v)), "dojo", "pure-bf16"))(
        jnp.zeros(4))
    assert np.array_equal(np.asarray(g), np.zeros(4))


def test_a_jitted_model_named_loss_is_not_the_loss_group() -> None:
    x, w = RNG.standard_normal((8, 32)).astype(np.float32), grid((32, 16))

    @jax.jit
    def loss(x: jax.Array, w: jax.Array) -> jax.Array:
        return jnp.mean(jnp.tanh(x @ w))

    _, t = emulate(loss, "dojo", "amp-bf16").with_telemetry(x, w)
    assert {"forward/matmul_input", "forward/matmul", "forward/elementwise"} <= set(t)


def test_accumulator_over_several_contracted_dimensions() -> None:
    """A 3-D layer's weight gradient contracts batch and sequence: flattened into one K,
    summed in groups of 32 in e8m13, as the oracle does with the same K order."""
    recipe = dataclasses.replace(builtin("fp8-hybrid"), fp8_scaling=None, activations="fp32",
                                 matmul_input_backward="e4m3fn")
    a = np.asarray(hwport.quantize(grid((4, 24, 8)), "e4m3fn"))
    g = np.asarray(hwport.quantize(grid((4, 24, 5)), "e4m3fn"))
    got = jax.jit(emulate(lambda a, g: jnp.einsum("bsk,bsn->kn", a, g), "simgpu", recipe))(a, g)
    want = accumulate_oracle(a.reshape(96, 8).T.astype(np.float64),
                             g.reshape(96, 5).astype(np.float64), E8M13)
    assert np.array_equal(np.asarray(got, np.float64), want)

    def layer(w: jax.Array, x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.tanh(x @ w))

    w = grid((8, 5))
    grads, t = jax.jit(emulate(jax.grad(layer), "simgpu", recipe).with_telemetry)(w, a)
    assert grads.shape == w.shape and "backward/accumulator" in t


def test_checkpointed_gradients_equal_plain_ones() -> None:
    """Recomputed forward values of jax.checkpoint are forward values, not backward."""
    recipe = dataclasses.replace(builtin("fp8-hybrid"), fp8_scaling=None)
    w, x = RNG.standard_normal((16, 8)).astype(np.float32), grid((4, 16))

    def f(w: jax.Array, x: jax.Array) -> jax.Array:
        return jnp.mean(jnp.tanh(x @ w) ** 2)

    plain = jax.jit(emulate(jax.grad(f), "simgpu", recipe))(w, x)
    remat = jax.jit(emulate(jax.grad(jax.checkpoint(f)), "simgpu", recipe))(w, x)
    assert np.array_equal(np.asarray(plain), np.asarray(remat))


def test_random_draws_are_exact_and_flags_stay_python() -> None:
    key = jax.random.key(0)

    def f(v: jax.Array, key: jax.Array, train: bool) -> jax.Array:
        if train:  # a Python flag, not a traced value
            keep = jax.random.bernoulli(key, 0.5, v.shape)
            return jnp.where(keep, v / 0.5, 0.0), jax.random.uniform(key, (1000,))
        return v, jnp.zeros(1000)

    v = RNG.standard_normal((64,)).astype(np.float32)
    (dropped, u), _ = emulate(f, "dojo", "pure-bf16").with_telemetry(v, key, train=True)
    native_u = jax.random.uniform(key, (1000,))
    assert np.array_equal(np.asarray(u), np.asarray(native_u))  # not rounded to bf16
    assert holds_bf16(dropped) and 0 < int((np.asarray(dropped) == 0).sum()) < 64
