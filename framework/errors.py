"""The exceptions hwport raises: each names what is wrong and where."""

from __future__ import annotations

from collections.abc import Iterable


class HwportError(Exception):
    """Base of every error hwport raises on purpose; its message is meant for a user."""


class FormatError(HwportError, ValueError):
    """A number format is malformed, or a value cannot be stored in the asked format."""


class SpecError(HwportError, ValueError):
    """A backend spec (or spec file) has invalid fields; the message names each one."""


class PluginError(HwportError):
    """A plugin could not be loaded or returned invalid data."""


class UnknownNameError(HwportError, LookupError):
    """A name (backend, format, ...) that nothing registered; lists the known ones."""

    def __init__(self, kind: str, name: str, known: Iterable[str], hint: str = "") -> None:
        self.kind, self.name, self.known = kind, name, sorted(known)
        msg = f"unknown {kind} {name!r}; known: {', '.join(self.known) or '(none)'}"
        super().__init__(msg + (f". {hint}" if hint else ""))

    def __str__(self) -> str:  # LookupError would repr() the message
        return str(self.args[0])
