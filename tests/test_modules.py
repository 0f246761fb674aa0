"""Unit tests pinning each SUS2 module to the equations of the spec (§2), independently of the
implementation: every expected number is computed here by hand with plain ``math`` (explicit
Chebyshev polynomials, explicit edge lists, explicit contraction formulas), in float64.

Then whole-model properties of the ``SUS2Model`` builder: isolated-atom energies, the site-energy
form, a dimer computed by hand end to end, rotation / translation / permutation invariance,
force equivariance, forces and virials against finite differences, and argument errors.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from _helpers import build, frame_data
from nequip.data import AtomicDataDict

from nequip_sus2._keys import RADIAL_BASIS_KEY, SCALAR_BASIS_KEY, SCALED_DISTANCE_KEY
from nequip_sus2.model import SUS2Model
from nequip_sus2.model.sus2 import default_radial_scaling, scaling_channel_of_mu
from nequip_sus2.nn import (
    ChebyshevRadialBasis,
    DecoupledElementEmbedding,
    LinearReadout,
    MomentContraction,
    UniversalPairScaling,
)
from nequip_sus2.nn.radial import chebyshev_polynomials
from nequip_sus2.program import ContractionProgram

F64 = torch.float64


@pytest.fixture(autouse=True)
def _float64():
    """Every module here is built and evaluated in float64 (restored afterwards)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    yield
    torch.set_default_dtype(old)


def _graph(pos, types, edges, **fields) -> AtomicDataDict.Type:
    """A non-periodic AtomicDataDict with an explicit edge list [(centre, neighbour), ...]."""
    data = {
        AtomicDataDict.POSITIONS_KEY: torch.as_tensor(pos, dtype=F64),
        AtomicDataDict.ATOM_TYPE_KEY: torch.as_tensor(types, dtype=torch.long),
        AtomicDataDict.EDGE_INDEX_KEY: torch.as_tensor(edges, dtype=torch.long).T.contiguous(),
    }
    data.update(fields)
    return data


def _cheb(n: int, x: float) -> float:
    """T_n(x), written out by hand for n = 0..3."""
    return [1.0, x, 2 * x * x - 1, 4 * x**3 - 3 * x][n]


def _cheb_prime(n: int, x: float) -> float:
    """dT_n/dx by hand for n = 0..3."""
    return [0.0, 1.0, 4 * x, 12 * x * x - 3][n]


# ---------------------------------------------------------------------------------------------
# §2.2 Universal pair scaling
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# §2.3 Chebyshev radial basis
# ---------------------------------------------------------------------------------------------


def test_chebyshev_polynomials_match_cosine_form():
    x = torch.linspace(-1.0, 1.0, 41, dtype=F64)
    t = chebyshev_polynomials(x, 9)
    assert t.shape == (41, 9)
    for n in range(9):
        torch.testing.assert_close(t[:, n], torch.cos(n * torch.arccos(x)), rtol=0, atol=1e-12)
    x0 = 0.3
    t0 = chebyshev_polynomials(torch.tensor([x0], dtype=F64), 4)[0]
    assert t0.tolist() == pytest.approx([1.0, 0.3, -0.82, -0.792], abs=1e-15)
    assert chebyshev_polynomials(torch.tensor([[0.5]]), 1).shape == (1, 1, 1)


R_C = 4.0
SIGMA = 0.37
# centre 0 and neighbours at r = 1.0, 2.5, 3.999, R_c exactly, 4.7 (beyond)
RADII = [1.0, 2.5, 3.999, R_C, 4.7]
DIRS = [(1, 0, 0), (0, 0.6, 0.8), (-0.48, 0.6, 0.64), (0, -1, 0), (0.8, 0, -0.6)]
XI = [[0.3, -0.7], [0.9, 0.1], [-0.25, 0.55], [0.4, -0.4], [0.6, 0.2]]


def _radial_graph():
    pos = [[0.0, 0.0, 0.0]] + [[r * c for c in d] for r, d in zip(RADII, DIRS, strict=True)]
    edges = [(0, k + 1) for k in range(len(RADII))]
    return _graph(pos, [0] * len(pos), edges, **{SCALED_DISTANCE_KEY: torch.tensor(XI)})


