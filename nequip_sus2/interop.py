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
  :func:`calc_errors` evaluates a model on a ``.cfg`` file (like ``mlp calc-errors``).

All nequip internals (``_``-prefixed names) this module relies on are reached through
:func:`_nequip_internals` only.
"""

from __future__ import annotations

import contextlib
import copy
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

from .io.cfg import CfgFormatError, CfgFrame, iter_cfg, write_cfg
from .io.mtp import MTPFile, num_scaling_channels, read_mtp, write_mtp
from .program import ContractionProgram, generate_program

if TYPE_CHECKING:
    import torch

__all__ = [
    "InteropError",
    "ase_calculator",
    "calc_errors",
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


def _check_names(names: Sequence[Any], source: str) -> list[str]:
    out: list[str] = []
    for i, name in enumerate(names):
        if not isinstance(name, str) or not _NAME_OK.match(name):
            raise InteropError(
                f"{source}: type name {i} ({name!r}) must be a non-empty string without spaces"
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
    )


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
) -> Path:
    """:func:`import_mtp` then :func:`write_package`; the package records where it came from."""
    path = os.fspath(path)
    model = import_mtp(path, type_names, model_dtype=model_dtype)
    config = {
        "source": "nequip-sus2 import-mtp",
        "mtp_file": os.path.abspath(path),
        "mtp_sha256": _sha256(path),
        "model": {
            "_target_": "nequip_sus2.model.SUS2FromMTP",
            "mtp_path": os.path.abspath(path),
            "type_names": list(model.type_names),
            "model_dtype": model_dtype,
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
    from nequip.model.saved_models.load_utils import load_saved_model

    nq = _nequip_internals()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InteropError(f"{path}: no such file")
    _ensure_global_state()
    models = load_saved_model(path, compile_mode=nq["eager"], model_key=None)
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

    The file is checked by reading it back before it is moved into place.
    """
    model = model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        model = load_model(model_or_path, model_key=model_key)
    mtp = model_to_mtp(model, expand_full_rank=expand_full_rank)
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


def cfg_to_extxyz(src: str | os.PathLike, out: str | os.PathLike, type_names: Sequence[str]) -> int:
    """Convert a ``.cfg`` file to extended XYZ; returns the number of frames.

    Symbols are ``type_names[type]``; energy and forces as ASE results; ``stress`` = -PlusStress
    / V (ASE sign, fully periodic frames) and ``virial`` = PlusStress (3x3, every frame with
    PlusStress); Feature lines as string info entries; non-default ids and extra AtomData
    columns as ``cfg_*`` per-atom columns. :func:`extxyz_to_cfg` restores the file exactly.
    """
    src = os.fspath(src)
    names = _check_names(list(type_names), "type_names")

    def frames():
        for index, frame in enumerate(iter_cfg(src)):
            check_type_range(frame, index, src, names)
            try:
                yield _extxyz_frame(frame.to_atoms(names))
            except InteropError as e:
                raise cfg_error(src, index, "Feature", str(e)) from None

    return _write_atomically(Path(out), frames())


def extxyz_to_cfg(src: str | os.PathLike, out: str | os.PathLike, type_names: Sequence[str]) -> int:
    """Convert extended XYZ (any ASE-readable extxyz) to ``.cfg``; returns the number of frames.

    ``type`` = index of the symbol in ``type_names``; PlusStress from ``virial`` when present
    (exact), else -V * stress (fully periodic frames); string info entries become Feature lines.
    Other info entries and per-atom arrays have no place in a ``.cfg`` and are left out (one
    warning lists them).
    """
    import ase.io

    src = os.fspath(src)
    names = _check_names(list(type_names), "type_names")
    dropped: set[str] = set()

    def frames():
        line = 1
        try:
            images = ase.io.iread(src, index=":", format="extxyz")
            for index, atoms in enumerate(images):
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
                try:
                    frame = CfgFrame.from_atoms(atoms, names)
                except ValueError as e:
                    raise InteropError(f"{src}:{line}: frame {index}: {e}") from None
                line += len(atoms) + 2
                yield frame
        except InteropError:
            raise
        except (ValueError, IndexError, KeyError) as e:
            raise InteropError(f"{src}:{line}: not a readable extxyz frame: {e}") from None

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


