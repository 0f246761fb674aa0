"""Reader and writer for MLIP-2 ``.cfg`` data sets, and conversion to and from ASE ``Atoms``.

Layout (docs/theory.md §3.2)::

    BEGIN_CFG
     Size
        <N>
     Supercell                      optional; 1-3 rows of lattice vectors, Angstrom
        ax ay az                    (absent = cluster; a zero row = non-periodic direction)
     AtomData:  id type cartes_x cartes_y cartes_z fx fy fz   (columns found by name)
        1 <type> x y z fx fy fz
     Energy                         optional, eV
        <E>
     PlusStress:  xx yy zz yz xz xy optional; virial W = -dE/dstrain, eV (positive = compressed)
        <6 floats>
     Feature <key> <value>          optional, any number, kept in order
    END_CFG

Conventions of this module:

* ``type`` is the 0-based species index; the species list (``type_names``) is external.
* ``PlusStress`` is kept in the file's order xx yy zz yz xz xy. It equals NequIP's ``virial``
  and ``-V * ASE stress`` (ASE's Voigt order is the same).
* Features are a list of ``(key, value)`` string pairs in file order; repeated keys are kept.
* AtomData columns other than id/type/cartes_*/f* are kept as float64 arrays in
  ``CfgFrame.extra_columns`` (written back after the force columns).
* An all-zero Supercell means the same as no Supercell and is read as ``cell=None``.
* Floats are written with Python's shortest round-trip ``repr``, so ``read(write(x)) == x``
  bit for bit.

Any malformed input raises :class:`CfgFormatError` (a ``ValueError``) whose message starts with
``<path>:<line>:`` and names the offending field. That includes nan/inf numbers (positions,
forces, Energy, PlusStress, Supercell) and a singular periodic cell (volume, or area/length for
2 or 1 periodic directions, below :data:`MIN_CELL_MEASURE`); :class:`CfgFrame` refuses them too,
so they are never written either.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from .._files import replacing_text

if TYPE_CHECKING:
    from ase import Atoms

__all__ = [
    "MIN_CELL_MEASURE",
    "VOIGT_ORDER",
    "CfgFormatError",
    "CfgFrame",
    "cell_measure",
    "first_non_finite",
    "iter_cfg",
    "read_cfg",
    "singular_cell_message",
    "write_cfg",
]

#: Smallest volume (A^3; area or length for 2 or 1 periodic directions) of a periodic cell: below
#: it the cell is singular for stresses and neighbour lists, and files holding one are refused.
MIN_CELL_MEASURE = 1e-8

#: Order of the six PlusStress components (same as ASE's Voigt order).
VOIGT_ORDER: tuple[str, ...] = ("xx", "yy", "zz", "yz", "xz", "xy")
_VOIGT_PAIRS = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))
_REQUIRED_COLUMNS = ("id", "type", "cartes_x", "cartes_y", "cartes_z")
_FORCE_COLUMNS = ("fx", "fy", "fz")
_STANDARD_COLUMNS = frozenset(_REQUIRED_COLUMNS + _FORCE_COLUMNS)
_KEYWORDS = frozenset(
    {"BEGIN_CFG", "END_CFG", "Size", "Supercell", "SuperCell", "AtomData"}
    | {"Energy", "PlusStress", "Feature"}
)
# prefix of ``atoms.arrays`` keys that carry cfg-only per-atom data
_ARRAY_PREFIX = "cfg_"


class CfgFormatError(ValueError):
    """Malformed ``.cfg`` input; the message reads ``<path>:<line>: <what is wrong>``."""

    def __init__(self, path: str | os.PathLike, lineno: int, field: str, message: str) -> None:
        self.path = str(path)
        self.lineno = lineno
        self.field = field
        self.detail = message
        super().__init__(f"{self.path}:{lineno}: {message}")

    def __reduce__(self):  # keep the exception picklable (multiprocessing data loaders)
        return (type(self), (self.path, self.lineno, self.field, self.detail))


# ----------------------------------------------------------------------------------------------
# checks shared with the extended XYZ readers
# ----------------------------------------------------------------------------------------------


def first_non_finite(values: Any) -> int | None:
    """Flat index of the first nan/inf of ``values``, or ``None`` when all are finite."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    bad = np.flatnonzero(~np.isfinite(arr))
    return int(bad[0]) if bad.size else None