def test_radial_basis_hand_values():
    """Q[e, eta, n] = sigma T_n(xi[e, eta]) (r - R_c)^2 for r < R_c, exactly 0 otherwise."""
    module = ChebyshevRadialBasis(
        r_max=R_C,
        radial_basis_size=4,
        radial_scaling=SIGMA,
        irreps_in={SCALED_DISTANCE_KEY: "2x0e"},
    )
    q = module(_radial_graph())[RADIAL_BASIS_KEY]
    assert q.shape == (len(RADII), 2, 4)
    for e, r in enumerate(RADII):
        for eta in range(2):
            for n in range(4):
                if r < R_C:
                    expected = SIGMA * _cheb(n, XI[e][eta]) * (r - R_C) ** 2
                    assert q[e, eta, n].item() == pytest.approx(expected, rel=1e-12, abs=1e-16)
                else:
                    assert q[e, eta, n].item() == 0.0


def test_radial_basis_rejects_empty_basis():
    with pytest.raises(ValueError, match="radial_basis_size"):
        ChebyshevRadialBasis(r_max=1.0, radial_basis_size=0)


def _scaled_radial(pos, edges, alpha, r0, types=None, size=4):
    types = [0] * len(pos) if types is None else types
    data = _graph(pos, types, edges)
    n_types = max(types) + 1
    scaling = UniversalPairScaling(
        [str(k) for k in range(n_types)],
        num_channels=len(alpha),
        alpha=torch.tensor(alpha, dtype=F64).view(-1, 1, 1),
        r0=torch.tensor(r0, dtype=F64).view(-1, 1, 1),
    )
    radial = ChebyshevRadialBasis(
        r_max=R_C, radial_basis_size=size, radial_scaling=SIGMA, irreps_in=scaling.irreps_out
    )
    return radial(scaling(data))[RADIAL_BASIS_KEY]


def test_radial_basis_zero_gradient_beyond_cutoff():
    """Edges at or beyond R_c give value 0 and exactly 0 gradient (no NaN)."""
    pos = torch.tensor(
        [[0.0, 0.0, 0.0], [4.7, 0.0, 0.0], [0.0, R_C, 0.0], [1.0, 1.0, 0.5]], requires_grad=True
    )
    edges = [(0, 1), (1, 0), (0, 2), (2, 0), (0, 3), (3, 0)]
    q = _scaled_radial(pos, edges, alpha=[1.7, -0.8], r0=[2.0, 3.1])
    beyond = q[:4]
    assert torch.all(beyond == 0)
    (grad,) = torch.autograd.grad(beyond.sum(), pos, retain_graph=True)
    assert torch.all(grad == 0)
    # the in-range edges do have a gradient
    (grad,) = torch.autograd.grad(q[4:].sum(), pos)
    assert grad[3].abs().max() > 0


def _dq_dr(r_value: float, alpha: float, r0: float):
    """Q_n(r) for one edge along a fixed direction, with dQ_n/dr by autograd."""
    r = torch.tensor(r_value, dtype=F64, requires_grad=True)
    direction = torch.tensor([0.36, -0.48, 0.8], dtype=F64)
    pos = torch.stack([torch.zeros(3, dtype=F64), r * direction])
    q = _scaled_radial(pos, [(0, 1)], alpha=[alpha], r0=[r0])[0, 0]
    grads = [torch.autograd.grad(q[n], r, retain_graph=True)[0].item() for n in range(4)]
    return q.detach().tolist(), grads


def test_radial_basis_derivative_and_cutoff_smoothness():
    alpha, r0 = -1.3, 2.2
    # interior: dQ/dr = sigma (T_n'(xi) xi'(r) (r - R_c)^2 + 2 T_n(xi) (r - R_c)),
    # xi' = alpha / 2 (1 - xi^2)
    r = 2.9
    xi = math.tanh(alpha * (r - r0) / 2)
    dxi = alpha / 2 * (1 - xi * xi)
    values, grads = _dq_dr(r, alpha, r0)
    for n in range(4):
        assert values[n] == pytest.approx(SIGMA * _cheb(n, xi) * (r - R_C) ** 2, rel=1e-13)
        expected = SIGMA * (
            _cheb_prime(n, xi) * dxi * (r - R_C) ** 2 + 2 * _cheb(n, xi) * (r - R_C)
        )
        assert grads[n] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # value and first derivative vanish at R_c: O(h^2) and O(h) just inside, exactly 0 at R_c
    h = 1e-6
    values, grads = _dq_dr(R_C - h, alpha, r0)
    assert max(abs(v) for v in values) <= 2 * SIGMA * h * h
    assert max(abs(g) for g in grads) <= 3 * SIGMA * h
    values, grads = _dq_dr(R_C, alpha, r0)
    assert values == [0.0] * 4 and grads == [0.0] * 4


