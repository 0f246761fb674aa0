"""Linear pre-fit (``nequip_sus2.train.linear_prefit`` / ``LinearPrefit``).

The solution is checked against a direct numpy least-squares solve whose design matrix is built
here independently: every column is the model's own energy / forces / stress (NequIP's
``ForceStressOutput``, i.e. autograd of the full model) with the unknowns set to a unit vector,
minus those with the unknowns at zero (the model is exactly linear in them). The model has a
ZBL pair potential and non-unit per-species scales, so the offset and the ``s`` factor of the
formulation are exercised too.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import build
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from nequip.data import AtomicDataDict

from nequip_sus2.active_set import structures_to_data
from nequip_sus2.data.frames import frame_index
from nequip_sus2.model import SUS2Model
from nequip_sus2.nn.moments import MomentContraction
from nequip_sus2.train import linear_prefit
from nequip_sus2.train.prefit import (
    NormalEquations,
    _basis_jacobians,
    _linear_parts,
    ridge_diagonal,
)

NAMES = ["Cu", "Ag"]
R_MAX = 4.0
W_E, W_F, W_S = 1.0, 0.01, 0.001


def _structures(seed=0):
    """Five EMT-labelled Cu/Ag structures: four periodic (rattled, strained), one cluster."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(4):
        a = bulk("Cu", "fcc", a=3.7 + 0.05 * k, cubic=True).repeat((1, 1, 2))
        a.set_chemical_symbols([["Cu", "Ag"][int(x)] for x in rng.integers(0, 2, len(a))])
        eps = rng.uniform(-0.03, 0.03, (3, 3))
        a.set_cell(a.cell.array @ (np.eye(3) + 0.5 * (eps + eps.T)), scale_atoms=True)
        a.positions += rng.normal(0, 0.08, a.positions.shape)
        out.append(a)
    cluster = bulk("Ag", "fcc", a=4.0, cubic=True)
    cluster.set_chemical_symbols(["Ag", "Cu", "Ag", "Cu"])
    cluster.positions += rng.normal(0, 0.1, cluster.positions.shape)
    cluster.pbc = False
    cluster.cell = None
    out.append(cluster)
    for a in out:
        a.calc = EMT()
        labels = {"energy": a.get_potential_energy(), "forces": a.get_forces()}
        if a.pbc.all():
            labels["stress"] = a.get_stress(voigt=False)
        a.calc = SinglePointCalculator(a, **labels)
    return out


def _model(dtype="float64", **kwargs):
    return build(
        SUS2Model, seed=3, model_dtype=dtype, type_names=NAMES, r_max=R_MAX,
        max_rank=1, radial_channels=2, radial_basis_size=4,
        per_type_energy_scales={"Cu": 1.3, "Ag": 0.7},
        per_type_energy_shifts={"Cu": -3.5, "Ag": -2.5},
        pair_potential={"_target_": "nequip.nn.pair_potential.ZBL", "units": "metal",
                        "chemical_species": NAMES},
        **kwargs,
    )  # fmt: skip


def _set_unknowns(model, x):
    net = model.model.func
    with torch.no_grad():
        net.per_type_energy_scale_shift.shifts.copy_(torch.as_tensor(x[:2]).view(-1, 1))
        net.readout.theta.copy_(torch.as_tensor(x[2:]).view(-1, 1))


def _outputs(model, data):
    """Energy, forces and stress of every structure with the model's own autograd."""
    res = []
    for d in data:
        out = model(dict(d))
        stress = out.get(AtomicDataDict.STRESS_KEY)
        res.append(
            (
                float(out[AtomicDataDict.TOTAL_ENERGY_KEY].detach().reshape(())),
                out[AtomicDataDict.FORCE_KEY].detach().numpy().copy(),
                None
                if stress is None or stress.numel() == 0
                else stress.detach().numpy().reshape(9),
            )
        )
    return res


def _independent_system(model, atoms, data):
    """Rows (weighted by sqrt(w)) of the pre-fit problem, built from model evaluations."""
    n_unknowns = 2 + model.model.func.readout.theta.shape[0]
    x0 = np.concatenate(
        [
            model.model.func.per_type_energy_scale_shift.shifts.detach().numpy().ravel(),
            model.model.func.readout.theta.detach().numpy().ravel(),
        ]
    )
    _set_unknowns(model, np.zeros(n_unknowns))
    base = _outputs(model, data)
    cols = []
    for k in range(n_unknowns):
        e = np.zeros(n_unknowns)
        e[k] = 1.0
        _set_unknowns(model, e)
        cols.append(_outputs(model, data))
    _set_unknowns(model, x0)
    rows, rhs = [], []
    for f, a in enumerate(atoms):
        n = len(a)
        e_base, f_base, s_base = base[f]
        # energy, squared residual / N (the original's "vibrations" weighting)
        rows.append(
            np.array([cols[k][f][0] - e_base for k in range(n_unknowns)]) * (W_E / n) ** 0.5
        )
        rhs.append((a.get_potential_energy() - e_base) * (W_E / n) ** 0.5)
        # forces
        fcols = np.stack([(cols[k][f][1] - f_base).ravel() for k in range(n_unknowns)], 1)
        rows.extend(fcols * W_F**0.5)
        rhs.extend((a.get_forces().ravel() - f_base.ravel()) * W_F**0.5)
        # stress, as the virial -V sigma, squared residual / N
        if a.pbc.all():
            v = abs(np.linalg.det(a.cell.array))
            scols = np.stack([cols[k][f][2] - s_base for k in range(n_unknowns)], 1)
            ref = a.get_stress(voigt=False).ravel()
            rows.extend(scols * v * (W_S / n) ** 0.5)
            rhs.extend((ref - s_base) * v * (W_S / n) ** 0.5)
    return np.array(rows), np.array(rhs), x0


