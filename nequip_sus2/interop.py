"""Interoperability with SUS2-MLIP / MLIP-2: ``.mtp`` models in and out of NequIP packages.

* :func:`import_mtp` builds a NequIP model from a trained ``.mtp`` file (exact parameters and
  program; the species order is external, see :func:`read_type_names`).
* :func:`write_package` writes a ``.nequip.zip`` like ``nequip-package build`` does (eager and
  train-time-compile variants, example data for ``nequip-compile``, metadata), so that
  ``nequip-package info``, ``nequip-compile``, the NequIP ASE calculator and ``ModelFromPackage``
  accept it.
* :func:`model_to_mtp` / :func:`export_mtp` turn a SUS2 model (built here, or loaded from a
  checkpoint or package) back into an ``.mtp`` file in the original writer's layout, with the
  contraction program the model was built with. A model imported from a file and left unchanged
  is written back byte for byte (without the final newline, as the original writer does); a
  full-rank model is re-expanded to the published basis with zero coefficients on the dropped
  duplicates.
* :func:`cfg_to_extxyz` / :func:`extxyz_to_cfg` convert data sets losslessly;
  :func:`calc_errors` and :func:`calc_grade` evaluate a model on a ``.cfg`` or extended XYZ
  file (like ``mlp calc-errors`` and ``mlp calc-grade``).

All nequip internals (``_``-prefixed names) this module relies on are reached through
:func:`_nequip_internals` only.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import os
import re
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from .io.cfg import (
    MIN_CELL_MEASURE,
    CfgFormatError,
    CfgFrame,
    cell_measure,
    first_non_finite,
    iter_cfg,
    singular_cell_message,
    write_cfg,
)
from .io.mtp import MTPFile, num_scaling_channels, read_mtp, write_mtp
from .io.mtp import check_finite as check_mtp_numbers
from .program import ContractionProgram, generate_program

if TYPE_CHECKING:
    import torch

__all__ = [
    "InteropError",
    "ase_calculator",
    "calc_errors",
    "calc_grade",
    "cfg_to_extxyz",
    "example_data",
    "export_mtp",
    "extxyz_to_cfg",
    "import_mtp",
    "import_mtp_to_package",
    "load_model",
    "model_to_mtp",
    "read_type_names",
    "write_package",
]

PACKAGE_SUFFIX = ".nequip.zip"
# graph modules a model may contain and still be written as an .mtp file
_SUS2_MODULES = (
    "UniversalPairScaling",
    "ChebyshevRadialBasis",
    "DecoupledElementEmbedding",
    "MomentContraction",
    "LinearReadout",
    "PerTypeScaleShift",
)
# modules that carry no energy term of their own (the extrapolation grade's active set has no
# place in an .mtp file; MLIP keeps it in a separate state file) and are left out of an export
_PASSIVE_MODULES = ("AtomwiseReduce", "EdgeLengthNormalizer", "ExtrapolationGrade")
_NAME_OK = re.compile(r"^\S+$")


class InteropError(ValueError):
    """A model, file or argument that the interop tools cannot handle; the message says why."""


# ----------------------------------------------------------------------------------------------
# nequip internals, in one place
# ----------------------------------------------------------------------------------------------


def _nequip_internals() -> dict[str, Any]:
    """The private nequip names this module uses (so a nequip upgrade breaks in one place)."""
    from nequip.model.saved_models.package import _suppress_package_importer_exporter_warnings
    from nequip.model.utils import _EAGER_MODEL_KEY
    from nequip.scripts._package_utils import (
        _EXTERNAL_MODULES,
        _INTERNAL_MODULES,
        _MOCK_MODULES,
        _PACKAGING_MODES,
    )
    from nequip.scripts.package import _CURRENT_NEQUIP_PACKAGE_VERSION
    from nequip.train.lightning import _SOLE_MODEL_KEY

    return {
        "suppress_warnings": _suppress_package_importer_exporter_warnings,
        "eager": _EAGER_MODEL_KEY,
        "external": _EXTERNAL_MODULES,
        "internal": _INTERNAL_MODULES,
        "mock": _MOCK_MODULES,
        "packaging_modes": _PACKAGING_MODES,
        "package_version": _CURRENT_NEQUIP_PACKAGE_VERSION,
        "sole_model": _SOLE_MODEL_KEY,
    }


def _ensure_global_state() -> None:
    from nequip.utils.global_state import global_state_initialized, set_global_state

    if not global_state_initialized():
        set_global_state()


# ----------------------------------------------------------------------------------------------
# species lists
# ----------------------------------------------------------------------------------------------


def _check_names(names: Sequence[Any], source: str, symbols: bool = False) -> list[str]:
    """The species list as strings; ``symbols``: each must be a chemical symbol (ASE's)."""
    out: list[str] = []
    for i, name in enumerate(names):
        if not isinstance(name, str) or not _NAME_OK.match(name):
            raise InteropError(
                f"{source}: type name {i} ({name!r}) must be a non-empty string without spaces"
            )
        if symbols:
            from ase.data import chemical_symbols

            if name not in chemical_symbols:
                import difflib

                title = name.capitalize()
                close = [title] if title in chemical_symbols else []
                close = close or difflib.get_close_matches(name, chemical_symbols[1:], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise InteropError(
                    f"{source}: type name {i} ({name!r}) is not a chemical symbol{hint}"
                )
        if name in out:
            raise InteropError(f"{source}: type name {name!r} is listed twice")
        out.append(name)
    if not out:
        raise InteropError(f"{source}: the species list is empty")
    return out


def read_type_names(path: str | os.PathLike) -> list[str]:
    """Species order from a small YAML or JSON file.

    Accepted forms: a list (``[Li, Be, Na]``), a whitespace-separated string (``Li Be Na``), a
    mapping with a ``type_names`` (or ``species``/``chemical_symbols``) list, or an index map
    ``{0: Li, 1: Be, 2: Na}`` (the form of ``nequip-package info``'s ``atom_types``).
    """
    path = os.fspath(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise InteropError(f"{path}: cannot read the species file ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise InteropError(f"{path}{where}: not valid YAML/JSON: {e}") from None
    if isinstance(data, Mapping):
        for key in ("type_names", "species", "chemical_symbols", "atom_types"):
            if key in data:
                data = data[key]
                break
    if isinstance(data, str):
        data = data.split()
    if isinstance(data, Mapping):
        keys = sorted(data)
        if keys != list(range(len(keys))):
            raise InteropError(
                f"{path}: an index map must have the keys 0..N-1, got {keys[:5]}"
                f"{'...' if len(keys) > 5 else ''}"
            )
        data = [data[k] for k in keys]
    if not isinstance(data, list):
        raise InteropError(
            f"{path}: expected a list of species (e.g. [Li, Be, Na]) or a mapping with "
            f"'type_names', got {type(data).__name__}"
        )
    return _check_names(data, path)


def _field_line(path: str, key: str) -> int | None:
    """1-based line of ``key = ...`` in a text file (for error messages), if found."""
    try:
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if line.split("=", 1)[0].strip() == key:
                    return lineno
    except OSError:
        pass
    return None


def _check_species_count(mtp: MTPFile, path: str, type_names: Sequence[str]) -> list[str]:
    names = _check_names(list(type_names), f"{path}: type_names")
    if len(names) != mtp.species_count:
        line = _field_line(path, "species_count")
        where = f"{path}:{line}" if line else path
        raise InteropError(
            f"{where}: field 'species_count': the file has {mtp.species_count} species but "
            f"{len(names)} type names were given ({' '.join(names)})"
        )
    return names


# ----------------------------------------------------------------------------------------------
# import
# ----------------------------------------------------------------------------------------------


def import_mtp(
    path: str | os.PathLike,
    type_names: Sequence[str],
    model_dtype: str = "float64",
    seed: int = 0,
    compile_mode: str | None = None,
    pair_scaling_trainable: bool = True,
    repulsive_core: float | dict[str, float] | str | None = None,
    repulsive_core_width: float = 0.5,
):
    """A NequIP ``GraphModel`` with exactly the parameters and program of a trained ``.mtp``.

    Args:
        path: trained ``.mtp`` file
        type_names: species of the file's type indices 0..C-1, in order
        model_dtype: ``float64`` (default; reproduces the published predictions to 1e-8) or
            ``float32``
        seed: model seed (nothing is random in an imported model)
        compile_mode: ``None``/``"eager"`` or ``"compile"`` (NequIP's train-time compile wrapper)
        pair_scaling_trainable: ``False`` freezes alpha and r0
        repulsive_core: ZBL below these inner radii (``min_dist``, a float or
            ``{"A-B": r, ..., "default": r}``, see :func:`repulsive_core_radii`); predictions
            at larger distances are unchanged (:mod:`nequip_sus2.nn.core`)
        repulsive_core_width: width of the switch below each inner radius, Angstrom

    Raises :class:`~nequip_sus2.io.mtp.MTPFormatError` for a malformed file and
    :class:`InteropError` for a species list of the wrong length (both name file and line).
    """
    from .model.sus2 import SUS2FromMTP

    path = os.fspath(path)
    mtp = read_mtp(path)
    if not mtp.is_trained:
        raise InteropError(
            f"{path}: an untrained template (no coefficient blocks); train it first or build a "
            "new model with nequip_sus2.model.SUS2Model"
        )
    names = _check_species_count(mtp, path, type_names)
    if model_dtype not in ("float32", "float64"):
        raise InteropError(f"model_dtype must be 'float32' or 'float64', got {model_dtype!r}")
    _ensure_global_state()
    return SUS2FromMTP(
        mtp_path=path,
        type_names=names,
        seed=seed,
        model_dtype=model_dtype,
        pair_scaling_trainable=pair_scaling_trainable,
        compile_mode=compile_mode,
        repulsive_core=repulsive_core,
        repulsive_core_width=repulsive_core_width,
    )


def shortest_pair_distances(
    frames, type_names: Sequence[str] | None = None, cutoff: float = 6.0
) -> dict[str, float]:
    """Shortest distance of each species pair in ``frames`` (ASE ``Atoms``), ``{"A-B": r}``.

    Pairs are keyed by their chemical symbols in ``type_names`` order (``"Cu-Ni"``, not
    ``"Ni-Cu"``; all symbols found when ``type_names`` is ``None``); pairs never closer than
    ``cutoff`` are left out. Periodic images count. The result is what ``repulsive_core`` of
    :func:`nequip_sus2.model.SUS2Model` takes (add a ``default`` for the pairs left out).
    """
    from ase.neighborlist import neighbor_list

    frames = list(frames)
    if type_names is None:
        type_names = sorted({s for atoms in frames for s in atoms.get_chemical_symbols()})
    names = list(type_names)
    num = len(names)
    best = np.full(num * num, np.inf)
    for atoms in frames:
        types = np.array([names.index(s) for s in atoms.get_chemical_symbols()], dtype=np.int64)
        i, j, d = neighbor_list("ijd", atoms, cutoff)
        a, b = types[i], types[j]
        np.minimum.at(best, np.minimum(a, b) * num + np.maximum(a, b), d)
    return {
        f"{names[a]}-{names[b]}": float(best[a * num + b])
        for a in range(num)
        for b in range(a, num)
        if np.isfinite(best[a * num + b])
    }


def repulsive_core_radii(
    spec: str | float, mtp_path: str | os.PathLike, type_names: Sequence[str]
) -> float | dict[str, float] | str:
    """The ``repulsive_core`` of an imported model: ``"min_dist"`` and floats as they are; a
    training-data file (``.cfg``, or anything ``ase.io.read`` reads) gives the shortest distance
    of each species pair in it, with the ``.mtp`` file's ``min_dist`` for the pairs it lacks."""
    if spec == "min_dist" or isinstance(spec, (int, float)):
        return spec if isinstance(spec, str) else float(spec)
    mtp = read_mtp(mtp_path)
    names = list(type_names)
    if os.fspath(spec).endswith(".cfg"):
        from .io.cfg import read_cfg

        frames = []
        for k, frame in enumerate(read_cfg(spec)):
            if frame.types.size and int(frame.types.max()) >= len(names):
                raise InteropError(
                    f"{spec}: configuration {k + 1} has type {int(frame.types.max())}, but the "
                    f"model has {len(names)} species"
                )
            frames.append(frame.to_atoms(names))
    else:
        from ase.io import read

        frames = read(spec, index=":")
        for k, atoms in enumerate(frames):
            unknown = sorted(set(atoms.get_chemical_symbols()) - set(names))
            if unknown:
                raise InteropError(
                    f"{spec}: structure {k + 1} has species {unknown} that are not among the "
                    f"model's type names"
                )
    radii = shortest_pair_distances(frames, names, cutoff=mtp.max_dist)
    return {**radii, "default": float(mtp.min_dist)}


# ----------------------------------------------------------------------------------------------
# packages
# ----------------------------------------------------------------------------------------------


def example_data(model, num_cells: int = 2, seed: int = 0):
    """A small periodic structure of the model's species with neighbours, as a batched
    ``AtomicDataDict`` (the example data ``nequip-compile`` traces the model with).

    A simple-cubic ``num_cells``^3 supercell with spacing 0.45 ``r_max``, types cycling through
    the species, positions jittered by up to 0.05 ``r_max`` (fixed seed).
    """
    import torch
    from nequip.data import AtomicDataDict, compute_neighborlist_, from_dict
    from nequip.utils.dtype import torch_default_dtype

    r_max = float(model.metadata["r_max"])
    num_types = len(model.type_names)
    spacing = 0.45 * r_max
    grid = np.stack(np.meshgrid(*[np.arange(num_cells)] * 3, indexing="ij"), -1).reshape(-1, 3)
    rng = np.random.default_rng(seed)
    pos = grid * spacing + rng.uniform(-0.05, 0.05, size=grid.shape) * r_max
    with torch_default_dtype(torch.float64):
        data = from_dict(
            {
                "pos": pos,
                "cell": np.eye(3) * spacing * num_cells,
                "pbc": np.ones(3, dtype=bool),
                "atom_types": np.arange(len(pos)) % num_types,
            }
        )
        data = compute_neighborlist_(data, r_max=r_max)
    return AtomicDataDict.batched_from_list([data])


def _as_compile_model(model):
    """The same model in NequIP's train-time-compile wrapper (``CompileGraphModel``)."""
    from nequip.nn.compile import CompileGraphModel
    from nequip.utils.dtype import dtype_to_name, torch_default_dtype

    metadata = model.metadata
    config = {
        "model_dtype": dtype_to_name(model.model_dtype),
        "type_names": list(model.type_names),
        "r_max": metadata["r_max"],
    }
    with torch_default_dtype(model.model_dtype):
        return CompileGraphModel(
            model=copy.deepcopy(model.model),
            model_config=config,
            model_input_fields=model.model.irreps_in,
        )


@contextlib.contextmanager
def _replacing(path: Path):
    """Yield a temporary path beside ``path``; renamed over ``path`` (with the usual file mode)
    when the block succeeds, removed when it fails: no partial output file is ever left."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_package(
    model,
    out: str | os.PathLike,
    *,
    data=None,
    config: Mapping | None = None,
    compile_variants: bool = True,
) -> Path:
    """Write ``model`` (an eager NequIP ``GraphModel`` built in this process) as a package.

    The zip has the layout ``nequip-package build`` writes (package format version of the
    installed nequip): ``model/eager_model.pkl`` and, if ``compile_variants``, the
    train-time-compile variant, each a ``ModuleDict({"sole_model": model})``;
    ``model/example_data.pkl`` (``data``, default :func:`example_data`); ``model/config.yaml``
    (``config``: provenance, informational only) and ``model/package_metadata.txt``.
    The file is written to a temporary name and renamed, so a failure leaves nothing behind.
    """
    import torch
    from nequip.utils.versions import get_current_code_versions
    from nequip.utils.versions.version_utils import get_version_safe

    nq = _nequip_internals()
    out = Path(out)
    if not out.name.endswith(PACKAGE_SUFFIX):
        raise InteropError(f"{out}: a NequIP package file name must end with {PACKAGE_SUFFIX}")
    if not hasattr(model, "is_graph_model"):
        raise InteropError("write_package needs a NequIP GraphModel (e.g. from import_mtp)")
    if type(model).__module__.startswith("<torch_package"):
        raise InteropError(
            "the model was loaded from a package; re-package it with `nequip-package build` "
            "from a checkpoint instead"
        )
    if getattr(model, "is_compile_graph_model", False):
        raise InteropError("write_package needs the eager model (not a CompileGraphModel)")
    _ensure_global_state()
    # packaged like `nequip-package build` does: on CPU, in training mode (ModelFromPackage
    # fine-tuning needs it; inference callers switch to eval themselves)
    model = copy.deepcopy(model).to("cpu").train()
    if data is None:
        data = example_data(model)

    modes = [nq["eager"]]
    if compile_variants:
        modes = list(nq["packaging_modes"]["nequip"]())
    variants = {}
    for mode in modes:
        inner = model if mode == nq["eager"] else _as_compile_model(model)
        variants[mode] = torch.nn.ModuleDict({nq["sole_model"]: inner})

    metadata = {
        "versions": get_current_code_versions(verbose=False),
        "external_modules": {k: get_version_safe(k) for k in nq["external"]},
        "package_version_id": nq["package_version"],
        "available_models": list(variants),
        "atom_types": dict(enumerate(model.type_names)),
    }
    config_text = yaml.safe_dump(dict(config) if config else {"source": "nequip_sus2"})

    with _replacing(out) as tmp, nq["suppress_warnings"]():
        with torch.package.PackageExporter(tmp) as exp:
            exp.mock([f"{pkg}.**" for pkg in nq["mock"]])
            exp.extern([f"{pkg}.**" for pkg in nq["external"]])
            exp.intern([f"{pkg}.**" for pkg in nq["internal"]])
            exp.save_pickle("model", "example_data.pkl", data, dependencies=True)
            exp.save_text("model", "config.yaml", config_text)
            exp.save_text(
                "model", "package_metadata.txt", yaml.dump(metadata, default_flow_style=False)
            )
            for mode, variant in variants.items():
                exp.save_pickle("model", f"{mode}_model.pkl", variant, dependencies=True)
    return out


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def import_mtp_to_package(
    path: str | os.PathLike,
    type_names: Sequence[str],
    out: str | os.PathLike,
    model_dtype: str = "float64",
    repulsive_core: float | dict[str, float] | str | None = None,
    repulsive_core_width: float = 0.5,
) -> Path:
    """:func:`import_mtp` then :func:`write_package`; the package records where it came from."""
    path = os.fspath(path)
    model = import_mtp(
        path,
        type_names,
        model_dtype=model_dtype,
        repulsive_core=repulsive_core,
        repulsive_core_width=repulsive_core_width,
    )
    core = {}
    if repulsive_core is not None:
        core = {"repulsive_core": repulsive_core, "repulsive_core_width": repulsive_core_width}
    config = {
        "source": "nequip-sus2 import-mtp",
        "mtp_file": os.path.abspath(path),
        "mtp_sha256": _sha256(path),
        "model": {
            "_target_": "nequip_sus2.model.SUS2FromMTP",
            "mtp_path": os.path.abspath(path),
            "type_names": list(model.type_names),
            "model_dtype": model_dtype,
            **core,
        },
    }
    return write_package(model, out, config=config)


# ----------------------------------------------------------------------------------------------
# loading saved models
# ----------------------------------------------------------------------------------------------


def load_model(path: str | os.PathLike, model_key: str | None = None):
    """The eager model of a checkpoint (``.ckpt``) or a package (``.nequip.zip``).

    ``model_key`` selects one model of a multi-model checkpoint (default: the sole model).
    """
    import pickle
    import zipfile

    from nequip.model.saved_models.load_utils import load_saved_model

    nq = _nequip_internals()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InteropError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"MTP") or path.endswith(".mtp"):
        raise InteropError(
            f"{path}: a .mtp file, not a nequip-train checkpoint (.ckpt) or a .nequip.zip "
            "package (read .mtp files with import_mtp)"
        )
    _ensure_global_state()
    try:
        models = load_saved_model(path, compile_mode=nq["eager"], model_key=None)
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, RuntimeError, KeyError) as e:
        # torch.load / torch.package on a file of another kind (text, truncated, foreign zip)
        kind = "package" if path.endswith(PACKAGE_SUFFIX) else "checkpoint"
        detail = (str(e).strip().splitlines() or [""])[0]
        detail = re.sub(r"^\[enforce fail at [^\]]*\][\s.]*", "", detail)[:200]
        if "failed reading zip archive" in detail:
            detail = "truncated or damaged zip archive"
        zipped = head[:2] == b"PK" or head[:1] == b"\x80"  # zip or legacy torch.save pickle
        what = f"{type(e).__name__}: {detail}" if zipped else "not a zip archive"
        raise InteropError(
            f"{path}: not a readable nequip-train checkpoint (.ckpt) or .nequip.zip package "
            f"(read as a {kind}: {what})"
        ) from e
    keys = list(models.keys())
    if model_key is None:
        if len(keys) != 1:
            raise InteropError(f"{path}: holds several models {keys}; choose one with model_key")
        model_key = keys[0]
    if model_key not in keys:
        raise InteropError(f"{path}: no model {model_key!r} (models: {keys})")
    return models[model_key].eval()


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------


def _sus2_modules(model) -> dict[str, Any]:
    """The SUS2 graph modules of ``model`` by class name; refuses what a .mtp cannot express."""
    found: dict[str, Any] = {}
    for module in model.modules():
        cls = type(module).__name__
        if cls in _SUS2_MODULES:
            if cls in found:
                raise InteropError(f"the model has more than one {cls}; not a plain SUS2 model")
            found[cls] = module
    missing = [c for c in _SUS2_MODULES if c not in found]
    if missing:
        raise InteropError(
            f"not a SUS2 model: {', '.join(missing)} not found (only models built by "
            "nequip_sus2.model.SUS2Model / SUS2FromMTP can be written as .mtp)"
        )
    # every energy-carrying module must be one of ours
    seq = next((m for m in model.modules() if type(m).__name__ == "SequentialGraphNetwork"), None)
    if seq is not None:
        extra = [
            f"{name} ({type(m).__name__})"
            for name, m in seq.named_children()
            if type(m).__name__ not in _SUS2_MODULES + _PASSIVE_MODULES
        ]
        if extra:
            raise InteropError(
                f"the model contains {', '.join(extra)}, which an .mtp file cannot represent "
                "(e.g. a ZBL pair potential); export is refused"
            )
    return found


def _recorded_program(info: dict, moments, num_theta: int) -> ContractionProgram:
    """The contraction program the model was built with (recorded by the builder), checked
    against the sizes of the ``MomentContraction`` module and of theta."""
    stored = info.get("program")
    if stored is None:
        raise InteropError(
            "the model does not record its contraction program (not built by "
            "nequip_sus2.model.SUS2Model / SUS2FromMTP of this version); rebuild it to export"
        )
    program = ContractionProgram(
        int(stored["moments_count"]),
        tuple(tuple(int(v) for v in e) for e in stored["basic"]),
        tuple(tuple(int(v) for v in e) for e in stored["times"]),
        tuple(int(v) for v in stored["mapping"]),
    )
    sizes = (program.moments_count, len(program.basic), len(program.mapping), len(program.mapping))
    actual = (int(moments.num_slots), int(moments.num_basic), int(moments.num_basis), num_theta)
    if sizes != actual:
        raise InteropError(
            f"the recorded contraction program (slots, basic, basis = {sizes[:3]}) does not "
            f"match the model ({actual[:3]}, {num_theta} coefficients)"
        )
    return program


def _expression_ids(program: ContractionProgram, table: dict) -> list[int]:
    """A structural id per slot: equal ids <=> the same polynomial expression of basic moments
    built the same way (shared ``table`` makes ids comparable across programs)."""
    entries: dict[int, list[tuple[int, int, int]]] = {}
    for p, q, m, o in program.times:
        entries.setdefault(o, []).append((p, q, m))
    ids: list[int] = []
    for slot in range(program.moments_count):
        if slot < len(program.basic):
            key: Any = ("basic", program.basic[slot])
        else:
            key = tuple(
                sorted(
                    (min(ids[p], ids[q]), max(ids[p], ids[q]), m)
                    for p, q, m in entries.get(slot, [])
                )
            )
        ids.append(table.setdefault(key, len(table)))
    return ids


def _expand_full_rank(full: ContractionProgram, published: ContractionProgram) -> list[int]:
    """For each basis function of ``full``, its position in ``published``'s basis."""
    table: dict = {}
    ids_pub = _expression_ids(published, table)
    ids_full = _expression_ids(full, table)
    where = {ids_pub[slot]: a for a, slot in enumerate(published.mapping)}
    positions = []
    for slot in full.mapping:
        a = where.get(ids_full[slot])
        if a is None:  # pragma: no cover - generate_program guarantees a match
            raise InteropError("cannot map the full-rank basis onto the published basis")
        positions.append(a)
    if len(set(positions)) != len(positions):  # pragma: no cover
        raise InteropError("the full-rank basis maps twice onto one published basis function")
    return positions


def _infer_scaling_map(eta_of_mu: list[int], L: int, n_mu: int) -> str:
    from .model.sus2 import scaling_channel_of_mu

    for name in ("K", "L", "LK"):
        if scaling_channel_of_mu(name, L, n_mu) == eta_of_mu:
            return name
    raise InteropError(
        f"the model's scaling channels per radial function {eta_of_mu} match none of the .mtp "
        "scaling maps K, L, LK"
    )


def _per_type(values: torch.Tensor, present: bool, default: float, num_types: int) -> np.ndarray:
    if not present:
        return np.full(num_types, default)
    arr = values.detach().double().cpu().numpy().reshape(-1)
    if arr.size == 1:
        return np.full(num_types, arr[0])
    if arr.size != num_types:
        raise InteropError(f"per-type values have {arr.size} entries for {num_types} types")
    return arr


def model_to_mtp(model, expand_full_rank: bool = True) -> MTPFile:
    """The ``.mtp`` content of a SUS2 model (see the module docstring for the rules).

    Raises :class:`InteropError` for a model a ``.mtp`` file cannot represent (not a SUS2
    model, an extra pair potential) and, with ``expand_full_rank=False``, for a full-rank model.
    """
    from .model.sus2 import MTP_INFO_ATTR, scaling_channel_of_mu

    if any(type(m).__name__ == "RepulsiveCore" for m in model.modules()):
        raise InteropError(
            "the model has a repulsive core (repulsive_core), a term the .mtp format cannot "
            "represent; export is refused (export the model built without it)"
        )
    mods = _sus2_modules(model)
    scaling, radial = mods["UniversalPairScaling"], mods["ChebyshevRadialBasis"]
    embedding, moments = mods["DecoupledElementEmbedding"], mods["MomentContraction"]
    readout, scale_shift = mods["LinearReadout"], mods["PerTypeScaleShift"]
    info: dict = dict(getattr(scaling, MTP_INFO_ATTR, None) or {})

    type_names = list(model.type_names)
    C = len(type_names)
    n_mu = int(embedding.num_radial_funcs)
    eta_of_mu = [int(e) for e in embedding.eta_of_mu.tolist()]
    theta = readout.theta.detach().double().cpu().reshape(-1).tolist()

    program = _recorded_program(info, moments, len(theta))
    L = info.get("L")
    if L is None:
        L = max((a + b + c for _mu, a, b, c in program.basic), default=0)
    if n_mu % (L + 1):
        raise InteropError(f"{n_mu} radial functions is not a multiple of L+1 = {L + 1}")
    K = n_mu // (L + 1)
    scaling_map = info.get("scaling_map") or _infer_scaling_map(eta_of_mu, L, n_mu)
    if scaling_channel_of_mu(scaling_map, L, n_mu) != eta_of_mu:
        raise InteropError(
            f"the model's scaling channels {eta_of_mu} do not follow scaling_map {scaling_map}"
        )

    # a full-rank program goes back to the published layout (duplicates get theta = 0); any
    # other program (a published file's, a published-basis model's) is written as it is
    try:
        published, full = generate_program(L, K), generate_program(L, K, full_rank=True)
    except ValueError:  # no SUS2 rule for this (L, K): nothing to re-expand
        published = full = None
    if full is not None and program == full != published:
        if not expand_full_rank:
            raise InteropError(
                f"the model uses the full-rank basis ({len(full.mapping)} functions, "
                f"L = {L}, K = {K}); the published layout has {len(published.mapping)}. "
                "Export re-expands it (duplicates get coefficient 0) unless refused; "
                "train with `basis: published` for a model in the published layout"
            )
        expanded = [0.0] * len(published.mapping)
        for value, a in zip(theta, _expand_full_rank(full, published), strict=True):
            expanded[a] = value
        theta, program = expanded, published

    # pair scaling: [N_eta, C, C] each -> flat ((eta*2 + p)*C + Zi)*C + Zj
    alpha = scaling.alpha.detach().double().cpu().numpy()
    r0 = scaling.r0.detach().double().cpu().numpy()
    n_eta = num_scaling_channels(scaling_map, n_mu, L)
    if alpha.shape != (n_eta, C, C):
        raise InteropError(f"alpha has shape {alpha.shape}, expected {(n_eta, C, C)}")
    scal = np.stack([alpha, r0], axis=1).reshape(-1).tolist()

    coeffs = embedding.coeffs.detach().double().cpu().numpy()
    weights = embedding.weights.detach().double().cpu().numpy()
    unused = embedding.unused_weights.detach().double().cpu().numpy()
    rows = [coeffs[0].tolist() + weights.tolist()]
    rows += [coeffs[mu].tolist() + unused[mu - 1].tolist() for mu in range(1, n_mu)]

    s = _per_type(scale_shift.scales, bool(scale_shift.has_scales), 1.0, C)
    shift = _per_type(scale_shift.shifts, bool(scale_shift.has_shifts), 0.0, C)
    b = shift - s
    b_orig, s_orig = info.get("shift_coeffs"), info.get("species_coeffs")
    if b_orig is not None and s_orig is not None and len(b_orig) == C:
        b_o, s_o = np.asarray(b_orig, dtype=np.float64), np.asarray(s_orig, dtype=np.float64)
        # the model holds b + s: where s and b + s are unchanged since import, keep the file's b
        same = (s == s_o) & (shift == b_o + s_o)
        b = np.where(same, b_o, b)

    sigma = float(radial.radial_scaling)
    top, block = info.get("scaling", 1.0), info.get("radial_scaling")
    if top * (1.0 if block is None else block) != sigma:
        top, block = sigma, None

    min_dist = info.get("min_dist")
    if min_dist is None:
        min_dist = 0.25 * float(radial.r_max)
        warnings.warn(
            f"the model does not record min_dist (used only to initialise new models); "
            f"writing min_dist = {min_dist}",
            stacklevel=2,
        )

    return MTPFile(
        L=L,
        scaling_map=scaling_map,
        species_count=C,
        min_dist=float(min_dist),
        max_dist=float(radial.r_max),
        radial_basis_size=int(radial.radial_basis_size),
        radial_funcs_count=n_mu,
        program=program,
        radial_basis_type=info.get("radial_basis_type") or "RBChebyshev_sss",
        version=info.get("version") or "1.1.0",
        potential_name=info.get("potential_name"),
        scaling=float(top),
        radial_scaling=None if block is None else float(block),
        potential_tag=info.get("potential_tag"),
        shift_coeffs=b.tolist(),
        scal_coeffs=scal,
        radial_coeffs=rows,
        species_coeffs=s.tolist(),
        moment_coeffs=[float(t) for t in theta],
    )


def export_mtp(
    model_or_path,
    out: str | os.PathLike,
    model_key: str | None = None,
    expand_full_rank: bool = True,
) -> list[str]:
    """Write a SUS2 model (object, checkpoint or package path) as ``.mtp``; returns the species
    order of the file's type indices (the file itself stores none).

    The file is checked by reading it back before it is moved into place. A model with a nan or
    inf parameter is refused (the error names the parameter); nothing is written then.
    """
    import torch

    model = model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        model = load_model(model_or_path, model_key=model_key)
    for name, param in model.named_parameters():
        bad = ~torch.isfinite(param.detach())
        if bool(bad.any()):
            source = os.fspath(model_or_path) if model is not model_or_path else "the model"
            raise InteropError(
                f"{source}: parameter '{name}' holds {int(bad.sum())} nan/inf value(s) of "
                f"{bad.numel()}; refusing to write {os.fspath(out)}"
            )
    mtp = model_to_mtp(model, expand_full_rank=expand_full_rank)
    try:
        check_mtp_numbers(mtp)  # nan/inf from buffers or derived values, naming the .mtp field
    except ValueError as e:
        raise InteropError(f"{os.fspath(out)}: not written: {e}") from None
    with _replacing(Path(out)) as tmp:
        write_mtp(mtp, tmp)
        if read_mtp(tmp).parameter_count() != mtp.parameter_count():  # pragma: no cover
            raise InteropError(f"{out}: the written file does not read back")
    return list(model.type_names)


# ----------------------------------------------------------------------------------------------
# .cfg <-> extended XYZ
# ----------------------------------------------------------------------------------------------

# info keys with a meaning of their own in extxyz (ASE moves some into the calculator)
_RESERVED_INFO = frozenset(
    {"energy", "free_energy", "stress", "virial", "pbc", "Lattice", "Properties", "dipole"}
    | {"magmom", "polarization", "dielectric_tensor"}
)
_INFO_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


def _floats(values) -> str:
    return " ".join(repr(float(v)) for v in np.asarray(values, dtype=np.float64).ravel())


def _json_value(value: Any) -> str:
    """``"_JSON <json>"`` quoted for an extxyz comment: ASE reads it back as exactly ``value``
    (a string stays a string even when it looks like a number)."""
    import json

    text = "_JSON " + json.dumps(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _extxyz_frame(atoms) -> str:
    """One ``Atoms`` (from :meth:`CfgFrame.to_atoms`) as extxyz text with shortest round-trip
    floats (``repr``), so that every number reads back bit for bit."""
    from ase.stress import voigt_6_to_full_3x3_stress

    results = dict(atoms.calc.results) if atoms.calc is not None else {}

    def per_atom(values, dtype=None) -> np.ndarray:
        values = np.asarray(values, dtype=dtype)
        return values.reshape(len(atoms), int(np.prod(values.shape[1:])))

    columns: list[tuple[str, str, np.ndarray]] = [("pos", "R", per_atom(atoms.positions, float))]
    if "forces" in results:
        columns.append(("forces", "R", per_atom(results["forces"], float)))
    for key, values in atoms.arrays.items():
        if key.startswith("cfg_"):
            values = per_atom(values)
            kind = "I" if np.issubdtype(values.dtype, np.integer) else "R"
            columns.append((key, kind, values))
    props = "species:S:1:" + ":".join(f"{k}:{t}:{v.shape[1]}" for k, t, v in columns)
    head = []
    if atoms.cell.any():
        head.append(f'Lattice="{_floats(atoms.cell.array)}"')
    head.append(f"Properties={props}")
    if "energy" in results:
        head.append(f"energy={float(results['energy'])!r}")
    if "stress" in results:
        head.append(f'stress="{_floats(voigt_6_to_full_3x3_stress(results["stress"]))}"')
    for key, value in atoms.info.items():
        if key == "virial":
            head.append(f'virial="{_floats(value)}"')
            continue
        if key in _RESERVED_INFO or not _INFO_KEY.match(key):
            raise InteropError(f"Feature key {key!r} cannot be stored in extxyz info")
        head.append(f"{key}={_json_value(value)}")
    head.append('pbc="' + " ".join("T" if p else "F" for p in atoms.pbc) + '"')

    def cell(v, kind):
        return str(int(v)) if kind == "I" else repr(float(v))

    lines = [str(len(atoms)), " ".join(head)]
    for i, symbol in enumerate(atoms.get_chemical_symbols()):
        row = [symbol] + [cell(v, kind) for _k, kind, vals in columns for v in vals[i]]
        lines.append(" ".join(row))
    return "\n".join(lines) + "\n"


def _write_atomically(out: Path, chunks) -> int:
    count = 0
    with _replacing(out) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for chunk in chunks:
            f.write(chunk)
            count += 1
    return count


def cfg_to_extxyz(
    src: str | os.PathLike,
    out: str | os.PathLike,
    type_names: Sequence[str],
    progress: bool | None = False,
) -> int:
    """Convert a ``.cfg`` file to extended XYZ; returns the number of frames.

    Symbols are ``type_names[type]`` (chemical symbols); energy and forces as ASE results;
    ``stress`` = -PlusStress / V (ASE sign, fully periodic frames) and ``virial`` = PlusStress
    (3x3, every frame with PlusStress); Feature lines as string info entries; non-default ids and
    extra AtomData columns as ``cfg_*`` per-atom columns. :func:`extxyz_to_cfg` restores the file
    exactly. ``progress``: a tqdm bar on stderr (``None``: only when stderr is a terminal).
    """
    src = os.fspath(src)
    names = _check_names(list(type_names), "type_names", symbols=True)

    def frames():
        index = -1
        cfgs = _with_progress(iter_cfg(src), src, os.path.basename(src), progress)
        for index, frame in enumerate(cfgs):
            check_type_range(frame, index, src, names)
            try:
                yield _extxyz_frame(frame.to_atoms(names))
            except InteropError as e:
                raise cfg_error(src, index, "Feature", str(e)) from None
        if index < 0:
            raise InteropError(f"{src}: no configurations (no BEGIN_CFG line)")

    return _write_atomically(Path(out), frames())


def extxyz_to_cfg(
    src: str | os.PathLike,
    out: str | os.PathLike,
    type_names: Sequence[str],
    progress: bool | None = False,
) -> int:
    """Convert extended XYZ (any ASE-readable extxyz) to ``.cfg``; returns the number of frames.

    ``type`` = index of the symbol in ``type_names``; PlusStress from ``virial`` when present
    (exact), else -V * stress (fully periodic frames); string info entries become Feature lines.
    Other info entries and per-atom arrays have no place in a ``.cfg`` and are left out (one
    warning lists them). ``progress``: a tqdm bar on stderr (``None``: only on a terminal).
    """
    import ase.io
    from ase.io.extxyz import XYZError

    src = os.fspath(src)
    names = _check_names(list(type_names), "type_names", symbols=True)
    dropped: set[str] = set()

    def frames():
        line = 1
        try:
            images = ase.io.iread(src, index=":", format="extxyz")
            for index, atoms in enumerate(
                _with_progress(images, src, os.path.basename(src), progress)
            ):
                for key, value in list(atoms.info.items()):
                    if isinstance(value, np.ndarray) and value.dtype.kind in "US":
                        atoms.info[key] = [str(v) for v in value.ravel()]
                    elif key != "virial" and not (
                        isinstance(value, str)
                        or (isinstance(value, list) and all(isinstance(v, str) for v in value))
                    ):
                        dropped.add(f"info[{key!r}]")
                dropped.update(
                    f"arrays[{k!r}]"
                    for k in atoms.arrays
                    if k not in ("numbers", "positions", "forces") and not k.startswith("cfg_")
                )
                check_extxyz_frame(atoms, src, line, index)
                try:
                    frame = CfgFrame.from_atoms(atoms, names)
                except ValueError as e:
                    raise InteropError(f"{src}:{line}: frame {index}: {e}") from None
                line += len(atoms) + 2
                yield frame
        except InteropError:
            raise
        except KeyError as e:  # ASE: an unknown chemical symbol in the species column
            raise InteropError(
                f"{src}:{line}: not a readable extxyz frame: unknown species {e}"
            ) from None
        except (ValueError, IndexError, XYZError) as e:
            detail = str(e).removeprefix("ase.io.extxyz: ")
            raise InteropError(f"{src}:{line}: not a readable extxyz frame: {detail}") from None
        if line == 1:
            raise InteropError(f"{src}: no extxyz frames (empty file)")

    count = write_cfg(frames(), Path(out))
    if dropped:
        warnings.warn(
            f"{src}: not representable in .cfg and left out: {', '.join(sorted(dropped))}",
            stacklevel=2,
        )
    return count


# ----------------------------------------------------------------------------------------------
# locating a configuration of a .cfg file (for error messages)
# ----------------------------------------------------------------------------------------------


def _begin_lines(path: str) -> list[int]:
    """1-based line numbers of the ``BEGIN_CFG`` lines."""
    with open(path, encoding="utf-8") as f:
        return [n for n, line in enumerate(f, 1) if line.strip() == "BEGIN_CFG"]


def _atom_line(path: str, begin: int, atom: int) -> int:
    """Line of the ``atom``-th AtomData row of the configuration beginning at line ``begin``."""
    with open(path, encoding="utf-8") as f:
        rows = -1
        for n, line in enumerate(f, 1):
            if n <= begin:
                continue
            stripped = line.strip()
            if rows < 0:
                if stripped.startswith("AtomData"):
                    rows = 0
                continue
            if stripped and not stripped[0].isalpha():
                if rows == atom:
                    return n
                rows += 1
    return begin


def cfg_error(path: str, index: int, field: str, message: str, atom: int | None = None):
    """A :class:`~nequip_sus2.io.cfg.CfgFormatError` located at configuration ``index`` of
    ``path`` (its ``atom``-th AtomData row when given, else its BEGIN_CFG line)."""
    begin = _begin_lines(path)[index]
    line = begin if atom is None else _atom_line(path, begin, atom)
    return CfgFormatError(
        path, line, field, f"{message} (configuration {index}, BEGIN_CFG at line {begin})"
    )


def check_type_range(frame, index: int, path: str, type_names: Sequence[str]) -> None:
    """Refuse a ``type`` value with no entry in ``type_names`` (the error names file and line)."""
    num_types = len(type_names)
    if frame.n_atoms and frame.types.max() >= num_types:
        atom = int(np.argmax(frame.types >= num_types))
        raise cfg_error(
            path,
            index,
            "type",
            f"type value {int(frame.types[atom])} is out of range for the {num_types} "
            f"type_names ({' '.join(type_names)})",
            atom=atom,
        )


def check_extxyz_frame(atoms, path: str, line: int | None, index: int) -> None:
    """Refuse a nan/inf number or a singular periodic cell in frame ``index`` of an extxyz file,
    the frame whose atom-count line is ``line``: the error names the line (the comment line, or
    the atom's line) and the extxyz field (``pos``, ``forces``, ``Lattice``, ``energy``, ...).
    ``line=None`` (a file in another format): the error names the frame only."""

    def fail(at: int, field: str, what: str) -> InteropError:
        where = path if line is None else f"{path}:{at}"
        return InteropError(f"{where}: frame {index}: field '{field}': {what}")

    line_ = 0 if line is None else line

    calc = atoms.calc
    results = dict(getattr(calc, "results", None) or {}) if calc is not None else {}
    per_atom = {"pos": atoms.positions, "forces": results.get("forces")}
    for field, values in per_atom.items():
        k = None if values is None else first_non_finite(values)
        if k is not None:
            value = float(np.asarray(values, dtype=np.float64).reshape(-1)[k])
            raise fail(line_ + 2 + k // 3, field, f"atom {k // 3} holds {value!r}")
    comment = {
        "Lattice": atoms.cell.array,
        "energy": results.get("energy"),
        "stress": results.get("stress"),
        "virial": atoms.info.get("virial"),
    }
    for field, values in comment.items():
        if values is None or isinstance(values, str):
            continue
        try:
            k = first_non_finite(values)
        except (TypeError, ValueError):
            continue
        if k is not None:
            value = float(np.asarray(values, dtype=np.float64).reshape(-1)[k])
            raise fail(line_ + 1, field, f"holds {value!r}")
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if pbc.any() and (measure := cell_measure(atoms.cell.array, pbc)) < MIN_CELL_MEASURE:
        raise fail(line_ + 1, "Lattice", singular_cell_message(measure, int(pbc.sum())))


# ----------------------------------------------------------------------------------------------
# evaluation (mlp calc-errors, mlp calc-grade)
# ----------------------------------------------------------------------------------------------

#: compiled models (AOTInductor .nequip.pt2, TorchScript .nequip.pth), by suffix
_COMPILED_SUFFIXES = (".pt2", ".nequip.pth")
_DATA_SUFFIXES = (".cfg", ".xyz", ".extxyz")
#: name of the grade in .cfg Feature lines and extxyz info/arrays (as MLIP's calc-grade)
GRADE_FEATURE = "MV_grade"


def model_format(path: str | os.PathLike) -> str:
    """``"compiled"``, ``"package"``, ``"checkpoint"`` or ``"mtp"``, by the file name."""
    name = os.fspath(path).lower()
    if name.endswith(_COMPILED_SUFFIXES):
        return "compiled"
    if name.endswith(PACKAGE_SUFFIX):
        return "package"
    if name.endswith(".ckpt"):
        return "checkpoint"
    if name.endswith(".mtp"):
        return "mtp"
    raise InteropError(
        f"{os.fspath(path)}: MODEL is not a model file (expected a compiled .nequip.pt2, a "
        f"{PACKAGE_SUFFIX} package, a .ckpt checkpoint or a trained .mtp file)"
    )


def data_format(path: str | os.PathLike, what: str = "DATA") -> str:
    """``"cfg"`` or ``"extxyz"``, by the file name."""
    name = os.fspath(path).lower()
    if name.endswith(".cfg"):
        return "cfg"
    if name.endswith(_DATA_SUFFIXES):
        return "extxyz"
    raise InteropError(
        f"{os.fspath(path)}: {what} must be a .cfg or an extended XYZ (.xyz/.extxyz) file"
    )


def _load_calculator(
    model_path: str | os.PathLike,
    type_names: Sequence[str] | None,
    model_dtype: str = "float64",
    device: str = "cpu",
):
    """``(calculator, the model's type names, whether it computes the grade)``; the last is
    ``None`` when that cannot be told before an evaluation (TorchScript models)."""
    from nequip.integrations.utils import basic_transforms

    from ._keys import EXTRAPOLATION_GRADE_KEY
    from .ase import SUS2Calculator

    path = os.fspath(model_path)
    kind = model_format(path)
    # structures map to the model's types by chemical symbol: the names must be symbols
    given = None
    if type_names is not None:
        given = _check_names(list(type_names), "type names", symbols=True)
    if kind == "compiled":
        calc = SUS2Calculator.from_compiled_model(
            path, device=device, chemical_species_to_atom_type_map=True
        )
        names = next(
            list(t.model_type_names) for t in calc.transforms if hasattr(t, "model_type_names")
        )
        keys = getattr(calc.model, "output_keys", None)
        has_grade = None if keys is None else EXTRAPOLATION_GRADE_KEY in keys
    else:
        if kind == "mtp":
            if given is None:
                raise InteropError(
                    f"{path}: a .mtp file stores no species; give the type names of its type "
                    "indices 0, 1, ... (--type-names)"
                )
            model = import_mtp(path, given, model_dtype=model_dtype).eval()
        else:
            model = load_model(path)
        names = list(model.type_names)
        calc = SUS2Calculator(
            model=model,
            device=device,
            transforms=basic_transforms(
                model.metadata, float(model.metadata["r_max"]), names, {t: t for t in names}
            ),
        )
        has_grade = any(type(m).__name__ == "ExtrapolationGrade" for m in model.modules())
    _check_names(names, f"{path}: the model's type names", symbols=True)
    if given is not None and given != names:
        raise InteropError(
            f"the type names given ({' '.join(given)}) differ from those {path} carries "
            f"({' '.join(names)}); leave them out to use the model's (its order maps .cfg "
            "type indices)"
        )
    return calc, names, has_grade


def ase_calculator(
    model_path: str | os.PathLike,
    type_names: Sequence[str] | None = None,
    model_dtype: str = "float64",
    device: str = "cpu",
):
    """A NequIP ASE calculator (:class:`~nequip_sus2.ase.SUS2Calculator`, which also returns
    the extrapolation grade of a model that has one) for a compiled ``.nequip.pt2``
    (``--target ase`` or ``sus2_ase``), a package, a checkpoint or a trained ``.mtp``.

    Species map by chemical symbol. ``type_names`` is required for a ``.mtp`` file (the species
    of its type indices); for the other models, which carry their type names, it is optional
    and must equal them. Raises :class:`InteropError` for a file that is not a model (by
    suffix) and for type names that differ from the model's.
    """
    return _load_calculator(model_path, type_names, model_dtype=model_dtype, device=device)[0]


def _read_data(path: str, type_names: Sequence[str]):
    """``ase.Atoms`` of every structure of a ``.cfg`` (types are indices into ``type_names``)
    or extxyz file, with the file's labels; refuses species the model does not have."""
    if data_format(path) == "cfg":
        for index, frame in enumerate(iter_cfg(path)):
            check_type_range(frame, index, path, type_names)
            yield frame.to_atoms(type_names), frame
        return
    import ase.io

    known = set(type_names)
    line = 1
    try:
        for index, atoms in enumerate(ase.io.iread(path, index=":", format="extxyz")):
            missing = sorted(set(atoms.get_chemical_symbols()) - known)
            if missing:
                raise InteropError(
                    f"{path}:{line}: frame {index} has species {' '.join(missing)} that the "
                    f"model does not have (its species: {' '.join(type_names)})"
                )
            check_extxyz_frame(atoms, path, line, index)
            line += len(atoms) + 2
            yield atoms, None
    except InteropError:
        raise
    except (ValueError, IndexError, KeyError) as e:
        raise InteropError(f"{path}:{line}: not a readable extxyz frame: {e}") from None


def _with_progress(items, path: str, desc: str, progress: bool | None):
    """``items`` with a tqdm bar on stderr (``progress`` None: only when stderr is a terminal;
    the total is the number of ``BEGIN_CFG`` lines of a ``.cfg`` file)."""
    from ._console import progress_bar

    bar = progress_bar(progress, desc=desc, unit="cfg", dynamic_ncols=True)
    try:
        if not bar.disable and path.lower().endswith(".cfg"):
            bar.total = len(_begin_lines(path))
            bar.refresh()
        for item in items:
            yield item
            bar.update()
    finally:
        bar.close()


_VOIGT_PAIRS = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


def _voigt(matrix) -> np.ndarray:
    """Six components xx yy zz yz xz xy of a 3x3 (symmetrised), 9- or 6-vector."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.size == 6:
        return m.reshape(6).copy()
    if m.size != 9:
        raise InteropError(f"a stress/virial with {m.size} values (expected 6 or 9)")
    m = m.reshape(3, 3)
    return np.array([0.5 * (m[i, j] + m[j, i]) for i, j in _VOIGT_PAIRS])


def _volume(atoms) -> float | None:
    """Cell volume of a fully periodic structure, else ``None``."""
    if not bool(np.all(atoms.pbc)):
        return None
    volume = abs(float(np.linalg.det(atoms.cell.array)))
    return volume if np.isfinite(volume) and volume > 0.0 else None


def _labels(atoms) -> tuple[float | None, np.ndarray | None, np.ndarray | None]:
    """Reference energy, forces and virial (.cfg PlusStress convention, eV) of a structure as
    read: calculator results first, then ``info``/``arrays``; the virial from
    ``info["virial"]`` or, for a fully periodic cell, ``-V * stress``."""
    calc = atoms.calc
    results = dict(getattr(calc, "results", None) or {}) if calc is not None else {}
    energy = results.get("energy", atoms.info.get("energy"))
    forces = results.get("forces", atoms.arrays.get("forces"))
    virial = None
    if atoms.info.get("virial") is not None:
        virial = _voigt(atoms.info["virial"])
    else:
        stress = results.get("stress", atoms.info.get("stress"))
        volume = _volume(atoms)
        if stress is not None and volume is not None:
            virial = -volume * _voigt(stress)
    return (
        None if energy is None else float(energy),
        None if forces is None else np.asarray(forces, dtype=np.float64).reshape(len(atoms), 3),
        virial,
    )


def _evaluate(calc, atoms) -> dict[str, Any]:
    """Energy, forces, virial (fully periodic structures) and grade (if any) of ``atoms``."""
    probe = atoms.copy()
    probe.calc = calc
    calc.get_property("energy", probe)
    res = calc.results
    volume = _volume(probe)
    virial = None
    if volume is not None and "stress" in res:
        virial = -volume * np.asarray(res["stress"], dtype=np.float64).reshape(6)
    grade = res.get("extrapolation_grade")
    return {
        "energy": float(res["energy"]),
        "forces": np.array(res["forces"], dtype=np.float64).reshape(len(atoms), 3),
        "virial": virial,
        "volume": volume,
        "grade": None if grade is None else np.array(grade, dtype=np.float64).reshape(-1),
    }


def _stats(
    diffs: list[np.ndarray], refs: list[np.ndarray] | None = None
) -> dict[str, float | int | None] | None:
    """Max, mean absolute and RMS of the differences (``None`` without values); with ``refs``
    also the relative errors RMS(d)/RMS(ref) and max|d|/max|ref| (``None`` if ref is 0)."""
    if not diffs:
        return None
    d = np.concatenate([np.ravel(x) for x in diffs])
    out: dict[str, float | int | None] = {
        "rmse": float(np.sqrt(np.mean(d**2))),
        "mae": float(np.mean(np.abs(d))),
        "max": float(np.max(np.abs(d))),
        "count": int(d.size),
    }
    if refs is not None:
        r = np.concatenate([np.ravel(x) for x in refs])
        rms_ref, max_ref = float(np.sqrt(np.mean(r**2))), float(np.max(np.abs(r)))
        out["rel_rms"] = out["rmse"] / rms_ref if rms_ref > 0 else None
        out["rel_max"] = out["max"] / max_ref if max_ref > 0 else None
    return out


def _write_structures(out: str, items, type_names: Sequence[str]) -> int:
    """Write ``CfgFrame``s (``.cfg``) or ``ase.Atoms`` (extxyz) atomically; returns the count."""
    if data_format(out, "the output") == "cfg":
        return write_cfg(
            (
                item if isinstance(item, CfgFrame) else CfgFrame.from_atoms(item, type_names)
                for item in items
            ),
            out,
        )
    import ase.io

    count = 0
    with _replacing(Path(out)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for item in items:
            atoms = item.to_atoms(type_names) if isinstance(item, CfgFrame) else item
            ase.io.write(f, atoms, format="extxyz")
            count += 1
    return count


def _predicted_atoms(atoms, pred: dict[str, Any]):
    """A copy of ``atoms`` whose labels are the predictions (virial/stress when periodic)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    out = atoms.copy()
    out.info.pop("virial", None)
    results: dict[str, Any] = {"energy": pred["energy"], "forces": pred["forces"]}
    if pred["virial"] is not None:
        w = pred["virial"]
        out.info["virial"] = np.array(
            [[w[0], w[5], w[4]], [w[5], w[1], w[3]], [w[4], w[3], w[2]]], dtype=np.float64
        )
        results["stress"] = -w / pred["volume"]
    out.calc = SinglePointCalculator(out, **results)
    return out


def calc_errors(
    model_path: str | os.PathLike,
    data_path: str | os.PathLike,
    type_names: Sequence[str] | None = None,
    model_dtype: str = "float64",
    device: str = "cpu",
    predictions: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Errors of a model (see :func:`ase_calculator`) against the labels of a ``.cfg`` or
    extended XYZ file, like ``mlp calc-errors``.

    ``type_names``: required for a ``.mtp`` model; the other models carry their own (whose
    order maps ``.cfg`` type indices), and given ones must equal them. Extended XYZ labels are
    what ``ase.io.read`` gives: calculator results (``energy``, ``forces``, ``stress``), else
    the same keys in ``info``/``arrays``; ``info["virial"]`` (eV) is used as the virial when
    present.

    Returns a dict with ``configurations``, ``atoms`` and, per quantity, ``{rmse, mae, max,
    count}`` (``None`` when the data has no such labels):

    * ``energy``: total energy, eV, one value per configuration;
    * ``energy_per_atom``: eV/atom;
    * ``forces``: force components, eV/A;
    * ``virial``: the six components of the virial ``-dE/dstrain`` (the ``.cfg`` PlusStress,
      ``-V * ASE stress``), eV, for fully periodic configurations;
    * ``stress``: virial / V of the same configurations, in GPa (1 eV/A^3 = 160.21766208
      GPa). Earlier versions reported this entry in eV/A^3.

    ``forces``, ``virial`` and ``stress`` also have the relative errors ``rel_rms`` =
    RMS(error) / RMS(reference) and ``rel_max`` = max|error| / max|reference| (``None`` when
    the reference is zero). ``predictions``: also write the structures with the predicted
    labels (``.cfg`` or extxyz, by suffix). ``progress``: a tqdm bar on stderr (``None``: when
    stderr is a terminal).
    """
    from ase.units import GPa

    data_path = os.fspath(data_path)
    data_format(data_path)
    if predictions is not None:
        predictions = os.fspath(predictions)
        data_format(predictions, "the predictions file")
    calc, names, _ = _load_calculator(model_path, type_names, model_dtype, device)
    keys = ("energy", "energy_per_atom", "forces", "virial", "stress")
    diffs: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    refs: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    predicted = []
    count = atoms_total = 0
    items = _read_data(data_path, names)
    for atoms, frame in _with_progress(items, data_path, "calc-errors", progress):
        count += 1
        atoms_total += len(atoms)
        energy, forces, virial = _labels(atoms)
        pred = _evaluate(calc, atoms)
        if not (np.isfinite(pred["energy"]) and np.isfinite(pred["forces"]).all()):
            raise InteropError(
                f"{os.fspath(model_path)}: the model predicts nan/inf energy or forces for "
                f"configuration {count - 1} of {os.fspath(data_path)} (nan/inf parameters?)"
            )
        if energy is not None:
            diffs["energy"].append(np.array([pred["energy"] - energy]))
            n = max(len(atoms), 1)
            diffs["energy_per_atom"].append(np.array([(pred["energy"] - energy) / n]))
        if forces is not None:
            diffs["forces"].append(pred["forces"] - forces)
            refs["forces"].append(forces)
        if virial is not None and pred["virial"] is not None:
            diffs["virial"].append(pred["virial"] - virial)
            refs["virial"].append(virial)
            scale = 1.0 / (pred["volume"] * GPa)
            diffs["stress"].append((pred["virial"] - virial) * scale)
            refs["stress"].append(virial * scale)
        if predictions is not None:
            if frame is None:
                predicted.append(_predicted_atoms(atoms, pred))
            else:  # the .cfg frame with its ids, columns and Feature order
                predicted.append(
                    dataclasses.replace(
                        frame,
                        energy=pred["energy"],
                        forces=pred["forces"],
                        plus_stress=pred["virial"],
                    )
                )
    if predictions is not None:
        _write_structures(predictions, predicted, names)
    return {
        "configurations": count,
        "atoms": atoms_total,
        "energy": _stats(diffs["energy"]),
        "energy_per_atom": _stats(diffs["energy_per_atom"]),
        "forces": _stats(diffs["forces"], refs["forces"]),
        "virial": _stats(diffs["virial"], refs["virial"]),
        "stress": _stats(diffs["stress"], refs["stress"]),
    }


def _no_grade(path: str) -> InteropError:
    return InteropError(
        f"{path}: the model has no extrapolation grade; add one with `nequip-sus2 active-set "
        "MODEL TRAINING_DATA -o OUT` (a .ckpt or .nequip.zip; compile it with --target "
        "sus2_ase for a .nequip.pt2) first"
    )


def calc_grade(
    model_path: str | os.PathLike,
    data_path: str | os.PathLike,
    type_names: Sequence[str] | None = None,
    output: str | os.PathLike | None = None,
    device: str = "cpu",
    progress: bool | None = None,
) -> dict[str, Any]:
    """MaxVol extrapolation grade of every structure of a ``.cfg`` or extended XYZ file, like
    ``mlp calc-grade``.

    The model (package, checkpoint, or ``.nequip.pt2`` compiled with ``--target sus2_ase``)
    must carry the grade (``nequip-sus2 active-set``); it is evaluated through
    :class:`~nequip_sus2.ase.SUS2Calculator`, so the grade is the one that calculator reports.
    ``type_names``: optional; must equal the model's (whose order maps ``.cfg`` type indices).

    Returns ``configurations``, ``atoms``, ``max_grade`` (the largest per-atom grade of each
    structure, in file order) and ``summary`` (``count``, ``min``, ``median``, ``max``, and
    ``above_1``/``above_2``/``above_10``: structures whose grade exceeds 1, 2, 10). ``output``:
    also write the structures with their grade: a ``Feature MV_grade <value>`` line per
    configuration (``.cfg``), or ``info["MV_grade"]`` plus the per-atom array ``MV_grade``
    (extxyz). ``progress``: a tqdm bar on stderr (``None``: when stderr is a terminal).
    """
    path, data_path = os.fspath(model_path), os.fspath(data_path)
    data_format(data_path)
    to_cfg = False
    if output is not None:
        output = os.fspath(output)
        to_cfg = data_format(output, "the output") == "cfg"
    if model_format(path) == "mtp":
        raise InteropError(
            f"{path}: a .mtp file carries no extrapolation grade; import it (nequip-sus2 "
            "import-mtp) and add one with `nequip-sus2 active-set` first"
        )
    calc, names, has_grade = _load_calculator(path, type_names, device=device)
    if has_grade is False:
        raise _no_grade(path)
    grades: list[float] = []
    atoms_total = 0

    def graded():
        nonlocal atoms_total
        items = _read_data(data_path, names)
        for atoms, frame in _with_progress(items, data_path, "calc-grade", progress):
            gamma = _evaluate(calc, atoms)["grade"]
            if gamma is None:
                raise _no_grade(path)
            top = float(gamma.max()) if gamma.size else 0.0
            grades.append(top)
            atoms_total += len(atoms)
            if output is None:
                continue
            if to_cfg:
                if frame is None:
                    frame = CfgFrame.from_atoms(atoms, names)
                features = [(k, v) for k, v in frame.features if k != GRADE_FEATURE]
                yield dataclasses.replace(frame, features=[*features, (GRADE_FEATURE, repr(top))])
            else:  # the structure as read (its labels kept) plus the grade
                atoms.info[GRADE_FEATURE] = top
                atoms.arrays[GRADE_FEATURE] = gamma
                yield atoms

    if output is None:
        for _ in graded():
            pass
    else:
        _write_structures(output, graded(), names)
    g = np.asarray(grades, dtype=np.float64)
    summary: dict[str, Any] = {
        "count": int(g.size),
        "min": float(g.min()) if g.size else None,
        "median": float(np.median(g)) if g.size else None,
        "max": float(g.max()) if g.size else None,
    }
    for threshold in (1, 2, 10):
        summary[f"above_{threshold}"] = int(np.count_nonzero(g > threshold))
    return {
        "configurations": int(g.size),
        "atoms": atoms_total,
        "max_grade": grades,
        "summary": summary,
    }
