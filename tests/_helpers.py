"""Shared helpers for tests: build model inputs from ``.cfg`` frames and evaluate models."""

from __future__ import annotations

import subprocess

import numpy as np
import torch
from nequip.data import AtomicDataDict, compute_neighborlist_, from_dict

VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))  # .cfg PlusStress order
#: dtype of the hand-computed module tests (``tests/nn``, ``tests/model``)
F64 = torch.float64

#: one periodic Cu-Se structure written by hand in the MLIP-2 layout (type 0 = Cu, 1 = Se)
CU_SE_CFG = """\
BEGIN_CFG
 Size
    2
 Supercell
    3.6 0.0 0.0
    0.0 3.6 0.0
    0.0 0.0 3.6
 AtomData:  id type       cartes_x      cartes_y      cartes_z           fx          fy          fz
    1 0 0.0 0.0 0.0 0.1 0.2 0.3
    2 1 1.8 1.8 0.25 -0.1 -0.2 -0.3
 Energy
    -7.5
 PlusStress:  xx          yy          zz          yz          xz          xy
    0.1 0.2 0.3 0.0 0.0 0.0
END_CFG
"""


def assert_one_line_error(code: int, err: str, command: str, *parts: str) -> str:
    """Exit status 2 and one stderr line ``nequip-sus2 COMMAND: error: ...`` holding ``parts``
    (no traceback); returns the line."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"nequip-sus2 {command}: error: "), err
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


def edge_graph(pos, types, edges, **fields) -> AtomicDataDict.Type:
    """A non-periodic AtomicDataDict with an explicit edge list [(centre, neighbour), ...]."""
    data = {
        AtomicDataDict.POSITIONS_KEY: torch.as_tensor(pos, dtype=F64),
        AtomicDataDict.ATOM_TYPE_KEY: torch.as_tensor(types, dtype=torch.long),
        AtomicDataDict.EDGE_INDEX_KEY: torch.as_tensor(edges, dtype=torch.long).T.contiguous(),
    }
    data.update(fields)
    return data


def cheb(n: int, x: float) -> float:
    """T_n(x), written out by hand for n = 0..3."""
    return [1.0, x, 2 * x * x - 1, 4 * x**3 - 3 * x][n]


def cheb_prime(n: int, x: float) -> float:
    """dT_n/dx by hand for n = 0..3."""
    return [0.0, 1.0, 4 * x, 12 * x * x - 3][n]


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


def perturb_parameters(model, seed: int, scale: float = 0.1):
    """Add ``scale`` x N(0, 1) noise to every parameter (random, non-trivial parameters so that
    every basis function contributes); returns ``model``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def random_fcc_structure(rng: np.random.Generator, n_types: int, r_max: float):
    """A rattled, sheared fcc cell with random species (periodic), as a NequIP data dict."""
    a = rng.uniform(3.5, 4.2)
    reps = rng.integers(1, 3, size=3)
    base = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    grid = np.array(
        [[i, j, k] for i in range(reps[0]) for j in range(reps[1]) for k in range(reps[2])]
    )
    frac = (base[None] + grid[:, None]).reshape(-1, 3) / reps
    cell = np.diag(a * reps) + rng.normal(0, 0.15, (3, 3))
    pos = frac @ cell + rng.normal(0, 0.12, (len(frac), 3))
    types = rng.integers(0, n_types, len(frac))
    return frame_data(types, pos, cell, r_max)


def evaluate_model(model, data, with_param_grads: bool = False):
    out = model(dict(data))
    res = {
        "energy": out[AtomicDataDict.TOTAL_ENERGY_KEY].detach().clone(),
        "forces": out[AtomicDataDict.FORCE_KEY].detach().clone(),
        "virial": out[AtomicDataDict.VIRIAL_KEY].detach().clone(),
    }
    if with_param_grads:
        loss = (
            out[AtomicDataDict.TOTAL_ENERGY_KEY].square().sum()
            + out[AtomicDataDict.FORCE_KEY].square().sum()
        )
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params)
        res.update({f"grad{k}": g.detach().clone() for k, g in enumerate(grads)})
    return res


def assert_same(fast: dict, generic: dict, rtol: float = 1e-10) -> None:
    """Every entry of ``fast`` equals ``generic`` to ``rtol`` of its largest magnitude."""
    assert fast.keys() == generic.keys()
    for key in fast:
        a, b = fast[key], generic[key]
        scale = max(float(b.abs().max()), 1e-30)
        err = float((a - b).abs().max())
        assert err <= rtol * scale, f"{key}: max |fast - generic| = {err:.3e} (scale {scale:.3e})"
