"""Running cells: outcomes, results as data, reproducibility, errors, user pipelines."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import hwport
from hwport import runner
from hwport.recipes import builtin, lower
from hwport.runner import OutcomeRules, RunResult

BACKENDS = ("dataflow", "dojo", "reference", "simgpu")
RECIPES = ("fp32", "amp-bf16", "amp-fp16", "fp8-hybrid", "pure-bf16")
TRAIN_OUTCOMES = {"converged", "degraded", "stalled", "diverged"}
INFER_OUTCOMES = {"parity", "degraded", "broken"}
SMALL = {"hidden": 32}  # digits with a narrower MLP: emulated steps cost less
LM_TINY = {"d_model": 32, "layers": 1, "context": 32, "batch_size": 8}
RUN_KEYS = {"backend", "pipeline", "mode", "recipe", "framework", "seed", "steps", "outcome",
            "metrics", "reference_metrics", "curve", "telemetry", "lowering", "wall_s"}


@pytest.fixture(scope="module")
def cache(reference_cache: Path) -> Path:
    return reference_cache


@pytest.fixture(autouse=True)
def _cache(cache: Path) -> None:
    pass


def without_wall(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != "wall_s"}


def as_json(r: RunResult) -> str:
    return json.dumps(without_wall(r.to_dict()), sort_keys=True, allow_nan=False)


# -- every backend, both modes --------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_trains_digits(backend: str) -> None:
    r = runner.run(backend, "digits", "train", "amp-bf16", steps=20, options=SMALL)
    assert r.outcome in TRAIN_OUTCOMES
    assert (r.backend, r.pipeline, r.mode, r.recipe, r.steps) == (
        backend, "digits", "train", "amp-bf16", 20)
    assert [pt["step"] for pt in r.curve] == list(range(1, 21))
    assert set(r.metrics) == {"val_loss", "accuracy"}
    assert r.curve[-1]["val_loss"] == r.metrics["val_loss"]
    if backend == "reference":
        assert r.telemetry["rounding"] == {}
        assert r.metrics == r.reference_metrics
    else:
        assert r.telemetry["rounding"]["forward/matmul_input"]["elements"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_ports_cleanly_with_amp_bf16(backend: str) -> None:
    r = runner.run(backend, "digits", "infer", "amp-bf16", steps=30)
    assert r.outcome in INFER_OUTCOMES
    assert r.outcome == "parity", (r.agreement, r.metrics, r.reference_metrics)
    assert r.curve == []
    assert set(r.agreement) == {"top1", "kl"}
    assert r.agreement["top1"] >= 0.99


@pytest.mark.parametrize("recipe", RECIPES)
def test_inference_outcomes_for_every_recipe(recipe: str) -> None:
    for backend in BACKENDS:
        r = runner.run(backend, "digits", "infer", recipe, steps=30)
        assert r.outcome in INFER_OUTCOMES
        if backend == "reference" or recipe == "fp32":  # nothing to lower away from fp32
            assert r.outcome == "parity" and r.agreement == {"top1": 1.0, "kl": 0.0}


def test_lm_trains_and_infers_on_dojo() -> None:
    r = runner.run("dojo", "lm", "train", "amp-bf16", steps=20, options=LM_TINY)
    assert r.outcome in TRAIN_OUTCOMES
    assert len(r.curve) == 20 and set(r.metrics) == {"val_loss", "perplexity"}
    assert math.isclose(r.metrics["perplexity"], math.exp(r.metrics["val_loss"]), rel_tol=1e-9)
    # softmax and layer norms stay fp32 under amp-bf16; attention matmuls are emulated
    assert r.telemetry["rounding"]["backward/matmul"]["elements"] > 0
    i = runner.run("dojo", "lm", "infer", "amp-bf16", steps=20, options=LM_TINY)
    assert i.outcome in INFER_OUTCOMES
    assert i.reference_metrics == r.reference_metrics


# -- results are data -----------------------------------------------------------------------------
def test_run_result_to_dict_is_strict_json() -> None:
    r = runner.run("simgpu", "digits", "train", "amp-fp16", steps=20, options=SMALL)
    d = r.to_dict()
    assert d.keys() >= RUN_KEYS
    assert d["framework"] == "torch" and d["seed"] == 0
    assert isinstance(d["curve"], list) and len(d["curve"]) == 20
    assert all({"step", "loss"} <= pt.keys() for pt in d["curve"])
    assert d["telemetry"]["loss_scale"][0] == 2.0**16
    assert isinstance(d["wall_s"], float) and d["wall_s"] > 0
    text = json.dumps(d, allow_nan=False)
    assert json.loads(text) == d

    i = runner.run("dojo", "digits", "infer", "fp8-hybrid", steps=20, options=SMALL).to_dict()
    assert i.keys() >= RUN_KEYS | {"agreement"}
    assert i["lowering"] and all(isinstance(n, str) for n in i["lowering"])
    json.dumps(i, allow_nan=False)


def test_non_finite_numbers_become_strings() -> None:
    r = RunResult("simgpu", "x", "train", "fp32", 0, 1, "diverged", {"val_loss": math.nan},
                  {"val_loss": 1.0}, [{"step": 1, "loss": math.inf}],
                  {"loss_scale": [-math.inf]}, [], 0.1, agreement={"kl": math.inf})
    d = r.to_dict()
    text = json.dumps(d, allow_nan=False)
    assert d["metrics"]["val_loss"] == "nan" and d["curve"][0]["loss"] == "inf"
    assert d["telemetry"]["loss_scale"] == ["-inf"] and d["agreement"]["kl"] == "inf"
    assert "NaN" not in text and "Infinity" not in text


# -- reproducibility ------------------------------------------------------------------------------
STOCHASTIC = dataclasses.replace(builtin("pure-bf16"), update_rounding="stochastic")


def test_same_seed_same_json_deterministic_recipe() -> None:
    a = runner.run("simgpu", "digits", "train", "amp-bf16", steps=20, options=SMALL)
    b = runner.run("simgpu", "digits", "train", "amp-bf16", steps=20, options=SMALL)
    assert as_json(a) == as_json(b)
    c = runner.run("simgpu", "digits", "train", "amp-bf16", steps=20, options=SMALL, seed=1)
    assert as_json(c) != as_json(a)
    assert c.metrics != a.metrics and c.seed == 1


def test_same_seed_same_json_stochastic_rounding() -> None:
    assert lower(STOCHASTIC, hwport.get_backend("dataflow")).notes == ()
    assert "update_rounding: stochastic -> nearest" in " ".join(
        lower(STOCHASTIC, hwport.get_backend("simgpu")).notes)
    a = runner.run("dataflow", "digits", "train", STOCHASTIC, steps=20, options=SMALL)
    b = runner.run("dataflow", "digits", "train", STOCHASTIC, steps=20, options=SMALL)
    assert a.lowering == []
    assert as_json(a) == as_json(b)
    nearest = runner.run("dataflow", "digits", "train", "pure-bf16", steps=20, options=SMALL)
    assert nearest.curve != a.curve  # the stochastic rounding was really applied
    # stochastic rounding loses fewer updates than round-to-nearest
    assert a.telemetry["updates_lost"] < nearest.telemetry["updates_lost"]
    c = runner.run("dataflow", "digits", "train", STOCHASTIC, steps=20, options=SMALL, seed=1)
    assert as_json(c) != as_json(a)


CELL = """
import dataclasses, json
from hwport import runner
from hwport.recipes import builtin
recipe = dataclasses.replace(builtin("pure-bf16"), update_rounding="stochastic")
r = runner.run("dataflow", "digits", "train", recipe, steps=20, options={"hidden": 32})
d = r.to_dict()
d.pop("wall_s")
print(json.dumps(d, sort_keys=True, allow_nan=False))
"""


def test_fresh_processes_give_the_same_json(cache: Path) -> None:
    here = without_wall(
        runner.run("dataflow", "digits", "train", STOCHASTIC, steps=20, options=SMALL).to_dict())
    # one process trains its reference model, the other loads the one saved above
    procs = []
    for where in (cache / "fresh", cache):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["HWPORT_CACHE"] = str(where)
        procs.append(subprocess.Popen([sys.executable, "-c", CELL], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    first, second = (json.loads(o) for o, _ in outs)
    assert first == second
    assert first == here


def test_corrupt_cache_entry_is_retrained(cache: Path) -> None:
    p = runner.resolve_pipeline("digits", 5, SMALL)
    first = runner.run("reference", p, "infer", "fp32")
    path = cache / "models" / f"{p.name}-{p.key()}-s0.pt"
    assert path.exists()
    path.write_bytes(b"not a torch file")
    runner._REFERENCE.clear()
    again = runner.run("simgpu", p, "infer", "amp-bf16")
    assert again.reference_metrics == first.reference_metrics
    assert path.stat().st_size > 100


def test_processes_sharing_the_cache_do_not_break_each_other(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes train the same reference at once (two terminals, a parallel CI job):
    the other one saves and renames its file while this one is between its own save and
    rename. Both must finish (either file is a valid cache entry)."""
    p = runner.resolve_pipeline("digits", 3, {"hidden": 8})
    real_save = torch.save
    raced: list[bool] = []

    def save_while_another_process_saves(obj: Any, f: Any, *args: Any, **kw: Any) -> None:
        real_save(obj, f, *args, **kw)
        if not raced:
            raced.append(True)
            runner._REFERENCE.clear()
            runner._reference(p, 0)  # the other process: trains, saves, renames

    monkeypatch.setattr(torch, "save", save_while_another_process_saves)
    runner._REFERENCE.clear()
    r = runner.run("reference", p, "train", "fp32")
    assert raced and r.outcome == "converged"


