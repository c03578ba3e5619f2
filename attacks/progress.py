"""Progress reporting and cancellation: one callback, called between steps.

An attack calls ``progress(stage, fraction)`` between steps. The caller's
callback may raise :class:`Cancelled` to stop the attack; nothing else in
``attacks`` knows about workers or queues.
"""

from __future__ import annotations

from typing import Callable, Protocol


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
