"""The ``hwport`` command line: tables for people, ``--json`` for programs.

Every command prints its result to stdout; errors go to stderr as one ``error:`` message
naming what is wrong and where, with exit status 1 (2 for bad usage).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
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
from hwport.spec import BackendSpec

app = typer.Typer(
    help="What happens to your training and inference pipelines when you port them from "
         "NVIDIA GPUs to another chip.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
out = Console(soft_wrap=False)
err = Console(stderr=True, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])

JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(1)


def _json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, allow_nan=False) + "\n")


def si(value: float, unit: str) -> str:
    """``value`` with an SI prefix: si(3.35e12, "B/s") == "3.35 TB/s"."""
    if math.isinf(value):
        return "unbounded"
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.4g} {prefix}{unit}"
    return f"{value:.4g} {unit}"


def seconds(value: float) -> str:
    """A duration in s, ms, us or ns."""
    for factor, unit in ((1, "s"), (1e-3, "ms"), (1e-6, "us"), (1e-9, "ns")):
        if value >= factor:
            return f"{value / factor:.3g} {unit}"
    return "0"


def _version(value: bool) -> None:
    if value:
        from hwport.rounding import NATIVE_KERNEL

        kernel = "native C" if NATIVE_KERNEL else "numpy (C kernel not built)"
        out.print(f"hwport {hwport.__version__} (rounding kernel: {kernel})", highlight=False)
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


def main() -> None:
    """Entry point of the ``hwport`` console script."""
    try:
        app()
    except HwportError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
