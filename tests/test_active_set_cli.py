"""`nequip-sus2 active-set` and `select-add`: files mixing periodic and non-periodic structures
(results independent of the batch size), one-line errors with exit status 2 and no output
file, the `--out` alias, progress bars and quiet packaging."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from _helpers import assert_one_line_error, build
from ase import Atoms
from ase.build import bulk
from ase.io import read, write

from nequip_sus2.active_set import (
    build_active_set,
    compute_scalar_basis,
    select_add,
    structures_to_data,
)
from nequip_sus2.cli import active_set_main as main
from nequip_sus2.cli import select_add_main
from nequip_sus2.io.cfg import CfgFrame, read_cfg, write_cfg
from nequip_sus2.model import SUS2Model
from nequip_sus2.package import _NameLookupNoise, load_model, write_package
from nequip_sus2.package import quiet_packaging as _quiet_packaging

NAMES = ["Cu", "Ag"]
R_MAX = 4.5


def _small_model(seed: int = 0):
    return build(
        SUS2Model, seed=seed, model_dtype="float64", type_names=NAMES, r_max=R_MAX,
        max_rank=2, radial_channels=2, radial_basis_size=6,
    )  # fmt: skip


def _mixed_structures(n: int = 16, seed: int = 0) -> list[Atoms]:
    """Rattled fcc Cu/Ag cells (periodic) interleaved with free Cu/Ag clusters (every third)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        if k % 3 == 1:
            symbols = [NAMES[int(x)] for x in rng.integers(0, 2, 6)]
            grid = np.array([[i, j, m] for i in range(2) for j in range(2) for m in range(2)])
            pos = 2.6 * grid[:6] + rng.normal(0, 0.1, (6, 3))
            atoms = Atoms(symbols, positions=pos)
        else:
            atoms = bulk("Cu", "fcc", a=rng.uniform(3.6, 4.0), cubic=True).repeat((2, 1, 1))
            atoms.set_chemical_symbols([NAMES[int(x)] for x in rng.integers(0, 2, len(atoms))])
            atoms.rattle(0.08, seed=k)
        out.append(atoms)
    return out


def _as_cfg(structures: list[Atoms]) -> list[CfgFrame]:
    return [
        CfgFrame(
            types=[NAMES.index(s) for s in a.get_chemical_symbols()],
            positions=a.positions,
            cell=a.cell.array if a.pbc.any() else None,
        )
        for a in structures
    ]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("active_set_cli")
    package = write_package(_small_model(), tmp / "model.nequip.zip", compile_variants=False)
    train = _mixed_structures()
    write(tmp / "train.xyz", train)
    write_cfg(_as_cfg(train), tmp / "train.cfg")
    # candidates: training-like structures and squeezed/stretched ones (extrapolating)
    candidates = _mixed_structures(9, seed=5)
    for k in (0, 4):
        candidates[k].set_cell(candidates[k].cell * (0.88 if k else 1.15), scale_atoms=True)
    candidates[1].positions *= 0.85
    write(tmp / "candidates.xyz", candidates)
    write_cfg(_as_cfg(candidates), tmp / "candidates.cfg")
    graded = tmp / "graded.nequip.zip"
    assert main([str(package), str(tmp / "train.cfg"), "-o", str(graded), "--no-progress"]) == 0
    return {"dir": tmp, "package": package, "graded": graded}


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------------------------
# mixed periodic / non-periodic files: the batch size does not change the results
# ----------------------------------------------------------------------------------------------


