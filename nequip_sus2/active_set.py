"""Extrapolation grade and active learning: MaxVol active sets of training environments.

The SUS2 energy is linear in the per-atom scalar basis ``B(i)`` (``[N_B]``), so the
D-optimality criterion of linear regression applies to it directly (as in MTP's active
learning): for every species ``Z`` choose ``N_B`` training environments whose basis rows form a
square matrix ``A_Z`` of maximal ``|det A_Z|``. A new environment ``b`` is then written as
``b = c A_Z``; its *extrapolation grade* is ``gamma = max_a |c_a|``. Inside the active set's
"convex hull" in this sense ``gamma <= 1``; ``gamma > 1`` means the model extrapolates.

* :func:`maxvol` finds such a (locally) maximal-volume row subset (Goreinov-Tyrtyshnikov
  MaxVol: start from a column-pivoted QR, then swap rows while some coefficient exceeds
  ``1 + tol``, each swap multiplying ``|det|`` by that coefficient).
* :func:`build_active_set` evaluates ``B`` on training structures and runs MaxVol per species.
* :func:`add_extrapolation_grade` inserts :class:`nequip_sus2.nn.ExtrapolationGrade` (static
  per-species ``A_Z^{-1}`` buffers) after ``moments``, so every forward pass also writes the
  per-atom field ``sus2_extrapolation_grade``; it survives checkpoints, packages and AOT compile.
* :func:`nequip_sus2.graded_model.write_model_with_grade` does both for a saved model
  (checkpoint or package); ``nequip-sus2 active-set`` is its command line.
* :func:`select_add` picks, from candidate structures (e.g. saved during MD when the grade
  exceeded a threshold), those that extend the active set (like MLIP's ``select-add``).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from ase.io import read as ase_read
from nequip.data import AtomicDataDict, compute_neighborlist_, from_ase, from_dict
from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper
from nequip.model import modify
from scipy.linalg import qr

from ._console import one_line, progress_bar
from ._files import replacing
from ._keys import SCALAR_BASIS_KEY
from .io.cfg import CfgFrame, read_cfg
from .io.datafile import check_extxyz_frame, check_type_range
from .nn.extrapolation import (
    GRADE_MODULE_NAME,
    ExtrapolationGrade,
    grade_modifier_config,
    insert_extrapolation_grade,
    moments_networks,
)

__all__ = [
    "ActiveSet",
    "MaxVolResult",
    "active_set_from_basis",
    "add_extrapolation_grade",
    "build_active_set",
    "compute_scalar_basis",
    "default_rank_rtol",
    "maxvol",
    "select_add",
    "structures_to_data",
    "with_extrapolation_grade",
]

#: residual scale given to species without any training environment (gamma becomes huge)
_ABSENT_SCALE = 1e-30


# ----------------------------------------------------------------------------------------------
# MaxVol
# ----------------------------------------------------------------------------------------------


@dataclass
class MaxVolResult:
    """Rows ``indices`` of ``X`` (``[r]``) with ``coefficients = X @ inv(X[indices])``."""

    indices: np.ndarray
    coefficients: np.ndarray
    num_swaps: int

    @property
    def max_coefficient(self) -> float:
        return float(np.abs(self.coefficients).max()) if self.coefficients.size else 0.0


def _initial_rows(X: np.ndarray) -> np.ndarray:
    """``r`` well-conditioned rows of ``X`` (``[n, r]``): column-pivoted QR of ``X^T``."""
    _, _, perm = qr(X.T, mode="economic", pivoting=True)
    return np.asarray(perm[: X.shape[1]], dtype=np.int64)


def maxvol(
    X: np.ndarray,
    tol: float = 1e-3,
    max_swaps: int | None = None,
    init: Sequence[int] | None = None,
    refresh_every: int = 64,
) -> MaxVolResult:
    """Dominant ``r x r`` submatrix of ``X`` (``[n, r]``, ``n >= r``, full column rank).

    Starting from ``init`` (default: the pivots of a column-pivoted QR of ``X^T``), row ``j`` of
    the active set is replaced by row ``i`` of ``X`` while ``|C_ij| > 1 + tol``, where
    ``C = X A^{-1}``; each swap multiplies ``|det A|`` by ``|C_ij|``, so the loop terminates, and
    on exit every row of ``X`` is a combination of the active rows with coefficients of modulus
    ``<= 1 + tol`` (active rows: unit vectors). ``C`` is updated by the rank-one formula
    ``C <- C - C[:, j] (C[i] - e_j) / C[i, j]`` and recomputed exactly every ``refresh_every``
    swaps and at the end.
    """
    X = np.asarray(X, dtype=np.float64)
    n, r = X.shape
    if n < r:
        raise ValueError(f"maxvol needs at least as many rows as columns, got {X.shape}")
    if r == 0:
        return MaxVolResult(np.zeros(0, dtype=np.int64), np.zeros((n, 0)), 0)
    idx = _initial_rows(X) if init is None else np.asarray(init, dtype=np.int64).copy()
    if idx.shape != (r,) or len(set(idx.tolist())) != r:
        raise ValueError(f"init must hold {r} distinct row indices")

    def exact(rows: np.ndarray) -> np.ndarray:
        A = X[rows]
        return np.linalg.solve(A.T, X.T).T

    C = exact(idx)
    if max_swaps is None:
        max_swaps = 100 * r + 1000
    swaps = 0
    while swaps < max_swaps:
        flat = int(np.argmax(np.abs(C)))
        i, j = divmod(flat, r)
        if abs(C[i, j]) <= 1.0 + tol:
            break
        u = C[i].copy()
        u[j] -= 1.0
        C -= np.outer(C[:, j] / C[i, j], u)
        idx[j] = i
        swaps += 1
        if swaps % refresh_every == 0:
            C = exact(idx)
    C = exact(idx)
    return MaxVolResult(idx, C, swaps)


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


def _read_structures(path: str | os.PathLike, type_names: Sequence[str] | None) -> list:
    """extxyz/anything ASE reads -> ``ase.Atoms``; ``.cfg`` -> :class:`CfgFrame` (types are
    indices into the model's ``type_names``, checked against them when given).

    A file that cannot be read raises ``ValueError`` (or ``OSError``) naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, "no such file", path)
    if path.endswith(".cfg"):
        frames = read_cfg(path)
        if type_names is not None:
            for index, frame in enumerate(frames):
                check_type_range(frame, index, path, list(type_names))
        structures: list = frames
    else:
        try:
            structures = list(ase_read(path, index=":"))
        except Exception as e:  # ASE's readers raise all sorts of errors on a malformed file
            raise ValueError(f"{path}: cannot read structures ({one_line(e)})") from e
        # nan/inf numbers and singular cells (with line numbers for extxyz)
        line: int | None = 1 if path.lower().endswith((".xyz", ".extxyz")) else None
        for index, atoms in enumerate(structures):
            check_extxyz_frame(atoms, path, line, index)
            if line is not None:
                line += len(atoms) + 2
    if not structures:
        raise ValueError(f"{path}: no structures in the file")
    return structures


