"""The report a person reads: one stored run as a self-contained HTML page and as Markdown.

:func:`write` turns a :class:`~hwport.store.StoredRun` into ``report.html`` (CSS inline,
every chart embedded as a base64 PNG data URI, nothing fetched from anywhere) and
``report.md`` (GitHub-flavoured Markdown, its charts written as PNG files under
``images/`` and linked relatively). Both carry the same sections, in this order:

1. **Header**: run id, kind, created and finished times, status (a run that did not
   finish says it is partial, with how many of its cells it holds), hwport version,
   recipe and its description, seed, steps, world size.
2. **Outcome matrix**: one row per pipeline and mode, one column per backend (the layout
   of ``hwport compare``); each cell its outcome, the headline metric, inference's top-1
   agreement and, when the run searched ports, the effort. Cells the run lacks: "not run".
3. **Training curves**: per pipeline with training cells, validation loss and training
   loss (moving average) of every backend, and the fp32 reference once, black dashed.
   Non-finite points are left out; the step where a run went non-finite is marked.
4. **Memory**: per pipeline and mode, bytes per backend stacked by memory tier, and a
   table of bytes by role, whether the plan fits and its binding tier.
5. **Predicted step time**: per pipeline and mode, each backend's predicted step (log
   scale) and the share of it bound by compute, by each memory tier and by collectives.
6. **Lowering notes**: per backend, what the recipe asked for and what it got instead.
7. **Telemetry highlights**: the cells whose numerics did something notable (overflow,
   underflow, non-finite values, skipped steps, lost updates, a moving loss scale, eager
   execution, all-reduce error); the others are named in one line.
8. **Porting results** (runs that searched ports): before and after, effort, mitigations
   with their evidence, and the trials.
9. **Specs used**: a summary of every backend's spec and its full JSON.

Everything shown comes from the stored run; the charts are drawn with matplotlib's Agg
canvas (no pyplot state) and saved without a timestamp or software tag, so the same run
gives byte-identical files.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from hwport import __version__
from hwport.errors import HwportError
from hwport.memory import finite
from hwport.spec import seconds, si

if TYPE_CHECKING:  # torch stays unimported: a report reads stored data only
    from hwport.runner import RunResult
    from hwport.store import StoredRun

__all__ = ["write"]

GOOD = ("converged", "parity")
WARN = ("degraded",)
BAD = ("stalled", "diverged", "broken")

# Okabe-Ito, colour-blind safe; backends take them in the run's order
BACKEND_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00",
                   "#F0E442", "#7F7F7F")
TIER_COLOURS = ("#4C72B0", "#55A868", "#C44E52", "#8172B2", "#CCB974", "#64B5CD",
                "#8C8C8C", "#DA8BC3")
COMPUTE_COLOUR = "#2F3B4C"
COLLECTIVES_COLOUR = "#B07AA1"
UNPLACED_COLOUR = "#D62728"
DPI = 110


# -- numbers as text ---------------------------------------------------------------------
def _f(x: Any) -> float:
    """A stored number as a float: None and unparsable values as NaN, "inf" as inf."""
    if isinstance(x, bool):
        return float(x)
    if isinstance(x, int | float):
        return float(x)
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return math.nan
    return math.nan


def _bytes(value: float) -> str:
    return si(value, "B")


def _count(n: Any) -> str:
    v = _f(n)
    return f"{int(v):,}" if math.isfinite(v) and v == int(v) else f"{v:.4g}"


def _metric(v: Any) -> str:
    return f"{_f(v):.4g}"


def _outcome_class(outcome: str) -> str:
    return "good" if outcome in GOOD else "warn" if outcome in WARN else \
        "bad" if outcome in BAD else "other"


def _slug(text: str) -> str:
    """The anchor GitHub gives a Markdown heading (the HTML uses the same ids)."""
    s = re.sub(r"[^\w\- ]", "", text.lower()).strip().replace(" ", "-")
    return s or "section"


def _file_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "x"


# -- the document, independent of its rendering -------------------------------------------
@dataclass
class Span:
    """Inline text; ``style`` is "" (plain), "b" (bold), "code" or "dim"."""

    text: str
    style: str = ""


Inline = str | Span | Sequence[str | Span]


@dataclass
class Para:
    content: Inline
    css: str = ""  # "banner" for a partial run's warning, "note" for small print


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Cell:
    """A table cell: lines of inline content; ``css`` colours it (good, warn, bad, none)."""

    lines: list[Inline]
    css: str = ""


@dataclass
class Table:
    header: list[str]
    rows: list[list[Cell]]
    css: str = ""  # "matrix", "kv"
    numeric: frozenset[int] = frozenset()  # columns aligned right


@dataclass
class Chart:
    name: str  # file name under images/, without .png
    png: bytes
    alt: str


@dataclass
class Bullets:
    items: list[Inline]


@dataclass
class Code:
    summary: str  # the <details> summary in HTML, a bold line above the block in Markdown
    text: str
    lang: str = "json"


Block = Para | Heading | Table | Chart | Bullets | Code


def _pruned(t: Table) -> Table:
    """``t`` without the columns (after the first) in which every cell is "-"."""
    keep = [i for i in range(len(t.header))
            if i == 0 or any(c.lines != ["-"] for c in (row[i] for row in t.rows))]
    numeric = frozenset(j for j, i in enumerate(keep) if i in t.numeric)
    return Table([t.header[i] for i in keep], [[row[i] for i in keep] for row in t.rows],
                 t.css, numeric)


def _cell(*lines: Inline, css: str = "") -> Cell:
    return Cell(list(lines), css)


def _cells(*values: Inline) -> list[Cell]:
    return [Cell([v]) for v in values]


@dataclass
class _Doc:
    title: str
    blocks: list[Block] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)

    def section(self, title: str) -> None:
        self.sections.append(title)
        self.blocks.append(Heading(2, title))

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)


# -- the grid of a run ----------------------------------------------------------------------
def _ordered(preferred: Any, seen: Iterable[str]) -> list[str]:
    """``preferred`` (a list of names from the run's params, if it is one) then the rest of
    ``seen`` in order of first appearance."""
    names = [str(x) for x in preferred] if isinstance(preferred, list | tuple) else []
    for s in seen:
        if s not in names:
            names.append(s)
    return names


@dataclass
class _Grid:
    backends: list[str]
    pipelines: list[str]
    modes: list[str]

    @classmethod
    def of(cls, run: StoredRun) -> _Grid:
        params = run.record.params or {}
        cells = run.cells
        return cls(_ordered(params.get("backends"), [c.backend for c in cells]),
                   _ordered(params.get("pipelines"), [c.pipeline for c in cells]),
                   _ordered(params.get("modes"), [c.mode for c in cells]))

    def rows(self) -> list[tuple[str, str]]:
        return [(p, m) for p in self.pipelines for m in self.modes]


def _colours(names: Sequence[str], palette: Sequence[str]) -> dict[str, str]:
    return {n: palette[i % len(palette)] for i, n in enumerate(names)}


# -- the sections ---------------------------------------------------------------------------
def _header(doc: _Doc, run: StoredRun, grid: _Grid) -> None:
    rec = run.record
    recipe = run.recipe or {}
    done, total = len(run.cells), rec.cells_total
    if rec.status != "finished":
        doc.add(Para([Span(f"Partial run ({rec.status}): ", "b"),
                      f"{done} of {total} cells. Cells it lacks show as \u201cnot run\u201d."
                      + (f" Error: {rec.error}" if rec.error else "")], "banner"))
    if rec.steps is not None:
        steps = str(rec.steps)
    else:
        per = {c.pipeline: c.steps for c in run.cells}
        steps = "each pipeline's default" + (
            ": " + ", ".join(f"{p} {s}" for p, s in per.items()) if per else "")
    finished = "not finished"
    if rec.finished:
        took = _elapsed(rec.created, rec.finished)
        finished = _when(rec.finished) + (f" (after {took})" if took else "")
    rows = [
        ("run", f"{rec.id} ({rec.kind})"),
        ("status", f"{rec.status}: {done} of {total} cells"),
        ("created", _when(rec.created)),
        ("finished", finished),
        ("recipe", str(recipe.get("name", rec.recipe))),
        ("recipe description", str(recipe.get("description", "")) or "-"),
        ("seed", str(rec.seed)),
        ("steps", steps),
        ("world size", str(rec.world_size)),
        ("backends", ", ".join(grid.backends) or "-"),
        ("pipelines / modes", f"{', '.join(grid.pipelines) or '-'} / "
                              f"{', '.join(grid.modes) or '-'}"),
        ("hwport", f"{rec.hwport_version} ({rec.framework})"),
    ]
    if rec.error and rec.status == "finished":
        rows.append(("error", rec.error))
    doc.add(Table(["", ""], [[_cell(Span(k, "b")), _cell(v)] for k, v in rows], "kv"))


def _when(iso: str) -> str:
    """An ISO 8601 time as ``2025-01-05 10:00:00 UTC`` (as stored if it does not parse)."""
    try:
        t = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    if t.utcoffset() == timedelta(0):
        return t.strftime("%Y-%m-%d %H:%M:%S UTC")
    return t.isoformat(sep=" ", timespec="seconds")


def _elapsed(start: str, end: str) -> str:
    """The time from ``start`` to ``end`` (ISO 8601), as "1 min 30 s"; "" if unknown."""
    try:
        s = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except (ValueError, TypeError):
        return ""
    if s < 0:
        return ""
    if s < 60:
        return f"{s:.0f} s"
    m, sec = divmod(round(s), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m} min" if h else f"{m} min {sec} s"


def _effort_text(port: dict[str, Any]) -> str:
    """What a port search found, as ``hwport compare --port`` says it."""
    effort = port.get("effort")
    if effort == 0:
        return "ports as is (effort 0)"
    if effort is None:
        trials = int(_f(port.get("trials", 1)))
        return (f"no fix: tried every set ({trials - 1})" if port.get("searched_all")
                else f"no fix within {trials} trials")
    names = " + ".join(str(m.get("name", "?")) for m in port.get("mitigations", []))
    return f"effort {effort}: {names}" if names else f"effort {effort}"


def _headline(r: RunResult) -> str:
    text = f"{r.metric} {_metric(r.metrics.get(r.metric))}"
    if r.mode == "infer" and "top1" in r.agreement:
        text += f", top-1 {_f(r.agreement['top1']):.3f}"
    return text


def _matrix(doc: _Doc, run: StoredRun, grid: _Grid) -> None:
    doc.section("Outcome matrix")
    doc.add(Para("Each cell is the outcome against the reference backend's fp32 run with the "
                 "same seed (training: converged, degraded, stalled or diverged; inference: "
                 "parity, degraded or broken), the headline metric, for inference the top-1 "
                 "agreement with the reference model's outputs"
                 + (", and the porting effort." if run.ports else ".")))
    if not grid.backends:
        doc.add(Para("The run holds no cells."))
        return
    rows = []
    for p, m in grid.rows():
        row = [_cell(Span(p, "b"), m)]
        for b in grid.backends:
            r = run.cell(b, p, m)
            if r is None:
                row.append(_cell("not run", css="none"))
                continue
            lines: list[Inline] = [Span(r.outcome, "b"), _headline(r)]
            port = run.ports.get((b, p, m))
            if port is not None:
                lines.append(_effort_text(port))
            if (b, p, m) in run.reused:
                lines.append(Span(f"reused from run {run.reused[b, p, m]}", "dim"))
            row.append(Cell(lines, _outcome_class(r.outcome)))
        rows.append(row)
    doc.add(Table(["pipeline / mode", *grid.backends], rows, "matrix"))


def _finite_series(points: Iterable[dict[str, Any]], key: str) -> tuple[list[float],
                                                                         list[float]]:
    xs, ys = [], []
    for pt in points:
        if key in pt:
            x, y = _f(pt.get("step")), _f(pt[key])
            if math.isfinite(x) and math.isfinite(y):
                xs.append(x)
                ys.append(y)
    return xs, ys


def _first_nonfinite(points: Iterable[dict[str, Any]]) -> float | None:
    """The first step at which a loss or validation loss is NaN or infinite."""
    for pt in points:
        for key in ("loss", "val_loss"):
            if key in pt and not math.isfinite(_f(pt[key])):
                return _f(pt.get("step"))
    return None


def _moving_average(ys: Sequence[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points (fewer at the start)."""
    if window <= 1 or not ys:
        return list(ys)
    c = np.concatenate([[0.0], np.cumsum(np.asarray(ys, dtype=float))])
    idx = np.arange(1, len(ys) + 1)
    lo = np.maximum(idx - window, 0)
    return list((c[idx] - c[lo]) / (idx - lo))


def _scale_y(ax: Axes, values: Sequence[float]) -> None:
    """Log scale when every value is positive and they span more than a factor of 20."""
    pos = [v for v in values if v > 0]
    if pos and len(pos) == len(values) and max(pos) / min(pos) > 20:
        ax.set_yscale("log")


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _style(ax: Axes) -> None:
    ax.grid(True, color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _curves_chart(run: StoredRun, grid: _Grid, pipeline: str,
                  colours: dict[str, str]) -> Chart | None:
    cells = [c for b in grid.backends if (c := run.cell(b, pipeline, "train")) is not None]
    if not cells:
        return None
    fig = Figure(figsize=(10.5, 4.0), layout="constrained")
    ax_val, ax_loss = fig.subplots(1, 2)
    val_values: list[float] = []
    loss_values: list[float] = []
    steps = max((c.steps for c in cells), default=1)
    window = max(1, steps // 40)
    marked = 0  # runs marked non-finite so far (their labels stack down)
    for c in cells:
        colour = colours[c.backend]
        label = f"{c.backend}: {c.outcome}"
        xs, ys = _finite_series(c.curve, "val_loss")
        ax_val.plot(xs, ys, color=colour, linewidth=2.0, marker="o", markersize=3.5,
                    label=label, zorder=2)
        val_values += ys
        lx, ly = _finite_series(c.curve, "loss")
        smooth = _moving_average(ly, window)
        ax_loss.plot(lx, smooth, color=colour, linewidth=1.6, label=label, zorder=2)
        loss_values += smooth
        bad = _first_nonfinite(c.curve)
        if bad is not None and math.isfinite(bad):
            marked += 1
            for ax, (px, py) in ((ax_val, (xs, ys)), (ax_loss, (lx, smooth))):
                ax.axvline(bad, color=colour, linestyle=":", linewidth=1.2, zorder=1)
                if px:
                    ax.plot([px[-1]], [py[-1]], marker="X", markersize=10, color=colour,
                            markeredgecolor="black", zorder=4)
            ax_val.annotate(f"{c.backend} non-finite at step {bad:g}", xy=(bad, 1.0),
                            xycoords=("data", "axes fraction"), xytext=(-4, -1 - 11 * marked),
                            textcoords="offset points", ha="right", fontsize=8,
                            color=colour)
    ref = next((c.reference_curve for c in cells if c.reference_curve), [])
    if ref:
        xs, ys = _finite_series(ref, "val_loss")
        ax_val.plot(xs, ys, color="black", linestyle="--", linewidth=1.3,
                    label="reference fp32", zorder=3)
        val_values += ys
        lx, ly = _finite_series(ref, "loss")
        smooth = _moving_average(ly, window)
        ax_loss.plot(lx, smooth, color="black", linestyle="--", linewidth=1.1,
                     label="reference fp32", zorder=3)
        loss_values += smooth
    _scale_y(ax_val, val_values)
    _scale_y(ax_loss, loss_values)
    ax_val.set_title(f"{pipeline}: validation loss", fontsize=11)
    avg = f" (moving average of {window} steps)" if window > 1 else ""
    ax_loss.set_title(f"{pipeline}: training loss{avg}", fontsize=11)
    for ax in (ax_val, ax_loss):
        ax.set_xlabel("step")
        _style(ax)
    ax_val.set_ylabel("loss")
    if val_values or loss_values:
        ax_val.legend(fontsize=8.5, frameon=False)
    else:
        ax_val.text(0.5, 0.5, "no finite points", transform=ax_val.transAxes, ha="center")
    return Chart(f"curves-{_file_part(pipeline)}", _png(fig),
                 f"{pipeline}: validation and training loss per backend")


def _curves(doc: _Doc, run: StoredRun, grid: _Grid, colours: dict[str, str]) -> None:
    doc.section("Training curves")
    charts = [c for p in grid.pipelines if (c := _curves_chart(run, grid, p, colours))]
    if not charts:
        doc.add(Para("The run has no training cells."))
        return
    doc.add(Para("Validation loss at each evaluation and training loss at every step, per "
                 "backend; the black dashed line is the fp32 training on the reference "
                 "backend from the same seed. NaN and inf points are left out; a dotted "
                 "line and a cross mark where a run went non-finite."))
    doc.add(*charts)


def _tiers_of(run: StoredRun, cells: Iterable[RunResult]) -> list[str]:
    """Tier names in the order the specs list them (fastest first), then any others."""
    names: list[str] = []
    for c in cells:
        spec_tiers = [str(t.get("name")) for t in
                      run.specs.get(c.backend, {}).get("memory", {}).get("tiers", [])]
        used = [t for where in c.memory.get("placement", {}).values() for t in where]
        for t in [*(s for s in spec_tiers if s in used), *used]:
            if t not in names:
                names.append(t)
    return names


def _tier_bytes(r: RunResult) -> dict[str, float]:
    out: dict[str, float] = {}
    for where in r.memory.get("placement", {}).values():
        for tier, n in where.items():
            out[tier] = out.get(tier, 0.0) + _f(n)
    return out


def _bytes_formatter() -> FuncFormatter:
    return FuncFormatter(lambda v, _pos: _bytes(v) if v else "0")


LegendPlace = Literal["outside right upper", "outside lower center"]


def _figure_legend(fig: Figure, axes: Iterable[Axes], loc: LegendPlace, ncols: int = 1
                   ) -> None:
    """One legend for the figure: every label of ``axes`` once, in order of appearance."""
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries), loc=loc, fontsize=8.5,
                   frameon=False, ncols=min(ncols, len(entries)))


def _memory_chart(run: StoredRun, pipeline: str, cells_by_mode: dict[str, list[RunResult]],
                  tier_colours: dict[str, str]) -> Chart:
    modes = list(cells_by_mode)
    width = max(4.2, 1.1 * max(len(c) for c in cells_by_mode.values()) + 1.6)
    fig = Figure(figsize=(min(10.5, width * len(modes)), 3.8), layout="constrained")
    axes = fig.subplots(1, len(modes), squeeze=False)[0]
    for ax, mode in zip(axes, modes, strict=True):
        cells = cells_by_mode[mode]
        names = [c.backend for c in cells]
        x = np.arange(len(cells))
        bottom = np.zeros(len(cells))
        for tier in _tiers_of(run, cells):
            heights = np.array([_tier_bytes(c).get(tier, 0.0) for c in cells])
            if not heights.any():
                continue
            ax.bar(x, heights, 0.6, bottom=bottom, color=tier_colours[tier], label=tier,
                   edgecolor="white", linewidth=0.6)
            bottom += heights
        unplaced = np.array([max(_f(c.memory.get("unplaced", 0.0)), 0.0) for c in cells])
        if unplaced.any():
            ax.bar(x, unplaced, 0.6, bottom=bottom, color="white", label="unplaced",
                   edgecolor=UNPLACED_COLOUR, hatch="///", linewidth=1.0)
            bottom += unplaced
        top = float(bottom.max()) if len(bottom) else 0.0
        for xi, total, c in zip(x, bottom, cells, strict=True):
            fits = c.memory.get("fits", True)
            ax.text(xi, total + top * 0.015, _bytes(float(total)) + ("" if fits else
                    "\ndoes not fit"), ha="center", va="bottom", fontsize=8.5,
                    color="black" if fits else UNPLACED_COLOUR)
        ax.set_ylim(0, top * 1.18 if top > 0 else 1)
        ax.set_xticks(x, names)
        ax.yaxis.set_major_formatter(_bytes_formatter())
        ax.set_title(f"{pipeline} {mode}: bytes per device by tier", fontsize=10.5)
        _style(ax)
        ax.grid(False, axis="x")
    _figure_legend(fig, axes, "outside right upper")
    return Chart(f"memory-{_file_part(pipeline)}", _png(fig),
                 f"{pipeline}: bytes per device on each backend, stacked by memory tier")


def _by_mode(run: StoredRun, grid: _Grid, pipeline: str,
             has: Callable[[RunResult], bool]) -> dict[str, list[RunResult]]:
    """The cells of ``pipeline`` that ``has`` something to show, by mode, in grid order."""
    return {m: cells for m in grid.modes
            if (cells := [c for b in grid.backends
                          if (c := run.cell(b, pipeline, m)) is not None and has(c)])}


def _memory(doc: _Doc, run: StoredRun, grid: _Grid, tier_colours: dict[str, str]) -> None:
    doc.section("Memory")
    doc.add(Para("What one step holds per device, by role, placed on each backend's memory "
                 "tiers (fastest first; what no tier holds is unplaced and the plan does not "
                 "fit). The binding tier is the fastest tier that filled up."))
    any_plan = False
    for p in grid.pipelines:
        by_mode = _by_mode(run, grid, p, lambda c: bool(c.memory))
        if not by_mode:
            continue
        any_plan = True
        doc.add(Heading(3, p), _memory_chart(run, p, by_mode, tier_colours))
        for m, cells in by_mode.items():
            roles = list(dict.fromkeys(k for c in cells for k in c.memory.get("bytes", {})))
            rows = []
            for c in cells:
                mem = c.memory
                tiers = _tier_bytes(c)
                where = "; ".join(f"{t} {_bytes(n)}" for t, n in tiers.items() if n) or "-"
                unplaced = _f(mem.get("unplaced", 0.0))
                fits = "yes" if mem.get("fits", True) else f"no ({_bytes(unplaced)} unplaced)"
                rows.append([_cell(Span(c.backend, "b")),
                             *_cells(*(_bytes(_f(mem.get("bytes", {}).get(k, 0.0)))
                                       for k in roles)),
                             *_cells(_bytes(_f(mem.get("total", sum(tiers.values())))),
                                     where, fits, str(mem.get("binding") or "-"))])
            cols = ["backend", *(r.replace("_", " ") for r in roles), "total", "tiers",
                    "fits", "binding"]
            doc.add(Para(Span(f"{p} {m}", "b")),
                    Table(cols, rows, numeric=frozenset(range(1, len(roles) + 2))))
    if not any_plan:
        doc.add(Para("No cell of the run has a memory plan."))


def _time_parts(r: RunResult) -> list[tuple[str, float]]:
    """(component, seconds): compute, each memory tier, collectives (non-zero ones)."""
    t = r.time
    parts = [("compute", _f(t.get("compute_s", 0.0)))]
    parts += [(f"memory: {k}", _f(v)) for k, v in t.get("memory_s", {}).items()]
    if r.collectives:
        parts.append(("collectives", _f(r.collectives.get("predicted_s_per_step", 0.0))))
    return [(k, v) for k, v in parts if math.isfinite(v) and v > 0]


def _step_total(r: RunResult) -> float:
    """The predicted step: ``time['step_s']`` plus the all-reduce when the run has one."""
    total = _f(r.time.get("step_s", 0.0))
    if r.collectives:
        total += max(_f(r.collectives.get("predicted_s_per_step", 0.0)), 0.0)
    return total


def _time_chart(pipeline: str, cells_by_mode: dict[str, list[RunResult]],
                tier_colours: dict[str, str]) -> Chart:
    modes = list(cells_by_mode)
    n = max(len(c) for c in cells_by_mode.values())
    fig = Figure(figsize=(10.5, (0.42 * n + 1.25) * len(modes) + 0.5), layout="constrained")
    axes = fig.subplots(len(modes), 2, squeeze=False)
    colours = {"compute": COMPUTE_COLOUR, "collectives": COLLECTIVES_COLOUR,
               **{f"memory: {t}": c for t, c in tier_colours.items()}}
    for row, mode in zip(axes, modes, strict=True):
        ax_total, ax_share = row
        cells = cells_by_mode[mode]
        names = [c.backend for c in cells]
        y = np.arange(len(cells))[::-1]
        totals = [_step_total(c) for c in cells]
        positive = [t for t in totals if math.isfinite(t) and t > 0]
        if positive:
            lo, hi = min(positive), max(positive)
            ax_total.set_xscale("log")
            ax_total.set_xlim(lo / 3, hi * 5)
            for yi, total, c in zip(y, totals, cells, strict=True):
                if math.isfinite(total) and total > 0:
                    ax_total.barh(yi, total, 0.6, color=colours.get(
                        _dominant(c), "#888888"))
                    ax_total.text(total * 1.12, yi, seconds(total), va="center",
                                  fontsize=8.5)
                else:
                    ax_total.text(lo / 2.6, yi, f"0 ({c.time.get('bound') or 'no time'})",
                                  va="center", fontsize=8.5, color="#666666")
            ax_total.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: seconds(v)))
        else:
            ax_total.text(0.5, 0.5, "no predicted time", transform=ax_total.transAxes,
                          ha="center", va="center", color="#666666")
            ax_total.set_xticks([])
        ax_total.set_yticks(y, names)
        ax_total.set_title(f"{pipeline} {mode}: predicted step (log scale)", fontsize=10.5)
        left = np.zeros(len(cells))
        found = [k for c in cells for k, _ in _time_parts(c)]
        components = [k for k in ("compute", *dict.fromkeys(found)) if k in found]
        components = list(dict.fromkeys(components))
        for comp in components:
            shares = []
            for c in cells:
                parts = dict(_time_parts(c))
                whole = sum(parts.values())
                shares.append(parts.get(comp, 0.0) / whole if whole > 0 else 0.0)
            ax_share.barh(y, shares, 0.6, left=left, color=colours.get(comp, "#888888"),
                          label=comp, edgecolor="white", linewidth=0.6)
            left += np.array(shares)
        for yi, c in zip(y, cells, strict=True):
            if not _time_parts(c):
                ax_share.text(0.02, yi, "no time predicted", va="center", fontsize=8.5,
                              color="#666666")
        ax_share.set_xlim(0, 1)
        ax_share.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:.0%}"))
        ax_share.set_yticks(y, names)
        ax_share.set_title(f"{pipeline} {mode}: what bounds the step", fontsize=10.5)
        for ax in row:
            _style(ax)
            ax.grid(False, axis="y")
            ax.set_ylim(-0.5, len(cells) - 0.5)
    _figure_legend(fig, list(axes[:, 1]), "outside lower center", ncols=6)
    return Chart(f"time-{_file_part(pipeline)}", _png(fig),
                 f"{pipeline}: predicted step time per backend and what bounds it")


