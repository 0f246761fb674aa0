"""The ``nequip-sus2`` command line: help, import/export round trips, conversion, errors, and the
end-to-end paths of the issue (import -> nequip-compile -> ASE calculator parity with the golden
predictions; fine-tuning a published model with ``nequip-train``)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import GOLDEN, SHARED, SPECIES, require_reference

from nequip_sus2.cli import main
from nequip_sus2.io.cfg import read_cfg, write_cfg

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALLOY_TRAIN = SHARED / "benchmarks" / "alloy" / "alloy_train.cfg"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------------------------
# help
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sub", [None, "import-mtp", "export-mtp", "convert", "calc-errors"])
def test_help(sub, capsys):
    with pytest.raises(SystemExit) as info:
        main(([sub] if sub else []) + ["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: nequip-sus2{' ' + sub if sub else ''}")
    if sub:
        assert "Example: nequip-sus2 " + sub in " ".join(out.split())


def test_console_script_is_installed():
    exe = shutil.which("nequip-sus2")
    if exe is None:
        pytest.skip("the nequip-sus2 console script is not on PATH (pip install -e .)")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "import-mtp" in proc.stdout
    proc = subprocess.run([exe], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage: nequip-sus2" in proc.stderr


# ----------------------------------------------------------------------------------------------
# round trips
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cu2se_p", "cathod", "alloy"])
def test_import_then_export_is_byte_exact(name, tmp_path, capsys):
    src = require_reference(f"{name}.mtp")
    pkg, back = tmp_path / f"{name}.nequip.zip", tmp_path / "back.mtp"
    code, out, err = run(capsys, "import-mtp", src, "--type-names", *SPECIES[name], "-o", pkg)
    assert code == 0, err
    assert f"wrote {pkg}" in out and "nequip-compile" in out
    code, out, err = run(capsys, "export-mtp", pkg, "-o", back)
    assert code == 0, err
    assert out.strip().endswith("species order of its type indices: " + " ".join(SPECIES[name]))
    assert back.read_bytes() == src.read_bytes().rstrip(b"\n")


def test_import_with_species_file_and_float32(tmp_path, capsys):
    src = require_reference("cu2se_p.mtp")
    (tmp_path / "species.yaml").write_text("type_names: [Cu, Se]\n")
    pkg = tmp_path / "m.nequip.zip"
    code, _, err = run(
        capsys, "import-mtp", src, "--type-names-file", tmp_path / "species.yaml", "-o", pkg,
        "--model-dtype", "float32",
    )  # fmt: skip
    assert code == 0, err
    from nequip.model import ModelFromPackage

    model = ModelFromPackage(str(pkg))["sole_model"]
    assert model.metadata["model_dtype"] == "float32"
    assert model.model.func.readout.theta.dtype == torch.float32


def test_convert_both_ways_exact(tmp_path, capsys):
    src = require_reference("alloy_sample.cfg")
    code, out, err = run(
        capsys, "convert", src, tmp_path / "a.extxyz", "--type-names", *SPECIES["alloy"]
    )
    assert code == 0, err
    assert "wrote 200 configurations" in out
    code, _, err = run(
        capsys, "convert", tmp_path / "a.extxyz", tmp_path / "b.cfg", "--type-names",
        *SPECIES["alloy"],
    )  # fmt: skip
    assert code == 0, err
    a, b = read_cfg(src), read_cfg(tmp_path / "b.cfg")
    assert len(a) == len(b) == 200 and all(x == y for x, y in zip(a, b, strict=True))


def test_calc_errors_reproduces_golden(tmp_path, capsys):
    model = require_reference("cu2se_p.mtp")
    golden = require_reference(GOLDEN["cu2se_p"])
    pred = tmp_path / "pred.cfg"
    code, out, err = run(
        capsys, "calc-errors", model, golden, "--type-names", "Cu", "Se", "--json",
        "--predictions", pred,
    )  # fmt: skip
    assert code == 0, err
    errors = json.loads(out)
    assert errors["configurations"] == 8
    assert errors["energy_per_atom"]["max"] < 1e-8
    assert errors["forces"]["max"] < 1e-7
    assert errors["stress"]["count"] == 6 * 6  # the six periodic frames
    for p, g in zip(read_cfg(pred), read_cfg(golden), strict=True):
        np.testing.assert_allclose(p.energy, g.energy, rtol=1e-8)
        np.testing.assert_allclose(p.forces, g.forces, rtol=0, atol=1e-7)
        if g.cell is not None:  # PlusStress = -V * ASE stress, the .cfg sign
            np.testing.assert_allclose(p.plus_stress, g.plus_stress, rtol=0, atol=1e-7)
    code, out, _ = run(capsys, "calc-errors", model, golden, "--type-names", "Cu", "Se")
    assert code == 0 and "energy_per_atom" in out and "RMSE" in out


# ----------------------------------------------------------------------------------------------
# errors: one line naming file, line and field; no output file left behind
# ----------------------------------------------------------------------------------------------


def _published_text(name: str) -> str:
    return require_reference(f"{name}.mtp").read_text()


def _mtp_case(tmp_path: Path, case: str) -> tuple[Path, list[str], int, str]:
    """(input file, type names, expected line, expected field) of a broken .mtp."""
    text = _published_text("cu2se_p")
    lines = text.splitlines()
    names = ["Cu", "Se"]

    def line_of(prefix: str) -> int:
        return next(i for i, line in enumerate(lines, 1) if line.startswith(prefix))

    if case == "truncated":
        cut = lines[: line_of("alpha_moments_count") - 1]
        text, line, field = "\n".join(cut), len(cut), "alpha_moments_count"
    elif case == "truncated-mid-list":
        text = text[: text.index("moment_coeffs = ") + 200]
        line, field = line_of("moment_coeffs"), "moment_coeffs"
    elif case == "wrong-count":
        text = text.replace("alpha_scalar_moments = 109", "alpha_scalar_moments = 110")
        line, field = line_of("alpha_moment_mapping"), "alpha_moment_mapping"
    elif case == "unknown-key":
        text = text.replace("species_count = 2\n", "species_count = 2\nspecies_colour = 3\n")
        line, field = line_of("species_count") + 1, "species_colour"
    elif case == "species-length":
        names, line, field = ["Cu", "Se", "Te"], line_of("species_count"), "species_count"
    else:  # pragma: no cover
        raise AssertionError(case)
    path = tmp_path / "in" / "model.mtp"
    path.parent.mkdir()
    path.write_text(text)
    return path, names, line, field


@pytest.mark.parametrize(
    "case", ["truncated", "truncated-mid-list", "wrong-count", "unknown-key", "species-length"]
)
def test_malformed_mtp(case, tmp_path, capsys):
    path, names, line, field = _mtp_case(tmp_path, case)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, out, err = run(
        capsys, "import-mtp", path, "--type-names", *names, "-o", out_dir / "m.nequip.zip"
    )
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"nequip-sus2 import-mtp: error: {path}:{line}: "), err
    assert field in err
    assert list(out_dir.iterdir()) == []


def test_species_file_of_wrong_length(tmp_path, capsys):
    src = require_reference("cathod.mtp")
    (tmp_path / "sp.json").write_text(json.dumps(["Li", "O"]))
    code, _, err = run(
        capsys, "import-mtp", src, "--type-names-file", tmp_path / "sp.json", "-o",
        tmp_path / "m.nequip.zip",
    )  # fmt: skip
    assert code == 2
    assert f"{src}:7: field 'species_count': the file has 8 species but 2" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sp.json"]


def _broken_cfg(tmp_path: Path, case: str) -> tuple[Path, int, str]:
    frames = read_cfg(require_reference("alloy_sample.cfg"))
    good = tmp_path / "good.cfg"
    write_cfg(frames, good)
    lines = good.read_text().splitlines()
    begins = [i for i, line in enumerate(lines) if line == "BEGIN_CFG"]
    k = begins[150]  # late in the file: streaming output must not survive
    header = next(i for i in range(k, len(lines)) if lines[i].startswith(" AtomData"))
    if case == "missing-column":
        lines[header] = lines[header].replace(" fz", "")
        line, field = header + 1, "fz"
    elif case == "short-row":
        lines[header + 1] = " ".join(lines[header + 1].split()[:-1])
        line, field = header + 2, "AtomData"
    elif case == "truncated":
        lines = lines[: header + 2]
        line, field = header + 2, "END_CFG"
    else:  # type out of range for the species list given
        row = lines[header + 1].split()
        row[1] = "53"
        lines[header + 1] = "    " + " ".join(row)
        line, field = header + 2, "type"
    path = tmp_path / "broken.cfg"
    path.write_text("\n".join(lines) + "\n")
    good.unlink()
    return path, line, field


@pytest.mark.parametrize("case", ["missing-column", "short-row", "truncated", "type-range"])
def test_malformed_cfg(case, tmp_path, capsys):
    path, line, field = _broken_cfg(tmp_path, case)
    code, _, err = run(
        capsys, "convert", path, tmp_path / "out.xyz", "--type-names", *SPECIES["alloy"]
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"nequip-sus2 convert: error: {path}:{line}: "), err
    assert field in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.cfg"]


def test_usage_errors(tmp_path, capsys):
    src = require_reference("cu2se_p.mtp")
    code, _, err = run(capsys, "import-mtp", src, "--type-names", "Cu", "Se", "-o", "m.zip")
    assert code == 2 and "must end with .nequip.zip" in err
    code, _, err = run(capsys, "export-mtp", tmp_path / "none.ckpt", "-o", tmp_path / "a.mtp")
    assert code == 2 and "none.ckpt: no such file" in err
    code, _, err = run(capsys, "convert", src, tmp_path / "a.xyz", "--type-names", "Cu")
    assert code == 2 and "cannot tell the direction" in err
    with pytest.raises(SystemExit) as info:  # argparse: the species list is required
        main(["import-mtp", str(src), "-o", str(tmp_path / "m.nequip.zip")])
    assert info.value.code == 2
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# end to end (slow): CLI import -> nequip-compile (AOTI, ASE target) -> ASE calculator
# ----------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    exe = shutil.which(name) or str(Path(sys.executable).with_name(name))
    if not Path(exe).exists():
        pytest.skip(f"{name} is not installed")
    return exe


#: published models compiled with the fused CPU kernels (``--modifiers enable_fused_moments``);
#: the others take the PyTorch path, so both routes meet the golden predictions
FUSED = {"alloy"}


@pytest.fixture(scope="module", params=list(SPECIES))
def compiled(request, tmp_path_factory):
    """One AOTInductor compile per published model (float64 import)."""
    name = request.param
    src = require_reference(f"{name}.mtp")
    work = tmp_path_factory.mktemp(name)
    pkg, pt2 = work / f"{name}.nequip.zip", work / f"{name}.nequip.pt2"
    assert main(["import-mtp", str(src), "--type-names", *SPECIES[name], "-o", str(pkg)]) == 0
    proc = subprocess.run(
        [_tool("nequip-package"), "info", str(pkg)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "available_models" in proc.stdout and SPECIES[name][-1] in proc.stdout
    proc = subprocess.run(
        [
            _tool("nequip-compile"), str(pkg), str(pt2), "--mode", "aotinductor",
            "--device", "cpu", "--target", "ase",
            *(["--modifiers", "enable_fused_moments"] if name in FUSED else []),
        ],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return name, pt2


@pytest.mark.slow
def test_compiled_ase_calculator_reproduces_golden(compiled):
    from nequip.integrations.ase import NequIPCalculator

    name, pt2 = compiled
    calc = NequIPCalculator.from_compiled_model(
        str(pt2), device="cpu", chemical_species_to_atom_type_map=True
    )
    worst = {"energy": 0.0, "forces": 0.0, "virial": 0.0}
    for frame in read_cfg(require_reference(GOLDEN[name])):
        atoms = frame.to_atoms(SPECIES[name])
        atoms.calc = calc
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()
        # float64 compiled model: the float64 bounds of test_reference_parity
        assert abs(energy - frame.energy) <= 1e-8 * abs(frame.energy)
        f_tol = 1e-7 + 1e-9 * np.abs(frame.forces).max()
        np.testing.assert_allclose(forces, frame.forces, rtol=0, atol=f_tol)
        worst["energy"] = max(worst["energy"], abs(energy - frame.energy) / abs(frame.energy))
        worst["forces"] = max(worst["forces"], float(np.abs(forces - frame.forces).max()))
        if frame.cell is not None:
            virial = -atoms.get_stress(voigt=True) * atoms.get_volume()  # .cfg PlusStress
            w_tol = 1e-7 + 1e-9 * np.abs(frame.plus_stress).max()
            np.testing.assert_allclose(virial, frame.plus_stress, rtol=0, atol=w_tol)
            worst["virial"] = max(worst["virial"], float(np.abs(virial - frame.plus_stress).max()))
    print(f"{name}: compiled ASE path vs golden, worst errors {worst}")
    if name in FUSED:
        _check_fused_package(pt2, name)


def _check_fused_package(pt2: Path, name: str) -> None:
    """The .pt2 names the operator library, and a fresh Python process (which has not loaded
    it) gets it imported by NequIP's loader and reproduces the golden energy."""
    with zipfile.ZipFile(pt2) as zf:
        libs = zf.read("nequip_custom_ops_libs.txt").decode().split()
    assert libs == ["nequip_sus2.kernels.ops"]
    script = (
        "import sys, torch\n"
        "from nequip.integrations.ase import NequIPCalculator\n"
        "from nequip_sus2.io.cfg import read_cfg\n"
        "assert not hasattr(torch.ops.sus2, 'basic_moments')\n"
        "calc = NequIPCalculator.from_compiled_model(sys.argv[1], device='cpu',\n"
        "    chemical_species_to_atom_type_map=True)\n"
        "atoms = read_cfg(sys.argv[2])[0].to_atoms(sys.argv[3:])\n"
        "atoms.calc = calc\n"
        "print(float(atoms.get_potential_energy()))\n"
    )
    golden = require_reference(GOLDEN[name])
    frame = read_cfg(golden)[0]
    proc = subprocess.run(
        [sys.executable, "-c", script, str(pt2), str(golden), *SPECIES[name]],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    energy = float(proc.stdout.strip().splitlines()[-1])
    assert abs(energy - frame.energy) <= 1e-8 * abs(frame.energy)


# ----------------------------------------------------------------------------------------------
# fine-tuning (slow): imported package + .cfg data + frozen scaling block, with nequip-train
# ----------------------------------------------------------------------------------------------


def _loss(model, dataset) -> float:
    """The fine-tuning config's loss (per-atom energy, forces, 10 x stress MSE, normalised)."""
    from nequip.data import AtomicDataDict

    e, f, s = [], [], []
    for data in dataset:
        out = model(AtomicDataDict.batched_from_list([data]))
        n = data["pos"].shape[0]
        e.append(((out["total_energy"] - data["total_energy"]) / n).detach().reshape(-1))
        f.append((out["forces"] - data["forces"]).detach().reshape(-1))
        s.append((out["stress"] - data["stress"]).detach().reshape(-1))
    mse = [torch.cat(x).square().mean().item() for x in (e, f, s)]
    return (mse[0] + mse[1] + 10.0 * mse[2]) / 12.0


@pytest.mark.slow
def test_finetune_published_model_with_frozen_scaling(tmp_path, capsys):
    if not ALLOY_TRAIN.is_file():
        pytest.skip(f"{ALLOY_TRAIN} is absent")
    from nequip.data.dataset import SubsetByRandomSlice
    from nequip.data.transforms import NeighborListTransform

    from nequip_sus2.data.cfg_dataset import CfgDataset
    from nequip_sus2.package import load_model

    src = require_reference("alloy.mtp")
    pkg = tmp_path / "alloy.nequip.zip"
    assert main(["import-mtp", str(src), "--type-names", *SPECIES["alloy"], "-o", str(pkg)]) == 0
    run_dir = tmp_path / "run"
    n_train = 32
    cmd = [
        sys.executable, "-m", "nequip.scripts.train",
        "-cp", str(CONFIGS), "-cn", "finetune_alloy.yaml",
        f"package_file={pkg}", f"data_file={ALLOY_TRAIN}", f"n_train={n_train}", "n_val=8",
        "max_epochs=3", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    before, after = load_model(pkg), load_model(run_dir / "last.ckpt")
    b, a = before.state_dict(), after.state_dict()
    for key in ("model.func.scaling.alpha", "model.func.scaling.r0"):
        assert torch.equal(a[key], b[key]), key  # bit-identical
    for key in ("model.func.readout.theta", "model.func.embedding.coeffs"):
        assert not torch.equal(a[key], b[key]), key  # the rest did train

    # the training loss, evaluated independently on the same training subset, went down
    seed = yaml.safe_load((CONFIGS / "finetune_alloy.yaml").read_text())["seed"]
    dataset = CfgDataset(
        str(ALLOY_TRAIN), SPECIES["alloy"], transforms=[NeighborListTransform(r_max=6.0)]
    )
    subset = SubsetByRandomSlice(dataset, start=0, length=n_train, seed=seed)
    loss_before, loss_after = _loss(before, subset), _loss(after, subset)
    print(f"fine-tune training loss: before {loss_before:.6g}, after {loss_after:.6g}")
    assert loss_after < loss_before
    metrics = next(run_dir.glob("metrics/version_*/metrics.csv"))
    with open(metrics) as f:
        epochs = [
            float(r["train_loss_epoch/weighted_sum"])
            for r in csv.DictReader(f)
            if r.get("train_loss_epoch/weighted_sum")
        ]
    assert len(epochs) == 3 and epochs[-1] < epochs[0], epochs

    # back to .mtp: the scaling block is byte-identical to the published file
    back = tmp_path / "finetuned.mtp"
    assert main(["export-mtp", str(run_dir / "last.ckpt"), "-o", str(back)]) == 0
    published = {line.split(" = ")[0]: line for line in src.read_text().splitlines()}
    exported = {line.split(" = ")[0]: line for line in back.read_text().splitlines()}
    assert exported["scal_coeffs"] == published["scal_coeffs"]
    assert exported["moment_coeffs"] != published["moment_coeffs"]
