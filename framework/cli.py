"""The ``hwport`` command line: tables for people, ``--json`` for programs.

Every command prints its result to stdout; errors go to stderr as one ``error:`` message
naming what is wrong and where, with exit status 1 (2 for bad usage).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import hwport
from hwport import formats as _formats
from hwport import plugins
from hwport.errors import HwportError
from hwport.spec import BackendSpec, seconds, si

app = typer.Typer(
    help="What happens to your training and inference pipelines when you port them from "
         "NVIDIA GPUs to another chip.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
out = Console(soft_wrap=False)
if not out.is_terminal and "COLUMNS" not in os.environ:
    out = Console(soft_wrap=False, width=140)  # a log or a file: tables as wide as they need
err = Console(stderr=True, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])

JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(1)


def _json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, allow_nan=False) + "\n")


def _version(value: bool) -> None:
    if value:
        from hwport.rounding import NATIVE_KERNEL

        kernel = "native C" if NATIVE_KERNEL else "numpy (C kernel not built)"
        try:
            import jax  # noqa: F401
        except ImportError:
            programs = "jax not installed"
        else:
            from hwport.rounding import ffi_kernel

            why = ffi_kernel()
            programs = "native C through XLA FFI" if why is None else f"XLA operations ({why})"
        out.print(f"hwport {hwport.__version__} (rounding kernel: {kernel}; in jitted JAX "
                  f"programs on CPU: {programs})", highlight=False)
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """hwport: port NVIDIA-tuned pipelines to other chips, measured before you buy one."""


def _backend_row(b: plugins.Backend) -> list[str]:
    spec = b.spec
    ic = spec.interconnect
    tiers = "\n".join(f"{t.name} {si(t.total_capacity, 'B')}" for t in spec.memory.tiers)
    peaks = "\n".join(f"{k} {si(v, 'FLOP/s')}" for k, v in spec.compute.peak_flops.items())
    net = f"{ic.topology} x{ic.devices}" + (f" ({ic.shape[0]}x{ic.shape[1]})" if ic.shape else "")
    net += f"\n{si(ic.link_bandwidth * ic.links, 'B/s')}/dir"
    return [spec.name, ", ".join(spec.precision.formats), escape(tiers), net, escape(peaks),
            f"{escape(b.plugin)}\n[dim]{escape(b.origin)}[/]"]


@app.command()
def backends(as_json: JsonFlag = False) -> None:
    """List registered backends, and plugins that failed to load with the reason."""
    reg = plugins.registry()
    if as_json:
        _json([{**b.spec.to_dict(), "plugin": b.plugin, "origin": b.origin}
               for _, b in sorted(reg.backends.items())])
    else:
        table = Table(title="hwport backends", show_lines=True)
        for col in ("name", "formats", "memory tiers", "interconnect", "peak", "plugin"):
            table.add_column(col)
        for _, b in sorted(reg.backends.items()):
            table.add_row(*_backend_row(b))
        out.print(table)
    for f in reg.failures:
        err.print(f"[yellow]plugin {escape(repr(f.plugin))} ({escape(f.origin)}) failed and was "
                  f"skipped:[/] {escape(f.reason)}", highlight=False)


def _spec_table(spec: BackendSpec) -> Table:
    table = Table(title=f"{spec.name}: {escape(spec.description)}", title_justify="left")
    for col in ("figure", "value", "provenance"):
        table.add_column(col, overflow="fold")
    plain = spec.to_dict()
    for fig in spec.figures():
        value: Any = plain
        for part in fig.split("."):
            if isinstance(value, list):  # tiers are addressed by name
                value = next(t for t in value if t.get("name") == part)
            else:
                value = value[part]
        prov = spec.provenance(fig)
        where = ("[red]unsourced[/]" if prov is None else
                 f"[yellow]assumption:[/] {escape(prov[1])}" if prov[0] == "assumption"
                 else escape(prov[1]))
        table.add_row(fig, escape(_show_value(fig, value)), where)
    return table


def _show_value(figure: str, value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    if isinstance(value, str) and value == "inf":
        value = math.inf
    if isinstance(value, float | int) and not isinstance(value, bool):
        if figure.endswith(("capacity",)):
            return si(value, "B")
        if figure.endswith(("bandwidth",)):
            return si(value, "B/s")
        if figure.endswith(("latency",)):
            return seconds(value)
        if ".peak_flops." in figure:
            return si(value, "FLOP/s")
    return str(value)


@app.command()
def show(
    name: Annotated[str, typer.Argument(help="A backend name, or the path of a TOML spec file.")],
    as_json: JsonFlag = False,
) -> None:
    """Show one backend's spec: every figure with its source or assumption."""
    try:
        if name.endswith(".toml") or Path(name).is_file():
            spec = hwport.load_spec(name)
        else:
            spec = plugins.registry().get(name).spec
    except HwportError as e:
        raise _fail(str(e)) from None
    if as_json:
        _json(spec.to_dict())
        return
    out.print(_spec_table(spec))
    missing = spec.unsourced()
    if missing:
        err.print(f"[yellow]{len(missing)} figure(s) without a source or assumption:[/] "
                  + escape(", ".join(missing)), highlight=False)


@app.command()
def validate(
    paths: Annotated[list[Path], typer.Argument(help="TOML spec files to check.")],
) -> None:
    """Check spec files; print each problem with its file, line and field."""
    failed = 0
    for path in paths:
        try:
            spec = hwport.load_spec(path)
        except HwportError as e:
            err.print(f"[red]{escape(str(path))}: invalid[/]\n{escape(str(e))}", highlight=False)
            failed += 1
            continue
        note = f" ({len(spec.unsourced())} figure(s) without a source)" if spec.unsourced() else ""
        out.print(f"[green]{escape(str(path))}: ok[/] backend {spec.name!r}{note}",
                  highlight=False)
    if failed:
        raise typer.Exit(1)