def _dominant(r: RunResult) -> str:
    parts = _time_parts(r)
    return max(parts, key=lambda kv: kv[1])[0] if parts else ""


def _time(doc: _Doc, run: StoredRun, grid: _Grid, tier_colours: dict[str, str]) -> None:
    doc.section("Predicted step time")
    doc.add(Para("Each op's roofline time on the backend, max(FLOPs / peak of its format, "
                 "bytes / bandwidth of the tier holding the data), summed over one step with "
                 "no overlap, plus the all-reduce when the run is data parallel. Left: the "
                 "step (bar colour: the largest part); right: the share of it bound by "
                 "compute, by each memory tier and by collectives."))
    any_time = False
    for p in grid.pipelines:
        by_mode = _by_mode(run, grid, p, lambda c: bool(c.time))
        if not by_mode:
            continue
        any_time = True
        doc.add(Heading(3, p), _time_chart(p, by_mode, tier_colours))
        for m, cells in by_mode.items():
            rows = []
            for c in cells:
                t = c.time
                mem = "; ".join(f"{k} {seconds(_f(v))}" for k, v in
                                t.get("memory_s", {}).items() if _f(v)) or "-"
                coll = "-"
                if c.collectives:
                    co = c.collectives
                    share = _f(co.get("share_of_step"))
                    coll = (f"{co.get('algorithm', '?')} {co.get('op', 'all_reduce')}, "
                            f"{seconds(_f(co.get('predicted_s_per_step')))}"
                            + (f" ({share:.0%})" if math.isfinite(share) else ""))
                pf = _f(t.get("peak_fraction"))
                flops = "; ".join(f"{k} {si(_f(v), 'FLOP')}" for k, v in
                                  t.get("flops", {}).items()) or "-"
                notes = "; ".join(str(n) for n in t.get("notes", []))
                rows.append([_cell(Span(c.backend, "b")), *_cells(
                    seconds(_step_total(c)), str(t.get("bound", "-")),
                    seconds(_f(t.get("compute_s", 0.0))), mem, coll,
                    f"{pf:.1%}" if math.isfinite(pf) else "-", flops,
                    _bytes(_f(t.get("bytes_moved", 0.0))), notes or "-")])
            doc.add(Para(Span(f"{p} {m}", "b")),
                    _pruned(Table(["backend", "step", "bound", "compute", "memory",
                                   "collectives", "of peak", "matmul FLOPs", "bytes moved",
                                   "notes"], rows, numeric=frozenset({1, 3, 6, 8}))))
    if not any_time:
        doc.add(Para("No cell of the run has a predicted step time."))


