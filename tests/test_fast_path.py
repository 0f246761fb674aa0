"""The fast evaluation path equals the generic program path (issue #6).

`MomentContraction` builds the edge moments of canonical programs (every generated and published
one) by broadcasting ``f_{k,l}`` against the rank-``l`` monomials; any other basic-slot list goes
through the generic gather path (``f_mu`` and ``u_x^a u_y^b u_z^c`` gathered per slot). Both are
evaluated here on the same models and structures, in float64, for energies, forces, virials and
the parameter gradients of a force-matching loss (the training path).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _helpers import build, frame_data
from conftest import GOLDEN, SPECIES, require_reference
from nequip.data import AtomicDataDict

from nequip_sus2.io.cfg import read_cfg
from nequip_sus2.model import SUS2FromMTP, SUS2Model
from nequip_sus2.nn import MomentContraction

RTOL = 1e-10
EMT = ["Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al"]


def _moments(model) -> MomentContraction:
    (module,) = [m for m in model.modules() if isinstance(m, MomentContraction)]
    return module


def _generic_twin(model):
    """A copy of ``model`` forced onto the generic gather path."""
    twin = copy.deepcopy(model)
    _moments(twin).canonical_shape = None
    return twin


def _random_structure(rng: np.random.Generator, n_types: int, r_max: float):
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


def _evaluate(model, data, with_param_grads: bool = False):
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


def _assert_same(fast: dict, generic: dict) -> None:
    assert fast.keys() == generic.keys()
    for key in fast:
        a, b = fast[key], generic[key]
        scale = max(float(b.abs().max()), 1e-30)
        err = float((a - b).abs().max())
        assert err <= RTOL * scale, f"{key}: max |fast - generic| = {err:.3e} (scale {scale:.3e})"


@pytest.mark.parametrize(
    ("L", "K", "basis"),
    [(1, 3, "full_rank"), (2, 3, "published"), (2, 2, "full_rank"), (3, 2, "published"),
     (3, 3, "full_rank")],
)  # fmt: skip
def test_fast_path_equals_generic_path_on_random_structures(L, K, basis):
    model = build(
        SUS2Model,
        seed=L * 10 + K,
        model_dtype="float64",
        r_max=5.0,
        type_names=EMT,
        max_rank=L,
        radial_channels=K,
        radial_basis_size=6,
        basis=basis,
    )
    # random, non-trivial parameters so that every basis function contributes
    gen = torch.Generator().manual_seed(L + K)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    assert _moments(model).canonical_shape == (K, L), "the fast path must be active"
    generic = _generic_twin(model)
    rng = np.random.default_rng(L * 100 + K)
    for _ in range(3):
        data = _random_structure(rng, len(EMT), 5.0)
        _assert_same(
            _evaluate(model, data, with_param_grads=True),
            _evaluate(generic, data, with_param_grads=True),
        )


@pytest.mark.parametrize("name", list(SPECIES))
def test_fast_path_equals_generic_path_on_reference_models(name):
    path = require_reference(f"{name}.mtp")
    model = build(SUS2FromMTP, mtp_path=str(path), type_names=SPECIES[name], model_dtype="float64")
    assert _moments(model).canonical_shape is not None, "the fast path must be active"
    generic = _generic_twin(model)
    r_max = float(model.metadata["r_max"])
    frames = read_cfg(require_reference(GOLDEN[name]))[:4]
    for frame in frames:
        data = frame_data(frame.types, frame.positions, frame.cell, r_max)
        _assert_same(_evaluate(model, data), _evaluate(generic, data))


def test_non_canonical_programs_use_the_generic_path():
    """A program whose basic slots are permuted is not canonical and still evaluates correctly."""
    from nequip_sus2.nn.moments import _canonical_shape
    from nequip_sus2.program import generate_program

    program = generate_program(2, 2)
    assert _canonical_shape(program.basic) == (2, 2)
    swapped = list(program.basic)
    swapped[1], swapped[2] = swapped[2], swapped[1]
    assert _canonical_shape(swapped) is None
    assert _canonical_shape([]) is None