# -- outcome rules --------------------------------------------------------------------------------
def test_outcome_rules_train() -> None:
    rules = OutcomeRules()
    initial, ref = 2.0, 1.0
    at_tolerance = ref * (1 + rules.converged_tolerance)
    assert rules.train(initial, 0.5, ref, True) == "converged"  # better than the reference
    assert rules.train(initial, ref, ref, True) == "converged"
    assert rules.train(initial, at_tolerance, ref, True) == "converged"
    assert rules.train(initial, math.nextafter(at_tolerance, math.inf), ref, True) == "degraded"
    # progress (L0 - L) / (L0 - Lref): exactly half is degraded, just below is stalled
    assert rules.train(initial, 1.5, ref, True) == "degraded"
    assert rules.train(initial, math.nextafter(1.5, math.inf), ref, True) == "stalled"
    assert rules.train(initial, initial, ref, True) == "stalled"  # no progress, no harm
    assert rules.train(initial, math.nextafter(initial, math.inf), ref, True) == "diverged"
    assert rules.train(initial, math.nan, ref, True) == "diverged"
    assert rules.train(initial, math.inf, ref, True) == "diverged"
    assert rules.train(initial, 0.5, ref, False) == "diverged"  # a NaN on the way
    custom = OutcomeRules(converged_tolerance=0.5, degraded_progress=0.25)
    assert custom.train(initial, 1.5, ref, True) == "converged"
    assert custom.train(initial, 1.75, ref, True) == "degraded"
    assert custom.train(initial, 1.875, ref, True) == "stalled"


