"""Trained ``.mtp`` files <-> SUS2 models, in both directions.

* :func:`mtp_parameters` / :func:`import_mtp`: a NequIP model with exactly the parameters and
  program of a trained ``.mtp`` file (the species order is external, see
  :func:`nequip_sus2.io.species.read_type_names`); :func:`import_mtp_to_package` writes it as a
  ``.nequip.zip`` package.
* :func:`model_to_mtp` / :func:`export_mtp` turn a SUS2 model (built here, or loaded from a
  checkpoint or package) back into an ``.mtp`` file in the original writer's layout, with the
  contraction program the model was built with. A model imported from a file and left unchanged
  is written back byte for byte (without the final newline, as the original writer does); a
  full-rank model is re-expanded to the published basis with zero coefficients on the dropped
  duplicates.

The file format itself (reading, writing, checks) is :mod:`nequip_sus2.io.mtp`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase.io import read as read_structures
from hydra.utils import get_method

from .._files import replacing
from ..data.distances import shortest_pair_distances
from ..errors import InteropError
from ..package import ensure_global_state, load_model, sha256, write_package
from ..program import (
    SCALING_MAPS,
    ContractionProgram,
    generate_program,
    infer_scaling_map,
    num_scaling_channels,
    scaling_channel_of_mu,
)
from .cfg import read_cfg
from .mtp import MTPFile, read_mtp, write_mtp
from .mtp import check_finite as check_mtp_numbers
from .species import check_type_names

__all__ = [
    "export_mtp",
    "import_mtp",
    "import_mtp_to_package",
    "model_to_mtp",
    "mtp_file_info",
    "mtp_parameters",
    "repulsive_core_radii",
]

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
#: attribute of the contraction module that keeps the ``.mtp`` header fields beyond the model's
#: parameters (``L``, ``scaling_map``, ``min_dist``, names, ...); plain Python types, so it
#: travels with pickled and packaged models and lets :func:`export_mtp` write files exactly
MTP_INFO_ATTR = "mtp_info"
#: the model builder of an imported ``.mtp`` file
_BUILDER = "nequip_sus2.model.SUS2FromMTP"


# ----------------------------------------------------------------------------------------------
# .mtp -> model
# ----------------------------------------------------------------------------------------------


def mtp_file_info(mtp: MTPFile) -> dict:
    """What ``mtp`` stores beyond the model's parameters, as plain Python types.

    Header fields (``min_dist`` is not used in evaluation) and the original ``b`` and ``s`` (the
    model holds ``b + s``, from which ``b`` is not always recovered bit for bit). The program,
    in file order, is added by the builder.
    """
    return {
        "version": mtp.version,
        "potential_name": mtp.potential_name,
        "scaling": mtp.scaling,
        "radial_scaling": mtp.radial_scaling,
        "potential_tag": mtp.potential_tag,
        "radial_basis_type": mtp.radial_basis_type,
        "min_dist": mtp.min_dist,
        "L": mtp.L,
        "scaling_map": mtp.scaling_map,
        "shift_coeffs": list(mtp.shift_coeffs) if mtp.shift_coeffs is not None else None,
        "species_coeffs": list(mtp.species_coeffs) if mtp.species_coeffs is not None else None,
    }


def mtp_parameters(mtp: MTPFile, type_names: Sequence[str]) -> dict:
    """The keyword arguments of the SUS2 modules that reproduce a trained ``.mtp`` exactly."""
    if not mtp.is_trained:
        raise ValueError("the .mtp file is an untrained template (no coefficient blocks)")
    C, n_mu, R = mtp.species_count, mtp.radial_funcs_count, mtp.radial_basis_size
    n_eta = num_scaling_channels(mtp.scaling_map, n_mu, mtp.L)
    scal = torch.tensor(mtp.scal_coeffs, dtype=torch.float64).view(n_eta, 2, C, C)
    rows = torch.tensor(mtp.radial_coeffs, dtype=torch.float64)  # [N_mu, R + C]
    s = torch.tensor(mtp.species_coeffs, dtype=torch.float64)
    b = torch.tensor(mtp.shift_coeffs, dtype=torch.float64)
    return {
        "r_max": mtp.max_dist,
        "program": mtp.program,
        "eta_of_mu": scaling_channel_of_mu(mtp.scaling_map, mtp.L, n_mu),
        "radial_basis_size": R,
        "radial_scaling": mtp.sigma,
        "alpha": scal[:, 0],
        "r0": scal[:, 1],
        "radial_coeffs": rows[:, :R],
        "species_weights": rows[0, R:],
        "unused_weights": rows[1:, R:],
        "theta": torch.tensor(mtp.moment_coeffs, dtype=torch.float64),
        "per_type_energy_scales": dict(zip(type_names, s.tolist(), strict=True)),
        "per_type_energy_shifts": dict(zip(type_names, (b + s).tolist(), strict=True)),
        "mtp_info": mtp_file_info(mtp),
    }


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
    names = check_type_names(list(type_names), f"{path}: type_names")
    if len(names) != mtp.species_count:
        line = _field_line(path, "species_count")
        where = f"{path}:{line}" if line else path
        raise InteropError(
            f"{where}: field 'species_count': the file has {mtp.species_count} species but "
            f"{len(names)} type names were given ({' '.join(names)})"
        )
    return names


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
    ensure_global_state()
    # the builder its package records, looked up by name (io/ does not import model/; the
    # builder in turn reads the file with mtp_parameters)
    config = _builder_config(path, names, model_dtype, repulsive_core, repulsive_core_width)
    config.update(
        seed=seed, pair_scaling_trainable=pair_scaling_trainable, compile_mode=compile_mode
    )
    builder = get_method(config.pop("_target_"))
    return builder(**config)


def _builder_config(
    path: str,
    type_names: Sequence[str],
    model_dtype: str,
    repulsive_core: float | dict[str, float] | str | None,
    repulsive_core_width: float,
) -> dict:
    """The model config of an imported file (what a package of it records)."""
    core = {}
    if repulsive_core is not None:
        core = {"repulsive_core": repulsive_core, "repulsive_core_width": repulsive_core_width}
    return {
        "_target_": _BUILDER,
        "mtp_path": os.path.abspath(path),
        "type_names": list(type_names),
        "model_dtype": model_dtype,
        **core,
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
        frames = []
        for k, frame in enumerate(read_cfg(spec)):
            if frame.types.size and int(frame.types.max()) >= len(names):
                raise InteropError(
                    f"{spec}: configuration {k + 1} has type {int(frame.types.max())}, but the "
                    f"model has {len(names)} species"
                )
            frames.append(frame.to_atoms(names))
    else:
        frames = read_structures(spec, index=":")
        for k, atoms in enumerate(frames):
            unknown = sorted(set(atoms.get_chemical_symbols()) - set(names))
            if unknown:
                raise InteropError(
                    f"{spec}: structure {k + 1} has species {unknown} that are not among the "
                    f"model's type names"
                )
    radii = shortest_pair_distances(frames, names, cutoff=mtp.max_dist)
    return {**radii, "default": float(mtp.min_dist)}


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
    config = {
        "source": "nequip-sus2 import-mtp",
        "mtp_file": os.path.abspath(path),
        "mtp_sha256": sha256(path),
        "model": _builder_config(
            path, model.type_names, model_dtype, repulsive_core, repulsive_core_width
        ),
    }
    return write_package(model, out, config=config)


# ----------------------------------------------------------------------------------------------
# model -> .mtp
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
    """The contraction program the model was built with, in its own entry order, checked
    against the sizes of the ``MomentContraction`` module and of theta."""
    # the contraction module carries it; models packaged by earlier versions kept it in ``info``
    stored = getattr(moments, "program", None) or info.get("program")
    if stored is None:
        raise InteropError(
            "the model does not record its contraction program (not built by "
            "nequip_sus2.model.SUS2Model / SUS2FromMTP of this version); rebuild it to export"
        )
    program = ContractionProgram.from_dict(stored)
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
    if any(type(m).__name__ == "RepulsiveCore" for m in model.modules()):
        raise InteropError(
            "the model has a repulsive core (repulsive_core), a term the .mtp format cannot "
            "represent; export is refused (export the model built without it)"
        )
    mods = _sus2_modules(model)
    scaling, radial = mods["UniversalPairScaling"], mods["ChebyshevRadialBasis"]
    embedding, moments = mods["DecoupledElementEmbedding"], mods["MomentContraction"]
    readout, scale_shift = mods["LinearReadout"], mods["PerTypeScaleShift"]
    # header fields: on the contraction module (models packaged earlier: on the scaling module)
    info: dict = dict(getattr(moments, MTP_INFO_ATTR, None) or getattr(scaling, MTP_INFO_ATTR, {}))

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
    scaling_map = info.get("scaling_map") or infer_scaling_map(eta_of_mu, L)
    if scaling_map is None:
        raise InteropError(
            f"the model's scaling channels per radial function {eta_of_mu} match none of the "
            f".mtp scaling maps {', '.join(SCALING_MAPS)}"
        )
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
    with replacing(out) as tmp:
        write_mtp(mtp, tmp)
        if read_mtp(tmp).parameter_count() != mtp.parameter_count():  # pragma: no cover
            raise InteropError(f"{out}: the written file does not read back")
    return list(model.type_names)
