"""Argument types for the command lines: numbers with a lower bound, one message style."""

from __future__ import annotations

import argparse
from collections.abc import Callable

_KIND_NAMES = {int: "an integer", float: "a number"}


def at_least(kind: type, minimum: float, strict: bool = False) -> Callable[[str], float]:
    """An argparse ``type`` that parses ``kind`` and refuses values below ``minimum`` (or equal
    to it with ``strict``), e.g. ``at_least(int, 1)``; :func:`positive` is ``strict`` at 0."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {_KIND_NAMES.get(kind, kind.__name__)}, got {text!r}"
            ) from None
        if strict and not value > minimum:
            bound = "positive" if minimum == 0 else f"above {minimum}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        if not strict and not value >= minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def positive(kind: type) -> Callable[[str], float]:
    """An argparse ``type`` for a number of ``kind`` above 0."""
    return at_least(kind, 0, strict=True)
