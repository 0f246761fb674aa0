"""``nequip-sus2 active-set`` and ``nequip-sus2 select-add``: the MaxVol active set of a model
on its training data written with the extrapolation grade, and the candidate structures that
extend it (:mod:`nequip_sus2.active_set`).

``nequip-sus2`` (:func:`nequip_sus2.cli.main`) hands both commands the rest of its command line;
they parse it with a parser whose mistakes are one line ``nequip-sus2 COMMAND: error: ...``
(exit status 2), and every other error is reported by :func:`nequip_sus2.cli.main` like those
of the other subcommands (:func:`nequip_sus2.cli.active_set_main` and
:func:`~nequip_sus2.cli.select_add_main` run them with an argument list).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from ase.data import atomic_numbers
from ase.io import write as ase_write
from ase.io.formats import filetype, ioformats

from ._argtypes import positive
from ._console import UsageError, one_line
from ._files import replacing
from .active_set import _graph_model, _read_structures, select_add
from .graded_model import check_graded_output, write_model_with_grade
from .io.cfg import write_cfg
from .nn.extrapolation import GRADE_MODULE_NAME, moments_networks
from .package import PACKAGE_SUFFIX, ensure_global_state, load_model, quiet_packaging

__all__ = ["run_active_set", "run_select_add"]


# ----------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, with command line mistakes reported in one line like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _new_parser(command: str, description: str, example: str) -> _ArgumentParser:
    return _ArgumentParser(
        prog=f"nequip-sus2 {command}",
        description=description,
        epilog=example,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _add_common(parser: argparse.ArgumentParser, output_help: str) -> None:
    parser.add_argument("-o", "--output", metavar="OUT", help=f"{output_help} (required)")
    parser.add_argument("--out", dest="output", help=argparse.SUPPRESS)  # older spelling
    parser.add_argument(
        "--tol", type=positive(float), default=1e-3, help="MaxVol tolerance (default 1e-3)"
    )
    parser.add_argument(
        "--batch-size",
        type=positive(int),
        default=8,
        help="structures per batch (default 8); the results do not depend on it",
    )
    parser.add_argument(
        "--species-map",
        nargs="+",
        metavar="SYMBOL=TYPE",
        help="chemical symbol -> model type name for ASE input (default: identity)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _parse(parser: _ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.output is None:
        parser.error("the following arguments are required: -o/--output")
    return args


def _species_map(values: Sequence[str] | None, type_names: Sequence[str]) -> dict[str, str] | None:
    """``--species-map Cu=Cu_type ...`` checked against chemical symbols and the model types."""
    if not values:
        return None
    out = {}
    for item in values:
        symbol, sep, name = item.partition("=")
        if not sep or not symbol or not name:
            raise UsageError(f"argument --species-map: expected SYMBOL=TYPE, got {item!r}")
        if symbol not in atomic_numbers:
            raise UsageError(
                f"argument --species-map: {symbol!r} in {item!r} is not a chemical symbol"
            )
        if name not in type_names:
            raise UsageError(
                f"argument --species-map: {name!r} in {item!r} is not a type of the model "
                f"({' '.join(type_names)})"
            )
        out[symbol] = name
    return out


# ----------------------------------------------------------------------------------------------
# inputs and outputs
# ----------------------------------------------------------------------------------------------


def _load_sus2_model(path: str, need_grade: bool = False):
    """The eager model of checkpoint or package ``path``, refused (with a :class:`UsageError`
    naming the file) if it is missing, not a model, not a SUS2 model or, with ``need_grade``,
    without an extrapolation grade."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file")
    if not path.endswith((".ckpt", PACKAGE_SUFFIX)):
        raise UsageError(
            f"{path}: the model must be a checkpoint (.ckpt) or a package ({PACKAGE_SUFFIX})"
        )
    try:
        with quiet_packaging():
            model = load_model(path)
    except Exception as e:  # torch/zip/pickle/hydra: anything means the file is not a model
        raise UsageError(f"{path}: cannot load the model ({one_line(e)})") from e
    try:
        gm = _graph_model(model)
        moments_networks(gm)
    except TypeError as e:
        raise UsageError(f"{path}: {e}") from e
    if need_grade and not any(n.split(".")[-1] == GRADE_MODULE_NAME for n, _ in gm.named_modules()):
        raise UsageError(
            f"{path}: the model has no extrapolation grade; add one with `nequip-sus2 active-set`"
        )
    return model


def _read_data(path: str, type_names: Sequence[str]) -> list:
    try:
        return _read_structures(path, type_names)
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror or e}") from e


def _structure_error(path: str, error: ValueError) -> UsageError:
    """A ``structures_to_data`` error (``structure K: ...``) with the file named."""
    text = one_line(error)
    return UsageError(text if text.startswith(path) else f"{path}: {text}")


def _write_structures(structures: list, out: str) -> None:
    """``structures`` to ``out`` (``.cfg`` frames to ``.cfg``, ``ase.Atoms`` to any format ASE
    writes), complete or not at all."""
    if out.endswith(".cfg"):
        write_cfg(structures, out)
        return
    with replacing(out) as tmp:
        ase_write(tmp, structures, format=_ase_format(out))


