"""``nequip-sus2 calc-errors`` and ``calc-grade``: error statistics against labels whose errors
are known exactly (the model's own predictions, computed here through the ASE calculator, minus
known offsets), ``.cfg`` and extxyz data, type names from the model, the grade against the ASE
calculator's, and one-line errors for bad input."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
from _helpers import build
from ase import Atoms
from ase.io import read, write
from nequip.integrations.utils import basic_transforms
from test_extrapolation import NAMES, R_MAX, TOL, _training_structures

from nequip_sus2.active_set import add_extrapolation_grade, build_active_set
from nequip_sus2.ase import SUS2Calculator
from nequip_sus2.ase.evaluate import calc_errors
from nequip_sus2.cli import main
from nequip_sus2.io.cfg import CfgFrame, read_cfg, write_cfg
from nequip_sus2.io.convert import cfg_to_extxyz
from nequip_sus2.io.mtp_model import export_mtp
from nequip_sus2.model import SUS2Model
from nequip_sus2.package import write_package

#: eV/A^3 in GPa (CODATA 2014, the constants ASE uses)
EV_A3_IN_GPA = 160.21766208
VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _calculator(model) -> SUS2Calculator:
    return SUS2Calculator(
        model=model.eval(),
        device="cpu",
        transforms=basic_transforms(model.metadata, R_MAX, NAMES, {n: n for n in NAMES}),
    )


def _structures() -> list[Atoms]:
    """Five periodic Cu/Ag cells and a Cu3Ag cluster (no cell)."""
    cluster = Atoms(
        "Cu3Ag",
        positions=[[0, 0, 0], [2.5, 0.1, 0], [0.2, 2.6, 0.1], [1.3, 1.2, 2.1]],
        pbc=False,
    )
    return [*_training_structures(n=5, seed=3), cluster]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The same float64 model as a package, as a .mtp file, and with an extrapolation grade."""
    tmp = tmp_path_factory.mktemp("models")
    model = build(
        SUS2Model, seed=0, model_dtype="float64", type_names=NAMES, r_max=R_MAX,
        max_rank=2, radial_channels=2, radial_basis_size=6,
    )  # fmt: skip
    model.eval()
    pkg, mtp = tmp / "plain.nequip.zip", tmp / "plain.mtp"
    write_package(model, pkg, compile_variants=False)
    export_mtp(model, mtp)
    graded = copy.deepcopy(model)
    add_extrapolation_grade(graded, build_active_set(graded, _training_structures(), tol=TOL))
    graded.eval()
    graded_pkg = tmp / "graded.nequip.zip"
    write_package(graded, graded_pkg, compile_variants=False)
    return {"model": model, "pkg": pkg, "mtp": mtp, "graded": graded, "graded_pkg": graded_pkg}


