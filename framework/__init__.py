"""hwport: what happens to your training and inference when you port them to another chip."""

from hwport.errors import FormatError, HwportError, PluginError, SpecError, UnknownNameError
from hwport.formats import FloatFormat
from hwport.rounding import Rounding, quantize

__version__ = "0.1.0"

__all__ = [
    "FloatFormat", "FormatError", "HwportError", "PluginError", "Rounding", "SpecError",
    "UnknownNameError", "__version__", "quantize",
]