def test_mixed_file_active_set_and_grades_do_not_depend_on_the_batch_size(files):
    frames = read_cfg(files["dir"] / "train.cfg")
    assert {f.cell is None for f in frames} == {True, False}  # really mixed
    model = load_model(files["package"])
    sets = {bs: build_active_set(model, files["dir"] / "train.cfg", batch_size=bs) for bs in (1, 4)}
    assert sets[1].active == sets[4].active
    assert sets[1].counts == sets[4].counts and sets[1].ranks == sets[4].ranks
    # the same sums in another order: round-off of the basis (values up to ~1e4 here) is
    # amplified by the inverse of the near-singular active-set matrices
    inv1 = sets[1].inverse
    np.testing.assert_allclose(sets[4].inverse, inv1, rtol=1e-5, atol=1e-9 * np.abs(inv1).max())
    # per-atom basis (and so grades) of a mixed candidate file, .cfg and extxyz alike
    for name in ("candidates.cfg", "candidates.xyz"):
        structures = read_cfg(files["dir"] / name) if name.endswith("cfg") else None
        if structures is None:
            structures = read(files["dir"] / name, index=":")
        data = structures_to_data(structures, NAMES, R_MAX)
        (B1, t1, f1, a1), (B4, t4, f4, a4) = (
            compute_scalar_basis(model, data, batch_size=bs) for bs in (1, 4)
        )
        np.testing.assert_array_equal(t1, t4)
        np.testing.assert_array_equal(f1, f4)
        np.testing.assert_array_equal(a1, a4)
        np.testing.assert_allclose(B4, B1, rtol=1e-9, atol=1e-12 * np.abs(B1).max())
        g1, g4 = sets[1].grade(B1, t1), sets[4].grade(B4, t4)
        np.testing.assert_allclose(g4, g1, rtol=1e-10)
        assert g1.max() > 1.5  # some candidates extrapolate: the comparison is not trivial


def test_mixed_file_select_add_does_not_depend_on_the_batch_size(files):
    graded = load_model(files["graded"])
    candidates = read_cfg(files["dir"] / "candidates.cfg")
    (c1, g1), (c4, g4) = (select_add(graded, candidates, batch_size=bs) for bs in (1, 4))
    assert c1 == c4 and len(c1) > 0
    np.testing.assert_allclose(g4, g1, rtol=1e-10)
    # the command line: identical selections written for batch sizes 1 and 4
    out = {}
    for bs in (1, 4):
        path = files["dir"] / f"selected_{bs}.cfg"
        argv = [str(files["graded"]), str(files["dir"] / "candidates.cfg"), "-o", str(path)]
        assert select_add_main([*argv, "--batch-size", str(bs), "--no-progress"]) == 0
        out[bs] = path.read_text()
    assert out[1] == out[4]
    assert len(read_cfg(files["dir"] / "selected_1.cfg")) == len(c1)


def test_active_set_cli_batch_sizes_write_the_same_active_set(files, tmp_path):
    import torch

    saved = {}
    for bs in (1, 4):
        out, pt = tmp_path / f"g{bs}.nequip.zip", tmp_path / f"as{bs}.pt"
        argv = [str(files["package"]), str(files["dir"] / "train.xyz"), "-o", str(out)]
        argv += ["--batch-size", str(bs), "--save-active-set", str(pt), "--no-progress"]
        assert main(argv) == 0
        saved[bs] = torch.load(pt, weights_only=True)
    assert saved[1]["info"]["active"] == saved[4]["info"]["active"]
    inv1 = saved[1]["inverse"]
    torch.testing.assert_close(
        saved[4]["inverse"], inv1, rtol=1e-5, atol=1e-9 * float(inv1.abs().max())
    )


# ----------------------------------------------------------------------------------------------
# user mistakes: one line on stderr, exit status 2, no output file
# ----------------------------------------------------------------------------------------------


