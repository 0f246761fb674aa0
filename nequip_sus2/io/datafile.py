"""Structure data files (MLIP-2 ``.cfg`` or extended XYZ) read frame by frame: the format by
file name, checks of a frame whose errors name the file, line and field, and a progress bar."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np

from .._console import progress_bar
from ..errors import InteropError
from .cfg import (
    MIN_CELL_MEASURE,
    CfgFormatError,
    cell_measure,
    first_non_finite,
    singular_cell_message,
)

__all__ = [
    "cfg_error",
    "check_extxyz_frame",
    "check_type_range",
    "data_format",
    "with_progress",
]

_DATA_SUFFIXES = (".cfg", ".xyz", ".extxyz")
_T = TypeVar("_T")


def data_format(path: str | os.PathLike, what: str = "DATA") -> str:
    """``"cfg"`` or ``"extxyz"``, by the file name."""
    name = os.fspath(path).lower()
    if name.endswith(".cfg"):
        return "cfg"
    if name.endswith(_DATA_SUFFIXES):
        return "extxyz"
    raise InteropError(
        f"{os.fspath(path)}: {what} must be a .cfg or an extended XYZ (.xyz/.extxyz) file"
    )


def with_progress(items: Iterable[_T], path: str, desc: str, progress: bool | None) -> Iterator[_T]:
    """``items`` with a tqdm bar on stderr (``progress`` None: only when stderr is a terminal;
    the total is the number of ``BEGIN_CFG`` lines of a ``.cfg`` file)."""
    bar = progress_bar(progress, desc=desc, unit="cfg", dynamic_ncols=True)
    try:
        if not bar.disable and path.lower().endswith(".cfg"):
            bar.total = len(_begin_lines(path))
            bar.refresh()
        for item in items:
            yield item
            bar.update()
    finally:
        bar.close()


# ----------------------------------------------------------------------------------------------
# locating a configuration of a .cfg file (for error messages)
# ----------------------------------------------------------------------------------------------


def _begin_lines(path: str) -> list[int]:
    """1-based line numbers of the ``BEGIN_CFG`` lines."""
    with open(path, encoding="utf-8") as f:
        return [n for n, line in enumerate(f, 1) if line.strip() == "BEGIN_CFG"]


def _atom_line(path: str, begin: int, atom: int) -> int:
    """Line of the ``atom``-th AtomData row of the configuration beginning at line ``begin``."""
    with open(path, encoding="utf-8") as f:
        rows = -1
        for n, line in enumerate(f, 1):
            if n <= begin:
                continue
            stripped = line.strip()
            if rows < 0:
                if stripped.startswith("AtomData"):
                    rows = 0
                continue
            if stripped and not stripped[0].isalpha():
                if rows == atom:
                    return n
                rows += 1
    return begin


def cfg_error(path: str, index: int, field: str, message: str, atom: int | None = None):
    """A :class:`~nequip_sus2.io.cfg.CfgFormatError` located at configuration ``index`` of
    ``path`` (its ``atom``-th AtomData row when given, else its BEGIN_CFG line)."""
    begin = _begin_lines(path)[index]
    line = begin if atom is None else _atom_line(path, begin, atom)
    return CfgFormatError(
        path, line, field, f"{message} (configuration {index}, BEGIN_CFG at line {begin})"
    )


def check_type_range(frame, index: int, path: str, type_names: Sequence[str]) -> None:
    """Refuse a ``type`` value with no entry in ``type_names`` (the error names file and line)."""
    num_types = len(type_names)
    if frame.n_atoms and frame.types.max() >= num_types:
        atom = int(np.argmax(frame.types >= num_types))
        raise cfg_error(
            path,
            index,
            "type",
            f"type value {int(frame.types[atom])} is out of range for the {num_types} "
            f"type_names ({' '.join(type_names)})",
            atom=atom,
        )


def check_extxyz_frame(atoms, path: str, line: int | None, index: int) -> None:
    """Refuse a nan/inf number or a singular periodic cell in frame ``index`` of an extxyz file,
    the frame whose atom-count line is ``line``: the error names the line (the comment line, or
    the atom's line) and the extxyz field (``pos``, ``forces``, ``Lattice``, ``energy``, ...).
    ``line=None`` (a file in another format): the error names the frame only."""

    def fail(at: int, field: str, what: str) -> InteropError:
        where = path if line is None else f"{path}:{at}"
        return InteropError(f"{where}: frame {index}: field '{field}': {what}")

    line_ = 0 if line is None else line

    calc = atoms.calc
    results = dict(getattr(calc, "results", None) or {}) if calc is not None else {}
    per_atom = {"pos": atoms.positions, "forces": results.get("forces")}
    for field, values in per_atom.items():
        k = None if values is None else first_non_finite(values)
        if k is not None:
            value = float(np.asarray(values, dtype=np.float64).reshape(-1)[k])
            raise fail(line_ + 2 + k // 3, field, f"atom {k // 3} holds {value!r}")
    comment = {
        "Lattice": atoms.cell.array,
        "energy": results.get("energy"),
        "stress": results.get("stress"),
        "virial": atoms.info.get("virial"),
    }
    for field, values in comment.items():
        if values is None or isinstance(values, str):
            continue
        try:
            k = first_non_finite(values)
        except (TypeError, ValueError):
            continue
        if k is not None:
            value = float(np.asarray(values, dtype=np.float64).reshape(-1)[k])
            raise fail(line_ + 1, field, f"holds {value!r}")
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if pbc.any() and (measure := cell_measure(atoms.cell.array, pbc)) < MIN_CELL_MEASURE:
        raise fail(line_ + 1, "Lattice", singular_cell_message(measure, int(pbc.sum())))
