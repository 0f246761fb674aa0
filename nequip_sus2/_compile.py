"""The ``nequip-compile --target`` names nequip-sus2 adds, registered when NequIP loads the
extension (``nequip_sus2/__init__.py``).

* ``sus2_ase``: NequIP's ``ase`` target plus the per-atom extrapolation grade
  ``sus2_extrapolation_grade`` (models with an active set, see ``nequip-sus2 active-set``), for
  :class:`nequip_sus2.ase.SUS2Calculator`.
* ``pair_sus2``: a strictly local model for multi-rank LAMMPS. LAMMPS hands each MPI rank its
  local atoms followed by ghost atoms (copies of atoms owned by other ranks, or periodic
  images); a strictly local model then needs no cell and no cell shifts:

  - inputs ``pos`` ``[N, 3]`` (local then ghost atoms), ``edge_index`` ``[2, E]`` (centre
    ``edge_index[0]`` always a local atom), ``atom_types`` ``[N]``;
  - outputs ``atomic_energy`` ``[N, 1]`` (the pair style sums the local rows only), ``forces``
    ``[N, 3]`` (ghost rows are folded back onto their owners by LAMMPS) and ``virial``
    ``[1, 3, 3]`` (this rank's share).

  This is exactly the contract of ``pair_allegro`` (nequip-allegro), so a ``pair_sus2`` file
  also runs under ``pair_style allegro`` of ``pair_nequip_allegro``; it is registered here so
  that compiling does not need nequip-allegro. Only strictly local models (SUS2 is) give
  correct results with it.
* ``pair_sus2_grade``: ``pair_sus2`` plus ``sus2_extrapolation_grade`` ``[N, 1]``;
  ``pair_style sus2`` then reports the grade and can select or stop on it.

This module is imported on NequIP's start-up: it imports only torch and ``nequip.data`` /
``nequip.scripts._compile_utils`` (no model code).
"""

from __future__ import annotations

from typing import Any

import torch
from nequip.data import AtomicDataDict
from nequip.scripts._compile_utils import (
    AOTI_ASE_TARGET,
    COMPILE_TARGET_DICT,
    LMP_OUTPUTS,
    single_frame_batch_map_settings,
)
from nequip.scripts._compile_utils import register_compile_targets as _register

from ._keys import EXTRAPOLATION_GRADE_KEY

__all__ = [
    "PAIR_SUS2_GRADE_TARGET",
    "PAIR_SUS2_INPUTS",
    "PAIR_SUS2_TARGET",
    "SUS2_ASE_TARGET",
    "ghost_atom_data",
    "register_compile_targets",
]

#: the ASE calculator's target with the extrapolation grade as an output
SUS2_ASE_TARGET = "sus2_ase"
#: ``pair_style sus2`` (and ``pair_style allegro``)
PAIR_SUS2_TARGET = "pair_sus2"
#: ``pair_sus2`` plus the per-atom extrapolation grade (``pair_style sus2`` select / break)
PAIR_SUS2_GRADE_TARGET = "pair_sus2_grade"
#: the LAMMPS targets' input fields, in the order the compiled model takes them
PAIR_SUS2_INPUTS = ("pos", "edge_index", "atom_types")


def ghost_atom_data(data: dict[str, Any]) -> dict[str, Any]:
    """One frame of ``data`` in the local + ghost form LAMMPS produces (the LAMMPS targets'
    ``data_settings``).

    Every distinct (neighbour, cell shift) pair with a nonzero shift becomes one ghost atom at
    ``pos[j] + shift @ cell`` appended after the original atoms, and the edges point to it; the
    cell, the shifts and the batch fields are dropped. Atoms without a periodic image are
    unchanged, so the model's energy and forces on the original atoms are unchanged.
    """
    data = dict(data)
    if AtomicDataDict.BATCH_KEY in data:
        num_frames = int(data[AtomicDataDict.NUM_NODES_KEY].numel())
        if num_frames != 1:
            raise ValueError(f"{PAIR_SUS2_TARGET} compiles single frames, got {num_frames}")
        data.pop(AtomicDataDict.BATCH_KEY)
        data.pop(AtomicDataDict.NUM_NODES_KEY)
    shift_key = AtomicDataDict.EDGE_CELL_SHIFT_KEY
    if shift_key not in data:
        return data
    pos = data[AtomicDataDict.POSITIONS_KEY]
    types = data[AtomicDataDict.ATOM_TYPE_KEY]
    edge_index = data[AtomicDataDict.EDGE_INDEX_KEY]
    shifts = data.pop(shift_key)
    cell = data.pop(AtomicDataDict.CELL_KEY).reshape(3, 3).to(pos.dtype)
    data.pop(AtomicDataDict.PBC_KEY, None)

    periodic = (shifts != 0).any(dim=1)
    images = torch.cat(
        [edge_index[1, periodic].unsqueeze(1), shifts[periodic].round().to(torch.long)], dim=1
    )
    unique, which = torch.unique(images, dim=0, return_inverse=True)
    ghost_pos = pos[unique[:, 0]] + unique[:, 1:].to(pos.dtype) @ cell
    edge_index = edge_index.clone()
    edge_index[1, periodic] = pos.shape[0] + which
    data[AtomicDataDict.POSITIONS_KEY] = torch.cat([pos, ghost_pos], dim=0)
    data[AtomicDataDict.ATOM_TYPE_KEY] = torch.cat([types, types[unique[:, 0]]], dim=0)
    data[AtomicDataDict.EDGE_INDEX_KEY] = edge_index
    return data


def register_compile_targets() -> None:
    """Register ``sus2_ase``, ``pair_sus2`` and ``pair_sus2_grade`` with ``nequip-compile``
    (idempotent)."""
    ase = COMPILE_TARGET_DICT[AOTI_ASE_TARGET]
    lammps = {
        "input": list(PAIR_SUS2_INPUTS),
        "batch_map_settings": single_frame_batch_map_settings,
        "data_settings": ghost_atom_data,
    }
    targets = {
        SUS2_ASE_TARGET: {**ase, "output": [*ase["output"], EXTRAPOLATION_GRADE_KEY]},
        PAIR_SUS2_TARGET: {**lammps, "output": list(LMP_OUTPUTS)},
        PAIR_SUS2_GRADE_TARGET: {**lammps, "output": [*LMP_OUTPUTS, EXTRAPOLATION_GRADE_KEY]},
    }
    missing = {name: t for name, t in targets.items() if name not in COMPILE_TARGET_DICT}
    if missing:
        _register(missing)
