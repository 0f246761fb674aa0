"""`nequip-sus2 learn` (nequip_sus2.learn): labelling, candidate selection, MD thresholds, the
loop end to end with resume, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from _helpers import build
from ase import Atoms
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

from nequip_sus2.active_set import add_extrapolation_grade, build_active_set
from nequip_sus2.cli import main as cli_main
from nequip_sus2.learn import (
    LearnError,
    LearnSettings,
    label_structures,
    load_labeller,
    run_md,
    select_candidates,
)
from nequip_sus2.model import SUS2Model

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "active_learning"
NAMES = ["Cu", "Au"]


def _cells(n: int, seed: int, rattle: float = 0.05, a: float = 3.85) -> list[Atoms]:
    """8-atom fcc Cu-Au cells with random occupancy, rattled."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat((1, 1, 2))
        atoms.set_chemical_symbols([NAMES[int(x)] for x in rng.integers(0, 2, len(atoms))])
        atoms.rattle(rattle, seed=int(seed * 1000 + k))
        out.append(atoms)
    return out


def _emt_labelled(structures: list[Atoms]) -> list[Atoms]:
    out = []
    for atoms in structures:
        a = atoms.copy()
        a.calc = EMT()
        e, f, s = a.get_potential_energy(), a.get_forces(), a.get_stress()
        a.calc = SinglePointCalculator(a, energy=e, forces=f, stress=s)
        out.append(a)
    return out


# ----------------------------------------------------------------------------------------------
# labelling
# ----------------------------------------------------------------------------------------------


def test_labels_are_the_calculators():
    periodic = _cells(3, seed=1)
    cluster = Atoms("Cu2Au", positions=[[0, 0, 0], [2.5, 0, 0], [0, 2.6, 0.3]])
    structures = [*periodic, cluster]
    structures[0].info["tag"] = "kept"
    labelled = label_structures(structures, load_labeller("ase.calculators.emt:EMT"))
    assert len(labelled) == 4
    for original, got in zip(structures, labelled, strict=True):
        ref = original.copy()
        ref.calc = EMT()
        assert got.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-12)
        np.testing.assert_allclose(got.get_forces(), ref.get_forces(), atol=1e-12)
        np.testing.assert_array_equal(got.positions, original.positions)
    np.testing.assert_allclose(
        labelled[0].get_stress(), _emt_labelled([periodic[0]])[0].get_stress()
    )
    assert "stress" not in labelled[3].calc.results  # not periodic: no stress
    assert labelled[0].info["tag"] == "kept"
    assert structures[0].calc is None  # the inputs are not modified


def test_labeller_accepts_callables_and_calculators():
    assert isinstance(load_labeller(EMT)(), EMT)
    calc = EMT()
    assert load_labeller(calc)() is calc


@pytest.mark.parametrize(
    "spec, message",
    [
        ("EMT", "expected MODULE:FACTORY"),
        ("no_such_module_xyz:EMT", "cannot import module 'no_such_module_xyz'"),
        ("ase.calculators.emt:NoSuchThing", "has no attribute 'NoSuchThing'"),
        ("ase.calculators.emt:__name__", "is not callable"),
        ("numpy:zeros", "failed to make a calculator"),
        ("builtins:dict", "returned dict, not an ASE calculator"),
    ],
)
def test_bad_labeller_spec(spec, message):
    with pytest.raises(LearnError, match="argument --labeller: ") as info:
        load_labeller(spec)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------
# selection and MD thresholds
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graded_model():
    """A small float64 SUS2 model with the active set of 24 rattled Cu-Au cells."""
    model = build(
        SUS2Model, seed=0, model_dtype="float64", type_names=NAMES, r_max=4.5,
        max_rank=2, radial_channels=2, radial_basis_size=6,
    )  # fmt: skip
    train = _cells(24, seed=0)
    add_extrapolation_grade(model, build_active_set(model, train))
    return model, train


def test_candidates_inside_the_training_domain_are_not_selected(graded_model):
    model, train = graded_model
    squeezed = []
    for i, scale in enumerate((0.80, 0.85, 0.9)):
        a = train[i].copy()
        a.set_cell(a.cell * scale, scale_atoms=True)
        squeezed.append(a)
    candidates = [train[3], squeezed[0], train[5], squeezed[1], squeezed[2]]
    chosen, gamma = select_candidates(model, candidates)
    # training structures have grade <= 1 + tol and never extend the active set
    assert gamma[[0, 2]].max() <= 1 + 1e-3 + 1e-9
    assert gamma[[1, 3, 4]].min() > 1.5
    assert set(chosen) <= {1, 3, 4} and chosen
    # the cap keeps the candidates of largest grade
    capped, _ = select_candidates(model, candidates, max_select=1)
    assert capped == [int(np.argmax(gamma))]
    assert select_candidates(model, []) == ([], pytest.approx(np.zeros(0)))


