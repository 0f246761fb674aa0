"""Command line of ``nequip-sus2 bench`` (also ``python -m nequip_sus2.bench``).

Kept free of heavy imports: torch, nequip and matplotlib load only when the command runs.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from typing import Any

from .options import BenchOptions, Flag

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


@dataclass(frozen=True)
class _Beside:
    """A command-line-only argument, added right after the arguments of a :class:`BenchOptions`
    field; ``exclusive``: given instead of that field."""

    names: tuple[str, ...]
    kwargs: Mapping[str, Any]
    exclusive: bool = False


#: ``--out``: the former spelling of ``-o/--output``; ``--type-names-file``: the species from a
#: file; ``--quick``: the cheap parts only
_BESIDE = {
    "out_dir": _Beside(("--out",), {"dest": "out_dir", "help": argparse.SUPPRESS}, exclusive=True),
    "type_names": _Beside(
        ("--type-names-file",),
        {"metavar": "FILE", "help": "YAML/JSON file with the species list ([Cu, Se], 'Cu Se', "
         "{type_names: [...]})"},
        exclusive=True,
    ),
    "plots": _Beside(
        ("--quick",),
        {"action": "store_true",
         "help": "accuracy and SUS2 parts only (same as --skip-eos --skip-md --skip-cost)"},
    ),
}  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of every :class:`BenchOptions` field with a :class:`Flag`, in field order
    (defaults, help and argument groups from the fields), and the command-line-only ones."""
    groups: dict[str | None, Any] = {None: p}
    for f in fields(BenchOptions):
        flag: Flag | None = f.metadata.get("flag")
        if flag is None:
            continue
        if flag.group not in groups:
            groups[flag.group] = p.add_argument_group(flag.group)
        box = groups[flag.group]
        beside = _BESIDE.get(f.name)
        exclusive = beside is not None and beside.exclusive
        if exclusive:
            box = box.add_mutually_exclusive_group(required=flag.required)
        kwargs = dict(flag.kwargs)
        if f.default is not MISSING:  # argparse appends to (a copy of) a list default
            kwargs["default"] = list(f.default) if isinstance(f.default, tuple) else f.default
        if flag.names[0].startswith("-"):
            kwargs["dest"] = f.name
            if flag.required and not exclusive:
                kwargs["required"] = True
        box.add_argument(*flag.names, help=flag.help_text(f.default), **kwargs)
        if beside is not None:
            box.add_argument(*beside.names, **beside.kwargs)


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
            from ..io.species import read_type_names
        except ImportError:  # pragma: no cover - io.species is part of the package
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


def options_from_args(args, argv: Sequence[str] | None = None) -> BenchOptions:
    """The :class:`BenchOptions` of parsed arguments (``argv``: the command line shown in the
    report; default ``sys.argv``)."""
    values = {f.name: getattr(args, f.name) for f in fields(BenchOptions) if "flag" in f.metadata}
    values["type_names"] = _type_names(args)
    if args.quick:
        values.update(eos=False, md=False, cost=False)
    values["command"] = "nequip-sus2 bench " + shlex.join(
        list(argv) if argv is not None else sys.argv[2:] if len(sys.argv) > 2 else []
    )
    return BenchOptions(**values)


def run_from_args(args, argv: Sequence[str] | None = None) -> int:
    """Run the benchmark for parsed arguments; prints where the report went."""
    from .runner import run_bench  # heavy: torch, nequip and matplotlib load only here

    _print_summary(run_bench(options_from_args(args, argv)))
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
