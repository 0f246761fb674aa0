"""Command line of ``nequip-sus2 bench`` (also ``python -m nequip_sus2.bench``).

Kept free of heavy imports: torch, nequip and matplotlib load only when the command runs.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

DESCRIPTION = (
    "Benchmark NequIP-framework models (SUS2, NequIP, Allegro; checkpoints, packages, compiled "
    "models, trained .mtp files) side by side on the same data: accuracy (energy/force/stress "
    "MAE and RMSE overall, per element and per configuration group; parity plots and error "
    "histograms), physical checks (equation of state with a Birch-Murnaghan fit, short NVE MD), "
    "cost (parameters, throughput and peak memory against system size, eager and compiled) and, "
    "for SUS2 models, the learned universal radial curves, per-species energy scale/shift and "
    "the (alpha, r0) maps. Writes report.md, results.json, figures/ and predictions/ to the "
    "-o/--output directory."
)
EPILOG = (
    "Example: nequip-sus2 bench alloy.mtp --type-names-file alloy_species.yaml --data test.cfg "
    "-o bench_alloy --skip-md --skip-cost\n"
    "Example: nequip-sus2 bench SUS2=sus2/best.ckpt NequIP=nequip/best.ckpt "
    "Allegro=allegro.nequip.zip --data test.xyz --eos-structure cu_ev.xyz -o bench_emt\n"
    "Docs: docs/metrology.md"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="model file: .ckpt, .nequip.zip, .nequip.pt2 (nequip-compile --target ase) or a "
        "trained .mtp (needs --type-names); NAME=PATH sets the name shown in the report",
    )
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="FILE",
        help="labelled structures: .cfg (needs the species of its type indices) or any file ASE "
        "reads (extxyz, ...); repeat for several files",
    )
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("-o", "--output", dest="out", metavar="DIR", help="output directory")
    out.add_argument("--out", dest="out", help=argparse.SUPPRESS)  # the former spelling
    names = p.add_mutually_exclusive_group()
    names.add_argument(
        "--type-names",
        nargs="+",
        metavar="NAME",
        help="species of .cfg type indices 0, 1, ... (and of .mtp models); default for .cfg "
        "data: the models' type names when all models share them",
    )
    names.add_argument(
        "--type-names-file",
        metavar="FILE",
        help="YAML/JSON file with the species list ([Cu, Se], 'Cu Se', {type_names: [...]})",
    )
    p.add_argument(
        "--model-dtype",
        choices=("float64", "float32"),
        default="float64",
        help="precision of models built from .mtp files (default float64)",
    )
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, ...")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--group-key",
        default=None,
        help="info key of the configuration group (extxyz config_type/group, .cfg Feature key); "
        "default: the first of config_type, group, config_group, Feature present",
    )
    p.add_argument(
        "--max-frames", type=int, default=None, help="at most N structures per data file"
    )
    p.add_argument("--batch-size", type=int, default=16, help="structures per model call (16)")

    skip = p.add_argument_group("parts")
    for part in ("accuracy", "eos", "md", "cost", "sus2", "plots"):
        skip.add_argument(f"--skip-{part}", action="store_true", help=f"skip the {part} part")
    skip.add_argument(
        "--quick",
        action="store_true",
        help="accuracy and SUS2 parts only (same as --skip-eos --skip-md --skip-cost)",
    )

    e = p.add_argument_group("equation of state")
    e.add_argument(
        "--eos-structure",
        action="append",
        default=[],
        metavar="FILE",
        help="structure file for the EOS; several frames of one composition with energies at "
        "different volumes are a reference E(V) curve (repeatable)",
    )
    e.add_argument(
        "--eos-auto",
        nargs="*",
        default=["data"],
        choices=("data", "fcc", "bcc"),
        help="automatic EOS structures: data (lowest reference energy per atom), fcc, bcc "
        "(default: data; give no value for none)",
    )
    e.add_argument("--eos-elements", nargs="+", default=None, help="elements of fcc/bcc")
    e.add_argument("--eos-points", type=int, default=9, help="points per E(V) scan (9)")
    e.add_argument("--eos-strain", type=float, default=0.05, help="largest linear strain (0.05)")

    m = p.add_argument_group("molecular dynamics")
    m.add_argument("--md-structure", default=None, help="starting structure (default: the "
                   "data structure with the lowest energy per atom)")  # fmt: skip
    m.add_argument("--md-steps", type=int, default=200, help="NVE steps (200)")
    m.add_argument("--md-timestep", type=float, default=1.0, help="time step, fs (1.0)")
    m.add_argument("--md-temperature", type=float, default=300.0, help="initial T, K (300)")
    m.add_argument("--md-min-atoms", type=int, default=32, help="repeat the cell to >= N (32)")
    m.add_argument("--md-seed", type=int, default=0, help="velocity seed (0)")

    c = p.add_argument_group("cost")
    c.add_argument(
        "--sizes",
        nargs="+",
        type=int,
        default=None,
        help="system sizes in atoms (default 64 256 1024; e.g. 100 1000 10000 on a GPU)",
    )
    c.add_argument(
        "--compile",
        action="store_true",
        help="also AOT-compile each eager model (nequip-compile --target ase; minutes on a CPU) "
        "and measure it",
    )
    c.add_argument("--cost-min-time", type=float, default=1.0, help="seconds per size (1.0)")
    c.add_argument("--no-memory", action="store_true", help="do not measure peak memory")

    s = p.add_argument_group("SUS2")
    s.add_argument("--pairs", nargs="+", default=None, metavar="A-B",
                   help="species pairs of the radial-curve plot (default: from the data)")  # fmt: skip
    s.add_argument("--max-curves", type=int, default=6, help="radial functions shown (6)")

    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--strict", action="store_true", help="stop at the first error")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``bench`` on an ``argparse`` subparsers object (``nequip-sus2``'s)."""
    p = subparsers.add_parser(
        "bench",
        help="benchmark, visualise and compare models (SUS2, NequIP, Allegro) in one report",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run_from_args)
    return p


