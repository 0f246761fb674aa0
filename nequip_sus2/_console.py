"""What the commands print besides their results: one-line messages and progress bars."""

from __future__ import annotations

from typing import Any


class UsageError(Exception):
    """A problem with the command line itself (reported like argparse errors: one line, exit
    status 2)."""


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (its type name when it has none)."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


def progress_bar(progress: bool | None, **kwargs: Any):
    """A tqdm bar on stderr: ``progress`` True/False shows/hides it, ``None`` shows it only when
    stderr is a terminal (tqdm's ``disable=None``)."""
    from tqdm.auto import tqdm

    return tqdm(disable=None if progress is None else not progress, **kwargs)
