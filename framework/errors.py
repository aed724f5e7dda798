"""The exceptions hwport raises: each names what is wrong and where."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any


class HwportError(Exception):
    """Base of every error hwport raises on purpose; its message is meant for a user."""


class FormatError(HwportError, ValueError):
    """A number format is malformed, or a value cannot be stored in the asked format."""


class SpecError(HwportError, ValueError):
    """A backend spec (or spec file) has invalid fields; the message names each one.

    ``problems`` holds ``(field path, value, what is wrong)`` for each bad field.
    """

    def __init__(self, message: str, problems: Sequence[tuple[str, Any, str]] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)

    @classmethod
    def from_problems(
        cls, problems: Sequence[tuple[str, Any, str]], where: str = "",
        line_of: Callable[[str], int | None] | None = None,
    ) -> SpecError:
        """One error listing every problem, as ``where[:line]: field = value: why``."""
        rows = []
        for path, value, why in problems:
            line = line_of(path) if line_of else None
            loc = f"{where}:{line}" if where and line else where
            shown = f"{path} = {value!r}" if value is not None else path
            rows.append(f"{loc + ': ' if loc else ''}{shown}: {why}")
        head = "invalid spec" if len(rows) == 1 else f"invalid spec ({len(rows)} problems)"
        return cls(head + ":\n  " + "\n  ".join(rows), problems)


class UnknownNameError(HwportError, LookupError):
    """A name (backend, format, ...) that nothing registered; lists the known ones."""

    def __init__(self, kind: str, name: str, known: Iterable[str], hint: str = "") -> None:
        self.kind, self.name, self.known = kind, name, sorted(known)
        msg = f"unknown {kind} {name!r}; known: {', '.join(self.known) or '(none)'}"
        super().__init__(msg + (f". {hint}" if hint else ""))

    def __str__(self) -> str:  # LookupError would repr() the message
        return str(self.args[0])
