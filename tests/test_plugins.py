"""The plugin registry, through real entry points of (fake) installed distributions."""

from __future__ import annotations

import importlib.metadata as md
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import hwport
from hwport import HwportError, UnknownNameError
from hwport.plugins import PluginFailure, Registry

REPO = Path(__file__).parents[1]
BUILTIN = ("dataflow", "dojo", "reference", "simgpu")

GOOD = '''
import dataclasses

from hwport import hookimpl
from hwport.backends.reference import SPEC


@hookimpl
def hwport_backends():
    return [dataclasses.replace(SPEC, name="fakegood", description="a third-party backend")]
'''

IMPORT_FAILS = '''
raise RuntimeError("boom")
'''

HOOK_RAISES = '''
from hwport import hookimpl


@hookimpl
def hwport_backends():
    raise ValueError("kaput")
'''

MISSPELLED_HOOK = '''
from hwport import hookimpl


@hookimpl
def hwport_backend():
    return []
'''


def duplicate_of(name: str) -> str:
    return f'''
import dataclasses

from hwport import hookimpl
from hwport.backends.reference import SPEC


@hookimpl
def hwport_backends():
    return [dataclasses.replace(SPEC, name={name!r}, description="an impostor")]
'''


def returning(expr: str, hook: str = "hwport_backends") -> str:
    return f'''
from hwport import hookimpl


@hookimpl
def {hook}():
    return {expr}
'''


FORMAT_PLUGIN = '''
from hwport import FloatFormat, hookimpl

FMT = FloatFormat("fakefmt8", 4, 3, 9, inf=False, nan="none", overflow="saturate",
                  description="a third-party 8-bit format")


@hookimpl
def hwport_formats():
    return [FMT]
'''

FORMAT_AND_BACKEND = FORMAT_PLUGIN + '''

@hookimpl
def hwport_backends():
    import dataclasses

    from hwport.backends.reference import SPEC

    precision = dataclasses.replace(SPEC.precision, formats=("fp32", "fakefmt8"),
                                    elementwise=("fp32", "fakefmt8"))
    return [dataclasses.replace(SPEC, name="fakefmtchip", precision=precision)]
'''

FORMAT_THEN_BAD_BACKEND = '''
from hwport import FloatFormat, hookimpl


@hookimpl
def hwport_formats():
    return [FloatFormat("fakedroppedfmt", 5, 2, 15)]


@hookimpl
def hwport_backends():
    return ["not a spec"]
'''