@pytest.fixture(scope="module")
def labelled(models, tmp_path_factory):
    """The structures with labels = prediction - offset (as .cfg and as extxyz) and the
    expected error statistics, computed here from the offsets."""
    tmp = tmp_path_factory.mktemp("data")
    calc = _calculator(models["model"])
    rng = np.random.default_rng(7)
    frames = []
    d = {k: [] for k in ("energy", "energy_per_atom", "forces", "virial", "stress")}
    ref = {k: [] for k in ("forces", "virial", "stress")}
    for k, atoms in enumerate(_structures()):
        probe = atoms.copy()
        probe.calc = calc
        energy, forces = probe.get_potential_energy(), probe.get_forces()
        periodic = bool(atoms.pbc.all())
        dE, dF = rng.normal(0, 0.1), rng.normal(0, 0.05, forces.shape)
        e_label, f_label = energy - dE, forces - dF
        w_label = None
        d["energy"].append(dE)
        d["energy_per_atom"].append(dE / len(atoms))
        d["forces"].append(dF.ravel())
        ref["forces"].append(f_label.ravel())
        if periodic and k != 1:  # frame 1: no PlusStress
            volume = atoms.get_volume()
            virial = -probe.get_stress(voigt=True) * volume
            dW = rng.normal(0, 0.5, 6)
            w_label = virial - dW
            d["virial"].append(dW)
            ref["virial"].append(w_label)
            d["stress"].append(dW / volume * EV_A3_IN_GPA)
            ref["stress"].append(w_label / volume * EV_A3_IN_GPA)
        types = [NAMES.index(s) for s in atoms.get_chemical_symbols()]
        frames.append(
            CfgFrame(
                types=types,
                positions=atoms.positions,
                cell=atoms.cell.array if periodic else None,
                energy=e_label,
                forces=f_label,
                plus_stress=w_label,
                features=[("index", str(k))],
            )
        )
    cfg, xyz = tmp / "data.cfg", tmp / "data.xyz"
    write_cfg(frames, cfg)
    # the same labels as extxyz with every digit (ase.io.write rounds positions to 1e-8 A),
    # the virial only as the ASE stress -W/V (the converter writes both)
    cfg_to_extxyz(cfg, xyz, NAMES)
    text = re.sub(r' virial="[^"]*"', "", xyz.read_text())
    assert text.count(" stress=") == 4 and "virial" not in text
    xyz.write_text(text)

    def stats(diffs, refs=None):
        x = np.concatenate([np.ravel(v) for v in diffs])
        out = {
            "rmse": np.sqrt(np.mean(x**2)),
            "mae": np.mean(np.abs(x)),
            "max": np.max(np.abs(x)),
            "count": x.size,
        }
        if refs is not None:
            r = np.concatenate(refs)
            out["rel_rms"] = out["rmse"] / np.sqrt(np.mean(r**2))
            out["rel_max"] = out["max"] / np.max(np.abs(r))
        return out

    expected = {
        "configurations": len(frames),
        "atoms": sum(f.n_atoms for f in frames),
        "energy": stats(d["energy"]),
        "energy_per_atom": stats(d["energy_per_atom"]),
        "forces": stats(d["forces"], ref["forces"]),
        "virial": stats(d["virial"], ref["virial"]),
        "stress": stats(d["stress"], ref["stress"]),
    }
    return cfg, xyz, expected


def _assert_errors(got: dict, expected: dict, rel: float = 1e-7) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, dict):
            assert got[key].keys() == value.keys(), key
            for stat, v in value.items():
                assert got[key][stat] == pytest.approx(v, rel=rel, abs=1e-12), (key, stat)
        else:
            assert got[key] == value, key


