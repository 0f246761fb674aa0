"""How ``pair_style sus2`` scales: time per atom-step and memory from 10^3 to 10^6 atoms, and the
NVE energy drift of a long run.

Two measurements with one compiled model (``--target pair_sus2`` with the fused CPU kernels):

* scale: NVE of a random fcc alloy (LAMMPS ``create_atoms``, no data file) for each size, on 1
  and 2 MPI ranks (1 thread each); prints the loop time per atom-step and the largest resident
  set size of rank 0 (LAMMPS ``info memory``; with 2 ranks each holds about half the atoms);
* drift: NVE of a smaller cell for ``--drift-ps`` picoseconds on ``--drift-ranks`` ranks; prints
  the total-energy drift (slope of a least-squares line) in meV/atom/ps and the largest
  deviation from the first value.

Default model: the published Alloy model (float64), imported from ``--mtp``. Example::

    python benchmarks/lammps_scale.py --mtp PATH/alloy.mtp --type-names-file alloy_species.yaml \\
        --species Cu Ag Au --lattice 3.9 --sizes 7 14 30 63
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lammps_throughput import compile_models, machine  # noqa: E402


def lammps_input(
    plugin: Path,
    model: Path,
    species: list[str],
    lattice: float,
    reps: int,
    steps: int,
    thermo: int,
    relax: bool = False,
    seed: int = 12345,
) -> str:
    """An NVE run of a ``reps^3`` fcc supercell (4 atoms per cell) with random species, from
    300 K; ``relax``: relax the positions first (conjugate gradient), so that the run starts near
    equilibrium instead of heating up from the random displacements."""
    from ase.data import atomic_masses, atomic_numbers

    n = len(species)
    lines = [
        f"plugin load {plugin}",
        "units metal",
        "atom_style atomic",
        f"lattice fcc {lattice}",
        f"region box block 0 {reps} 0 {reps} 0 {reps}",
        f"create_box {n} box",
        "create_atoms 1 box",
    ]
    # equal fractions of every species: type 1 is what is left after the others are set
    for k in range(2, n + 1):
        lines.append(f"set type 1 type/fraction {k} {1.0 / (n - k + 2):.12g} {seed + k}")
    for k, symbol in enumerate(species, start=1):
        lines.append(f"mass {k} {atomic_masses[atomic_numbers[symbol]]:.6f}")
    lines += [
        f"displace_atoms all random 0.05 0.05 0.05 {seed}",
        "pair_style sus2",
        f"pair_coeff * * {model.resolve()} {' '.join(species)}",
        *(["minimize 0 1e-4 200 2000", "reset_timestep 0"] if relax else []),
        f"velocity all create 300 {seed} mom yes rot yes dist gaussian",
        "timestep 0.001",
        "fix 1 all nve",
        "thermo_style custom step temp pe etotal press",
        "thermo_modify format float %.15g",
        f"thermo {thermo}",
        "run 2",
        f"run {steps}",
        "info memory",
    ]
    return "\n".join(lines) + "\n"


def loop_time(output: str) -> float:
    return float(re.findall(r"Loop time of (\S+) on", output)[-1])


def max_rss_mb(output: str) -> float | None:
    found = re.findall(r"Maximum resident set size\s*:\s*([\d.]+)\s*Mbyte", output)
    return float(found[-1]) if found else None


def thermo_rows(output: str) -> np.ndarray:
    """The numeric rows (step temp pe etotal press) of the last thermo block."""
    blocks = output.split("Step          Temp")
    rows = []
    for line in blocks[-1].splitlines()[1:]:
        parts = line.split()
        if len(parts) != 5:
            break
        try:
            rows.append([float(x) for x in parts])
        except ValueError:
            break
    return np.asarray(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--mtp", help="published .mtp model (with --type-names/--type-names-file)")
    src.add_argument("--model", help="checkpoint or .nequip.zip package")
    p.add_argument("--type-names", nargs="+", help="species of the .mtp model's type indices")
    p.add_argument("--type-names-file", help="YAML/JSON file with the .mtp model's species")
    p.add_argument("--species", nargs="+", default=["Cu", "Ag", "Au"], help="alloy elements")
    p.add_argument("--lattice", type=float, default=3.9, help="fcc lattice constant (A)")
    p.add_argument(
        "--sizes", type=int, nargs="+", default=[7, 14, 30, 63], help="fcc cells per edge"
    )
    p.add_argument("--steps", type=int, default=100, help="timed MD steps per size")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="MPI ranks (1 2)")
    p.add_argument("--drift-size", type=int, default=8, help="cells per edge (8: 2,048 atoms)")
    p.add_argument("--drift-ps", type=float, default=10.0, help="NVE length (ps, 1 fs steps)")
    p.add_argument("--drift-ranks", type=int, default=2)
    p.add_argument("--skip-scale", action="store_true")
    p.add_argument("--skip-drift", action="store_true")
    p.add_argument("--workdir", default="bench_output/lammps_scale")
    args = p.parse_args(argv)

    from nequip_sus2.io.mtp_model import import_mtp_to_package
    from nequip_sus2.io.species import check_type_names, read_type_names
    from nequip_sus2.lammps.build import build_plugin
    from nequip_sus2.lammps.run import run_lammps

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.mtp:
        if args.type_names_file:
            names = read_type_names(args.type_names_file)
        elif args.type_names:
            names = check_type_names(args.type_names, "--type-names")
        else:
            p.error("--mtp needs --type-names or --type-names-file")
        stem = Path(args.mtp).stem
        package = workdir / f"{stem}.nequip.zip"
        if not package.is_file():
            import_mtp_to_package(args.mtp, names, package)
    else:
        package, stem = Path(args.model), Path(args.model).stem
    model = compile_models(package, workdir, stem, ["enable_fused_moments"], ("pair_sus2",))[
        "pair_sus2"
    ]
    plugin = build_plugin()
    print(f"model: {package.name} (pair_sus2, fused kernels)\nmachine: {machine()}\n", flush=True)

    if not args.skip_scale:
        # memory per atom: the growth of rank 0's resident set from the smallest size (the
        # libraries, torch and the model take a few hundred MB at any size)
        print(
            "| atoms | ranks | us/atom-step | max RSS of rank 0 (MB) | "
            "growth from the smallest size (MB per 1,000 atoms of the rank) |"
        )
        print("|---|---|---|---|---|")
        first: dict[int, tuple[int, float]] = {}
        for reps in args.sizes:
            atoms = 4 * reps**3
            for ranks in args.ranks:
                text = lammps_input(
                    plugin, model, args.species, args.lattice, reps, args.steps, args.steps
                )
                run = run_lammps(
                    text, workdir / f"scale_{reps}_{ranks}", ranks=ranks, threads=1, timeout=7200
                )
                us = loop_time(run.output) / (atoms * args.steps) * 1e6
                rss = max_rss_mb(run.output)
                if rss is None:
                    rss_text = growth = "-"
                else:
                    rss_text = f"{rss:.0f}"
                    base_atoms, base_rss = first.setdefault(ranks, (atoms, rss))
                    growth = "-"
                    if atoms > base_atoms:
                        growth = f"{(rss - base_rss) / ((atoms - base_atoms) / ranks) * 1e3:.2f}"
                print(f"| {atoms:,} | {ranks} | {us:.2f} | {rss_text} | {growth} |", flush=True)

    if not args.skip_drift:
        steps = int(round(args.drift_ps * 1000))
        atoms = 4 * args.drift_size**3
        text = lammps_input(
            plugin,
            model,
            args.species,
            args.lattice,
            args.drift_size,
            steps,
            max(steps // 200, 1),
            relax=True,
        )
        run = run_lammps(text, workdir / "drift", ranks=args.drift_ranks, threads=1, timeout=7200)
        rows = thermo_rows(run.output)
        time_ps = (rows[:, 0] - rows[0, 0]) * 1e-3
        etot = rows[:, 3] / atoms * 1e3  # meV/atom
        slope = np.polyfit(time_ps, etot, 1)[0]
        print(
            f"\nNVE drift, {atoms:,} atoms, {args.drift_ps:g} ps at 1 fs, {args.drift_ranks} "
            f"ranks: {slope:.3e} meV/atom/ps (largest deviation from the start "
            f"{np.max(np.abs(etot - etot[0])):.3e} meV/atom; T {rows[-1, 1]:.0f} K at the end)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
