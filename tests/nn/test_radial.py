"""ChebyshevRadialBasis: Q[e, eta, n] = sigma T_n(xi[e, eta]) (r - R_c)^2 for r < R_c, against
explicit Chebyshev polynomials by hand (values, derivatives, smoothness at the cutoff), in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import F64
from _helpers import cheb as _cheb
from _helpers import cheb_prime as _cheb_prime
from _helpers import edge_graph as _graph

from nequip_sus2._keys import RADIAL_BASIS_KEY, SCALED_DISTANCE_KEY
from nequip_sus2.nn import ChebyshevRadialBasis, UniversalPairScaling
from nequip_sus2.nn.radial import chebyshev_polynomials

pytestmark = pytest.mark.usefixtures("float64_default_dtype")


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
