"""What runs inside a parse worker process (see ``parsing``): kept to the record rules and the OS.

A worker imports only this module and ``records`` (not the HTTP client, the engine or the journal),
so each worker costs a few MB of its own.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time

from orchestrator.chunks import EncodedLines, encode_chunk

__all__ = ["init", "parse_bytes", "parse_spooled"]

# Workers run below the parent's priority: parsing is background work for the parent, whose
# event loop must wake within milliseconds. At the same priority, two workers busy on a 2-core
# machine delayed the loop by 80-105 ms at times; niced, 54-59 ms (benchmarks.loop_stall).
_NICENESS = 10


def init(parent: int) -> None:
    """Set a worker up: Ctrl-C is the parent's to handle, the worker yields the CPU to the parent
    (niced), and it ends with the parent."""
    # Ctrl-C reaches the whole process group: the parent decides how to stop, not its workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(_NICENESS)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    # A parent killed outright cannot shut the pool down: its workers leave on their own. The
    # pipe multiprocessing keeps from the parent reads EOF once the parent is gone, reaped or
    # not: a dead parent that nobody reaped yet (its caller still reading the output the
    # workers share) still answers kill(pid, 0), and the fork server stays while its children
    # do, so neither of those would show it.
    from_parent = multiprocessing.parent_process()
    if from_parent is not None:
        multiprocessing.connection.wait([from_parent.sentinel])
        os._exit(0)
    while True:  # started some other way: the parent's pid is all there is
        time.sleep(1.0)
        try:
            os.kill(parent, 0)
        except (ProcessLookupError, PermissionError):  # gone, or the pid now someone else's
            os._exit(0)


def parse_spooled(
    path: str, offset: int, length: int, slot_bytes: int, contact_scope: bool, first_line: int
) -> tuple[EncodedLines, int]:
    """Read a chunk from its spool slot, encode it, and leave its body segment in the slot (where
    the parent takes it): the chunk itself when every line is a clean record, else the segment
    made here and written over it (keeping that work off the parent).

    Returns the encoded chunk and the segment's length (-1 when it does not fit the slot; the
    parent then makes it from the chunk).
    """
    fd = os.open(path, os.O_RDWR)
    try:
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise OSError(f"spool file {path!r} is shorter than expected")
        encoded = encode_chunk(data, contact_scope=contact_scope, first_line=first_line)
        if encoded.whole:  # the slot already holds the segment: the chunk itself
            encoded.pieces = []
            return encoded, length
        segment = encoded.segment(data)
        if len(segment) > slot_bytes:
            return encoded, -1
        view = memoryview(segment)
        written = 0
        while written < len(segment):
            written += os.pwrite(fd, view[written:], offset + written)
        encoded.pieces = []  # not needed any more: the parent takes the segment
        return encoded, len(segment)
    finally:
        os.close(fd)


def parse_bytes(data: bytes, contact_scope: bool, first_line: int) -> tuple[EncodedLines, int]:
    """Encode a chunk sent through the pipe (one too big for a spool slot)."""
    return encode_chunk(data, contact_scope=contact_scope, first_line=first_line), -1


def _loaded_modules() -> list[str]:
    """The modules a worker has imported (a test checks that it keeps to the record rules)."""
    return sorted(sys.modules)