class _GradeSchedule(Calculator):
    """Zero energy and forces; the largest grade of the n-th evaluation is ``grades[n]``."""

    implemented_properties = ["energy", "forces", "max_extrapolation_grade"]

    def __init__(self, grades):
        super().__init__()
        self.grades = list(grades)
        self.calls = 0

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.results = {
            "energy": 0.0,
            "forces": np.zeros((len(self.atoms), 3)),
            "max_extrapolation_grade": float(self.grades[min(self.calls, len(self.grades) - 1)]),
        }
        self.calls += 1


def _md_settings(**kw) -> LearnSettings:
    values = dict(train_data="x", config="x", labeller="x", output="x", md_steps=6)
    return LearnSettings(**{**values, **kw})


def test_md_saves_above_select_and_stops_above_break(tmp_path):
    start = _cells(1, seed=3)[0]
    # steps 0..6: two above select (3.0, 2.5), then one above break (12.0) ends the run
    calc = _GradeSchedule([1.0, 3.0, 1.5, 2.5, 12.0, 1.0, 1.0])
    path = tmp_path / "candidates.xyz"
    md = run_md(calc, [start], _md_settings(select=2.0, break_threshold=10.0), path, (0, 1))
    assert md["max_grade"] == 12.0
    assert md["md_stopped"] == 1 and md["md_steps"] == 4
    saved = read(path, index=":")
    assert [a.info["max_extrapolation_grade"] for a in saved] == [3.0, 2.5, 12.0]
    assert md["candidates"] == 3
    # below select everywhere: nothing saved, the run completes
    calc = _GradeSchedule([1.2] * 10)
    quiet = tmp_path / "none.xyz"
    md = run_md(calc, [start, start], _md_settings(select=2.0), quiet, (0, 2))
    assert md == {
        "md_runs": 2, "md_steps": 12, "md_stopped": 0, "max_grade": 1.2,
        "max_grade_per_run": [1.2, 1.2], "candidates": 0,
    }  # fmt: skip
    assert not quiet.exists()


# ----------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit status 2, nothing trained or written
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def inputs(tmp_path):
    data = tmp_path / "train.xyz"
    write(data, _emt_labelled(_cells(4, seed=0)))
    return data, EXAMPLE / "config.yaml"


