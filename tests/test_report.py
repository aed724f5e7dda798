"""The report: self-contained HTML and Markdown from one stored run, made from a real one."""

from __future__ import annotations

import base64
import copy
import dataclasses
import html
import json
import math
import os
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from hwport import plugins, porting, report, runner
from hwport.errors import HwportError
from hwport.memory import finite
from hwport.store import RunRecord, StoredRun

BACKENDS = ["reference", "simgpu", "dojo"]
MODES = ["train", "infer"]
RENDER = Path(__file__).resolve().parent.parent / "docs" / "render-report.sh"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def stored(reference_cache: Path) -> StoredRun:
    """A small real run: digits, train and infer, on three backends under FP8, with ports."""
    comparison = runner.compare(BACKENDS, ["digits"], MODES, "fp8-hybrid", steps=20)
    ports = {(p.backend, p.pipeline, p.mode): p.to_dict()
             for p in porting.efforts(comparison, budget=2)}
    record = RunRecord(
        id=3, kind="compare", created="2025-01-05T10:00:00+00:00",
        finished="2025-01-05T10:00:40+00:00", status="finished", hwport_version="0.1.0",
        recipe="fp8-hybrid", seed=0, steps=20, world_size=1, framework="torch",
        params={"backends": BACKENDS, "pipelines": ["digits"], "modes": MODES},
        cells_done=len(comparison.cells), cells_total=len(comparison.cells))
    recipe = plugins.registry().recipe("fp8-hybrid").to_dict()
    specs = {b: plugins.get_backend(b).to_dict() for b in BACKENDS}
    return StoredRun(record, recipe, list(comparison.cells), ports, specs)


