"""The plugin registry: built-in and third-party backends, found the same way.

Plugins are modules named by entry points in the ``hwport`` group (hwport's own backends
included). Loading never raises for a plugin's fault: a plugin that fails to import,
implements a hook that does not exist, raises in a hook or returns bad data is recorded as a
:class:`PluginFailure` with its name and the reason, and everything it contributed is
dropped; the other plugins keep working.
"""

from __future__ import annotations

import importlib.metadata as md
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy

from hwport import formats as _formats
from hwport import hookspecs
from hwport.errors import HwportError, UnknownNameError
from hwport.formats import FloatFormat
from hwport.pipeline import PipelineFactory
from hwport.recipes import Mitigation, Recipe
from hwport.spec import BackendSpec

if TYPE_CHECKING:
    from hwport.runner import RunInfo, RunResult


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that was skipped, and why."""

    plugin: str
    origin: str
    reason: str


@dataclass(frozen=True)
class Backend:
    """A registered backend: its spec and the plugin that provided it."""

    spec: BackendSpec
    plugin: str
    origin: str

    @property
    def name(self) -> str:
        return self.spec.name


def _origin(ep: md.EntryPoint) -> str:
    dist = ep.dist
    return f"{dist.name} {dist.version}" if dist is not None else ep.value


def _describe(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {e}{where}"


@dataclass
class Registry:
    """Backends and formats from plugins, plus failures; build one with :meth:`load`."""

    pm: pluggy.PluginManager = field(default_factory=lambda: _manager())
    backends: dict[str, Backend] = field(default_factory=dict)
    recipes: dict[str, Recipe] = field(default_factory=dict)
    pipelines: dict[str, PipelineFactory] = field(default_factory=dict)
    mitigations: dict[str, Mitigation] = field(default_factory=dict)
    providers: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, name): plugin
    failures: list[PluginFailure] = field(default_factory=list)
    origins: dict[str, str] = field(default_factory=dict)
    collected: set[str] = field(default_factory=set)
    observers: Observers = field(init=False)

    def __post_init__(self) -> None:
        self.observers = Observers(self)

    @classmethod
    def load(cls, entry_points: Iterable[md.EntryPoint] | None = None) -> Registry:
        """A registry of every plugin in the ``hwport`` entry-point group (or the given)."""
        reg = cls()
        eps = md.entry_points(group=hookspecs.PROJECT) if entry_points is None else entry_points
        # hwport's own backends first, so that no plugin can take a built-in backend's name
        def order(ep: md.EntryPoint) -> tuple[bool, str]:
            return (ep.dist is None or ep.dist.name != "hwport", ep.name)

        for ep in sorted(eps, key=order):
            try:
                plugin = ep.load()
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # an import failure (even SystemExit) is the plugin's
                reason = f"import failed: {_describe(e)}"
                reg.failures.append(PluginFailure(ep.name, _origin(ep), reason))
                continue
            reg.add_plugin(plugin, ep.name, _origin(ep), collect=False)
        reg.collect()
        return reg

    def add_plugin(self, plugin: object, name: str, origin: str, collect: bool = True) -> None:
        """Register a plugin object or module; bad hook implementations are failures."""
        try:
            self.pm.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as e:
            self.failures.append(PluginFailure(name, origin, f"invalid plugin: {e}"))
            return
        self.origins[name] = origin
        if collect:
            self.collect()

    def collect(self) -> None:
        """Call the registration hooks of every plugin not yet collected.

        Formats of all plugins are registered before any backend is asked for, so a spec
        may use a format that a plugin provides.
        """
        self._check_pending()
        pending = self._uncollected()
        added: dict[str, list[str]] = {}  # format names each plugin made known
        for name, plugin in pending:
            added[name] = []
            try:
                for f in self._call(plugin, "hwport_formats", FloatFormat):
                    if _formats.register(f):
                        added[name].append(f.name)
            except HwportError as e:
                self._fail(name, plugin, str(e), added.pop(name))
        for name, plugin in pending:
            if name not in added:
                continue
            try:
                specs = self._call(plugin, "hwport_backends", BackendSpec)
                recipes = self._call(plugin, "hwport_recipes", Recipe)
                pipelines = self._call(plugin, "hwport_pipelines", PipelineFactory)
                mitigations = self._call(plugin, "hwport_mitigations", Mitigation)
                for kind, items in (("backend", specs), ("recipe", recipes),
                                    ("pipeline", pipelines), ("mitigation", mitigations)):
                    for item in items:
                        owner = self.providers.get((kind, item.name))
                        if owner is not None:
                            raise HwportError(f"{kind} name {item.name!r} is already provided "
                                              f"by plugin {owner!r}")
            except HwportError as e:
                self._fail(name, plugin, str(e), added[name])
                continue
            for spec in specs:
                self.backends[spec.name] = Backend(spec, name, self.origins[name])
            self.recipes.update((r.name, r) for r in recipes)
            self.pipelines.update((p.name, p) for p in pipelines)
            self.mitigations.update((m.name, m) for m in mitigations)
            for kind, items in (("backend", specs), ("recipe", recipes), ("pipeline", pipelines),
                                ("mitigation", mitigations)):
                self.providers.update(((kind, i.name), name) for i in items)
            self.collected.add(name)

    def _uncollected(self) -> list[tuple[str, object]]:
        return [(n, p) for n, p in self.pm.list_name_plugin()
                if n not in self.collected and p is not None]

    def _call(self, plugin: object, hook: str, kind: type) -> list[Any]:
        impls = [i for i in getattr(self.pm.hook, hook).get_hookimpls() if i.plugin is plugin]
        out: list[Any] = []
        for impl in impls:
            try:
                result = impl.function()
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # even SystemExit is the plugin's: report, keep going
                raise HwportError(f"{hook}() raised {_describe(e)}") from e
            if not isinstance(result, Sequence) or isinstance(result, str):
                raise HwportError(f"{hook}() returned {type(result).__name__}, expected a list "
                                  f"of {kind.__name__}")
            for item in result:
                if not isinstance(item, kind):
                    raise HwportError(f"{hook}() returned a {type(item).__name__} ({item!r:.60}), "
                                      f"expected {kind.__name__}")
            out.extend(result)
        return out

    def _check_pending(self) -> None:
        while True:
            try:
                self.pm.check_pending()
                return
            except pluggy.PluginValidationError as e:
                name = self.pm.get_name(e.plugin) or repr(e.plugin)
                self._fail(name, e.plugin, f"implements an unknown hook: {e}")

    def _fail(self, name: str, plugin: object, reason: str, formats: Sequence[str] = ()) -> None:
        self.failures.append(PluginFailure(name, self.origins.get(name, "?"), reason))
        for fmt_name in formats:  # what a failed plugin contributed goes with it
            _formats.unregister(fmt_name)
        if self.pm.is_registered(plugin):
            self.pm.unregister(plugin)

    # -- lookups ------------------------------------------------------------------------
    def get(self, name: str) -> Backend:
        """The backend called ``name``; an unknown name lists the known ones."""
        backend = self.backends.get(name)
        if backend is not None:
            return backend
        hint = "; ".join(f"plugin {f.plugin!r} ({f.origin}) failed: {f.reason}"
                         for f in self.failures if f.plugin == name)
        raise UnknownNameError("backend", name, self.backends, hint)

    def recipe(self, name: str) -> Recipe:
        """The recipe called ``name``; an unknown name lists the known ones."""
        if name not in self.recipes:
            raise UnknownNameError("recipe", name, self.recipes)
        return self.recipes[name]

    def pipeline(self, name: str) -> PipelineFactory:
        """The pipeline called ``name``, or a ``package.module:factory`` reference."""
        if name in self.pipelines:
            return self.pipelines[name]
        if ":" in name:
            from hwport.pipeline import load_factory

            return load_factory(name)
        raise UnknownNameError("pipeline", name, self.pipelines,
                               "a pipeline of your own is named package.module:factory")

    def register(self, spec: BackendSpec, plugin: str = "python") -> None:
        """Add a spec built in Python (for example a ``dataclasses.replace`` variant)."""
        if not isinstance(spec, BackendSpec):
            raise TypeError(f"register() takes a BackendSpec, not {type(spec).__name__}")
        if spec.name in self.backends:
            raise HwportError(f"backend name {spec.name!r} is already provided by plugin "
                              f"{self.backends[spec.name].plugin!r}")
        self.backends[spec.name] = Backend(spec, plugin, "registered at run time")
        self.providers[("backend", spec.name)] = plugin


class Observers:
    """Calls the observation hooks of every plugin, one plugin at a time: one that raises
    is recorded as a :class:`PluginFailure` and not called again; the run goes on."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.off: set[str] = set()
        self.failed: list[PluginFailure] = []  # also in registry.failures

    def started(self, run: RunInfo) -> None:
        self._notify("hwport_run_started", {"run": run})

    def finished(self, run: RunInfo, result: RunResult) -> None:
        self._notify("hwport_run_finished", {"run": run, "result": result})

    def _notify(self, hook: str, args: dict[str, Any]) -> None:
        reg = self.registry
        for impl in getattr(reg.pm.hook, hook).get_hookimpls():
            name = impl.plugin_name
            if name in self.off:
                continue
            try:
                impl.function(*(args[a] for a in impl.argnames))
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # the observer's fault: report it, keep running
                self.off.add(name)
                failure = PluginFailure(name, reg.origins.get(name, "?"), f"{hook}() raised "
                                        f"{_describe(e)}; its observers were switched off")
                self.failed.append(failure)
                reg.failures.append(failure)


def _manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


_default: Registry | None = None


def registry(reload: bool = False) -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    global _default
    if _default is None or reload:
        _default = Registry.load()
    return _default


def list_backends() -> list[BackendSpec]:
    """Specs of every registered backend, by name."""
    return [b.spec for _, b in sorted(registry().backends.items())]


def get_backend(name: str) -> BackendSpec:
    """The spec of the backend called ``name``."""
    return registry().get(name).spec


def register_backend(spec: BackendSpec) -> None:
    """Make ``spec`` available by name in this process, next to the plugins' backends."""
    registry().register(spec)


def plugin_failures() -> list[PluginFailure]:
    """Plugins that were skipped, with the reason."""
    return list(registry().failures)


__all__ = ["Backend", "PluginFailure", "Registry", "get_backend", "list_backends",
           "plugin_failures", "register_backend", "registry"]