@app.command(name="formats")
def formats_cmd(as_json: JsonFlag = False) -> None:
    """List known number formats with their derived properties."""
    plugins.registry()  # formats from plugins
    fmts = list(_formats.known())
    if as_json:
        _json([f.to_dict() for f in fmts])
        return
    table = Table(title="hwport formats (and the families cfp8_143_b<N>, cfp8_152_b<N>, "
                        "cfp16_shp_b<N> for N in 0..63)")
    for col in ("name", "bits", "e", "m", "bias", "max", "min normal", "min subnormal",
                "epsilon", "inf/NaN", "overflow"):
        text = col in ("name", "inf/NaN", "overflow")
        table.add_column(col, justify="left" if text else "right")
    for f in fmts:
        special = ("inf+NaN" if f.inf else "NaN only" if f.has_nan else "none")
        table.add_row(f.name, str(f.bits), str(f.exponent_bits), str(f.mantissa_bits),
                      str(f.bias), f"{f.max:.6g}", f"{f.min_normal:.4g}",
                      f"{f.min_subnormal:.4g}", f"{f.epsilon:.4g}", special, f.overflow)
    out.print(table)


# -- running pipelines -------------------------------------------------------------------
OUTCOME_STYLE = {"converged": "green", "parity": "green", "degraded": "yellow",
                 "stalled": "red", "diverged": "bold red", "broken": "bold red"}


def _options(corpus: str | None, option: list[str] | None) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for item in option or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise HwportError(f"--option {item!r}: expected key=value")
        try:
            opts[key] = json.loads(value)
        except json.JSONDecodeError:
            opts[key] = value
    if corpus is not None:
        opts["corpus"] = corpus
    return opts


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
        return
    try:
        path.write_text(text)
    except OSError as e:
        raise HwportError(f"--json {path}: cannot write ({e.strerror or e})") from None
    err.print(f"wrote {escape(str(path))}", highlight=False)


def _cell_text(r: Any) -> str:
    """Outcome and headline numbers of one result, for a table cell."""
    style = OUTCOME_STYLE.get(r.outcome, "")
    m = r.metrics
    detail = f"{r.metric} {m.get(r.metric, math.nan):.4g}"
    if r.mode == "infer":
        detail += f", top-1 {r.agreement.get('top1', math.nan):.3f}"
    flags = []
    t = r.telemetry
    overflow = sum(c["overflow"] for c in t["rounding"].values())
    underflow = sum(c["underflow"] for c in t["rounding"].values())
    if overflow:
        flags.append(f"{overflow:,} overflow")
    if underflow:
        flags.append(f"{underflow:,} underflow")
    if t["skipped_steps"]:
        flags.append(f"{t['skipped_steps']} skipped")
    if t["updates_attempted"]:
        flags.append(f"{t['lost_update_fraction']:.0%} updates lost")
    extra = f"\n[dim]{escape('; '.join(flags))}[/]" if flags else ""
    return f"[{style}]{r.outcome}[/]\n{escape(detail)}{extra}{_cost_text(r)}"


def _cost_text(r: Any) -> str:
    """Where a run's step lives and how long it would take (its memory plan and time)."""
    if not r.memory:
        return ""
    m, t = r.memory, r.time
    tiers = "+".join(dict.fromkeys(k for where in m["placement"].values() for k in where))
    fit = "" if m["fits"] else " [red]does not fit[/]"
    c = r.collectives
    if c:
        share = f" ({c['share_of_step']:.0%} of the step)" if c["share_of_step"] is not None \
            else ""
        fit += (f"\n[dim]{c['world_size']} ranks: {c['algorithm']} all-reduce "
                f"{_gb(c['bytes_per_step'])}/step in {c['reduction_format']}, "
                f"{seconds(c['predicted_s_per_step'])}{share}; gradient error "
                f"{c['gradient_error']['max_relative']:.2g}[/]")
    step = f", {seconds(t['step_s'])}/step" if t.get("step_s") else ""
    return f"\n[dim]{_gb(m['total'])} in {escape(tiers or '-')}{step}[/]{fit}"


class _Bars:
    """rich progress: one bar for the whole job, one for the cell in flight."""

    def __init__(self, total: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=err,
                                 transient=True, disable=not err.is_terminal)
        self.total = self.progress.add_task("cells", total=total)
        self.cell: Any = None

    def __enter__(self) -> _Bars:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def on_cell(self, label: str, _: Any) -> Callable[[int, int], None]:
        if self.cell is not None:
            self.progress.remove_task(self.cell)
            self.progress.advance(self.total)
        self.cell = self.progress.add_task(label, total=None)

        def step(done: int, total: int) -> None:
            self.progress.update(self.cell, completed=done, total=total)

        return step


def _print_run(r: Any) -> None:
    table = Table(title=f"{r.pipeline} {r.mode} on {r.backend} ({r.recipe}, seed {r.seed})",
                  title_justify="left")
    table.add_column("metric")
    table.add_column(r.backend, justify="right")
    table.add_column("reference", justify="right")
    for k, v in r.metrics.items():
        table.add_row(k, f"{v:.5g}", f"{r.reference_metrics.get(k, math.nan):.5g}")
    for k, v in r.agreement.items():
        table.add_row(f"agreement {k}", f"{v:.4g}", "")
    out.print(table)
    out.print(f"outcome: {_cell_text(r)}  ({r.wall_s:.1f} s)", highlight=False)
    if r.memory:
        roles = ", ".join(f"{k.replace('_', ' ')} {_gb(v)} ({'+'.join(r.memory['placement'][k])})"
                          for k, v in r.memory["bytes"].items() if v)
        out.print(f"memory per device: {escape(roles)}; binding tier: "
                  f"{r.memory['binding'] or 'none'}", highlight=False)
        parts = ", ".join(f"memory ({k}) {seconds(v)}" for k, v in r.time["memory_s"].items()
                          if v)
        frac = r.time["peak_fraction"]
        out.print(f"step time: {seconds(r.time['step_s'])} = compute "
                  f"{seconds(r.time['compute_s'])}{', ' + parts if parts else ''}"
                  + (f"; {frac:.1%} of the matmul peak" if frac is not None else ""),
                  highlight=False)
    for note in r.lowering:
        out.print(f"[dim]lowered: {escape(note)}[/]", highlight=False)


BackendOption = Annotated[str, typer.Option("--backend", "-b", help="Backend name.")]
PipelineOption = Annotated[str, typer.Option("--pipeline", "-p",
                                             help="Pipeline name or package.module:factory.")]
