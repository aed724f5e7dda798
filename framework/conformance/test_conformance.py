"""The conformance checks (see the package docstring)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import hwport
from hwport import formats as _formats
from hwport.formats import FloatFormat
from hwport.runner import run
from hwport.spec import BackendSpec

ORACLES: dict[str, Any] = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16,
                           "e4m3fn": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}
TINY: dict[str, dict[str, Any]] = {
    "digits": {"steps": 20},
    "lm": {"steps": 10, "d_model": 32, "layers": 1, "context": 32, "batch_size": 8},
}


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Reference models trained for the checks stay in a temporary cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HWPORT_CACHE", str(tmp_path_factory.mktemp("hwport-cache")))
        yield


def _formats_of(spec: BackendSpec) -> list[FloatFormat]:
    names = list(dict.fromkeys([*spec.precision.formats, *spec.precision.accumulators.values()]))
    return [spec.format(n) for n in names]


def test_spec_round_trips(hwport_backend: BackendSpec) -> None:
    data = hwport_backend.to_dict()
    json.dumps(data, allow_nan=False)
    assert BackendSpec.from_dict(data) == hwport_backend


def test_every_figure_has_a_source(hwport_backend: BackendSpec) -> None:
    missing = hwport_backend.unsourced()
    assert not missing, f"figures with neither a source nor an assumption: {missing}"


def _sample() -> np.ndarray:
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    normal = rng.standard_normal(50_000).astype(np.float32) * np.float32(100)
    specials = np.array([0, -0.0, np.inf, -np.inf, np.nan, 1e-45, 3.4e38], np.float32)
    return np.concatenate([bits.view(np.float32), normal, specials])


def _same(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Where the two disagree (NaN matches NaN)."""
    both_nan = np.isnan(got) & np.isnan(want)
    differ: np.ndarray = ~both_nan & (got.view(np.uint32) != want.view(np.uint32))
    return differ


def test_formats_match_their_oracles(hwport_backend: BackendSpec) -> None:
    """Formats ml_dtypes knows round bit for bit as ml_dtypes casts them."""
    x = _sample()
    problems = []
    for fmt in _formats_of(hwport_backend):
        dtype = ORACLES.get(fmt.name)
        if dtype is None or fmt != _formats.get(fmt.name):
            continue
        with np.errstate(all="ignore"):
            want = x.astype(dtype).astype(np.float32)
        bad = _same(hwport.quantize(x, fmt), want)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            problems.append(f"{fmt.name}: {int(bad.sum())} values differ, e.g. {x[i]!r} -> "
                            f"{hwport.quantize(x[i:i + 1], fmt)[0]!r}, ml_dtypes {want[i]!r}")
    assert not problems, "\n".join(problems)


def _definition_check(fmt: FloatFormat) -> list[str]:
    """Every value of the format maps to itself; every midpoint to its even neighbour;
    beyond the largest value, the format's overflow rule."""
    codes = range(1 << (fmt.bits - 1))
    table = sorted({(fmt.decode(c), c) for c in codes if math.isfinite(fmt.decode(c))
                    and (fmt.decode(c) > 0 or c == 0)})
    values = np.array([v for v, _ in table], np.float64)
    even = np.array([c % 2 == 0 for _, c in table])
    problems = []
    got = hwport.quantize(values.astype(np.float32), fmt).astype(np.float64)
    if not np.array_equal(got, values):
        problems.append(f"{fmt.name}: {int((got != values).sum())} representable values change")
    mids = (values[:-1] + values[1:]) / 2
    ok32 = mids.astype(np.float32).astype(np.float64) == mids
    if fmt.subnormals:
        expect = np.where(even[:-1], values[:-1], values[1:])[ok32]
        got_mid = hwport.quantize(mids[ok32].astype(np.float32), fmt).astype(np.float64)
        if not np.array_equal(got_mid, expect):
            problems.append(f"{fmt.name}: {int((got_mid != expect).sum())} midpoints do not "
                            "round to the even neighbour")
    beyond = np.float32(min(values[-1] * 4, 3.4e38))
    over = float(hwport.quantize(np.array([beyond]), fmt)[0])
    rule = {"inf": math.inf, "saturate": values[-1], "nan": math.nan}[fmt.overflow]
    if not (over == rule or (math.isnan(rule) and math.isnan(over))):
        problems.append(f"{fmt.name}: {beyond} became {over}, overflow rule says {rule}")
    return problems


def test_formats_match_their_definition(hwport_backend: BackendSpec) -> None:
    """Formats of up to 16 bits against their own definition (decode of every code)."""
    problems = []
    for fmt in _formats_of(hwport_backend):
        if fmt.bits <= 16:
            problems += _definition_check(fmt)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("pipeline", sorted(TINY))
def test_inference_reaches_an_outcome(hwport_backend: BackendSpec, pipeline: str) -> None:
    options = dict(TINY[pipeline])
    steps = options.pop("steps")
    r = run(hwport_backend, pipeline, "infer", "amp-bf16", steps=steps, options=options)
    assert r.outcome in ("parity", "degraded", "broken")
    json.dumps(r.to_dict(), allow_nan=False)


@pytest.mark.parametrize("pipeline", sorted(TINY))
def test_training_reaches_an_outcome(hwport_backend: BackendSpec, pipeline: str) -> None:
    options = dict(TINY[pipeline])
    steps = options.pop("steps")
    r = run(hwport_backend, pipeline, "train", "amp-bf16", steps=steps, options=options)
    assert r.outcome in ("converged", "degraded", "stalled", "diverged")
    assert len(r.curve) >= 1
    json.dumps(r.to_dict(), allow_nan=False)


def test_interconnect_is_usable(hwport_backend: BackendSpec) -> None:
    """Every declared collective has an algorithm, links have a positive speed, and the
    reduction format is one the backend has. (Running each collective and checking its
    cost model come with hwport's collective engine.)"""
    ic = hwport_backend.interconnect
    assert ic.collectives, "no collective declared"
    assert ic.link_bandwidth > 0 and ic.link_latency >= 0 and ic.devices >= 1
    assert ic.reduction_format in hwport_backend.precision.formats


