"""Species lists: the order of a model's type indices, checked, and read from a small file.

A ``.mtp`` file and a ``.cfg`` data set store type indices 0..C-1 but no element symbols; the
species of those indices come from the command line (``--type-names``) or a species file.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from ase.data import chemical_symbols

from ..errors import InteropError

__all__ = ["check_type_names", "read_type_names"]

_NAME_OK = re.compile(r"^\S+$")


def check_type_names(names: Sequence[Any], source: str, symbols: bool = False) -> list[str]:
    """The species list as strings; ``symbols``: each must be a chemical symbol (ASE's).

    Refuses an empty list, a repeated name and a name that is not a non-empty string without
    spaces; the error names ``source`` (the option or file the list came from).
    """
    out: list[str] = []
    for i, name in enumerate(names):
        if not isinstance(name, str) or not _NAME_OK.match(name):
            raise InteropError(
                f"{source}: type name {i} ({name!r}) must be a non-empty string without spaces"
            )
        if symbols and name not in chemical_symbols:
            title = name.capitalize()
            close = [title] if title in chemical_symbols else []
            close = close or difflib.get_close_matches(name, chemical_symbols[1:], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InteropError(f"{source}: type name {i} ({name!r}) is not a chemical symbol{hint}")
        if name in out:
            raise InteropError(f"{source}: type name {name!r} is listed twice")
        out.append(name)
    if not out:
        raise InteropError(f"{source}: the species list is empty")
    return out


def read_type_names(path: str | os.PathLike) -> list[str]:
    """Species order from a small YAML or JSON file.

    Accepted forms: a list (``[Li, Be, Na]``), a whitespace-separated string (``Li Be Na``), a
    mapping with a ``type_names`` (or ``species``/``chemical_symbols``) list, or an index map
    ``{0: Li, 1: Be, 2: Na}`` (the form of ``nequip-package info``'s ``atom_types``).
    """
    path = os.fspath(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise InteropError(f"{path}: cannot read the species file ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise InteropError(f"{path}{where}: not valid YAML/JSON: {e}") from None
    if isinstance(data, Mapping):
        for key in ("type_names", "species", "chemical_symbols", "atom_types"):
            if key in data:
                data = data[key]
                break
    if isinstance(data, str):
        data = data.split()
    if isinstance(data, Mapping):
        keys = sorted(data)
        if keys != list(range(len(keys))):
            raise InteropError(
                f"{path}: an index map must have the keys 0..N-1, got {keys[:5]}"
                f"{'...' if len(keys) > 5 else ''}"
            )
        data = [data[k] for k in keys]
    if not isinstance(data, list):
        raise InteropError(
            f"{path}: expected a list of species (e.g. [Li, Be, Na]) or a mapping with "
            f"'type_names', got {type(data).__name__}"
        )
    return check_type_names(data, path)