def test_outcome_rules_infer() -> None:
    rules = OutcomeRules()
    ref = 1.0
    assert rules.infer(1.0, ref, ref, True) == "parity"
    assert rules.infer(rules.parity_agreement, ref, ref, True) == "parity"
    below = math.nextafter(rules.parity_agreement, 0)
    assert rules.infer(below, ref, ref, True) == "degraded"
    assert rules.infer(1.0, 1.01, ref, True) == "parity"
    assert rules.infer(1.0, 0.99, ref, True) == "parity"
    assert rules.infer(1.0, 1.03, ref, True) == "degraded"
    assert rules.infer(1.0, 0.97, ref, True) == "degraded"
    assert rules.infer(rules.broken_agreement, ref, ref, True) == "degraded"
    assert rules.infer(math.nextafter(rules.broken_agreement, 0), ref, ref, True) == "broken"
    assert rules.infer(0.0, ref, ref, True) == "broken"
    assert rules.infer(1.0, math.nan, ref, True) == "broken"
    assert rules.infer(1.0, math.inf, ref, True) == "broken"
    assert rules.infer(1.0, ref, ref, False) == "broken"  # a NaN/inf output
    # the loss tolerance is inclusive (dyadic numbers: exact boundaries)
    exact = OutcomeRules(parity_loss_tolerance=0.25)
    assert exact.infer(1.0, 1.25, ref, True) == "parity"
    assert exact.infer(1.0, 0.75, ref, True) == "parity"
    assert exact.infer(1.0, math.nextafter(1.25, math.inf), ref, True) == "degraded"
    assert exact.infer(1.0, 5.0, 4.0, True) == "parity"
    # outputs agree by distribution when near-ties flip the top-1 choice
    assert rules.infer(0.95, ref, ref, True, kl=rules.parity_kl) == "parity"
    assert rules.infer(0.95, ref, ref, True, kl=2 * rules.parity_kl) == "degraded"
    assert rules.infer(0.95, 1.1, ref, True, kl=0.0) == "degraded"  # the loss still counts
    assert rules.infer(0.5, ref, ref, True, kl=0.0) == "broken"