def _lowering(doc: _Doc, run: StoredRun, grid: _Grid) -> None:
    doc.section("Lowering notes")
    notes = {b: list(dict.fromkeys(n for c in run.cells if c.backend == b
                                   for n in c.lowering)) for b in grid.backends}
    if not any(notes.values()):
        doc.add(Para("Every backend had everything the recipe asks for."))
        return
    doc.add(Para("Where a backend lacks what the recipe asks for, what it got instead."))
    for b, ns in notes.items():
        if ns:
            doc.add(Para(Span(b, "b")), Bullets(list(ns)))
        else:
            doc.add(Para([Span(b, "b"), ": as the recipe asks"]))


def _telemetry_row(c: RunResult) -> list[Cell] | None:
    """One highlights row, or None when nothing about the cell's numerics is notable."""
    t = c.telemetry
    rounding = t.get("rounding", {})
    over = sum(int(_f(v.get("overflow", 0))) for v in rounding.values())
    under = sum(int(_f(v.get("underflow", 0))) for v in rounding.values())
    nonfinite = sum(int(_f(v.get("nonfinite", 0))) for v in rounding.values())
    skipped = int(_f(t.get("skipped_steps", 0)))
    lost = _f(t.get("lost_update_fraction", 0.0))
    scales = [v for v in (_f(s) for s in t.get("loss_scale", [])) if not math.isnan(v)]
    execution = str(t.get("execution", ""))
    grad_err = _f(c.collectives.get("gradient_error", {}).get("max_relative", 0.0)) \
        if c.collectives else 0.0
    moving = bool(scales) and min(scales) != max(scales)
    if not (over or under or nonfinite or skipped or lost > 0 or moving
            or execution.startswith("eager") or grad_err > 0):
        return None
    sites = sorted(((k, int(_f(v.get("overflow", 0))) + int(_f(v.get("underflow", 0)))
                     + int(_f(v.get("nonfinite", 0)))) for k, v in rounding.items()),
                   key=lambda kv: -kv[1])
    where = "; ".join(f"{k} {n:,}" for k, n in sites[:2] if n) or "-"
    scale = "-"
    if scales:
        scale = (f"{min(scales):,.6g} to {max(scales):,.6g} (last {scales[-1]:,.6g})"
                 if moving else f"{scales[0]:,.6g} (constant)")
    updates = "-"
    if _f(t.get("updates_attempted", 0)):
        updates = f"{lost:.1%} of {_count(t.get('updates_attempted'))}"
    return [_cell(Span(c.backend, "b")), *_cells(
        f"{c.pipeline}\u00a0{c.mode}", _count(over) if over else "-",
        _count(under) if under else "-", _count(nonfinite) if nonfinite else "-", where,
        str(skipped) if skipped else "-", updates, scale,
        f"{grad_err:.2g}" if grad_err > 0 else "-", execution or "-")]


