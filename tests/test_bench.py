"""``nequip-sus2 bench``: numbers checked against direct computation, plots checked for data.

* the published Alloy model (``.mtp`` + ``--type-names-file`` through the command line) on
  ``alloy_sample.cfg`` reproduces the published errors against DFT (docs/theory.md §5);
* three tiny in-memory models (SUS2, NequIP, Allegro) on EMT data through the Python API: every
  accuracy, EOS, MD, cost and SUS2 number is recomputed here independently;
* slow: real ``nequip-train`` checkpoints of the three architectures and a package in one
  command-line run, and AOT-compiled models (``--compile`` and a ``.nequip.pt2`` as a model).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _helpers import build, frame_data, predict
from conftest import require_reference

from nequip_sus2.bench import main
from nequip_sus2.bench.accuracy import binned_stats
from nequip_sus2.bench.models import ModelSpec

ALLOY_SPECIES = (
    "Li Be Na Mg Al Si K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge Sr Y Zr Nb Mo Ru Rh Pd Ag Cd "
    "In Sn La Ce Pr Nd Sm Gd Tb Dy Ho Er Tm Lu Hf Ta W Re Os Ir Pt Au Pb"
).split()
EMT_SPECIES = ["Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al"]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # subprocesses on a shared machine


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a shared 2-core machine two threads spin against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rmse(x) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


def mae(x) -> float:
    return float(np.mean(np.abs(x)))


def axes_have_data(fig) -> None:
    """Every (non-colour-bar) axes of ``fig`` draws finite data."""
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert axes
    for ax in axes:
        lines = [np.asarray(ln.get_xydata(), float) for ln in ax.get_lines()]
        points = [np.asarray(c.get_offsets(), float) for c in ax.collections]
        images = [np.asarray(im.get_array(), float) for im in ax.images]
        bars = [
            np.asarray(p.get_height() if hasattr(p, "get_height") else p.get_xy(), float)
            for p in ax.patches
        ]
        finite = [a for a in lines + points + images + bars if a.size and np.isfinite(a).any()]
        assert finite, f"empty axes {ax.get_title()!r} in {fig.get_suptitle()!r}"


def png_has_content(path: Path) -> None:
    from matplotlib.image import imread

    img = imread(path)
    assert img.ndim == 3 and min(img.shape[:2]) > 100, img.shape
    gray = img[..., :3].mean(-1)
    assert gray.std() > 0.05 and (gray < 0.5).mean() > 0.002, path


def report_images(out: Path) -> list[Path]:
    text = (out / "report.md").read_text()
    paths = [out / p for p in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)]
    assert paths and all(p.exists() for p in paths), paths
    return paths


# ----------------------------------------------------------------------------------------------
# units
# ----------------------------------------------------------------------------------------------


def test_binned_stats_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 3))
    x[7, 2] = np.nan  # rows with a NaN are left out
    bins = rng.integers(0, 5, 300)
    stats = binned_stats(x, bins, 6)
    assert stats[5] is None
    for k in range(5):
        sel = (bins == k) & ~np.isnan(x).any(1)
        assert stats[k]["rmse"] == pytest.approx(rmse(x[sel]), rel=1e-12)
        assert stats[k]["mae"] == pytest.approx(mae(x[sel]), rel=1e-12)
        assert stats[k]["max"] == np.abs(x[sel]).max()
        assert stats[k]["count"] == x[sel].size


def test_model_spec_parse(tmp_path):
    assert ModelSpec.parse("SUS2=run/best.ckpt") == ModelSpec("run/best.ckpt", "SUS2")
    assert ModelSpec.parse("run/best.ckpt") == ModelSpec("run/best.ckpt")
    odd = tmp_path / "a=b.ckpt"
    odd.write_text("")
    assert ModelSpec.parse(str(odd)) == ModelSpec(str(odd))


def test_cfg_groups_by_feature_key(tmp_path):
    """.cfg data: species from type_names, PlusStress as ASE stress, groups from a Feature key."""
    from nequip_sus2.bench.data import load_frames
    from nequip_sus2.io.cfg import CfgFrame, write_cfg

    rng = np.random.default_rng(0)
    frames = []
    for i in range(5):
        frames.append(
            CfgFrame(
                types=[0, 1, 1],
                positions=rng.uniform(0, 3, (3, 3)),
                cell=np.eye(3) * 4.0,
                energy=-1.0 - i,
                forces=rng.normal(size=(3, 3)),
                plus_stress=rng.normal(size=6),
                features=[("kind", "bulk" if i % 2 else "surface"), ("src", "x")],
            )
        )
    write_cfg(frames, tmp_path / "d.cfg")
    out, key = load_frames([tmp_path / "d.cfg"], type_names=["Cu", "Se"], group_key="kind")
    assert key == "kind" and [f.group for f in out] == ["surface", "bulk"] * 2 + ["surface"]
    assert out[0].atoms.get_chemical_symbols() == ["Cu", "Se", "Se"]
    np.testing.assert_allclose(out[3].stress, -frames[3].plus_stress / 64.0)
    assert out[2].energy == -3.0 and out[2].atoms.calc is None
    _, key = load_frames([tmp_path / "d.cfg"], type_names=["Cu", "Se"], max_frames=2)
    assert key is None  # no config_type/group/... key: one group
    with pytest.raises(ValueError, match="type names"):
        load_frames([tmp_path / "d.cfg"], type_names=["Cu"])


def test_cli_errors(tmp_path, capsys):
    mtp = require_reference("cu2se_p.mtp")
    cfg = require_reference("cu2se_p_golden.cfg")
    code = main([str(mtp), "--data", str(cfg), "--out", str(tmp_path / "o"), "--quick"])
    assert code == 2
    assert "--type-names" in capsys.readouterr().err
    code = main([str(mtp), "--type-names", "Cu", "--data", str(cfg), "--out", str(tmp_path)])
    assert code == 2
    assert "species_count = 2" in capsys.readouterr().err


def test_command_line_maps_onto_bench_options(tmp_path):
    """Without flags every field keeps its default; each flag sets its field."""
    from nequip_sus2.bench import BenchOptions, build_parser
    from nequip_sus2.bench.cli import options_from_args

    def plain(v):
        return list(v) if isinstance(v, tuple) else v

    argv = ["m.ckpt", "-o", "out"]
    got = options_from_args(build_parser().parse_args(argv), argv)
    want = BenchOptions(["m.ckpt"], out_dir="out", command="nequip-sus2 bench m.ckpt -o out")
    for f in fields(BenchOptions):
        assert plain(getattr(got, f.name)) == plain(getattr(want, f.name)), f.name
    species = tmp_path / "species.yaml"
    species.write_text("[Cu, Se]\n")
    argv = ["A=m.mtp", "--out", "o", "--type-names-file", str(species), "--quick", "--skip-sus2"]
    argv += ["--no-memory", "--no-progress", "--md-timestep", "2", "--pairs", "Cu-Se", "--threads"]
    argv += ["1", "--max-curves", "2", "--data", "a.xyz", "--data", "b.xyz"]
    got = options_from_args(build_parser().parse_args(argv), argv)
    assert (got.models, got.out_dir, got.type_names) == (["A=m.mtp"], "o", ["Cu", "Se"])
    parts = (got.accuracy, got.eos, got.md, got.cost, got.sus2, got.plots)
    assert parts == (True, False, False, False, False, True)
    assert (got.cost_memory, got.progress, got.threads) == (False, False, 1)
    assert got.md_timestep_fs == 2.0 and isinstance(got.md_timestep_fs, float)
    assert (got.sus2_pairs, got.sus2_max_curves, got.data) == (["Cu-Se"], 2, ["a.xyz", "b.xyz"])


# ----------------------------------------------------------------------------------------------
# the published Alloy model through the command line
# ----------------------------------------------------------------------------------------------


def test_alloy_published_errors_cli(tmp_path, capsys):
    mtp = require_reference("alloy.mtp")
    data = require_reference("alloy_sample.cfg")
    species = tmp_path / "species.yaml"
    species.write_text(yaml.safe_dump(ALLOY_SPECIES))
    out = tmp_path / "bench"
    argv = [f"Alloy={mtp}", "--type-names-file", str(species), "--data", str(data)]
    argv += ["--out", str(out), "--quick", "--max-curves", "3", "--no-progress", "--strict"]
    assert main(argv) == 0
    assert "E RMSE 27.39 meV/atom" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["errors"] == []
    (model,) = res["models"]
    assert (model["kind"], model["format"]) == ("SUS2", "mtp")
    assert model["num_parameters"]["total"] == 17657  # docs/theory.md §2.9
    acc = res["accuracy"]["Alloy"]["overall"]
    # docs/theory.md §5: 27.39 / 19.34 meV/atom, 0.1836 / 0.1228 eV/A, 0.0083 eV/A^3
    assert acc["energy_per_atom"]["rmse"] * 1000 == pytest.approx(27.39, abs=0.01)
    assert acc["energy_per_atom"]["mae"] * 1000 == pytest.approx(19.34, abs=0.01)
    assert acc["forces"]["rmse"] == pytest.approx(0.1836, abs=1e-4)
    assert acc["forces"]["mae"] == pytest.approx(0.1228, abs=1e-4)
    assert acc["stress"]["rmse"] == pytest.approx(0.0083, abs=1e-4)
    assert acc["energy_per_atom"]["count"] == 200 and acc["stress"]["count"] == 6 * 200

    # the saved predictions agree with an independent evaluation (tests/_helpers) ...
    from nequip_sus2.io.cfg import read_cfg
    from nequip_sus2.model import SUS2FromMTP

    frames = read_cfg(data)
    pred = np.load(out / "predictions" / "Alloy.npz")
    m = build(SUS2FromMTP, mtp_path=str(mtp), type_names=ALLOY_SPECIES)
    offsets = np.cumsum([0] + [len(f.types) for f in frames])
    for k in (0, 57, 199):
        f = frames[k]
        direct = predict(m, f.types, f.positions, f.cell)
        assert pred["energy_pred"][k] == pytest.approx(float(direct["energy"]), rel=1e-12)
        np.testing.assert_allclose(
            pred["forces_pred"][offsets[k] : offsets[k + 1]], direct["forces"], atol=1e-10
        )
        stress = -direct["virial"] / abs(np.linalg.det(f.cell))
        np.testing.assert_allclose(pred["stress_pred"][k], stress, atol=1e-12)
    # ... and the per-element statistics follow from them
    err = pred["forces_pred"] - pred["forces_ref"]
    for el in ("Mg", "W", "Pb"):
        sel = pred["symbols"] == el
        row = res["accuracy"]["Alloy"]["per_element"][el]
        assert row["forces"]["rmse"] == pytest.approx(rmse(err[sel]), rel=1e-10)
        assert row["atoms"] == int(sel.sum())

    # SUS2 interpretability numbers are the model's parameters (b = shifts - scales)
    sus2 = res["sus2"]["Alloy"]
    ss = m.model.func.per_type_energy_scale_shift
    k = ALLOY_SPECIES.index("W")
    assert sus2["per_species"]["W"]["s"] == pytest.approx(float(ss.scales[k]))
    assert sus2["per_species"]["W"]["b"] == pytest.approx(float(ss.shifts[k] - ss.scales[k]))
    np.testing.assert_allclose(sus2["alpha"], m.model.func.scaling.alpha.detach().numpy())
    for png in report_images(out):
        png_has_content(png)
    names = {p.name for p in (out / "figures").iterdir()}
    assert {"parity_forces.png", "hist_energy_per_atom.png", "sus2_Alloy_radial.png"} <= names
    assert {"sus2_Alloy_maps.png", "sus2_Alloy_scale_shift.png"} <= names


# ----------------------------------------------------------------------------------------------
# three architectures side by side (tiny in-memory models, EMT data)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models():
    pytest.importorskip("allegro")
    from allegro.model import AllegroModel
    from nequip.model import NequIPGNNModel

    from nequip_sus2.model import SUS2Model

    common = dict(seed=0, model_dtype="float64", type_names=EMT_SPECIES, r_max=4.0)
    common["avg_num_neighbors"] = 20.0
    return {
        "SUS2": build(
            SUS2Model, **common, max_rank=2, radial_channels=2, radial_basis_size=6,
            per_type_energy_scales={s: 0.5 + 0.1 * i for i, s in enumerate(EMT_SPECIES)},
            per_type_energy_shifts={s: -1.0 - 0.2 * i for i, s in enumerate(EMT_SPECIES)},
        ),
        "NequIP": build(
            NequIPGNNModel, **common, l_max=1, num_layers=1, num_features=8,
            radial_mlp_depth=1, radial_mlp_width=8,
        ),
        "Allegro": build(
            AllegroModel, **common, l_max=1, num_layers=1, num_scalar_features=8,
            num_tensor_features=4, radial_chemical_embed_dim=8,
            radial_chemical_embed={"_target_": "allegro.nn.TwoBodyBesselScalarEmbed",
                                   "num_bessels": 6},
        ),
    }  # fmt: skip


@pytest.fixture(scope="module")
def emt_files(tmp_path_factory):
    import ase.io
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from nequip_sus2.data.emt import generate_emt_dataset

    d = tmp_path_factory.mktemp("emt")
    ase.io.write(d / "emt.xyz", generate_emt_dataset(10, seed=4))
    curve = []
    for s in np.linspace(0.96, 1.04, 7):
        a = bulk("Cu", "fcc", a=3.6 * s, cubic=True)
        a.calc = EMT()
        a.get_potential_energy()
        curve.append(a)
    ase.io.write(d / "cu_ev.xyz", curve)
    return d / "emt.xyz", d / "cu_ev.xyz"


def _direct_errors(model, frames):
    """Energy-per-atom, force and stress errors by evaluating each frame on its own."""
    names = list(model.type_names)
    de, df, ds, sym, grp = [], [], [], [], []
    for a in frames:
        types = [names.index(s) for s in a.get_chemical_symbols()]
        out = predict(model, types, a.positions, np.asarray(a.cell))
        de.append((out["energy"] - a.get_potential_energy()) / len(a))
        df.append(out["forces"] - a.get_forces())
        ds.append(-out["virial"] / a.get_volume() - a.get_stress(voigt=True))
        sym += a.get_chemical_symbols()
        grp.append(a.info["config_type"])
    return np.array(de), np.concatenate(df), np.array(ds), np.array(sym), np.array(grp)


def test_three_architectures_python_api(tmp_path, tiny_models, emt_files):
    import ase.io
    from ase.build import bulk
    from ase.eos import EquationOfState
    from ase.units import GPa

    from nequip_sus2.bench import BenchOptions, run_bench

    data, curve = emt_files
    out = tmp_path / "bench"
    result = run_bench(BenchOptions(
        tiny_models, [data], out,
        eos_structures=[curve], eos_auto=("data", "fcc"), eos_elements=["Ag"], eos_points=7,
        md_steps=8, md_min_atoms=16, sizes=(16, 40), cost_min_time=0.02,
        sus2_pairs=["Cu-Cu", "Cu-Au", "Au-Cu"], sus2_max_curves=2,
        keep_figures=True, progress=False, strict=True,
    ))  # fmt: skip
    res = result.results
    assert res["errors"] == []
    assert [m["kind"] for m in res["models"]] == ["SUS2", "NequIP", "Allegro"]
    frames = ase.io.read(data, index=":")

    # accuracy: overall, per element, per configuration group
    assert res["data"]["group_key"] == "config_type"
    for name, model in tiny_models.items():
        de, df, ds, sym, grp = _direct_errors(model, frames)
        acc = res["accuracy"][name]
        for key, e in (("energy_per_atom", de), ("forces", df), ("stress", ds)):
            got = acc["overall"][key]
            assert got["rmse"] == pytest.approx(rmse(e), rel=1e-9, abs=1e-12)
            assert got["mae"] == pytest.approx(mae(e), rel=1e-9, abs=1e-12)
            assert got["max"] == pytest.approx(np.abs(e).max(), rel=1e-9, abs=1e-12)
            assert got["count"] == e.size
        for el in set(sym):
            got = acc["per_element"][el]["forces"]["rmse"]
            assert got == pytest.approx(rmse(df[sym == el]), rel=1e-9)
        for g in set(grp):
            got = acc["per_group"][g]["energy_per_atom"]["rmse"]
            assert got == pytest.approx(rmse(de[grp == g]), rel=1e-9)
        assert res["cost"][name]["num_parameters"]["total"] == sum(
            p.numel() for p in model.parameters()
        )

    # EOS: the reference curve, and one model point recomputed directly
    ref_frames = ase.io.read(curve, index=":")
    v = [a.get_volume() / len(a) for a in ref_frames]
    e = [a.get_potential_energy() / len(a) for a in ref_frames]
    v0, _, b = EquationOfState(v, e, eos="birchmurnaghan").fit()
    for name in tiny_models:
        rows = {r["structure"]: r for r in res["eos"][name]}
        assert set(rows) == {"cu_ev.xyz:Cu4", "fcc-Ag"} | {k for k in rows if k.startswith("data:")}
        ref = rows["cu_ev.xyz:Cu4"]["reference"]["fit"]
        assert ref["v0"] == pytest.approx(v0, rel=1e-8)
        assert ref["B_GPa"] == pytest.approx(b / GPa, rel=1e-8)
        fcc = rows["fcc-Ag"]
        k = len(fcc["volumes"]) // 2
        atoms = bulk("Ag", "fcc", a=(4 * fcc["volumes"][k]) ** (1 / 3), cubic=True)
        types = [tiny_models[name].type_names.index("Ag")] * 4
        direct = predict(tiny_models[name], types, atoms.positions, np.asarray(atoms.cell))
        assert fcc["energies"][k] == pytest.approx(float(direct["energy"]) / 4, rel=1e-9)

    # MD and cost
    for name in tiny_models:
        md = res["md"][name]
        assert md["n_atoms"] >= 16 and md["steps_completed"] == md["steps_requested"] == 8
        assert md["stable"] and len(md["trace"]["time_ps"]) == 9
        t = np.array(md["trace"]["time_ps"])
        etot = np.array(md["trace"]["total_energy_per_atom"])
        assert md["energy_drift_eV_per_atom_per_ps"] == pytest.approx(
            np.polyfit(t, etot, 1)[0], rel=1e-6, abs=1e-12
        )
        rows = res["cost"][name]["eager"]
        assert [r["target_atoms"] for r in rows] == [16, 40]
        for r in rows:
            assert r["atom_steps_per_s"] == pytest.approx(r["n_atoms"] / r["ms_per_step"] * 1e3)

    # SUS2: per-species s and b, and f_mu(r) against the model's own edge embedding (a dimer)
    sus2 = tiny_models["SUS2"]
    summ = res["sus2"]["SUS2"]
    assert summ["pairs"] == ["Cu-Cu", "Cu-Au", "Au-Cu"]
    for i, s in enumerate(EMT_SPECIES):
        assert summ["per_species"][s]["s"] == pytest.approx(0.5 + 0.1 * i)
        assert summ["per_species"][s]["b"] == pytest.approx(-1.0 - 0.2 * i - (0.5 + 0.1 * i))
    from nequip_sus2.bench.interpret import radial_curves, sus2_parameters

    params = sus2_parameters(sus2, EMT_SPECIES)
    curves = radial_curves(params, [("Cu", "Au")], n_r=7)
    r = curves["r"]
    types = [EMT_SPECIES.index("Cu"), EMT_SPECIES.index("Au")]
    for k in (0, 3, 6):
        d = frame_data(types, [[0, 0, 0], [0, 0, r[k]]], None, 4.0)
        emb = sus2(d)["edge_embedding"].detach().numpy()
        edge = int(np.flatnonzero(d["edge_index"][0].numpy() == 0)[0])  # centre Cu
        f = [curves["pairs"][0]["mu"][mu]["f"][k] for mu in range(emb.shape[1])]
        np.testing.assert_allclose(emb[edge], f, rtol=1e-10, atol=1e-14)

    # figures: returned objects draw data, PNGs are not blank, the report links them all
    expected = {"parity_energy_per_atom", "parity_forces", "parity_stress", "hist_forces",
                "per_element_forces", "eos", "md", "cost", "sus2_SUS2/radial",
                "sus2_SUS2/scale_shift", "sus2_SUS2/maps"}  # fmt: skip
    assert expected <= set(result.figures)
    for fig in result.figures.values():
        axes_have_data(fig)
    for png in report_images(out):
        png_has_content(png)
    text = (out / "report.md").read_text()
    assert "|  | SUS2 | NequIP | Allegro |" in text  # one side-by-side table
    saved = json.loads((out / "results.json").read_text())
    assert saved["accuracy"]["NequIP"]["overall"] == res["accuracy"]["NequIP"]["overall"]


# ----------------------------------------------------------------------------------------------
# slow: real nequip-train checkpoints, a package, AOT-compiled models
# ----------------------------------------------------------------------------------------------


def _nequip_train(config: dict, run_dir: Path, cfg_dir: Path, name: str) -> Path:
    cfg_dir.mkdir(parents=True, exist_ok=True)
    (cfg_dir / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [
        sys.executable, "-m", "nequip.scripts.train", "-cp", str(cfg_dir), "-cn", f"{name}.yaml",
        f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir / "last.ckpt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch of SUS2 (configs/tutorial.yaml), NequIP and Allegro (the same config with the
    model block replaced) on 20 EMT structures."""
    pytest.importorskip("allegro")
    from nequip_sus2.data.emt import write_emt_dataset

    d = tmp_path_factory.mktemp("trained")
    data = write_emt_dataset(d / "emt.xyz", n_structures=20, seed=5)
    base = yaml.safe_load((CONFIGS / "tutorial.yaml").read_text())
    base.update(data_file=str(data), max_epochs=1, run=["train"])
    base["trainer"]["enable_progress_bar"] = False
    shared = {
        "seed": "${seed}", "model_dtype": "float32", "type_names": "${model_type_names}",
        "r_max": "${cutoff_radius}", "avg_num_neighbors": "${training_data_stats:num_neighbors_mean}",
        "per_type_energy_shifts": "${training_data_stats:per_atom_energy_mean}",
    }  # fmt: skip
    models = {
        "SUS2": base["training_module"]["model"],
        "NequIP": {"_target_": "nequip.model.NequIPGNNModel", **shared, "l_max": 1,
                   "num_layers": 2, "num_features": 8, "radial_mlp_width": 16},
        "Allegro": {"_target_": "allegro.model.AllegroModel", **shared, "l_max": 1,
                    "num_layers": 1, "num_scalar_features": 16, "num_tensor_features": 4,
                    "radial_chemical_embed": {"_target_": "allegro.nn.TwoBodyBesselScalarEmbed",
                                              "num_bessels": 8},
                    "radial_chemical_embed_dim": 16},
    }  # fmt: skip
    ckpts = {}
    for name, model in models.items():
        cfg = json.loads(json.dumps(base))
        cfg["training_module"]["model"] = model
        ckpts[name] = _nequip_train(cfg, d / f"run_{name}", d / "configs", name)
    return d, data, ckpts


