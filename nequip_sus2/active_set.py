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
* :func:`write_model_with_grade` does both for a checkpoint or package and a data file
  (extxyz or ``.cfg``) and writes a new checkpoint or package; :func:`main` is its command line.
* :func:`select_add` picks, from candidate structures (e.g. saved during MD when the grade
  exceeded a threshold), those that extend the active set (like MLIP's ``select-add``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import errno
import logging
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from ._argtypes import positive
from ._console import one_line, progress_bar
from ._keys import EXTRAPOLATION_GRADE_KEY as _GRADE_KEY

__all__ = [
    "ActiveSet",
    "MaxVolResult",
    "SUS2_ASE_TARGET",
    "add_extrapolation_grade",
    "build_active_set",
    "compute_scalar_basis",
    "default_rank_rtol",
    "main",
    "maxvol",
    "register_compile_targets",
    "select_add",
    "select_add_main",
    "structures_to_data",
    "write_model_with_grade",
]

#: ``nequip-compile --target`` for the ASE calculator with the extrapolation grade as an output
SUS2_ASE_TARGET = "sus2_ase"
_GRADE_MODULE_NAME = "extrapolation_grade"
_PACKAGE_SUFFIX = ".nequip.zip"
#: residual scale given to species without any training environment (gamma becomes huge)
_ABSENT_SCALE = 1e-30


def register_compile_targets() -> None:
    """Register ``--target sus2_ase`` with ``nequip-compile`` (the ``ase`` target plus the
    per-atom ``sus2_extrapolation_grade`` output). Light: safe to call from the extension's
    ``__init__``; idempotent."""
    from nequip.scripts._compile_utils import AOTI_ASE_TARGET, COMPILE_TARGET_DICT
    from nequip.scripts._compile_utils import register_compile_targets as _register

    if SUS2_ASE_TARGET in COMPILE_TARGET_DICT:
        return
    base = COMPILE_TARGET_DICT[AOTI_ASE_TARGET]
    _register({SUS2_ASE_TARGET: {**base, "output": [*base["output"], _GRADE_KEY]}})


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
    from scipy.linalg import qr

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
        from .interop import check_type_range
        from .io.cfg import read_cfg

        frames = read_cfg(path)
        if type_names is not None:
            for index, frame in enumerate(frames):
                check_type_range(frame, index, path, list(type_names))
        structures: list = frames
    else:
        from ase.io import read

        from .interop import check_extxyz_frame

        try:
            structures = list(read(path, index=":"))
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
    import torch
    from nequip.data import AtomicDataDict, compute_neighborlist_, from_ase, from_dict
    from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper

    from .io.cfg import CfgFrame

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


def _moments_networks(model) -> list:
    """Every ``SequentialGraphNetwork`` in ``model`` that has a ``moments`` child."""
    found = []
    for module in model.modules():
        if type(module).__name__ == "SequentialGraphNetwork" and "moments" in module._modules:
            found.append(module)
    if not found:
        raise TypeError("not a SUS2 model: no SequentialGraphNetwork with a `moments` module")
    return found


def _batch(chunk: Sequence[dict]):
    """``chunk`` as one batch of the model's inputs.

    Only positions, types and the neighbour list (with ``cell``, ``edge_cell_shift`` and
    ``pbc``) are kept, so other fields present in some structures only (labels, info) do not
    stop batching. Non-periodic structures without a cell get a zero cell, ``pbc`` False and zero
    cell shifts when batched with periodic ones, as ``nequip.data.from_ase`` gives them: the
    edge vectors, and so every per-atom result, are those of the structure on its own.
    """
    import torch
    from nequip.data import AtomicDataDict

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
    import torch
    from nequip.data import AtomicDataDict

    from ._keys import SCALAR_BASIS_KEY

    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    gm = _graph_model(model)
    net = _moments_networks(gm)[0]
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
        from .nn.extrapolation import ExtrapolationGrade

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
        import torch

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
        file is what ``insert_extrapolation_grade`` (and a model modifier built on it) reads."""
        import torch

        info = {
            "type_names": self.type_names,
            "ranks": self.ranks,
            "counts": self.counts,
            "active": self.active,
            "tol": self.tol,
            "num_swaps": self.num_swaps,
        }
        from .interop import _replacing

        with _replacing(Path(path)) as tmp:
            torch.save({**self.state(), "info": info}, tmp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ActiveSet:
        """Read a file written by :meth:`save`."""
        import torch

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
    import torch

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
    """Insert (or refresh) the extrapolation-grade module after ``moments``, in place.

    Works on a ``GraphModel``, a ``ModuleDict`` of them and models from packages (every
    ``SequentialGraphNetwork`` with a ``moments`` child gets one, e.g. also inside the
    train-time-compile variant). ``module_class`` overrides the class to instantiate (used for
    packaged models, whose code comes from the package). Returns ``model``.
    """
    from .nn.extrapolation import insert_extrapolation_grade

    return insert_extrapolation_grade(model, active_set.state(), module_class=module_class)


# ----------------------------------------------------------------------------------------------
# saved models
# ----------------------------------------------------------------------------------------------


def with_extrapolation_grade(
    model: dict,
    num_types: int,
    num_basis: int,
    has_residual: bool = False,
) -> Any:
    """Model builder for checkpoints written by :func:`write_model_with_grade`: builds
    ``model`` (a config with ``_target_``) and inserts an empty grade module whose buffers the
    checkpoint's ``state_dict`` fills.

    .. code-block:: yaml

      model:
        _target_: nequip_sus2.active_set.with_extrapolation_grade
        num_types: 7
        num_basis: 169
        model: {_target_: nequip_sus2.model.SUS2Model, ...}
    """
    from hydra.utils import get_method

    cfg = dict(model)
    inner = get_method(cfg.pop("_target_"))(**cfg)
    nb, C = int(num_basis), int(num_types)
    empty = ActiveSet(
        type_names=[str(z) for z in range(C)],
        num_basis=nb,
        inverse=np.zeros((C, nb, nb)),
        residual=np.zeros((C, nb, nb)) if has_residual else None,
        residual_scale=np.ones(C),
        ranks=[0] * C,
        counts=[0] * C,
        active=[[] for _ in range(C)],
        tol=0.0,
    )
    return add_extrapolation_grade(inner, empty)


def _grade_state_keys(model, prefix: str) -> dict[str, str]:
    """state_dict key -> buffer name of every grade module in ``model``."""
    keys = {}
    for name, _ in model.named_modules():
        if name.split(".")[-1] == _GRADE_MODULE_NAME:
            for buf in ("inverse", "residual", "residual_scale"):
                keys[f"{prefix}{name}.{buf}"] = buf
    return keys


def _write_checkpoint(src: str, out: Path, active_set: ActiveSet, model_for_keys) -> None:
    """A copy of checkpoint ``src`` whose model is wrapped by :func:`with_extrapolation_grade`
    and whose state holds the active set (for the raw and, if present, EMA weights alike)."""
    import torch

    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    hp = ckpt["hyper_parameters"]
    model_cfg = hp["model"]
    target = model_cfg.get("_target_") if hasattr(model_cfg, "get") else None
    wrapped = {
        "_target_": "nequip_sus2.active_set.with_extrapolation_grade",
        "num_types": len(active_set.type_names),
        "num_basis": active_set.num_basis,
        "has_residual": active_set.residual is not None,
        "model": model_cfg,
    }
    if target == wrapped["_target_"]:  # refresh: keep the inner model
        wrapped["model"] = model_cfg["model"]
    hp["model"] = wrapped
    info = hp.get("info_dict")
    if info is not None and "training_module" in info:
        info["training_module"]["model"] = copy.deepcopy(wrapped)
    state = active_set.state()
    keys = _grade_state_keys(model_for_keys, "model.sole_model.")
    if not keys:
        raise RuntimeError("internal error: no grade module found to take state keys from")
    sd = ckpt["state_dict"]
    for key, buf in keys.items():
        sd[key] = state[buf].clone()
    from .interop import _replacing

    with _replacing(out) as tmp:
        torch.save(ckpt, tmp)


def _package_importer_class(imp):
    """The grade module class inside package ``imp`` if it has one, else ``None``."""
    try:
        return imp.import_module("nequip_sus2.nn.extrapolation").ExtrapolationGrade
    except Exception:
        return None


class _NameLookupNoise(logging.Filter):
    """Drops torch.package's "Tried to call get_name with obj ..." warnings: re-exporting a
    package asks each importer in turn for every class, and each miss is logged although the
    next importer finds it (no importer finding it is an error of its own, still raised)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Tried to call get_name with obj ")


@contextlib.contextmanager
def _quiet_packaging():
    """Silence the harmless noise of reading and writing packages: torch.package's importer
    misses (above) and the TypedStorage deprecation warnings nequip suppresses; every other
    warning and log record still shows."""
    from .interop import _nequip_internals

    logger = logging.getLogger("torch.package.importer")
    noise = _NameLookupNoise()
    logger.addFilter(noise)
    try:
        with _nequip_internals()["suppress_warnings"]():
            yield
    finally:
        logger.removeFilter(noise)


def _repackage(src: str, out: Path, active_set: ActiveSet) -> None:
    """Copy package ``src`` with the grade module added to every model variant (the way
    ``nequip-package modify`` re-exports a package)."""
    import torch
    import yaml
    from nequip.model.saved_models.package import _cpu_deserialize_always

    from .interop import _nequip_internals, _replacing

    nq = _nequip_internals()
    with _quiet_packaging():
        imp = torch.package.PackageImporter(src)
        cls = _package_importer_class(imp)
        meta_text = imp.load_text("model", "package_metadata.txt")
        variants = yaml.safe_load(meta_text)["available_models"]
        with _cpu_deserialize_always():
            example = imp.load_pickle("model", "example_data.pkl")
            models = {
                v: imp.load_pickle("model", f"{v}_model.pkl", map_location="cpu") for v in variants
            }
    for model_dict in models.values():
        add_extrapolation_grade(model_dict, active_set, module_class=cls)
    with _replacing(out) as tmp, _quiet_packaging():
        importers = (imp, torch.package.importer.sys_importer)
        with torch.package.PackageExporter(tmp, importer=importers) as exp:
            exp.mock([f"{pkg}.**" for pkg in nq["mock"]])
            exp.extern([f"{pkg}.**" for pkg in nq["external"]])
            exp.intern([f"{pkg}.**" for pkg in nq["internal"]])
            exp.save_pickle("model", "example_data.pkl", example, dependencies=True)
            exp.save_text("model", "config.yaml", imp.load_text("model", "config.yaml"))
            exp.save_text("model", "package_metadata.txt", meta_text)
            for v, model_dict in models.items():
                exp.save_pickle("model", f"{v}_model.pkl", model_dict, dependencies=True)


def _check_output(out: Path, is_package: bool) -> None:
    if not out.name.endswith((".ckpt", _PACKAGE_SUFFIX)):
        raise ValueError(f"{out}: the output must be a .ckpt or a {_PACKAGE_SUFFIX} file")
    if is_package and out.name.endswith(".ckpt"):
        raise ValueError(
            f"{out}: a package can only be written back as a package ({_PACKAGE_SUFFIX})"
        )
    if not out.parent.is_dir():
        raise ValueError(f"{out}: the output directory {out.parent} does not exist")


def write_model_with_grade(
    model_path: str | os.PathLike,
    data: str | os.PathLike | Iterable[Any],
    out: str | os.PathLike,
    tol: float = 1e-3,
    rank_rtol: float | None = None,
    batch_size: int = 8,
    chemical_species_to_atom_type_map: dict[str, str] | None = None,
    progress: bool | None = False,
    model=None,
) -> ActiveSet:
    """Build the active set of a checkpoint (``.ckpt``) or package (``.nequip.zip``) on
    ``data`` (its training set: extxyz/``.cfg`` path or structures) and write the model with the
    extrapolation grade included.

    ``out``: a checkpoint (``.ckpt``; from a checkpoint only) or a package (``.nequip.zip``;
    from a checkpoint via ``nequip-package build``, from a package by re-exporting it). The
    grade of the evaluation weights (EMA, if trained with EMA) is what the active set is built
    from; continued training makes it stale (rebuild it afterwards). ``model``: the model of
    ``model_path`` if already loaded. The output appears complete or not at all.
    """
    from .interop import load_model

    model_path, out = os.fspath(model_path), Path(out)
    is_package = model_path.endswith(_PACKAGE_SUFFIX)
    _check_output(out, is_package)
    if model is None:
        model = load_model(model_path)
    active = build_active_set(
        model,
        data,
        tol=tol,
        rank_rtol=rank_rtol,
        batch_size=batch_size,
        chemical_species_to_atom_type_map=chemical_species_to_atom_type_map,
        progress=progress,
    )
    if is_package:
        _repackage(model_path, out, active)
        return active
    add_extrapolation_grade(model, active)  # only to learn the state_dict keys
    if out.name.endswith(".ckpt"):
        _write_checkpoint(model_path, out, active, model)
        return active
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmpdir:
        ckpt = Path(tmpdir) / "with_grade.ckpt"
        _write_checkpoint(model_path, ckpt, active, model)
        from nequip.scripts.package import main as package_main

        built = Path(tmpdir) / out.name
        with _quiet_packaging():
            package_main(["build", str(ckpt), str(built)])
        os.replace(built, out)
    return active


# ----------------------------------------------------------------------------------------------
# active learning: select-add
# ----------------------------------------------------------------------------------------------


def _grade_modules(model) -> list:
    mods = [m for n, m in model.named_modules() if n.split(".")[-1] == _GRADE_MODULE_NAME]
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
    import torch

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


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


class _CommandError(ValueError):
    """A user mistake reported as one line ``<prog>: error: ...`` (exit status 2)."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, with command line mistakes reported in one line like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _new_parser(prog: str, description: str, example: str) -> _ArgumentParser:
    return _ArgumentParser(
        prog=prog,
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


def _parse(parser: _ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.output is None:
        parser.error("the following arguments are required: -o/--output")
    return args


def _species_map(values: Sequence[str] | None, type_names: Sequence[str]) -> dict[str, str] | None:
    """``--species-map Cu=Cu_type ...`` checked against chemical symbols and the model types."""
    if not values:
        return None
    from ase.data import atomic_numbers

    out = {}
    for item in values:
        symbol, sep, name = item.partition("=")
        if not sep or not symbol or not name:
            raise _CommandError(f"argument --species-map: expected SYMBOL=TYPE, got {item!r}")
        if symbol not in atomic_numbers:
            raise _CommandError(
                f"argument --species-map: {symbol!r} in {item!r} is not a chemical symbol"
            )
        if name not in type_names:
            raise _CommandError(
                f"argument --species-map: {name!r} in {item!r} is not a type of the model "
                f"({' '.join(type_names)})"
            )
        out[symbol] = name
    return out


def _load_sus2_model(path: str, need_grade: bool = False):
    """The eager model of checkpoint or package ``path``, refused (with a :class:`_CommandError`
    naming the file) if it is missing, not a model, not a SUS2 model or, with ``need_grade``,
    without an extrapolation grade."""
    from .interop import load_model

    if not os.path.isfile(path):
        raise _CommandError(f"{path}: no such file")
    if not path.endswith((".ckpt", _PACKAGE_SUFFIX)):
        raise _CommandError(
            f"{path}: the model must be a checkpoint (.ckpt) or a package ({_PACKAGE_SUFFIX})"
        )
    try:
        with _quiet_packaging():
            model = load_model(path)
    except Exception as e:  # torch/zip/pickle/hydra: anything means the file is not a model
        raise _CommandError(f"{path}: cannot load the model ({one_line(e)})") from e
    try:
        gm = _graph_model(model)
        _moments_networks(gm)
    except TypeError as e:
        raise _CommandError(f"{path}: {e}") from e
    if need_grade and not any(
        n.split(".")[-1] == _GRADE_MODULE_NAME for n, _ in gm.named_modules()
    ):
        raise _CommandError(
            f"{path}: the model has no extrapolation grade; add one with `nequip-sus2 active-set`"
        )
    return model


def _read_data(path: str, type_names: Sequence[str]) -> list:
    try:
        return _read_structures(path, type_names)
    except OSError as e:
        raise _CommandError(f"{path}: {e.strerror or e}") from e


def _structure_error(path: str, error: ValueError) -> _CommandError:
    """A ``structures_to_data`` error (``structure K: ...``) with the file named."""
    text = one_line(error)
    return _CommandError(text if text.startswith(path) else f"{path}: {text}")


def _run(prog: str, body, args: argparse.Namespace) -> int:
    """Run ``body(args)``; a user mistake becomes one line on stderr and exit status 2."""
    try:
        return body(args)
    except (ValueError, OSError) as e:
        if isinstance(e, OSError) and e.filename is not None:
            message = f"{e.filename}: {e.strerror or e}"
        else:
            message = one_line(e)
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


def _active_set_command(args: argparse.Namespace) -> int:
    from .interop import _ensure_global_state

    out = Path(args.output)
    _check_output(out, args.model.endswith(_PACKAGE_SUFFIX))
    if args.save_active_set:
        target = Path(args.save_active_set)
        if not target.parent.is_dir():
            raise _CommandError(f"{target}: the output directory {target.parent} does not exist")
    _ensure_global_state()
    model = _load_sus2_model(args.model)
    type_names = list(_graph_model(model).type_names)
    species_map = _species_map(args.species_map, type_names)
    structures = _read_data(args.data, type_names)
    progress = False if args.no_progress else None
    try:
        active = write_model_with_grade(
            args.model,
            structures,
            out,
            tol=args.tol,
            rank_rtol=args.rank_rtol,
            batch_size=args.batch_size,
            chemical_species_to_atom_type_map=species_map,
            progress=progress,
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


def main(argv: Sequence[str] | None = None) -> int:
    """``nequip-sus2 active-set MODEL DATA -o OUT``: build the MaxVol active set of a checkpoint
    or package on its training data and write it with the extrapolation grade included.

    Returns the exit status (2 with one line on stderr for a user mistake)."""
    parser = _new_parser(
        "nequip-sus2 active-set",
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
    return _run(parser.prog, _active_set_command, _parse(parser, argv))


def _write_structures(structures: list, out: str) -> None:
    """``structures`` to ``out`` (``.cfg`` frames to ``.cfg``, ``ase.Atoms`` to any format ASE
    writes), complete or not at all."""
    if out.endswith(".cfg"):
        from .io.cfg import write_cfg

        write_cfg(structures, out)
        return
    from ase.io import write

    from .interop import _replacing

    with _replacing(Path(out)) as tmp:
        write(tmp, structures, format=_ase_format(out))


def _ase_format(out: str) -> str:
    from ase.io.formats import filetype, ioformats

    fmt = filetype(out, read=False)
    if fmt not in ioformats or not ioformats[fmt].can_write:
        raise _CommandError(f"{out}: ASE cannot write this format (use .xyz, .extxyz or .cfg)")
    return fmt


def _select_add_command(args: argparse.Namespace) -> int:
    from .interop import _ensure_global_state

    out = Path(args.output)
    if args.candidates.endswith(".cfg") != args.output.endswith(".cfg"):
        raise _CommandError(
            f"{out}: the selected structures are written in the candidates' format; "
            + ("use a .cfg output" if args.candidates.endswith(".cfg") else "use an extxyz output")
        )
    if not args.output.endswith(".cfg"):
        _ase_format(args.output)
    if not out.parent.is_dir():
        raise _CommandError(f"{out}: the output directory {out.parent} does not exist")
    _ensure_global_state()
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


def select_add_main(argv: Sequence[str] | None = None) -> int:
    """``nequip-sus2 select-add MODEL CANDIDATES -o SELECTED``: candidates that extend the
    model's active set, written in the candidates' format (extxyz or ``.cfg``).

    Returns the exit status (2 with one line on stderr for a user mistake)."""
    parser = _new_parser(
        "nequip-sus2 select-add",
        "Select the candidate structures that extend the active set of a model with an\n"
        "extrapolation grade (like MLIP select-add).",
        "Example: nequip-sus2 select-add graded.nequip.zip extrapolating.xyz -o selected.xyz",
    )
    parser.add_argument("model", help="checkpoint or package with an extrapolation grade")
    parser.add_argument("candidates", help="candidate structures: extxyz or .cfg")
    _add_common(parser, "selected structures, in the candidates' format")
    return _run(parser.prog, _select_add_command, _parse(parser, argv))


if __name__ == "__main__":
    raise SystemExit(main())
