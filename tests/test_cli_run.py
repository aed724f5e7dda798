"""`hwport run` and `hwport compare` as a user runs them: real subprocesses, small configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUN_KEYS = {"backend", "pipeline", "mode", "recipe", "framework", "seed", "outcome", "metrics",
            "reference_metrics", "curve", "telemetry", "lowering", "wall_s"}


def hwport(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "HWPORT_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "hwport.cli", *args], capture_output=True,
                          text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hwport-cache")


def test_run_train_json_to_stdout(cache: Path) -> None:
    r = hwport("run", "-b", "dojo", "-p", "digits", "--steps", "20", "--json", "-", cache=cache)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data.keys() >= RUN_KEYS
    assert data["backend"] == "dojo" and data["mode"] == "train" and data["framework"] == "torch"
    assert data["outcome"] in ("converged", "degraded", "stalled", "diverged")
    assert len(data["curve"]) == 20 and data["curve"][-1]["step"] == 20
    assert data["telemetry"]["execution"] == "captured"
    eager = hwport("run", "-b", "dojo", "-p", "digits", "--steps", "20", "--eager", "--json",
                   "-", cache=cache)
    assert eager.returncode == 0, eager.stderr
    slow = json.loads(eager.stdout)
    assert slow["telemetry"].pop("execution") == "eager: capture is off"
    data["telemetry"].pop("execution")
    assert (slow["curve"], slow["metrics"], slow["telemetry"]) == \
        (data["curve"], data["metrics"], data["telemetry"])


def test_run_infer_prints_a_table_and_writes_json(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    r = hwport("run", "-b", "simgpu", "-p", "digits", "--steps", "20", "--mode", "infer",
               "--json", str(out), cache=cache)
    assert r.returncode == 0, r.stderr
    assert "outcome:" in r.stdout and "reference" in r.stdout
    data = json.loads(out.read_text())
    assert data["mode"] == "infer" and set(data["agreement"]) == {"top1", "kl"}


def test_compare_small_grid(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.json"
    r = hwport("compare", "--backends", "reference,dataflow", "--pipelines", "digits",
               "--steps", "20", "--json", str(out), cache=cache)
    assert r.returncode == 0, r.stderr
    cells = json.loads(out.read_text())["cells"]
    assert [(c["pipeline"], c["mode"], c["backend"]) for c in cells] == [
        ("digits", "train", "reference"), ("digits", "train", "dataflow"),
        ("digits", "infer", "reference"), ("digits", "infer", "dataflow")]
    assert "hwport compare" in r.stdout and "dataflow" in r.stdout


@pytest.mark.parametrize("args,expect", [
    (("run", "-b", "tpu", "-p", "digits"), "unknown backend 'tpu'; known: dataflow, dojo"),
    (("run", "-b", "dojo", "-p", "mnist"), "unknown pipeline 'mnist'; known: digits, lm"),
    (("run", "-b", "dojo", "-p", "digits", "--recipe", "amp-fp12"),
     "unknown recipe 'amp-fp12'; known: amp-bf16"),
    (("run", "-b", "dojo", "-p", "digits", "--steps", "0"), "steps=0"),
    (("run", "-b", "dojo", "-p", "digits", "--mode", "eval"), "mode 'eval'"),
    (("run", "-b", "dojo", "-p", "lm", "--corpus", "/nonexistent/corpus.txt"),
     "/nonexistent/corpus.txt"),
    (("compare", "--backends", "reference,nope"), "unknown backend 'nope'"),
    (("run", "-b", "dojo", "-p", "digits", "-o", "hidden"), "expected key=value"),
    (("run", "-b", "dojo", "-p", "digits", "-o", "depth=3"), "does not take these options"),
])
def test_bad_input_is_one_clear_error(args: tuple[str, ...], expect: str, cache: Path) -> None:
    r = hwport(*args, cache=cache)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert expect in " ".join(r.stderr.split()), r.stderr
    assert "Traceback" not in r.stderr
