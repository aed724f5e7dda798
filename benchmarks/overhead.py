"""Emulation overhead: an lm training step under simgpu with amp-bf16 over the same step on
the reference backend (native torch), measured in one run.

    python benchmarks/overhead.py [--steps 60] [--recipe amp-bf16] [--backend simgpu]

Both trainings run side by side in one process, one native step then one emulated step, so
that drift in the machine's speed hits both alike; the ratio is of the median step times.
Target: at most 1.5.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import hwport
from hwport.engine import Emulator
from hwport.recipes import lower
from hwport.runner import resolve_pipeline


def trainer(backend: str, recipe: str, options: dict[str, int], seed: int = 0
            ) -> Callable[[], float]:
    """A function that runs one lm training step and returns its duration in seconds."""
    p = resolve_pipeline("lm", options=options)
    em = Emulator(lower(hwport.plugins.registry().recipe(recipe), hwport.get_backend(backend)),
                  seed)
    torch.manual_seed(seed)
    model = p.model()
    batches = p.batches(seed)
    with em.active():
        em.prepare(model)
    opt = p.optimizer(model.parameters())

    def step() -> float:
        batch = next(batches)
        with em.active():
            t0 = time.perf_counter()
            em.train_step(model, p.loss, batch, opt)
            return time.perf_counter() - t0

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--backend", default="simgpu")
    ap.add_argument("--recipe", default="amp-bf16")
    ap.add_argument("--d-model", type=int, default=None, help="override the lm's width")
    args = ap.parse_args()
    options = {"d_model": args.d_model} if args.d_model else {}
    native = trainer("reference", "fp32", options)
    emulated = trainer(args.backend, args.recipe, options)
    times: dict[str, list[float]] = {"native": [], "emulated": []}
    for i in range(args.warmup + args.steps):
        n, e = native(), emulated()
        if i >= args.warmup:
            times["native"].append(n)
            times["emulated"].append(e)
    n, e = statistics.median(times["native"]), statistics.median(times["emulated"])
    print(f"lm training step ({options or 'default configuration'}), "
          f"{torch.get_num_threads()} threads, median of {args.steps} interleaved steps")
    print(f"  reference, fp32 (native):  {n * 1e3:8.2f} ms")
    print(f"  {args.backend}, {args.recipe}:{'':<{max(1, 14 - len(args.backend + args.recipe))}}"
          f"{e * 1e3:8.2f} ms")
    print(f"  overhead ratio: {e / n:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
