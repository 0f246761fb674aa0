"""Shared helpers for tests: build model inputs from ``.cfg`` frames and evaluate models."""

from __future__ import annotations

import subprocess

import numpy as np
from nequip.data import AtomicDataDict, compute_neighborlist_, from_dict

VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))  # .cfg PlusStress order


def frame_data(types, positions, cell, r_max: float) -> AtomicDataDict.Type:
    """AtomicDataDict with a neighbour list for one structure (cell None = non-periodic)."""
    d = {"pos": np.asarray(positions, dtype=np.float64), "atom_types": np.asarray(types)}
    if cell is None:
        d["pbc"] = np.zeros(3, dtype=bool)
    else:
        cell = np.asarray(cell, dtype=np.float64)
        d["cell"] = cell
        d["pbc"] = np.abs(cell).sum(1) > 0
    return compute_neighborlist_(from_dict(d), r_max=r_max)


def predict(model, types, positions, cell) -> dict[str, np.ndarray]:
    """Energy, forces and virial (Voigt, .cfg order) of one structure, in float64 numpy."""
    r_max = float(model.metadata["r_max"])
    out = model(frame_data(types, positions, cell, r_max))
    res = {
        "energy": out[AtomicDataDict.TOTAL_ENERGY_KEY].detach().double().numpy().reshape(()),
        "forces": out[AtomicDataDict.FORCE_KEY].detach().double().numpy(),
        "per_atom_energy": out[AtomicDataDict.PER_ATOM_ENERGY_KEY].detach().double().numpy(),
    }
    if AtomicDataDict.VIRIAL_KEY in out:
        v = out[AtomicDataDict.VIRIAL_KEY].detach().double().numpy().reshape(3, 3)
        res["virial"] = np.array([v[i, j] for i, j in VOIGT])
    return res


def build(builder, **kwargs):
    """Call a model builder outside ``nequip-train`` (initialises NequIP's global state)."""
    from nequip.utils.global_state import global_state_initialized, set_global_state

    if not global_state_initialized():
        set_global_state()
    return builder(**kwargs)


def run_ok(cmd: list[str], cwd=None, timeout: float = 900, env=None) -> subprocess.CompletedProcess:
    """Run a command (e.g. ``nequip-train``); assert it succeeded, showing its output tail."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
