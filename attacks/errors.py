"""Errors the engine raises on purpose. Every one carries a message meant for a user."""


class AttackDiverged(RuntimeError):
    """The optimisation produced non-finite values even after backing off its step."""

