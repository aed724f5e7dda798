"""hwport: what happens to your training and inference when you port them to another chip."""

from hwport.errors import FormatError, HwportError, SpecError, UnknownNameError
from hwport.formats import FloatFormat
from hwport.hookspecs import hookimpl
from hwport.pipeline import Pipeline
from hwport.plugins import (
    get_backend,
    list_backends,
    plugin_failures,
    register_backend,
)
from hwport.rounding import Rounding, quantize
from hwport.spec import (
    BackendSpec,
    Compute,
    Interconnect,
    MemoryHierarchy,
    MemoryTier,
    PrecisionSemantics,
    load_spec,
)

__version__ = "0.1.1"

__all__ = [
    "BackendSpec",
    "Compute",
    "FloatFormat",
    "FormatError",
    "HwportError",
    "Interconnect",
    "MemoryHierarchy",
    "MemoryTier",
    "Pipeline",

    "PrecisionSemantics",
    "Rounding",
    "SpecError",
    "UnknownNameError",
    "__version__",
    "compare",
    "get_backend",
    "hookimpl",
    "list_backends",
    "load_spec",
    "plugin_failures",
    "quantize",
    "register_backend",
    "run",
]


def __getattr__(name: str) -> object:
    # run and compare need torch: import it when they are first used, not with hwport
    if name in ("run", "compare"):
        from hwport import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'hwport' has no attribute {name!r}")
