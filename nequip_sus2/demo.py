"""The tutorial end to end (``nequip-sus2 demo``): data, training, test errors, compile, ASE MD.

Steps, all written under one output folder:

1. generate the 7-element EMT alloy data set (:mod:`nequip_sus2.data.emt`);
2. train SUS2 with ``nequip-train`` and the shipped ``tutorial.yaml`` (:func:`config_dir`);
3. report the test-set errors of the best checkpoint;
4. ``nequip-compile --mode aotinductor --target ase --modifiers enable_fused_moments``;
5. molecular dynamics with the compiled model in ASE (Langevin NVT, then NVE), reporting the
   temperature and the energy drift.

Run as ``nequip-sus2 demo -o demo_output`` or ``python -m nequip_sus2.demo -o demo_output``.
The full output of ``nequip-train`` and ``nequip-compile`` is kept in ``train.log`` and
``compile.log``; the terminal gets it without Python warnings, and the few known harmless
messages of the host libraries are replaced by a one-line note each (:data:`HARMLESS`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ._argtypes import at_least, positive

DESCRIPTION = (
    "The tutorial end to end, all in one output folder: generate a 7-element EMT alloy data "
    "set, train SUS2 with nequip-train and the shipped tutorial.yaml, report the test-set "
    "errors, compile the model for ASE with the fused CPU kernels (nequip-compile --mode "
    "aotinductor) and run NVT + NVE molecular dynamics with it. About 2-6 minutes on 2 CPU "
    "cores (add --epochs 2 --structures 100 for a quick check)."
)
EPILOG = (
    "Example: nequip-sus2 demo -o demo_output   (then see demo_output/summary.json; "
    "`nequip-sus2 demo --print-config-dir` gives the folder for nequip-train -cp)"
)
TUTORIAL_CONFIG = "tutorial.yaml"

#: Known harmless messages of the host libraries (regular expression -> why it is harmless). They
#: stay in the logs; on the terminal each is replaced by one note, printed once.
HARMLESS: dict[str, str] = {
    # torch/_inductor/package/package.py: nequip writes the list of custom-operator libraries
    # (here the SUS2 kernels) as an extra entry at the top of the .pt2 archive; torch's Python
    # reader rejects entries outside the model folder and falls back to the C++ loader
    r"Loading outdated pt2 file\. Please regenerate your package": (
        "PyTorch's 'Loading outdated pt2 file' warning is harmless: nequip keeps the name of "
        "the SUS2 kernel library in an extra entry of the .pt2 file, which PyTorch's newer "
        "reader does not expect, so PyTorch loads the model with its C++ loader instead"
    ),
    # torch/_inductor/ir.py: nequip's stress output takes the cell volume with torch.linalg.det
    r"aten\._linalg_det\.default is missing a c-shim implementation": (
        "Inductor's 'aten._linalg_det.default is missing a c-shim implementation' warning is "
        "harmless: the cell volume for the stress (one 3x3 determinant per structure) runs "
        "through its generic operator call, with the same result"
    ),
    # lightning ModelCheckpoint: Hydra has already written .hydra/ and its log to the run folder
    r"Checkpoint directory .* exists and is not empty": (
        "Lightning's 'Checkpoint directory ... exists and is not empty' warning is harmless: "
        "Hydra writes its config and log to the run folder before training starts"
    ),
}

# "path/to/file.py:123: SomeWarning: text" (the next, indented line shows the source line)
_PY_WARNING = re.compile(r"^\S.*:\d+: \w*Warning: ")


def config_dir() -> Path:
    """The folder of the configs shipped with the package (``nequip-train -cp``)."""
    return Path(__file__).resolve().parent / "configs"


def _tutorial_config() -> Path:
    path = config_dir() / TUTORIAL_CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: the shipped training config is missing; reinstall nequip-sus2"
        )
    return path


class _Notes:
    """Replace the :data:`HARMLESS` messages by one note each (printed once)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def match(self, text: str) -> str | None:
        for key in HARMLESS:
            if re.search(key, text):
                return key
        return None

    def note(self, key: str) -> None:
        if key not in self.seen:
            self.seen.add(key)
            print(f"  note: {HARMLESS[key]}", flush=True)


_NOTES = _Notes()


def _step(n: int, total: int, text: str) -> None:
    print(f"\n[{n}/{total}] {text}", flush=True)


def _run(cmd: list[str], log: Path) -> None:
    """Run a command, streaming its output to the terminal and to ``log``.

    Progress bars keep their carriage returns (they redraw in place); Python warnings and the
    :data:`HARMLESS` messages go only to the log.
    """
    print("  $ " + " ".join(cmd), flush=True)
    with open(log, "w", newline="") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        lines = io.TextIOWrapper(proc.stdout, encoding="utf-8", errors="replace", newline="")
        in_warning = False
        for line in lines:
            f.write(line)
            if in_warning and line[:1].isspace() and line.strip():
                continue  # the source line that Python prints under a warning
            in_warning = bool(_PY_WARNING.match(line))
            key = _NOTES.match(line)
            if key is not None:
                _NOTES.note(key)
            elif not in_warning:
                sys.stdout.write(line)
                sys.stdout.flush()
        if proc.wait() != 0:
            raise SystemExit(f"command failed (exit {proc.returncode}); full log: {log}")