def _telemetry(doc: _Doc, run: StoredRun, grid: _Grid) -> None:
    doc.section("Telemetry highlights")
    rows, quiet = [], []
    for p, m in grid.rows():
        for b in grid.backends:
            c = run.cell(b, p, m)
            if c is None:
                continue
            row = _telemetry_row(c)
            if row is None:
                quiet.append(f"{b} {p} {m}")
            else:
                rows.append(row)
    if rows:
        doc.add(Para("Cells whose numerics did something notable: values that overflowed, "
                     "underflowed to zero or became NaN/inf when rounded (in all, and the "
                     "two sites with most), skipped optimizer steps, weight updates lost to "
                     "rounding, a loss scale that moved, the all-reduced gradients' largest "
                     "relative error, and training steps that ran eagerly instead of "
                     "captured."),
                _pruned(Table(["backend", "cell", "overflow", "underflow", "non-finite",
                               "where most", "skipped steps", "updates lost", "loss scale",
                               "all-reduce error", "execution"], rows,
                              numeric=frozenset({2, 3, 4, 6}))))
    if quiet:
        doc.add(Para([Span("Nothing notable: ", "b"), ", ".join(quiet) + "."]))
    if not rows and not quiet:
        doc.add(Para("The run holds no cells."))


def _ports(doc: _Doc, run: StoredRun, grid: _Grid) -> None:
    if not run.ports:
        return
    doc.section("Porting results")
    doc.add(Para("For each cell not at parity, the search for the smallest set of "
                 "mitigations that restores it; effort is what the set costs to adopt "
                 "(docs/porting.md)."))
    order = {k: i for i, k in enumerate((b, p, m) for p, m in grid.rows()
                                        for b in grid.backends)}
    keys = sorted(run.ports, key=lambda k: (order.get(k, len(order)), k))
    rows, as_is, searched = [], [], []
    for key in keys:
        port = run.ports[key]
        b, p, m = key
        if port.get("effort") == 0 and not port.get("rejected"):
            as_is.append(f"{b} {p} {m}")
            continue
        searched.append((key, port))
        after = str(port.get("outcome_after", "?"))
        rows.append([_cell(Span(b, "b")), *_cells(
            f"{p}\u00a0{m}", f"{port.get('outcome_before', '?')} \u2192 {after}"),
            _cell(_effort_text(port), css=_outcome_class(after)),
            *_cells(_count(port.get("trials", 0)), seconds(_f(port.get("emulated_s"))))])
    if rows:
        doc.add(Table(["backend", "cell", "before \u2192 after", "effort", "trials",
                       "emulated"], rows, numeric=frozenset({4, 5})))
    if as_is:
        doc.add(Para([Span("Ports as is (effort 0): ", "b"), ", ".join(as_is) + "."]))
    for (b, p, m), port in searched:
        doc.add(Heading(3, f"{b}: {p} {m}"))
        mitigations = port.get("mitigations", [])
        if mitigations:
            doc.add(Para(Span("Mitigations", "b")), Bullets([
                [Span(str(mi.get("name", "?")), "code"),
                 f": {mi.get('changes', '')}" if mi.get("changes") else "",
                 f" \u2014 evidence: {mi['evidence']}" if mi.get("evidence") else ""]
                for mi in mitigations]))
        else:
            trials = int(_f(port.get("trials", 1)))
            doc.add(Para(f"No set of mitigations restored parity: every set was tried "
                         f"({trials - 1} after the first run)." if port.get("searched_all")
                         else f"No set of mitigations restored parity within {trials} "
                              "trials (the search's budget)."))
        evidence = port.get("evidence", {})
        if evidence:
            doc.add(Para(Span("Diagnosis", "b")), Bullets([
                [Span(str(k), "code"), f": {v}"] for k, v in evidence.items()]))
        rejected = port.get("rejected", [])
        if rejected:
            doc.add(Para(Span("Trials that did not restore parity", "b")), Bullets([
                f"{' + '.join(t.get('mitigations', [])) or '(none)'}: "
                f"{t.get('outcome', '?')}, metric {_metric(t.get('metric'))}"
                for t in rejected]))
        na = port.get("not_applicable", [])
        if na:
            doc.add(Para([Span("Not applicable on this backend: ", "b"),
                          ", ".join(str(x) for x in na)]))


