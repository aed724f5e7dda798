"""Do torch and JAX agree? ``hwport compare`` in each framework on the built-in backends and
pipelines, for each recipe, and a Markdown table of the outcome classes that agree.

    .venv/bin/python benchmarks/frameworks.py [--recipes amp-bf16,fp8-hybrid]
                                              [--pipelines digits,lm,tiny-gradients]
                                              [--steps N]

Prints one row per recipe (cells, cells whose outcome class agrees, the cells that differ)
and, per cell, both outcomes with the headline metric. Takes minutes: every cell trains.
"""

from __future__ import annotations

import argparse
import time

from hwport import runner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="amp-bf16,fp8-hybrid,pure-bf16,amp-fp16")
    ap.add_argument("--pipelines", default="digits,lm,tiny-gradients")
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()
    pipelines = args.pipelines.split(",")
    summary, details = [], []
    for recipe in args.recipes.split(","):
        got = {}
        for fw in ("torch", "jax"):
            t0 = time.perf_counter()
            cmp = runner.compare(pipelines=pipelines, recipe=recipe, steps=args.steps,
                                 framework=fw)
            got[fw] = ({(c.pipeline, c.mode, c.backend): c for c in cmp.cells},
                       time.perf_counter() - t0)
        cells = got["torch"][0]
        same = [k for k in cells if cells[k].outcome == got["jax"][0][k].outcome]
        differ = [f"{p} {m} on {b}" for (p, m, b) in cells if (p, m, b) not in same]
        summary.append(f"| {recipe} | {len(cells)} | {len(same)} | "
                       f"{', '.join(differ) or '-'} | {got['torch'][1]:.0f} s | "
                       f"{got['jax'][1]:.0f} s |")
        for k, t in cells.items():
            j = got["jax"][0][k]
            metric = t.metrics.get(t.metric, float("nan"))
            details.append(f"| {recipe} | {' '.join(k)} | {t.outcome} ({t.metric} "
                           f"{metric:.4g}) | {j.outcome} ({j.metric} "
                           f"{j.metrics.get(j.metric, float('nan')):.4g}) |")
    print("| recipe | cells | outcome classes equal | differ | torch | jax |")
    print("|---|---|---|---|---|---|")
    print("\n".join(summary))
    print()
    print("| recipe | cell | torch | jax |")
    print("|---|---|---|---|")
    print("\n".join(details))


if __name__ == "__main__":
    main()
