"""Exact parity with the published SUS2 models in ``../shared/reference`` (docs/theory.md §5).

Models loaded with :func:`nequip_sus2.model.SUS2FromMTP` must reproduce the golden predictions
(float64: energies 1e-8 relative, forces and virials 1e-7 absolute) and the published model's
DFT errors on ``alloy_sample.cfg``. An independent extended-precision evaluator
(``_reference_sus2.py``) checks the model where the golden files' printed digits run out.
"""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import build, predict
from _reference_sus2 import reference_energy, reference_forces
from conftest import GOLDEN, SPECIES, require_reference

from nequip_sus2.io.cfg import read_cfg
from nequip_sus2.io.mtp import read_mtp
from nequip_sus2.model import SUS2FromMTP

# published parameter counts (docs/theory.md §2.9); cu2se_p from the same formula by hand:
# C=2, N_eta=2 (K map, N_mu=8, L=3), R=8: 2 + 2*2*4 + 8*(8+2) + 2 + 109 = 209
PUBLISHED_PARAMETER_COUNT = {"alloy": 17657, "cathod": 2066, "cu2se_p": 209}

_models: dict = {}


def load(name: str, dtype: str):
    key = (name, dtype)
    if key not in _models:
        path = require_reference(f"{name}.mtp")
        _models[key] = build(
            SUS2FromMTP, mtp_path=str(path), type_names=SPECIES[name], model_dtype=dtype
        )
    return _models[key]


def golden_frames(name: str):
    return read_cfg(require_reference(GOLDEN[name]))


@pytest.mark.parametrize("name", list(SPECIES))
def test_parameter_count_matches_published_formula(name):
    model = load(name, "float64")
    trainable = sum(p.numel() for p in model.parameters())
    assert trainable == PUBLISHED_PARAMETER_COUNT[name]
    assert read_mtp(require_reference(f"{name}.mtp")).parameter_count() == trainable


@pytest.mark.parametrize("name", list(SPECIES))
def test_golden_predictions_float64(name):
    """Energies to 1e-8 relative; forces/virials to 1e-7 absolute plus 1e-9 of the frame's largest
    component.

    The golden labels are printed with 13 significant digits and, on the random high-force
    cathode structures (|F| up to ~600 eV/A), carry errors of a few 1e-10 relative of their own:
    ``test_cathode_against_extended_precision`` shows the model agrees with an independent
    extended-precision evaluation far more tightly than with those labels.
    """
    model = load(name, "float64")
    frames = golden_frames(name)
    kinds = {"periodic": 0, "cluster": 0, "triclinic": 0}
    for frame in frames:
        out = predict(model, frame.types, frame.positions, frame.cell)
        np.testing.assert_allclose(out["energy"], frame.energy, rtol=1e-8, atol=0)
        f_tol = 1e-7 + 1e-9 * np.abs(frame.forces).max()
        np.testing.assert_allclose(out["forces"], frame.forces, rtol=0, atol=f_tol)
        if frame.cell is None:
            kinds["cluster"] += 1
        else:
            kinds["periodic"] += 1
            cell = np.asarray(frame.cell)
            kinds["triclinic"] += int(np.abs(cell - np.diag(np.diag(cell))).max() > 1e-6)
        if frame.plus_stress is not None:
            w_tol = 1e-7 + 1e-9 * np.abs(frame.plus_stress).max()
            np.testing.assert_allclose(out["virial"], frame.plus_stress, rtol=0, atol=w_tol)
    if name != "alloy":  # the random golden sets mix clusters and triclinic cells
        assert kinds["cluster"] > 0 and kinds["triclinic"] > 0, kinds


@pytest.mark.parametrize("name", ["alloy", "cu2se_p"])
def test_golden_forces_float64_absolute(name):
    """On realistic forces the plain 1e-7 absolute bound of the issue holds with no slack."""
    model = load(name, "float64")
    for frame in golden_frames(name):
        out = predict(model, frame.types, frame.positions, frame.cell)
        assert np.abs(out["forces"] - frame.forces).max() < 1e-7
        if frame.plus_stress is not None:
            assert np.abs(out["virial"] - frame.plus_stress).max() < 1e-7