# ---------------------------------------------------------------------------------------------
# §2.2 table and §2.4 decoupled element embedding
# ---------------------------------------------------------------------------------------------


def test_scaling_channel_table():
    """eta(mu) of spec §2.2, written out by hand."""
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


# ---------------------------------------------------------------------------------------------
# §2.5, §2.6 moments and contractions
# ---------------------------------------------------------------------------------------------

MOM_POS = [[0.0, 0.0, 0.0], [1.2, 0.3, -0.4], [-0.2, 0.9, 0.7], [5.0, 5.0, 5.0]]
# one-directional 1 -> 2 on purpose (centre = edge_index[0]); atom 3 has no neighbours
MOM_EDGES = [(0, 1), (1, 0), (0, 2), (2, 0), (1, 2)]
MOM_F = [  # f[e, mu], mu = 0, 1, 2
    [0.8, -0.5, 1.3],
    [0.4, 0.9, -0.7],
    [-1.1, 0.6, 0.2],
    [0.3, -0.2, 0.5],
    [0.7, 1.4, -0.6],
]
MOM_BASIC = (
    (0, 0, 0, 0),  # 0: s      = sum f0
    (1, 1, 0, 0),  # 1: v_x    = sum f1 u_x
    (1, 0, 1, 0),  # 2: v_y
    (1, 0, 0, 1),  # 3: v_z
    (2, 1, 1, 0),  # 4: A_xy   = sum f2 u_x u_y
    (2, 0, 0, 2),  # 5: A_zz   = sum f2 u_z^2
    (2, 0, 3, 0),  # 6: Y      = sum f2 u_y^3
)
# file order: valid for sequential application, interleaving degrees 2, 3, 4, 2
MOM_TIMES = (
    (0, 0, 1, 7),  # 7  = s s                         (degree 2)
    (0, 7, 1, 8),  # 8  = s^3                         (degree 3)
    (1, 1, 1, 9),  # 9  = v . v                       (degree 2)
    (4, 5, 2, 11),  # 11 = 2 A_xy A_zz + 3 v_z Y      (degree 2)
    (2, 2, 1, 9),
    (3, 3, 1, 9),
    (0, 9, 1, 10),  # 10 = s (v . v)                  (degree 3)
    (3, 6, 3, 11),
    (9, 9, 1, 12),  # 12 = (v . v)^2 + 3 (s s) M_11   (degree 4)
    (7, 11, 3, 12),
    (1, 2, 1, 13),  # 13 = v_x v_y, not mapped        (degree 2)
)
# basic slots 0 and 3 in the mapping; slot 14 is never written (stays 0)
MOM_MAPPING = (0, 7, 8, 9, 10, 11, 12, 3, 14)
MOM_IRREPS = {AtomicDataDict.EDGE_EMBEDDING_KEY: "3x0e"}


def _expected_basis(atom: int) -> list[float]:
    """The scalar basis of one atom, by hand from the explicit edge list."""
    s = vx = vy = vz = axy = azz = y3 = 0.0
    for (i, j), (f0, f1, f2) in zip(MOM_EDGES, MOM_F, strict=True):
        if i != atom:
            continue
        r = math.dist(MOM_POS[i], MOM_POS[j])
        ux, uy, uz = ((MOM_POS[j][k] - MOM_POS[i][k]) / r for k in range(3))
        s += f0
        vx += f1 * ux
        vy += f1 * uy
        vz += f1 * uz
        axy += f2 * ux * uy
        azz += f2 * uz * uz
        y3 += f2 * uy**3
    vv = vx * vx + vy * vy + vz * vz
    m11 = 2 * axy * azz + 3 * vz * y3
    return [s, s * s, s**3, vv, s * vv, m11, vv * vv + 3 * s * s * m11, vz, 0.0]


def _moment_graph(requires_grad=False):
    pos = torch.tensor(MOM_POS, dtype=F64, requires_grad=requires_grad)
    f = torch.tensor(MOM_F, dtype=F64)
    return _graph(pos, [0, 0, 0, 0], MOM_EDGES, **{AtomicDataDict.EDGE_EMBEDDING_KEY: f})