# ----------------------------------------------------------------------------------------------
# calc-errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sub", ["calc-errors", "calc-grade"])
def test_help(sub, capsys):
    with pytest.raises(SystemExit) as info:
        main([sub, "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"Example: nequip-sus2 {sub} " in out and "--no-progress" in out and "--json" in out


def test_errors_of_known_offsets_cfg_and_extxyz(models, labelled, capsys):
    cfg, xyz, expected = labelled
    assert expected["virial"]["count"] == 6 * 4  # four periodic frames with PlusStress
    results = {}
    for data in (cfg, xyz):  # type names from the package
        code, out, err = run(capsys, "calc-errors", models["pkg"], data, "--json", "--no-progress")
        assert code == 0, err
        results[data.suffix] = json.loads(out)  # stdout is only JSON
        _assert_errors(results[data.suffix], expected)
    # the two formats give the same numbers (the extxyz stress is -W/V: round-off only)
    _assert_errors(results[".xyz"], results[".cfg"], rel=1e-10)


def test_mtp_with_type_names_and_text_report(models, labelled, capsys):
    cfg, _, expected = labelled
    code, out, err = run(
        capsys, "calc-errors", models["mtp"], cfg, "--type-names", *NAMES, "--json"
    )
    assert code == 0, err
    _assert_errors(json.loads(out), expected)
    # the text report: one aligned row per quantity, values as in the JSON
    code, out, err = run(capsys, "calc-errors", models["pkg"], cfg, "--type-names", *NAMES)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"{cfg}: 6 configurations, {expected['atoms']} atoms"
    assert lines[1].split() == ["unit", "count", "max", "MAE", "RMSE", "RMS(d)/RMS", "max(d)/max"]
    rows = {line.split()[0]: line.split() for line in lines[2:7]}
    assert {k: v[1] for k, v in rows.items()} == {
        "energy": "eV",
        "energy_per_atom": "eV/atom",
        "forces": "eV/A",
        "virial": "eV",
        "stress": "GPa",
    }
    assert len({len(line) for line in lines[1:7]}) == 1  # aligned columns
    for key, row in rows.items():
        e = expected[key]
        assert int(row[2]) == e["count"]
        assert [float(x) for x in row[3:6]] == pytest.approx(
            [e["max"], e["mae"], e["rmse"]], rel=1e-4
        )
        if "rel_rms" in e:
            assert [float(x) for x in row[6:8]] == pytest.approx(
                [e["rel_rms"], e["rel_max"]], rel=1e-3
            )
        else:
            assert row[6:8] == ["-", "-"]


def test_predictions_are_the_model_outputs(models, labelled, tmp_path, capsys):
    cfg, xyz, _ = labelled
    calc = _calculator(models["model"])
    for data, suffix in ((cfg, ".cfg"), (xyz, ".extxyz")):
        pred = tmp_path / f"pred{suffix}"
        code, _, err = run(capsys, "calc-errors", models["pkg"], data, "--predictions", pred)
        assert code == 0, err
        frames = read_cfg(pred) if suffix == ".cfg" else read(pred, index=":")
        for atoms, got in zip(_structures(), frames, strict=True):
            probe = atoms.copy()
            probe.calc = calc
            energy = got.energy if suffix == ".cfg" else got.get_potential_energy()
            forces = got.forces if suffix == ".cfg" else got.get_forces()
            assert energy == pytest.approx(probe.get_potential_energy(), rel=1e-10)
            atol = 1e-10 if suffix == ".cfg" else 6e-9  # ase.io.write: 8 decimals per column
            np.testing.assert_allclose(forces, probe.get_forces(), rtol=1e-8, atol=atol)
        if suffix == ".cfg":  # the .cfg frames keep their Feature lines
            assert [f.features for f in frames] == [[("index", str(k))] for k in range(6)]


class _CompiledStandIn(torch.nn.Module):
    """What nequip's loader gives for a .nequip.pt2: the model behind a wrapper that returns
    the compile target's output fields (``output_keys``)."""

    def __init__(self, model, output_keys):
        super().__init__()
        self.inner, self.output_keys = model, list(output_keys)

    def forward(self, data):
        out = self.inner(data)
        return {k: out[k] for k in self.output_keys if k in out}


@pytest.mark.parametrize("target", ["ase", "sus2_ase"])
def test_compiled_model_type_names_and_grade(
    target, models, labelled, tmp_path, monkeypatch, capsys
):
    """A compiled model (stand-in: no AOT compilation here) carries its type names in its
    metadata, which the loader hands to the calculator's species mapper."""
    from nequip.data import AtomicDataDict

    from nequip_sus2._keys import EXTRAPOLATION_GRADE_KEY
    from nequip_sus2.ase import SUS2Calculator as LoadedCalculator

    cfg, _, expected = labelled
    keys = [AtomicDataDict.TOTAL_ENERGY_KEY, AtomicDataDict.FORCE_KEY, AtomicDataDict.STRESS_KEY]
    keys += [EXTRAPOLATION_GRADE_KEY] if target == "sus2_ase" else []
    calls = []

    def from_compiled_model(path, **kwargs):
        calls.append((path, kwargs))
        calc = _calculator(models["graded"])
        calc.model = _CompiledStandIn(models["graded"], keys)
        return calc

    monkeypatch.setattr(LoadedCalculator, "from_compiled_model", from_compiled_model)
    pt2 = tmp_path / "model.nequip.pt2"
    pt2.write_bytes(b"")
    code, out, err = run(capsys, "calc-errors", pt2, cfg, "--json")
    assert code == 0, err
    _assert_errors(json.loads(out), expected)
    assert calls[0] == (str(pt2), {"device": "cpu", "chemical_species_to_atom_type_map": True})
    err = _one_line_error(capsys, "calc-errors", pt2, cfg, "--type-names", "Ag", "Cu")
    assert f"differ from those {pt2} carries (Cu Ag)" in err
    code, out, err = run(capsys, "calc-grade", pt2, cfg, "--json")
    if target == "ase":
        assert code == 2 and "has no extrapolation grade" in err
    else:
        assert code == 0, err
        assert len(json.loads(out)["max_grade"]) == expected["configurations"]


def test_progress_bar_on_stderr(models, labelled, capsys):
    cfg, _, expected = labelled
    got = calc_errors(models["pkg"], cfg, progress=True)
    err = capsys.readouterr().err
    assert "calc-errors" in err and f"{expected['configurations']}/6" in err.replace(" ", "")
    _assert_errors(got, expected)


# ----------------------------------------------------------------------------------------------
# bad input: exit 2, one line on stderr, no traceback, no output file
# ----------------------------------------------------------------------------------------------


def _one_line_error(capsys, sub: str, *argv) -> str:
    code, out, err = run(capsys, sub, *argv)
    assert code == 2, (out, err)
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"nequip-sus2 {sub}: error: "), err
    assert "Traceback" not in err
    return err


def test_bad_input(models, labelled, tmp_path, capsys):
    cfg, xyz, _ = labelled
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    pred = out_dir / "pred.cfg"
    species = tmp_path / "species.txt"
    species.write_text("Cu Ag\n")
    err = _one_line_error(capsys, "calc-errors", species, cfg)
    assert f"{species}: MODEL is not a model file" in err and ".nequip.zip" in err
    err = _one_line_error(capsys, "calc-errors", models["mtp"], cfg, "--predictions", pred)
    assert "a .mtp file stores no species" in err and "--type-names" in err
    err = _one_line_error(capsys, "calc-errors", models["pkg"], cfg, "--type-names", "Ag", "Cu")
    assert "(Ag Cu) differ" in err and "(Cu Ag)" in err
    err = _one_line_error(capsys, "calc-errors", models["mtp"], cfg, "--type-names", "Cu", "Agg")
    assert "type name 1 ('Agg') is not a chemical symbol" in err
    # a species the model lacks: extxyz (by symbol) and .cfg (by type index)
    images = read(xyz, index=":")
    images[2].symbols[3] = "Au"
    bad_xyz = tmp_path / "bad.xyz"
    write(bad_xyz, images, format="extxyz")
    err = _one_line_error(capsys, "calc-errors", models["pkg"], bad_xyz, "--predictions", pred)
    line = 1 + sum(len(a) + 2 for a in images[:2])
    assert f"{bad_xyz}:{line}: frame 2 has species Au" in err and "(its species: Cu Ag)" in err
    frames = read_cfg(cfg)
    frames[3].types[0] = 2
    bad_cfg = tmp_path / "bad.cfg"
    write_cfg(frames, bad_cfg)
    err = _one_line_error(capsys, "calc-errors", models["pkg"], bad_cfg, "--predictions", pred)
    assert f"{bad_cfg}:" in err and "type value 2 is out of range" in err and "Cu Ag" in err
    err = _one_line_error(capsys, "calc-errors", models["pkg"], species)
    assert "DATA must be a .cfg or an extended XYZ" in err
    assert list(out_dir.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# calc-grade
# ----------------------------------------------------------------------------------------------


def _grade_structures() -> list[Atoms]:
    """Training-like cells (grade <= 1 + tol), squeezed and stretched ones (grade > 1)."""
    base = _training_structures()
    out = [base[0], base[1], base[5]]
    for k, scale in ((0, 0.85), (2, 0.93), (3, 1.2)):
        a = base[k].copy()
        a.set_cell(a.cell * scale, scale_atoms=True)
        out.append(a)
    return out


def test_calc_grade_matches_the_ase_calculator(models, tmp_path, capsys):
    xyz = tmp_path / "frames.xyz"
    write(xyz, _grade_structures(), format="extxyz")
    structures = read(xyz, index=":")  # as written (ase.io.write rounds positions to 1e-8 A)
    calc = _calculator(models["graded"])
    reference = []
    for atoms in structures:
        probe = atoms.copy()
        probe.calc = calc
        reference.append(calc.get_extrapolation_grade(probe))
    top = np.array([g.max() for g in reference])
    assert top.min() <= 1 + TOL + 1e-8 and (top > 2).sum() >= 1  # both regimes present
    frames = [
        CfgFrame(
            types=[NAMES.index(s) for s in a.get_chemical_symbols()],
            positions=a.positions,
            cell=a.cell.array,
            features=[("MV_grade", "0.5"), ("origin", "md")],  # a stale grade is replaced
        )
        for a in structures
    ]
    cfg = tmp_path / "frames.cfg"
    write_cfg(frames, cfg)

    code, out, err = run(capsys, "calc-grade", models["graded_pkg"], cfg, "--json")
    assert code == 0, err
    got = json.loads(out)
    assert got["configurations"] == len(structures)
    assert got["atoms"] == sum(len(a) for a in structures)
    np.testing.assert_allclose(got["max_grade"], top, rtol=1e-9)
    s = got["summary"]
    assert s["count"] == len(top)
    assert [s["min"], s["median"], s["max"]] == pytest.approx(
        [top.min(), np.median(top), top.max()], rel=1e-9
    )
    assert [s["above_1"], s["above_2"], s["above_10"]] == [int((top > t).sum()) for t in (1, 2, 10)]

    # .cfg -> .cfg: a Feature MV_grade line per configuration, everything else kept
    out_cfg = tmp_path / "graded.cfg"
    code, out, err = run(capsys, "calc-grade", models["graded_pkg"], cfg, "-o", out_cfg)
    assert code == 0, err
    assert f"wrote {len(structures)} configurations" in out
    assert "max grade per configuration: min" in out
    back = read_cfg(out_cfg)
    assert out_cfg.read_text().count(" Feature MV_grade ") == len(structures)
    for frame, got_frame, g in zip(frames, back, top, strict=True):
        assert got_frame.features[0] == ("origin", "md")
        assert got_frame.features[1][0] == "MV_grade"
        assert float(got_frame.features[1][1]) == pytest.approx(g, rel=1e-9)
        np.testing.assert_array_equal(got_frame.positions, frame.positions)

    # extxyz -> extxyz (info and per-atom array), type names given and equal to the model's
    out_xyz = tmp_path / "graded.extxyz"
    code, out, err = run(
        capsys, "calc-grade", models["graded_pkg"], xyz, "-o", out_xyz, "--type-names", *NAMES
    )
    assert code == 0, err
    for atoms, g in zip(read(out_xyz, index=":"), reference, strict=True):
        assert atoms.info["MV_grade"] == pytest.approx(g.max(), rel=1e-9)
        np.testing.assert_allclose(atoms.arrays["MV_grade"], g, rtol=0, atol=6e-9)  # 8 decimals

    # without -o: one line per structure, then the summary
    code, out, err = run(capsys, "calc-grade", models["graded_pkg"], xyz)
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()[1 : 1 + len(top)]]
    assert [int(r[0]) for r in rows] == list(range(len(top)))
    np.testing.assert_allclose([float(r[1]) for r in rows], top, rtol=1e-5)


def test_calc_grade_needs_a_model_with_a_grade(models, labelled, tmp_path, capsys):
    cfg, _, _ = labelled
    out = tmp_path / "out.cfg"
    err = _one_line_error(capsys, "calc-grade", models["pkg"], cfg, "-o", out)
    assert "has no extrapolation grade" in err and "nequip-sus2 active-set" in err
    err = _one_line_error(capsys, "calc-grade", models["mtp"], cfg, "--type-names", *NAMES)
    assert "carries no extrapolation grade" in err and "nequip-sus2 active-set" in err
    err = _one_line_error(capsys, "calc-grade", models["graded_pkg"], cfg, "-o", tmp_path / "x.txt")
    assert "must be a .cfg or an extended XYZ" in err
    assert list(tmp_path.iterdir()) == []
