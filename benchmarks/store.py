"""What keeping results costs: committing a cell to the results store, and reading it back,
as a fraction of the time the cell itself took to run, measured in one process.

    .venv/bin/python benchmarks/store.py [--pipeline lm] [--backend dojo] [--repeat 20]

The cell runs once (its wall time is the denominator); its RunResult is then committed
``--repeat`` times (each in its own transaction, as a compare does) and loaded back as
many times; the medians are reported next to the cell's time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from hwport import plugins, runner
from hwport.store import Store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", default="lm")
    ap.add_argument("--backend", default="dojo")
    ap.add_argument("--recipe", default="amp-bf16")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    rec = plugins.registry().recipe(args.recipe)
    spec = plugins.get_backend(args.backend)
    runner.run("reference", args.pipeline, "infer", rec)  # the reference model, trained once
    t0 = time.perf_counter()
    cell = runner.run(spec, args.pipeline, "train", rec)
    cell_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "bench.sqlite") as st:
        with st.begin("compare", rec, seed=0, steps=None, cells_total=args.repeat) as s:
            commits = []
            for i in range(args.repeat):
                t = time.perf_counter()
                s.add(i, f"key{i}", cell, spec)
                commits.append(time.perf_counter() - t)
        loads = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            st.load(s.run_id)
            loads.append((time.perf_counter() - t) / args.repeat)  # per cell
    points = len(cell.curve)
    commit, load = statistics.median(commits), statistics.median(loads)
    print(f"{args.pipeline} train on {args.backend} ({args.recipe}): cell {cell_s:.2f} s, "
          f"{points} curve points")
    print(f"commit a cell: {commit * 1e3:.2f} ms = {commit / cell_s:.5f} x the cell's time")
    print(f"load a cell:   {load * 1e3:.2f} ms = {load / cell_s:.5f} x the cell's time")


if __name__ == "__main__":
    main()
