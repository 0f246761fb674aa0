"""Atomic file output: write to a temporary file beside the target, rename it on success.

A reader never sees a partial file, and a failure (an exception, Ctrl-C) leaves the previous
content of the target, or no file at all, behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

__all__ = ["replacing", "replacing_text"]


def _umask_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file (``0o666 & ~umask``)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def _temporary(path: str | os.PathLike, mode: int | None) -> Iterator[tuple[int, Path]]:
    """An open descriptor and the path of a new temporary file beside ``path``; renamed over
    ``path`` with file mode ``mode`` when the block succeeds, removed when it fails."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        yield fd, tmp
        os.chmod(tmp, _umask_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def replacing(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it is renamed over
    ``path`` with file mode ``mode`` (default: the usual ``0o666 & ~umask``), when it fails it
    is removed: no partial output file is ever left."""
    with _temporary(path, mode) as (fd, tmp):
        os.close(fd)
        yield tmp


@contextlib.contextmanager
def replacing_text(path: str | os.PathLike, mode: int | None = None) -> Iterator[TextIO]:
    """:func:`replacing` with the temporary file open for writing UTF-8 text (``\\n`` line
    ends); the file is closed before it is renamed."""
    with (
        _temporary(path, mode) as (fd, _tmp),
        os.fdopen(fd, "w", encoding="utf-8", newline="\n") as stream,
    ):
        yield stream
