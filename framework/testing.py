"""hwport's pytest plugin: the same tests across every backend, by declared capability.

Registered through the ``pytest11`` entry point, so any test suite (hwport's own, a plugin
author's) gets:

* ``--hwport-backend NAME`` (repeatable, or comma-separated; ``all``, the default, means
  every registered backend), and a ``hwport_backend`` fixture parametrised over them that
  yields the backend's :class:`~hwport.spec.BackendSpec`;
* the marker ``@pytest.mark.hwport_requires("stochastic_rounding", "format:bf16", ...)``:
  the test is skipped on a backend that does not declare every capability
  (:attr:`BackendSpec.capabilities`), never by backend name;
* ``--hwport-xfail FILE``: known limitations, one ``pattern  # reason`` per line (fnmatch
  on the test id); each matching test is an expected failure, and strict: if it passes,
  the run fails and says so;
* ``--hwport-report PATH``: a JSON report of every test's outcome.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

import pytest

from hwport import plugins
from hwport.errors import HwportError


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hwport", "hwport backends")
    group.addoption("--hwport-backend", action="append", default=None, metavar="NAME",
                    help="backend(s) to run hwport_backend tests on (default: all)")
    group.addoption("--hwport-xfail", default=None, metavar="FILE",
                    help="expected failures: 'pattern  # reason' per line (strict)")
    group.addoption("--hwport-report", default=None, metavar="PATH",
                    help="write a JSON report of the outcomes")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "hwport_requires(*capabilities): skip on backends that do not declare "
        "all of these capabilities (see BackendSpec.capabilities)")
    path = config.getoption("--hwport-report", default=None)
    if path:
        config.stash[_REPORT] = _Report(Path(path))
        config.pluginmanager.register(config.stash[_REPORT], "hwport-report")


def selected_backends(config: pytest.Config) -> list[str]:
    """The backend names chosen with --hwport-backend (all registered ones by default)."""
    raw = config.getoption("--hwport-backend", default=None) or ["all"]
    names = [n.strip() for item in raw for n in item.split(",") if n.strip()]
    reg = plugins.registry()
    if "all" in names:
        return sorted(reg.backends)
    for n in names:
        reg.get(n)  # an unknown name is an error that lists the known ones
    return list(dict.fromkeys(names))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "hwport_backend" in metafunc.fixturenames:
        try:
            names = selected_backends(metafunc.config)
        except HwportError as e:
            raise pytest.UsageError(str(e)) from None
        metafunc.parametrize("hwport_backend", names, indirect=True, ids=names)


@pytest.fixture
def hwport_backend(request: pytest.FixtureRequest) -> Any:
    """The spec of the backend this test runs on (skipped where a capability is missing)."""
    spec = plugins.get_backend(request.param)
    for mark in request.node.iter_markers("hwport_requires"):
        missing = [c for c in mark.args if c not in spec.capabilities]
        if missing:
            pytest.skip(f"{spec.name} does not declare {', '.join(missing)}")
    return spec


def read_xfail(path: Path) -> list[tuple[str, str]]:
    """(pattern, reason) pairs from an expected-failures file."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise pytest.UsageError(f"--hwport-xfail {path}: {e.strerror or e}") from None
    out = []
    for line in lines:
        pattern, _, reason = line.partition("#")
        if pattern.strip():
            out.append((pattern.strip(), reason.strip() or "known limitation"))
    return out


def _matches(item: pytest.Item, pattern: str) -> bool:
    """A test id (exactly, or its last part) or an fnmatch pattern over either."""
    if pattern in (item.nodeid, item.name) or item.nodeid.endswith("::" + pattern):
        return True
    return fnmatch.fnmatchcase(item.nodeid, pattern) or fnmatch.fnmatchcase(item.name, pattern)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    path = config.getoption("--hwport-xfail", default=None)
    if not path:
        return
    unmatched = []
    for pattern, reason in read_xfail(Path(path)):
        hits = [item for item in items if _matches(item, pattern)]
        for item in hits:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=True))
        if not hits:
            unmatched.append(pattern)
    config.stash[_UNMATCHED] = unmatched


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    for pattern in config.stash.get(_UNMATCHED, []):
        terminalreporter.write_line(f"hwport: expected failure {pattern!r} matches no test "
                                    "(a typo, or a test that was renamed?)", yellow=True)


class _Report:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.tests: list[dict[str, Any]] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            outcome: str = report.outcome
            message = str(report.longrepr)[-2000:] if report.failed or report.skipped else ""
            if hasattr(report, "wasxfail"):  # the reason, then what failed
                outcome = "xfailed" if report.skipped else "xpassed"
                message = f"expected failure: {report.wasxfail}\n{message}"
            self.tests.append({"test": report.nodeid, "outcome": outcome,
                               "duration_s": round(report.duration, 4), "message": message})

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        summary: dict[str, int] = {}
        for t in self.tests:
            summary[t["outcome"]] = summary.get(t["outcome"], 0) + 1
        data = {"backends": selected_backends(session.config), "exit_status": int(exitstatus),
                "summary": summary, "tests": self.tests,
                "unmatched_expected_failures": session.config.stash.get(_UNMATCHED, [])}
        self.path.write_text(json.dumps(data, indent=2))


_REPORT = pytest.StashKey[_Report]()
_UNMATCHED = pytest.StashKey[list[str]]()
