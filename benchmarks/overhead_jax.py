"""What the JAX engine costs: an emulated, jitted `lm` training step divided by the native
jitted step of the same JAX twin, measured in one run.

    .venv/bin/python benchmarks/overhead_jax.py [--backend simgpu] [--recipe amp-bf16]
                                                 [--steps 40]

Both sides run the same batches from the same weights, interleaved step by step after a
warm-up (compilation excluded), and the medians are compared:

* forward-backward: ``jit(value_and_grad(loss))`` against the emulated program
  (``hwport.jax.emulate``) with its telemetry (the JAX engine's program), and without it
  (``jit(emulate(...))`` called plainly: the counts are unused, XLA drops them);
* the whole training step: that plus AdamW (native: one jitted update; emulated: the
  JAX engine's :class:`hwport.jaxrun.Trainer` step, gradient rounding, loss scaling and
  rounded optimizer writes included).

The emulated programs round with hwport's C kernel, called by XLA (``hwport --version``
says whether it serves); ``HWPORT_JAX_KERNEL=xla`` in the environment measures them with
XLA's own operations instead.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp

from hwport import plugins, runner
from hwport.engine import seeded
from hwport.jax import emulate
from hwport.jaxrun import Trainer
from hwport.pipelines.jaxnets import twin
from hwport.recipes import lower
from hwport.rounding import ffi_kernel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="simgpu")
    ap.add_argument("--recipe", default="amp-bf16")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    jp = twin(runner.resolve_pipeline("lm"))
    lowered = lower(plugins.registry().recipe(args.recipe), plugins.get_backend(args.backend))
    with seeded(0):
        init = jp.init()
    batches = jp.batches(0)
    data = [next(batches) for _ in range(args.steps + 3)]

    native_fb = jax.jit(jax.value_and_grad(jp.loss))
    native_update = jax.jit(jp.optimizer.update)
    params = {k: jnp.asarray(v) for k, v in init.items()}
    state = jp.optimizer.init_state(params)

    trainer = Trainer(jp, lowered, 0)

    def scaled(params: Any, batch: Any, scale: Any) -> Any:
        value, vjp = jax.vjp(lambda q: jp.loss(q, batch), params)
        return value, vjp(scale)[0]

    numerics_only = jax.jit(emulate(scaled, lowered.backend, lowered.recipe))
    e_params, e_master, e_state = trainer.prepare(init)

    def native_step(params: Any, state: Any, batch: Any) -> tuple[Any, Any]:
        _, grads = native_fb(params, batch)
        params, state = native_update(grads, state, params)
        jax.block_until_ready(params)
        return params, state

    fb_times: dict[str, list[float]] = {"native": [], "emulated": []}
    bare_times = {"native": fb_times["native"], "emulated": []}  # the same native program
    step_times: dict[str, list[float]] = {"native": [], "emulated": []}
    for i, batch in enumerate(data):
        t0 = time.perf_counter()
        jax.block_until_ready(native_fb(params, batch))
        t1 = time.perf_counter()
        jax.block_until_ready(trainer.gradients(e_params, batch)[1])
        t2 = time.perf_counter()
        params, state = native_step(params, state, batch)
        t3 = time.perf_counter()
        _, e_params, e_master, e_state = trainer.step(e_params, e_master, e_state, batch, i)
        jax.block_until_ready(e_params)
        t4 = time.perf_counter()
        jax.block_until_ready(numerics_only(e_params, batch, jnp.float32(1.0)))
        t5 = time.perf_counter()
        if i >= 3:  # the first steps compile
            bare_times["emulated"].append(t5 - t4)
            fb_times["native"].append(t1 - t0)
            fb_times["emulated"].append(t2 - t1)
            step_times["native"].append(t3 - t2)
            step_times["emulated"].append(t4 - t3)
    why = ffi_kernel()
    print(f"rounding in the emulated programs: "
          f"{'C kernel through XLA FFI' if why is None else f'XLA operations ({why})'}")
    for name, times in (("forward-backward, numerics only", bare_times),
                        ("forward-backward", fb_times), ("training step", step_times)):
        n, e = statistics.median(times["native"]), statistics.median(times["emulated"])
        print(f"lm {name} on {args.backend} ({args.recipe}): native {n * 1e3:.2f} ms, "
              f"emulated {e * 1e3:.2f} ms, ratio {e / n:.2f}")


if __name__ == "__main__":
    main()