def _batches(data, size):
    return [AtomicDataDict.batched_from_list(data[i : i + size]) for i in range(0, len(data), size)]


@pytest.mark.parametrize("structured", [True, False])
def test_prefit_equals_direct_least_squares(structured):
    atoms = _structures()
    model = _model()
    data = structures_to_data(atoms, NAMES, R_MAX)
    A, y, x_before = _independent_system(model, atoms, data)
    ridge = 1e-9
    ata = torch.as_tensor(A.T @ A)
    lam = ridge_diagonal(ata, ridge).numpy()
    lam[:2] = 0.0  # the per-species offsets are not penalised
    # direct least squares on the ridge-augmented system
    A_aug = np.vstack([A, np.diag(np.sqrt(lam))])
    y_aug = np.concatenate([y, np.zeros(len(lam))])
    x_ref = np.linalg.lstsq(A_aug, y_aug, rcond=None)[0]

    result = linear_prefit(model, _batches(data, 2), ridge=ridge, structured=structured)
    x = result.x.numpy()
    # prefit solves the normal equations (condition number squared, ~2e13 here): compare the
    # solution normwise and the objective it minimises, not element by element
    assert np.linalg.norm(x - x_ref) <= 1e-6 * np.linalg.norm(x_ref)
    objective = lambda v: float(np.sum((A_aug @ v - y_aug) ** 2))  # noqa: E731
    assert objective(x) == pytest.approx(objective(x_ref), rel=1e-10)
    # losses are the weighted sums of squared residuals, before and after
    assert result.loss_before == pytest.approx(float(np.sum((A @ x_before - y) ** 2)), rel=1e-8)
    assert result.loss_after == pytest.approx(float(np.sum((A @ x - y) ** 2)), rel=1e-6)
    assert result.loss_after < 0.5 * result.loss_before
    assert result.num_rows == {"energy": 5, "forces": 3 * 36, "stress": 4 * 9}
    # the model now holds the solution, and its predictions give that loss
    A2, y2, x_now = _independent_system(model, atoms, data)
    np.testing.assert_allclose(x_now, x, rtol=1e-12, atol=1e-12)
    assert float(np.sum((A2 @ x_now - y2) ** 2)) == pytest.approx(result.loss_after, rel=1e-6)


def _both_jacobians(dtype: str):
    """The structured and the generic (autograd) Jacobians of one batch of four structures."""
    atoms = _structures(seed=1)[:4]
    model = _model(dtype)
    data = structures_to_data(atoms, NAMES, R_MAX)
    batch = AtomicDataDict.batched_from_list(data)
    parts = _linear_parts(model)
    index, frames = frame_index(batch)
    types = batch[AtomicDataDict.ATOM_TYPE_KEY].view(-1)
    inputs = {k: batch[k] for k in model.model_input_fields if k in batch}
    fast = _basis_jacobians(parts, dict(inputs), index, frames, types, structured=True)
    slow = _basis_jacobians(parts, dict(inputs), index, frames, types, structured=False)
    return fast[:6], slow[:6]


def test_structured_and_generic_jacobians_agree_in_float32():
    for a, b in zip(*_both_jacobians("float32"), strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5 * b.abs().max())


@pytest.mark.parametrize("atoms_per_chunk", [1, 3])
def test_structured_jacobians_in_chunks_of_atoms(monkeypatch, atoms_per_chunk):
    """The structured path takes dB/dM a chunk of atoms at a time (the chunks of a real model
    hold ~10 atoms); with 1 or 3 atoms per chunk (the last one partial) it equals autograd."""
    chunks = MomentContraction.basis_jacobian_chunks
    calls = []

    def small_chunks(self, basic, max_elements=None):
        per_atom = self.num_slots * basic.shape[1]
        calls.append(basic.shape[0])
        return chunks(self, basic, max_elements=atoms_per_chunk * per_atom)

    monkeypatch.setattr(MomentContraction, "basis_jacobian_chunks", small_chunks)
    fast, slow = _both_jacobians("float64")
    assert len(calls) == 1 and calls[0] > atoms_per_chunk  # several chunks
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-10 * b.abs().max())


