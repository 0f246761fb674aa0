"""Extrapolation grade: MaxVol, the active set, the grade module, the ASE calculator, the MD
monitor, select-add, and (slow) checkpoints, packages and the AOTI-compiled calculator."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import build, run_ok
from ase import Atoms
from ase.build import bulk
from nequip.data import AtomicDataDict
from nequip.integrations.utils import basic_transforms
from scipy.spatial.transform import Rotation

from nequip_sus2.active_set import (
    active_set_from_basis,
    add_extrapolation_grade,
    build_active_set,
    compute_scalar_basis,
    maxvol,
    select_add,
    structures_to_data,
)
from nequip_sus2.ase import ExtrapolationError, ExtrapolationMonitor, SUS2Calculator
from nequip_sus2.model import SUS2Model
from nequip_sus2.nn.extrapolation import EXTRAPOLATION_GRADE_KEY, ExtrapolationGrade

NAMES = ["Cu", "Ag"]
R_MAX = 4.5
TOL = 1e-3
A_FCC = {"Cu": 3.615, "Ag": 4.086}


# ----------------------------------------------------------------------------------------------
# MaxVol
# ----------------------------------------------------------------------------------------------


def test_maxvol_dominant_submatrix():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 12)) @ np.diag(np.logspace(0, -6, 12))  # badly scaled columns
    res = maxvol(X, tol=TOL)
    np.testing.assert_allclose(res.coefficients[res.indices], np.eye(12), atol=1e-9)
    assert res.max_coefficient <= 1 + TOL + 1e-9
    np.testing.assert_allclose(res.coefficients @ X[res.indices], X, atol=1e-9 * np.abs(X).max())
    init = maxvol(X, tol=np.inf)  # the pivoted-QR start, no swaps
    assert init.num_swaps == 0
    vol = abs(np.linalg.det(X[res.indices]))
    assert vol >= abs(np.linalg.det(X[init.indices]))


def test_maxvol_no_single_swap_improves_volume():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(9, 3))
    res = maxvol(X, tol=1e-12)
    best = abs(np.linalg.det(X[res.indices]))
    for j, i in itertools.product(range(3), range(9)):
        rows = res.indices.copy()
        rows[j] = i
        assert abs(np.linalg.det(X[rows])) <= best * (1 + 1e-9)


def test_maxvol_argument_checks():
    with pytest.raises(ValueError, match="at least as many rows"):
        maxvol(np.ones((2, 3)))
    with pytest.raises(ValueError, match="distinct"):
        maxvol(np.eye(3), init=[0, 0, 1])


# ----------------------------------------------------------------------------------------------
# the active set of a model
# ----------------------------------------------------------------------------------------------


def _training_structures(n=24, seed=0):
    """Cu/Ag fcc and bcc cells, random occupancy, strained by up to 3 %, rattled."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        kind = ["fcc", "bcc"][k % 2]
        symbols = [NAMES[int(x)] for x in rng.integers(0, 2, 16 if kind == "fcc" else 16)]
        a_fcc = np.mean([A_FCC[s] for s in symbols]) * rng.uniform(0.98, 1.02)
        a = a_fcc if kind == "fcc" else a_fcc / 2 ** (1 / 3)
        atoms = bulk("X", kind, a=a, cubic=True).repeat((2, 2, 1) if kind == "fcc" else (2, 2, 2))
        atoms.set_chemical_symbols(symbols[: len(atoms)])
        eps = rng.uniform(-0.03, 0.03, (3, 3))
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.5 * (eps + eps.T)), scale_atoms=True)
        atoms.positions += rng.normal(0, 0.08, atoms.positions.shape)
        out.append(atoms)
    return out


@pytest.fixture(scope="module")
def model_and_set():
    from nequip.utils.global_state import set_global_state

    set_global_state()
    model = build(
        SUS2Model, seed=0, model_dtype="float64", type_names=NAMES, r_max=R_MAX,
        max_rank=2, radial_channels=2, radial_basis_size=6,
    )  # fmt: skip
    train = _training_structures()
    active = build_active_set(model, train, tol=TOL)
    reference = {
        "energy": [],
        "forces": [],
    }
    calc0 = _calculator(model)
    for a in train[:3]:
        a = a.copy()
        a.calc = calc0
        reference["energy"].append(a.get_potential_energy())
        reference["forces"].append(a.get_forces())
    add_extrapolation_grade(model, active)
    model.eval()
    return model, active, train, reference