def test_cathode_against_extended_precision():
    mtp = read_mtp(require_reference("cathod.mtp"))
    model = load("cathod", "float64")
    frames = golden_frames("cathod")
    worst = {"energy": 0.0, "forces": 0.0}
    for frame in (frames[0], frames[-1]):  # one periodic, one cluster
        out = predict(model, frame.types, frame.positions, frame.cell)
        e_ref = reference_energy(mtp, frame.types, frame.positions, frame.cell)
        worst["energy"] = max(worst["energy"], float(abs(out["energy"] - e_ref) / abs(e_ref)))
        idx = [0, 1]
        f_ref = reference_forces(mtp, frame.types, frame.positions, frame.cell, idx)
        err = np.abs(out["forces"][idx] - f_ref.astype(np.float64)).max()
        worst["forces"] = max(worst["forces"], float(err / (1 + np.abs(f_ref).max())))
    assert worst["energy"] < 1e-12, worst
    assert worst["forces"] < 1e-9, worst


@pytest.mark.parametrize("name", list(SPECIES))
def test_golden_predictions_float32(name):
    """float32 agrees with float64 within float32 rounding of the model's own terms.

    The bound scales with sum_i |s_i| sum_a |theta_a B_a(i)| (the size of the terms that cancel
    into the energy): the published cu2se_p model has basis values up to ~2e4.
    """
    m32, m64 = load(name, "float32"), load(name, "float64")
    eps = float(np.finfo(np.float32).eps)
    theta = m64.model.func.readout.theta.detach().double().numpy().ravel()
    scales = m64.model.func.per_type_energy_scale_shift.scales.detach().double().numpy().ravel()
    for frame in golden_frames(name)[:40]:
        o32 = predict(m32, frame.types, frame.positions, frame.cell)
        out = m64(_frame_data(m64, frame))
        basis = out["sus2_scalar_basis"].detach().double().numpy()
        terms = (np.abs(scales[frame.types]) * (np.abs(basis * theta).sum(1) + 1)).sum()
        assert abs(o32["energy"] - frame.energy) <= 16 * eps * terms
        f_scale = np.abs(frame.forces).max() + 1
        assert (
            np.abs(o32["forces"] - frame.forces).max()
            <= 16 * eps * terms / len(frame.types) + 1e-5 * f_scale
        )


def _frame_data(model, frame):
    from _helpers import frame_data

    return frame_data(frame.types, frame.positions, frame.cell, float(model.metadata["r_max"]))


def test_published_alloy_dft_errors():
    """On alloy_sample.cfg the model reproduces the published model's errors against DFT."""
    model = load("alloy", "float64")
    de, df, dw = [], [], []
    for frame in read_cfg(require_reference("alloy_sample.cfg")):
        out = predict(model, frame.types, frame.positions, frame.cell)
        n = len(frame.types)
        de.append((out["energy"] - frame.energy) / n)
        df.append((out["forces"] - frame.forces).ravel())
        volume = abs(np.linalg.det(np.asarray(frame.cell)))
        dw.append((out["virial"] - frame.plus_stress) / volume)
    de, df, dw = np.array(de), np.concatenate(df), np.concatenate(dw)
    rmse = lambda x: float(np.sqrt(np.mean(x**2)))  # noqa: E731
    # docs/theory.md §5: 27.39 / 19.34 meV/atom, 0.1836 / 0.1228 eV/A, 0.0083 eV/A^3
    assert rmse(de) * 1000 == pytest.approx(27.39, abs=0.01)
    assert np.abs(de).mean() * 1000 == pytest.approx(19.34, abs=0.01)
    assert rmse(df) == pytest.approx(0.1836, abs=1e-4)
    assert np.abs(df).mean() == pytest.approx(0.1228, abs=1e-4)
    assert rmse(dw) == pytest.approx(0.0083, abs=1e-4)