def _spec_summary(name: str, spec: dict[str, Any]) -> list[Block]:
    prec = spec.get("precision", {})
    mem = spec.get("memory", {})
    ic = spec.get("interconnect", {})
    comp = spec.get("compute", {})
    blocks: list[Block] = [Heading(3, name)]
    if spec.get("description"):
        blocks.append(Para(str(spec["description"])))
    items: list[Inline] = [
        [Span("formats: ", "b"), ", ".join(prec.get("formats", [])) or "-"],
        [Span("matmul inputs: ", "b"), ", ".join(prec.get("matmul_inputs", [])) or "-"],
        [Span("rounding: ", "b"), (", ".join(prec.get("rounding", [])) or "-")
         + ("; flush to zero" if prec.get("flush_to_zero") else "")],
    ]
    if prec.get("features"):
        items.append([Span("features: ", "b"), ", ".join(prec["features"])])
    peaks = comp.get("peak_flops", {})
    if peaks:
        items.append([Span("peak: ", "b"), ", ".join(f"{k} {si(_f(v), 'FLOP/s')}"
                                                    for k, v in peaks.items())])
    if ic:
        shape = ic.get("shape")
        shape_text = f" {'x'.join(str(s) for s in shape)}" if shape else ""
        links = ic.get("links")
        link_text = f"{links} x " if links else ""
        items.append([Span("interconnect: ", "b"),
                      f"{ic.get('topology', '?')}{shape_text}, {ic.get('devices', '?')} "
                      f"devices, {link_text}{si(_f(ic.get('link_bandwidth')), 'B/s')} "
                      f"links, {seconds(_f(ic.get('link_latency')))} latency, reduction in "
                      f"{ic.get('reduction_format') or '-'}"])
    blocks.append(Bullets(items))
    tiers = mem.get("tiers", [])
    if tiers:
        rows = []
        for t in tiers:
            cap, count = _f(t.get("capacity")), int(_f(t.get("count", 1)) or 1)
            capacity = _bytes(cap) + (f" x {count} = {_bytes(cap * count)}" if count > 1
                                      else "")
            rows.append([_cell(Span(str(t.get("name", "?")), "b")), *_cells(
                capacity, si(_f(t.get("bandwidth")), "B/s"),
                seconds(_f(t.get("latency"))), str(t.get("scope", "-")),
                str(t.get("managed", "-")))])
        blocks.append(Table(["tier", "capacity", "bandwidth", "latency", "scope", "managed"],
                            rows, "compact", numeric=frozenset({1, 2, 3})))
    blocks.append(Code(f"{name}: the full spec (JSON)",
                       json.dumps(finite(spec), indent=2, allow_nan=False)))
    return blocks