@pytest.fixture
def forget_formats() -> Iterator[list[str]]:
    """Names of formats a test's plugins register; unregistered afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        hwport.formats.unregister(name)


def failure(reg: Registry, plugin: str) -> PluginFailure:
    hits = [f for f in reg.failures if f.plugin == plugin]
    assert len(hits) == 1, reg.failures
    return hits[0]


def assert_builtins_intact(reg: Registry) -> None:
    for name in BUILTIN:
        backend = reg.get(name)
        assert backend.plugin == name
        assert backend.origin.startswith("hwport ")
    assert not [f for f in reg.failures if f.plugin in BUILTIN], reg.failures


# -- the built-ins --------------------------------------------------------------------------
def test_builtins_come_from_entry_points() -> None:
    eps = {ep.name: ep for ep in md.entry_points(group="hwport")}
    for name in BUILTIN:
        assert name in eps
        assert eps[name].value == f"hwport.backends.{name}"
        assert eps[name].dist is not None and eps[name].dist.name == "hwport"


def test_clean_load_has_builtins_and_no_failures() -> None:
    reg = Registry.load()
    assert_builtins_intact(reg)
    assert reg.failures == []
    assert set(BUILTIN) <= set(reg.backends)


def test_load_from_given_entry_points() -> None:
    ep = md.EntryPoint("reference", "hwport.backends.reference", "hwport")
    reg = Registry.load([ep])
    assert list(reg.backends) == ["reference"]
    assert reg.get("reference").origin == "hwport.backends.reference"  # no distribution


# -- third-party plugins -----------------------------------------------------------------------
def test_good_plugin_is_listed(fake_plugin) -> None:
    fake_plugin("hwp_fake_good", GOOD)
    reg = Registry.load()
    backend = reg.get("fakegood")
    assert backend.plugin == "fakegood"
    assert backend.origin == "hwp_fake_good 0.1"
    assert backend.spec.description == "a third-party backend"
    assert backend.spec.unsourced() == []
    assert reg.failures == []
    assert_builtins_intact(reg)


def test_import_failure_is_reported_and_others_load(fake_plugin) -> None:
    fake_plugin("hwp_fake_good", GOOD)
    fake_plugin("hwp_fake_boom", IMPORT_FAILS)
    reg = Registry.load()
    f = failure(reg, "fakeboom")
    assert f.origin == "hwp_fake_boom 0.1"
    assert "boom" in f.reason and "RuntimeError" in f.reason and "import" in f.reason
    assert "fakeboom" not in reg.backends
    assert reg.get("fakegood").origin == "hwp_fake_good 0.1"
    assert_builtins_intact(reg)


def test_system_exit_at_import_is_a_failure(fake_plugin) -> None:
    fake_plugin("hwp_fake_exit", "raise SystemExit(3)\n")
    reg = Registry.load()
    assert "SystemExit" in failure(reg, "fakeexit").reason
    assert_builtins_intact(reg)


def test_hook_that_raises_is_reported(fake_plugin) -> None:
    fake_plugin("hwp_fake_raises", HOOK_RAISES)
    reg = Registry.load()
    reason = failure(reg, "fakeraises").reason
    assert "hwport_backends" in reason and "ValueError" in reason and "kaput" in reason
    assert_builtins_intact(reg)


@pytest.mark.parametrize(("expr", "shown"), [
    ("{'name': 'x'}", "dict"),
    ("None", "NoneType"),
    ("'fakestr'", "str"),
    ("['fakestr']", "str"),
    ("[SPEC, 'fakestr']", "str"),
])
def test_hook_returning_bad_data_is_reported(fake_plugin, expr: str, shown: str) -> None:
    source = returning(expr).replace(
        "from hwport import hookimpl",
        "import dataclasses\n\nfrom hwport import hookimpl\nfrom hwport.backends.reference "
        "import SPEC as _REF\n\nSPEC = dataclasses.replace(_REF, name='fakehalf')")
    fake_plugin("hwp_fake_bad_data", source)
    reg = Registry.load()
    reason = failure(reg, "fakebaddata").reason
    assert "hwport_backends" in reason
    assert "BackendSpec" in reason
    assert shown in reason
    assert "fakehalf" not in reg.backends  # nothing of a failed plugin is kept
    assert_builtins_intact(reg)


def test_misspelled_hook_is_reported_as_unknown(fake_plugin) -> None:
    fake_plugin("hwp_fake_typo", MISSPELLED_HOOK)
    reg = Registry.load()
    reason = failure(reg, "faketypo").reason
    assert "unknown hook" in reason
    assert "hwport_backend" in reason
    assert_builtins_intact(reg)
    assert reg.pm.get_plugin("faketypo") is None


def test_hook_with_unknown_argument_is_reported(fake_plugin) -> None:
    fake_plugin("hwp_fake_args", returning("[]").replace("hwport_backends()",
                                                         "hwport_backends(chip)"))
    reg = Registry.load()
    reason = failure(reg, "fakeargs").reason
    assert "chip" in reason
    assert_builtins_intact(reg)


@pytest.mark.parametrize("module", ["hwp_zz_dup", "hwp_fake_dup"])
def test_duplicate_backend_name_is_reported_and_builtin_kept(fake_plugin, module: str) -> None:
    # A third-party plugin must not take over a built-in backend's name, whatever its
    # entry-point name is ("zzdup" sorts after "simgpu", "fakedup" before it).
    plugin = module.removeprefix("hwp_").replace("_", "")
    fake_plugin(module, duplicate_of("simgpu"))
    reg = Registry.load()
    simgpu = reg.get("simgpu")
    assert simgpu.plugin == "simgpu"
    assert simgpu.origin.startswith("hwport ")
    assert simgpu.spec.description != "an impostor"
    reason = failure(reg, plugin).reason
    assert "'simgpu'" in reason and "already provided" in reason
    assert_builtins_intact(reg)


def test_duplicate_between_third_party_plugins(fake_plugin) -> None:
    fake_plugin("hwp_fake_good", GOOD)
    fake_plugin("hwp_fake_other", duplicate_of("fakegood"))
    reg = Registry.load()
    assert reg.get("fakegood").plugin == "fakegood"
    assert "already provided by plugin 'fakegood'" in failure(reg, "fakeother").reason


def test_plugin_format_is_registered(fake_plugin, forget_formats: list[str]) -> None:
    fake_plugin("hwp_fake_fmt", FORMAT_PLUGIN)
    with pytest.raises(UnknownNameError):
        hwport.formats.get("fakefmt8")
    forget_formats.append("fakefmt8")
    reg = Registry.load()
    assert reg.failures == []
    fmt = hwport.formats.get("fakefmt8")
    assert (fmt.exponent_bits, fmt.mantissa_bits, fmt.bias) == (4, 3, 9)
    assert fmt in list(hwport.formats.known())
    Registry.load()  # loading again registers the same format again: no conflict
    assert_builtins_intact(reg)


def test_plugin_backend_can_use_the_plugins_format(fake_plugin,
                                                   forget_formats: list[str]) -> None:
    # hwport_formats makes formats "known by name to every spec": the backend the same
    # plugin returns from hwport_backends may use them.
    fake_plugin("hwp_fake_fmtchip", FORMAT_AND_BACKEND)
    forget_formats.append("fakefmt8")
    reg = Registry.load()
    assert reg.failures == []
    assert reg.get("fakefmtchip").spec.format("fakefmt8").bias == 9


def test_conflicting_format_is_reported(fake_plugin) -> None:
    fake_plugin("hwp_fake_fp16", returning("[FloatFormat('fp16', 5, 10, 14)]", "hwport_formats")
                .replace("import hookimpl", "import FloatFormat, hookimpl"))
    reg = Registry.load()
    assert "fp16" in failure(reg, "fakefp16").reason
    assert hwport.formats.get("fp16").bias == 15
    assert_builtins_intact(reg)


def test_failed_plugin_contributes_no_formats(fake_plugin) -> None:
    fake_plugin("hwp_fake_dropped", FORMAT_THEN_BAD_BACKEND)
    reg = Registry.load()
    failure(reg, "fakedropped")
    with pytest.raises(UnknownNameError):
        hwport.formats.get("fakedroppedfmt")


# -- lookups ---------------------------------------------------------------------------------
def test_get_unknown_lists_known_names() -> None:
    reg = Registry.load()
    with pytest.raises(UnknownNameError) as info:
        reg.get("unknown")
    message = str(info.value)
    assert "unknown backend 'unknown'" in message
    for name in BUILTIN:
        assert name in message
    assert set(BUILTIN) <= set(info.value.known)
    assert isinstance(info.value, HwportError) and isinstance(info.value, LookupError)


def test_get_of_failed_plugin_mentions_the_reason(fake_plugin) -> None:
    fake_plugin("hwp_fake_boom", IMPORT_FAILS)
    reg = Registry.load()
    with pytest.raises(UnknownNameError) as info:
        reg.get("fakeboom")
    message = str(info.value)
    assert "fakeboom" in message and "boom" in message and "hwp_fake_boom 0.1" in message


def test_add_plugin_object_at_run_time() -> None:
    import dataclasses

    from hwport.backends.reference import SPEC

    class Plugin:
        @hwport.hookimpl
        def hwport_backends(self) -> list[hwport.BackendSpec]:
            return [dataclasses.replace(SPEC, name="objchip")]

    reg = Registry.load()
    reg.add_plugin(Plugin(), "objplugin", "test")
    assert reg.get("objchip").plugin == "objplugin"
    assert reg.get("objchip").origin == "test"
    reg.add_plugin(Plugin(), "objplugin2", "test")  # same backend name again
    assert "already provided" in failure(reg, "objplugin2").reason


# -- the plugin mechanism is the only link between the core and the backends -----------------
BARE_IMPORT = re.compile(r"^\s*(?:import|from)\s+(?:framework|backends)\b", re.MULTILINE)


def _sources(*globs: str) -> list[Path]:
    files = [p for g in globs for p in sorted(REPO.glob(g))]
    assert files, globs
    return files


def test_nothing_imports_bare_framework_or_backends() -> None:
    bad = [f"{p.relative_to(REPO)}: {m.group(0).strip()}"
           for p in _sources("framework/**/*.py", "backends/*.py", "tests/*.py")
           for m in BARE_IMPORT.finditer(p.read_text(encoding="utf-8"))]
    assert bad == []


def test_framework_does_not_import_concrete_backends() -> None:
    bad = [str(p.relative_to(REPO)) for p in _sources("framework/**/*.py")
           if "hwport.backends" in p.read_text(encoding="utf-8")]
    assert bad == []
