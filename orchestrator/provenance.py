"""Where a record came from: an input and a line in it, named in errors, refs and dead letters.

A module of its own so that the error tree (which names a broken record by its source) and the
record rules (which raise those errors) do not import each other.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Source"]


@dataclass(frozen=True, slots=True)
class Source:
    """Where a record came from: an input and a 1-based line (or position) in it.

    Args:
        origin: the file path as given, ``"<stdin>"``, or ``"<records>"`` for Python iterables.
        line: the 1-based line number, or the 1-based position in an iterable.
    """

    origin: str
    line: int

    def __str__(self) -> str:
        return f"{self.origin}:{self.line}"
