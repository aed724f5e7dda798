"""The store from the command line: runs list/show, diff, report, --resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import flat, hwport_cli
from typer.testing import CliRunner

from hwport.cli import app

STEPS = "30"


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory, reference_cache: Path) -> Path:
    """A store with two compares (the second adds a backend) and one port."""
    path = tmp_path_factory.mktemp("cli-store") / "results.sqlite"
    cli = CliRunner()
    for backends in ("reference,dojo", "reference,dojo,dataflow"):
        r = cli.invoke(app, ["compare", "--backends", backends, "--pipelines", "digits",
                             "--steps", STEPS, "--store", str(path), "--resume"])
        assert r.exit_code == 0, r.output
    r = cli.invoke(app, ["port", "-b", "dojo", "-p", "digits", "--recipe", "pure-bf16",
                         "--steps", STEPS, "--budget", "2", "--store", str(path)])
    assert r.exit_code == 0, r.output
    return path


def invoke(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(app, list(args))
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.output


def test_runs_list_and_show(stored: Path) -> None:
    code, text = invoke("runs", "list", "--store", str(stored), "--json")
    assert code == 0
    runs = json.loads(text)
    assert [(r["id"], r["kind"], r["status"], r["cells_done"]) for r in runs] == [
        (3, "port", "finished", 1), (2, "compare", "finished", 6),
        (1, "compare", "finished", 4)]
    code, text = invoke("runs", "show", "2", "--store", str(stored), "--json")
    data = json.loads(text)
    assert [c["backend"] for c in data["cells"]] == ["reference", "dojo", "dataflow"] * 2
    assert set(data["specs"]) == {"reference", "dojo", "dataflow"}
    code, text = invoke("runs", "show", "3", "--store", str(stored))
    assert code == 0 and "port: recipe pure-bf16" in text and "digits train on dojo" in text
    code, text = invoke("runs", "list", "--store", str(stored))
    assert code == 0 and text.count("finished") == 3


def test_diff_names_what_changed(stored: Path) -> None:
    code, text = invoke("diff", "1", "2", "--store", str(stored), "--json")
    assert code == 0
    d = json.loads(text)
    changed = [(c["backend"], c["mode"], c["outcome"][0]) for c in d["cells"] if c["changed"]]
    assert changed == [("dataflow", "train", None), ("dataflow", "infer", None)]
    assert d["settings"] == [["params.backends", ["reference", "dojo"],
                              ["reference", "dojo", "dataflow"]]]
    code, text = invoke("diff", "2", "3", "--store", str(stored))
    assert code == 0 and "recipe name: 'amp-bf16' -> 'pure-bf16'" in text
    assert "recipe fp32_ops: " in text  # pure-bf16 keeps nothing in fp32; amp-bf16 does
    assert "recipe autocast: True -> False" in text
    assert "setting kind: 'compare' -> 'port'" in text


def test_report_of_the_newest_and_of_an_id(stored: Path, tmp_path: Path) -> None:
    code, text = invoke("report", "2", "--out", str(tmp_path / "r2"), "--store", str(stored))
    assert code == 0, text
    html = (tmp_path / "r2" / "report.html").read_text()
    assert "dataflow" in html and "data:image/png;base64," in html
    assert (tmp_path / "r2" / "report.md").is_file()
    code, text = invoke("report", "--out", str(tmp_path / "newest"), "--store", str(stored))
    assert code == 0 and "(run 3)" in text


def test_bad_input_is_named(stored: Path, tmp_path: Path) -> None:
    def fails(*args: str | Path) -> str:
        r = hwport_cli(*args)
        assert r.returncode == 1 and r.stderr.startswith("error:"), (r.stdout, r.stderr)
        return flat(r.stderr)

    assert "run 42 is not in store" in fails("runs", "show", "42", "--store", stored)
    assert "(it has runs 1-3; see hwport runs list)" in fails("diff", "1", "42", "--store",
                                                               stored)
    assert "none.sqlite: no such file" in fails("runs", "list", "--store",
                                                tmp_path / "none.sqlite")
    blocker = tmp_path / "file"
    blocker.write_text("")
    why = fails("compare", "--backends", "reference", "--pipelines", "digits", "--store",
                blocker / "s.sqlite")
    assert f"file/s.sqlite: cannot create it ({blocker} is a file, not a directory)" in why
    assert "drop --no-store" in fails("compare", "--no-store", "--resume")


def test_no_store_stores_nothing(tmp_path: Path, reference_cache: Path) -> None:
    path = tmp_path / "s.sqlite"
    code, text = invoke("run", "-b", "reference", "-p", "digits", "--mode", "infer", "--steps",
                        STEPS, "--no-store", "--store", str(path))
    assert code == 0 and not path.exists()
    code, text = invoke("run", "-b", "reference", "-p", "digits", "--mode", "infer", "--steps",
                        STEPS, "--store", str(path))
    assert code == 0 and "stored as run 1" in text