class _HarmlessFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        key = _NOTES.match(record.getMessage())
        if key is None:
            return True
        _NOTES.note(key)
        return False


@contextmanager
def _quiet_pt2_loader() -> Iterator[None]:
    """Replace torch's 'Loading outdated pt2 file' warning by its note while loading."""
    logger = logging.getLogger("torch._inductor.package.package")
    filt = _HarmlessFilter()
    logger.addFilter(filt)
    try:
        yield
    finally:
        logger.removeFilter(filt)


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
    import numpy as np
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
    with _quiet_pt2_loader():
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (shared by ``nequip-sus2 demo`` and ``python -m nequip_sus2.demo``)."""
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("demo_output"),
        metavar="DIR",
        help="output folder (created if needed; default demo_output)",
    )
    parser.add_argument(
        "--out", dest="output", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--structures",
        type=at_least(int, 20),
        default=600,
        metavar="N",
        help="EMT structures to generate (80/10/10 %% train/val/test split; default 600)",
    )
    parser.add_argument(
        "--epochs",
        type=at_least(int, 1),
        default=None,
        metavar="N",
        help="training epochs (default: max_epochs of tutorial.yaml)",
    )
    parser.add_argument(
        "--nvt-steps", type=at_least(int, 0), default=300, metavar="N", help="default 300"
    )
    parser.add_argument(
        "--nve-steps",
        type=at_least(int, 20),
        default=700,
        metavar="N",
        help="default 700 (the energy drift is fitted to every 10th step)",
    )
    parser.add_argument(
        "--temperature",
        type=positive(float),
        default=600.0,
        metavar="K",
        help="MD temperature in K (default 600)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the config used and the commands of each step, run nothing",
    )
    parser.add_argument(
        "--print-config-dir",
        action="store_true",
        help="print the folder of the shipped configs (for nequip-train -cp) and exit",
    )


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG)
    add_arguments(parser)
    return parser


def _commands(
    out: Path, data: Path, compiled: Path, epochs: int | None
) -> tuple[list[str], list[str]]:
    """The ``nequip-train`` and ``nequip-compile`` command lines of steps 2 and 4."""
    train = [
        sys.executable, "-m", "nequip.scripts.train", "-cp", str(config_dir()),
        "-cn", TUTORIAL_CONFIG, f"data_file={data}", f"hydra.run.dir={out / 'train'}",
    ]  # fmt: skip
    if epochs is not None:
        train.append(f"max_epochs={epochs}")
    compile_ = [
        sys.executable, "-m", "nequip.scripts.compile", str(out / "train" / "best.ckpt"),
        str(compiled), "--mode", "aotinductor", "--device", "cpu",
        "--target", "ase", "--modifiers", "enable_fused_moments",
    ]  # fmt: skip
    return train, compile_


def run(args: argparse.Namespace) -> dict | None:
    """Run the demo for parsed :func:`add_arguments` options; returns the summary.

    Raises ``FileNotFoundError`` when the shipped config is missing and ``ValueError`` when the
    output path exists but is not a folder (both before anything is written).
    """
    if args.print_config_dir:
        _tutorial_config()
        print(config_dir())
        return None
    config = _tutorial_config()
    out = args.output.resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"-o {args.output}: exists and is not a folder")
    data = out / "emt_alloy.xyz"
    compiled = out / "sus2_tutorial.nequip.pt2"
    train_cmd, compile_cmd = _commands(out, data, compiled, args.epochs)
    if args.dry_run:
        print(f"config: {config}")
        print(f"[1/5] python -m nequip_sus2.data.emt --out {data} --n {args.structures} --seed 0")
        print("[2/5] " + " ".join(train_cmd))
        print("[3/5] test-set errors from the metrics.csv of nequip-train")
        print("[4/5] " + " ".join(compile_cmd))
        print(f"[5/5] ASE MD: {args.nvt_steps} NVT + {args.nve_steps} NVE steps")
        return None

    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    total = 5

    from .data.emt import ELEMENTS, write_emt_dataset

    _step(1, total, f"generating {args.structures} EMT alloy structures")
    write_emt_dataset(data, n_structures=args.structures, seed=0)
    print(f"  wrote {data}")

    _step(2, total, f"training SUS2 with nequip-train ({TUTORIAL_CONFIG})")
    train_dir = out / "train"
    _run(train_cmd, out / "train.log")

    _step(3, total, "test-set errors of the best checkpoint")
    metrics = test_errors(next(train_dir.glob("metrics/version_*/metrics.csv")))
    print(
        f"  energy MAE {1000 * metrics['per_atom_energy_mae']:.2f} meV/atom, "
        f"force MAE {1000 * metrics['forces_mae']:.1f} meV/A, "
        f"stress MAE {1000 * metrics['stress_mae']:.2f} meV/A^3"
    )

    _step(4, total, "compiling for ASE with the fused CPU kernels (nequip-compile, ~2 min)")
    _run(compile_cmd, out / "compile.log")

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


def main(argv: list[str] | None = None) -> dict | None:
    """``python -m nequip_sus2.demo``: the same options as ``nequip-sus2 demo``."""
    parser = build_parser(prog="python -m nequip_sus2.demo")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (OSError, ValueError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