StepsOption = Annotated[int | None, typer.Option(help="Training steps (pipeline default).")]
SeedOption = Annotated[int, typer.Option(help="Seed of data, initialisation, rounding.")]
CorpusOption = Annotated[str | None, typer.Option(help="Text file for the lm pipeline.")]
OptionOption = Annotated[list[str] | None, typer.Option("--option", "-o",
                                                        help="Pipeline option key=value.")]
JsonPathOption = Annotated[Path | None, typer.Option(
    "--json", help="Write the result as JSON to PATH (- for stdout).")]
WorldSizeOption = Annotated[int, typer.Option(
    help="Train data-parallel on this many processes (JAX: devices), gradients reduced by "
         "the backend's all-reduce (docs/collectives.md).")]
StoreOption = Annotated[Path | None, typer.Option(
    "--store", help="The results store (default: $HWPORT_STORE, else "
    "~/.local/share/hwport/results.sqlite; docs/results.md).")]
NoStoreOption = Annotated[bool, typer.Option(
    "--no-store", help="Keep nothing in the results store.")]
ResumeOption = Annotated[bool, typer.Option(
    "--resume", help="Skip cells already in the store for the same spec, pipeline, recipe "
    "and seed (and continue this command's interrupted run).")]
TensorBoardOption = Annotated[Path | None, typer.Option(
    "--tensorboard", help="Also write each cell as TensorBoard event files under DIR "
    "(when tensorboard is installed).")]
FrameworkOption = Annotated[str, typer.Option(
    help="torch, or jax: the pipeline's JAX twin through the JAX engine (docs/jax.md).")]
CaptureOption = Annotated[bool, typer.Option(
    "--capture/--eager", help="Capture each training step as a graph and replay it; --eager "
    "runs every op through the dispatch mode (same results, slower).")]


@app.command()
def run(
    backend: BackendOption,
    pipeline: PipelineOption,
    mode: Annotated[str, typer.Option(help="train or infer.")] = "train",
    recipe: Annotated[str, typer.Option(help="Recipe name.")] = "amp-bf16",
    steps: StepsOption = None,
    seed: SeedOption = 0,
    corpus: CorpusOption = None,
    option: OptionOption = None,
    json_path: JsonPathOption = None,
    capture: CaptureOption = True,
    world_size: WorldSizeOption = 1,
    store_path: StoreOption = None,
    no_store: NoStoreOption = False,
    resume: ResumeOption = False,
    tensorboard: TensorBoardOption = None,
    framework: FrameworkOption = "torch",
) -> None:
    """Run one pipeline on one backend and classify it against the reference."""
    from hwport import runner

    rec = plugins.registry().recipe(recipe)
    opts = _options(corpus, option)
    params = {"backends": [backend], "pipelines": [pipeline], "modes": [mode],
              "options": opts, "framework": framework}
    with _stored("run", rec, seed, steps, world_size, params, 1, store_path, no_store,
                 resume, tensorboard) as session, _Bars(1) as bars:
        result = runner.run(backend, pipeline, mode, rec, steps=steps, seed=seed,
                            options=opts, progress=bars.on_cell(
                                f"{pipeline} {mode} on {backend}", None), capture=capture,
                            world_size=world_size, session=session, framework=framework)
    if json_path is not None:
        _write_json(json_path, result.to_dict())
    if json_path is None or str(json_path) != "-":
        _print_run(result)


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@app.command()
def compare(
    backends: Annotated[str | None, typer.Option(help="Comma-separated backends (all).")] = None,
    pipelines: Annotated[str | None, typer.Option(help="Comma-separated pipelines "
                                                  "(digits,lm).")] = None,
    modes: Annotated[str, typer.Option(help="Comma-separated modes.")] = "train,infer",
    recipe: Annotated[str, typer.Option(help="Recipe name.")] = "amp-bf16",
    steps: StepsOption = None,
    seed: SeedOption = 0,
    json_path: JsonPathOption = None,
    capture: CaptureOption = True,
    port_search: Annotated[bool, typer.Option("--port", help="For each cell not at parity, "
                                              "search the mitigations that restore it and "
                                              "show the effort.")] = False,
    budget: Annotated[int, typer.Option(help="With --port: most runs per cell.")] = 8,
    world_size: WorldSizeOption = 1,
    store_path: StoreOption = None,
    no_store: NoStoreOption = False,
    resume: ResumeOption = False,
    tensorboard: TensorBoardOption = None,
    framework: FrameworkOption = "torch",
) -> None:
    """Run pipelines x modes on every backend and print the outcomes side by side.

    Each cell is committed to the results store as it finishes; after an interruption,
    the same command with --resume runs only the cells that are missing."""
    from hwport import runner

    names = _split(backends) or sorted(plugins.registry().backends)
    pipes = _split(pipelines) or ["digits", "lm"]
    mode_list = _split(modes) or list(runner.MODES)
    rec = plugins.registry().recipe(recipe)
    params = {"backends": names, "pipelines": pipes, "modes": mode_list,
              "port": budget if port_search else None, "framework": framework}
    total = len(names) * len(pipes) * len(mode_list)
    ports: dict[tuple[str, str, str], Any] = {}
    with _stored("compare", rec, seed, steps, world_size, params, total, store_path,
                 no_store, resume, tensorboard) as session:
        with _Bars(total) as bars:
            comparison = runner.compare(names, pipes, mode_list, rec, steps=steps, seed=seed,
                                        on_cell=bars.on_cell, capture=capture,
                                        world_size=world_size, session=session,
                                        framework=framework)
        if port_search:
            from hwport import porting

            for r in porting.efforts(comparison, budget, on_trial=_show_trial,
                                     session=session):
                ports[(r.backend, r.pipeline, r.mode)] = r
    if json_path is not None:
        data = comparison.to_dict()
        if port_search:
            data["port"] = [r.to_dict() for r in ports.values()]
        _write_json(json_path, data)
    if json_path is not None and str(json_path) == "-":
        return
    fw = "" if framework == "torch" else f", framework {framework}"
    _print_comparison(f"hwport compare: recipe {comparison.recipe}, seed {seed}{fw}", names, pipes,
                      mode_list, comparison.cells, {k: _effort_text(v) for k, v in ports.items()})


