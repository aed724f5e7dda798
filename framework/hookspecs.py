"""Every hook hwport calls, in one place, grouped by phase.

Plugins implement them with ``@hwport.hookimpl`` in a module (or object) named by an entry
point in the ``hwport`` group of their package metadata::

    [project.entry-points.hwport]
    mychip = "mychip_hwport.plugin"

Hooks return data; hwport calls each plugin's implementation on its own, so a plugin that
raises or returns bad data is reported by name and skipped while the others keep working.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from hwport.formats import FloatFormat
    from hwport.pipeline import PipelineFactory
    from hwport.recipes import Mitigation, Recipe
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