def test_custom_rules_reach_the_result() -> None:
    strict = OutcomeRules(parity_agreement=1.0, parity_loss_tolerance=0.0, parity_kl=0.0)
    r = runner.run("simgpu", "digits", "infer", "fp8-hybrid", steps=30, rules=strict)
    assert r.outcome == "degraded"


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,kind,known", [
    ({"backend": "tpu"}, "backend", ["dataflow", "dojo", "reference", "simgpu"]),
    ({"pipeline": "mnist"}, "pipeline", ["digits", "lm"]),
    ({"recipe": "amp-fp8"}, "recipe", list(RECIPES)),
])
def test_unknown_names_list_the_known_ones(kwargs: dict[str, str], kind: str,
                                           known: list[str]) -> None:
    args = {"backend": "simgpu", "pipeline": "digits", "recipe": "amp-bf16", **kwargs}
    with pytest.raises(hwport.UnknownNameError) as e:
        runner.run(args["backend"], args["pipeline"], "train", args["recipe"], steps=2)
    msg = str(e.value)
    assert f"unknown {kind}" in msg and next(iter(kwargs.values())) in msg
    for name in known:
        assert name in msg


@pytest.mark.parametrize("steps", [0, -1, "5", 2.0, True])
def test_bad_steps(steps: Any) -> None:
    with pytest.raises(hwport.HwportError, match="steps"):
        runner.run("simgpu", "digits", "train", steps=steps)


def test_bad_mode() -> None:
    with pytest.raises(hwport.HwportError, match=r"'eval'.*train.*infer"):
        runner.run("simgpu", "digits", "eval", steps=2)
    with pytest.raises(hwport.HwportError, match="eval"):
        runner.compare(["simgpu"], ["digits"], ["train", "eval"], steps=2)


def test_unknown_pipeline_option() -> None:
    with pytest.raises(hwport.HwportError, match=r"digits.*options.*widthh"):
        runner.run("simgpu", "digits", "train", steps=2, options={"widthh": 3})


def test_options_with_a_built_pipeline_raise() -> None:
    p = runner.resolve_pipeline("digits", 2)
    with pytest.raises(hwport.HwportError, match="options"):
        runner.run("simgpu", p, "train", options={"hidden": 8})


def test_lm_corpus_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent" / "file.txt"
    with pytest.raises(hwport.HwportError) as e:
        runner.run("dojo", "lm", "train", steps=2, options={"corpus": str(missing)})
    assert str(missing) in str(e.value)
    small = tmp_path / "small.txt"
    small.write_text("tiny corpus\n" * 10)
    with pytest.raises(hwport.HwportError) as e:
        runner.run("dojo", "lm", "train", steps=2, options={"corpus": str(small)})
    assert str(small) in str(e.value)
    assert "4096" in str(e.value)


def test_lm_corpus_too_small_for_validation_names_the_file(tmp_path: Path) -> None:
    corpus = tmp_path / "short.txt"
    corpus.write_text("x = 1\n" * 1000)  # 6,000 bytes: readable, 600 of them for validation
    with pytest.raises(hwport.HwportError) as e:
        runner.run("dojo", "lm", "train", steps=2, options={"corpus": str(corpus)})
    assert "validation" in str(e.value)
    assert str(corpus) in str(e.value)


def test_lm_on_a_corpus_file(tmp_path: Path) -> None:
    corpus = tmp_path / "text.txt"
    corpus.write_bytes(Path(textwrap.__file__).read_bytes() * 2)
    r = runner.run("dojo", "lm", "train", steps=3, options={**LM_TINY, "corpus": str(corpus)})
    assert r.outcome in TRAIN_OUTCOMES