def test_moment_contraction_hand_values():
    program = ContractionProgram(15, MOM_BASIC, MOM_TIMES, MOM_MAPPING)
    assert program.degrees()[7:] == [2, 3, 2, 3, 2, 4, 2, 0]
    module = MomentContraction(program, irreps_in=MOM_IRREPS)
    basis = module(_moment_graph())[SCALAR_BASIS_KEY]
    assert basis.shape == (4, len(MOM_MAPPING))
    for atom in range(4):
        expected = _expected_basis(atom)
        assert basis[atom].tolist() == pytest.approx(expected, rel=1e-13, abs=1e-14)
    # the isolated atom gets exact zeros; the centre convention is visible in atom 2 (one edge)
    assert torch.all(basis[3] == 0)
    assert basis[2, 0].item() == pytest.approx(MOM_F[3][0], rel=1e-15)


def test_moment_contraction_entry_order_irrelevant():
    """Entries in file order and the same entries grouped by degree give identical results."""
    degrees = ContractionProgram(15, MOM_BASIC, MOM_TIMES, MOM_MAPPING).degrees()
    grouped = tuple(sorted(MOM_TIMES, key=lambda e: degrees[e[3]]))
    assert grouped != MOM_TIMES
    outs = []
    for times in (MOM_TIMES, grouped):
        module = MomentContraction(
            ContractionProgram(15, MOM_BASIC, times, MOM_MAPPING), irreps_in=MOM_IRREPS
        )
        outs.append(module(_moment_graph())[SCALAR_BASIS_KEY])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-15, atol=1e-15)


def test_moment_contraction_without_contractions():
    """Only rank-0 basic moments, no entries: B = (sum_j f_0, untouched slot = 0)."""
    program = ContractionProgram(2, ((0, 0, 0, 0),), (), (0, 1))
    module = MomentContraction(program, irreps_in={AtomicDataDict.EDGE_EMBEDDING_KEY: "1x0e"})
    assert "num_entries=0" in repr(module)
    f = torch.tensor([[0.5], [0.25], [2.0]])
    data = _graph(
        MOM_POS[:3], [0, 0, 0], [(0, 1), (1, 0), (0, 2)], **{AtomicDataDict.EDGE_EMBEDDING_KEY: f}
    )
    basis = module(data)[SCALAR_BASIS_KEY]
    assert basis.tolist() == [[2.5, 0.0], [0.25, 0.0], [0.0, 0.0]]


def test_moment_contraction_rejects_invalid_program():
    bad = ContractionProgram(8, MOM_BASIC, ((0, 0, 1, 3),), (0,))  # writes into a basic slot
    with pytest.raises(ValueError, match="basic slot"):
        MomentContraction(bad, irreps_in=MOM_IRREPS)


# ---------------------------------------------------------------------------------------------
# §2.7 linear readout
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Whole model (SUS2Model builder)
# ---------------------------------------------------------------------------------------------

R_MAX = 4.0
TYPE_NAMES = ["A", "B"]
SCALES = {"A": 0.8, "B": -1.3}
SHIFTS = {"A": -2.5, "B": 1.75}


def _model(seed=0, **kwargs):
    """A float64 SUS2Model with non-trivial, asymmetric parameters."""
    config = dict(
        seed=seed,
        model_dtype="float64",
        r_max=R_MAX,
        type_names=TYPE_NAMES,
        max_rank=2,
        radial_channels=2,
        radial_basis_size=4,
        per_type_energy_scales=SCALES,
        per_type_energy_shifts=SHIFTS,
    )
    config.update(kwargs)
    model = build(SUS2Model, **config)
    g = torch.Generator().manual_seed(100 + seed)
    f = model.model.func
    with torch.no_grad():
        alpha = f.scaling.alpha
        alpha.mul_(1 + 0.6 * (torch.rand(alpha.shape, generator=g, dtype=F64) - 0.5))
        alpha.view(-1)[1] *= -1  # one negative stretch
        f.scaling.r0.add_(0.5 * torch.randn(f.scaling.r0.shape, generator=g, dtype=F64))
        f.embedding.weights.copy_(1 + 0.3 * torch.randn(len(TYPE_NAMES), generator=g))
        f.embedding.coeffs.copy_(torch.randn(f.embedding.coeffs.shape, generator=g))
        theta = f.readout.theta
        theta.copy_(torch.randn(theta.shape, generator=g) / theta.shape[0] ** 0.5)
    return model