def _print_comparison(title: str, names: list[str], pipes: list[str], modes: list[str],
                      cells: list[Any], efforts: dict[tuple[str, str, str], str]) -> None:
    """The side-by-side table of a comparison, and its lowering notes."""
    table = Table(title=title, show_lines=True)
    table.add_column("pipeline / mode")
    for b in names:
        table.add_column(b)
    by_key = {(c.backend, c.pipeline, c.mode): c for c in cells}
    for p in pipes:
        for m in modes:
            row = []
            for b in names:
                c = by_key.get((b, p, m))
                text = "[dim]not run[/]" if c is None else _cell_text(c)
                if (b, p, m) in efforts:
                    text += f"\n[bold]{escape(efforts[b, p, m])}[/]"
                row.append(text)
            table.add_row(f"{p}\n{m}", *row)
    out.print(table)
    notes = {(c.backend, n) for c in cells for n in c.lowering}
    for b, n in sorted(notes):
        out.print(f"[dim]{b}: {escape(n)}[/]", highlight=False)


@app.command()
def port(
    backend: BackendOption,
    pipeline: PipelineOption,
    recipe: Annotated[str, typer.Option(help="Recipe name (written for simgpu).")] = "amp-bf16",
    mode: Annotated[str, typer.Option(help="train or infer.")] = "train",
    budget: Annotated[int, typer.Option(help="Most runs in all, the first included.")] = 8,
    steps: StepsOption = None,
    seed: SeedOption = 0,
    corpus: CorpusOption = None,
    option: OptionOption = None,
    json_path: JsonPathOption = None,
    world_size: WorldSizeOption = 1,
    store_path: StoreOption = None,
    no_store: NoStoreOption = False,
    resume: ResumeOption = False,
    tensorboard: TensorBoardOption = None,
    framework: FrameworkOption = "torch",
) -> None:
    """Find the smallest set of mitigations that brings a recipe to parity on a backend."""
    from hwport import porting

    rec = plugins.registry().recipe(recipe)
    opts = _options(corpus, option)
    params = {"backends": [backend], "pipelines": [pipeline], "modes": [mode],
              "options": opts, "port": budget, "framework": framework}
    with _stored("port", rec, seed, steps, world_size, params, 1, store_path, no_store,
                 resume, tensorboard) as session:
        result = porting.port(backend, pipeline, rec, mode, budget=budget, steps=steps,
                              seed=seed, options=opts, on_trial=_show_trial,
                              world_size=world_size, session=session, framework=framework)
    if json_path is not None:
        _write_json(json_path, result.to_dict())
    if json_path is None or str(json_path) != "-":
        _print_port(result)


@contextlib.contextmanager
def _stored(kind: str, rec: Any, seed: int, steps: int | None, world_size: int,
            params: dict[str, Any], total: int, path: Path | None, no_store: bool,
            resume: bool, tensorboard: Path | None) -> Iterator[Any]:
    """The results-store session of a command (None with --no-store). The store is opened
    before any work, so a bad path fails at once; an interrupt (Ctrl-C, SIGTERM) keeps
    every cell already stored and says how to resume."""
    if no_store and resume:
        raise _fail("--resume takes its cells from the results store: drop --no-store")
    from hwport import observers

    before = os.environ.get(observers.ENV)
    if tensorboard is not None:
        os.environ[observers.ENV] = str(tensorboard)
    try:
        if no_store:
            yield None
        else:
            yield from _session(kind, rec, seed, steps, world_size, params, total, path,
                                resume)
    finally:
        if before is None:
            os.environ.pop(observers.ENV, None)
        else:
            os.environ[observers.ENV] = before
        _report_observer_failures()


def _session(kind: str, rec: Any, seed: int, steps: int | None, world_size: int,
             params: dict[str, Any], total: int, path: Path | None,
             resume: bool) -> Iterator[Any]:
    from hwport.store import Store, terminate_as_interrupt

    reg = plugins.registry()
    specs = [reg.get(b).spec for b in params["backends"]]  # unknown names fail here
    st = Store(path)
    try:
        session = st.begin(kind, rec, seed=seed, steps=steps, world_size=world_size,
                           params=params, cells_total=total, resume=resume, specs=specs)
        done = [0]

        def announce(r: Any, position: int | None, reused: bool) -> None:
            if position is None:
                return  # a porting trial: _show_trial says it
            done[0] += 1
            err.print(f"[{done[0]}/{total}] {r.pipeline} {r.mode} on {r.backend}: {r.outcome}"
                      f" ({'taken from the store' if reused else f'{r.wall_s:.1f} s, stored'})",
                      highlight=False)

        session.on_stored = announce
        try:
            with terminate_as_interrupt(), session:
                yield session
        except KeyboardInterrupt as e:
            err.print(f"[yellow]interrupted ({escape(str(e) or 'Ctrl-C')}):[/] "
                      f"{session.stored + session.reused} of {total} cell(s) kept in run "
                      f"{session.run_id} of {escape(str(st.path))}; the same command with "
                      "--resume runs the rest", highlight=False)
            raise typer.Exit(130) from None
        if session.failed:
            err.print(f"[yellow]warning:[/] {escape(session.failed)}; the results above are "
                      "complete, the store is not", highlight=False)
        else:
            reused = f", {session.reused} cell(s) taken from it" if session.reused else ""
            err.print(f"stored as run {session.run_id} in {escape(str(st.path))}{reused}",
                      highlight=False)
    finally:
        st.close()


def _report_observer_failures() -> None:
    for f in plugins.registry().observers.failed:
        err.print(f"[yellow]plugin {escape(repr(f.plugin))} ({escape(f.origin)}) failed "
                  f"and was skipped:[/] {escape(f.reason)}", highlight=False)


def _show_trial(t: Any) -> None:
    """Progress of a porting search: one line per finished trial."""
    err.print(f"  trial {', '.join(t.mitigations) or '(as written)'}: {t.outcome} "
              f"({t.wall_s:.1f} s)", highlight=False)


