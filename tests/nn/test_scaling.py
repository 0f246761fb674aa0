"""UniversalPairScaling: xi[e, eta] = tanh(alpha[eta, Z_i, Z_j] (r - r0[eta, Z_i, Z_j]) / 2),
against values computed by hand with plain ``math`` from an explicit edge list, in float64."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import F64
from _helpers import edge_graph as _graph

from nequip_sus2._keys import SCALED_DISTANCE_KEY
from nequip_sus2.nn import UniversalPairScaling

pytestmark = pytest.mark.usefixtures("float64_default_dtype")

# alpha[eta][Z_centre][Z_neigh], r0[eta][Z_centre][Z_neigh]: not symmetric, one alpha negative
ALPHA = [[[1.3, 2.1], [0.7, -0.9]], [[-1.6, 0.4], [2.8, 1.1]]]
R0 = [[[1.0, 1.4], [0.6, 1.9]], [[2.2, 0.3], [1.7, 0.8]]]
POS3 = [[0.0, 0.0, 0.0], [1.3, 0.4, -0.2], [-0.5, 1.1, 0.9]]
TYPES3 = [0, 1, 1]
EDGES3 = [(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)]


def test_pair_scaling_hand_values():
    """xi[e, eta] = tanh(alpha[eta, Z_i, Z_j] (r - r0[eta, Z_i, Z_j]) / 2), i = edge_index[0]."""
    module = UniversalPairScaling(
        type_names=["A", "B"], num_channels=2, alpha=torch.tensor(ALPHA), r0=torch.tensor(R0)
    )
    out = module(_graph(POS3, TYPES3, EDGES3))
    xi = out[SCALED_DISTANCE_KEY]
    assert xi.shape == (len(EDGES3), 2) and xi.dtype == F64
    for e, (i, j) in enumerate(EDGES3):
        r = math.dist(POS3[i], POS3[j])
        zi, zj = TYPES3[i], TYPES3[j]
        for eta in range(2):
            expected = math.tanh(ALPHA[eta][zi][zj] * (r - R0[eta][zi][zj]) / 2)
            assert xi[e, eta].item() == pytest.approx(expected, rel=1e-14, abs=1e-15)
    # the pair order matters: edges 0 -> 1 (A, B) and 1 -> 0 (B, A) have the same r
    assert not torch.allclose(xi[0], xi[1])


def test_pair_scaling_scalar_init_and_frozen():
    """Scalar alpha / r0 fill every (eta, Z_i, Z_j); trainable=False freezes them."""
    module = UniversalPairScaling(["A", "B", "C"], num_channels=4, alpha=2.2, r0=2.5)
    assert module.alpha.shape == module.r0.shape == (4, 3, 3)
    assert torch.all(module.alpha == 2.2) and torch.all(module.r0 == 2.5)
    assert module.alpha.requires_grad
    frozen = UniversalPairScaling(["A"], 1, alpha=1.0, r0=1.0, trainable=False)
    assert not frozen.alpha.requires_grad and not frozen.r0.requires_grad


def test_pair_scaling_rejects_ambiguous_shapes():
    """alpha/r0 are a scalar or a full [N_eta, C, C] table; a per-channel vector is refused."""
    with pytest.raises(ValueError, match=r"alpha must be a scalar or have shape \[N_eta, C, C\]"):
        UniversalPairScaling(["A", "B"], num_channels=2, alpha=torch.tensor([1.0, 2.0]), r0=1.0)
    with pytest.raises(ValueError, match="r0 must be a scalar"):
        UniversalPairScaling(["A", "B", "C"], 2, alpha=1.0, r0=torch.ones(2, 3))
