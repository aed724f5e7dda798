"""The plugin kit: docs/plugin-authors.md, the example plugin, conformance on plugins.

Plugins are installed for real (``pip install --no-deps --no-build-isolation --target``, no
network) into temporary site directories and used from subprocesses with that directory on
PYTHONPATH, so this process keeps seeing exactly hwport's own backends.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parents[1]
DOC = ROOT / "docs" / "plugin-authors.md"
EXAMPLE = ROOT / "plugins" / "hwport-sramchip"
# The doc marks each file of the example it shows in full with a comment before the block:
#   <!-- file: hwport_sramchip/__init__.py -->
#   ```python
FILE_BLOCK = re.compile(r"^<!-- file: (\S+) -->\n```[a-z]*\n(.*?)\n```$", re.S | re.M)
EXAMPLE_FILES = ("pyproject.toml", "hwport_sramchip/__init__.py",
                 "hwport_sramchip/sramchip.toml", "hwport_sramchip/known-limitations.txt")
INFER = ("parity", "degraded", "broken")
UNSOURCED = "interconnect.link_latency"  # the figure the broken plugin leaves unsourced

Run = Callable[..., subprocess.CompletedProcess[str]]


def doc_files() -> dict[str, str]:
    """The files docs/plugin-authors.md shows in full, by path in the package."""
    return {path: text + "\n" for path, text in FILE_BLOCK.findall(DOC.read_text("utf-8"))}


def renamed(files: dict[str, str], name: str) -> dict[str, str]:
    """The doc's plugin as a plugin of another name: what an author copying it does."""
    return {p.replace("sramchip", name): t.replace("sramchip", name) for p, t in files.items()}


def write_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    return root


def pip_install(package: Path, site: Path) -> Path:
    """Install ``package`` into ``site`` offline (it builds in place: pass a copy)."""
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                        "--no-build-isolation", "--disable-pip-version-check", "-q",
                        "--target", str(site), str(package)],
                       capture_output=True, text=True, timeout=180, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return site


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """``runner(*cmd, site=...)``: a subprocess with the site on PYTHONPATH, a temporary
    HWPORT_CACHE and working directory, and no colour."""
    cache = tmp_path_factory.mktemp("cache")
    cwd = tmp_path_factory.mktemp("cwd")

    def run(*cmd: str | Path, site: Path) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")
               and not k.startswith("PYTEST_")}
        env.update(PYTHONPATH=str(site), HWPORT_CACHE=str(cache), COLUMNS="200", NO_COLOR="1")
        return subprocess.run([sys.executable, *map(str, cmd)], capture_output=True, text=True,
                              env=env, cwd=cwd, timeout=300, check=False)

    return run


def conformance(run: Run, site: Path, backend: str, report: Path, *extra: str | Path
                ) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    r = run("-m", "pytest", "--pyargs", "hwport.conformance", "--hwport-backend", backend,
            "-p", "no:cacheprovider", "--hwport-report", report, *extra, site=site)
    assert report.exists(), r.stdout[-3000:] + r.stderr[-3000:]
    return r, json.loads(report.read_text())


def outcome_of(report: dict[str, Any], test: str) -> dict[str, Any]:
    (hit,) = [t for t in report["tests"] if t["test"].endswith(f"::{test}")]
    return hit


# -- the doc --------------------------------------------------------------------------------
def test_doc_shows_the_example_files_verbatim() -> None:
    files = doc_files()
    assert set(EXAMPLE_FILES) <= set(files), f"docs/plugin-authors.md shows {sorted(files)}"
    for rel, text in files.items():
        assert (EXAMPLE / rel).read_text("utf-8") == text, f"the doc's {rel} differs from " \
            f"plugins/hwport-sramchip/{rel}: update one from the other"


def test_doc_links_exist() -> None:
    for link in re.findall(r"\]\(([^)#]+)\)", DOC.read_text("utf-8")):
        assert (DOC.parent / link).exists(), f"docs/plugin-authors.md links to missing {link}"


# -- a plugin written from the doc alone ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("tinychip")
    package = write_package(tmp / "hwport-tinychip", renamed(doc_files(), "tinychip"))
    return pip_install(package, tmp / "site")