def _run(model, types, pos, cell=None):
    return model(frame_data(types, np.asarray(pos, dtype=np.float64), cell, R_MAX))


def _energy(model, types, pos, cell=None) -> float:
    return _run(model, types, pos, cell)[AtomicDataDict.TOTAL_ENERGY_KEY].item()


def _cluster(n=6, seed=5, box=2.6):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, box, size=(n, 3)), [int(t) for t in rng.integers(0, 2, size=n)]


def _random_rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _assert_rel(actual, expected, tol):
    actual = np.asarray(actual.detach() if torch.is_tensor(actual) else actual)
    expected = np.asarray(expected.detach() if torch.is_tensor(expected) else expected)
    assert actual.shape == expected.shape
    scale = max(float(np.abs(expected).max()), 1e-300)
    err = float(np.abs(actual - expected).max())
    assert err <= tol * scale, f"max error {err:.3e} vs scale {scale:.3e}"


def test_isolated_atoms_energy_equals_shift():
    """Isolated atom energy = b + s = the per-type shift; atoms beyond R_c do not interact."""
    model = _model()
    for t, name in enumerate(TYPE_NAMES):
        out = _run(model, [t], [[0.1, -0.2, 0.3]])
        assert out[AtomicDataDict.TOTAL_ENERGY_KEY].item() == SHIFTS[name]
        assert torch.all(out[SCALAR_BASIS_KEY] == 0)
        assert torch.all(out[AtomicDataDict.FORCE_KEY] == 0)
    far = _energy(model, [0, 1, 1], [[0, 0, 0], [R_MAX + 0.01, 0, 0], [0, 0, -R_MAX - 0.5]])
    assert far == pytest.approx(SHIFTS["A"] + 2 * SHIFTS["B"], rel=1e-15)


def test_site_energy_is_shift_plus_scale_times_readout():
    """E_i = (b + s)[Z_i] + s[Z_i] sum_a theta_a B_a(i), E = sum_i E_i."""
    model = _model(seed=1)
    pos, types = _cluster()
    out = _run(model, types, pos)
    basis = out[SCALAR_BASIS_KEY].detach().tolist()
    theta = model.model.func.readout.theta.detach().view(-1).tolist()
    site = out[AtomicDataDict.PER_ATOM_ENERGY_KEY].detach().view(-1).tolist()
    for i, t in enumerate(types):
        x = sum(a * b for a, b in zip(theta, basis[i], strict=True))
        name = TYPE_NAMES[t]
        assert site[i] == pytest.approx(SHIFTS[name] + SCALES[name] * x, rel=1e-13, abs=1e-13)
    energy = out[AtomicDataDict.TOTAL_ENERGY_KEY].item()
    assert energy == pytest.approx(sum(site), rel=1e-14)
    assert any(abs(s - SHIFTS[TYPE_NAMES[t]]) > 1e-3 for s, t in zip(site, types, strict=True))


def test_per_type_energy_sequences_equal_dicts():
    """Per-type scales/shifts given as sequences (type_names order) equal the dict form."""
    by_dict = _model(seed=1)
    by_list = _model(
        seed=1,
        per_type_energy_scales=[SCALES[t] for t in TYPE_NAMES],
        per_type_energy_shifts=tuple(SHIFTS[t] for t in TYPE_NAMES),
    )
    pos, types = _cluster()
    e_dict, e_list = _energy(by_dict, types, pos), _energy(by_list, types, pos)
    assert e_list == e_dict
    text = repr(by_list)  # extra_repr of every SUS2 module
    for needle in ("num_channels=", "radial_scaling=", "radial_basis_size=", "num_basis="):
        assert needle in text


