"""Site-energy regularisers (``nequip_sus2.train.SiteEnergySpread`` / ``SiteEnergyCentre``)
against values computed by hand on a tiny batch, inside the host's loss (``MetricsManager``)."""

from __future__ import annotations

import math

import pytest
import torch
from nequip.data import AtomicDataDict
from nequip.train import EnergyForceStressLoss

from nequip_sus2.train import SiteEnergyCentre, SiteEnergySpread

F64 = torch.float64


def _batch():
    """Two frames: frame 0 = atoms 0, 1 (type 0), 2 (type 1); frame 1 = atoms 3 (type 0), 4, 5
    (type 1). Site energies, reference energies and reference forces chosen by hand."""
    site = torch.tensor([[-1.0], [-2.0], [-3.5], [0.5], [-1.0], [-2.0]], dtype=F64)
    preds = {
        AtomicDataDict.PER_ATOM_ENERGY_KEY: site.clone().requires_grad_(True),
        AtomicDataDict.ATOM_TYPE_KEY: torch.tensor([0, 0, 1, 0, 1, 1]),
        AtomicDataDict.BATCH_KEY: torch.tensor([0, 0, 0, 1, 1, 1]),
        AtomicDataDict.NUM_NODES_KEY: torch.tensor([3, 3]),
        AtomicDataDict.TOTAL_ENERGY_KEY: torch.tensor([[-6.5], [-2.5]], dtype=F64),
        AtomicDataDict.FORCE_KEY: torch.zeros(6, 3, dtype=F64),
        AtomicDataDict.STRESS_KEY: torch.zeros(2, 3, 3, dtype=F64),
    }
    forces = torch.zeros(6, 3, dtype=F64)
    forces[0, 0] = 1.0  # |F|^2 = 1
    forces[1, 1] = 2.0  # |F|^2 = 4
    forces[4, 2] = 3.0  # |F|^2 = 9
    target = {
        **{k: v for k, v in preds.items() if k != AtomicDataDict.PER_ATOM_ENERGY_KEY},
        AtomicDataDict.TOTAL_ENERGY_KEY: torch.tensor([[-6.0], [-3.0]], dtype=F64),
        AtomicDataDict.FORCE_KEY: forces,
    }
    return preds, target


def _spread_by_hand(f0):
    """sum over groups of n_g * (weighted variance) / N, written out group by group."""

    def w(f2):
        return 1.0 if f0 is None else f0**2 / (f0**2 + f2)

    total = 0.0
    # frame 0, type 0: E = -1 (|F|^2 1), -2 (|F|^2 4)
    w1, w2 = w(1.0), w(4.0)
    m = (w1 * -1.0 + w2 * -2.0) / (w1 + w2)
    var = (w1 * (-1.0 - m) ** 2 + w2 * (-2.0 - m) ** 2) / (w1 + w2)
    total += 2 * var
    # frame 1, type 1: E = -1 (|F|^2 9), -2 (|F|^2 0)
    w1, w2 = w(9.0), w(0.0)
    m = (w1 * -1.0 + w2 * -2.0) / (w1 + w2)
    var = (w1 * (-1.0 - m) ** 2 + w2 * (-2.0 - m) ** 2) / (w1 + w2)
    total += 2 * var
    # single-atom groups (frame 0 type 1, frame 1 type 0) contribute 0
    return total / 6


def _centre_by_hand():
    # frame 0: E_ref / N = -2;   groups: type 0 mean -1.5 (2 atoms), type 1 mean -3.5 (1 atom)
    # frame 1: E_ref / N = -1;   groups: type 0 mean 0.5 (1 atom), type 1 mean -1.5 (2 atoms)
    return (2 * 0.5**2 + 1 * 1.5**2 + 1 * 1.5**2 + 2 * 0.5**2) / 6


@pytest.mark.parametrize("f0", [None, 1.0, 2.5])
def test_spread_matches_hand_value(f0):
    preds, target = _batch()
    value = SiteEnergySpread(force_scale=f0)(preds, target)
    assert math.isclose(float(value.detach()), _spread_by_hand(f0), rel_tol=1e-12)
    assert _spread_by_hand(1.0) != pytest.approx(_spread_by_hand(None))  # weights matter


