"""The exception for user-facing input and usage errors of the Python API and the CLI."""

from __future__ import annotations

__all__ = ["InteropError"]


class InteropError(ValueError):
    """A model, file or argument that the tools cannot handle; the message says why (naming
    the file, and its line and field where they are known)."""
