"""LinearReadout: E_i = sum_a theta_a B_a(i), against values by hand, in float64."""

from __future__ import annotations

import pytest
import torch
from nequip.data import AtomicDataDict

from nequip_sus2._keys import SCALAR_BASIS_KEY
from nequip_sus2.nn import LinearReadout

pytestmark = pytest.mark.usefixtures("float64_default_dtype")


def test_linear_readout_hand_values():
    theta = [0.5, -1.2, 2.0, 0.3]
    basis = [[1.0, 2.0, 3.0, 4.0], [-0.5, 0.25, 0.0, 8.0], [0.0, 0.0, 0.0, 0.0]]
    module = LinearReadout(
        num_basis=4, theta=torch.tensor(theta), irreps_in={SCALAR_BASIS_KEY: "4x0e"}
    )
    out = module({SCALAR_BASIS_KEY: torch.tensor(basis)})[AtomicDataDict.PER_ATOM_ENERGY_KEY]
    assert out.shape == (3, 1)
    expected = [sum(t * b for t, b in zip(theta, row, strict=True)) for row in basis]
    assert out[:, 0].tolist() == pytest.approx(expected, rel=1e-15, abs=1e-15)
    assert expected == pytest.approx([0.5 - 2.4 + 6.0 + 1.2, -0.25 - 0.3 + 2.4, 0.0])