def structures_to_data(
    structures: Iterable[Any],
    type_names: Sequence[str],
    r_max: float,
    chemical_species_to_atom_type_map: dict[str, str] | None = None,
    progress: bool | None = False,
) -> list[dict]:
    """``AtomicDataDict``s with neighbour lists for ``ase.Atoms`` (species by chemical symbol,
    mapped by ``chemical_species_to_atom_type_map``, default identity), ``.cfg`` frames (type
    indices) or ready ``AtomicDataDict``s (used as they are).

    A species with no model type raises ``ValueError`` naming the structure (0-based index).
    ``progress``: tqdm bar over the structures (see :func:`compute_scalar_basis`).
    """
    type_names = list(type_names)
    species_map = chemical_species_to_atom_type_map or {t: t for t in type_names}
    mapper = None
    out = []
    structures = list(structures)
    with progress_bar(
        progress, leave=False, total=len(structures), desc="neighbour lists", unit="structure"
    ) as bar:
        for index, s in enumerate(structures):
            bar.update()
            if isinstance(s, dict):
                out.append(s)
                continue
            if isinstance(s, CfgFrame):
                if s.n_atoms and int(s.types.max()) >= len(type_names):
                    raise ValueError(
                        f"structure {index}: type {int(s.types.max())} is out of range for the "
                        f"{len(type_names)} model types ({' '.join(type_names)})"
                    )
                d = {
                    AtomicDataDict.POSITIONS_KEY: np.asarray(s.positions, dtype=np.float64),
                    AtomicDataDict.ATOM_TYPE_KEY: np.asarray(s.types, dtype=np.int64),
                }
                if s.cell is None:
                    d[AtomicDataDict.PBC_KEY] = np.zeros(3, dtype=bool)
                else:
                    d[AtomicDataDict.CELL_KEY] = np.asarray(s.cell, dtype=np.float64)
                    d[AtomicDataDict.PBC_KEY] = s.pbc
                data = from_dict(d)
            else:  # ase.Atoms
                unknown = sorted(set(s.get_chemical_symbols()) - set(species_map))
                if unknown:
                    raise ValueError(
                        f"structure {index}: species {' '.join(unknown)} not known to the model "
                        f"(model types: {' '.join(type_names)}; chemical species map: "
                        + " ".join(f"{k}={v}" for k, v in species_map.items())
                        + ")"
                    )
                if mapper is None:
                    mapper = ChemicalSpeciesToAtomTypeMapper(
                        model_type_names=type_names,
                        chemical_species_to_atom_type_map=species_map,
                    )
                data = mapper(from_ase(s))
            data[AtomicDataDict.ATOM_TYPE_KEY] = data[AtomicDataDict.ATOM_TYPE_KEY].to(torch.long)
            out.append(compute_neighborlist_(data, r_max=float(r_max)))
    return out