# -- user pipelines -------------------------------------------------------------------------------
MYMOD = '''
import torch
import torch.nn.functional as F
from torch import nn

import hwport


def make(steps: int = 30, hidden: int = 16) -> hwport.Pipeline:
    """A 2-layer MLP on seeded random data."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 3, generator=g)
    x = torch.randn(512, 8, generator=g)
    y = (x @ w).argmax(-1)
    xt, yt, xv, yv = x[:384], y[:384], x[384:], y[384:]

    def batches(seed):
        gb = torch.Generator().manual_seed(seed)
        while True:
            idx = torch.randint(0, len(yt), (32,), generator=gb)
            yield xt[idx], yt[idx]

    def evaluate(m):
        logits = m(xv)
        return {"val_loss": float(F.cross_entropy(logits, yv)),
                "accuracy": float((logits.argmax(-1) == yv).float().mean())}

    return hwport.Pipeline(
        name="mymlp",
        model=lambda: nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 3)),
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
        batches=batches, loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        evaluate=evaluate, predict=lambda m: m(xv), metric="accuracy",
        steps=steps, eval_every=10, config={"hidden": hidden})


def not_a_pipeline(steps: int = 30):
    return {"steps": steps}


VALUE = 3
'''


@pytest.fixture
def user_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    (tmp_path / "mymod.py").write_text(MYMOD, encoding="utf-8")
    (tmp_path / "brokenmod.py").write_text("raise RuntimeError('boom at import')\n",
                                           encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("mymod", "brokenmod"):
        sys.modules.pop(name, None)


def test_user_pipeline_by_reference(user_modules: Path) -> None:
    t = runner.run("dojo", "mymod:make", "train", "amp-bf16", steps=20)
    assert t.pipeline == "mymlp" and t.outcome in TRAIN_OUTCOMES
    assert len(t.curve) == 20 and set(t.metrics) == {"val_loss", "accuracy"}
    assert t.metrics["val_loss"] < t.curve[0]["loss"]  # it learned something
    i = runner.run("dojo", "mymod:make", "infer", "amp-bf16", steps=20)
    assert i.pipeline == "mymlp" and i.outcome in INFER_OUTCOMES
    assert i.reference_metrics == t.reference_metrics
    # options reach the factory
    o = runner.run("dojo", "mymod:make", "train", "amp-bf16", steps=5, options={"hidden": 4})
    assert o.steps == 5 and o.metrics != t.metrics


@pytest.mark.parametrize("ref,match", [
    ("nosuchmod_xyz:make", "importing 'nosuchmod_xyz' failed"),
    ("mymod:nosuch", "no callable 'nosuch'"),
    ("mymod:VALUE", "no callable 'VALUE'"),
    ("mymod:", "expected 'package.module:factory'"),
    (":make", "expected 'package.module:factory'"),
    ("mymod:not_a_pipeline", "returned dict, not a hwport.Pipeline"),
])
def test_bad_pipeline_references(user_modules: Path, ref: str, match: str) -> None:
    with pytest.raises(hwport.HwportError, match=re.escape(match)) as e:
        runner.run("dojo", ref, "train", steps=2)
    assert ref.split(":")[0] in str(e.value) or not ref.split(":")[0]


def test_pipeline_module_failing_at_import(user_modules: Path) -> None:
    with pytest.raises(hwport.HwportError, match="brokenmod") as e:
        runner.run("dojo", "brokenmod:make", "train", steps=2)
    assert "boom at import" in str(e.value)


# -- compare --------------------------------------------------------------------------------------
def test_compare_grid_order() -> None:
    c = runner.compare(backends=["reference", "dojo"], pipelines=["digits"],
                       modes=["train", "infer"], steps=20)
    assert [(x.pipeline, x.mode, x.backend) for x in c.cells] == [
        ("digits", "train", "reference"), ("digits", "train", "dojo"),
        ("digits", "infer", "reference"), ("digits", "infer", "dojo")]
    assert all(x.recipe == "amp-bf16" and x.steps == 20 for x in c.cells)
    d = c.to_dict()
    assert d["recipe"] == "amp-bf16" and d["seed"] == 0 and len(d["cells"]) == 4
    json.dumps(d, allow_nan=False)
    # the same cells as single runs
    single = runner.run("dojo", "digits", "infer", "amp-bf16", steps=20)
    assert as_json(single) == as_json(c.cells[3])


def test_compare_checks_names_before_any_work() -> None:
    with pytest.raises(hwport.UnknownNameError, match="tpu"):
        runner.compare(backends=["simgpu", "tpu"], pipelines=["digits"], steps=2)
