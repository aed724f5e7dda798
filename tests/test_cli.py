"""The ``hwport`` command line, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_spec import MYCHIP_TOML, accumulators_as_list, line_of

import hwport
from hwport.spec import BackendSpec

BUILTIN = ("dataflow", "dojo", "reference", "simgpu")
SCRIPT = Path(sys.executable).with_name("hwport")


def hwport_cli(*args: str | Path, pythonpath: Path | None = None,
               script: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``python -m hwport.cli ARGS`` (or the console script) with a wide terminal."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    env.update(COLUMNS="200", NO_COLOR="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    cmd = [str(SCRIPT)] if script else [sys.executable, "-m", "hwport.cli"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=60, check=False)


def flat(text: str) -> str:
    """Text with its line wrapping undone (rich wraps long lines)."""
    return " ".join(text.split())


def write(tmp_path: Path, text: str, name: str = "chip.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


BROKEN_PLUGIN = 'raise RuntimeError("boom: the fake plugin cannot start")\n'


# -- basics ----------------------------------------------------------------------------------
def test_version() -> None:
    r = hwport_cli("--version")
    assert r.returncode == 0, r.stderr
    assert "hwport 0.1" in r.stdout
    # whether jitted JAX programs round with the C kernel (its FFI handler's probe)
    from hwport.rounding import ffi_kernel

    why = ffi_kernel()
    assert ("native C through XLA FFI" if why is None else f"XLA operations ({why})") \
        in flat(r.stdout)


@pytest.mark.skipif(not SCRIPT.exists(), reason="no hwport console script next to python")
def test_console_script() -> None:
    r = hwport_cli("--version", script=True)
    assert r.returncode == 0, r.stderr
    assert f"hwport {hwport.__version__}" in r.stdout


def test_no_arguments_shows_help() -> None:
    r = hwport_cli()
    assert "backends" in r.stdout + r.stderr
    assert "Traceback" not in r.stderr


def test_backends_table() -> None:
    r = hwport_cli("backends")
    assert r.returncode == 0, r.stderr
    for name in BUILTIN:
        assert name in r.stdout
    assert "Traceback" not in r.stderr


def test_backends_json() -> None:
    r = hwport_cli("backends", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert isinstance(data, list)
    assert {"dataflow", "dojo", "reference", "simgpu"} <= {d["name"] for d in data}
    for entry in data:
        assert {"name", "precision", "memory", "interconnect", "compute"} <= set(entry)
        spec = {k: v for k, v in entry.items() if k not in ("plugin", "origin")}
        assert BackendSpec.from_dict(spec) == hwport.get_backend(entry["name"])


def test_show_json_round_trips() -> None:
    r = hwport_cli("show", "dojo", "--json")
    assert r.returncode == 0, r.stderr
    assert BackendSpec.from_dict(json.loads(r.stdout)) == hwport.get_backend("dojo")


def test_show_marks_assumptions() -> None:
    r = hwport_cli("show", "dojo")
    assert r.returncode == 0, r.stderr
    out = flat(r.stdout)
    assert "assumption" in out
    assert "memory.tiers.dip_hbm.capacity" in out
    assert "unsourced" not in out


def test_formats_json() -> None:
    r = hwport_cli("formats", "--json")
    assert r.returncode == 0, r.stderr
    formats = {f["name"]: f for f in json.loads(r.stdout)}
    assert formats["e4m3fn"]["max"] == 448
    assert formats["e5m2"]["max"] == 57344
    assert formats["bf16"]["bits"] == 16


def test_formats_table() -> None:
    r = hwport_cli("formats")
    assert r.returncode == 0, r.stderr
    assert "e4m3fn" in r.stdout and "448" in r.stdout


def test_show_unknown_backend() -> None:
    r = hwport_cli("show", "nope")
    assert r.returncode == 1
    err = flat(r.stderr)
    assert "unknown backend 'nope'" in err
    for name in BUILTIN:
        assert name in err
    assert "Traceback" not in r.stderr
    assert r.stdout == ""


# -- spec files ------------------------------------------------------------------------------
def test_show_and_validate_good_file(tmp_path: Path) -> None:
    path = write(tmp_path, MYCHIP_TOML)
    r = hwport_cli("validate", path)
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout and "mychip" in r.stdout
    r = hwport_cli("show", path, "--json")
    assert r.returncode == 0, r.stderr
    assert BackendSpec.from_dict(json.loads(r.stdout)) == hwport.load_spec(path)
    r = hwport_cli("show", path)
    assert r.returncode == 0, r.stderr
    assert "mychip" in r.stdout and "assumption" in r.stdout


def test_show_malformed_file(tmp_path: Path) -> None:
    text = MYCHIP_TOML.replace("\n[interconnect]\n", "\n[interconnect\n")
    line = line_of(text, "[interconnect")
    path = write(tmp_path, text, "malformed.toml")
    for command in ("show", "validate"):
        r = hwport_cli(command, path)
        assert r.returncode == 1, (command, r.stdout)
        err = flat(r.stderr)
        assert str(path) in err, command
        assert f"line {line}" in err, command
        assert "Traceback" not in r.stderr


def test_validate_bad_file(tmp_path: Path) -> None:
    text = MYCHIP_TOML.replace('bandwidth = "1.2 TB/s"', 'bandwidth = "-1.2 TB/s"')
    line = line_of(text, 'bandwidth = "-1.2 TB/s"')
    path = write(tmp_path, text, "bad.toml")
    r = hwport_cli("validate", path)
    assert r.returncode == 1
    assert f"{path}:{line}: memory.tiers[1].bandwidth" in flat(r.stderr)
    assert "Traceback" not in r.stderr
    r = hwport_cli("show", path)
    assert r.returncode == 1
    assert f"{path}:{line}: memory.tiers[1].bandwidth" in flat(r.stderr)


def test_validate_several_files(tmp_path: Path) -> None:
    good = write(tmp_path, MYCHIP_TOML, "good.toml")
    bad = write(tmp_path, MYCHIP_TOML.replace("devices = 16", "devices = 15"), "bad.toml")
    r = hwport_cli("validate", good, bad)
    assert r.returncode == 1
    assert f"{good}: ok" in flat(r.stdout)
    assert str(bad) in flat(r.stderr) and "interconnect.shape" in flat(r.stderr)


def test_validate_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    r = hwport_cli("validate", path)
    assert r.returncode == 1
    assert str(path) in flat(r.stderr)
    assert "Traceback" not in r.stderr


def test_validate_wrong_shape_is_an_error_not_a_crash(tmp_path: Path) -> None:
    # `accumulators = ["fp32"]` (a list where a table belongs) must be reported like any
    # other bad field, not end the command with a traceback.
    text = accumulators_as_list()
    path = write(tmp_path, text)
    r = hwport_cli("validate", path)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr, r.stderr[-400:]
    assert "precision.accumulators" in flat(r.stderr)


def test_validate_value_that_looks_like_markup(tmp_path: Path) -> None:
    # Values from the file are shown as they are, never read as rich console markup.
    path = write(tmp_path, MYCHIP_TOML.replace('scope = "chip"', 'scope = "[/chip]"'))
    r = hwport_cli("validate", path)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr, r.stderr[-400:]
    assert "[/chip]" in r.stderr


# -- a broken third-party plugin does not break the command ----------------------------------
def test_broken_plugin_is_reported_not_fatal(fake_plugin) -> None:
    site = fake_plugin("hwp_fake_boom", BROKEN_PLUGIN)
    r = hwport_cli("backends", pythonpath=site)
    assert r.returncode == 0, r.stderr
    for name in BUILTIN:
        assert name in r.stdout
    err = flat(r.stderr)
    assert "fakeboom" in err
    assert "boom: the fake plugin cannot start" in err
    assert "Traceback" not in r.stderr

    r = hwport_cli("backends", "--json", pythonpath=site)
    assert r.returncode == 0, r.stderr
    assert set(BUILTIN) <= {d["name"] for d in json.loads(r.stdout)}
    assert "fakeboom" in r.stderr


def test_good_plugin_shows_up(fake_plugin) -> None:
    from test_plugins import GOOD

    site = fake_plugin("hwp_fake_good", GOOD)
    r = hwport_cli("backends", "--json", pythonpath=site)
    assert r.returncode == 0, r.stderr
    entry = {d["name"]: d for d in json.loads(r.stdout)}["fakegood"]
    assert (entry["plugin"], entry["origin"]) == ("fakegood", "hwp_fake_good 0.1")
    r = hwport_cli("show", "fakegood", pythonpath=site)
    assert r.returncode == 0, r.stderr


def test_show_failed_plugin_backend_gives_the_reason(fake_plugin) -> None:
    site = fake_plugin("hwp_fake_boom", BROKEN_PLUGIN)
    r = hwport_cli("show", "fakeboom", pythonpath=site)
    assert r.returncode == 1
    assert "boom: the fake plugin cannot start" in flat(r.stderr)


def test_plugin_failure_reason_that_looks_like_markup(fake_plugin) -> None:
    # A reason is plain text: a bracketed path in it must neither crash the command nor
    # vanish from the message.
    site = fake_plugin("hwp_fake_cfg",
                       'raise RuntimeError("cannot read [/etc/chip.conf] or [bold]defaults")\n')
    r = hwport_cli("backends", "--json", pythonpath=site)
    assert r.returncode == 0, r.stderr[-400:]
    assert set(BUILTIN) <= {d["name"] for d in json.loads(r.stdout)}
    assert "cannot read [/etc/chip.conf] or [bold]defaults" in flat(r.stderr)
