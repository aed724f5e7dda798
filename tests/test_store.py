"""The results store: round trips, resume, interrupts, crashes, schema versions, bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hwport import plugins, runner, store
from hwport.diff import diff
from hwport.store import Store, StoreError

STEPS = 30  # digits steps: a cell takes well under a second


def cells_of(run: store.StoredRun) -> list[dict[str, Any]]:
    """The cells of a run as data, without their wall time (the only thing that varies)."""
    return [{k: v for k, v in c.to_dict().items() if k != "wall_s"} for c in run.cells]


@pytest.fixture
def st(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "results.sqlite") as s:
        yield s


def test_cells_round_trip_bit_for_bit(st: Store, reference_cache: Path) -> None:
    rec = plugins.registry().recipe("amp-bf16")
    with st.begin("compare", rec, seed=0, steps=STEPS, cells_total=2) as session:
        cmp = runner.compare(["dojo"], ["digits"], ["train", "infer"], rec, steps=STEPS,
                             session=session)
    run = st.load(cmp.run_id or 0)
    assert run.record.status == "finished" and run.record.cells_done == 2
    assert [c.to_dict() for c in run.cells] == [c.to_dict() for c in cmp.cells]
    assert run.cells[0].reference_curve, "the reference's curve is kept for the report"
    assert run.specs["dojo"] == plugins.get_backend("dojo").to_dict()
    assert run.recipe == json.loads(json.dumps(rec.to_dict()))
    # per-step curves are rows of their own, queryable
    rows = st.db.execute("SELECT count(*) FROM curves WHERE series = 'backend' AND cell_id "
                         "IN (SELECT id FROM cells WHERE run_id = ?)", (cmp.run_id,)).fetchone()
    assert rows == (sum(len(p) - 1 for p in cmp.cells[0].curve),)


def test_nan_in_a_curve_survives(st: Store, reference_cache: Path) -> None:
    rec = plugins.registry().recipe("amp-bf16")
    r = runner.run("reference", "digits", "train", rec, steps=STEPS)
    r.curve[-1]["loss"] = math.nan
    r.metrics["val_loss"] = math.inf
    r.outcome = "diverged"
    with st.begin("run", rec, seed=0, steps=STEPS) as session:
        session.add(0, "k", r, plugins.get_backend("reference"))
    got = st.load(session.run_id).cells[0]
    assert math.isnan(got.curve[-1]["loss"]) and got.metrics["val_loss"] == math.inf
    assert json.dumps(got.to_dict(), allow_nan=False) == json.dumps(r.to_dict(),
                                                                    allow_nan=False)


def test_resume_reuses_every_stored_cell_and_only_those(st: Store, reference_cache: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    rec = plugins.registry().recipe("amp-bf16")
    with st.begin("compare", rec, seed=0, steps=STEPS, cells_total=2) as s1:
        first = runner.compare(["reference", "dojo"], ["digits"], ["train"], rec, steps=STEPS,
                               session=s1)
    ran: list[str] = []
    real = runner._run
    monkeypatch.setattr(runner, "_run", lambda spec, *a: ran.append(spec.name) or real(spec, *a))
    with st.begin("compare", rec, seed=0, steps=STEPS, cells_total=3, resume=True) as s2:
        again = runner.compare(["reference", "dojo", "dataflow"], ["digits"], ["train"], rec,
                               steps=STEPS, session=s2)
    assert ran == ["dataflow"] and s2.reused == 2 and s2.stored == 1
    assert [c.to_dict() for c in again.cells[:2]] == [c.to_dict() for c in first.cells]
    assert st.load(s2.run_id).reused == {  # the reused cells say which run they came from
        ("reference", "digits", "train"): s1.run_id, ("dojo", "digits", "train"): s1.run_id}
    # another seed, or another version of a spec, is another measurement
    with st.begin("compare", rec, seed=1, steps=STEPS, resume=True) as s3:
        runner.compare(["dojo"], ["digits"], ["train"], rec, steps=STEPS, seed=1, session=s3)
    assert s3.reused == 0
    dojo = plugins.get_backend("dojo")
    faster = dataclasses.replace(dojo, memory=dataclasses.replace(
        dojo.memory, tiers=(dataclasses.replace(dojo.memory.tiers[0],
                                                bandwidth=dojo.memory.tiers[0].bandwidth * 2),
                            *dojo.memory.tiers[1:])))
    monkeypatch.setitem(plugins.registry().backends, "dojo",
                        plugins.Backend(faster, "dojo", "test"))
    with st.begin("compare", rec, seed=0, steps=STEPS, resume=True) as s4:
        runner.compare(["dojo"], ["digits"], ["train"], rec, steps=STEPS, session=s4)
    assert s4.reused == 0 and ran[-1] == "dojo"
    d = diff(st.load(s1.run_id), st.load(s4.run_id))
    tier = dojo.memory.tiers[0].name
    assert [f for f, _, _ in d.specs["dojo"]] == [f"memory.tiers.{tier}.bandwidth"]


def test_port_results_are_stored_and_resumed(st: Store, reference_cache: Path) -> None:
    from hwport import porting

    rec = plugins.registry().recipe("pure-bf16")
    with st.begin("port", rec, seed=0, steps=STEPS) as s1:
        first = porting.port("dojo", "digits", rec, "train", budget=2, steps=STEPS,
                             session=s1)
    with st.begin("port", rec, seed=0, steps=STEPS, resume=True) as s2:
        again = porting.port("dojo", "digits", rec, "train", budget=2, steps=STEPS,
                             session=s2)
    assert again.to_dict() == first.to_dict()
    assert s2.run_id == s1.run_id + 1 and s2.stored == 0 and s2.reused == 1
    for run_id in (s1.run_id, s2.run_id):  # the resumed search keeps its cell too
        stored = st.load(run_id)
        assert stored.ports[("dojo", "digits", "train")] == first.to_dict()
        assert stored.record.cells_done == 1
        assert stored.cells[0].outcome == first.outcome_before


def test_resuming_after_the_spec_changed_measures_again(st: Store, reference_cache: Path,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    rec = plugins.registry().recipe("amp-bf16")
    with pytest.raises(KeyboardInterrupt), st.begin("compare", rec, seed=0, steps=STEPS,
                                                     cells_total=2) as s1:
        runner.compare(["dojo"], ["digits"], ["infer"], rec, steps=STEPS, session=s1)
        raise KeyboardInterrupt  # before the second cell
    assert st.runs()[0].status == "interrupted"
    dojo = plugins.get_backend("dojo")
    monkeypatch.setitem(plugins.registry().backends, "dojo", plugins.Backend(
        dataclasses.replace(dojo, description="dojo, revised"), "dojo", "test"))
    with st.begin("compare", rec, seed=0, steps=STEPS, cells_total=2, resume=True) as s2:
        runner.compare(["dojo"], ["digits"], ["infer"], rec, steps=STEPS, session=s2)
    assert s2.run_id == s1.run_id and s2.reused == 0 and s2.failed is None
    run = st.load(s2.run_id)
    assert run.record.status == "finished" and run.specs["dojo"]["description"] == \
        "dojo, revised"


def test_resume_never_joins_a_run_still_going(st: Store) -> None:
    rec = plugins.registry().recipe("amp-bf16")
    with st.begin("compare", rec, seed=0, steps=STEPS) as live, \
            st.begin("compare", rec, seed=0, steps=STEPS, resume=True) as other:
        assert other.run_id != live.run_id  # this process, alive, is running the first
    with pytest.raises(KeyboardInterrupt), st.begin("compare", rec, seed=0, steps=STEPS):
        raise KeyboardInterrupt
    with st.begin("compare", rec, seed=0, steps=STEPS, resume=True) as again:
        assert again.run_id == other.run_id + 1, "the interrupted run is the one resumed"


# -- a real process, really interrupted ---------------------------------------------------
COMPARE = ["compare", "--backends", "reference,simgpu,dojo,dataflow", "--pipelines", "digits",
           "--steps", "60"]


def hwport(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "hwport.cli", *args], env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_after(proc: subprocess.Popen[str], cells: int, sig: int) -> list[str]:
    """Read the progress lines until ``cells`` cells were stored, then send ``sig``."""
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if sum(", stored)" in x for x in lines) >= cells:
            proc.send_signal(sig)
            break
    lines += proc.stderr.read().splitlines(keepends=True)
    proc.stderr.close()
    proc.wait(timeout=60)
    return lines


@pytest.fixture(scope="module")
def env(reference_cache: Path) -> dict[str, str]:
    e = {**os.environ, "HWPORT_CACHE": str(reference_cache), "COLUMNS": "200"}
    subprocess.run([sys.executable, "-m", "hwport.cli", "run", "-b", "reference", "-p",
                    "digits", "--steps", "60", "--no-store"], env=e, check=True,
                   capture_output=True)  # the reference model, trained once for all
    return e


def test_killed_compare_resumes_to_the_same_cells(tmp_path: Path, env: dict[str, str]) -> None:
    killed = str(tmp_path / "killed.sqlite")
    lines = stop_after(hwport(*COMPARE, "--store", killed, env=env), 3, signal.SIGKILL)
    done = [x for x in lines if ", stored)" in x]
    assert len(done) == 3, lines

    # after the crash: the store opens read-only, intact, every finished cell whole
    with Store(killed, readonly=True) as ro:
        assert ro.db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        record = ro.runs()[0]
        assert record.status == "died" and record.cells_done == 3
        crashed = ro.load(record.id)
        for line, cell in zip(done, crashed.cells, strict=True):
            assert f"{cell.pipeline} {cell.mode} on {cell.backend}: {cell.outcome}" in line
            assert cell.memory["bytes"] and cell.time["flops"] and "rounding" in cell.telemetry
            assert cell.curve and cell.curve[-1]["step"] == 60 and cell.reference_curve
        with pytest.raises(StoreError, match="read-only"):
            ro.begin("compare", plugins.registry().recipe("fp32"), seed=0, steps=None)

    resumed = subprocess.run([sys.executable, "-m", "hwport.cli", *COMPARE, "--store", killed,
                              "--resume"], env=env, capture_output=True, text=True, check=True)
    assert resumed.stderr.count("taken from the store") == 3
    assert resumed.stderr.count(", stored)") == 5

    whole = str(tmp_path / "whole.sqlite")
    subprocess.run([sys.executable, "-m", "hwport.cli", *COMPARE, "--store", whole], env=env,
                   capture_output=True, check=True)
    with Store(killed) as a, Store(whole) as b:
        assert [r.id for r in a.runs()] == [1], "resume continued the interrupted run"
        ra, rb = a.load(1), b.load(1)
        assert ra.record.status == "finished" and ra.record.cells_done == 8
        assert cells_of(ra) == cells_of(rb)


def test_sigterm_records_an_interrupted_run(tmp_path: Path, env: dict[str, str]) -> None:
    path = str(tmp_path / "s.sqlite")
    proc = hwport(*COMPARE, "--store", path, env=env)
    lines = stop_after(proc, 1, signal.SIGTERM)
    assert proc.returncode == 130, lines
    assert any("--resume runs the rest" in x for x in lines), lines
    with Store(path, readonly=True) as ro:
        record = ro.runs()[0]
        assert record.status == "interrupted" and record.error == "signal SIGTERM"
        assert record.cells_done >= 1


# -- schema versions and bad input --------------------------------------------------------
def test_a_store_from_a_newer_hwport_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite"
    Store(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {store.SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match=r"newer hwport \(schema version 2; this hwport reads "
                                         r"up to 1\)"):
        Store(path)


def test_an_older_store_is_migrated_in_place(tmp_path: Path, reference_cache: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "old.sqlite"
    rec = plugins.registry().recipe("amp-bf16")
    with Store(path) as old, old.begin("run", rec, seed=0, steps=STEPS) as s:
        runner.run("reference", "digits", "infer", rec, steps=STEPS, session=s)
    with Store(path) as again:
        before = again.load(1)
    monkeypatch.setattr(store, "SCHEMA_VERSION", 2)
    monkeypatch.setitem(store.MIGRATIONS, 1, "ALTER TABLE runs ADD COLUMN note TEXT;\n"
                                             "UPDATE runs SET note = 'migrated'")
    with pytest.raises(StoreError, match="needs migrating"):
        Store(path, readonly=True)
    with Store(path) as new:
        assert new.db.execute("PRAGMA user_version").fetchone() == (2,)
        assert new.db.execute("SELECT note FROM runs").fetchall() == [("migrated",)]
        assert cells_of(new.load(1)) == cells_of(before)
    monkeypatch.setattr(store, "SCHEMA_VERSION", 3)  # no migration from 2: refused, unchanged
    with pytest.raises(StoreError, match="no migration from schema version 2"):
        Store(path)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (2,)


@pytest.mark.parametrize("content", [b"not a database at all, just text\n" * 100, None])
def test_a_file_that_is_not_a_store(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "other.sqlite"
    if content is None:
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE mine (x)")
    else:
        path.write_bytes(content)
    with pytest.raises(StoreError, match="not a hwport results store"):
        Store(path)


def test_unwritable_and_unknown(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match=r"a-file/results.sqlite: cannot create it "
                                         r"\(.*a-file is a file"):
        Store(blocker / "results.sqlite")
    with pytest.raises(StoreError, match="is a directory"):
        Store(tmp_path)
    with pytest.raises(StoreError, match="no such file"):
        Store(tmp_path / "missing.sqlite", readonly=True)
    odd = tmp_path / "a#b?c%25" / "s.sqlite"  # not read as a URI's fragment or query
    Store(odd).close()
    with Store(odd, readonly=True) as ro:
        assert ro.runs() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a#b?c%25", "a-file"]
    empty = tmp_path / "a#b?c%25" / "empty.sqlite"
    empty.write_bytes(b"")
    with pytest.raises(StoreError, match="not a hwport results store"):
        Store(empty, readonly=True)
    with Store(tmp_path / "s.sqlite") as s:
        with pytest.raises(StoreError, match=r"run 7 is not in store .* \(it has no runs"):
            s.load(7)
        with pytest.raises(StoreError, match="has no runs yet"):
            s.latest()
