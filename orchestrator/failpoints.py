"""Failpoints: named moments of a run where a crash test can kill the process (SIGKILL).

Set ``INSIGHT_IMPORT_FAILPOINT=NAME:N`` to kill the process the N-th time the engine passes NAME.
Unset (always, in production), ``hit()`` is one comparison. The crash tests use it to stop a real
``insight-import run`` at exact moments (after the intent is written but before the PUT, after the
202 but before the id is journaled, ...) instead of hoping a timer lands there.
"""

from __future__ import annotations

import os
import signal

__all__ = ["NAMES", "hit"]

NAMES = frozenset(
    {
        "read",  # a chunk of input was read and validated
        "sealed",  # a batch was sealed into the journal (with its intent, if a slot was free)
        "loaded",  # a batch waiting for a slot has its body loaded, nothing sent
        "intent",  # the intent to submit is journaled; the PUT has not been sent
        "accepted",  # the API answered 202; the import id is not journaled yet
        "submitted",  # the import id is journaled
        "polled",  # a status poll was answered
        "split",  # a batch the API found too large was replaced by its halves
        "terminal",  # a poll saw the end; the outcome is not journaled yet
        "finished",  # the outcome is journaled
    }
)


def _armed() -> tuple[str, int] | None:
    spec = os.environ.get("INSIGHT_IMPORT_FAILPOINT")
    if not spec:
        return None
    name, _, count = spec.partition(":")
    if name not in NAMES:
        raise ValueError(f"unknown failpoint {name!r}; known: {', '.join(sorted(NAMES))}")
    return name, int(count or "1")


_ARMED = _armed()
_hits = 0


def hit(name: str) -> None:
    """Kill the process here if this failpoint is armed and its count is reached."""
    global _hits
    if _ARMED is None or _ARMED[0] != name:
        return
    _hits += 1
    if _hits >= _ARMED[1]:
        os.kill(os.getpid(), signal.SIGKILL)