# ----------------------------------------------------------------------------------------------
# model internals (by class name, so models loaded from packages work too)
# ----------------------------------------------------------------------------------------------


def _graph_model(model):
    """The ``GraphModel`` of a model or a ``ModuleDict`` holding exactly one."""
    if hasattr(model, "is_graph_model"):
        return model
    if hasattr(model, "values"):
        models = list(model.values())
        if len(models) == 1 and hasattr(models[0], "is_graph_model"):
            return models[0]
    raise TypeError("expected a NequIP GraphModel")


def _batch(chunk: Sequence[dict]):
    """``chunk`` as one batch of the model's inputs.

    Only positions, types and the neighbour list (with ``cell``, ``edge_cell_shift`` and
    ``pbc``) are kept, so other fields present in some structures only (labels, info) do not
    stop batching. Non-periodic structures without a cell get a zero cell, ``pbc`` False and zero
    cell shifts when batched with periodic ones, as ``nequip.data.from_ase`` gives them: the
    edge vectors, and so every per-atom result, are those of the structure on its own.
    """
    cell_keys = (AtomicDataDict.CELL_KEY, AtomicDataDict.EDGE_CELL_SHIFT_KEY)
    keep = (
        AtomicDataDict.POSITIONS_KEY,
        AtomicDataDict.ATOM_TYPE_KEY,
        AtomicDataDict.EDGE_INDEX_KEY,
        AtomicDataDict.PBC_KEY,
        *cell_keys,
    )
    periodic = any(k in d for d in chunk for k in cell_keys)
    items = []
    for d in chunk:
        item = {k: d[k] for k in keep if k in d}
        pos = item[AtomicDataDict.POSITIONS_KEY]
        if periodic:
            if AtomicDataDict.CELL_KEY not in item:
                item[AtomicDataDict.CELL_KEY] = pos.new_zeros((1, 3, 3))
                item[AtomicDataDict.PBC_KEY] = torch.zeros((1, 3), dtype=torch.bool)
            if AtomicDataDict.EDGE_CELL_SHIFT_KEY not in item:
                num_edges = item[AtomicDataDict.EDGE_INDEX_KEY].shape[1]
                item[AtomicDataDict.EDGE_CELL_SHIFT_KEY] = pos.new_zeros((num_edges, 3))
        if AtomicDataDict.PBC_KEY not in item:
            item[AtomicDataDict.PBC_KEY] = torch.zeros((1, 3), dtype=torch.bool)
        items.append(item)
    return AtomicDataDict.batched_from_list(items)