def test_dimer_by_hand():
    """The whole chain scaling -> radial -> embedding -> moments for an A-B dimer, L=1, K=1.

    Published basis for L=1, K=1: {s, s^2, s^3, v.v, s v.v, (v.v)^2} with s = f_0(r),
    v = f_1(r) u, so v.v = f_1^2; f_mu = w_A w_B sum_n c[mu, n] sigma T_n(xi_eta(mu)) (r - R_c)^2
    with xi from the centre-first pair (alpha, r0). Compared as multisets (order-agnostic).
    """
    model = _model(seed=2, max_rank=1, radial_channels=1, scaling_map="LK", basis="published")
    f = model.model.func
    alpha = f.scaling.alpha.detach().tolist()  # [eta][Zi][Zj]
    r0 = f.scaling.r0.detach().tolist()
    c = f.embedding.coeffs.detach().tolist()
    w = f.embedding.weights.detach().tolist()
    sigma = f.radial_basis.radial_scaling
    assert sigma == pytest.approx(default_radial_scaling(R_MAX, None))
    r = 2.3
    types = [0, 1]
    out = _run(model, types, [[0.0, 0.0, 0.0], [0.0, r * 0.6, r * 0.8]])
    basis = out[SCALAR_BASIS_KEY].detach()
    for i, j in ((0, 1), (1, 0)):
        zi, zj = types[i], types[j]
        fs = []
        for mu in range(2):  # LK: eta = mu
            xi = math.tanh(alpha[mu][zi][zj] * (r - r0[mu][zi][zj]) / 2)
            fs.append(
                w[zi]
                * w[zj]
                * sum(c[mu][n] * sigma * _cheb(n, xi) * (r - R_MAX) ** 2 for n in range(4))
            )
        s, vv = fs[0], fs[1] ** 2
        expected = sorted([s, s * s, s**3, vv, s * vv, vv * vv])
        assert sorted(basis[i].tolist()) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert not torch.allclose(basis[0], basis[1])  # asymmetric pair scaling


def test_dimer_symmetries():
    """A-B dimer: swapping the two positions (inversion) or the atom order leaves E unchanged."""
    model = _model(seed=3)
    p0, p1 = [0.2, -0.1, 0.4], [1.1, 1.5, -0.6]
    e = _energy(model, [0, 1], [p0, p1])
    assert e == pytest.approx(_energy(model, [0, 1], [p1, p0]), rel=1e-13)
    assert e == pytest.approx(_energy(model, [1, 0], [p1, p0]), rel=1e-13)
    # and the mirror image A-A vs B-B differ (species matter)
    assert _energy(model, [0, 0], [p0, p1]) != pytest.approx(_energy(model, [1, 1], [p0, p1]))


@pytest.mark.parametrize("scaling_map", ["K", "L", "LK"])
@pytest.mark.parametrize("basis", ["full_rank", "published"])
@pytest.mark.parametrize("max_rank", [1, 2, 3])
def test_rotation_invariance_and_force_equivariance(max_rank, basis, scaling_map):
    model = _model(seed=max_rank, max_rank=max_rank, scaling_map=scaling_map, basis=basis)
    pos, types = _cluster(seed=10 + max_rank)
    rot = _random_rotation(20 + max_rank)
    out = _run(model, types, pos)
    rot_out = _run(model, types, pos @ rot.T)
    b, rb = out[SCALAR_BASIS_KEY], rot_out[SCALAR_BASIS_KEY]
    assert b.abs().max() > 1e-3
    _assert_rel(rb, b, 1e-10)
    key = AtomicDataDict.TOTAL_ENERGY_KEY
    _assert_rel(rot_out[key], out[key], 1e-10)
    _assert_rel(
        rot_out[AtomicDataDict.PER_ATOM_ENERGY_KEY], out[AtomicDataDict.PER_ATOM_ENERGY_KEY], 1e-10
    )
    forces = out[AtomicDataDict.FORCE_KEY].detach().numpy()
    _assert_rel(rot_out[AtomicDataDict.FORCE_KEY], forces @ rot.T, 1e-10)


def test_translation_and_permutation_invariance():
    model = _model(seed=4, max_rank=3, scaling_map="L")
    pos, types = _cluster(seed=11)
    out = _run(model, types, pos)
    moved = _run(model, types, pos + np.array([3.7, -12.5, 0.9]))
    for key in (SCALAR_BASIS_KEY, AtomicDataDict.TOTAL_ENERGY_KEY, AtomicDataDict.FORCE_KEY):
        _assert_rel(moved[key], out[key], 1e-10)
    perm = [3, 0, 5, 1, 4, 2]
    permuted = _run(model, [types[k] for k in perm], pos[perm])
    _assert_rel(permuted[SCALAR_BASIS_KEY], out[SCALAR_BASIS_KEY][perm], 1e-10)
    _assert_rel(permuted[AtomicDataDict.FORCE_KEY], out[AtomicDataDict.FORCE_KEY][perm], 1e-10)