# ----------------------------------------------------------------------------------------------
# evaluation (mlp calc-errors)
# ----------------------------------------------------------------------------------------------


def ase_calculator(
    model_path: str | os.PathLike,
    type_names: Sequence[str] | None = None,
    model_dtype: str = "float64",
    device: str = "cpu",
):
    """A NequIP ASE calculator for a compiled ``.nequip.pt2`` (``--target ase``), a package, a
    checkpoint or a trained ``.mtp`` (which needs ``type_names``); species map by symbol."""
    from nequip.integrations.ase import NequIPCalculator
    from nequip.integrations.utils import basic_transforms

    path = os.fspath(model_path)
    if path.endswith(".pt2"):
        return NequIPCalculator.from_compiled_model(
            path, device=device, chemical_species_to_atom_type_map=True
        )
    if path.endswith(".mtp"):
        if type_names is None:
            raise InteropError(f"{path}: a .mtp model needs type_names")
        model = import_mtp(path, type_names, model_dtype=model_dtype).eval()
    else:
        model = load_model(path)
    names = list(model.type_names)
    transforms = basic_transforms(
        model.metadata, float(model.metadata["r_max"]), names, {t: t for t in names}
    )
    return NequIPCalculator(model=model, device=device, transforms=transforms)


def _stats(diffs: list[np.ndarray]) -> dict[str, float] | None:
    if not diffs:
        return None
    d = np.concatenate([np.ravel(x) for x in diffs])
    return {
        "rmse": float(np.sqrt(np.mean(d**2))),
        "mae": float(np.mean(np.abs(d))),
        "max": float(np.max(np.abs(d))),
        "count": int(d.size),
    }


def calc_errors(
    model_path: str | os.PathLike,
    data_path: str | os.PathLike,
    type_names: Sequence[str],
    model_dtype: str = "float64",
    device: str = "cpu",
    predictions: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Errors of a model (see :func:`ase_calculator`) against the labels of a ``.cfg`` file.

    Energy per atom (eV/atom), force components (eV/A) and, for fully periodic frames with
    PlusStress, stress components as PlusStress / V (eV/A^3; the prediction's PlusStress is
    ``-V * ASE stress``). ``predictions``: also write the predicted labels as ``.cfg``.
    """
    data_path = os.fspath(data_path)
    names = _check_names(list(type_names), "type_names")
    calc = ase_calculator(model_path, names, model_dtype=model_dtype, device=device)
    energy, forces, stress, predicted = [], [], [], []
    atoms_total = count = 0
    for index, frame in enumerate(iter_cfg(data_path)):
        count += 1
        check_type_range(frame, index, data_path, names)
        atoms = frame.to_atoms(names)
        atoms.calc = calc
        n = max(frame.n_atoms, 1)
        atoms_total += frame.n_atoms
        e = float(atoms.get_potential_energy())
        f = np.asarray(atoms.get_forces(), dtype=np.float64)
        w = None
        if frame.cell is not None and bool(frame.pbc.all()):
            volume = abs(float(np.linalg.det(frame.cell)))
            w = -np.asarray(atoms.get_stress(voigt=True), dtype=np.float64) * volume
            if frame.plus_stress is not None:
                stress.append((w - frame.plus_stress) / volume)
        if frame.energy is not None:
            energy.append(np.array([(e - frame.energy) / n]))
        if frame.forces is not None:
            forces.append(f - frame.forces)
        if predictions is not None:
            predicted.append(
                CfgFrame(
                    types=frame.types,
                    positions=frame.positions,
                    cell=frame.cell,
                    energy=e,
                    forces=f,
                    plus_stress=w,
                    features=frame.features,
                    ids=frame.ids,
                    extra_columns=frame.extra_columns,
                )
            )
    if predictions is not None:
        write_cfg(predicted, predictions)
    return {
        "configurations": count,
        "atoms": atoms_total,
        "energy_per_atom": _stats(energy),
        "forces": _stats(forces),
        "stress": _stats(stress),
    }
