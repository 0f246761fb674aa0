"""Labelled structures for benchmarking: ``.cfg`` (MLIP-2) and anything ASE reads (extxyz, ...).

Every structure becomes a :class:`LabelledFrame`: unlabelled ASE ``Atoms`` plus reference energy,
forces and (fully periodic cells only) ASE stress, the file it came from and its configuration
group (an info tag such as ``config_type``/``group``, or a ``.cfg`` ``Feature`` key).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["GROUP_KEYS", "LabelledFrame", "load_frames", "subsample_indices"]

#: info keys tried, in order, when no group key is given
GROUP_KEYS = ("config_type", "group", "config_group", "Feature", "category", "label")


@dataclass
class LabelledFrame:
    """One reference structure. ``stress`` is ASE's (eV/A^3, Voigt xx yy zz yz xz xy), only for
    fully periodic cells; ``energy``/``forces`` may be ``None`` when the file has none."""

    atoms: object  # ase.Atoms without a calculator
    energy: float | None
    forces: np.ndarray | None
    stress: np.ndarray | None
    file: str
    index: int
    group: str

    @property
    def n_atoms(self) -> int:
        return len(self.atoms)

    @property
    def periodic(self) -> bool:
        return bool(np.all(self.atoms.pbc)) and abs(self.atoms.cell.volume) > 1e-12


def subsample_indices(n: int, max_frames: int | None) -> list[int]:
    """All indices, or ``max_frames`` of them evenly spread over ``0..n-1``."""
    if max_frames is None or max_frames >= n:
        return list(range(n))
    if max_frames <= 0:
        return []
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, max_frames)})


def _read_cfg_atoms(path: str, type_names: Sequence[str] | None) -> list:
    from ..io.cfg import iter_cfg

    if type_names is None:
        raise ValueError(
            f"{path}: a .cfg file stores type indices only; give the species of its type "
            "indices 0, 1, ... with --type-names (Python: type_names=[...])"
        )
    names = list(type_names)
    out = []
    for i, frame in enumerate(iter_cfg(path)):
        if frame.n_atoms and int(frame.types.max()) >= len(names):
            raise ValueError(
                f"{path}: configuration {i} has type index {int(frame.types.max())}, but only "
                f"{len(names)} type names were given ({' '.join(names)})"
            )
        out.append(frame.to_atoms(names))
    return out


def _labels(atoms) -> tuple[float | None, np.ndarray | None, np.ndarray | None]:
    calc = atoms.calc
    results = dict(getattr(calc, "results", {}) or {}) if calc is not None else {}
    info = atoms.info
    energy = results.get("energy", results.get("free_energy", info.get("energy")))
    forces = results.get("forces", atoms.arrays.get("forces"))
    stress = results.get("stress", info.get("stress"))
    periodic = bool(np.all(atoms.pbc)) and abs(atoms.cell.volume) > 1e-12
    if stress is not None and periodic:
        stress = np.asarray(stress, dtype=np.float64)
        if stress.shape == (3, 3):
            from ase.stress import full_3x3_to_voigt_6_stress

            stress = full_3x3_to_voigt_6_stress(stress)
        stress = np.asarray(stress, dtype=np.float64).reshape(6)
    elif periodic and "virial" in info:  # .cfg PlusStress kept as info["virial"] (eV)
        virial = np.asarray(info["virial"], dtype=np.float64).reshape(3, 3)
        from ase.stress import full_3x3_to_voigt_6_stress

        stress = -full_3x3_to_voigt_6_stress(virial) / abs(atoms.cell.volume)
    else:
        stress = None
    return (
        None if energy is None else float(energy),
        None if forces is None else np.asarray(forces, dtype=np.float64).reshape(-1, 3),
        stress,
    )


def _group_of(atoms, key: str | None) -> str | None:
    if key is None:
        return None
    value = atoms.info.get(key)
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        value = "+".join(str(v) for v in value)
    return str(value)


def load_frames(
    paths: Sequence[str | os.PathLike],
    type_names: Sequence[str] | None = None,
    group_key: str | None = None,
    max_frames: int | None = None,
) -> tuple[list[LabelledFrame], str | None]:
    """Read the data files; returns the frames and the group key used (``None``: none found).

    Args:
        paths: ``.cfg`` files (need ``type_names``) and/or ASE-readable files (extxyz, ...)
        type_names: species of ``.cfg`` type indices 0, 1, ...
        group_key: info key naming each structure's configuration group (a ``.cfg`` ``Feature``
            key becomes an info key); default: the first of :data:`GROUP_KEYS` present
        max_frames: keep at most this many structures per file, evenly spread
    """
    import ase.io

    raw: list[tuple[str, int, object]] = []
    for p in paths:
        path = os.fspath(p)
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such data file")
        if path.lower().endswith(".cfg"):
            atoms_list = _read_cfg_atoms(path, type_names)
        else:
            atoms_list = ase.io.read(path, index=":")
        if not atoms_list:
            raise ValueError(f"{path}: no structures")
        keep = subsample_indices(len(atoms_list), max_frames)
        raw.extend((path, i, atoms_list[i]) for i in keep)

    key = group_key
    if key is None:
        key = next((k for k in GROUP_KEYS if any(k in a.info for _, _, a in raw)), None)
    several_files = len({f for f, _, _ in raw}) > 1
    frames = []
    for path, i, atoms in raw:
        energy, forces, stress = _labels(atoms)
        group = _group_of(atoms, key)
        if group is None:
            group = Path(path).name if several_files and key is None else "(none)"
        bare = atoms.copy()
        bare.calc = None
        frames.append(
            LabelledFrame(
                atoms=bare,
                energy=energy,
                forces=forces,
                stress=stress,
                file=path,
                index=i,
                group=group,
            )
        )
    return frames, key