def test_missing_labels_and_absent_species():
    atoms = _structures(seed=2)[:4]
    for a in atoms:  # Cu only: Ag is absent and keeps its offset
        a.set_chemical_symbols(["Cu"] * len(a))
        a.calc = EMT()
        a.calc = SinglePointCalculator(
            a, energy=a.get_potential_energy(), forces=a.get_forces(), stress=a.get_stress()
        )
    model = _model()
    data = structures_to_data(atoms, NAMES, R_MAX)
    data[1][AtomicDataDict.STRESS_KEY] = torch.full_like(data[1][AtomicDataDict.STRESS_KEY], np.nan)
    data[2][AtomicDataDict.TOTAL_ENERGY_KEY] = torch.full_like(
        data[2][AtomicDataDict.TOTAL_ENERGY_KEY], np.nan
    )
    shifts = model.model.func.per_type_energy_scale_shift.shifts
    ag_before = float(shifts[1])
    result = linear_prefit(model, _batches(data, 2))
    assert result.num_rows == {"energy": 3, "forces": 4 * 3 * 8, "stress": 3 * 9}
    assert float(shifts[1]) == ag_before
    assert np.isfinite(result.x.numpy()).all()


def test_normal_equations_drop_non_finite_rows():
    neq = NormalEquations.zeros(2)
    A = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([1.0, float("nan"), 2.0], dtype=torch.float64)
    neq.add(A, y, torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64), "energy")
    assert neq.num_rows["energy"] == 2
    torch.testing.assert_close(neq.ata, torch.tensor([[1.5, 0.5], [0.5, 0.5]], dtype=torch.float64))


def _benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "prefit_convergence.py"
    spec = importlib.util.spec_from_file_location("prefit_convergence", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prefit_callback_lowers_the_validation_error(tmp_path):
    """In-process training (EMALightningModule + Trainer, as nequip-train builds them) of the
    tutorial's model on 60 EMT structures, with and without ``LinearPrefit`` (at the start and
    every 2 epochs, weighted like the loss: ``structures``, w_F = w_E / 3): every solve lowers
    its weighted loss, the first validation already profits from the start-of-training solve,
    and after 6 epochs the validation error is below the plain run's
    (benchmarks/prefit_convergence.py for larger runs)."""
    from nequip_sus2.data.emt import write_emt_dataset

    bench = _benchmark()
    data = write_emt_dataset(tmp_path / "emt.xyz", n_structures=60, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = bench.compare(
            data,
            6,
            # the loss's 1:1 per-atom energy / force MSE balance (docs/training.md)
            {"prefit": {"every_n_epochs": 2, "weighting": "structures", "force_weight": 1 / 3}},
            model=bench.TUTORIAL_MODEL,
        )
    finally:
        torch.set_num_threads(threads)
    arm = res["arms"]["prefit"]
    assert res["epochs_plain"] == 6
    history = arm["run"]["prefit_history"]
    assert [h["epoch"] for h in history] == [0, 2, 4]
    assert all(h["loss_after"] < h["loss_before"] for h in history)
    assert arm["run"]["val"][0] < res["plain"]["val"][0], bench._report(res)
    assert arm["run"]["val"][-1] < res["plain"]["val"][-1], bench._report(res)


def test_periodic_solve_is_skipped_when_max_time_would_be_exceeded(monkeypatch):
    """With trainer.max_time, a re-solve that took longer than the time left is skipped; the
    first solve always runs, and without a time limit every due solve runs."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import Timer

    from nequip_sus2.train.prefit import LinearPrefit

    callback = LinearPrefit(at_start=True, every_n_epochs=1)
    calls = []
    monkeypatch.setattr(
        callback, "run", lambda trainer, module: calls.append(trainer.current_epoch)
    )

    def trainer(epoch: int, duration: str | None):
        callbacks = [] if duration is None else [Timer(duration=duration)]
        return SimpleNamespace(current_epoch=epoch, global_step=epoch, callbacks=callbacks)

    callback.on_train_epoch_start(trainer(0, "00:00:00:05"), None)  # first: always
    assert calls == [0]
    callback.history.append({"epoch": 0})
    callback.last_solve_seconds = 60.0
    callback.on_train_epoch_start(trainer(1, "00:00:00:05"), None)  # 5 s left < 60 s
    assert calls == [0]
    callback.on_train_epoch_start(trainer(2, "00:01:00:00"), None)  # an hour left
    assert calls == [0, 2]
    callback.last_solve_seconds = 1e9
    callback.on_train_epoch_start(trainer(3, None), None)  # no time limit
    assert calls == [0, 2, 3]