def cell_measure(cell: Any, pbc: Any) -> float:
    """Volume (A^3) of the periodic part of ``cell``: the volume for 3 periodic directions, the
    area for 2 and the length for 1 (``sqrt(det(A A^T))`` of the periodic rows ``A``)."""
    rows = np.asarray(cell, dtype=np.float64)[np.asarray(pbc, dtype=bool)]
    if not len(rows):
        return math.inf
    with np.errstate(all="ignore"):  # huge numbers overflow to inf: not singular
        if len(rows) == 3:
            return abs(float(np.linalg.det(rows)))
        return math.sqrt(max(float(np.linalg.det(rows @ rows.T)), 0.0))


def singular_cell_message(measure: float, n_periodic: int) -> str:
    """Why a periodic cell of ``measure`` (see :func:`cell_measure`) is refused."""
    what = {3: ("volume", "A^3"), 2: ("area", "A^2"), 1: ("length", "A")}[n_periodic]
    return (
        f"the periodic cell is singular: its {what[0]} is {measure:.3g} {what[1]} "
        f"(< {MIN_CELL_MEASURE:g}); stresses and neighbour lists need linearly independent "
        "lattice vectors"
    )


# ----------------------------------------------------------------------------------------------
# the frame
# ----------------------------------------------------------------------------------------------