def _calculator(model):
    return SUS2Calculator(
        model=model.eval(),
        device="cpu",
        transforms=basic_transforms(model.metadata, R_MAX, NAMES, {n: n for n in NAMES}),
    )


def _grade(model, atoms) -> np.ndarray:
    atoms = atoms.copy()
    atoms.calc = _calculator(model)
    return atoms.calc.get_extrapolation_grade(atoms)


def test_active_set_is_full_rank_and_converged(model_and_set):
    _, active, _, _ = model_and_set
    assert active.ranks == [active.num_basis] * 2
    assert active.residual is None
    assert all(len(a) == active.num_basis for a in active.active)
    assert min(active.counts) > active.num_basis


def test_grade_is_one_on_the_active_set_and_at_most_one_on_training_data(model_and_set):
    model, active, train, _ = model_and_set
    grades = [_grade(model, a) for a in train]
    for z in range(2):
        for frame, atom in active.active[z]:
            assert grades[frame][atom] == pytest.approx(1.0, abs=1e-8)
    assert max(g.max() for g in grades) <= 1 + TOL + 1e-8
    # the module (float64) and the numpy definition agree
    data = structures_to_data(train, NAMES, R_MAX)
    B, types, frame, atom = compute_scalar_basis(model, data)
    np.testing.assert_allclose(
        active.grade(B, types), np.concatenate(grades), rtol=1e-10, atol=1e-12
    )


def test_grade_does_not_change_energies_or_forces(model_and_set):
    model, _, train, reference = model_and_set
    calc = _calculator(model)
    for k, a in enumerate(train[:3]):
        a = a.copy()
        a.calc = calc
        assert a.get_potential_energy() == pytest.approx(reference["energy"][k], abs=1e-12)
        np.testing.assert_allclose(a.get_forces(), reference["forces"][k], atol=1e-12)


def test_grade_flags_out_of_domain_environments(model_and_set):
    model, _, train, _ = model_and_set
    base = train[0]
    found = {}
    for scale in (0.85, 1.2):
        a = base.copy()
        a.set_cell(a.cell * scale, scale_atoms=True)
        found[f"cell x {scale}"] = _grade(model, a).max()
    sc = bulk("Cu", "sc", a=2.55).repeat(3)  # coordination 6 at the fcc NN distance
    found["simple cubic"] = _grade(model, sc).max()
    dimer = Atoms("CuAg", positions=[[0, 0, 0], [2.5, 0, 0]], cell=[20, 20, 20], pbc=True)
    found["dimer"] = _grade(model, dimer).max()
    for name, g in found.items():
        assert g > 1.5, (name, g)


def test_grade_is_rotation_invariant(model_and_set):
    model, _, train, _ = model_and_set
    for k in (1, 2, 5):
        a = train[k].copy()
        g0 = _grade(model, a)
        R = Rotation.random(random_state=k).as_matrix()
        b = a.copy()
        b.set_cell(a.cell.array @ R.T, scale_atoms=False)
        b.positions = a.positions @ R.T
        np.testing.assert_allclose(_grade(model, b), g0, rtol=1e-9, atol=1e-12)
        b = a.copy()
        b.rattle(0.0)
        b.translate([0.3, -0.2, 0.7])
        b.wrap()
        np.testing.assert_allclose(_grade(model, b), g0, rtol=1e-9, atol=1e-12)


def test_rank_deficient_species_use_the_residual():
    rng = np.random.default_rng(3)
    nb = 6
    basis = rng.normal(size=(4, nb))  # species 1 lives in a 4-dimensional subspace
    X0 = rng.normal(size=(40, nb))
    X1 = rng.normal(size=(30, 4)) @ basis
    B = np.vstack([X0, X1])
    types = np.array([0] * 40 + [1] * 30)
    active = active_set_from_basis(B, types, ["A", "B"], tol=TOL)
    assert active.ranks == [6, 4] and active.residual is not None
    assert active.grade(B, types).max() <= 1 + TOL + 1e-9
    inside = rng.normal(size=(5, 4)) @ basis * 0.01
    outside = inside + 0.01 * rng.normal(size=(5, nb))
    assert active.grade(inside, np.ones(5, int)).max() < 1
    assert active.grade(outside, np.ones(5, int)).min() > 1
    # species without any environment: every non-zero environment is extrapolation
    empty = active_set_from_basis(X0, np.zeros(40, int), ["A", "B"], tol=TOL)
    assert empty.grade(X0[:3], np.ones(3, int)).min() > 1e6
    # the module computes the same
    module = active.module(irreps_in={"sus2_scalar_basis": f"{nb}x0e"})
    data = {
        "sus2_scalar_basis": torch.as_tensor(np.vstack([inside, outside])),
        AtomicDataDict.ATOM_TYPE_KEY: torch.ones(10, dtype=torch.long),
    }
    out = module(data)[EXTRAPOLATION_GRADE_KEY].view(-1).numpy()
    np.testing.assert_allclose(
        out, active.grade(np.vstack([inside, outside]), np.ones(10, int)), rtol=1e-12
    )


