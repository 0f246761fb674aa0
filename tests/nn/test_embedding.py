"""DecoupledElementEmbedding: f[e, mu] = w[Z_i] w[Z_j] sum_n c[mu, n] Q[e, eta(mu), n], and the
scaling-channel table eta(mu), against values computed by hand, in float64."""

from __future__ import annotations

import pytest
import torch
from _helpers import F64
from _helpers import edge_graph as _graph
from nequip.data import AtomicDataDict

from nequip_sus2._keys import RADIAL_BASIS_KEY
from nequip_sus2.nn import DecoupledElementEmbedding
from nequip_sus2.program import scaling_channel_of_mu

pytestmark = pytest.mark.usefixtures("float64_default_dtype")


def test_scaling_channel_table():
    """eta(mu) of docs/theory.md §2.2, written out by hand."""
    assert scaling_channel_of_mu("K", 2, 9) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert scaling_channel_of_mu("L", 2, 9) == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    assert scaling_channel_of_mu("LK", 2, 9) == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert scaling_channel_of_mu("K", 3, 8) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert scaling_channel_of_mu("L", 3, 8) == [0, 1, 2, 3, 0, 1, 2, 3]
    assert scaling_channel_of_mu("K", 1, 6) == [0, 0, 1, 1, 2, 2]
    assert scaling_channel_of_mu("L", 1, 6) == [0, 1, 0, 1, 0, 1]
    with pytest.raises(ValueError, match="scaling_map"):
        scaling_channel_of_mu("KL", 2, 9)


EMB_TYPES = [0, 2, 1, 2]
EMB_EDGES = [(0, 1), (1, 0), (1, 2), (2, 1), (0, 3), (3, 2)]
EMB_W = [0.7, -1.3, 1.9]


@pytest.mark.parametrize(
    "scaling_map, L, K",
    [("K", 2, 3), ("L", 2, 3), ("LK", 2, 3), ("K", 1, 3), ("L", 1, 3), ("LK", 1, 2)],
)
def test_embedding_hand_values(scaling_map, L, K):
    """f[e, mu] = w[Z_i] w[Z_j] sum_n c[mu, n] Q[e, eta(mu), n]."""
    n_mu, R = K * (L + 1), 3
    eta = {
        "K": [mu // (L + 1) for mu in range(n_mu)],
        "L": [mu % (L + 1) for mu in range(n_mu)],
        "LK": list(range(n_mu)),
    }[scaling_map]
    assert eta == scaling_channel_of_mu(scaling_map, L, n_mu)
    n_eta = max(eta) + 1
    g = torch.Generator().manual_seed(7)
    q = torch.randn(len(EMB_EDGES), n_eta, R, generator=g, dtype=F64)
    c = torch.randn(n_mu, R, generator=g, dtype=F64)
    module = DecoupledElementEmbedding(
        type_names=["A", "B", "C"],
        eta_of_mu=eta,
        radial_basis_size=R,
        coeffs=c,
        weights=torch.tensor(EMB_W),
        irreps_in={RADIAL_BASIS_KEY: None},
    )
    pos = torch.randn(len(EMB_TYPES), 3, generator=g, dtype=F64)
    f = module(_graph(pos, EMB_TYPES, EMB_EDGES, **{RADIAL_BASIS_KEY: q}))
    f = f[AtomicDataDict.EDGE_EMBEDDING_KEY]
    assert f.shape == (len(EMB_EDGES), n_mu)
    ql, cl = q.tolist(), c.tolist()
    for e, (i, j) in enumerate(EMB_EDGES):
        pair = EMB_W[EMB_TYPES[i]] * EMB_W[EMB_TYPES[j]]
        for mu in range(n_mu):
            expected = pair * sum(cl[mu][n] * ql[e][eta[mu]][n] for n in range(R))
            assert f[e, mu].item() == pytest.approx(expected, rel=1e-13, abs=1e-15)


def test_embedding_unused_weights_have_no_effect():
    """Only the weights of row mu = 0 are used; rows mu >= 1 are frozen and dead."""
    g = torch.Generator().manual_seed(3)
    eta = [0, 0, 1, 1]
    q = torch.randn(len(EMB_EDGES), 2, 3, generator=g, dtype=F64)
    c = torch.randn(4, 3, generator=g, dtype=F64)
    outs = []
    for unused in (None, torch.randn(3, 3, generator=g, dtype=F64), torch.zeros(3, 3)):
        module = DecoupledElementEmbedding(
            ["A", "B", "C"],
            eta,
            3,
            coeffs=c,
            weights=torch.tensor(EMB_W),
            unused_weights=unused,
            irreps_in={RADIAL_BASIS_KEY: None},
        )
        assert module.unused_weights.shape == (3, 3)
        assert not module.unused_weights.requires_grad
        data = _graph(torch.zeros(4, 3), EMB_TYPES, EMB_EDGES, **{RADIAL_BASIS_KEY: q})
        outs.append(module(data)[AtomicDataDict.EDGE_EMBEDDING_KEY])
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    # defaults: w = 1 and dead rows = 1 (as in all published files)
    default = DecoupledElementEmbedding(["A", "B"], eta, 3, irreps_in={RADIAL_BASIS_KEY: None})
    assert torch.all(default.weights == 1) and torch.all(default.unused_weights == 1)