def _type_names(args) -> list[str] | None:
    if args.type_names_file:
        try:
            from ..interop import read_type_names
        except ImportError:  # pragma: no cover - interop is part of the package
            read_type_names = None
        if read_type_names is not None:
            return read_type_names(args.type_names_file)
        import yaml

        with open(args.type_names_file) as f:
            value = yaml.safe_load(f)
        if isinstance(value, dict) and "type_names" in value:
            value = value["type_names"]
        return value.split() if isinstance(value, str) else [str(v) for v in value]
    return args.type_names


def run_from_args(args, argv: Sequence[str] | None = None) -> int:
    """Run the benchmark for parsed arguments; prints where the report went."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from .runner import run_bench

    quick = args.quick
    command = "nequip-sus2 bench " + shlex.join(
        list(argv) if argv is not None else sys.argv[2:] if len(sys.argv) > 2 else []
    )
    res = run_bench(
        args.models,
        args.data,
        args.out,
        type_names=_type_names(args),
        model_dtype=args.model_dtype,
        device=args.device,
        group_key=args.group_key,
        max_frames=args.max_frames,
        batch_size=args.batch_size,
        accuracy=not args.skip_accuracy,
        eos=not (args.skip_eos or quick),
        md=not (args.skip_md or quick),
        cost=not (args.skip_cost or quick),
        sus2=not args.skip_sus2,
        plots=not args.skip_plots,
        eos_structures=args.eos_structure,
        eos_auto=args.eos_auto,
        eos_elements=args.eos_elements,
        eos_points=args.eos_points,
        eos_strain=args.eos_strain,
        md_structure=args.md_structure,
        md_steps=args.md_steps,
        md_timestep_fs=args.md_timestep,
        md_temperature_K=args.md_temperature,
        md_min_atoms=args.md_min_atoms,
        md_seed=args.md_seed,
        **({"sizes": args.sizes} if args.sizes else {}),
        compile=args.compile,
        cost_min_time=args.cost_min_time,
        cost_memory=not args.no_memory,
        sus2_pairs=args.pairs,
        sus2_max_curves=args.max_curves,
        progress=False if args.no_progress else None,
        strict=args.strict,
        command=command,
    )
    _print_summary(res)
    return 0


def _print_summary(res) -> None:
    r = res.results
    acc = r.get("accuracy") or {}
    for m in r["models"]:
        n = m["name"]
        o = (acc.get(n) or {}).get("overall") or {}
        parts = [f"{n} ({m['kind']}, {m['format']})"]
        for q, label, unit in (("energy_per_atom", "E", "meV/atom"), ("forces", "F", "meV/A"),
                               ("stress", "S", "meV/A^3")):  # fmt: skip
            if o.get(q):
                parts.append(f"{label} RMSE {1000 * o[q]['rmse']:.4g} {unit}")
        print("  ".join(parts))
    for e in r.get("errors") or []:
        print(f"problem: {e}", file=sys.stderr)
    print(f"wrote {res.report} and {res.json}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nequip-sus2 bench",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point (``python -m nequip_sus2.bench``); errors exit with status 2."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args, argv)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"nequip-sus2 bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
