"""Every hook hwport calls, in one place, grouped by phase.

Plugins implement them with ``@hwport.hookimpl`` in a module (or object) named by an entry
point in the ``hwport`` group of their package metadata::

    [project.entry-points.hwport]
    mychip = "mychip_hwport.plugin"

Registration hooks return data; observation hooks are told of each cell as it starts and
finishes (exporters to experiment trackers are observers). hwport calls each plugin's
implementation on its own, so a plugin that raises or returns bad data is reported by name
and skipped while the others keep working.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from hwport.formats import FloatFormat
    from hwport.pipeline import PipelineFactory
    from hwport.recipes import Mitigation, Recipe
    from hwport.runner import RunInfo, RunResult
    from hwport.spec import BackendSpec

PROJECT = "hwport"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- registration: what a plugin contributes ---------------------------------------------
@hookspec
def hwport_formats() -> Sequence[FloatFormat]:
    """Number formats to make known by name to every spec, recipe and command."""
    raise NotImplementedError


@hookspec
def hwport_backends() -> Sequence[BackendSpec]:
    """Backend specs this plugin provides (names must be unique across plugins)."""
    raise NotImplementedError


@hookspec
def hwport_recipes() -> Sequence[Recipe]:
    """Recipes (how a program uses numerics) to offer by name."""
    raise NotImplementedError


@hookspec
def hwport_pipelines() -> Sequence[PipelineFactory]:
    """Pipelines (training + inference programs) to offer by name."""
    raise NotImplementedError


@hookspec
def hwport_mitigations() -> Sequence[Mitigation]:
    """Mitigations (named recipe changes a port may need) for ``hwport port`` to try."""
    raise NotImplementedError


# -- observation: told of every cell that runs --------------------------------------------
@hookspec
def hwport_run_started(run: RunInfo) -> None:
    """A cell is about to run (cells taken from a results store on resume do not run)."""


@hookspec
def hwport_run_finished(run: RunInfo, result: RunResult) -> None:
    """A cell finished with ``result`` (and, when stored, was committed to the store).

    An observer that raises is reported as a failed plugin and not called again in this
    process; the run goes on."""