def _ase_format(out: str) -> str:
    fmt = filetype(out, read=False)
    if fmt not in ioformats or not ioformats[fmt].can_write:
        raise UsageError(f"{out}: ASE cannot write this format (use .xyz, .extxyz or .cfg)")
    return fmt


# ----------------------------------------------------------------------------------------------
# active-set
# ----------------------------------------------------------------------------------------------


def run_active_set(argv: Sequence[str]) -> int:
    """``nequip-sus2 active-set`` with the arguments after the subcommand."""
    parser = _new_parser(
        "active-set",
        "Build the MaxVol active set (per species) of a SUS2 model on its training data\n"
        "and write the model with the per-atom extrapolation grade `sus2_extrapolation_grade`\n"
        "included (docs/training.md).",
        "Example: nequip-sus2 active-set best.ckpt train.xyz -o graded.nequip.zip\n"
        "Example: nequip-sus2 active-set model.nequip.zip train.cfg -o graded.nequip.zip",
    )
    parser.add_argument("model", help="checkpoint (.ckpt) or package (.nequip.zip)")
    parser.add_argument("data", help="training structures: extxyz (or any ASE format) or .cfg")
    _add_common(parser, "output .ckpt (from a checkpoint) or .nequip.zip")
    parser.add_argument(
        "--rank-rtol",
        type=positive(float),
        default=None,
        help="relative singular value cutoff of the span (1e-4 float32, 1e-8 float64 models)",
    )
    parser.add_argument(
        "--save-active-set",
        metavar="FILE",
        help="also write the active set (torch.save of the grade buffers and bookkeeping)",
    )
    args = _parse(parser, argv)

    out = Path(args.output)
    check_graded_output(out, args.model.endswith(PACKAGE_SUFFIX))
    if args.save_active_set:
        target = Path(args.save_active_set)
        if not target.parent.is_dir():
            raise UsageError(f"{target}: the output directory {target.parent} does not exist")
    ensure_global_state()
    model = _load_sus2_model(args.model)
    type_names = list(_graph_model(model).type_names)
    species_map = _species_map(args.species_map, type_names)
    structures = _read_data(args.data, type_names)
    try:
        active = write_model_with_grade(
            args.model,
            structures,
            out,
            tol=args.tol,
            rank_rtol=args.rank_rtol,
            batch_size=args.batch_size,
            chemical_species_to_atom_type_map=species_map,
            progress=False if args.no_progress else None,
            model=model,
        )
    except ValueError as e:
        if str(e).startswith("structure "):
            raise _structure_error(args.data, e) from e
        raise
    print(active.summary())
    print(f"wrote {out}")
    if args.save_active_set:
        active.save(args.save_active_set)
        print(f"wrote {args.save_active_set}")
    return 0


# ----------------------------------------------------------------------------------------------
# select-add
# ----------------------------------------------------------------------------------------------


def run_select_add(argv: Sequence[str]) -> int:
    """``nequip-sus2 select-add`` with the arguments after the subcommand."""
    parser = _new_parser(
        "select-add",
        "Select the candidate structures that extend the active set of a model with an\n"
        "extrapolation grade (like MLIP select-add).",
        "Example: nequip-sus2 select-add graded.nequip.zip extrapolating.xyz -o selected.xyz",
    )
    parser.add_argument("model", help="checkpoint or package with an extrapolation grade")
    parser.add_argument("candidates", help="candidate structures: extxyz or .cfg")
    _add_common(parser, "selected structures, in the candidates' format")
    args = _parse(parser, argv)

    out = Path(args.output)
    if args.candidates.endswith(".cfg") != args.output.endswith(".cfg"):
        raise UsageError(
            f"{out}: the selected structures are written in the candidates' format; "
            + ("use a .cfg output" if args.candidates.endswith(".cfg") else "use an extxyz output")
        )
    if not args.output.endswith(".cfg"):
        _ase_format(args.output)
    if not out.parent.is_dir():
        raise UsageError(f"{out}: the output directory {out.parent} does not exist")
    ensure_global_state()
    model = _load_sus2_model(args.model, need_grade=True)
    type_names = list(_graph_model(model).type_names)
    species_map = _species_map(args.species_map, type_names)
    structures = _read_data(args.candidates, type_names)
    try:
        chosen, gamma = select_add(
            model,
            structures,
            tol=args.tol,
            batch_size=args.batch_size,
            chemical_species_to_atom_type_map=species_map,
            progress=False if args.no_progress else None,
        )
    except ValueError as e:
        if str(e).startswith("structure "):
            raise _structure_error(args.candidates, e) from e
        raise
    _write_structures([structures[i] for i in chosen], args.output)
    print(
        f"{len(chosen)} of {len(structures)} candidates selected (max grade "
        f"{gamma.max() if len(gamma) else 0:.3g}); wrote {args.output}"
    )
    return 0