def _effort_text(r: Any) -> str:
    if r.effort == 0:
        return "ports as is (effort 0)"
    if r.effort is None:
        n = r.trials - 1
        return (f"no fix: tried every set ({n})" if r.searched_all
                else f"no fix within {r.trials} trials")
    return f"effort {r.effort}: " + " + ".join(m["name"] for m in r.mitigations)


def _print_port(r: Any) -> None:
    out.print(f"[bold]{r.pipeline} {r.mode} on {r.backend}, recipe {r.recipe}[/]: "
              f"{r.outcome_before} -> {r.outcome_after}; {_effort_text(r)}; {r.trials} "
              f"trials, {r.emulated_s:.1f} s emulated", highlight=False)
    for signal, text in r.evidence.items():
        out.print(f"  evidence {signal}: {escape(text)}", highlight=False)
    for m in r.mitigations:
        out.print(f"  needed {m['name']} ({escape(m['changes'])}): {escape(m['evidence'])}",
                  highlight=False)
    for t in r.rejected:
        out.print(f"  tried {' + '.join(t.mitigations)}: {t.outcome}", highlight=False)
    if r.not_applicable:
        out.print(f"  not applicable on {r.backend}: {', '.join(r.not_applicable)}",
                  highlight=False)


@app.command()
def reproduce(
    names: Annotated[list[str] | None, typer.Argument(
        help="Reproductions to run (all of them).", show_default=False)] = None,
    small: Annotated[bool, typer.Option("--small", help="The small configurations that CI "
                                        "runs (minutes, not tens of minutes).")] = False,
    list_only: Annotated[bool, typer.Option("--list", help="List the reproductions.")] = False,
    seed: SeedOption = 0,
    json_path: JsonPathOption = None,
    framework: FrameworkOption = "torch",
) -> None:
    """Reproduce published results: each one a failure on a backend and its fixes.

    Exits with status 1 when a claim does not hold."""
    from hwport import reproduce as rp

    if list_only:
        table = Table(title="hwport reproductions", show_lines=True)
        for col in ("name", "claim", "source", "backend / pipeline", "fixes"):
            table.add_column(col)
        for rep in rp.REPRODUCTIONS:
            table.add_row(rep.name, escape(rep.claim), escape(rep.paper),
                          f"{rep.backend} / {rep.pipeline}", "\n".join(rep.fixes))
        out.print(table)
        return
    chosen = names or [r.name for r in rp.REPRODUCTIONS]
    runs = sum(1 + len(rep.fixes) + (rep.control is not None)
               for rep in rp.REPRODUCTIONS if rep.name in chosen)
    with _Bars(runs) as bars:
        results = rp.reproduce(names, small=small, seed=seed, framework=framework,
                               on_run=lambda label: bars.on_cell(label, None))
    if json_path is not None:
        _write_json(json_path, [r.to_dict() for r in results])
    if json_path is None or str(json_path) != "-":
        fw = "" if framework == "torch" else f", framework {framework}"
        table = Table(title=f"hwport reproduce{' --small' if small else ''}, seed {seed}{fw}",
                      show_lines=True)
        for col in ("reproduction", "backend", "as ported", "evidence", "fixed by",
                    "reproduced"):
            table.add_column(col)
        for r in results:
            rep = r.reproduction
            fixes = "\n".join(f"{m}: {_cell_text(c)}" for m, c in r.fixes.items())
            if r.control is not None:
                fixes += f"\n[dim]control, as written on {r.control.backend}:[/] " \
                         f"{_cell_text(r.control)}"
            verdict = "[green]yes[/]" if r.reproduced else \
                "[red]no[/]\n" + escape("; ".join(r.problems))
            table.add_row(f"[bold]{rep.name}[/]\n[dim]{escape(rep.paper)}[/]", rep.backend,
                          f"{rep.recipe.name}: {_cell_text(r.failure)}",
                          escape(r.evidence.get(rep.signal, "(none)")), fixes, verdict)
        out.print(table)
    failed = [r.reproduction.name for r in results if not r.reproduced]
    if failed:
        raise _fail(f"not reproduced: {', '.join(failed)}")


def _gb(x: float) -> str:
    return f"{x / 1e9:,.3g} GB" if x >= 1e8 else si(x, "B")


