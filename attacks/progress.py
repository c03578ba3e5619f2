"""Progress reporting and cancellation: one callback, called between steps.

An attack calls ``progress(stage, fraction)`` between steps. The caller's
callback may raise :class:`Cancelled` to stop the attack; nothing else in
``attacks`` knows about workers or queues.

Loops that have no progress callback to call (a head fit inside a sweep, a defence,
an evaluation, a data loader) call :func:`checkpoint` instead: it runs the check that
the caller installed with :func:`checks` (throttled, so it costs a clock read in a
tight loop), and that check may raise :class:`Cancelled` the same way. With no check
installed it does nothing.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, Protocol


class Cancelled(Exception):
    """Raised by a progress callback to stop a running attack."""


class ProgressFn(Protocol):
    def __call__(self, stage: str, fraction: float) -> None: ...


def no_progress(stage: str, fraction: float) -> None:
    return None


def scaled(progress: ProgressFn | None, stage: str) -> Callable[[float], None]:
    """Bind a stage name: returns f(fraction)."""
    cb = progress or no_progress

    def report(fraction: float) -> None:
        cb(stage, min(max(float(fraction), 0.0), 1.0))

    return report


class _Throttled:
    __slots__ = ("fn", "interval", "next")

    def __init__(self, fn: Callable[[], None], interval: float):
        self.fn, self.interval, self.next = fn, interval, 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if now >= self.next:
            self.next = now + self.interval
            self.fn()


_check: ContextVar[_Throttled | None] = ContextVar("poisonaudit_check", default=None)


def checkpoint() -> None:
    """Called from every loop that may run long: runs the installed check (at most every
    ``interval`` seconds), which may raise :class:`Cancelled`."""
    c = _check.get()
    if c is not None:
        c()


@contextmanager
def checks(fn: Callable[[], None], interval: float = 0.05) -> Iterator[None]:
    """Install ``fn`` as the check :func:`checkpoint` runs inside the block (this thread or task)."""
    token = _check.set(_Throttled(fn, interval))
    try:
        yield
    finally:
        _check.reset(token)

