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
from _helpers import (
    assert_same,
    build,
    evaluate_model,
    frame_data,
    perturb_parameters,
    random_fcc_structure,
)
from conftest import GOLDEN, SPECIES, require_reference

from nequip_sus2.io.cfg import read_cfg
from nequip_sus2.model import SUS2FromMTP, SUS2Model
from nequip_sus2.nn import MomentContraction

EMT = ["Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al"]


def _moments(model) -> MomentContraction:
    (module,) = [m for m in model.modules() if isinstance(m, MomentContraction)]
    return module


def _generic_twin(model):
    """A copy of ``model`` forced onto the generic gather path."""
    twin = copy.deepcopy(model)
    _moments(twin).canonical_shape = None
    return twin


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
    perturb_parameters(model, L + K)
    assert _moments(model).canonical_shape == (K, L), "the fast path must be active"
    generic = _generic_twin(model)
    rng = np.random.default_rng(L * 100 + K)
    for _ in range(3):
        data = random_fcc_structure(rng, len(EMT), 5.0)
        assert_same(
            evaluate_model(model, data, with_param_grads=True),
            evaluate_model(generic, data, with_param_grads=True),
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
        assert_same(evaluate_model(model, data), evaluate_model(generic, data))


def test_non_canonical_programs_use_the_generic_path():
    """A program whose basic slots are permuted is not canonical and still evaluates correctly."""
    from dataclasses import replace

    from nequip_sus2.program import generate_program

    program = generate_program(2, 2)
    assert program.canonical_shape() == (2, 2)
    swapped = list(program.basic)
    swapped[1], swapped[2] = swapped[2], swapped[1]
    assert replace(program, basic=tuple(swapped)).canonical_shape() is None
    assert replace(program, basic=()).canonical_shape() is None
