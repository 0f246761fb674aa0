"""Offline multi-element alloy data set labelled with ASE's EMT calculator (for the tutorial).

Elements Cu, Ag, Au, Ni, Pd, Pt, Al. Structure kinds (``info["config_type"]``):

* ``fcc``, ``bcc``: random-occupancy supercells, lattice constant from Vegard's law of the
  elements' fcc lattice constants times a scale in 0.97-1.03 (bcc at the same atomic volume);
* ``strained``: such a cell under a random symmetric (triclinic) strain of up to +-4 %;
* ``rattled``: such a cell with Gaussian displacements, sigma 0.05-0.15 A;
* ``liquid``: a 5-15 % expanded cubic cell randomised by 25 sweeps of hard-sphere Monte Carlo
  (pair minimum distance 0.85 x the mean fcc nearest-neighbour distance, at least 2.0 A);
* ``surface_111``, ``surface_100``: fcc slabs with 5-7 A vacuum on both sides (cell kept fully
  periodic so that every frame has a stress);
* ``vacancy``: a supercell with one or two atoms removed, lightly rattled.

Cells hold 8-40 atoms. Each ``Atoms`` carries energy, forces and stress (ASE convention) in a
``SinglePointCalculator``. Structure ``i`` depends only on ``(seed, i)``, so a smaller data set is
a prefix of a larger one with the same seed. Command line::

    python -m nequip_sus2.data.emt --out emt_alloy.xyz --n 600 --seed 0
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk, fcc100, fcc111
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.neighborlist import neighbor_list

from .._files import replacing

__all__ = [
    "CONFIG_TYPES",
    "ELEMENTS",
    "FCC_LATTICE_CONSTANTS",
    "MAX_FORCE",
    "MIN_DISTANCE",
    "dataset_summary",
    "generate_emt_dataset",
    "generate_structure",
    "main",
    "write_emt_dataset",
]

ELEMENTS: tuple[str, ...] = ("Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al")
#: Experimental room-temperature fcc lattice constants, Angstrom.
FCC_LATTICE_CONSTANTS: dict[str, float] = {
    "Cu": 3.615,
    "Ag": 4.086,
    "Au": 4.078,
    "Ni": 3.524,
    "Pd": 3.891,
    "Pt": 3.924,
    "Al": 4.050,
}
#: Kinds in the order they cycle through the data set (strained and rattled twice as often).
_SCHEDULE: tuple[str, ...] = (
    "fcc",
    "bcc",
    "strained",
    "rattled",
    "liquid",
    "surface_111",
    "strained",
    "rattled",
    "surface_100",
    "vacancy",
)
CONFIG_TYPES: tuple[str, ...] = tuple(dict.fromkeys(_SCHEDULE))
#: Sanity limits every generated structure satisfies.
MIN_DISTANCE = 1.9  # Angstrom
MAX_FORCE = 20.0  # eV/Angstrom

_LATTICE_SCALES = (0.97, 0.985, 1.0, 1.015, 1.03)
_N_ELEMENT_WEIGHTS = {1: 0.10, 2: 0.35, 3: 0.25, 4: 0.15, 5: 0.10, 7: 0.05}
# (lattice, cubic cell?, repetitions): all give 8-40 atoms
_BULK_CELLS: tuple[tuple[str, bool, tuple[int, int, int]], ...] = (
    ("fcc", True, (1, 1, 2)),
    ("fcc", True, (1, 2, 2)),
    ("fcc", True, (1, 2, 3)),
    ("fcc", True, (2, 2, 2)),
    ("fcc", False, (2, 2, 2)),
    ("fcc", False, (2, 2, 3)),
    ("fcc", False, (2, 3, 4)),
    ("fcc", False, (3, 3, 3)),
    ("fcc", False, (3, 3, 4)),
    ("bcc", True, (1, 2, 2)),
    ("bcc", True, (2, 2, 2)),
    ("bcc", True, (2, 2, 3)),
    ("bcc", True, (2, 3, 3)),
    ("bcc", False, (2, 2, 2)),
    ("bcc", False, (2, 3, 3)),
    ("bcc", False, (3, 3, 3)),
)
# cubic cells with every edge >= 2 x the largest hard-sphere diameter (simple MIC is exact)
_LIQUID_CELLS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("fcc", (2, 2, 2)),
    ("bcc", (2, 2, 2)),
    ("bcc", (2, 2, 3)),
    ("bcc", (2, 3, 3)),
)
_SLAB_SIZES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "surface_111": ((2, 2, 3), (2, 2, 4), (2, 3, 4), (3, 3, 3), (3, 3, 4)),
    "surface_100": ((2, 2, 3), (2, 2, 4), (2, 2, 6), (3, 3, 3), (3, 3, 4)),
}


# ----------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------


def _pick_elements(rng: np.random.Generator, primary: str) -> list[str]:
    """``primary`` plus a random number of other elements."""
    counts = list(_N_ELEMENT_WEIGHTS)
    weights = np.array([_N_ELEMENT_WEIGHTS[k] for k in counts])
    k = counts[rng.choice(len(counts), p=weights / weights.sum())]
    others = [e for e in ELEMENTS if e != primary]
    chosen = rng.choice(len(others), size=k - 1, replace=False)
    return [primary, *(others[i] for i in sorted(chosen))]


def _occupy(rng: np.random.Generator, n_sites: int, elements: Sequence[str]) -> list[str]:
    """Random occupancy with Dirichlet fractions; every element gets at least one site."""
    k = min(len(elements), n_sites)
    fractions = rng.dirichlet(np.ones(k))
    symbols = list(elements[:k])
    symbols += [elements[i] for i in rng.choice(k, size=n_sites - k, p=fractions)]
    return [symbols[i] for i in rng.permutation(n_sites)]


def _vegard(symbols: Sequence[str]) -> float:
    """Composition-weighted fcc lattice constant."""
    return float(np.mean([FCC_LATTICE_CONSTANTS[s] for s in symbols]))


def _bulk_cell(
    rng: np.random.Generator, elements: Sequence[str], lattice: str | None = None
) -> Atoms:
    """Random-occupancy fcc or bcc supercell at a scaled Vegard lattice constant."""
    options = [c for c in _BULK_CELLS if lattice is None or c[0] == lattice]
    kind, cubic, reps = options[rng.integers(len(options))]
    per_cell = (4 if kind == "fcc" else 2) if cubic else 1
    n_sites = per_cell * int(np.prod(reps))
    symbols = _occupy(rng, n_sites, elements)
    a_fcc = _vegard(symbols) * _LATTICE_SCALES[rng.integers(len(_LATTICE_SCALES))]
    a = a_fcc if kind == "fcc" else a_fcc / 2.0 ** (1.0 / 3.0)  # same volume per atom
    atoms = bulk("X", kind, a=a, cubic=cubic).repeat(reps)
    atoms.set_chemical_symbols(symbols)
    return atoms


def _rattle(rng: np.random.Generator, atoms: Atoms, sigma: float) -> Atoms:
    atoms.positions += rng.normal(0.0, sigma, size=(len(atoms), 3))
    return atoms


def _strain(rng: np.random.Generator, atoms: Atoms, max_strain: float = 0.04) -> Atoms:
    """Apply a random symmetric strain with components in ``[-max_strain, max_strain]``."""
    eps = rng.uniform(-max_strain, max_strain, size=(3, 3))
    eps = 0.5 * (eps + eps.T)
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
    return atoms


def _hard_sphere_radius(symbol: str) -> float:
    """Half the minimum allowed distance for a liquid: 0.85 x half the fcc NN distance."""
    return 0.85 * FCC_LATTICE_CONSTANTS[symbol] / (2.0 * np.sqrt(2.0))


def _liquid(rng: np.random.Generator, elements: Sequence[str]) -> Atoms:
    """Expanded cubic cell randomised by hard-sphere Monte Carlo moves."""
    kind, reps = _LIQUID_CELLS[rng.integers(len(_LIQUID_CELLS))]
    n_sites = (4 if kind == "fcc" else 2) * int(np.prod(reps))
    symbols = _occupy(rng, n_sites, elements)
    a_fcc = _vegard(symbols) * rng.uniform(1.05, 1.15) ** (1.0 / 3.0)
    a = a_fcc if kind == "fcc" else a_fcc / 2.0 ** (1.0 / 3.0)
    atoms = bulk("X", kind, a=a, cubic=True).repeat(reps)
    atoms.set_chemical_symbols(symbols)

    lengths = atoms.cell.lengths()
    pos = atoms.positions.copy()
    radius = np.array([max(1.0, _hard_sphere_radius(s)) for s in symbols])
    d_min = radius[:, None] + radius[None, :]
    for _sweep in range(25):
        for i in rng.permutation(n_sites):
            trial = pos[i] + rng.normal(0.0, 0.5, size=3)
            delta = pos - trial
            delta -= lengths * np.round(delta / lengths)
            dist = np.sqrt(np.einsum("ij,ij->i", delta, delta))
            dist[i] = np.inf
            if np.all(dist >= d_min[i]):
                pos[i] = trial
    atoms.positions = pos
    atoms.wrap()
    return atoms


def _slab(rng: np.random.Generator, elements: Sequence[str], kind: str) -> Atoms:
    """Random-occupancy fcc(111) or fcc(100) slab with vacuum, fully periodic cell."""
    sizes = _SLAB_SIZES[kind]
    size = sizes[rng.integers(len(sizes))]
    symbols = _occupy(rng, int(np.prod(size)), elements)
    a = _vegard(symbols) * _LATTICE_SCALES[rng.integers(len(_LATTICE_SCALES))]
    build = fcc111 if kind == "surface_111" else fcc100
    atoms = build("Cu", size=size, a=a, vacuum=float(rng.uniform(5.0, 7.0)))
    atoms.set_chemical_symbols(symbols)
    atoms.pbc = True
    atoms.info.pop("adsorbate_info", None)
    return _rattle(rng, atoms, float(rng.uniform(0.02, 0.05)))


def _vacancy(rng: np.random.Generator, elements: Sequence[str]) -> Atoms:
    atoms = _bulk_cell(rng, elements)
    n_remove = 1 if len(atoms) < 12 else int(rng.integers(1, 3))
    del atoms[sorted(rng.choice(len(atoms), size=n_remove, replace=False).tolist())]
    return _rattle(rng, atoms, float(rng.uniform(0.02, 0.05)))


_BUILDERS: dict[str, Callable[[np.random.Generator, Sequence[str]], Atoms]] = {
    "fcc": lambda rng, el: _bulk_cell(rng, el, "fcc"),
    "bcc": lambda rng, el: _bulk_cell(rng, el, "bcc"),
    "strained": lambda rng, el: _rattle(rng, _strain(rng, _bulk_cell(rng, el)), 0.02),
    "rattled": lambda rng, el: _rattle(rng, _bulk_cell(rng, el), float(rng.uniform(0.05, 0.15))),
    "liquid": _liquid,
    "surface_111": lambda rng, el: _slab(rng, el, "surface_111"),
    "surface_100": lambda rng, el: _slab(rng, el, "surface_100"),
    "vacancy": _vacancy,
}


def _min_distance(atoms: Atoms) -> float:
    d = neighbor_list("d", atoms, MIN_DISTANCE + 0.5)
    return float(d.min()) if len(d) else np.inf


def _label(atoms: Atoms) -> Atoms:
    """Attach EMT energy, forces and stress as a SinglePointCalculator."""
    atoms.calc = EMT()
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces()
    stress = atoms.get_stress()
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces, stress=stress)
    return atoms


def generate_structure(index: int, seed: int = 0, max_tries: int = 50) -> Atoms:
    """Structure ``index`` of the data set for ``seed``, EMT-labelled.

    Candidates with atoms closer than :data:`MIN_DISTANCE` or a force above :data:`MAX_FORCE`
    are redrawn (deterministically).
    """
    kind = _SCHEDULE[index % len(_SCHEDULE)]
    primary = ELEMENTS[index % len(ELEMENTS)]
    rng = np.random.default_rng([seed, index])
    for _ in range(max_tries):
        atoms = _BUILDERS[kind](rng, _pick_elements(rng, primary))
        if not 8 <= len(atoms) <= 40 or _min_distance(atoms) < MIN_DISTANCE:
            continue
        _label(atoms)
        if np.abs(atoms.get_forces()).max() > MAX_FORCE:
            continue
        atoms.info["config_type"] = kind
        return atoms
    raise RuntimeError(f"no sane {kind} structure after {max_tries} tries (seed {seed})")


def generate_emt_dataset(n_structures: int = 600, seed: int = 0) -> list[Atoms]:
    """Generate ``n_structures`` EMT-labelled alloy structures (deterministic in ``seed``)."""
    if n_structures < 0:
        raise ValueError(f"n_structures must be >= 0, got {n_structures}")
    return [generate_structure(i, seed) for i in range(n_structures)]


def write_emt_dataset(path: str | os.PathLike, n_structures: int = 600, seed: int = 0) -> Path:
    """Generate the data set and write it as extended XYZ (atomically); returns the path."""
    return _write_extxyz(generate_emt_dataset(n_structures, seed), path)


def _write_extxyz(structures: Sequence[Atoms], path: str | os.PathLike) -> Path:
    """Write extxyz via a temporary file in the same directory and a rename."""
    from ase.io import write

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with replacing(target, mode=0o644) as tmp:
        write(tmp, structures, format="extxyz")
    return target


def dataset_summary(structures: Sequence[Atoms]) -> str:
    """Counts per kind and per element (structures containing it / atoms), as text."""
    kinds = Counter(a.info.get("config_type", "?") for a in structures)
    atoms_per_element: Counter[str] = Counter()
    frames_per_element: Counter[str] = Counter()
    for a in structures:
        symbols = a.get_chemical_symbols()
        atoms_per_element.update(symbols)
        frames_per_element.update(set(symbols))
    n_atoms = sum(len(a) for a in structures)
    lines = [f"{len(structures)} structures, {n_atoms} atoms"]
    lines.append("kinds: " + ", ".join(f"{k} {kinds[k]}" for k in CONFIG_TYPES if k in kinds))
    lines.append(
        "elements (structures/atoms): "
        + ", ".join(
            f"{e} {frames_per_element[e]}/{atoms_per_element[e]}"
            for e in ELEMENTS
            if e in atoms_per_element
        )
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m nequip_sus2.data.emt", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", required=True, type=Path, help="output extxyz file")
    parser.add_argument("--n", type=int, default=600, help="number of structures (600)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    args = parser.parse_args(argv)
    structures = generate_emt_dataset(args.n, args.seed)
    target = _write_extxyz(structures, args.out)
    print(f"wrote {len(structures)} EMT structures (seed {args.seed}) to {target.resolve()}")
    print(dataset_summary(structures))


if __name__ == "__main__":
    main()