def _specs(doc: _Doc, run: StoredRun, grid: _Grid) -> None:
    doc.section("Specs used")
    if not run.specs:
        doc.add(Para("The run stored no specs."))
        return
    doc.add(Para(["The backend specs the cells ran on, as stored with the run (",
                  Span("hwport show NAME", "code"), " prints each figure with its source)."]))
    for name in _ordered(grid.backends, run.specs):
        if name in run.specs:
            doc.add(*_spec_summary(name, run.specs[name]))


def _document(run: StoredRun) -> _Doc:
    grid = _Grid.of(run)
    rec = run.record
    recipe = str((run.recipe or {}).get("name", rec.recipe))
    doc = _Doc(f"hwport report: run {rec.id} ({rec.kind}, recipe {recipe})")
    backend_colours = _colours(grid.backends, BACKEND_COLOURS)
    tier_colours = _colours(_tiers_of(run, run.cells), TIER_COLOURS)
    _header(doc, run, grid)
    _matrix(doc, run, grid)
    _curves(doc, run, grid, backend_colours)
    _memory(doc, run, grid, tier_colours)
    _time(doc, run, grid, tier_colours)
    _lowering(doc, run, grid)
    _telemetry(doc, run, grid)
    _ports(doc, run, grid)
    _specs(doc, run, grid)
    return doc


