"""hwport-sramchip: an hwport backend for a Groq-like, SRAM-only inference chip."""

from importlib.resources import as_file, files

import hwport


@hwport.hookimpl
def hwport_backends() -> list[hwport.BackendSpec]:
    """The backends this plugin provides: one, read from the TOML spec shipped with it."""
    with as_file(files(__name__) / "sramchip.toml") as path:
        return [hwport.load_spec(path)]