@pytest.mark.parametrize(
    "kwargs", [{"max_rank": 2}, {"max_rank": 3, "scaling_map": "LK", "basis": "published"}]
)
def test_forces_match_finite_differences(kwargs):
    model = _model(seed=6, **kwargs)
    pos, types = _cluster(seed=12)
    forces = _run(model, types, pos)[AtomicDataDict.FORCE_KEY].detach().numpy()
    h = 1e-5
    for atom, axis in ((0, 0), (2, 1), (3, 2), (5, 0), (1, 2)):
        plus, minus = pos.copy(), pos.copy()
        plus[atom, axis] += h
        minus[atom, axis] -= h
        fd = -(_energy(model, types, plus) - _energy(model, types, minus)) / (2 * h)
        assert forces[atom, axis] == pytest.approx(fd, rel=1e-6, abs=1e-8 * np.abs(forces).max())


TRICLINIC = np.array([[4.1, 0.0, 0.0], [1.2, 3.9, 0.0], [-0.7, 0.8, 4.3]])


def test_virial_matches_strain_finite_differences():
    """W_ab = -dE/d eps_ab with r -> r (1 + eps), cell -> cell (1 + eps), triclinic PBC cell."""
    model = _model(seed=7, max_rank=3, scaling_map="K")
    frac = np.array([[0.1, 0.2, 0.3], [0.6, 0.45, 0.2], [0.35, 0.8, 0.7]])
    types = [0, 1, 1]
    pos = frac @ TRICLINIC
    out = _run(model, types, pos, TRICLINIC)
    shifts = out[AtomicDataDict.EDGE_CELL_SHIFT_KEY]
    assert (shifts != 0).any(dim=1).sum() > 10  # many periodic images
    virial = out[AtomicDataDict.VIRIAL_KEY].detach().numpy().reshape(3, 3)
    h = 1e-6
    fd = np.zeros((3, 3))
    for a, b in itertools.product(range(3), range(3)):
        energies = []
        for sign in (1, -1):
            eps = np.eye(3)
            eps[a, b] += sign * h  # not symmetrised: also checks rotation invariance
            energies.append(_energy(model, types, pos @ eps, TRICLINIC @ eps))
        fd[a, b] = -(energies[0] - energies[1]) / (2 * h)
    assert np.abs(virial).max() > 1e-2
    np.testing.assert_allclose(virial, fd, rtol=0, atol=1e-6 * np.abs(virial).max())
    np.testing.assert_allclose(virial, virial.T, rtol=0, atol=1e-12 * np.abs(virial).max())


# ---------------------------------------------------------------------------------------------
# Builder argument errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scaling_map": "KL"}, "scaling_map must be one of"),
        ({"basis": "full"}, "basis must be 'full_rank' or 'published'"),
        ({"radial_channels": 0}, "radial_channels must be >= 1"),
        ({"max_rank": 4}, r"max_rank \(L\) must be 1, 2 or 3, got 4"),
        ({"max_rank": 0}, r"max_rank \(L\) must be 1, 2 or 3, got 0"),
        ({"r_max": 0.0}, "r_max must be positive"),
        ({"min_dist": R_MAX}, "min_dist must lie in"),
        ({"min_dist": 5.0}, "min_dist must lie in"),
        ({"per_type_energy_scales": {"A": 1.0, "C": 2.0}}, "per_type_energy_scales: keys"),
        ({"per_type_energy_shifts": {"A": 1.0}}, "per_type_energy_shifts: keys"),
        ({"per_type_energy_scales": [1.0, 2.0, 3.0]}, "per_type_energy_scales: 3 values"),
    ],
)
def test_builder_argument_errors(kwargs, match):
    config = dict(seed=0, model_dtype="float64", r_max=R_MAX, type_names=TYPE_NAMES)
    config.update(kwargs)
    with pytest.raises(ValueError, match=match):
        build(SUS2Model, **config)


def test_pair_scaling_rejects_ambiguous_shapes():
    """alpha/r0 are a scalar or a full [N_eta, C, C] table; a per-channel vector is refused."""
    with pytest.raises(ValueError, match=r"alpha must be a scalar or have shape \[N_eta, C, C\]"):
        UniversalPairScaling(["A", "B"], num_channels=2, alpha=torch.tensor([1.0, 2.0]), r0=1.0)
    with pytest.raises(ValueError, match="r0 must be a scalar"):
        UniversalPairScaling(["A", "B", "C"], 2, alpha=1.0, r0=torch.ones(2, 3))
