"""Errors out of a task group: the run's own error, not the ExceptionGroup around it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import anyio

__all__ = ["first_error_unwrapped"]


@contextlib.contextmanager
def first_error_unwrapped() -> Iterator[None]:
    """Raise the run's own error rather than the task group's ExceptionGroup around it.

    One task failing cancels the others, so the group holds one real error (and maybe
    cancellations); callers then catch ``AuthenticationError`` instead of an ExceptionGroup.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        errors = _leaves(group)
        real = [e for e in errors if not isinstance(e, anyio.get_cancelled_exc_class())]
        if len(real) == 1 or (real and all(type(e) is type(real[0]) for e in real)):
            raise real[0] from group
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            leaves.extend(_leaves(error))
        else:
            leaves.append(error)
    return leaves