@app.command()
def estimate(
    model: Annotated[str | None, typer.Option(help="Model preset: gpt2-1.5b, gpt3-6.7b, "
                                              "gpt3-175b (or give --layers etc.).")] = None,
    layers: Annotated[int | None, typer.Option(help="Transformer layers.")] = None,
    hidden: Annotated[int | None, typer.Option(help="Hidden size.")] = None,
    heads: Annotated[int | None, typer.Option(help="Attention heads.")] = None,
    seq: Annotated[int | None, typer.Option(help="Sequence length.")] = None,
    vocab: Annotated[int | None, typer.Option(help="Vocabulary size.")] = None,
    backend: Annotated[list[str] | None, typer.Option(
        "--backend", "--backends", "-b",
        help="Backend (repeat for several; 'all' for every one).")] = None,
    micro_batch: Annotated[int, typer.Option(help="Sequences per micro-batch.")] = 1,
    global_batch: Annotated[int | None, typer.Option(
        help="Sequences per step (micro-batch x data).")] = None,
    data: Annotated[int, typer.Option(help="Data-parallel degree.")] = 1,
    tensor: Annotated[int, typer.Option(help="Tensor-parallel degree.")] = 1,
    pipeline: Annotated[int, typer.Option(help="Pipeline-parallel degree.")] = 1,
    zero: Annotated[int, typer.Option(help="ZeRO stage, 0-3.")] = 0,
    recompute: Annotated[str, typer.Option(help="none, selective or full.")] = "none",
    sequence_parallel: Annotated[bool, typer.Option(
        "--sequence-parallel", help="Shard layer norms and dropouts over the sequence.")] = False,
    recipe: Annotated[str, typer.Option(help="Recipe name.")] = "amp-bf16",
    matmul_efficiency: Annotated[float | None, typer.Option(
        help="Fraction of the matmul peak GEMMs sustain (default: calibrated, see "
             "docs/performance-model.md; 1 = roofline).")] = None,
    validate: Annotated[bool, typer.Option(
        "--validate", help="Print the published tables next to the predictions.")] = False,
    json_path: JsonPathOption = None,
) -> None:
    """Estimate memory per device (by role and tier), step time and MFU of training a
    GPT-style model at scale on one or more backends."""
    from hwport import estimate as est

    eff = est.MATMUL_EFFICIENCY if matmul_efficiency is None else matmul_efficiency
    if validate:
        checks = est.validate(eff)
        if json_path is not None:
            _write_json(json_path, [c.to_dict() for c in checks])
        if json_path is None or str(json_path) != "-":
            table = Table(title=f"hwport estimate --validate (matmul efficiency {eff:g})")
            for col in ("source", "row", "predicted", "published", "error"):
                table.add_column(col, justify="left" if col in ("source", "row") else "right")
            for c in checks:
                table.add_row(escape(c.table.split(",")[0]), escape(c.row),
                              f"{c.predicted:.4g} {c.unit}", f"{c.published:g}",
                              f"{c.error:+.1%}")
            out.print(table)
        return
    if model is not None:
        if model not in est.MODELS:
            raise _fail(f"unknown model preset {model!r}; presets: {', '.join(est.MODELS)}")
        base = est.MODELS[model]
    else:
        missing = [n for n, v in (("--layers", layers), ("--hidden", hidden),
                                  ("--heads", heads), ("--seq", seq), ("--vocab", vocab))
                   if v is None]
        if missing:
            raise _fail(f"give --model or all of {', '.join(missing)}")
        base = est.GPT(layers, hidden, heads, seq, vocab)  # type: ignore[arg-type]
    gpt = est.GPT(layers or base.layers, hidden or base.hidden, heads or base.heads,
                  seq or base.seq, vocab or base.vocab)
    par = est.Parallelism(micro_batch, global_batch, data, tensor,
                          pipeline, zero, recompute, sequence_parallel)
    reg = plugins.registry()
    names = backend or ["simgpu"]
    if "all" in names:
        names = sorted(reg.backends)
    rec = reg.recipe(recipe)
    par.check(gpt)  # a layout that does not fit the model is wrong on every backend
    if not 0 < eff <= 1:
        raise _fail(f"--matmul-efficiency {eff}: must be in (0, 1]")
    results, skipped = [], []
    for name in names:
        spec = plugins.get_backend(name)
        try:
            results.append(est.estimate(gpt, par, spec, rec, matmul_efficiency=eff))
        except HwportError as e:
            if len(names) == 1:
                raise
            skipped.append(f"{name}: {e}")
    if not results:
        raise _fail("no backend could be estimated: " + "; ".join(skipped))
    if json_path is not None:
        _write_json(json_path, {"estimates": [r.to_dict() for r in results],
                                "skipped": skipped})
    if json_path is not None and str(json_path) == "-":
        return
    title = (f"hwport estimate: {gpt.params / 1e9:,.4g}B parameters (L={gpt.layers}, "
             f"h={gpt.hidden}, a={gpt.heads}, s={gpt.seq}, V={gpt.vocab}); {par.devices} "
             f"devices (data {data} x tensor {tensor} x pipeline {pipeline}), ZeRO {zero}, "
             f"recompute {recompute}, batch {par.batch} in {par.microbatches} "
             f"micro-batches of {micro_batch}; recipe {recipe}")
    table = Table(title=title, show_lines=True, title_justify="left")
    table.add_column("per device")
    for r in results:
        table.add_column(r.backend, justify="right")

    def placed(r: Any, role: str) -> str:
        where = r.memory.placement[role]
        total = r.memory.bytes[role]
        if not total:
            return "-"
        parts = [escape(t) for t in where]
        left = total - sum(where.values())
        if left > 0:
            parts.append(f"[red]{_gb(left)} nowhere[/]")
        return f"{_gb(total)} ({', '.join(parts)})"

    for role in ("weights", "gradients", "master_weights", "optimizer_state", "activations"):
        table.add_row(role.replace("_", " "), *(placed(r, role) for r in results))
    table.add_row("total", *(
        f"{_gb(r.memory.total)}: " + ("[green]fits[/]" if r.memory.fits else
                                      f"[red]does not fit ({_gb(r.memory.unplaced)} over)[/]")
        for r in results))
    table.add_row("binding tier", *((r.memory.binding or "none") for r in results))
    never = "never: model states are not sharded at ZeRO 0" if zero == 0 else \
        "never: the unsharded roles alone do not fit"
    table.add_row("devices to fit", *(
        never if r.devices_to_fit is None else f"{r.devices_to_fit:,}"
        + (" (more data parallelism, the batch growing with it)"
           if r.devices_to_fit > par.devices else "")
        for r in results))
    table.add_row("step time", *(seconds(r.step_s) for r in results))
    table.add_row("tokens/s (job)", *(f"{r.tokens_per_s:,.0f}" for r in results))
    table.add_row("MFU", *(f"{r.mfu:.1%}" for r in results))
    table.add_row("bound", *(escape(r.bound) for r in results))
    table.add_row("step breakdown", *("\n".join(
        f"{k.replace('_', ' ')} {seconds(v)}" for k, v in r.breakdown.items() if v)
        for r in results))
    out.print(table)
    for r in results:
        for note in r.notes:
            out.print(f"[dim]{r.backend}: {escape(note)}[/]", highlight=False)
    for s_ in skipped:
        out.print(f"[dim]skipped {escape(s_)}[/]", highlight=False)


