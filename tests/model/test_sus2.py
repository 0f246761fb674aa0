"""Whole-model properties of the ``SUS2Model`` builder, in float64: isolated-atom energies, the
site-energy form, a dimer computed by hand end to end, rotation / translation / permutation
invariance, force equivariance, forces and virials against finite differences, and argument
errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from _helpers import F64, build, frame_data
from _helpers import cheb as _cheb
from nequip.data import AtomicDataDict

from nequip_sus2._keys import SCALAR_BASIS_KEY
from nequip_sus2.model import SUS2Model
from nequip_sus2.model.sus2 import default_radial_scaling

pytestmark = pytest.mark.usefixtures("float64_default_dtype")

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