# -- HTML -----------------------------------------------------------------------------------
CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --zebra: #f6f8fa;
        --good: #dafbe1; --good-fg: #116329; --warn: #fff1c2; --warn-fg: #7d4e00;
        --bad: #ffe0de; --bad-fg: #a40e26; --none: #eef0f3; }
* { box-sizing: border-box; }
body { margin: 0; background: #ffffff; color: var(--fg);
       font: 15px/1.5 -apple-system, "Segoe UI", "Helvetica Neue", Arial, "Noto Sans",
             "DejaVu Sans", sans-serif; }
main { max-width: 1100px; margin: 0 auto; padding: 28px 32px 48px; }
h1 { font-size: 26px; margin: 0 0 14px; }
h2 { font-size: 20px; margin: 36px 0 10px; padding-bottom: 5px;
     border-bottom: 2px solid var(--line); }
h3 { font-size: 16px; margin: 22px 0 8px; }
p { margin: 8px 0; }
p.note, .dim { color: var(--muted); }
p.banner { background: var(--warn); color: var(--warn-fg); border: 1px solid #e3b341;
           border-radius: 6px; padding: 10px 14px; font-size: 15px; }
nav { font-size: 14px; margin: 10px 0 6px; }
nav a { margin-right: 14px; white-space: nowrap; }
a { color: #0969da; text-decoration: none; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; width: 100%; }
th, td { border: 1px solid var(--line); padding: 5px 8px; vertical-align: top;
         text-align: left; overflow-wrap: break-word; }
th { background: #eaeef2; font-weight: 600; }
tbody tr:nth-child(even) td { background: var(--zebra); }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num { white-space: nowrap; }
table.compact { width: auto; min-width: 60%; }
table.kv { width: auto; min-width: 55%; }
table.kv thead { display: none; }
table.kv td:first-child { white-space: nowrap; }
table.matrix td { font-size: 13px; line-height: 1.45; }
table.matrix td:first-child { white-space: nowrap; }
tbody tr td.good { background: var(--good); color: var(--good-fg); }
tbody tr td.warn { background: var(--warn); color: var(--warn-fg); }
tbody tr td.bad { background: var(--bad); color: var(--bad-fg); }
tbody tr td.none { background: var(--none); color: var(--muted); font-style: italic; }
td.good b, td.warn b, td.bad b { font-size: 14px; }
ul { margin: 6px 0 12px; padding-left: 22px; }
li { margin: 2px 0; }
code { font: 12.5px/1.4 "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace;
       background: #eff1f3; padding: 1px 4px; border-radius: 4px; }
figure { margin: 10px 0 18px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line);
             border-radius: 4px; }
details { margin: 6px 0 18px; border: 1px solid var(--line); border-radius: 6px;
          padding: 6px 10px; }
summary { cursor: pointer; color: var(--muted); }
pre { margin: 8px 0 0; max-height: 480px; overflow: auto; font-size: 12px;
      background: var(--zebra); padding: 8px; border-radius: 4px; }
pre code { background: none; padding: 0; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
"""


def _html_inline(content: Inline) -> str:
    if isinstance(content, str):
        return html.escape(content)
    if isinstance(content, Span):
        text = html.escape(content.text)
        return {"b": f"<b>{text}</b>", "code": f"<code>{text}</code>",
                "dim": f'<span class="dim">{text}</span>'}.get(content.style, text)
    return "".join(_html_inline(c) for c in content)


def _html_table(t: Table) -> str:
    def cls(i: int, css: str = "") -> str:
        names = " ".join(n for n in (css, "num" if i in t.numeric else "") if n)
        return f' class="{names}"' if names else ""

    head = "".join(f"<th{cls(i)}>{html.escape(h)}</th>" for i, h in enumerate(t.header))
    body = "".join(
        "<tr>" + "".join(f"<td{cls(i, c.css)}>"
                         + "<br>".join(_html_inline(line) for line in c.lines) + "</td>"
                         for i, c in enumerate(row)) + "</tr>\n"
        for row in t.rows)
    css = f' class="{t.css}"' if t.css else ""
    return f"<table{css}><thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table>"


def _html(doc: _Doc) -> str:
    parts: list[str] = []
    for block in doc.blocks:
        if isinstance(block, Heading):
            anchor = f' id="{_slug(block.text)}"' if block.level == 2 else ""
            parts.append(f"<h{block.level}{anchor}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            css = f' class="{block.css}"' if block.css else ""
            parts.append(f"<p{css}>{_html_inline(block.content)}</p>")
        elif isinstance(block, Table):
            parts.append(_html_table(block))
        elif isinstance(block, Chart):
            data = base64.b64encode(block.png).decode("ascii")
            parts.append(f'<figure><img src="data:image/png;base64,{data}" '
                         f'alt="{html.escape(block.alt)}"></figure>')
        elif isinstance(block, Bullets):
            items = "".join(f"<li>{_html_inline(i)}</li>" for i in block.items)
            parts.append(f"<ul>{items}</ul>")
        else:
            parts.append(f"<details><summary>{html.escape(block.summary)}</summary>"
                         f"<pre><code>{html.escape(block.text)}</code></pre></details>")
    nav = "".join(f'<a href="#{_slug(s)}">{html.escape(s)}</a>' for s in doc.sections)
    title = html.escape(doc.title)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{title}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            f"<h1>{title}</h1>\n<nav>{nav}</nav>\n" + "\n".join(parts)
            + f"\n<footer>Written by hwport {html.escape(__version__)}.</footer>\n"
            "</main>\n</body>\n</html>\n")


# -- Markdown -------------------------------------------------------------------------------
_MD_SPECIAL = re.compile(r"([\\`*\[\]|<>#]|(?<!\w)_|_(?!\w))")


def _md_text(text: str) -> str:
    """Text safe in Markdown and in a table cell: Markdown's punctuation and ``|``
    backslash-escaped (``_`` only where it could open or close emphasis, not inside a
    word), newlines as spaces."""
    return _MD_SPECIAL.sub(r"\\\1", text.replace("\r", "").replace("\n", " "))


def _md_inline(content: Inline) -> str:
    if isinstance(content, str):
        return _md_text(content)
    if isinstance(content, Span):
        if content.style == "code":
            tick = "``" if "`" in content.text else "`"
            return f"{tick}{content.text}{tick}"  # code spans appear outside tables only
        text = _md_text(content.text)
        core = text.strip()
        if not core or content.style not in ("b", "dim"):
            return text
        mark = "**" if content.style == "b" else "*"
        lead, trail = text[:len(text) - len(text.lstrip())], text[len(text.rstrip()):]
        return f"{lead}{mark}{core}{mark}{trail}"
    return "".join(_md_inline(c) for c in content)


def _md_table(t: Table) -> str:
    head = "| " + " | ".join(_md_text(h) or " " for h in t.header) + " |"
    rule = "|" + "|".join("---:" if i in t.numeric else "---" for i in range(len(t.header))) \
        + "|"
    rows = ["| " + " | ".join("<br>".join(_md_inline(line) for line in c.lines) or " "
                              for c in row) + " |" for row in t.rows]
    return "\n".join([head, rule, *rows])


def _markdown(doc: _Doc, images: dict[int, str]) -> str:
    parts = [f"# {_md_text(doc.title)}",
             " · ".join(f"[{_md_text(s)}](#{_slug(s)})" for s in doc.sections)]
    for block in doc.blocks:
        if isinstance(block, Heading):
            parts.append("#" * block.level + " " + _md_text(block.text))
        elif isinstance(block, Para):
            text = _md_inline(block.content)
            parts.append(f"> {text}" if block.css == "banner" else text)
        elif isinstance(block, Table):
            parts.append(_md_table(block))
        elif isinstance(block, Chart):
            parts.append(f"![{_md_text(block.alt)}]({images[id(block)]})")
        elif isinstance(block, Bullets):
            parts.append("\n".join(f"- {_md_inline(i)}" for i in block.items))
        else:
            fence = "```"
            while fence in block.text:
                fence += "`"
            parts.append(f"**{_md_text(block.summary)}**\n\n{fence}{block.lang}\n"
                         f"{block.text}\n{fence}")
    parts.append(f"*Written by hwport {_md_text(__version__)}.*")
    return "\n\n".join(parts) + "\n"


# -- writing --------------------------------------------------------------------------------
@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise HwportError(f"report: cannot write {path} ({e.strerror or e})") from None


def write(run: StoredRun, out: Path) -> tuple[Path, Path]:
    """Write ``<out>/report.html`` (self-contained: charts embedded as base64 PNG data URIs,
    CSS inline, no external resources) and ``<out>/report.md`` (Markdown; its charts written
    as PNG files under ``<out>/images/`` and linked relatively). Returns
    ``(html_path, md_path)``.

    ``out`` is created if needed; an earlier report in it is replaced (charts under
    ``images/`` it no longer has included). An unwritable
    ``out`` raises :class:`~hwport.errors.HwportError` naming the path and the OS reason.
    The output depends only on ``run`` (and the hwport version): the same run gives the same
    bytes.
    """
    out = Path(out)
    images_dir = out / "images"
    for d in (out, images_dir):  # fail before drawing anything
        with _writing(d):
            d.mkdir(parents=True, exist_ok=True)
    doc = _document(run)
    images: dict[int, str] = {}
    charts = [b for b in doc.blocks if isinstance(b, Chart)]
    for i, chart in enumerate(charts, 1):
        name = f"{i:02d}-{chart.name}.png"
        images[id(chart)] = f"images/{name}"
        with _writing(images_dir / name):
            (images_dir / name).write_bytes(chart.png)
    for old in images_dir.glob("[0-9][0-9]-*.png"):  # an earlier report's extra charts
        if f"images/{old.name}" not in images.values():
            with _writing(old):
                old.unlink()
    html_path, md_path = out / "report.html", out / "report.md"
    text_html, text_md = _html(doc), _markdown(doc, images)
    with _writing(html_path):
        html_path.write_text(text_html, encoding="utf-8")
    with _writing(md_path):
        md_path.write_text(text_md, encoding="utf-8")
    return html_path, md_path
