"""``BenchOptions``: every setting of a benchmark run, with its command-line flag and help.

Each field is spelled here once: its default, and (for the fields given on the command line)
its flags, ``argparse`` keywords and help text, from which :mod:`nequip_sus2.bench.cli` builds
the parser. Kept free of heavy imports, like the command line.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["DEFAULT_SIZES", "BenchOptions", "Flag"]

#: default system sizes (atoms) of the cost part; small enough for a 2-core CPU
DEFAULT_SIZES = (64, 256, 1024)

_PARTS = "parts"
_EOS = "equation of state"
_MD = "molecular dynamics"
_COST = "cost"
_SUS2 = "SUS2"


@dataclass(frozen=True)
class Flag:
    """How a :class:`BenchOptions` field is given on the command line.

    Attributes:
        names: option strings (``"--batch-size"``) or the name of a positional argument
        help: help text; ``{default}`` shows the field's default (a sequence space-separated)
        group: title of the argument group (``None``: the parser's own options)
        required: required on the command line although the field has a default
        kwargs: further ``add_argument`` keywords (``type``, ``nargs``, ``action``, ...)
    """

    names: tuple[str, ...]
    help: str
    group: str | None = None
    required: bool = False
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def help_text(self, default: Any) -> str:
        if isinstance(default, (list, tuple)):
            default = " ".join(map(str, default))
        return self.help.format(default=default)


def _flag(*names: str, help: str, group: str | None = None, required: bool = False, **kwargs):
    return {"flag": Flag(names, help, group, required, kwargs)}


def _option(default: Any, *names: str, **flag):
    """A field with ``default``, given on the command line by ``names`` (see :class:`Flag`)."""
    return field(default=default, metadata=_flag(*names, **flag))


def _skip(part: str):
    """``--skip-PART``: the field ``PART`` (default on) turned off."""
    return _option(True, f"--skip-{part}", action="store_false", help=f"skip the {part} part",
                   group=_PARTS)  # fmt: skip


@dataclass
class BenchOptions:
    """What :func:`nequip_sus2.bench.run_bench` runs, and how.

    Attributes:
        models: paths (``.ckpt``, ``.nequip.zip``, ``.nequip.pt2`` compiled with ``--target
            ase``, trained ``.mtp``), ``"NAME=PATH"`` strings, in-memory ``GraphModel`` objects,
            ``(name, model)`` pairs or a ``{name: model_or_path}`` mapping
        data: labelled structures: ``.cfg`` files (with ``type_names``) or ASE-readable files
        out_dir: output directory (``report.md``, ``results.json``, ``figures/``,
            ``predictions/``)
        type_names: species of ``.cfg`` type indices and of ``.mtp`` models; default for
            ``.cfg`` data: the models' type names when all models share them
        model_dtype: precision of models built from ``.mtp`` files
        device: ``auto`` (GPU when present), ``cpu``, ``cuda``, ...
        threads: torch CPU threads (``None``: leave as they are)
        group_key: info key of the configuration group (``config_type``, ``group``, a ``.cfg``
            Feature key); default: the first of ``config_type``, ``group``, ... present
        max_frames: at most this many structures per data file (evenly spread)
        batch_size: structures per model call in the accuracy part
        accuracy, eos, md, cost, sus2, plots: which parts to run
        eos_structures: files with structures for the EOS (several frames of one composition
            with energies at different volumes = a reference curve)
        eos_auto: automatic EOS structures: ``data`` (lowest reference energy per atom of the
            data), ``fcc``, ``bcc`` (of ``eos_elements`` or the most common element)
        eos_points, eos_strain: points of the scan and largest linear strain
        md_structure: starting structure of the MD (default: the ``data`` EOS structure)
        md_steps, md_timestep_fs, md_temperature_K, md_min_atoms, md_seed: NVE run settings
        sizes: system sizes (atoms) of the cost part
        compile: also AOT-compile each eager model (``nequip-compile``) and measure it
        cost_min_time: seconds of timing per size (at least one step)
        cost_memory: measure peak memory
        sus2_pairs: species pairs (``"Cu-Ag"`` or tuples) of the radial-curve plot
        sus2_max_curves: radial functions shown
        sus2_r_min: smallest distance of the radial-curve plot (default ``0.25 r_max``)
        save_predictions: write ``predictions/<model>.npz``
        keep_figures: keep the matplotlib figures in the result (for inspection)
        progress: tqdm progress bars (``None``: only on a terminal)
        strict: raise the first error instead of recording it and going on
        command: the command line, shown in the report
    """

    models: Iterable[Any] | Mapping[str, Any] = field(
        metadata=_flag(
            "models", nargs="+", metavar="MODEL",
            help="model file: .ckpt, .nequip.zip, .nequip.pt2 (nequip-compile --target ase) or "
            "a trained .mtp (needs --type-names); NAME=PATH sets the name shown in the report",
        )
    )  # fmt: skip
    data: Sequence[str | os.PathLike] = _option(
        (), "--data", action="append", metavar="FILE",
        help="labelled structures: .cfg (needs the species of its type indices) or any file ASE "
        "reads (extxyz, ...); repeat for several files",
    )  # fmt: skip
    out_dir: str | os.PathLike = _option(
        "bench_report", "-o", "--output", metavar="DIR", help="output directory", required=True
    )
    _: KW_ONLY
    type_names: Sequence[str] | None = _option(
        None, "--type-names", nargs="+", metavar="NAME",
        help="species of .cfg type indices 0, 1, ... (and of .mtp models); default for .cfg "
        "data: the models' type names when all models share them",
    )  # fmt: skip
    model_dtype: str = _option(
        "float64", "--model-dtype", choices=("float64", "float32"),
        help="precision of models built from .mtp files (default {default})",
    )  # fmt: skip
    device: str | torch.device | None = _option(
        "auto", "--device", help="auto (GPU when present), cpu, cuda, ..."
    )
    threads: int | None = _option(None, "--threads", type=int, help="torch CPU threads")
    group_key: str | None = _option(
        None, "--group-key",
        help="info key of the configuration group (extxyz config_type/group, .cfg Feature key); "
        "default: the first of config_type, group, config_group, Feature present",
    )  # fmt: skip
    max_frames: int | None = _option(
        None, "--max-frames", type=int, help="at most N structures per data file"
    )
    batch_size: int = _option(
        16, "--batch-size", type=int, help="structures per model call ({default})"
    )
    accuracy: bool = _skip("accuracy")
    eos: bool = _skip("eos")
    md: bool = _skip("md")
    cost: bool = _skip("cost")
    sus2: bool = _skip("sus2")
    plots: bool = _skip("plots")
    eos_structures: Sequence[str | os.PathLike] = _option(
        (), "--eos-structure", action="append", metavar="FILE", group=_EOS,
        help="structure file for the EOS; several frames of one composition with energies at "
        "different volumes are a reference E(V) curve (repeatable)",
    )  # fmt: skip
    eos_auto: Sequence[str] = _option(
        ("data",), "--eos-auto", nargs="*", choices=("data", "fcc", "bcc"), group=_EOS,
        help="automatic EOS structures: data (lowest reference energy per atom), fcc, bcc "
        "(default: {default}; give no value for none)",
    )  # fmt: skip
    eos_elements: Sequence[str] | None = _option(
        None, "--eos-elements", nargs="+", help="elements of fcc/bcc", group=_EOS
    )
    eos_points: int = _option(
        9, "--eos-points", type=int, help="points per E(V) scan ({default})", group=_EOS
    )
    eos_strain: float = _option(
        0.05, "--eos-strain", type=float, help="largest linear strain ({default})", group=_EOS
    )
    md_structure: str | os.PathLike | None = _option(
        None, "--md-structure", group=_MD,
        help="starting structure (default: the data structure with the lowest energy per atom)",
    )  # fmt: skip
    md_steps: int = _option(200, "--md-steps", type=int, help="NVE steps ({default})", group=_MD)
    md_timestep_fs: float = _option(
        1.0, "--md-timestep", type=float, metavar="MD_TIMESTEP", group=_MD,
        help="time step, fs ({default})",
    )  # fmt: skip
    md_temperature_K: float = _option(
        300.0, "--md-temperature", type=float, metavar="MD_TEMPERATURE", group=_MD,
        help="initial T, K ({default:g})",
    )  # fmt: skip
    md_min_atoms: int = _option(
        32, "--md-min-atoms", type=int, help="repeat the cell to >= N ({default})", group=_MD
    )
    md_seed: int = _option(0, "--md-seed", type=int, help="velocity seed ({default})", group=_MD)
    sizes: Sequence[int] = _option(
        DEFAULT_SIZES, "--sizes", nargs="+", type=int, group=_COST,
        help="system sizes in atoms (default {default}; e.g. 100 1000 10000 on a GPU)",
    )  # fmt: skip
    compile: bool = _option(
        False, "--compile", action="store_true", group=_COST,
        help="also AOT-compile each eager model (nequip-compile --target ase; minutes on a CPU) "
        "and measure it",
    )  # fmt: skip
    cost_min_time: float = _option(
        1.0, "--cost-min-time", type=float, help="seconds per size ({default})", group=_COST
    )
    cost_memory: bool = _option(
        True, "--no-memory", action="store_false", help="do not measure peak memory", group=_COST
    )
    sus2_pairs: Sequence[str | tuple[str, str]] | None = _option(
        None, "--pairs", nargs="+", metavar="A-B", group=_SUS2,
        help="species pairs of the radial-curve plot (default: from the data)",
    )  # fmt: skip
    sus2_max_curves: int = _option(
        6, "--max-curves", type=int, metavar="MAX_CURVES", group=_SUS2,
        help="radial functions shown ({default})",
    )  # fmt: skip
    sus2_r_min: float | None = None
    save_predictions: bool = True
    keep_figures: bool = False
    progress: bool | None = _option(
        None, "--no-progress", action="store_const", const=False, help="no progress bars"
    )
    strict: bool = _option(False, "--strict", action="store_true", help="stop at the first error")
    command: str | None = None