def test_active_set_file_round_trip(model_and_set, tmp_path):
    import copy

    from nequip_sus2.active_set import ActiveSet
    from nequip_sus2.nn.extrapolation import insert_extrapolation_grade

    model, active, train, _ = model_and_set
    path = tmp_path / "active_set.pt"
    active.save(path)
    again = ActiveSet.load(path)
    assert again.type_names == NAMES and again.active == active.active
    np.testing.assert_array_equal(again.inverse, active.inverse)
    # refreshing a model's grade from the file (what a model modifier would do)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.func.extrapolation_grade.inverse.zero_()
    insert_extrapolation_grade(other, str(path))
    np.testing.assert_allclose(_grade(other, train[2]), _grade(model, train[2]), rtol=1e-12)


def test_module_shapes_are_checked():
    with pytest.raises(ValueError, match="inverse"):
        ExtrapolationGrade(2, 3, inverse=torch.zeros(2, 3, 2))
    with pytest.raises(ValueError, match="residual_scale"):
        ExtrapolationGrade(2, 3, residual_scale=torch.tensor([1.0, 0.0]))


# ----------------------------------------------------------------------------------------------
# active learning helpers
# ----------------------------------------------------------------------------------------------


def test_md_monitor_saves_and_stops(model_and_set, tmp_path):
    from ase import units
    from ase.md.verlet import VelocityVerlet

    model, _, train, _ = model_and_set
    atoms = train[0].copy()
    atoms.calc = _calculator(model)
    out = tmp_path / "extrapolating.xyz"
    monitor = ExtrapolationMonitor(atoms, save_path=out, save_threshold=0.0, stop_threshold=None)
    dyn = VelocityVerlet(atoms, 0.5 * units.fs)
    dyn.attach(monitor, interval=1)
    dyn.run(3)
    assert len(monitor.history) == 4 and monitor.num_saved == 4
    from ase.io import read

    saved = read(out, index=":")
    assert len(saved) == 4 and saved[0].info["max_extrapolation_grade"] == monitor.history[0]

    squeezed = train[0].copy()
    squeezed.set_cell(squeezed.cell * 0.85, scale_atoms=True)
    squeezed.calc = _calculator(model)
    stop = ExtrapolationMonitor(squeezed, save_path=None, save_threshold=2.0, stop_threshold=3.0)
    dyn = VelocityVerlet(squeezed, 0.5 * units.fs)
    dyn.attach(stop, interval=1)
    with pytest.raises(ExtrapolationError, match="exceeds the stop threshold"):
        dyn.run(5)
    assert len(stop.history) == 1


def test_select_add_picks_the_new_environments(model_and_set):
    model, _, train, _ = model_and_set
    new = []
    for scale in (0.9, 1.15):
        a = train[3].copy()
        a.set_cell(a.cell * scale, scale_atoms=True)
        new.append(a)
    candidates = [train[4], new[0], train[6], new[1]]
    chosen, gamma = select_add(model, candidates)
    assert chosen == [1, 3]
    assert gamma[[0, 2]].max() <= 1 + TOL + 1e-8 and gamma[[1, 3]].min() > 1.5
    # with the enlarged active set the selected structures are no longer extrapolating (the
    # training structures may now be slightly above 1: rows left the active set; the active set
    # is rebuilt from the whole training set after retraining)
    import copy

    updated = copy.deepcopy(model)
    select_add(updated, candidates, update_model=True)
    _, gamma2 = select_add(updated, candidates)
    assert gamma2[[1, 3]].max() <= 1 + TOL + 1e-6