def _run(func, argv, capsys) -> tuple[int, str]:
    try:
        rc = func([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    return rc, capsys.readouterr().err


def _assert_one_line_error(rc: int, err: str, prog: str, expected: str) -> None:
    lines = [line for line in err.splitlines() if "][INFO]" not in line]  # nequip's log lines
    assert_one_line_error(rc, "\n".join(lines), prog, expected)


@pytest.fixture(scope="module")
def bad_inputs(files):
    d = files["dir"]
    (d / "not_a_model.ckpt").write_text("not a checkpoint\n")
    from nequip.model import NequIPGNNModel

    other = build(
        NequIPGNNModel, seed=0, model_dtype="float64", type_names=NAMES, r_max=4.0,
        num_layers=1, l_max=1, num_features=4, radial_mlp_depth=1, radial_mlp_width=8,
        avg_num_neighbors=10.0, per_type_energy_shifts={"Cu": 0.0, "Ag": 0.0},
        per_type_energy_scales={"Cu": 1.0, "Ag": 1.0},
    )  # fmt: skip
    write_package(other, d / "nequip_gnn.nequip.zip", compile_variants=False)
    fe = bulk("Cu", "fcc", a=3.6, cubic=True)
    fe.symbols[2] = "Fe"
    write(d / "with_fe.xyz", [bulk("Ag", "fcc", a=4.1, cubic=True), fe])
    three = _as_cfg(_mixed_structures(3))
    three[2].types[1] = 2  # a third type, the model has two
    write_cfg(three, d / "type_2.cfg")
    return d


def _active_set_cases(d: Path, pkg: Path):
    data, out = d / "train.xyz", d / "out.nequip.zip"
    return {
        "missing model": ([d / "nope.ckpt", data, "-o", out], "nope.ckpt: no such file"),
        "missing data": ([pkg, d / "nope.xyz", "-o", out], "nope.xyz: no such file"),
        "not a model": ([d / "not_a_model.ckpt", data, "-o", d / "o.ckpt"], "cannot load"),
        "not SUS2": ([d / "nequip_gnn.nequip.zip", data, "-o", out], "not a SUS2 model"),
        "unknown species": ([pkg, d / "with_fe.xyz", "-o", out], "structure 1: species Fe"),
        "cfg type": ([pkg, d / "type_2.cfg", "-o", out], "type value 2 is out of range"),
        "map no =": ([pkg, data, "-o", out, "--species-map", "Cu"], "expected SYMBOL=TYPE"),
        "map symbol": ([pkg, data, "-o", out, "--species-map", "Qq=Cu"], "not a chemical"),
        "map type": ([pkg, data, "-o", out, "--species-map", "Cu=Au"], "not a type of the model"),
        "no out dir": ([pkg, data, "-o", d / "nodir" / "x.nequip.zip"], "does not exist"),
        "out suffix": ([pkg, data, "-o", d / "out.zip"], "must be a .ckpt or a .nequip.zip"),
        "pkg to ckpt": ([pkg, data, "-o", d / "o.ckpt"], "only be written back as a package"),
        "tol 0": ([pkg, data, "-o", out, "--tol", "0"], "argument --tol: must be positive"),
        "tol < 0": ([pkg, data, "-o", out, "--tol", "-0.001"], "argument --tol: must be positive"),
        "batch 0": ([pkg, data, "-o", out, "--batch-size", "0"], "--batch-size: must be positive"),
        "batch text": ([pkg, data, "-o", out, "--batch-size", "x"], "--batch-size: expected"),
        "no -o": ([pkg, data], "required: -o/--output"),
        "save dir": (
            [pkg, data, "-o", out, "--save-active-set", d / "no" / "a.pt"],
            "no/a.pt: the",
        ),
    }


@pytest.mark.parametrize("case", list(_active_set_cases(Path("."), Path("."))))
def test_active_set_user_mistakes(files, bad_inputs, case, capsys):
    argv, expected = _active_set_cases(bad_inputs, files["package"])[case]
    before = sorted(p.name for p in bad_inputs.iterdir())
    rc, err = _run(main, argv, capsys)
    _assert_one_line_error(rc, err, "active-set", expected)
    assert sorted(p.name for p in bad_inputs.iterdir()) == before  # no (partial) output


def _select_add_cases(d: Path, graded: Path, plain: Path):
    cand, out = d / "candidates.xyz", d / "sel.xyz"
    return {
        "no grade": ([plain, cand, "-o", out], "has no extrapolation grade"),
        "missing model": ([d / "nope.nequip.zip", cand, "-o", out], "no such file"),
        "missing candidates": ([graded, d / "nope.xyz", "-o", out], "nope.xyz: no such file"),
        "format": ([graded, d / "candidates.cfg", "-o", out], "use a .cfg output"),
        "no out dir": ([graded, cand, "-o", d / "nodir" / "s.xyz"], "does not exist"),
        "unknown species": ([graded, d / "with_fe.xyz", "-o", out], "species Fe not known"),
        "tol": ([graded, cand, "-o", out, "--tol", "-1"], "argument --tol: must be positive"),
        "batch": ([graded, cand, "-o", out, "--batch-size", "0"], "must be positive"),
        "map": ([graded, cand, "-o", out, "--species-map", "Cu:Cu"], "expected SYMBOL=TYPE"),
    }


@pytest.mark.parametrize("case", list(_select_add_cases(Path("."), Path("."), Path("."))))
def test_select_add_user_mistakes(files, bad_inputs, case, capsys):
    argv, expected = _select_add_cases(bad_inputs, files["graded"], files["package"])[case]
    before = sorted(p.name for p in bad_inputs.iterdir())
    rc, err = _run(select_add_main, argv, capsys)
    _assert_one_line_error(rc, err, "select-add", expected)
    assert sorted(p.name for p in bad_inputs.iterdir()) == before


def test_failed_write_leaves_no_partial_file(files, tmp_path, monkeypatch, capsys):
    import torch

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "g.nequip.zip"))

    monkeypatch.setattr(torch.package.PackageExporter, "save_text", broken)
    out = tmp_path / "g.nequip.zip"
    argv = [files["package"], files["dir"] / "train.xyz", "-o", out, "--no-progress"]
    rc, err = _run(main, argv, capsys)
    _assert_one_line_error(rc, err, "active-set", "No space left on device")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# --help, --out alias, progress bar, packaging noise
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("func", [main, select_add_main])
def test_help_has_an_example_and_hides_the_old_spelling(func, capsys):
    with pytest.raises(SystemExit) as e:
        func(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "-o OUT, --output OUT" in text and "--no-progress" in text
    assert "--out " not in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("Example: nequip-sus2 ")


def test_out_alias_and_no_packaging_warnings(files, tmp_path):
    """A real process (torch's log handlers write to the process's stderr)."""
    out = tmp_path / "graded.nequip.zip"
    script = (
        "import sys; from nequip_sus2.cli import active_set_main as main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    argv = [str(files["package"]), str(files["dir"] / "train.cfg"), "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stdout
    for noise in ("torch/package", "get_name", "sys_importer", "TypedStorage", "Warning"):
        assert noise not in proc.stderr, proc.stderr
    # the alias wrote the same model as -o: the same grades
    a, b = load_model(out), load_model(files["graded"])
    cands = read_cfg(files["dir"] / "candidates.cfg")
    np.testing.assert_allclose(select_add(a, cands)[1], select_add(b, cands)[1], rtol=1e-12)
    # select-add's --out alias
    sel = tmp_path / "sel.xyz"
    assert select_add_main([str(out), str(files["dir"] / "candidates.xyz"), "--out", str(sel)]) == 0
    assert len(read(sel, index=":")) == len(select_add(a, cands)[0])


def test_quiet_packaging_drops_only_the_importer_misses():
    logger = logging.getLogger("torch.package.importer")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    try:
        with _quiet_packaging(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logger.warning("Tried to call get_name with obj <class 'x'>, and name None on imp")
            logger.warning("something else went wrong")
            warnings.warn("a real warning", UserWarning, stacklevel=1)
        logger.warning("Tried to call get_name with obj <class 'y'> outside")
    finally:
        logger.removeHandler(handler)
    assert seen == [
        "something else went wrong",
        "Tried to call get_name with obj <class 'y'> outside",
    ]
    assert [str(w.message) for w in caught] == ["a real warning"]
    assert not any(isinstance(f, _NameLookupNoise) for f in logger.filters)


@pytest.mark.parametrize("no_progress", [False, True])
def test_progress_bar_on_a_terminal_unless_disabled(
    files, tmp_path, capsys, monkeypatch, no_progress
):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    sel = tmp_path / "sel.xyz"
    argv = [str(files["graded"]), str(files["dir"] / "candidates.xyz"), "-o", str(sel)]
    assert select_add_main(argv + (["--no-progress"] if no_progress else [])) == 0
    err = capsys.readouterr().err
    assert ("scalar basis" in err) is not no_progress
    assert ("neighbour lists" in err) is not no_progress