def compute_scalar_basis(
    model, data: Sequence[dict], batch_size: int = 8, progress: bool | None = False
):
    """Per-atom scalar basis of every structure.

    Returns ``(B, types, frame, atom)``: ``B`` ``[N, N_B]`` float64 (computed in the model's
    dtype, as at inference), atom types, structure index and atom index within it, numpy.
    Periodic and non-periodic structures may be mixed in one batch. ``progress``: a tqdm bar on
    stderr over the structures (``None``: only when stderr is a terminal).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    gm = _graph_model(model)
    net = moments_networks(gm)[0]
    if getattr(net._modules["moments"], "fold_readout", False):
        raise ValueError(
            "the model runs with enable_fused_moments, which applies the readout inside the "
            "kernel and never forms the scalar basis: use the model without that modifier"
        )
    device = next(iter(gm.parameters())).device
    rows, types, frames, atoms = [], [], [], []
    bar = progress_bar(
        progress, leave=False, total=len(data), desc="scalar basis", unit="structure"
    )
    with torch.no_grad(), bar:
        for start in range(0, len(data), batch_size):
            chunk = list(data[start : start + batch_size])
            batch = AtomicDataDict.to_(_batch(chunk), device)
            inputs = {k: batch[k] for k in gm.model_input_fields if k in batch}
            out = net(inputs)
            rows.append(out[SCALAR_BASIS_KEY].detach().to("cpu", torch.float64).numpy())
            t = batch[AtomicDataDict.ATOM_TYPE_KEY].view(-1).cpu().numpy()
            types.append(t)
            counts = [AtomicDataDict.num_nodes(d) for d in chunk]
            frames.append(np.repeat(np.arange(start, start + len(chunk)), counts))
            atoms.append(np.concatenate([np.arange(c) for c in counts]))
            bar.update(len(chunk))
    return (
        np.concatenate(rows),
        np.concatenate(types).astype(np.int64),
        np.concatenate(frames).astype(np.int64),
        np.concatenate(atoms).astype(np.int64),
    )


# ----------------------------------------------------------------------------------------------
# active set
# ----------------------------------------------------------------------------------------------


@dataclass
class ActiveSet:
    """Per-species MaxVol active sets and the matrices the grade module needs.

    ``inverse[Z]`` maps a basis row to its coefficients on the active rows of species ``Z``;
    ``residual``/``residual_scale`` handle species whose training environments span fewer than
    ``N_B`` dimensions (``None`` if all are full rank). ``active[Z]`` lists the active
    environments as ``(structure index, atom index)`` pairs of the data it was built from.
    """

    type_names: list[str]
    num_basis: int
    inverse: np.ndarray
    residual: np.ndarray | None
    residual_scale: np.ndarray
    ranks: list[int]
    counts: list[int]
    active: list[list[tuple[int, int]]]
    tol: float
    num_swaps: list[int] = field(default_factory=list)

    def grade(self, B: np.ndarray, types: np.ndarray) -> np.ndarray:
        """The extrapolation grade of rows ``B`` (``[N, N_B]``) of species ``types`` (numpy)."""
        B = np.asarray(B, dtype=np.float64)
        types = np.asarray(types, dtype=np.int64)
        coeff = np.einsum("na,nab->nb", B, self.inverse[types])
        gamma = np.abs(coeff).max(axis=1) if B.shape[1] else np.zeros(len(B))
        if self.residual is not None:
            out = np.einsum("na,nab->nb", B, self.residual[types])
            gamma = np.maximum(gamma, np.linalg.norm(out, axis=1) / self.residual_scale[types])
        return gamma

    def module(self, irreps_in=None):
        """An :class:`nequip_sus2.nn.ExtrapolationGrade` holding this active set."""
        st = self.state()
        return ExtrapolationGrade(
            num_types=len(self.type_names),
            num_basis=self.num_basis,
            inverse=st["inverse"],
            residual=st["residual"] if self.residual is not None else None,
            residual_scale=st["residual_scale"],
            irreps_in=irreps_in,
        )

    def state(self) -> dict:
        """The grade module's buffers as tensors (``inverse``, ``residual``, ``residual_scale``)."""
        residual = (
            torch.zeros(0, dtype=torch.float64)
            if self.residual is None
            else torch.as_tensor(self.residual)
        )
        return {
            "inverse": torch.as_tensor(self.inverse),
            "residual": residual,
            "residual_scale": torch.as_tensor(self.residual_scale),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the grade module's buffers and this set's bookkeeping (``torch.save``); the
        file is what the ``add_extrapolation_grade`` model modifier reads (``state``)."""
        info = {
            "type_names": self.type_names,
            "ranks": self.ranks,
            "counts": self.counts,
            "active": self.active,
            "tol": self.tol,
            "num_swaps": self.num_swaps,
        }
        with replacing(path) as tmp:
            torch.save({**self.state(), "info": info}, tmp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ActiveSet:
        """Read a file written by :meth:`save`."""
        d = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
        info = d.get("info", {})
        residual = d["residual"].double().numpy()
        inverse = d["inverse"].double().numpy()
        C = inverse.shape[0]
        return cls(
            type_names=list(info.get("type_names", [str(z) for z in range(C)])),
            num_basis=inverse.shape[-1],
            inverse=inverse,
            residual=residual if residual.size else None,
            residual_scale=d["residual_scale"].double().numpy(),
            ranks=list(info.get("ranks", [])),
            counts=list(info.get("counts", [])),
            active=[[tuple(p) for p in a] for a in info.get("active", [])],
            tol=float(info.get("tol", 0.0)),
            num_swaps=list(info.get("num_swaps", [])),
        )

    def summary(self) -> str:
        lines = [f"active set: N_B = {self.num_basis}, MaxVol tol = {self.tol:g}"]
        for z, name in enumerate(self.type_names):
            lines.append(
                f"  {name}: {self.counts[z]} environments, rank {self.ranks[z]}, "
                f"{len(self.active[z])} active"
                + (f", {self.num_swaps[z]} swaps" if self.num_swaps else "")
            )
        return "\n".join(lines)


def _species_active_set(X: np.ndarray, tol: float, rank_rtol: float):
    """MaxVol for one species in scaled SVD coordinates.

    Returns ``(inverse [N_B, N_B], residual [N_B, N_B] | None, residual_scale, rank, active rows,
    swaps)``.
    """
    n, nb = X.shape
    if n == 0:
        return np.zeros((nb, nb)), np.eye(nb), _ABSENT_SCALE, 0, np.zeros(0, np.int64), 0
    d = np.linalg.norm(X, axis=0)
    d = np.where(d > 0, d, 1.0)
    Xn = X / d
    _, s, Vt = np.linalg.svd(Xn, full_matrices=True)
    rank = int((s > rank_rtol * s[0]).sum()) if s.size and s[0] > 0 else 0
    Vr = Vt[:rank].T  # [N_B, r]
    Y = Xn @ Vr
    res = maxvol(Y, tol=tol)
    inverse = np.zeros((nb, nb))
    inverse[:, :rank] = (Vr / d[:, None]) @ np.linalg.inv(Y[res.indices])
    if rank == nb:
        return inverse, None, 1.0, rank, res.indices, res.num_swaps
    complement = np.eye(nb) - Vr @ Vr.T
    residual = complement / d[:, None]
    # the largest out-of-span component seen in training, floored at the SVD cutoff (below it a
    # component is round-off, like the singular values dropped from the span)
    scale = max(float(np.linalg.norm(Xn @ complement, axis=1).max()), rank_rtol * float(s[0]))
    if not scale > 0:
        scale = _ABSENT_SCALE
    return inverse, residual, scale, rank, res.indices, res.num_swaps


def active_set_from_basis(
    B: np.ndarray,
    types: np.ndarray,
    type_names: Sequence[str],
    frame: np.ndarray | None = None,
    atom: np.ndarray | None = None,
    tol: float = 1e-3,
    rank_rtol: float = 1e-8,
) -> ActiveSet:
    """:class:`ActiveSet` from basis rows ``B`` (``[N, N_B]``) of species ``types``.

    ``rank_rtol``: directions of a species' (column-scaled) environments with singular values
    below ``rank_rtol`` times the largest are treated as outside their span (see
    :func:`default_rank_rtol`).
    """
    B = np.asarray(B, dtype=np.float64)
    types = np.asarray(types, dtype=np.int64)
    frame = np.arange(len(B)) if frame is None else np.asarray(frame)
    atom = np.zeros(len(B), np.int64) if atom is None else np.asarray(atom)
    C, nb = len(type_names), B.shape[1]
    inverse = np.zeros((C, nb, nb))
    residual = np.zeros((C, nb, nb))
    scales = np.ones(C)
    ranks, counts, active, swaps = [], [], [], []
    any_residual = False
    for z in range(C):
        rows = np.flatnonzero(types == z)
        inv, resid, scale, rank, idx, nsw = _species_active_set(B[rows], tol, rank_rtol)
        inverse[z] = inv
        if resid is not None:
            residual[z] = resid
            any_residual = True
        scales[z] = scale
        ranks.append(rank)
        counts.append(len(rows))
        active.append([(int(frame[rows[i]]), int(atom[rows[i]])) for i in idx])
        swaps.append(nsw)
    return ActiveSet(
        type_names=list(type_names),
        num_basis=nb,
        inverse=inverse,
        residual=residual if any_residual else None,
        residual_scale=scales,
        ranks=ranks,
        counts=counts,
        active=active,
        tol=tol,
        num_swaps=swaps,
    )


def default_rank_rtol(model_dtype) -> float:
    """Span cutoff matched to the precision of ``B``: 1e-4 for float32 models, 1e-8 for
    float64.

    ``B`` carries round-off of about 1e-5 (float32) / 1e-14 (float64) of each column's scale,
    which differs between evaluations (batching, eager vs. AOT-compiled). Directions resolved
    below the cutoff would amplify it into the grade (a float32 model with cutoff 1e-10 gave
    grades of ~25 instead of 1 after AOT compilation); with these cutoffs the grades of eager
    and compiled float32 models agree to ~4e-5.
    """
    low = (torch.float32, "float32", torch.float16, torch.bfloat16)
    return 1e-4 if model_dtype in low else 1e-8


def build_active_set(
    model,
    structures: Iterable[Any] | str | os.PathLike,
    tol: float = 1e-3,
    rank_rtol: float | None = None,
    batch_size: int = 8,
    chemical_species_to_atom_type_map: dict[str, str] | None = None,
    progress: bool | None = False,
) -> ActiveSet:
    """MaxVol active set of ``model``'s scalar basis over ``structures`` (a file path, extxyz or
    ``.cfg``; or ``ase.Atoms`` / ``.cfg`` frames / ``AtomicDataDict``s), one per species.

    After MaxVol converges every environment of ``structures`` has ``gamma <= 1 + tol``.
    ``rank_rtol``: see :func:`active_set_from_basis` (default :func:`default_rank_rtol` of the
    model's dtype). ``progress``: tqdm bars (see :func:`compute_scalar_basis`).
    """
    gm = _graph_model(model)
    if rank_rtol is None:
        rank_rtol = default_rank_rtol(getattr(gm, "model_dtype", "float64"))
    type_names = list(gm.type_names)
    if isinstance(structures, (str, os.PathLike)):
        structures = _read_structures(structures, type_names)
    data = structures_to_data(
        structures,
        type_names,
        float(gm.metadata["r_max"]),
        chemical_species_to_atom_type_map,
        progress=progress,
    )
    B, types, frame, atom = compute_scalar_basis(gm, data, batch_size=batch_size, progress=progress)
    return active_set_from_basis(B, types, type_names, frame, atom, tol=tol, rank_rtol=rank_rtol)


def add_extrapolation_grade(model, active_set: ActiveSet, module_class=None):
    """Insert (or refresh) the extrapolation-grade module after ``moments``, in place (what the
    ``add_extrapolation_grade`` model modifier does with ``active_set``'s buffers).

    Works on a ``GraphModel``, a ``ModuleDict`` of them and models from packages (every
    ``SequentialGraphNetwork`` with a ``moments`` child gets one, e.g. also inside the
    train-time-compile variant). ``module_class`` overrides the class to instantiate (used for
    packaged models, whose code comes from the package). Returns ``model``.
    """
    return insert_extrapolation_grade(model, active_set.state(), module_class=module_class)


# ----------------------------------------------------------------------------------------------
# saved models
# ----------------------------------------------------------------------------------------------

#: the model builder that checkpoints written before the grade became a model modifier record
_LEGACY_BUILDER = "nequip_sus2.active_set.with_extrapolation_grade"
_MODIFY = "nequip.model.modify"


def with_extrapolation_grade(
    model: dict,
    num_types: int,
    num_basis: int,
    has_residual: bool = False,
) -> Any:
    """Model builder of checkpoints with a grade written by earlier versions: builds ``model``
    (a config with ``_target_``) with the ``add_extrapolation_grade`` modifier applied (an
    empty grade whose buffers the checkpoint's ``state_dict`` fills).

    .. code-block:: yaml

      model:
        _target_: nequip_sus2.active_set.with_extrapolation_grade
        num_types: 7
        num_basis: 169
        model: {_target_: nequip_sus2.model.SUS2Model, ...}

    Checkpoints written now record ``nequip.model.modify`` with that modifier instead.
    """
    return modify(model, [grade_modifier_config(num_types, num_basis, has_residual)])


# ----------------------------------------------------------------------------------------------
# active learning: select-add
# ----------------------------------------------------------------------------------------------


def _grade_modules(model) -> list:
    mods = [m for n, m in model.named_modules() if n.split(".")[-1] == GRADE_MODULE_NAME]
    if not mods:
        raise ValueError(
            "the model has no extrapolation grade; build one first (write_model_with_grade)"
        )
    return mods


def select_add(
    model,
    candidates: Iterable[Any] | str | os.PathLike,
    tol: float = 1e-3,
    threshold: float = 1.0 + 1e-3,
    batch_size: int = 8,
    update_model: bool = False,
    chemical_species_to_atom_type_map: dict[str, str] | None = None,
    progress: bool | None = False,
) -> tuple[list[int], np.ndarray]:
    """Candidate structures that extend the model's active set (MLIP ``select-add``).

    MaxVol continues from the model's active set over the candidates' environments whose grade
    exceeds ``threshold`` (per species, using only ``A_Z^{-1}``: a swap of active row ``j`` for
    candidate row ``i`` updates ``A_Z^{-1} <- A_Z^{-1} (I - e_j (c_i - e_j)^T / c_ij)``); the
    structures owning the environments that end up active are selected. Environments outside a
    rank-deficient species' training span (seen only by the residual term) are selected when
    their grade is above ``threshold``. Returns ``(sorted selected indices, max grade per
    candidate)``; with ``update_model`` the model's grade module is updated to the enlarged
    active set (for screening further candidates before retraining). ``progress``: tqdm bars
    (see :func:`compute_scalar_basis`).
    """
    gm = _graph_model(model)
    type_names = list(gm.type_names)
    if isinstance(candidates, (str, os.PathLike)):
        candidates = _read_structures(candidates, type_names)
    candidates = list(candidates)
    mods = _grade_modules(gm)
    data = structures_to_data(
        candidates,
        type_names,
        float(gm.metadata["r_max"]),
        chemical_species_to_atom_type_map,
        progress=progress,
    )
    grade = mods[0]
    inverse = grade.inverse.detach().cpu().double().numpy().copy()
    has_res = bool(grade.has_residual)
    residual = grade.residual.detach().cpu().double().numpy() if has_res else None
    scales = grade.residual_scale.detach().cpu().double().numpy()
    B, types, frame, _ = compute_scalar_basis(gm, data, batch_size=batch_size, progress=progress)
    current = ActiveSet(
        type_names=type_names,
        num_basis=B.shape[1],
        inverse=inverse,
        residual=residual,
        residual_scale=scales,
        ranks=[],
        counts=[],
        active=[],
        tol=tol,
    )
    gamma = current.grade(B, types)
    max_gamma = np.zeros(len(candidates))
    np.maximum.at(max_gamma, frame, gamma)
    selected: set[int] = set()
    for z in range(len(type_names)):
        # only extrapolating environments may enter (an interpolating one is never needed)
        rows = np.flatnonzero((types == z) & (gamma > threshold))
        if rows.size == 0:
            continue
        M = inverse[z]
        Cz = B[rows] @ M
        in_set = -np.ones(M.shape[1], dtype=np.int64)  # candidate row now active in slot j
        for _ in range(100 * M.shape[1] + 1000):
            flat = int(np.argmax(np.abs(Cz)))
            i, j = divmod(flat, Cz.shape[1])
            if abs(Cz[i, j]) <= 1.0 + tol:
                break
            u = Cz[i].copy()
            u[j] -= 1.0
            # X (I - e_j u^T / c_ij) = X - X[:, j] u^T / c_ij, for X = A^{-1} and C alike
            M = M - np.outer(M[:, j] / Cz[i, j], u)
            Cz = Cz - np.outer(Cz[:, j] / Cz[i, j], u)
            in_set[j] = i
        selected.update(int(frame[rows[i]]) for i in in_set if i >= 0)
        inverse[z] = M
        if residual is not None:
            outside = np.linalg.norm(B[rows] @ residual[z], axis=1) / scales[z]
            selected.update(int(f) for f in frame[rows][outside > threshold])
    if update_model:
        with torch.no_grad():
            for m in mods:
                m.inverse.copy_(torch.as_tensor(inverse, dtype=m.inverse.dtype))
    return sorted(selected), max_gamma


if __name__ == "__main__":  # python -m nequip_sus2.active_set: the `active-set` command
    # imported here: the command line imports this module
    from nequip_sus2.cli import active_set_main

    raise SystemExit(active_set_main())
