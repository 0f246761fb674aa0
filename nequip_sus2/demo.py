"""The tutorial end to end (``make demo``): data, training, test errors, compile, ASE MD.

Steps, all written under one output folder:

1. generate the 7-element EMT alloy data set (:mod:`nequip_sus2.data.emt`);
2. train SUS2 with ``nequip-train`` and ``configs/tutorial.yaml``;
3. report the test-set errors of the best checkpoint;
4. ``nequip-compile --mode aotinductor --target ase --modifiers enable_fused_moments``;
5. molecular dynamics with the compiled model in ASE (Langevin NVT, then NVE), reporting the
   temperature and the energy drift.

Run as ``python -m nequip_sus2.demo --out demo_output``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _step(n: int, total: int, text: str) -> None:
    print(f"\n[{n}/{total}] {text}", flush=True)


def _run(cmd: list[str], log: Path) -> None:
    """Run a command, streaming its output to the terminal and to ``log``."""
    print("  $ " + " ".join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(line)
            if "Warning" not in line and "warnings.warn" not in line:
                sys.stdout.write(line)
        if proc.wait() != 0:
            raise SystemExit(f"command failed (exit {proc.returncode}); full log: {log}")


def test_errors(metrics_csv: Path) -> dict[str, float]:
    """The ``test0_epoch/*`` metrics that ``nequip-train`` logged after training."""
    with open(metrics_csv) as f:
        rows = [r for r in csv.DictReader(f) if r.get("test0_epoch/forces_mae")]
    if not rows:
        raise SystemExit(f"no test metrics in {metrics_csv}")
    prefix = "test0_epoch/"
    return {k[len(prefix) :]: float(v) for k, v in rows[-1].items() if k.startswith(prefix) and v}


def run_md(
    compiled: Path,
    type_names: list[str],
    nvt_steps: int,
    nve_steps: int,
    temperature: float,
    seed: int,
) -> dict[str, float]:
    """NVT (Langevin) then NVE (velocity Verlet) of a 256-atom random fcc alloy, 1 fs steps."""
    from ase import units
    from ase.build import bulk
    from ase.md import velocitydistribution
    from ase.md.langevin import Langevin
    from ase.md.verlet import VelocityVerlet
    from nequip.integrations.ase import NequIPCalculator

    from .data.emt import FCC_LATTICE_CONSTANTS

    rng = np.random.default_rng(seed)
    symbols = rng.choice(type_names, size=256)
    a = float(np.mean([FCC_LATTICE_CONSTANTS[s] for s in symbols]))
    atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat((4, 4, 4))
    atoms.set_chemical_symbols(list(symbols))
    atoms.calc = NequIPCalculator.from_compiled_model(
        str(compiled), device="cpu", chemical_species_to_atom_type_map=True
    )
    # ASE >= 3.29 renamed MaxwellBoltzmannDistribution (deprecated) to thermalize_momenta
    thermalize = getattr(
        velocitydistribution,
        "thermalize_momenta",
        velocitydistribution.MaxwellBoltzmannDistribution,
    )
    thermalize(atoms, temperature_K=temperature, rng=rng)
    dt = 1.0 * units.fs
    # fixcm=True is deprecated (not exact NVT sampling); the total momentum stays ~0 anyway
    nvt = Langevin(atoms, dt, temperature_K=temperature, friction=0.02, rng=rng, fixcm=False)
    t0 = time.perf_counter()
    nvt.run(nvt_steps)
    nve = VelocityVerlet(atoms, dt)
    energies, temps = [], []

    def record() -> None:
        energies.append(atoms.get_potential_energy() + atoms.get_kinetic_energy())
        temps.append(atoms.get_temperature())

    nve.attach(record, interval=10)
    nve.run(nve_steps)
    wall = time.perf_counter() - t0
    energies = np.array(energies) / len(atoms)
    times_ps = np.arange(len(energies)) * 10 * 1e-3
    slope = float(np.polyfit(times_ps, energies, 1)[0])
    return {
        "atoms": len(atoms),
        "nvt_steps": nvt_steps,
        "nve_steps": nve_steps,
        "nve_mean_temperature_K": float(np.mean(temps)),
        "nve_energy_drift_eV_per_atom_per_ps": slope,
        "nve_energy_fluctuation_eV_per_atom": float(np.std(energies)),
        "md_steps_per_second": (nvt_steps + nve_steps) / wall,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo_output"))
    parser.add_argument("--structures", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=None, help="override max_epochs")
    parser.add_argument("--nvt-steps", type=int, default=300)
    parser.add_argument("--nve-steps", type=int, default=700)
    parser.add_argument("--temperature", type=float, default=600.0)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    total = 5

    from .data.emt import ELEMENTS, write_emt_dataset

    _step(1, total, f"generating {args.structures} EMT alloy structures")
    data = write_emt_dataset(out / "emt_alloy.xyz", n_structures=args.structures, seed=0)
    print(f"  wrote {data}")

    _step(2, total, "training SUS2 with nequip-train (configs/tutorial.yaml)")
    train_dir = out / "train"
    cmd = [
        sys.executable, "-m", "nequip.scripts.train", "-cp", str(CONFIGS), "-cn", "tutorial.yaml",
        f"data_file={data}", f"hydra.run.dir={train_dir}",
    ]  # fmt: skip
    if args.epochs is not None:
        cmd.append(f"max_epochs={args.epochs}")
    _run(cmd, out / "train.log")

    _step(3, total, "test-set errors of the best checkpoint")
    metrics = test_errors(next(train_dir.glob("metrics/version_*/metrics.csv")))
    print(
        f"  energy MAE {1000 * metrics['per_atom_energy_mae']:.2f} meV/atom, "
        f"force MAE {1000 * metrics['forces_mae']:.1f} meV/A, "
        f"stress MAE {1000 * metrics['stress_mae']:.2f} meV/A^3"
    )

    _step(4, total, "compiling for ASE with the fused CPU kernels (nequip-compile, ~2 min)")
    compiled = out / "sus2_tutorial.nequip.pt2"
    cmd = [
        sys.executable, "-m", "nequip.scripts.compile", str(train_dir / "best.ckpt"),
        str(compiled), "--mode", "aotinductor", "--device", "cpu", "--target", "ase",
        "--modifiers", "enable_fused_moments",
    ]  # fmt: skip
    _run(cmd, out / "compile.log")

    _step(5, total, f"ASE MD, 256 atoms: {args.nvt_steps} NVT + {args.nve_steps} NVE steps")
    md = run_md(compiled, list(ELEMENTS), args.nvt_steps, args.nve_steps, args.temperature, seed=0)
    print(
        f"  NVE mean temperature {md['nve_mean_temperature_K']:.0f} K, energy drift "
        f"{1000 * md['nve_energy_drift_eV_per_atom_per_ps']:.2e} meV/atom/ps, "
        f"{md['md_steps_per_second']:.1f} steps/s"
    )

    summary = {
        "test_errors": metrics,
        "md": md,
        "compiled_model": str(compiled),
        "checkpoint": str(train_dir / "best.ckpt"),
        "minutes": (time.perf_counter() - t_start) / 60,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nDone in {summary['minutes']:.1f} min. Everything is in {out}")
    print(f"  summary: {out / 'summary.json'}; compiled model: {compiled}")
    return summary


if __name__ == "__main__":
    main()