def _float_array(value: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    arr = np.array(value, dtype=np.float64)
    if arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, expected {shape}")
    return arr


def _int_array(value: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        as_float = np.asarray(arr, dtype=np.float64)
        if not np.all(np.isfinite(as_float)) or np.any(as_float != np.round(as_float)):
            raise ValueError(f"{name} must hold integers")
    arr = np.array(arr, dtype=np.int64)
    if arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, expected {shape}")
    return arr


def _check_token(name: str, what: str) -> None:
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise ValueError(f"{what} {name!r} must be a non-empty string without whitespace")


def _is_feature_value(value: Any) -> bool:
    return (
        isinstance(value, str)
        and "\n" not in value
        and "\r" not in value
        and (value == value.strip())
    )


def _check_feature_value(key: str, value: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"Feature {key!r} value must be a str, got {type(value).__name__}")
    if not _is_feature_value(value):
        raise ValueError(
            f"Feature {key!r} value {value!r} must be one line without leading/trailing whitespace"
        )


@dataclass(eq=False)
class CfgFrame:
    """One MLIP-2 configuration.

    Attributes:
        types: ``(N,)`` int64, 0-based species indices.
        positions: ``(N, 3)`` float64 Cartesian positions, Angstrom.
        cell: ``(3, 3)`` float64 lattice vectors as rows, or ``None`` for a cluster.
            A zero row marks a non-periodic direction.
        energy: total energy in eV, or ``None``.
        forces: ``(N, 3)`` float64 forces in eV/Angstrom, or ``None``.
        plus_stress: ``(6,)`` float64 virial ``-dE/dstrain`` in eV, order xx yy zz yz xz xy,
            or ``None``.
        features: ``(key, value)`` string pairs in file order (repeated keys allowed).
            A ``dict`` is accepted and turned into its items.
        ids: ``(N,)`` int64 atom ids, or ``None`` meaning ``1..N``.
        extra_columns: further AtomData columns, name -> ``(N,)`` float64.
    """

    types: np.ndarray
    positions: np.ndarray
    cell: np.ndarray | None = None
    energy: float | None = None
    forces: np.ndarray | None = None
    plus_stress: np.ndarray | None = None
    features: list[tuple[str, str]] = field(default_factory=list)
    ids: np.ndarray | None = None
    extra_columns: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Coerce the fields to their canonical dtypes/shapes; ``ValueError`` if impossible."""
        self.types = _int_array(self.types, np.shape(self.types), "types")
        if self.types.ndim != 1:
            raise ValueError(f"types has shape {self.types.shape}, expected (N,)")
        n = self.types.shape[0]
        if n and self.types.min() < 0:
            raise ValueError("types must be >= 0")
        self.positions = _float_array(self.positions, (n, 3), "positions")
        if self.cell is not None:
            self.cell = _float_array(self.cell, (3, 3), "cell")
        if self.energy is not None:
            self.energy = float(self.energy)
        if self.forces is not None:
            self.forces = _float_array(self.forces, (n, 3), "forces")
        if self.plus_stress is not None:
            self.plus_stress = _float_array(self.plus_stress, (6,), "plus_stress")
        if self.ids is not None:
            self.ids = _int_array(self.ids, (n,), "ids")
        self._check_finite()
        features = self.features
        if isinstance(features, Mapping):
            features = list(features.items())
        pairs: list[tuple[str, str]] = []
        for item in features:
            key, value = item
            _check_token(key, "Feature key")
            _check_feature_value(key, value)
            pairs.append((key, value))
        self.features = pairs
        extra: dict[str, np.ndarray] = {}
        for name, values in self.extra_columns.items():
            _check_token(name, "AtomData column")
            if name in _STANDARD_COLUMNS:
                raise ValueError(f"extra column {name!r} clashes with a standard AtomData column")
            extra[name] = _float_array(values, (n,), f"extra column {name!r}")
        self.extra_columns = extra

    def _check_finite(self) -> None:
        """``ValueError`` for a nan/inf number or a singular periodic cell."""
        per_atom = {"positions": self.positions, "forces": self.forces}
        for name, values in per_atom.items():
            k = None if values is None else first_non_finite(values)
            if k is not None:
                raise ValueError(
                    f"{name} of atom {k // 3} (AtomData row {k // 3 + 1}) hold "
                    f"{float(values.reshape(-1)[k])!r}"
                )
        if self.energy is not None and not math.isfinite(self.energy):
            raise ValueError(f"Energy is {self.energy!r}")
        if self.plus_stress is not None and (k := first_non_finite(self.plus_stress)) is not None:
            raise ValueError(f"PlusStress {VOIGT_ORDER[k]} is {float(self.plus_stress[k])!r}")
        if self.cell is not None:
            if (k := first_non_finite(self.cell)) is not None:
                raise ValueError(
                    f"Supercell row {k // 3 + 1} holds {float(self.cell.reshape(-1)[k])!r}"
                )
            pbc = self.pbc
            if pbc.any() and (measure := cell_measure(self.cell, pbc)) < MIN_CELL_MEASURE:
                raise ValueError(singular_cell_message(measure, int(pbc.sum())))

    # -- convenience --------------------------------------------------------------------------

    @property
    def n_atoms(self) -> int:
        """Number of atoms."""
        return int(self.types.shape[0])

    @property
    def pbc(self) -> np.ndarray:
        """Periodicity per lattice direction: ``True`` where the Supercell row is non-zero."""
        if self.cell is None:
            return np.zeros(3, dtype=bool)
        return np.any(self.cell != 0.0, axis=1)

    @property
    def virial(self) -> np.ndarray | None:
        """PlusStress as a symmetric ``(3, 3)`` matrix (eV), or ``None``."""
        if self.plus_stress is None:
            return None
        out = np.empty((3, 3), dtype=np.float64)
        for value, (i, j) in zip(self.plus_stress.tolist(), _VOIGT_PAIRS, strict=True):
            out[i, j] = out[j, i] = value
        return out

    def __eq__(self, other: object) -> bool:
        """Exact equality of all fields (``ids=None`` equals ``1..N``)."""
        if not isinstance(other, CfgFrame):
            return NotImplemented

        def same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
            if a is None or b is None:
                return a is None and b is None
            return a.shape == b.shape and bool(np.array_equal(a, b))

        return (
            same(self.types, other.types)
            and same(self.positions, other.positions)
            and same(self.cell, other.cell)
            and self.energy == other.energy
            and same(self.forces, other.forces)
            and same(self.plus_stress, other.plus_stress)
            and self.features == other.features
            and same(self._ids_or_default(), other._ids_or_default())
            and list(self.extra_columns) == list(other.extra_columns)
            and all(same(v, other.extra_columns[k]) for k, v in self.extra_columns.items())
        )

    __hash__ = None  # type: ignore[assignment]

    def _ids_or_default(self) -> np.ndarray:
        if self.ids is not None:
            return self.ids
        return np.arange(1, self.n_atoms + 1, dtype=np.int64)

    # -- ASE ------------------------------------------------------------------------------------

    def to_atoms(self, type_names: Sequence[str]) -> Atoms:
        """Build ``ase.Atoms`` with symbols ``type_names[type]``.

        ``pbc`` is ``True`` for each non-zero Supercell row. Energy, forces and, for a fully
        periodic cell with PlusStress, the ASE stress ``-PlusStress / V`` go into a
        ``SinglePointCalculator``. The raw virial is always kept as ``info["virial"]`` (3x3, eV)
        so non-periodic frames keep it too. Features become ``info[key] = value`` (a list of
        strings for a repeated key). Non-default ids and extra AtomData columns are stored in
        ``atoms.arrays["cfg_id"]`` and ``atoms.arrays["cfg_<column>"]``.
        """
        from ase import Atoms
        from ase.calculators.singlepoint import SinglePointCalculator

        names = list(type_names)
        if self.n_atoms and self.types.max() >= len(names):
            raise ValueError(
                f"type index {int(self.types.max())} out of range for {len(names)} type_names"
            )
        symbols = [names[t] for t in self.types.tolist()]
        if self.cell is None:
            atoms = Atoms(symbols, positions=self.positions.copy(), pbc=False)
        else:
            atoms = Atoms(symbols, positions=self.positions.copy(), cell=self.cell.copy())
            atoms.pbc = self.pbc

        grouped: dict[str, list[str]] = {}
        for key, value in self.features:
            grouped.setdefault(key, []).append(value)
        for key, values in grouped.items():
            atoms.info[key] = values[0] if len(values) == 1 else values

        results: dict[str, Any] = {}
        if self.energy is not None:
            results["energy"] = self.energy
        if self.forces is not None:
            results["forces"] = self.forces.copy()
        if self.plus_stress is not None:
            atoms.info["virial"] = self.virial
            if self.cell is not None and self.pbc.all():
                volume = abs(float(np.linalg.det(self.cell)))
                if np.isfinite(volume) and volume > 0.0:
                    results["stress"] = -self.plus_stress / volume
        if results:
            atoms.calc = SinglePointCalculator(atoms, **results)

        if self.ids is not None and not np.array_equal(self.ids, np.arange(1, self.n_atoms + 1)):
            atoms.arrays[_ARRAY_PREFIX + "id"] = self.ids.copy()
        for name, values in self.extra_columns.items():
            atoms.arrays[_ARRAY_PREFIX + name] = values.copy()
        return atoms

    @classmethod
    def from_atoms(cls, atoms: Atoms, type_names: Sequence[str]) -> CfgFrame:
        """Inverse of :meth:`to_atoms`.

        Labels come from ``atoms.calc.results`` (nothing is recomputed). PlusStress is taken
        from ``info["virial"]`` when present (exact), else as ``-V * stress`` for a fully periodic
        cell. Cell rows of non-periodic directions are written as zero; a fully non-periodic
        ``Atoms`` gives ``cell=None``. Every ``str`` (or list of ``str``) entry of ``atoms.info``
        whose key has no whitespace and whose values are single lines without outer whitespace
        becomes a Feature; other ``info`` entries are ignored. Round trip ``cfg -> Atoms -> cfg`` is
        exact, except that interleaved repeats of a Feature key come back grouped by key.
        """
        index: dict[str, int] = {}
        for i, name in enumerate(type_names):
            if name in index:
                raise ValueError(f"type_names lists {name!r} twice")
            index[name] = i
        symbols = atoms.get_chemical_symbols()
        missing = sorted(set(symbols) - set(index))
        if missing:
            raise ValueError(f"elements {missing} are not in type_names {list(type_names)}")
        types = np.array([index[s] for s in symbols], dtype=np.int64)

        pbc = np.array(atoms.pbc, dtype=bool)
        cell: np.ndarray | None = None
        if pbc.any():
            cell = np.array(atoms.cell.array, dtype=np.float64)
            cell[~pbc] = 0.0
            if not np.all(np.any(cell[pbc] != 0.0, axis=1)):
                raise ValueError(f"periodic direction with a zero cell vector (pbc={pbc.tolist()})")

        calc = atoms.calc
        results = dict(getattr(calc, "results", None) or {}) if calc is not None else {}
        energy = results.get("energy")
        forces = results.get("forces")
        plus_stress = None
        if "virial" in atoms.info:
            virial = np.asarray(atoms.info["virial"], dtype=np.float64)
            if virial.size == 9:
                virial = virial.reshape(3, 3)
                # symmetric part (a symmetric virial is taken as is, bit for bit)
                plus_stress = np.array(
                    [
                        virial[i, j]
                        if virial[i, j] == virial[j, i]
                        else 0.5 * virial[i, j] + 0.5 * virial[j, i]
                        for i, j in _VOIGT_PAIRS
                    ]
                )
            elif virial.shape == (6,):
                plus_stress = virial.copy()
            else:
                raise ValueError(f"info['virial'] has shape {virial.shape}, expected (3, 3)")
        elif "stress" in results and cell is not None and pbc.all():
            stress = np.asarray(results["stress"], dtype=np.float64)
            if stress.shape == (3, 3):
                stress = np.array([stress[i, j] for i, j in _VOIGT_PAIRS])
            plus_stress = -atoms.get_volume() * stress

        features: list[tuple[str, str]] = []
        for key, value in atoms.info.items():
            if not isinstance(key, str) or not key or any(c.isspace() for c in key):
                continue
            values = value if isinstance(value, list | tuple) else [value]
            if values and all(_is_feature_value(v) for v in values):
                features.extend((key, str(v)) for v in values)

        ids = atoms.arrays.get(_ARRAY_PREFIX + "id")
        extra = {
            key[len(_ARRAY_PREFIX) :]: np.array(values, dtype=np.float64)
            for key, values in atoms.arrays.items()
            if key.startswith(_ARRAY_PREFIX) and key != _ARRAY_PREFIX + "id"
        }
        return cls(
            types=types,
            positions=atoms.get_positions(),
            cell=cell,
            energy=None if energy is None else float(energy),
            forces=None if forces is None else np.array(forces, dtype=np.float64),
            plus_stress=plus_stress,
            features=features,
            ids=None if ids is None else np.array(ids),
            extra_columns=extra,
        )


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------

_Line = tuple[int, str, list[str]]


class _LineSource:
    """Non-blank lines of a text stream as ``(lineno, raw, tokens)`` with one-line push-back."""

    def __init__(self, stream: TextIO, path: str) -> None:
        self._lines = enumerate(stream, 1)
        self.path = path
        self.last_lineno = 0
        self._pushed: _Line | None = None

    def next(self) -> _Line | None:
        if self._pushed is not None:
            item, self._pushed = self._pushed, None
            return item
        for lineno, raw in self._lines:
            self.last_lineno = lineno
            tokens = raw.split()
            if tokens:
                return lineno, raw, tokens
        return None

    def push(self, item: _Line) -> None:
        self._pushed = item

    def error(self, lineno: int, field: str, message: str) -> CfgFormatError:
        return CfgFormatError(self.path, lineno, field, message)


def _keyword(tokens: list[str]) -> str:
    head = tokens[0]
    return head[:-1] if head.endswith(":") else head


def _is_keyword_line(tokens: list[str]) -> bool:
    return _keyword(tokens) in _KEYWORDS


def _is_data_line(tokens: list[str]) -> bool:
    return not tokens[0][0].isalpha()


def _parse_float(src: _LineSource, lineno: int, token: str, field: str) -> float:
    try:
        return float(token)
    except ValueError:
        raise src.error(lineno, field, f"{field} value {token!r} is not a number") from None


def _parse_int(src: _LineSource, lineno: int, token: str, field: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise src.error(lineno, field, f"{field} value {token!r} is not an integer") from None


def _value_line(src: _LineSource, header: _Line, section: str, count: int) -> tuple[int, list[str]]:
    """``(lineno, tokens)`` of the line of ``count`` values that follows a section header."""
    item = src.next()
    if item is None or _is_keyword_line(item[2]):
        if item is not None:
            src.push(item)
        raise src.error(header[0], section, f"{section} has no value line")
    lineno, _raw, tokens = item
    if len(tokens) != count:
        names = f" ({' '.join(VOIGT_ORDER)})" if section == "PlusStress" else ""
        raise src.error(
            lineno, section, f"{section} has {len(tokens)} values, expected {count}{names}"
        )
    return lineno, tokens


def _data_rows(src: _LineSource) -> list[_Line]:
    """Consecutive data lines (first character not a letter)."""
    rows: list[_Line] = []
    while True:
        item = src.next()
        if item is None:
            return rows
        if not _is_data_line(item[2]):
            src.push(item)
            return rows
        rows.append(item)


def _parse_atom_data(
    src: _LineSource, header: _Line
) -> tuple[list[str], dict[str, np.ndarray], int]:
    """Parse an AtomData block; returns (columns, arrays by column, number of rows)."""
    header_lineno, _raw, tokens = header
    columns = tokens[1:]
    seen: set[str] = set()
    for name in columns:
        if name in seen:
            raise src.error(header_lineno, name, f"AtomData column {name!r} appears twice")
        seen.add(name)
    for name in _REQUIRED_COLUMNS:
        if name not in seen:
            raise src.error(
                header_lineno, name, f"AtomData is missing the required column {name!r}"
            )
    present = [name for name in _FORCE_COLUMNS if name in seen]
    if present and len(present) != 3:
        absent = [name for name in _FORCE_COLUMNS if name not in seen]
        raise src.error(
            header_lineno, absent[0], f"AtomData has {present} but lacks force column(s) {absent}"
        )

    rows = _data_rows(src)
    ncol = len(columns)
    for lineno, _raw, row in rows:
        if len(row) != ncol:
            raise src.error(
                lineno,
                "AtomData",
                f"AtomData row has {len(row)} columns, expected {ncol} ({' '.join(columns)})",
            )

    arrays: dict[str, np.ndarray] = {}
    for j, name in enumerate(columns):
        column = [row[j] for _, _, row in rows]
        if name in ("id", "type"):
            try:
                arrays[name] = np.array([int(t) for t in column], dtype=np.int64)
            except ValueError:
                for lineno, _raw, row in rows:
                    _parse_int(src, lineno, row[j], name)
                raise  # pragma: no cover - the loop above raises
            if name == "type" and arrays[name].size and arrays[name].min() < 0:
                k = int(np.argmin(arrays[name]))
                raise src.error(rows[k][0], name, f"type value {column[k]!r} is negative")
        else:
            try:
                arrays[name] = np.array([float(t) for t in column], dtype=np.float64)
            except ValueError:
                for lineno, _raw, row in rows:
                    _parse_float(src, lineno, row[j], name)
                raise  # pragma: no cover - the loop above raises
            if name in _STANDARD_COLUMNS and (k := first_non_finite(arrays[name])) is not None:
                raise src.error(
                    rows[k][0], name, f"{name} value {column[k]!r} is not a finite number"
                )
    return columns, arrays, len(rows)


def _parse_frame(src: _LineSource, begin_lineno: int) -> CfgFrame:
    size: int | None = None
    size_lineno = 0
    cell: np.ndarray | None = None
    atom_data: tuple[list[str], dict[str, np.ndarray], int] | None = None
    atom_lineno = 0
    energy: float | None = None
    plus_stress: np.ndarray | None = None
    features: list[tuple[str, str]] = []
    seen: dict[str, int] = {}

    while True:
        item = src.next()
        if item is None:
            raise src.error(
                src.last_lineno,
                "END_CFG",
                f"unexpected end of file: END_CFG missing for the configuration that begins "
                f"at line {begin_lineno}",
            )
        lineno, raw, tokens = item
        key = _keyword(tokens)
        if key == "END_CFG":
            end_lineno = lineno
            break
        if key == "Feature":
            parts = raw.strip().split(None, 2)
            if len(parts) < 2:
                raise src.error(lineno, "Feature", "Feature line has no key")
            features.append((parts[1], parts[2] if len(parts) == 3 else ""))
            continue
        if key == "BEGIN_CFG":
            raise src.error(
                lineno,
                "END_CFG",
                f"BEGIN_CFG before END_CFG of the configuration that begins at line {begin_lineno}",
            )
        if key == "SuperCell":
            key = "Supercell"
        if key not in _KEYWORDS:
            if _is_data_line(tokens):
                raise src.error(
                    lineno,
                    "section",
                    f"unexpected data line {raw.strip()!r}; expected a section keyword or END_CFG",
                )
            raise src.error(lineno, key, f"unknown section keyword {tokens[0]!r}")
        if key in seen:
            raise src.error(lineno, key, f"{key} appears twice (first at line {seen[key]})")
        seen[key] = lineno
        if key not in ("AtomData", "PlusStress") and len(tokens) > 1:
            raise src.error(lineno, key, f"unexpected text after {key}: {raw.strip()!r}")

        if key == "Size":
            size_lineno, (token,) = _value_line(src, item, "Size", 1)
            size = _parse_int(src, size_lineno, token, "Size")
            if size < 0:
                raise src.error(size_lineno, "Size", f"Size {size} is negative")
        elif key == "Supercell":
            rows = _data_rows(src)
            if not 1 <= len(rows) <= 3:
                raise src.error(
                    lineno, "Supercell", f"Supercell has {len(rows)} rows, expected 1 to 3"
                )
            cell = np.zeros((3, 3), dtype=np.float64)
            for i, (row_lineno, _raw, row) in enumerate(rows):
                if len(row) != 3:
                    raise src.error(
                        row_lineno, "Supercell", f"Supercell row has {len(row)} values, expected 3"
                    )
                for k, token in enumerate(row):
                    cell[i, k] = _parse_float(src, row_lineno, token, "Supercell")
                    if not math.isfinite(cell[i, k]):
                        raise src.error(
                            row_lineno,
                            "Supercell",
                            f"Supercell value {token!r} is not a finite number",
                        )
            if not cell.any():
                cell = None
            else:
                pbc = np.any(cell != 0.0, axis=1)
                measure = cell_measure(cell, pbc)
                if measure < MIN_CELL_MEASURE:
                    raise src.error(
                        lineno,
                        "Supercell",
                        f"Supercell: {singular_cell_message(measure, int(pbc.sum()))}",
                    )
        elif key == "AtomData":
            atom_data = _parse_atom_data(src, item)
            atom_lineno = lineno
        elif key == "Energy":
            value_lineno, (token,) = _value_line(src, item, "Energy", 1)
            energy = _parse_float(src, value_lineno, token, "Energy")
            if not math.isfinite(energy):
                raise src.error(
                    value_lineno, "Energy", f"Energy value {token!r} is not a finite number"
                )
        elif key == "PlusStress":
            names = tokens[1:] or list(VOIGT_ORDER)
            if sorted(names) != sorted(VOIGT_ORDER):
                raise src.error(
                    lineno,
                    "PlusStress",
                    f"PlusStress header names {names}, expected {' '.join(VOIGT_ORDER)}",
                )
            value_lineno, values = _value_line(src, item, "PlusStress", 6)
            by_name = {
                n: _parse_float(src, value_lineno, t, "PlusStress")
                for n, t in zip(names, values, strict=True)
            }
            bad = [n for n in names if not math.isfinite(by_name[n])]
            if bad:
                raise src.error(
                    value_lineno,
                    "PlusStress",
                    f"PlusStress {bad[0]} value {values[names.index(bad[0])]!r} is not a finite "
                    "number",
                )
            plus_stress = np.array([by_name[n] for n in VOIGT_ORDER], dtype=np.float64)

    if size is None:
        raise src.error(
            end_lineno, "Size", f"configuration that begins at line {begin_lineno} has no Size"
        )
    if atom_data is None:
        raise src.error(
            end_lineno,
            "AtomData",
            f"configuration that begins at line {begin_lineno} has no AtomData",
        )
    columns, arrays, n_rows = atom_data
    if n_rows != size:
        raise src.error(
            atom_lineno,
            "Size",
            f"AtomData has {n_rows} rows but Size (line {size_lineno}) is {size}",
        )
    forces = None
    if "fx" in arrays:
        forces = np.stack([arrays[c] for c in _FORCE_COLUMNS], axis=1)
    extra = {name: arrays[name] for name in columns if name not in _STANDARD_COLUMNS}
    return CfgFrame(
        types=arrays["type"],
        positions=np.stack([arrays[c] for c in ("cartes_x", "cartes_y", "cartes_z")], axis=1),
        cell=cell,
        energy=energy,
        forces=forces,
        plus_stress=plus_stress,
        features=features,
        ids=arrays["id"],
        extra_columns=extra,
    )


def iter_cfg(path: str | os.PathLike) -> Iterator[CfgFrame]:
    """Yield the configurations of a ``.cfg`` file one by one (streaming)."""
    name = os.fspath(path)
    with open(path, encoding="utf-8") as stream:
        src = _LineSource(stream, name)
        while True:
            item = src.next()
            if item is None:
                return
            lineno, raw, tokens = item
            if tokens != ["BEGIN_CFG"]:
                raise src.error(lineno, "BEGIN_CFG", f"expected BEGIN_CFG, found {raw.strip()!r}")
            yield _parse_frame(src, lineno)


def read_cfg(path: str | os.PathLike) -> list[CfgFrame]:
    """Read all configurations of a ``.cfg`` file."""
    return list(iter_cfg(path))


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------


def _reprs(values: np.ndarray) -> list[str]:
    return [repr(v) for v in values.tolist()]


def _format_frame(frame: CfgFrame) -> str:
    frame.validate()
    n = frame.n_atoms
    out = ["BEGIN_CFG", " Size", f"    {n}"]
    if frame.cell is not None:
        out.append(" Supercell")
        out.extend("    " + " ".join(_reprs(row)) for row in frame.cell)
    columns = list(_REQUIRED_COLUMNS)
    cols: list[list[str]] = [
        [str(i) for i in frame._ids_or_default().tolist()],
        [str(t) for t in frame.types.tolist()],
        *(_reprs(frame.positions[:, k]) for k in range(3)),
    ]
    if frame.forces is not None:
        columns.extend(_FORCE_COLUMNS)
        cols.extend(_reprs(frame.forces[:, k]) for k in range(3))
    for name, values in frame.extra_columns.items():
        columns.append(name)
        cols.append(_reprs(values))
    out.append(" AtomData:  " + " ".join(columns))
    out.extend("    " + " ".join(row) for row in zip(*cols, strict=True))
    if frame.energy is not None:
        out.extend([" Energy", f"    {frame.energy!r}"])
    if frame.plus_stress is not None:
        out.append(" PlusStress:  " + " ".join(VOIGT_ORDER))
        out.append("    " + " ".join(_reprs(frame.plus_stress)))
    for key, value in frame.features:
        out.append(f" Feature {key} {value}" if value else f" Feature {key}")
    out.append("END_CFG")
    out.append("")
    return "\n".join(out) + "\n"


def write_cfg(frames: Iterable[CfgFrame], path: str | os.PathLike) -> int:
    """Write configurations in the MLIP-2 layout; returns the number written.

    The text goes to a temporary file in the target directory that is renamed over ``path`` only
    when everything was written, so a failure (e.g. an invalid frame) leaves no partial file.
    """
    target = Path(path)
    mode = target.stat().st_mode & 0o777 if target.exists() else 0o644
    count = 0
    with replacing_text(target, mode=mode) as stream:
        for index, frame in enumerate(frames):
            try:
                text = _format_frame(frame)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{target}: frame {index}: {exc}") from exc
            stream.write(text)
            count += 1
    return count
