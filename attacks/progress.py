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



# Stage weights of a job, in the order the stages run (an attack runs only its own stages; the
# ones it skips are jumped over). They turn (stage, fraction within the stage) into one overall
# fraction that never goes backwards.
JOB_STAGES: tuple[tuple[str, float], ...] = (
    ("loading", 2), ("features", 8), ("clean_head", 4),
    ("gradpc", 10), ("gc_feature", 20), ("gc_input", 30), ("feature_matching", 25),
    ("decoder_training", 20), ("decoder_inversion", 8), ("tgda_input", 40), ("emn", 40), ("emn_finetune", 10),
    ("evaluation", 4), ("defences", 8),
)
PRETRAIN_STAGES: tuple[tuple[str, float], ...] = (("loading", 5), ("pretrain", 95))


class OverallProgress:
    """``overall(stage, fraction) -> float`` in [0, 1): the weighted position of the stage in its
    sequence, never below the value it returned before (a stage met again, or out of order, keeps
    the fraction where it was). Unknown stages keep it too. 1.0 is for the caller to set when the
    job has succeeded."""

    def __init__(self, stages: tuple[tuple[str, float], ...] = JOB_STAGES):
        total = float(sum(w for _, w in stages))
        self._at: dict[str, tuple[float, float]] = {}
        done = 0.0
        for name, w in stages:
            self._at[name] = (done / total, w / total)
            done += w
        self.value = 0.0

    def __call__(self, stage: str | None, fraction: float | None) -> float:
        at = self._at.get(stage or "")
        if at is not None:
            f = min(max(float(fraction or 0.0), 0.0), 1.0)
            self.value = max(self.value, min(at[0] + at[1] * f, 0.999))
        return self.value
