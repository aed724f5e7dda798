"""hwport: what happens to your training and inference when you port them to another chip."""

from hwport.errors import FormatError, HwportError, PluginError, SpecError, UnknownNameError
from hwport.formats import FloatFormat
from hwport.hookspecs import hookimpl
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

__version__ = "0.1.0"

__all__ = [
    "BackendSpec", "Compute", "FloatFormat", "FormatError", "HwportError", "Interconnect",
    "MemoryHierarchy", "MemoryTier", "PluginError", "PrecisionSemantics", "Rounding",
    "SpecError", "UnknownNameError", "__version__", "get_backend", "hookimpl",
    "list_backends", "load_spec", "plugin_failures", "quantize", "register_backend",
]