def test_centre_matches_hand_value():
    preds, target = _batch()
    value = SiteEnergyCentre()(preds, target)
    assert math.isclose(float(value.detach()), _centre_by_hand(), rel_tol=1e-12)


def test_centre_skips_frames_without_energy():
    preds, target = _batch()
    target[AtomicDataDict.TOTAL_ENERGY_KEY] = torch.tensor([[-6.0], [math.nan]], dtype=F64)
    value = SiteEnergyCentre()(preds, target)
    assert math.isclose(float(value.detach()), (2 * 0.5**2 + 1.5**2) / 3, rel_tol=1e-12)


def test_regularisers_combine_with_the_standard_loss_and_backpropagate():
    preds, target = _batch()
    loss = EnergyForceStressLoss(
        coeffs={"total_energy": 1.0, "forces": 1.0, "stress": 1.0},
        extra_metrics=[
            {"name": "site_energy_spread", "coeff": 0.5, "metric": SiteEnergySpread()},
            {"name": "site_energy_centre", "coeff": 0.5, "metric": SiteEnergyCentre()},
        ],
    )
    out = loss(preds, target)
    # the host's per-atom energy MSE, by hand: ((-6.5 + 6)/3)^2, ((-2.5 + 3)/3)^2
    e_mse = ((0.5 / 3) ** 2 + (0.5 / 3) ** 2) / 2
    f_mse = (1 + 4 + 9) / 18
    spread, centre = _spread_by_hand(1.0), _centre_by_hand()
    expected = (e_mse + f_mse + 0.0 + 0.5 * spread + 0.5 * centre) / 4.0
    assert math.isclose(float(out["site_energy_spread"].detach()), spread, rel_tol=1e-12)
    assert math.isclose(float(out["site_energy_centre"].detach()), centre, rel_tol=1e-12)
    assert math.isclose(float(out["weighted_sum"].detach()), expected, rel_tol=1e-12)
    out["weighted_sum"].backward()
    grad = preds[AtomicDataDict.PER_ATOM_ENERGY_KEY].grad.view(-1)
    assert torch.all(torch.isfinite(grad)) and float(grad.abs().sum()) > 0
    eps = 1e-6
    for i in range(6):  # finite differences of the whole weighted loss
        p_plus, t = _batch()
        p_minus, _ = _batch()
        with torch.no_grad():
            p_plus[AtomicDataDict.PER_ATOM_ENERGY_KEY][i] += eps
            p_minus[AtomicDataDict.PER_ATOM_ENERGY_KEY][i] -= eps
        up = float(loss(p_plus, t)["weighted_sum"].detach())
        down = float(loss(p_minus, t)["weighted_sum"].detach())
        fd = (up - down) / (2 * eps)
        assert abs(fd - float(grad[i])) < 1e-7, (i, fd, float(grad[i]))


def test_epoch_aggregation_is_atom_weighted():
    preds, target = _batch()
    metric = SiteEnergyCentre()
    metric.update(preds, target)
    p1 = {k: (v[:3] if k != AtomicDataDict.TOTAL_ENERGY_KEY else v[:1]) for k, v in preds.items()}
    t1 = {k: (v[:3] if k != AtomicDataDict.TOTAL_ENERGY_KEY else v[:1]) for k, v in target.items()}
    p1[AtomicDataDict.NUM_NODES_KEY] = torch.tensor([3])
    p1[AtomicDataDict.BATCH_KEY] = torch.zeros(3, dtype=torch.long)
    metric.update(p1, t1)
    # sums of squared deviations: 5.5 over the 6 atoms of both frames, then 2.75 over the 3
    # atoms of frame 0 again: the epoch value is their atom-weighted mean
    assert math.isclose(float(metric.compute()), (5.5 + 2.75) / 9, rel_tol=1e-12)


def test_force_scale_must_be_positive():
    with pytest.raises(ValueError, match="force_scale"):
        SiteEnergySpread(force_scale=0.0)