def test_plugin_written_from_the_doc_works_end_to_end(tiny_site: Path, runner: Run) -> None:
    r = runner("-m", "hwport.cli", "backends", "--json", site=tiny_site)
    assert r.returncode == 0, r.stderr
    assert "failed and was skipped" not in r.stderr, r.stderr
    listed = {b["name"]: b for b in json.loads(r.stdout)}
    assert {"reference", "simgpu", "dojo", "dataflow", "tinychip"} <= set(listed)
    assert listed["tinychip"]["plugin"] == "tinychip"
    assert listed["tinychip"]["origin"] == "hwport-tinychip 0.1.0"

    r = runner("-m", "hwport.cli", "show", "tinychip", site=tiny_site)
    assert r.returncode == 0, r.stderr
    assert "tinychip:" in r.stdout and "compute.peak_flops.fp16" in r.stdout
    assert "without a source" not in r.stderr, r.stderr

    r = runner("-m", "hwport.cli", "run", "-b", "tinychip", "-p", "digits", "--mode", "infer",
               "--steps", "10", "--json", "-", site=tiny_site)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["backend"] == "tinychip" and result["pipeline"] == "digits"
    assert result["outcome"] in INFER


# -- the example plugin passes conformance ----------------------------------------------------
@pytest.fixture(scope="module")
def sramchip_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("sramchip")
    copy = tmp / "hwport-sramchip"
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache"))
    return pip_install(copy, tmp / "site")


def test_example_plugin_passes_conformance(sramchip_site: Path, runner: Run,
                                           tmp_path: Path) -> None:
    known = sramchip_site / "hwport_sramchip" / "known-limitations.txt"  # shipped as data
    r, report = conformance(runner, sramchip_site, "sramchip", tmp_path / "r.json",
                            "--hwport-xfail", known)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert report["backends"] == ["sramchip"]
    assert report["exit_status"] == 0
    assert report["summary"].get("failed", 0) == 0, report["summary"]
    assert report["summary"].get("passed", 0) >= 9, report["summary"]
    assert all(t["test"].endswith(("[sramchip]", "-digits]", "-lm]")) for t in report["tests"])


# -- a broken spec: a clear report, and strict expected failures ------------------------------
@pytest.fixture(scope="module")
def broken_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The doc's plugin as 'brokenchip', with the assumption of one figure deleted."""
    tmp = tmp_path_factory.mktemp("brokenchip")
    files = renamed(doc_files(), "brokenchip")
    spec = "hwport_brokenchip/brokenchip.toml"
    lines = files[spec].splitlines(keepends=True)
    kept = [line for line in lines if not line.startswith(f'"{UNSOURCED}"')]
    assert len(kept) == len(lines) - 1
    files[spec] = "".join(kept)
    return pip_install(write_package(tmp / "hwport-brokenchip", files), tmp / "site")


# The pipeline runs are left out (-k): they pass on this spec and take most of the time.
QUICK = ("-k", "not reaches_an_outcome")


def test_unsourced_figure_fails_conformance_with_its_path(broken_site: Path, runner: Run,
                                                          tmp_path: Path) -> None:
    r, report = conformance(runner, broken_site, "brokenchip", tmp_path / "r.json", *QUICK)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert report["exit_status"] == 1
    assert report["summary"] == {"passed": 4, "failed": 1}, report["summary"]
    failed = outcome_of(report, "test_every_figure_has_a_source[brokenchip]")
    assert failed["outcome"] == "failed"
    assert f"figures with neither a source nor an assumption: ['{UNSOURCED}']" \
        in failed["message"], failed["message"]


def test_expected_failure_file_makes_it_pass(broken_site: Path, runner: Run,
                                             tmp_path: Path) -> None:
    known = tmp_path / "known-limitations.txt"
    known.write_text("# brokenchip's known limitations\n"
                     "test_every_figure_has_a_source*  # link latency not sourced yet\n")
    r, report = conformance(runner, broken_site, "brokenchip", tmp_path / "r.json",
                            "--hwport-xfail", known, *QUICK)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert report["summary"] == {"passed": 4, "xfailed": 1}, report["summary"]
    xfailed = outcome_of(report, "test_every_figure_has_a_source[brokenchip]")
    assert xfailed["outcome"] == "xfailed"
    assert UNSOURCED in xfailed["message"]  # what failed, as expected


def test_expected_failure_that_passes_fails_the_run(broken_site: Path, runner: Run,
                                                    tmp_path: Path) -> None:
    known = tmp_path / "known-limitations.txt"
    known.write_text("test_every_figure_has_a_source*  # link latency not sourced yet\n"
                     # a literal test id: "[" escaped, as docs/plugin-authors.md says
                     "test_spec_round_trips[brokenchip]  # believed broken, but it passes\n")
    r, report = conformance(runner, broken_site, "brokenchip", tmp_path / "r.json",
                            "--hwport-xfail", known, *QUICK)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert report["summary"] == {"passed": 3, "xfailed": 1, "failed": 1}, report["summary"]
    xpassed = outcome_of(report, "test_spec_round_trips[brokenchip]")
    assert xpassed["outcome"] == "failed"
    assert "XPASS(strict)" in xpassed["message"]
    assert "believed broken, but it passes" in xpassed["message"]
