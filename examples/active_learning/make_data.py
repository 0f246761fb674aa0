"""Data of the active-learning example: a Cu-Au alloy labelled with ASE's EMT calculator.

* ``train_300K.xyz``: the initial training set, snapshots of EMT Langevin MD at 300 K of random
  fcc Cu-Au cells (32 atoms, several compositions);
* ``test_1200K.xyz``: held-out structures from EMT MD at 1200 K (outside the initial data), on
  which ``nequip-sus2 learn --test-data`` reports the error of every iteration's model;
* ``start_1200K.xyz``: the starting cells of the learning loop's MD (fresh random fcc cells).

Usage: ``python make_data.py [--out DIR]`` (a few seconds).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from ase.md import velocitydistribution
from ase.md.langevin import Langevin

ELEMENTS = ("Cu", "Au")
LATTICE = {"Cu": 3.615, "Au": 4.078}


def random_cell(rng: np.random.Generator, fraction_au: float) -> Atoms:
    """A 32-atom cubic fcc cell, random occupancy, Vegard lattice constant."""
    n = 32
    symbols = np.where(rng.random(n) < fraction_au, "Au", "Cu").tolist()
    a = float(np.mean([LATTICE[s] for s in symbols]))
    atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat((2, 2, 2))
    atoms.set_chemical_symbols(symbols)
    return atoms


def emt_snapshots(
    atoms: Atoms, temperature: float, count: int, every: int, rng: np.random.Generator
) -> list[Atoms]:
    """``count`` EMT-labelled snapshots, every ``every`` 2-fs steps of Langevin MD at
    ``temperature`` (after ``every`` steps of equilibration)."""
    atoms = atoms.copy()
    atoms.calc = EMT()
    # ASE >= 3.29 renamed MaxwellBoltzmannDistribution to thermalize_momenta
    thermalize = getattr(
        velocitydistribution,
        "thermalize_momenta",
        velocitydistribution.MaxwellBoltzmannDistribution,
    )
    thermalize(atoms, temperature_K=temperature, rng=rng)
    dyn = Langevin(
        atoms, 2 * units.fs, temperature_K=temperature, friction=0.02, rng=rng, fixcm=False
    )
    dyn.run(every)
    out = []
    for _ in range(count):
        dyn.run(every)
        snap = atoms.copy()
        snap.calc = SinglePointCalculator(
            snap,
            energy=atoms.get_potential_energy(),
            forces=atoms.get_forces(),
            stress=atoms.get_stress(),
        )
        out.append(snap)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="output folder (.)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    fractions = (0.1, 0.3, 0.5, 0.7, 0.9)
    train = [s for x in fractions for s in emt_snapshots(random_cell(rng, x), 300, 8, 25, rng)]
    test = [s for x in fractions for s in emt_snapshots(random_cell(rng, x), 1200, 4, 50, rng)]
    start = [random_cell(rng, x) for x in (0.25, 0.5, 0.75)]
    write(args.out / "train_300K.xyz", train)
    write(args.out / "test_1200K.xyz", test)
    write(args.out / "start_1200K.xyz", start)
    print(f"wrote {len(train)} training, {len(test)} test and {len(start)} starting structures")


if __name__ == "__main__":
    main()