@pytest.mark.slow
def test_trained_checkpoints_and_package_cli(trained):
    from nequip.integrations.ase import NequIPCalculator

    d, data, ckpts = trained
    pkg = d / "allegro.nequip.zip"
    proc = subprocess.run(
        [sys.executable, "-m", "nequip.scripts.package", "build", str(ckpts["Allegro"]), str(pkg)],
        capture_output=True, text=True, timeout=600, env=ONE_THREAD,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = d / "bench"
    cmd = [
        sys.executable, "-m", "nequip_sus2.bench", f"SUS2={ckpts['SUS2']}",
        f"NequIP={ckpts['NequIP']}", f"Allegro={pkg}", "--data", str(data), "--out", str(out),
        "--eos-auto", "data", "fcc", "--eos-elements", "Cu", "--eos-points", "7", "--md-steps", "10",
        "--sizes", "16", "64", "--cost-min-time", "0.1", "--threads", "1", "--no-progress",
        "--strict",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["errors"] == []
    assert [(m["kind"], m["format"]) for m in res["models"]] == [
        ("SUS2", "checkpoint"), ("NequIP", "checkpoint"), ("Allegro", "package"),
    ]  # fmt: skip
    import ase.io

    frames = ase.io.read(data, index=":")
    for name, path in (("SUS2", ckpts["SUS2"]), ("NequIP", ckpts["NequIP"]), ("Allegro", pkg)):
        calc = NequIPCalculator._from_saved_model(str(path), chemical_species_to_atom_type_map=True)
        de, df = [], []
        for a in frames:
            ref_e, ref_f = a.get_potential_energy(), a.get_forces()
            b = a.copy()
            b.calc = calc
            de.append((b.get_potential_energy() - ref_e) / len(a))
            df.append(b.get_forces() - ref_f)
        acc = res["accuracy"][name]["overall"]
        assert acc["energy_per_atom"]["rmse"] == pytest.approx(rmse(de), rel=1e-4)
        assert acc["forces"]["rmse"] == pytest.approx(rmse(np.concatenate(df)), rel=1e-4)
        assert res["md"][name]["steps_completed"] >= 1
        assert [r["target_atoms"] for r in res["cost"][name]["eager"]] == [16, 64]
        assert {r["structure"].split(":")[0] for r in res["eos"][name]} >= {"data", "fcc-Cu"}
    assert "SUS2" in res["sus2"] and len(res["sus2"]) == 1
    for png in report_images(out):
        png_has_content(png)


@pytest.mark.slow
def test_compiled_models(trained, tmp_path):
    """``--compile`` (nequip-compile, AOTI, ASE target) and a ``.nequip.pt2`` given as a model."""
    from nequip_sus2.bench import BenchOptions, run_bench

    _, data, ckpts = trained
    out = tmp_path / "bench"
    res = run_bench(BenchOptions(
        {"SUS2": ckpts["SUS2"]}, [data], out, eos=False, md=False, sizes=(16, 64),
        cost_min_time=0.1, compile=True, progress=False, strict=True,
    )).results  # fmt: skip
    cost = res["cost"]["SUS2"]
    assert [r["target_atoms"] for r in cost["compiled"]] == [16, 64]
    assert cost["compile_seconds"] > 0
    # SUS2 on CPU is compiled with its fused kernels, checked here against the eager model
    assert cost["compile_modifiers"] == "enable_fused_moments"
    check = cost["compiled_vs_eager"]
    assert check["max_abs_energy_per_atom"] < 1e-5 and check["max_abs_force"] < 1e-4
    pt2 = cost["compiled_path"]
    res2 = run_bench(BenchOptions(
        {"eager": ckpts["SUS2"], "compiled": pt2}, [data], tmp_path / "bench2", eos=False,
        md=False, cost=False, progress=False, strict=True,
    )).results  # fmt: skip
    assert res2["models"][1]["format"] == "compiled"
    a, b = (res2["accuracy"][k]["overall"] for k in ("eager", "compiled"))
    assert b["forces"]["rmse"] == pytest.approx(a["forces"]["rmse"], rel=1e-4)
    assert b["energy_per_atom"]["rmse"] == pytest.approx(a["energy_per_atom"]["rmse"], rel=1e-4)
    assert list(res2["sus2"]) == ["eager"]  # a compiled model has no parameters to show
