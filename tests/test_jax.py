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
    # loop bodies report their counts through the loop: as many roundings as unrolled
    _, nested_t = jax.jit(emulate(nested, "dojo", "pure-bf16").with_telemetry)(x)
    _, flat_t = emulate(flat, "dojo", "pure-bf16").with_telemetry(x)
    assert int(nested_t["forward/elementwise"]["elements"]) == \
        int(flat_t["forward/elementwise"]["elements"]) - 64  # where() rounds both branches


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