@pytest.fixture(scope="module")
def written(stored: StoredRun, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[Path, Path]:
    return report.write(stored, tmp_path_factory.mktemp("report") / "out")


def copy_run(run: StoredRun, **record: Any) -> StoredRun:
    """A deep copy of ``run`` with some of its record's fields replaced."""
    new = copy.deepcopy(run)
    new.record = dataclasses.replace(new.record, **record)
    return new


class Tables(HTMLParser):
    """Every <table> of a page as rows of cell texts (``<br>`` as a newline), and the
    class of each cell."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict[str, Any]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self.tables.append({"class": a.get("class") or "", "rows": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th") and self.tables:
            self.cell = []
            self.tables[-1]["rows"][-1].append({"class": a.get("class") or "", "text": ""})
        elif tag == "br" and self.cell is not None:
            self.cell.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.cell is not None:
            self.tables[-1]["rows"][-1][-1]["text"] = "".join(self.cell)
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def tables(page: str, css: str | None = None) -> list[dict[str, Any]]:
    parser = Tables()
    parser.feed(page)
    return [t for t in parser.tables if css is None or t["class"] == css]


def matrix(page: str) -> dict[tuple[str, str, str], dict[str, str]]:
    """The outcome matrix as {(backend, pipeline, mode): cell}."""
    (table,) = tables(page, "matrix")
    header, *rows = table["rows"]
    backends = [c["text"] for c in header[1:]]
    cells = {}
    for row in rows:
        pipeline, mode = row[0]["text"].split("\n")
        for b, c in zip(backends, row[1:], strict=True):
            cells[b, pipeline, mode] = c
    return cells


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (the first chunk, by the PNG spec)."""
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_write_returns_both_files(written: tuple[Path, Path]) -> None:
    html_path, md_path = written
    assert html_path.name == "report.html" and md_path.name == "report.md"
    assert html_path.parent == md_path.parent
    assert html_path.stat().st_size > 0 and md_path.stat().st_size > 0


def test_html_is_self_contained(written: tuple[Path, Path]) -> None:
    page = written[0].read_text(encoding="utf-8")
    assert 'src="http' not in page and "<link" not in page and "<script" not in page
    assert not re.search(r"""(?:href|src)\s*=\s*["']?(?:https?:)?//""", page)
    assert "url(" not in page  # no stylesheet fetches
    images = re.findall(r"<img\b[^>]*>", page)
    assert len(images) >= 3  # curves, memory, step time
    for tag in images:
        m = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', tag)
        assert m, tag[:80]
        width, height = png_size(base64.b64decode(m.group(1), validate=True))
        assert width > 0 and height > 0


def test_matrix_shows_every_cell(stored: StoredRun, written: tuple[Path, Path]) -> None:
    cells = matrix(written[0].read_text(encoding="utf-8"))
    assert set(cells) == {(c.backend, c.pipeline, c.mode) for c in stored.cells}
    colour = {"converged": "good", "parity": "good", "degraded": "warn", "stalled": "bad",
              "diverged": "bad", "broken": "bad"}
    md = written[1].read_text(encoding="utf-8")
    for r in stored.cells:
        cell = cells[r.backend, r.pipeline, r.mode]
        lines = cell["text"].split("\n")
        assert lines[0] == r.outcome
        assert cell["class"] == colour[r.outcome]
        assert f"{r.metric} {r.metrics[r.metric]:.4g}" in lines[1]
        if r.mode == "infer":
            assert f"top-1 {r.agreement['top1']:.3f}" in lines[1]
        port = stored.ports[r.backend, r.pipeline, r.mode]
        if port["effort"] == 0:
            assert "ports as is (effort 0)" in lines
        elif port["effort"] is None:
            assert lines[2].startswith("no fix")
        else:
            assert lines[2] == f"effort {port['effort']}: " + " + ".join(
                m["name"] for m in port["mitigations"])
        assert f"**{r.outcome}**<br>" in md


def test_sections_in_both(written: tuple[Path, Path]) -> None:
    page, md = (p.read_text(encoding="utf-8") for p in written)
    for title in ("Outcome matrix", "Training curves", "Memory", "Predicted step time",
                  "Lowering notes", "Telemetry highlights", "Porting results", "Specs used"):
        assert f"<h2 id=\"{title.lower().replace(' ', '-')}\">{title}</h2>" in page
        assert f"\n## {title}\n" in md


def test_header_and_lowering(stored: StoredRun, written: tuple[Path, Path]) -> None:
    page = written[0].read_text(encoding="utf-8")
    kv = {row[0]["text"]: row[1]["text"] for row in tables(page, "kv")[0]["rows"][1:]}
    assert kv["run"] == "3 (compare)"
    assert kv["status"] == f"finished: {len(stored.cells)} of {len(stored.cells)} cells"
    assert kv["recipe"] == "fp8-hybrid"
    assert kv["recipe description"] == stored.recipe["description"]
    assert kv["seed"] == "0" and kv["steps"] == "20"
    assert kv["created"] == "2025-01-05 10:00:00 UTC"
    assert kv["finished"] == "2025-01-05 10:00:40 UTC (after 40 s)"
    assert "Partial run" not in page
    for c in stored.cells:
        for note in c.lowering:
            assert f"<li>{html.escape(note)}</li>" in page


def test_telemetry_totals(stored: StoredRun, written: tuple[Path, Path]) -> None:
    page = written[0].read_text(encoding="utf-8")
    (table,) = [t for t in tables(page) if t["rows"][0][1]["text"] == "cell"
                and any(c["text"] == "underflow" for c in t["rows"][0])]
    header = [c["text"] for c in table["rows"][0]]
    rows = {(r[0]["text"], r[1]["text"].replace("\u00a0", " ")): r for r in table["rows"][1:]}
    noisy = 0
    for c in stored.cells:
        under = sum(v["underflow"] for v in c.telemetry["rounding"].values())
        if under:
            noisy += 1
            row = rows[c.backend, f"{c.pipeline} {c.mode}"]
            assert row[header.index("underflow")]["text"] == f"{under:,}"
    assert noisy  # FP8 on these backends underflows somewhere


def test_porting_section(stored: StoredRun, written: tuple[Path, Path]) -> None:
    page = written[0].read_text(encoding="utf-8")
    searched = [p for p in stored.ports.values() if p["effort"] != 0 or p["rejected"]]
    for p in searched:
        assert f"<h3>{p['backend']}: {p['pipeline']} {p['mode']}</h3>" in page
        for m in p["mitigations"]:
            assert f"<code>{html.escape(m['name'])}</code>" in page


def test_searched_port(stored: StoredRun, tmp_path: Path) -> None:
    """A cell the search fixed and one it could not: before and after, effort, mitigations
    with their evidence, the diagnosis and the rejected trials."""
    run = copy.deepcopy(stored)
    fixed = next(c for c in run.cells if c.backend == "dojo" and c.mode == "train")
    failed = next(c for c in run.cells if c.backend == "simgpu" and c.mode == "infer")
    run.ports[fixed.backend, fixed.pipeline, fixed.mode] = porting.PortResult(
        backend=fixed.backend, pipeline=fixed.pipeline, mode=fixed.mode, recipe=fixed.recipe,
        outcome_before="degraded", outcome_after="converged",
        mitigations=[{"name": "loss-scaling", "changes": "loss_scaling.check='overflow_flags'",
                      "evidence": "179 of 1,330 backward values underflowed to zero"}],
        rejected=[porting.Trial(("stochastic-rounding",), "degraded", 20.5, 1.5)],
        trials=3, emulated_s=4.5, effort=1,
        evidence={"gradient_underflow": "179 of 1,330 backward values underflowed to zero"},
        not_applicable=["fp8-current-scaling"]).to_dict()
    run.ports[failed.backend, failed.pipeline, failed.mode] = porting.PortResult(
        backend=failed.backend, pipeline=failed.pipeline, mode=failed.mode,
        recipe=failed.recipe, outcome_before="degraded", outcome_after="degraded",
        mitigations=[], rejected=[porting.Trial(("fp8-current-scaling",), "degraded", 0.97,
                                                0.1)],
        trials=2, emulated_s=0.2, effort=None, searched_all=True).to_dict()
    page, md = (p.read_text(encoding="utf-8") for p in report.write(run, tmp_path))
    cells = matrix(page)
    assert "effort 1: loss-scaling" in cells[fixed.backend, fixed.pipeline, fixed.mode]["text"]
    assert "no fix: tried every set (1)" in cells[failed.backend, failed.pipeline,
                                                    failed.mode]["text"]
    for text in (page, md):
        assert "degraded \u2192 converged" in text and "degraded \u2192 degraded" in text
        assert "179 of 1,330 backward values underflowed to zero" in text
        assert "overflow" in text and "fp8-current-scaling" in text
        assert "stochastic-rounding: degraded, metric 20.5" in text
    assert f"<h3>{fixed.backend}: {fixed.pipeline} {fixed.mode}</h3>" in page
    assert f"### {failed.backend}: {failed.pipeline} {failed.mode}" in md


def test_specs_in_full(stored: StoredRun, written: tuple[Path, Path]) -> None:
    page, md = (p.read_text(encoding="utf-8") for p in written)
    blocks = re.findall(r"<details><summary>(.*?): the full spec \(JSON\)</summary><pre><code>"
                        r"(.*?)</code></pre></details>", page, re.S)
    assert [name for name, _ in blocks] == BACKENDS
    for name, text in blocks:
        assert json.loads(html.unescape(text)) == finite(stored.specs[name])
        assert html.escape(stored.specs[name]["description"]) in page
    fenced = re.findall(r"```json\n(.*?)\n```", md, re.S)
    assert [json.loads(t) for t in fenced] == [finite(stored.specs[b]) for b in BACKENDS]


def test_markdown_images_exist(written: tuple[Path, Path]) -> None:
    page, md = (p.read_text(encoding="utf-8") for p in written)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == page.count("<img ")
    for link in links:
        assert not link.startswith(("/", "http")), link
        width, height = png_size((written[1].parent / link).read_bytes())
        assert width > 0 and height > 0


def test_markdown_tables_are_well_formed(written: tuple[Path, Path]) -> None:
    md = written[1].read_text(encoding="utf-8")
    lines = md.split("\n")
    for i, line in enumerate(lines):
        if re.fullmatch(r"\|(?:-{3}|-{3}:)(?:\|(?:-{3}|-{3}:))*\|", line):
            columns = line.count("|") - 1
            j = i + 1
            while j < len(lines) and lines[j].startswith("| "):
                cells = re.split(r"(?<!\\)\|", lines[j])[1:-1]
                assert len(cells) == columns, lines[j]
                j += 1


def test_same_run_same_bytes(stored: StoredRun, written: tuple[Path, Path],
                             tmp_path: Path) -> None:
    html_path, md_path = report.write(stored, tmp_path)
    assert html_path.read_bytes() == written[0].read_bytes()
    assert md_path.read_bytes() == written[1].read_bytes()
    first = sorted(p.name for p in (written[1].parent / "images").iterdir())
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == first


def test_rewrite_replaces_an_earlier_report(stored: StoredRun, tmp_path: Path) -> None:
    report.write(stored, tmp_path)
    run = copy.deepcopy(stored)
    run.cells = [c for c in run.cells if c.mode == "infer"]  # no curves this time
    html_path, md_path = report.write(run, tmp_path)
    links = re.findall(r"!\[[^\]]*\]\(images/([^)]+)\)", md_path.read_text(encoding="utf-8"))
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted(links)
    assert "curves" not in " ".join(links)
    assert "The run has no training cells." in html_path.read_text(encoding="utf-8")


def test_partial_run(stored: StoredRun, tmp_path: Path) -> None:
    run = copy_run(stored, status="interrupted", finished=None,
                   cells_done=len(stored.cells) - 1)
    dropped = run.cells.pop()
    html_path, md_path = report.write(run, tmp_path)
    page, md = html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")
    total = len(stored.cells)
    for text in (page, md):
        assert "Partial run" in text and "interrupted" in text
        assert f"{total - 1} of {total} cells" in text
    cell = matrix(page)[dropped.backend, dropped.pipeline, dropped.mode]
    assert cell["text"] == "not run" and cell["class"] == "none"
    assert "| not run |" in md or "| not run" in md


def test_diverged_cell_with_nan_points(stored: StoredRun, tmp_path: Path) -> None:
    run = copy.deepcopy(stored)
    r = next(c for c in run.cells if c.mode == "train" and c.backend != "reference")
    r.outcome = "diverged"
    half = len(r.curve) // 2
    for point in r.curve[half:]:
        point["loss"] = math.nan
        if "val_loss" in point:
            point["val_loss"] = math.inf
    r.curve[half - 1]["loss"] = 1e30  # a blow-up just before
    r.metrics = {k: math.nan for k in r.metrics}
    r.telemetry["rounding"].setdefault("forward/matmul_input", {"elements": 1, "overflow": 0,
                                    "underflow": 0, "nonfinite": 0})["nonfinite"] = 12
    html_path, md_path = report.write(run, tmp_path)
    page = html_path.read_text(encoding="utf-8")
    cell = matrix(page)[r.backend, r.pipeline, r.mode]
    assert cell["text"].startswith("diverged\n") and cell["class"] == "bad"
    assert f"{r.metric} nan" in cell["text"]
    assert page.count("<img ") == md_path.read_text(encoding="utf-8").count("![") == 3
    (table,) = [t for t in tables(page) if any(c["text"] == "non-finite" for c in t["rows"][0])]
    header = [c["text"] for c in table["rows"][0]]
    row = next(row for row in table["rows"][1:] if row[0]["text"] == r.backend
               and row[1]["text"] == f"{r.pipeline}\u00a0{r.mode}")
    assert row[header.index("non-finite")]["text"] == "12"


def test_every_cell_diverged_from_the_start(stored: StoredRun, tmp_path: Path) -> None:
    run = copy.deepcopy(stored)
    for r in run.cells:
        r.curve = [{"step": p["step"], "loss": math.nan} for p in r.curve]
        r.reference_curve = []
    report.write(run, tmp_path)  # nothing finite to draw: still a report


def test_empty_run(stored: StoredRun, tmp_path: Path) -> None:
    run = copy_run(stored, status="failed", finished=None, cells_done=0, params={},
                   error="killed")
    run.cells, run.ports = [], {}
    page = report.write(run, tmp_path)[0].read_text(encoding="utf-8")
    assert "0 of " in page and "killed" in page and "<img" not in page


def test_data_is_escaped(stored: StoredRun, tmp_path: Path) -> None:
    run = copy.deepcopy(stored)
    r = run.cells[0]
    r.lowering = [*r.lowering, "<script>alert(1)</script> a|b"]
    key = (r.backend, r.pipeline, r.mode)
    run.ports[key] = dict(run.ports[key], effort=1,
                          mitigations=[{"name": "x|<y>", "changes": "", "evidence": ""}])
    html_path, md_path = report.write(run, tmp_path)
    page, md = html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; a|b" in page
    assert "effort 1: x|&lt;y&gt;" in page
    assert "effort 1: x\\|\\<y\\>" in md
    assert "<script>" not in md


def test_unwritable_out(stored: StoredRun, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(HwportError) as e:
        report.write(stored, blocker / "report")
    assert str(e.value) == f"report: cannot write {blocker / 'report'} (Not a directory)"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium on PATH")
def test_renders_in_chromium(written: tuple[Path, Path], tmp_path: Path) -> None:
    from matplotlib.image import imread

    shot = tmp_path / "shot.png"
    env = dict(os.environ, CHROMIUM=shutil.which("chromium") or "", RENDER_TIMEOUT="90")
    subprocess.run(["bash", str(RENDER), str(written[0]), str(shot), "1200x2400"],
                   check=True, timeout=120, env=env, capture_output=True)
    assert png_size(shot.read_bytes()) == (1200, 2400)
    pixels = imread(shot)[:, :, :3]
    colours = {tuple(p) for p in pixels[::4, ::4].reshape(-1, 3).tolist()}
    assert len(colours) > 200  # text, tables, coloured cells, charts: not a blank page
    assert float(pixels.std()) > 0.05
