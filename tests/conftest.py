"""Shared fixtures: fake installed distributions that carry hwport plugins."""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

FakePlugin = Callable[..., Path]


@pytest.fixture(scope="session", autouse=True)
def private_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test (and every hwport it starts) stores its runs in a private results store,
    never the user's."""
    import os

    path = tmp_path_factory.mktemp("hwport-store") / "results.sqlite"
    before = os.environ.get("HWPORT_STORE")
    os.environ["HWPORT_STORE"] = str(path)
    yield path
    if before is None:
        del os.environ["HWPORT_STORE"]
    else:
        os.environ["HWPORT_STORE"] = before


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private reference-model cache for the requesting module, on disk and in memory."""
    from hwport import runner

    path = tmp_path_factory.mktemp("hwport-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HWPORT_CACHE", str(path))
        runner._REFERENCE.clear()
        yield path
        runner._REFERENCE.clear()


@pytest.fixture
def fake_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakePlugin]:
    """Factory: ``fake_plugin(name, source_code, extra_entry_points=None) -> site dir``.

    Writes ``<name>.py`` and ``<name>-0.1.dist-info/`` (METADATA and an entry_points.txt
    with ``[hwport]`` entry ``<name minus 'hwp_'> = <name>`` plus ``extra_entry_points``,
    a mapping of entry-point name to ``module[:attr]``) into one site directory under
    ``tmp_path``, and puts that directory first on ``sys.path`` so that
    ``importlib.metadata.entry_points(group="hwport")`` finds the plugin. Every plugin of a
    test shares the directory (the return value, also usable as PYTHONPATH for a
    subprocess). The plugin modules are removed from ``sys.modules`` afterwards.
    """
    import hwport.plugins

    hwport.plugins.registry()  # the process-wide registry is loaded before, without fakes
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    made: list[str] = []

    def make(name: str, source_code: str,
             extra_entry_points: dict[str, str] | None = None) -> Path:
        (site / f"{name}.py").write_text(textwrap.dedent(source_code), encoding="utf-8")
        dist = site / f"{name}-0.1.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n", encoding="utf-8")
        eps = {name.removeprefix("hwp_").replace("_", ""): name, **(extra_entry_points or {})}
        (dist / "entry_points.txt").write_text(
            "[hwport]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()), encoding="utf-8")
        made.append(name)
        importlib.invalidate_caches()
        return site

    yield make
    for name in made:
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[mod]
    importlib.invalidate_caches()
