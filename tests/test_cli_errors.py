"""``nequip-sus2`` conventions: ``--version``, ``-o/--output`` with the former spellings, one-line
errors (exit status 2, no traceback, no output file left), ``--json`` alone on stdout, progress
bars on stderr only, and misspelled model-config keys named by the SUS2 builders."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import ase.io
import nequip
import numpy as np
import pytest
import torch
import yaml
from _helpers import CU_SE_CFG, assert_one_line_error
from conftest import require_reference

import nequip_sus2
from nequip_sus2 import cli
from nequip_sus2.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

#: two configurations in the MLIP-2 layout (type 0 = Cu, 1 = Se)
TINY_CFG = (
    CU_SE_CFG
    + """
BEGIN_CFG
 Size
    1
 Supercell
    2.5 0.0 0.0
    0.0 2.5 0.0
    0.0 0.0 2.5
 AtomData:  id type       cartes_x      cartes_y      cartes_z           fx          fy          fz
    1 1 0.5 0.5 0.5 0.0 0.0 0.0
 Energy
    -3.25
END_CFG
"""
)
#: positions of TINY_CFG in file order
TINY_POSITIONS = [[[0.0, 0.0, 0.0], [1.8, 1.8, 0.25]], [[0.5, 0.5, 0.5]]]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "tiny.cfg"
    path.parent.mkdir()
    path.write_text(TINY_CFG)
    return path


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    """A .nequip.zip package of the published Cu-Se model."""
    src = require_reference("cu2se_p.mtp")
    pkg = tmp_path_factory.mktemp("pkg") / "cu2se.nequip.zip"
    assert main(["import-mtp", str(src), "--type-names", "Cu", "Se", "-o", str(pkg)]) == 0
    return pkg


def _out_dir(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    return out


# ----------------------------------------------------------------------------------------------
# --version
# ----------------------------------------------------------------------------------------------


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out == (
        f"nequip-sus2 {nequip_sus2.__version__} (nequip {nequip.__version__}, "
        f"torch {torch.__version__})\n"
    )


# ----------------------------------------------------------------------------------------------
# output flags: -o/--output everywhere, the former spellings still accepted
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["positional", "-o", "--output"])
def test_convert_output_spellings(spelling, tiny_cfg, tmp_path, capsys):
    out = tmp_path / "tiny.xyz"
    flag = [out] if spelling == "positional" else [spelling, out]
    code, stdout, err = run(capsys, "convert", tiny_cfg, *flag, "--type-names", "Cu", "Se")
    assert code == 0, err
    assert err == ""  # no progress bar when stderr is not a terminal
    assert f"wrote 2 configurations to {out}" in stdout
    images = ase.io.read(out, index=":")
    assert [a.get_chemical_symbols() for a in images] == [["Cu", "Se"], ["Se"]]
    for atoms, positions in zip(images, TINY_POSITIONS, strict=True):
        assert np.array_equal(atoms.positions, positions)
    assert [a.get_potential_energy() for a in images] == [-7.5, -3.25]


def test_convert_output_given_twice_or_never(tiny_cfg, tmp_path, capsys):
    code, _, err = run(
        capsys, "convert", tiny_cfg, tmp_path / "a.xyz", "-o", tmp_path / "b.xyz",
        "--type-names", "Cu", "Se",
    )  # fmt: skip
    assert_one_line_error(code, err, "convert", "a.xyz", "b.xyz", "-o/--output")
    code, _, err = run(capsys, "convert", tiny_cfg, "--type-names", "Cu", "Se")
    assert_one_line_error(code, err, "convert", "-o/--output")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.mark.parametrize("spelling", ["-o", "--output", "--out"])
def test_bench_and_lammps_plugin_output_spellings(spelling):
    parser = cli.build_parser()
    args = parser.parse_args(["bench", "m.mtp", "--data", "d.cfg", spelling, "report"])
    assert args.out_dir == "report"
    args = parser.parse_args(["lammps-plugin", "--build", spelling, "plugins"])
    assert args.out == "plugins"


def test_bench_output_required_once(capsys):
    parser = cli.build_parser()
    for argv in (["bench", "m.mtp"], ["bench", "m.mtp", "-o", "a", "--out", "b"]):
        with pytest.raises(SystemExit) as info:
            parser.parse_args(argv)
        assert info.value.code == 2
        assert "-o/--output" in capsys.readouterr().err


def test_former_spellings_are_hidden_from_help(capsys):
    for sub in ("bench", "lammps-plugin"):
        with pytest.raises(SystemExit):
            main([sub, "--help"])
        out = capsys.readouterr().out
        assert "-o DIR, --output DIR" in out and "--out " not in out


@pytest.mark.parametrize("spelling", ["--out", "-o"])
def test_lammps_plugin_missing_directory(spelling, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code, _, err = run(capsys, "lammps-plugin", "--build", spelling, missing)
    assert_one_line_error(code, err, "lammps-plugin", str(missing), "no such directory")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sub", ["bench", "lammps-plugin", "export-mtp", "convert", "import-mtp"])
def test_help_ends_with_example(sub, capsys):
    with pytest.raises(SystemExit) as info:
        main([sub, "--help"])
    assert info.value.code == 0
    last = capsys.readouterr().out.strip().splitlines()
    examples = [line for line in last if line.startswith("Example: nequip-sus2 " + sub)]
    assert examples, last[-3:]


# ----------------------------------------------------------------------------------------------
# one-line errors
# ----------------------------------------------------------------------------------------------


def test_convert_unknown_chemical_symbol(tiny_cfg, tmp_path, capsys):
    out = _out_dir(tmp_path)
    code, _, err = run(capsys, "convert", tiny_cfg, out / "o.xyz", "--type-names", "Cu", "Xx")
    assert_one_line_error(code, err, "convert", "--type-names", "'Xx'", "not a chemical symbol")
    # a lower-case symbol gets the spelling it probably meant
    species = tmp_path / "species.yaml"
    species.write_text("[cu, Se]\n")
    code, _, err = run(capsys, "convert", tiny_cfg, out / "o.xyz", "--type-names-file", species)
    assert_one_line_error(code, err, "convert", str(species), "'cu'", "did you mean 'Cu'?")
    assert list(out.iterdir()) == []


def test_export_mtp_of_a_mtp_file(tmp_path, capsys):
    src = require_reference("cu2se_p.mtp")
    out = _out_dir(tmp_path)
    code, _, err = run(capsys, "export-mtp", src, "-o", out / "x.mtp")
    assert_one_line_error(code, err, "export-mtp", str(src), "checkpoint", "package", ".mtp")
    assert "already in the format" in err
    # the same file under a checkpoint's name is recognised by its content
    renamed = tmp_path / "model.ckpt"
    renamed.write_bytes(src.read_bytes())
    code, _, err = run(capsys, "export-mtp", renamed, "-o", out / "x.mtp")
    assert_one_line_error(code, err, "export-mtp", str(renamed), "already in the format")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("case", ["text.ckpt", "text.nequip.zip", "truncated", "foreign-zip"])
def test_export_mtp_of_a_file_that_is_not_a_model(case, package, tmp_path, capsys):
    import zipfile

    if case.startswith("text"):
        bad = tmp_path / f"model.{case.split('.', 1)[1]}"
        bad.write_text("epoch 3: loss 0.1\n")
    elif case == "truncated":
        bad = tmp_path / "cut.nequip.zip"
        bad.write_bytes(package.read_bytes()[: package.stat().st_size // 2])
    else:
        bad = tmp_path / "other.ckpt"
        with zipfile.ZipFile(bad, "w") as zf:
            zf.writestr("notes.txt", "not a model")
    out = _out_dir(tmp_path)
    code, _, err = run(capsys, "export-mtp", bad, "-o", out / "x.mtp")
    assert_one_line_error(code, err, "export-mtp", str(bad), "not a readable nequip-train")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("names", [["Cu"], ["Cu", "Se", "Te"]])
def test_import_mtp_wrong_species_count(names, tmp_path, capsys):
    src = require_reference("cu2se_p.mtp")
    line = next(i for i, t in enumerate(src.read_text().splitlines(), 1) if "species_count" in t)
    out = _out_dir(tmp_path)
    code, _, err = run(
        capsys, "import-mtp", src, "--type-names", *names, "-o", out / "m.nequip.zip"
    )
    assert_one_line_error(code, err, "import-mtp", f"{src}:{line}:", "species_count")
    assert f"has 2 species but {len(names)} type names" in err
    assert list(out.iterdir()) == []


BAD_EXTXYZ = {
    "header": ("Cu 0 0 0\n", 1),
    "atom-count": ("3\nProperties=species:S:1:pos:R:3\nCu 0 0 0\n", 1),
    "number": ("1\nProperties=species:S:1:pos:R:3\nCu 0 0 zero\n", 1),
    "second-frame": (
        "1\nProperties=species:S:1:pos:R:3\nCu 0 0 0\n2\nProperties=species:S:1:pos:R:3\nCu 0 0 0\n",
        4,
    ),
    "empty": ("", None),
}


@pytest.mark.parametrize("case", list(BAD_EXTXYZ))
def test_convert_unreadable_extxyz(case, tmp_path, capsys):
    text, line = BAD_EXTXYZ[case]
    src = tmp_path / "bad.xyz"
    src.write_text(text)
    out = _out_dir(tmp_path)
    code, _, err = run(capsys, "convert", src, "-o", out / "o.cfg", "--type-names", "Cu")
    where = f"{src}:{line}:" if line else f"{src}:"
    assert_one_line_error(code, err, "convert", where)
    assert list(out.iterdir()) == []


def test_unexpected_exception_is_one_line_unless_debugging(tiny_cfg, tmp_path, capsys, monkeypatch):
    import nequip_sus2.io.convert as convert

    def broken(*args, **kwargs):
        raise ZeroDivisionError("float division by zero")

    monkeypatch.setattr(convert, "cfg_to_extxyz", broken)
    monkeypatch.delenv("NEQUIP_SUS2_DEBUG", raising=False)
    code, _, err = run(capsys, "convert", tiny_cfg, tmp_path / "o.xyz", "--type-names", "Cu", "Se")
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines() == [
        "nequip-sus2 convert: internal error: ZeroDivisionError: float division by zero "
        "(run with NEQUIP_SUS2_DEBUG=1 for the traceback)"
    ]
    monkeypatch.setenv("NEQUIP_SUS2_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["convert", str(tiny_cfg), str(tmp_path / "o.xyz"), "--type-names", "Cu", "Se"])


# ----------------------------------------------------------------------------------------------
# stdout: only the result (--json); logs and progress bars on stderr
# ----------------------------------------------------------------------------------------------


def test_export_mtp_json_stdout_is_only_json(package, tmp_path):
    """In a fresh process, where nequip attaches its stdout log handler mid-command."""
    out = tmp_path / "x.mtp"
    env = {k: v for k, v in os.environ.items() if k != "NEQUIP_SUS2_DEBUG"}
    proc = subprocess.run(
        [sys.executable, "-m", "nequip_sus2.cli", "export-mtp", str(package), "-o", str(out),
         "--json"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == {"output": str(out), "type_names": ["Cu", "Se"]}
    src = require_reference("cu2se_p.mtp")
    assert out.read_bytes() == src.read_bytes().rstrip(b"\n")
    # with the debug switch nequip's INFO lines are shown, on stderr
    env["NEQUIP_SUS2_DEBUG"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "nequip_sus2.cli", "export-mtp", str(package), "--output",
         str(out), "--json"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["type_names"] == ["Cu", "Se"]
    assert "Loading model" in proc.stderr


def test_log_handlers_on_stdout_are_moved_to_stderr(capsys):
    root = logging.getLogger()
    before = logging.StreamHandler(sys.stdout)
    root.addHandler(before)
    added = None
    try:
        with cli._logs_to_stderr():
            added = logging.StreamHandler(sys.stdout)  # as hydra's configure_log does
            root.addHandler(added)
            logging.getLogger("nequip.test").warning("a warning")
            logging.getLogger("nequip.test").error("an error")
            print("the result")
        assert before.stream is sys.stdout  # restored after the command
    finally:
        root.removeHandler(before)
        if added is not None:
            root.removeHandler(added)
    out, err = capsys.readouterr()
    assert out == "the result\n"
    assert err.count("a warning") == 2 and err.count("an error") == 2


def test_convert_progress_bar(tiny_cfg, tmp_path, capsys):
    from nequip_sus2.io.convert import cfg_to_extxyz, extxyz_to_cfg

    assert cfg_to_extxyz(tiny_cfg, tmp_path / "a.xyz", ["Cu", "Se"], progress=True) == 2
    out, err = capsys.readouterr()
    assert out == "" and "2/2" in err and "100%" in err
    assert extxyz_to_cfg(tmp_path / "a.xyz", tmp_path / "b.cfg", ["Cu", "Se"], progress=True) == 2
    out, err = capsys.readouterr()
    assert out == "" and "2cfg" in err
    assert (tmp_path / "b.cfg").read_text().count("BEGIN_CFG") == 2
    code, _, err = run(
        capsys, "convert", tiny_cfg, "-o", tmp_path / "c.xyz", "--type-names", "Cu", "Se",
        "--no-progress",
    )  # fmt: skip
    assert code == 0 and err == ""


# ----------------------------------------------------------------------------------------------
# misspelled keys of a SUS2 model block
# ----------------------------------------------------------------------------------------------


def _build(builder, **kwargs):
    from nequip.utils.global_state import global_state_initialized, set_global_state

    if not global_state_initialized():
        set_global_state()
    return builder(**kwargs)


def test_builder_names_a_misspelled_key():
    import inspect

    from nequip_sus2.model import SUS2FromMTP, SUS2Model

    base = {"seed": 0, "model_dtype": "float64", "type_names": ["Cu"], "r_max": 4.0}
    with pytest.raises(TypeError) as info:
        _build(SUS2Model, **base, max_rnk=2)
    assert str(info.value) == "SUS2Model: unknown argument 'max_rnk' (did you mean 'max_rank'?)"
    with pytest.raises(TypeError, match=r"unknown argument 'model_dtyp' \(did you mean 'model_dt"):
        _build(SUS2Model, **{**base, "model_dtyp": base.pop("model_dtype")})
    # no close match: the valid names are listed
    with pytest.raises(TypeError, match=r"unknown argument 'colour'; valid arguments: .*max_rank"):
        _build(SUS2Model, **base, model_dtype="float64", colour="red")
    with pytest.raises(TypeError) as info:
        _build(
            SUS2FromMTP,
            mtp_path=str(require_reference("cu2se_p.mtp")),
            type_names=["Cu", "Se"],
            pair_scaling_trainabel=False,
        )
    assert "SUS2FromMTP: unknown argument 'pair_scaling_trainabel' (did you mean " in str(
        info.value
    )
    # the builders keep their own signatures and still build
    assert "max_rank" in inspect.signature(SUS2Model).parameters
    assert "mtp_path" in inspect.signature(SUS2FromMTP).parameters
    model = _build(SUS2Model, **base, model_dtype="float64", max_rank=1)
    assert float(model.metadata["r_max"]) == 4.0 and list(model.type_names) == ["Cu"]


def test_nequip_train_names_a_misspelled_key(tmp_path):
    from nequip_sus2.data.emt import write_emt_dataset

    data = write_emt_dataset(tmp_path / "emt.xyz", n_structures=8, seed=3)
    config = yaml.safe_load((CONFIGS / "tutorial.yaml").read_text())
    model = config["training_module"]["model"]
    model["max_rnk"] = model.pop("max_rank")
    config.update(data_file=str(data), max_epochs=1)
    config["trainer"]["enable_progress_bar"] = False
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run(
        [sys.executable, "-m", "nequip.scripts.train", "-cp", str(tmp_path), "-cn", "bad.yaml",
         f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode != 0
    errors = [
        line for line in proc.stderr.splitlines() if re.match(r"^[\w.]+(Error|Exception): ", line)
    ]
    assert errors, proc.stderr[-3000:]
    assert errors[0].endswith("SUS2Model: unknown argument 'max_rnk' (did you mean 'max_rank'?)"), (
        proc.stderr[-3000:]
    )