def _learn(argv, capsys) -> tuple[int, str, str]:
    code = cli_main(["learn", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line(err: str, *parts: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("nequip-sus2 learn: error: "), err
    for part in parts:
        assert part in lines[0], err


def test_help_ends_with_an_example(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["learn", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: nequip-sus2 learn")
    tail = " ".join(out.split("Example: ")[-1].split())
    assert tail.startswith("nequip-sus2 learn train.xyz") and tail.endswith("-o learn_output")
    for option in ("--select", "--break", "--labeller", "--settings", "--finetune-config"):
        assert option in out


@pytest.mark.parametrize(
    "extra, parts",
    [
        (
            ["--labeller", "nosuchmod_abc:Calc"],
            ["--labeller", "cannot import module 'nosuchmod_abc'"],
        ),
        (["--labeller", "ase.calculators.emt"], ["--labeller", "expected MODULE:FACTORY"]),
        (["--select", "10", "--break", "5"], ["--select", "must be below the break threshold"]),
        (["--select", "3", "--break", "3"], ["--select", "must be below the break threshold"]),
        (["--select", "-1"], ["--select", "must be a positive number"]),
        (["--md-steps", "0"], ["--md-steps", "must be positive"]),
        (["--data-key", "no_such_key"], ["no key 'no_such_key' in the config"]),
        (["--train-overrides", "no_such_key_q=1"], ["cannot compose the config"]),
    ],
)
def test_bad_arguments(inputs, tmp_path, capsys, extra, parts):
    data, config = inputs
    out = tmp_path / "out"
    argv = [data, "--config", config, "--labeller", "ase.calculators.emt:EMT", "-o", out, *extra]
    code, _, err = _learn(argv, capsys)
    assert code == 2
    _assert_one_line(err, *parts)
    assert not out.exists()


def test_missing_files_and_arguments(inputs, tmp_path, capsys):
    data, config = inputs
    out = tmp_path / "out"
    emt = ["--labeller", "ase.calculators.emt:EMT"]
    code, _, err = _learn([data, "--config", tmp_path / "none.yaml", *emt, "-o", out], capsys)
    assert code == 2
    _assert_one_line(err, "none.yaml: no such file (--config)")
    code, _, err = _learn([tmp_path / "none.xyz", "--config", config, *emt, "-o", out], capsys)
    assert code == 2
    _assert_one_line(err, "none.xyz: no such file (TRAIN_DATA)")
    code, _, err = _learn([data, *emt, "-o", out], capsys)
    assert code == 2
    _assert_one_line(err, "the following arguments are required: --config")
    bad = tmp_path / "bad.yaml"
    bad.write_text("select: 2\nnot_an_option: 1\n")
    code, _, err = _learn([data, "--settings", bad, "-o", out], capsys)
    assert code == 2
    _assert_one_line(err, "bad.yaml: unknown option 'not_an_option'")
    code, _, err = _learn(
        [data, "--config", config, *emt, "-o", out, "--test-data", data.with_suffix(".nope")],
        capsys,
    )
    assert code == 2
    _assert_one_line(err, "no such file (--test-data)")
    assert not out.exists()


def test_corrupt_state_is_one_line_error(inputs, tmp_path, capsys):
    data, config = inputs
    out = tmp_path / "out"
    out.mkdir()
    state = out / "learn_state.json"
    argv = [data, "--config", config, "--labeller", "ase.calculators.emt:EMT", "-o", out]
    missing_file = {
        "version": 1, "train_data": str(data), "initial_data": "gone.xyz", "iterations": [],
    }  # fmt: skip
    for text in ("{not json", '{"version": 1}', "[1, 2]", json.dumps(missing_file)):
        state.write_text(text)
        code, _, err = _learn(argv, capsys)
        assert code == 2
        _assert_one_line(err, "learn_state.json: not a valid loop state", "delete it")
        assert state.read_text() == text  # left as it was
    assert sorted(p.name for p in out.iterdir()) == ["learn_state.json"]


def test_settings_file_paths_are_relative_to_it(inputs, tmp_path, capsys):
    """The example's settings file with a state from another training set: the paths in the
    settings resolve against the file's folder (the config is found) and the loop refuses to mix
    training sets."""
    data, _ = inputs
    out = tmp_path / "out"
    out.mkdir()
    write(out / "train_data_001.xyz", read(data, index=":"))
    other = {
        "version": 1, "train_data": "/elsewhere/train.xyz",
        "initial_data": "train_data_001.xyz", "iterations": [],
    }  # fmt: skip
    (out / "learn_state.json").write_text(json.dumps(other))
    code, _, err = _learn([data, "--settings", EXAMPLE / "settings.yaml", "-o", out], capsys)
    assert code == 2
    _assert_one_line(err, "holds a loop started from /elsewhere/train.xyz", "another output folder")


# ----------------------------------------------------------------------------------------------
# the loop end to end (nequip-train runs: ~1 min on one core)
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_loop_end_to_end_and_resume(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = tmp_path / "train.xyz"
    write(data, _emt_labelled(_cells(16, seed=0, rattle=0.03)))
    start = tmp_path / "start.xyz"
    write(start, _cells(1, seed=7, rattle=0.0))
    out = tmp_path / "out"
    common = [
        data, "--settings", EXAMPLE / "settings.yaml", "--md-start", start,
        "--md-steps", "15", "--md-temperature", "2500", "--max-select", "3", "--select", "2",
        "--train-overrides", "max_epochs=2",
        "--test-data", data, "-o", out,
    ]  # fmt: skip
    code, stdout, err = _learn([*common, "--max-iterations", "1"], capsys)
    assert code == 0, err
    state = json.loads((out / "learn_state.json").read_text())
    assert state["status"] == "max_iterations"
    (it1,) = state["iterations"]
    assert it1["iteration"] == 1 and it1["train_structures"] == 16
    # hot MD from a perfect lattice leaves the 300 K-like training domain
    assert it1["max_grade"] > 2.0 and it1["candidates"] > 0
    candidates = read(out / "iter_001" / "candidates.xyz", index=":")
    grades = [a.info["max_extrapolation_grade"] for a in candidates]
    assert min(grades) > 2.0 and max(grades) == pytest.approx(it1["max_grade"])
    # the selected structures carry EMT's labels and were appended to the training set
    selected = read(out / "iter_001" / "selected.xyz", index=":")
    assert 1 <= len(selected) == it1["selected"] <= 3
    for a in selected:
        ref = a.copy()
        ref.calc = EMT()
        assert a.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-9)
        np.testing.assert_allclose(a.get_forces(), ref.get_forces(), atol=1e-9)
    grown = read(out / it1["next_train_data"], index=":")
    assert len(grown) == 16 + len(selected)
    np.testing.assert_allclose(grown[-1].positions, selected[-1].positions)
    # training-set error of the model (the test set here is the training set)
    assert 0 <= it1["test_energy_mae"] < 1.0 and it1["test_max_grade"] <= 1 + 2e-3
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 1 | 16 |" in (out / "summary.md").read_text()
    assert "not converged after 1 iteration" in stdout

    # resume: iteration 1 is kept, a leftover of an interrupted iteration 2 is redone, and
    # iteration 2 fine-tunes iteration 1's checkpoint on the grown training set
    ckpt1 = out / it1["checkpoint"]
    mtime = os.stat(ckpt1).st_mtime_ns
    (out / "iter_002").mkdir()
    (out / "iter_002" / "leftover").write_text("x")
    finetune = ["--finetune-config", EXAMPLE / "finetune.yaml"]
    code, stdout, err = _learn([*common, *finetune, "--max-iterations", "2"], capsys)
    assert code == 0, err
    assert "resuming after iteration 1" in stdout
    state = json.loads((out / "learn_state.json").read_text())
    assert [it["iteration"] for it in state["iterations"]] == [1, 2]
    assert state["iterations"][0] == it1
    it2 = state["iterations"][1]
    assert it2["train_structures"] == len(grown)
    assert it2["config"].endswith("finetune.yaml")
    assert os.stat(ckpt1).st_mtime_ns == mtime
    assert not (out / "iter_002" / "leftover").exists()
    assert "| 2 | " in (out / "summary.md").read_text()

    # a third run with the same limit does nothing
    code, stdout, err = _learn([*common, "--max-iterations", "2"], capsys)
    assert code == 0, err
    assert "nothing to do" in stdout
    assert json.loads((out / "learn_state.json").read_text())["iterations"] == state["iterations"]


def test_failed_training_is_one_line_and_resumable(inputs, tmp_path, capsys, monkeypatch):
    """nequip-train fails (a learning rate that is not a number): exit status 1, one line naming
    the log; the state holds no finished iteration, so the next run starts iteration 1 again."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data, config = inputs
    out = tmp_path / "out"
    argv = [
        data, "--config", config, "--labeller", "ase.calculators.emt:EMT", "-o", out,
        "--train-overrides", "training_module.optimizer.lr=not_a_number",
    ]  # fmt: skip
    code, _, err = _learn(argv, capsys)
    assert code == 1
    _assert_one_line(err, "nequip-train failed (exit 1)", "full log: ")
    log = Path(err.rsplit("full log: ", 1)[1].rstrip(")\n"))
    assert log == out / "iter_001" / "train.log" and log.is_file()
    state = json.loads((out / "learn_state.json").read_text())
    assert state["iterations"] == [] and state["status"] == "running"


def test_cfg_training_set_is_converted(tmp_path):
    """A .cfg training set (type indices) becomes the loop's extxyz set with the given species;
    without --type-names it is refused in one line."""
    from nequip_sus2.io.convert import extxyz_to_cfg
    from nequip_sus2.learn import _initial_data

    structures = _emt_labelled(_cells(3, seed=5))
    write(tmp_path / "train.xyz", structures)
    extxyz_to_cfg(tmp_path / "train.xyz", tmp_path / "train.cfg", NAMES)
    settings = _md_settings(train_data=str(tmp_path / "train.cfg"), type_names=NAMES)
    out = tmp_path / "out"
    out.mkdir()
    got = read(_initial_data(settings, out), index=":")
    assert [a.get_chemical_symbols() for a in got] == [a.get_chemical_symbols() for a in structures]
    for a, b in zip(got, structures, strict=True):
        # .cfg keeps about 7 significant digits
        assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), abs=1e-5)
        np.testing.assert_allclose(a.get_forces(), b.get_forces(), atol=1e-6)
    with pytest.raises(LearnError, match="a .cfg training set needs --type-names"):
        _md_settings(train_data=str(tmp_path / "train.cfg"), config=str(EXAMPLE / "config.yaml"),
                     output=str(out)).check()  # fmt: skip