def _sizes(text: str) -> list[int]:
    """'1K,1M,1G' as bytes (binary multiples, as nccl-tests reads them)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    sizes = []
    for item in text.split(","):
        item = item.strip().upper().removesuffix("B")
        number, unit = (item[:-1], item[-1]) if item and item[-1] in units else (item, "")
        try:
            value = float(number) * units[unit]
        except ValueError:
            raise HwportError(f"--sizes {text!r}: {item!r} is not a size like 1K, 4M or "
                              "1G") from None
        if value <= 0:
            raise HwportError(f"--sizes {text!r}: {item!r} must be positive")
        sizes.append(int(value))
    return sizes


NCCL_TESTS_H100 = 370e9  # nccl-tests, 8x H100 NVLink ring all-reduce, large messages


@app.command()
def collectives(
    backend: BackendOption = "simgpu",
    op: Annotated[str, typer.Option(help="all_reduce, reduce_scatter, all_gather, "
                                         "broadcast, send_recv or all_to_all.")] = "all_reduce",
    world_size: Annotated[int, typer.Option(help="Ranks.")] = 8,
    sizes: Annotated[str, typer.Option(help="Buffer sizes per rank (binary K, M, G).")
                     ] = "1K,1M,1G",
    algorithm: Annotated[str | None, typer.Option(
        help="Algorithm (default: the spec's first for this op).")] = None,
    measure_up_to: Annotated[str, typer.Option(
        help="Run the collective for real on processes for sizes up to this (0: never).")
    ] = "4M",
    reduction_format: Annotated[str | None, typer.Option(
        help="Reduce in this format instead of the spec's (e.g. bf16).")] = None,
    seed: SeedOption = 0,
    validate: Annotated[bool, typer.Option(
        "--validate", help="simgpu's 8-rank 1 GB ring all-reduce against the "
        "Thakur-Rabenseifner-Gropp formula and nccl-tests.")] = False,
    json_path: JsonPathOption = None,
) -> None:
    """Predicted time and bandwidth of a backend's collective per size, and the numeric
    error of a real run in its reduction format."""
    from hwport import collectives as coll

    if validate:
        backend, op, world_size, algorithm = "simgpu", "all_reduce", 8, "ring"
    spec = plugins.get_backend(backend)
    ic = spec.interconnect
    declared = ic.collectives.get(op)
    if declared is None:
        raise _fail(f"backend {backend!r} declares no {op} "
                    f"(interconnect.collectives has {sorted(ic.collectives)})")
    algo = algorithm or declared[0]
    if algo not in declared:
        raise _fail(f"backend {backend!r} declares {op} algorithms {list(declared)}, not "
                    f"{algo!r}")
    sched = coll.schedule(op, algo, world_size, ic.shape)
    fmt = reduction_format or ic.reduction_format
    spec.format(fmt)  # an unknown format fails here, naming the known ones
    limit = _sizes(measure_up_to)[0] if measure_up_to.strip() not in ("0", "") else 0
    elem = spec.format(fmt).bits / 8
    rows = []
    chosen = [1 << 30] if validate else _sizes(sizes)
    for size in chosen:
        c = coll.cost(sched, size, spec)
        row: dict[str, Any] = {"bytes": size, "seconds": c.seconds, "algbw": c.algbw,
                               "busbw": c.busbw, "steps": c.steps}
        if size <= limit:
            m = coll.measure(op, algo, world_size, max(int(size / elem), 1), fmt, seed,
                             ic.shape)
            row["measured"] = {"max_relative_error": m.max_relative,
                               "rms_relative_error": m.rms_relative,
                               "ranks_agree": m.ranks_agree}
        rows.append(row)
    check = None
    if validate:
        alpha, beta = ic.link_latency, 1 / coll.link_bandwidth(spec)
        thakur = coll.thakur_all_reduce(1 << 30, 8, alpha, beta)
        pred = rows[0]["busbw"]
        check = {"predicted_busbw": pred, "thakur_seconds": thakur,
                 "thakur_busbw": (1 << 30) / thakur * 2 * 7 / 8,
                 "nccl_tests_busbw": NCCL_TESTS_H100,
                 "error": (pred - NCCL_TESTS_H100) / NCCL_TESTS_H100}
    data = {"backend": backend, "op": op, "algorithm": algo, "world_size": world_size,
            "reduction_format": fmt, "sizes": rows, "validation": check}
    if json_path is not None:
        _write_json(json_path, data)
    if json_path is not None and str(json_path) == "-":
        return
    table = Table(title=f"hwport collectives: {op} ({algo}) on {world_size} x {backend}, "
                        f"reduced in {fmt}", title_justify="left")
    for col in ("size", "time", "algbw", "busbw", "measured error (max / rms)"):
        table.add_column(col, justify="right")
    for row in rows:
        got = row.get("measured")
        err = (f"{got['max_relative_error']:.3g} / {got['rms_relative_error']:.3g}"
               + ("" if got["ranks_agree"] else " [red]ranks disagree[/]")) if got else "-"
        table.add_row(si(row["bytes"], "B"), seconds(row["seconds"]),
                      si(row["algbw"], "B/s"), si(row["busbw"], "B/s"), err)
    out.print(table)
    if check is not None:
        out.print(f"8 x simgpu ring all-reduce of 1 GiB: predicted busbw "
                  f"{si(check['predicted_busbw'], 'B/s')}; Thakur-Rabenseifner-Gropp formula "
                  f"{seconds(check['thakur_seconds'])} = busbw "
                  f"{si(check['thakur_busbw'], 'B/s')}; nccl-tests on 8x H100 NVLink about "
                  f"{si(NCCL_TESTS_H100, 'B/s')}: error {check['error']:+.1%}",
                  highlight=False)


# -- stored runs --------------------------------------------------------------------------
runs_app = typer.Typer(help="Stored runs (the results store): list them, show one.",
                       no_args_is_help=True)
app.add_typer(runs_app, name="runs")


def _open_store(path: Path | None) -> Any:
    from hwport.store import Store, StoreError, default_path

    where = path if path is not None else default_path()
    if not where.exists():
        raise StoreError(f"store {where}: no such file (hwport compare, run and port create "
                         "it; --store PATH or $HWPORT_STORE name another)")
    try:  # reading never writes, unless the store needs migrating to this hwport's schema
        return Store(where, readonly=True)
    except StoreError as e:
        if "needs migrating" not in str(e):
            raise
        return Store(where)


def _when(iso: str | None) -> str:
    return iso.replace("T", " ").removesuffix("+00:00") if iso else "-"


@runs_app.command("list")
def runs_list(
    store_path: StoreOption = None,
    limit: Annotated[int, typer.Option(help="Newest runs to list (0: all).")] = 20,
    as_json: JsonFlag = False,
) -> None:
    """List stored runs, newest first: id, kind, status, recipe, cells done."""
    with _open_store(store_path) as st:
        records = st.runs(limit or None)
        path = st.path
    if as_json:
        _json([dataclasses.asdict(r) for r in records])
        return
    table = Table(title=f"hwport runs in {escape(str(path))}", title_justify="left")
    for col in ("id", "kind", "status", "created (UTC)", "recipe", "seed", "steps", "cells",
                "backends", "pipelines / modes", "hwport"):
        table.add_column(col, justify="right" if col in ("id", "seed", "steps") else "left")
    for r in records:
        status = r.status if r.status == "finished" else f"[yellow]{r.status}[/]"
        table.add_row(str(r.id), r.kind, status, _when(r.created), escape(r.recipe),
                      str(r.seed), str(r.steps or "default"), f"{r.cells_done}/{r.cells_total}",
                      escape(",".join(r.params.get("backends", []))),
                      escape(",".join(r.params.get("pipelines", [])) + " / "
                             + ",".join(r.params.get("modes", []))), r.hwport_version)
    out.print(table)


def _stored_run(store_path: Path | None, run_id: int | None) -> Any:
    with _open_store(store_path) as st:
        return st.load(st.latest() if run_id is None else run_id)


@runs_app.command("show")
def runs_show(
    run_id: Annotated[int, typer.Argument(help="The run's id (hwport runs list).")],
    store_path: StoreOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Show one stored run: its outcome table, efforts and porting results."""
    from hwport.porting import PortResult

    run = _stored_run(store_path, run_id)
    r = run.record
    if as_json:
        _json({"run": dataclasses.asdict(r), "recipe": run.recipe,
               "cells": [c.to_dict() for c in run.cells], "port": list(run.ports.values()),
               "specs": run.specs})
        return
    partial = "" if r.status == "finished" else f" [yellow]({r.status}: partial)[/]"
    out.print(f"[bold]run {r.id}[/]: {r.kind}, {r.status}{partial}; created {_when(r.created)}"
              f", finished {_when(r.finished)}; hwport {r.hwport_version}; "
              f"{r.cells_done}/{r.cells_total} cells" + (f"; {escape(r.error)}" if r.error
                                                         else ""), highlight=False)
    params = r.params
    efforts = {k: _effort_text(PortResult.from_dict(v)) for k, v in run.ports.items()}
    _print_comparison(f"{r.kind}: recipe {r.recipe}, seed {r.seed}",
                      params.get("backends", []), params.get("pipelines", []),
                      params.get("modes", []), run.cells, efforts)
    if r.kind == "port":
        for v in run.ports.values():
            _print_port(PortResult.from_dict(v))


