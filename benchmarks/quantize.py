"""Time hwport.quantize against ml_dtypes' casts (and torch's, for context).

For ``--n`` standard-normal float32 values, in one run:

* ml_dtypes ``x.astype(dt).astype(np.float32)`` round trip for bf16 and e4m3fn;
* ``hwport.quantize(x, fmt)`` (nearest) and ``hwport.quantize(x, fmt, "stochastic")``;
* torch's own bf16 round trip (``t.to(torch.bfloat16).float()``), if torch is installed.

Each timing is the best of ``--repeat`` runs after one warm-up. The script prints a table
and, per format, the hwport/ml_dtypes and stochastic/nearest ratios. It asserts nothing
about absolute times.

    python benchmarks/quantize.py [--n 16777216] [--repeat 5]
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

import hwport

FORMATS = {"bf16": ml_dtypes.bfloat16, "e4m3fn": ml_dtypes.float8_e4m3fn}


def best_of(fn: Callable[[], Any], repeat: int) -> float:
    """Seconds of the fastest of ``repeat`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def ml_round_trip(x: np.ndarray, dt: Any) -> np.ndarray:
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return x.astype(dt).astype(np.float32)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=16 * 2**20, help="number of values (16M)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs; the best counts")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data and of rounding")
    args = ap.parse_args(argv)

    x = np.random.default_rng(args.seed).standard_normal(args.n, dtype=np.float32)
    n, r = args.n, args.repeat
    rows: list[tuple[str, str, float]] = []  # (format, what, seconds)
    results: dict[tuple[str, str], float] = {}

    for name, dt in FORMATS.items():
        # sanity: the two agree before they are timed (nearest, bit for bit)
        same = np.array_equal(hwport.quantize(x[:65536], name).view(np.uint32),
                              ml_round_trip(x[:65536], dt).view(np.uint32))
        for what, fn in (
            ("ml_dtypes astype round trip", lambda dt=dt: ml_round_trip(x, dt)),
            ("hwport nearest", lambda name=name: hwport.quantize(x, name)),
            ("hwport stochastic",
             lambda name=name: hwport.quantize(x, name, "stochastic", seed=args.seed)),
        ):
            t = best_of(fn, r)
            results[name, what] = t
            rows.append((name, what, t))
        if not same:
            print(f"WARNING: hwport and ml_dtypes disagree on {name}")

    try:
        import torch
    except ImportError:  # pragma: no cover - torch is optional
        torch = None
    if torch is not None:
        t_x = torch.from_numpy(x)
        rows.append(("bf16", f"torch round trip ({torch.get_num_threads()} threads)",
                     best_of(lambda: t_x.to(torch.bfloat16).float(), r)))
        rows.append(("bf16", "hwport nearest on a torch tensor",
                     best_of(lambda: hwport.quantize(t_x, "bf16"), r)))

    print(f"{n:,} standard-normal float32 values, best of {r} after a warm-up\n")
    w = max(len(what) for _, what, _ in rows)
    print(f"{'format':<8} {'':<{w}} {'ms':>9} {'Mvalues/s':>10}")
    for name, what, t in rows:
        print(f"{name:<8} {what:<{w}} {t * 1e3:9.2f} {n / t / 1e6:10.1f}")
    print()
    print(f"{'format':<8} {'hwport/ml_dtypes':>17} {'stochastic/nearest':>19}")
    for name in FORMATS:
        ratio = results[name, "hwport nearest"] / results[name, "ml_dtypes astype round trip"]
        sto = results[name, "hwport stochastic"] / results[name, "hwport nearest"]
        print(f"{name:<8} {ratio:17.2f} {sto:19.2f}")
    print("\n(ratios below 1 mean hwport is faster / stochastic costs less than nearest)")


if __name__ == "__main__":
    main()
