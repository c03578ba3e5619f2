"""Resolve a catalogue entry to its implementation (imports torch lazily)."""

from __future__ import annotations

import importlib
from typing import Callable

from attacks.catalogue import get_attack


def resolve(name: str) -> Callable:
    module, func = get_attack(name).entry.split(":")
    return getattr(importlib.import_module(module), func)