@app.command(name="diff")
def diff_cmd(
    a: Annotated[int, typer.Argument(help="The first run's id.")],
    b: Annotated[int, typer.Argument(help="The second run's id.")],
    store_path: StoreOption = None,
    as_json: JsonFlag = False,
) -> None:
    """What changed between two stored runs: outcomes, metrics, efforts, and the spec
    figures, recipe fields and versions that differ."""
    from hwport.diff import diff

    with _open_store(store_path) as st:
        d = diff(st.load(a), st.load(b))
    if as_json:
        _json(d.to_dict())
        return

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.5g}"

    def eff(v: Any) -> str:
        return "not searched" if v == "-" else "no fix" if v is None else str(v)

    changed = d.changed
    table = Table(title=f"hwport diff {a} {b}: {len(changed)} of {len(d.cells)} cell(s) "
                        "changed", title_justify="left")
    for col in ("pipeline / mode", "backend", f"outcome {a} -> {b}", "metric", f"in {a}",
                f"in {b}", "change", f"effort {a} -> {b}"):
        table.add_column(col)
    for c in changed:
        o = c.outcome
        moved = f"{o[0] or 'not run'} -> {o[1] or 'not run'}"
        table.add_row(f"{c.pipeline} {c.mode}", c.backend,
                      moved if o[0] == o[1] else f"[bold]{moved}[/]", c.metric,
                      num(c.value[0]), num(c.value[1]),
                      "-" if c.relative is None else f"{c.relative:+.2%}",
                      f"{eff(c.effort[0])} -> {eff(c.effort[1])}")
    out.print(table)
    if d.versions[0] != d.versions[1]:
        out.print(f"hwport {d.versions[0]} -> {d.versions[1]}", highlight=False)
    for what, rows in [("setting", d.settings), ("recipe", d.recipe)] + [
            (f"spec {name}", rows) for name, rows in d.specs.items()]:
        for field_, va, vb in rows:
            out.print(f"{escape(what)} {escape(field_)}: {escape(repr(va))} -> "
                      f"{escape(repr(vb))}", highlight=False)


@app.command()
def report(
    run_id: Annotated[int | None, typer.Argument(help="The run's id (default: the newest).",
                                                 show_default=False)] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Directory to write report.html, "
                                          "report.md and images/ to.")] = Path("hwport-report"),
    store_path: StoreOption = None,
) -> None:
    """Write a stored run's report: a self-contained HTML page and a Markdown file, with
    the outcome matrix, training curves, memory, step time, notes, telemetry and specs."""
    from hwport import report as rp

    run = _stored_run(store_path, run_id)
    html, md = rp.write(run, out_dir)
    err.print(f"wrote {escape(str(html))} and {escape(str(md))} (run {run.record.id})",
              highlight=False)


@app.command()
def conformance(
    backend: Annotated[str, typer.Argument(help="The backend to check.")],
    report: Annotated[Path | None, typer.Option(help="Write a JSON report to PATH.")] = None,
    xfail: Annotated[Path | None, typer.Option(help="Expected-failures file "
                                               "('pattern  # reason' per line).")] = None,
) -> None:
    """Run the conformance suite on one backend (pytest --pyargs hwport.conformance)."""
    import subprocess

    plugins.registry().get(backend)  # an unknown name fails here, listing the known ones
    args = [sys.executable, "-m", "pytest", "--pyargs", "hwport.conformance",
            "--hwport-backend", backend, "-q", "-p", "no:cacheprovider", "-o", "addopts=",
            "-o", "testpaths="]
    if report is not None:
        args += ["--hwport-report", str(report)]
    if xfail is not None:
        args += ["--hwport-xfail", str(xfail)]
    raise typer.Exit(subprocess.run(args).returncode)  # a fresh interpreter for pytest


def main() -> None:
    """Entry point of the ``hwport`` console script."""
    try:
        app()
    except HwportError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
