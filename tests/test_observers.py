"""Observers: plugins told of every cell as it starts and finishes; the TensorBoard exporter."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from conftest import FakePlugin
from test_cli import flat, hwport_cli

from hwport import plugins, runner

STEPS = 30

RECORDER = """
import hwport

seen = []

@hwport.hookimpl
def hwport_run_started(run):
    seen.append(("started", run.label, run.key))

@hwport.hookimpl
def hwport_run_finished(run, result):
    seen.append(("finished", run.label, result.outcome))
"""

BROKEN = """
import hwport

@hwport.hookimpl
def hwport_run_finished(result):
    raise RuntimeError("exporter down")
"""


def test_observers_see_each_cell_and_a_broken_one_is_skipped(
        fake_plugin: FakePlugin, reference_cache: Path) -> None:
    fake_plugin("hwp_recorder", RECORDER)
    fake_plugin("hwp_broken", BROKEN)
    reg = plugins.registry(reload=True)
    try:
        r = runner.run("dojo", "digits", "train", "amp-bf16", steps=STEPS)
        again = runner.run("dojo", "digits", "infer", "amp-bf16", steps=STEPS)
        seen = sys.modules["hwp_recorder"].seen
        label = "digits train on dojo (amp-bf16, seed 0)"
        assert seen[0][:2] == ("started", label) and len(seen[0][2]) == 64
        assert seen[1] == ("finished", label, r.outcome)
        assert seen[3] == ("finished", "digits infer on dojo (amp-bf16, seed 0)",
                           again.outcome)
        broken = [f for f in reg.failures if f.plugin == "broken"]
        assert len(broken) == 1, "reported once, then no longer called"
        assert "hwport_run_finished() raised RuntimeError: exporter down" in broken[0].reason
    finally:
        plugins.registry(reload=True)


def test_tensorboard_event_files_hold_the_curves(tmp_path: Path, reference_cache: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("HWPORT_TENSORBOARD", str(tmp_path))
    r = runner.run("dojo", "digits", "train", "amp-bf16", steps=STEPS)
    cell = tmp_path / "digits" / "train" / "dojo" / "amp-bf16-s0"
    ea = EventAccumulator(str(cell))
    ea.Reload()
    losses = [(e.step, e.value) for e in ea.Scalars("digits/loss")]
    assert losses == [(int(p["step"]), pytest.approx(p["loss"])) for p in r.curve]
    val = [(e.step, e.value) for e in ea.Scalars("digits/val_loss")]
    assert val == [(int(p["step"]), pytest.approx(p["val_loss"])) for p in r.curve
                   if "val_loss" in p]
    assert ea.Scalars("final/accuracy")[0].value == pytest.approx(r.metrics["accuracy"])
    ref = EventAccumulator(str(tmp_path / "digits" / "train" / "reference-fp32-s0"))
    ref.Reload()
    assert [e.value for e in ref.Scalars("digits/val_loss")] == [
        pytest.approx(p["val_loss"]) for p in r.reference_curve if "val_loss" in p]
    assert all(math.isfinite(e.value) for e in ref.Scalars("digits/loss"))


def test_tensorboard_missing_is_silent(tmp_path: Path, reference_cache: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from hwport import observers

    monkeypatch.setenv("HWPORT_TENSORBOARD", str(tmp_path / "tb"))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    asked: list[object] = []
    real = observers._writer
    monkeypatch.setattr(observers, "_writer", lambda d: asked.append(real(d)) or asked[-1])
    r = runner.run("reference", "digits", "infer", "amp-bf16", steps=STEPS)
    assert r.outcome == "parity"
    assert asked == [None], "the observer ran, found no tensorboard, and wrote nothing"
    assert not (tmp_path / "tb").exists()
    assert not [f for f in plugins.registry().failures if f.plugin == "tensorboard"]


def test_a_broken_observer_is_reported_by_the_command(fake_plugin: FakePlugin,
                                                      reference_cache: Path) -> None:
    site = fake_plugin("hwp_broken", BROKEN)
    for store in ([], ["--no-store"]):
        r = hwport_cli("run", "-b", "reference", "-p", "digits", "--mode", "infer", "--steps",
                       str(STEPS), *store, pythonpath=site)
        assert r.returncode == 0, r.stderr
        assert "plugin 'broken' (hwp_broken 0.1) failed and was skipped" in flat(r.stderr)
        assert "outcome: parity" in r.stdout
