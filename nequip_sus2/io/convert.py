"""Lossless conversion of data sets between MLIP-2 ``.cfg`` and extended XYZ.

``.cfg`` type indices map to chemical symbols through ``type_names``; every number is written
with the shortest round-trip representation, so ``.cfg`` -> extxyz -> ``.cfg`` restores the file
exactly. Both directions write atomically (no partial output file on failure).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from typing import Any

import ase.io
import numpy as np
from ase.io.extxyz import XYZError
from ase.stress import voigt_6_to_full_3x3_stress

from .._files import replacing_text
from ..errors import InteropError
from .cfg import CfgFrame, iter_cfg, write_cfg
from .datafile import cfg_error, check_extxyz_frame, check_type_range, with_progress
from .species import check_type_names

__all__ = ["cfg_to_extxyz", "extxyz_to_cfg"]

# info keys with a meaning of their own in extxyz (ASE moves some into the calculator)
_RESERVED_INFO = frozenset(
    {"energy", "free_energy", "stress", "virial", "pbc", "Lattice", "Properties", "dipole"}
    | {"magmom", "polarization", "dielectric_tensor"}
)
_INFO_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


def _floats(values) -> str:
    return " ".join(repr(float(v)) for v in np.asarray(values, dtype=np.float64).ravel())


def _json_value(value: Any) -> str:
    """``"_JSON <json>"`` quoted for an extxyz comment: ASE reads it back as exactly ``value``
    (a string stays a string even when it looks like a number)."""
    text = "_JSON " + json.dumps(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _extxyz_frame(atoms) -> str:
    """One ``Atoms`` (from :meth:`CfgFrame.to_atoms`) as extxyz text with shortest round-trip
    floats (``repr``), so that every number reads back bit for bit."""
    results = dict(atoms.calc.results) if atoms.calc is not None else {}

    def per_atom(values, dtype=None) -> np.ndarray:
        values = np.asarray(values, dtype=dtype)
        return values.reshape(len(atoms), int(np.prod(values.shape[1:])))

    columns: list[tuple[str, str, np.ndarray]] = [("pos", "R", per_atom(atoms.positions, float))]
    if "forces" in results:
        columns.append(("forces", "R", per_atom(results["forces"], float)))
    for key, values in atoms.arrays.items():
        if key.startswith("cfg_"):
            values = per_atom(values)
            kind = "I" if np.issubdtype(values.dtype, np.integer) else "R"
            columns.append((key, kind, values))
    props = "species:S:1:" + ":".join(f"{k}:{t}:{v.shape[1]}" for k, t, v in columns)
    head = []
    if atoms.cell.any():
        head.append(f'Lattice="{_floats(atoms.cell.array)}"')
    head.append(f"Properties={props}")
    if "energy" in results:
        head.append(f"energy={float(results['energy'])!r}")
    if "stress" in results:
        head.append(f'stress="{_floats(voigt_6_to_full_3x3_stress(results["stress"]))}"')
    for key, value in atoms.info.items():
        if key == "virial":
            head.append(f'virial="{_floats(value)}"')
            continue
        if key in _RESERVED_INFO or not _INFO_KEY.match(key):
            raise InteropError(f"Feature key {key!r} cannot be stored in extxyz info")
        head.append(f"{key}={_json_value(value)}")
    head.append('pbc="' + " ".join("T" if p else "F" for p in atoms.pbc) + '"')

    def cell(v, kind):
        return str(int(v)) if kind == "I" else repr(float(v))

    lines = [str(len(atoms)), " ".join(head)]
    for i, symbol in enumerate(atoms.get_chemical_symbols()):
        row = [symbol] + [cell(v, kind) for _k, kind, vals in columns for v in vals[i]]
        lines.append(" ".join(row))
    return "\n".join(lines) + "\n"


def cfg_to_extxyz(
    src: str | os.PathLike,
    out: str | os.PathLike,
    type_names: Sequence[str],
    progress: bool | None = False,
) -> int:
    """Convert a ``.cfg`` file to extended XYZ; returns the number of frames.

    Symbols are ``type_names[type]`` (chemical symbols); energy and forces as ASE results;
    ``stress`` = -PlusStress / V (ASE sign, fully periodic frames) and ``virial`` = PlusStress
    (3x3, every frame with PlusStress); Feature lines as string info entries; non-default ids and
    extra AtomData columns as ``cfg_*`` per-atom columns. :func:`extxyz_to_cfg` restores the file
    exactly. ``progress``: a tqdm bar on stderr (``None``: only when stderr is a terminal).
    """
    src = os.fspath(src)
    names = check_type_names(list(type_names), "type_names", symbols=True)

    def frames():
        index = -1
        cfgs = with_progress(iter_cfg(src), src, os.path.basename(src), progress)
        for index, frame in enumerate(cfgs):
            check_type_range(frame, index, src, names)
            try:
                yield _extxyz_frame(frame.to_atoms(names))
            except InteropError as e:
                raise cfg_error(src, index, "Feature", str(e)) from None
        if index < 0:
            raise InteropError(f"{src}: no configurations (no BEGIN_CFG line)")

    count = 0
    with replacing_text(out) as stream:
        for text in frames():
            stream.write(text)
            count += 1
    return count


def extxyz_to_cfg(
    src: str | os.PathLike,
    out: str | os.PathLike,
    type_names: Sequence[str],
    progress: bool | None = False,
) -> int:
    """Convert extended XYZ (any ASE-readable extxyz) to ``.cfg``; returns the number of frames.

    ``type`` = index of the symbol in ``type_names``; PlusStress from ``virial`` when present
    (exact), else -V * stress (fully periodic frames); string info entries become Feature lines.
    Other info entries and per-atom arrays have no place in a ``.cfg`` and are left out (one
    warning lists them). ``progress``: a tqdm bar on stderr (``None``: only on a terminal).
    """
    src = os.fspath(src)
    names = check_type_names(list(type_names), "type_names", symbols=True)
    dropped: set[str] = set()

    def frames():
        line = 1
        try:
            images = ase.io.iread(src, index=":", format="extxyz")
            for index, atoms in enumerate(
                with_progress(images, src, os.path.basename(src), progress)
            ):
                for key, value in list(atoms.info.items()):
                    if isinstance(value, np.ndarray) and value.dtype.kind in "US":
                        atoms.info[key] = [str(v) for v in value.ravel()]
                    elif key != "virial" and not (
                        isinstance(value, str)
                        or (isinstance(value, list) and all(isinstance(v, str) for v in value))
                    ):
                        dropped.add(f"info[{key!r}]")
                dropped.update(
                    f"arrays[{k!r}]"
                    for k in atoms.arrays
                    if k not in ("numbers", "positions", "forces") and not k.startswith("cfg_")
                )
                check_extxyz_frame(atoms, src, line, index)
                try:
                    frame = CfgFrame.from_atoms(atoms, names)
                except ValueError as e:
                    raise InteropError(f"{src}:{line}: frame {index}: {e}") from None
                line += len(atoms) + 2
                yield frame
        except InteropError:
            raise
        except KeyError as e:  # ASE: an unknown chemical symbol in the species column
            raise InteropError(
                f"{src}:{line}: not a readable extxyz frame: unknown species {e}"
            ) from None
        except (ValueError, IndexError, XYZError) as e:
            detail = str(e).removeprefix("ase.io.extxyz: ")
            raise InteropError(f"{src}:{line}: not a readable extxyz frame: {detail}") from None
        if line == 1:
            raise InteropError(f"{src}: no extxyz frames (empty file)")

    count = write_cfg(frames(), out)
    if dropped:
        warnings.warn(
            f"{src}: not representable in .cfg and left out: {', '.join(sorted(dropped))}",
            stacklevel=2,
        )
    return count