# ----------------------------------------------------------------------------------------------
# saved models (slow: a short nequip-train run, packaging, AOTI compilation)
# ----------------------------------------------------------------------------------------------

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A float32 tutorial model trained 1 epoch with configs/tutorial_prefit.yaml on 30 EMT
    structures (fewer environments per species than N_B: the residual term is exercised)."""
    from nequip_sus2.data.emt import write_emt_dataset

    tmp = tmp_path_factory.mktemp("trained")
    data = write_emt_dataset(tmp / "emt.xyz", n_structures=30, seed=0)
    run_dir = tmp / "run"
    run_ok(
        [
            sys.executable, "-m", "nequip.scripts.train", "-cp", str(CONFIGS),
            "-cn", "tutorial_prefit.yaml", f"data_file={data}", "max_epochs=1", "run=[train]",
            f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false",
        ]
    )  # fmt: skip
    return run_dir / "best.ckpt", data


def _saved_calculator(path):
    return SUS2Calculator._from_saved_model(str(path), chemical_species_to_atom_type_map=True)


def _grades(calc, frames):
    out = []
    for a in frames:
        a = a.copy()
        a.calc = calc
        a.get_potential_energy()
        out.append(calc.results["extrapolation_grade"].copy())
    return out


def _probe_frames(data):
    from ase.io import read

    frames = read(data, index=":")
    squeezed = frames[0].copy()
    squeezed.set_cell(squeezed.cell * 0.85, scale_atoms=True)
    return frames, squeezed


@pytest.mark.slow
def test_checkpoints_and_packages_carry_the_grade(trained, tmp_path, capsys):
    from nequip_sus2.cli import active_set_main as main

    ckpt, data = trained
    frames, squeezed = _probe_frames(data)
    graded = tmp_path / "graded.ckpt"
    assert main([str(ckpt), str(data), "-o", str(graded)]) == 0
    calc = _saved_calculator(graded)
    ref = _grades(calc, frames)
    assert max(g.max() for g in ref) <= 1 + TOL + 1e-6
    assert _grades(calc, [squeezed])[0].max() > 1.5
    # energies are those of the original checkpoint
    plain = SUS2Calculator._from_saved_model(str(ckpt), chemical_species_to_atom_type_map=True)
    a, b = frames[1].copy(), frames[1].copy()
    a.calc, b.calc = calc, plain
    assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), abs=1e-6)
    assert "extrapolation_grade" not in plain.results
    # checkpoint -> package (nequip-package build) and package -> package
    pkg = tmp_path / "graded.nequip.zip"
    assert main([str(ckpt), str(data), "-o", str(pkg)]) == 0
    from nequip.scripts.package import main as package_main

    plain_pkg = tmp_path / "plain.nequip.zip"
    package_main(["build", str(ckpt), str(plain_pkg)])
    pkg2 = tmp_path / "repackaged.nequip.zip"
    assert main([str(plain_pkg), str(data), "-o", str(pkg2)]) == 0
    for path in (pkg, pkg2):
        got = _grades(_saved_calculator(path), frames)
        for g, r in zip(got, ref, strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-6)
    assert main([str(plain_pkg), str(data), "-o", str(tmp_path / "x.ckpt")]) == 2
    err = capsys.readouterr().err
    assert "nequip-sus2 active-set: error: " in err and "only be written back as a package" in err
    assert not (tmp_path / "x.ckpt").exists()


@pytest.mark.slow
def test_aoti_compiled_calculator_returns_the_eager_grade(trained, tmp_path):
    """nequip-compile --mode aotinductor --target sus2_ase (~2-3 min here)."""
    from nequip_sus2.graded_model import write_model_with_grade

    ckpt, data = trained
    frames, squeezed = _probe_frames(data)
    pkg = tmp_path / "graded.nequip.zip"
    write_model_with_grade(ckpt, data, pkg)
    compiled = tmp_path / "graded.nequip.pt2"
    script = (
        "import sys; import nequip_sus2._compile as c; c.register_compile_targets(); "
        "from nequip.scripts.compile import main; main(sys.argv[1:])"
    )
    run_ok(
        [
            sys.executable, "-c", script, str(pkg), str(compiled), "--mode", "aotinductor",
            "--device", "cpu", "--target", "sus2_ase",
        ]
    )  # fmt: skip
    aoti = SUS2Calculator.from_compiled_model(compiled, chemical_species_to_atom_type_map=True)
    eager = _saved_calculator(pkg)
    probe = [*frames[:10], squeezed]
    for g_aoti, g_eager in zip(_grades(aoti, probe), _grades(eager, probe), strict=True):
        np.testing.assert_allclose(g_aoti, g_eager, rtol=1e-4, atol=1e-4)
    assert _grades(aoti, [squeezed])[0].max() > 1.5
    a = frames[2].copy()
    a.calc = aoti
    e_aoti = a.get_potential_energy()
    a.calc = eager
    assert e_aoti == pytest.approx(a.get_potential_energy(), abs=1e-4)
