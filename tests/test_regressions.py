"""Regressions found by review: each test pins a behaviour that once was wrong."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hwport
from hwport.engine import Emulator
from hwport.errors import FormatError
from hwport.formats import FloatFormat
from hwport.plugins import Registry
from hwport.recipes import builtin, lower
from hwport.rounding import round_scalar


def in_bf16(t: torch.Tensor) -> bool:
    return bool(torch.equal(t, t.to(torch.bfloat16).float()))


def operands_of_mm(em: Emulator, fn: Any) -> list[torch.Tensor]:
    """The operands the matmul really receives when ``fn`` runs under ``em``: what
    ``em.rounded`` hands it (a tensor taken as already rounded is handed over as is)."""
    seen: list[torch.Tensor] = []
    rounded = em.rounded

    def spy(t: torch.Tensor, fmt: Any, key: str) -> torch.Tensor:
        out = rounded(t, fmt, key)
        seen.append(out)
        return out

    em.rounded = spy  # type: ignore[method-assign]
    with em.active(), em.phase_("forward"), torch.no_grad():
        fn()
    return seen


@pytest.mark.parametrize("make", [
    lambda x: torch.full_like(x, 0.1),
    lambda x: x.clamp(min=0.1),
    lambda x: x.masked_fill(x > 0, 0.1),
    lambda x: F.pad(x, (0, 1), value=0.1)[:, :4],
    lambda x: torch.slice_scatter(x, torch.full((4, 2), 0.1), dim=1, start=0, end=2),
    lambda x: torch.add(x, 0.1, out=torch.empty_like(x)),
], ids=["full_like", "clamp", "masked_fill", "pad", "slice_scatter", "add.out"])
def test_ops_writing_new_values_are_never_taken_as_rounded(make: Any) -> None:
    em = Emulator(lower(builtin("pure-bf16"), hwport.get_backend("simgpu")))
    x = torch.randn(4, 4)
    w = torch.randn(4, 4)

    def fn() -> None:
        xb = x * 1.0  # a compute op: rounded to bf16, known as bf16
        _ = make(xb) @ w

    for operand in operands_of_mm(em, fn):
        assert in_bf16(operand)


def test_foreach_inplace_ops_are_rounded() -> None:
    em = Emulator(lower(builtin("pure-bf16"), hwport.get_backend("simgpu")))
    a, b = torch.randn(8), torch.randn(8)
    with em.active(), em.phase_("forward"), torch.no_grad():
        torch._foreach_add_([a, b], 0.1)
    assert in_bf16(a) and in_bf16(b)


def test_spec_flush_to_zero_and_random_bits_take_effect() -> None:
    sim = hwport.get_backend("dataflow")
    ftz = dataclasses.replace(sim, name="dataflow_ftz", precision=dataclasses.replace(
        sim.precision, flush_to_zero=True))
    em = Emulator(lower(builtin("pure-bf16"), ftz))
    x = torch.tensor([1e-39, 1.0])  # 1e-39 is a bf16 subnormal
    em.round_(x, em.acts, "t")
    assert x.tolist() == [0.0, 1.0]
    one_bit = dataclasses.replace(sim, name="dataflow_1bit", precision=dataclasses.replace(
        sim.precision, stochastic_rounding_bits=1))
    em = Emulator(lower(builtin("pure-bf16"), one_bit))
    assert em.rbits == 1
    y = torch.full((10000,), 1 + 2.0**-9)  # a quarter ulp above 1: one random bit never
    em.round_(y, em.weights, "t", hwport.Rounding.STOCHASTIC)  # rounds it up
    assert (y == 1.0).all()


def test_format_fields_are_type_checked() -> None:
    with pytest.raises(FormatError, match="subnormals='false'"):
        FloatFormat("x8", 4, 3, 7, subnormals="false")  # type: ignore[arg-type]
    with pytest.raises(FormatError, match="exponent_bits='4'"):
        FloatFormat("x8", "4", 3, 7)  # type: ignore[arg-type]
    with pytest.raises(FormatError, match="no normal values"):
        FloatFormat("e1", 1, 3, 0, subnormals=False)


def test_no_mantissa_bias_subnormals_round_like_their_definition() -> None:
    fmt = FloatFormat("e3m0b", 3, 0, 3, subnormal_exponent="bias")
    x = np.array([0.0, 0.04, 0.1, 0.2, 0.24], np.float32)
    want = [round_scalar(float(v), fmt) for v in x]
    assert hwport.quantize(x, fmt).tolist() == want


def test_a_hook_calling_sys_exit_is_a_plugin_failure() -> None:
    class Quitter:
        @hwport.hookimpl
        def hwport_backends(self) -> list[Any]:
            raise SystemExit("plugin gave up")

    reg = Registry()
    reg.add_plugin(Quitter(), "quitter", "test")
    assert any(f.plugin == "quitter" and "SystemExit" in f.reason for f in reg.failures)
