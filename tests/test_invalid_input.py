"""Nothing invalid passes silently: nan/inf numbers in ``.mtp`` models and in ``.cfg``/extxyz data,
non-positive or nan cutoffs and singular periodic cells are refused with one line naming file,
line and field (exit status 2, no traceback, no output file), through every command and the
library readers; a training whose loss becomes nan stops with an error; a run resumed from
``last.ckpt`` repeats the uninterrupted run."""

from __future__ import annotations

import csv
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _helpers import CU_SE_CFG, assert_one_line_error
from conftest import require_reference

from nequip_sus2.cli import main
from nequip_sus2.io.cfg import CfgFormatError, CfgFrame, read_cfg, write_cfg
from nequip_sus2.io.mtp import MTPFormatError, read_mtp, write_mtp

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

CFG = CU_SE_CFG

XYZ = """\
2
Lattice="3.6 0.0 0.0 0.0 3.6 0.0 0.0 0.0 3.6" Properties=species:S:1:pos:R:3:forces:R:3 \
energy=-7.5 pbc="T T T"
Cu 0.0 0.0 0.0 0.1 0.2 0.3
Se 1.8 1.8 0.25 -0.1 -0.2 -0.3
"""


def cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def replace_line(text: str, lineno: int, new: str) -> str:
    lines = text.split("\n")
    lines[lineno - 1] = new
    return "\n".join(lines)


def line_of(text: str, start: str) -> int:
    """1-based number of the first line whose stripped text starts with ``start``."""
    return next(n for n, line in enumerate(text.split("\n"), 1) if line.strip().startswith(start))


# ----------------------------------------------------------------------------------------------
# .mtp models
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def mtp_text() -> str:
    return require_reference("cu2se_p.mtp").read_text()


def corrupt_coefficient(text: str, key: str, position: int, token: str) -> tuple[str, int]:
    """Replace number ``position`` (0-based) of the first line starting with ``key`` (a
    ``{...}`` list) by ``token``; returns the text and the line number."""
    n = line_of(text, key)
    line = text.split("\n")[n - 1]
    head, body = line.split("{", 1)
    values = body.rstrip("}").split(", ")
    values[position] = token
    return replace_line(text, n, head + "{" + ", ".join(values) + "}"), n


@pytest.mark.parametrize(
    "key, position, token",
    [
        ("moment_coeffs", 5, "nan"),
        ("shift_coeffs", 1, "inf"),
        ("scal_coeffs", 0, "-inf"),
        ("species_coeffs", 0, "NaN"),
        ("{", 3, "nan"),  # the first radial_coeffs row
    ],
)
def test_non_finite_mtp_coefficient_is_refused(mtp_text, tmp_path, capsys, key, position, token):
    text, lineno = corrupt_coefficient(mtp_text, key, position, token)
    field = "radial_coeffs" if key == "{" else key
    path = tmp_path / "bad.mtp"
    path.write_text(text)
    with pytest.raises(MTPFormatError) as info:
        read_mtp(path)
    assert str(info.value).startswith(f"{path}:{lineno}: field '{field}': value {position + 1} ")
    out = tmp_path / "bad.nequip.zip"
    code, err = cli(capsys, "import-mtp", path, "--type-names", "Cu", "Se", "-o", out)
    assert_one_line_error(code, err, "import-mtp", f"{path}:{lineno}: field '{field}'")
    assert not out.exists()


@pytest.mark.parametrize(
    "field, value, named",
    [
        ("max_dist", "nan", "max_dist"),
        ("max_dist", "inf", "max_dist"),
        ("max_dist", "0", "max_dist"),
        ("max_dist", "-6.5", "max_dist"),
        ("max_dist", "1.0", "max_dist"),  # below min_dist = 1.85
        ("min_dist", "nan", "min_dist"),
        ("min_dist", "0.0", "min_dist"),
        ("min_dist", "-1", "min_dist"),
        ("min_dist", "6.5", "max_dist"),  # = max_dist: the cutoff must be larger
        ("scaling", "inf", "scaling"),
    ],
)
def test_invalid_cutoff_is_refused(mtp_text, tmp_path, capsys, field, value, named):
    indent = "" if field == "scaling" else "\t"  # the top-level scaling (sigma)
    text = replace_line(mtp_text, line_of(mtp_text, field), f"{indent}{field} = {value}")
    lineno = line_of(text, named)
    path = tmp_path / "bad.mtp"
    path.write_text(text)
    with pytest.raises(MTPFormatError, match=rf"^{re.escape(str(path))}:{lineno}: field '{named}'"):
        read_mtp(path)
    out = tmp_path / "bad.nequip.zip"
    code, err = cli(capsys, "import-mtp", path, "--type-names", "Cu", "Se", "-o", out)
    assert_one_line_error(code, err, "import-mtp", f"{path}:{lineno}: field '{named}'")
    assert not out.exists()


def test_builder_refuses_non_finite_mtp(mtp_text, tmp_path):
    from _helpers import build

    from nequip_sus2.model import SUS2FromMTP

    text, lineno = corrupt_coefficient(mtp_text, "moment_coeffs", 0, "nan")
    path = tmp_path / "bad.mtp"
    path.write_text(text)
    with pytest.raises(MTPFormatError, match=rf":{lineno}: field 'moment_coeffs'"):
        build(
            SUS2FromMTP, mtp_path=str(path), type_names=["Cu", "Se"], seed=0, model_dtype="float64"
        )


def test_nan_cutoff_does_not_hang_calc_errors(mtp_text, tmp_path):
    """Before, max_dist = nan made import take a minute and calc-errors hang in the neighbour
    list; now it is one line at once (a subprocess, so that a hang fails the test)."""
    lineno = line_of(mtp_text, "max_dist")
    path = tmp_path / "bad.mtp"
    path.write_text(replace_line(mtp_text, lineno, "\tmax_dist = nan"))
    data = tmp_path / "data.cfg"
    data.write_text(CFG)
    proc = subprocess.run(
        [sys.executable, "-m", "nequip_sus2.cli", "calc-errors", str(path), str(data)]
        + ["--type-names", "Cu", "Se", "--predictions", str(tmp_path / "pred.cfg")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line_error(
        proc.returncode, proc.stderr, "calc-errors", f"{path}:{lineno}: field 'max_dist'"
    )
    assert not (tmp_path / "pred.cfg").exists()


def test_export_refuses_non_finite_parameters(tmp_path):
    """export-mtp never writes nan/inf: a model with a nan parameter is refused (naming the
    parameter), and so is an ``MTPFile`` with one (naming the field)."""
    from nequip_sus2.io.mtp_model import export_mtp, import_mtp

    model = import_mtp(require_reference("cu2se_p.mtp"), ["Cu", "Se"])
    name, param = next((n, p) for n, p in model.named_parameters() if p.numel() > 1)
    with torch.no_grad():
        param.view(-1)[1] = float("inf")
    out = tmp_path / "out.mtp"
    with pytest.raises(ValueError, match=rf"parameter '{re.escape(name)}' holds 1 nan/inf"):
        export_mtp(model, out)
    assert not out.exists()

    mtp = read_mtp(require_reference("cu2se_p.mtp"))
    mtp.moment_coeffs[3] = math.nan
    with pytest.raises(ValueError, match=r"field 'moment_coeffs': value 4 of \d+ is nan"):
        write_mtp(mtp, out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_package_with_nan_parameter_is_refused(tmp_path, capsys):
    """A package whose model holds a nan: export-mtp names the parameter, calc-errors refuses
    to report nan errors; neither writes a file."""
    from nequip_sus2.io.mtp_model import import_mtp
    from nequip_sus2.package import write_package

    model = import_mtp(require_reference("cu2se_p.mtp"), ["Cu", "Se"])
    name, param = next((n, p) for n, p in model.named_parameters() if p.numel() > 1)
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    package = write_package(model, tmp_path / "bad.nequip.zip", compile_variants=False)
    out = tmp_path / "out.mtp"
    code, err = cli(capsys, "export-mtp", package, "-o", out)
    assert_one_line_error(code, err, "export-mtp", f"parameter '{name}' holds 1 nan/inf")
    assert not out.exists()
    data = _write(tmp_path / "data.cfg", CFG)
    pred = tmp_path / "pred.cfg"
    code, err = cli(capsys, "calc-errors", package, data, "--predictions", pred)
    assert_one_line_error(code, err, "calc-errors", "predicts nan/inf energy or forces")
    assert not pred.exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r_max": math.nan}, "r_max must be positive and finite"),
        ({"r_max": math.inf}, "r_max must be positive and finite"),
        ({"r_max": 0.0}, "r_max must be positive and finite"),
        ({"r_max": -5.0}, "r_max must be positive and finite"),
        ({"r_max": 5.0, "min_dist": 0.0}, "min_dist must lie in"),
        ({"r_max": 5.0, "min_dist": math.nan}, "min_dist must lie in"),
        ({"r_max": 5.0, "radial_scaling": math.inf}, "radial_scaling must be a finite number"),
    ],
)
def test_sus2_model_refuses_invalid_cutoffs(kwargs, message):
    from _helpers import build

    from nequip_sus2.model import SUS2Model

    with pytest.raises(ValueError, match=message):
        build(SUS2Model, type_names=["Cu", "Se"], seed=0, model_dtype="float64", **kwargs)


# ----------------------------------------------------------------------------------------------
# .cfg data
# ----------------------------------------------------------------------------------------------

# {line to change: new text}, what the message names, the line it names
CFG_CASES = {
    "energy": ({12: "    nan"}, "Energy value 'nan'", 12),
    "force": ({10: "    2 1 1.8 1.8 0.25 -0.1 -inf -0.3"}, "fy value '-inf'", 10),
    "stress": ({14: "    0.1 0.2 0.3 0.0 nan 0.0"}, "PlusStress xz value 'nan'", 14),
    "position": ({9: "    1 0 0.0 NaN 0.0 0.1 0.2 0.3"}, "cartes_y value 'NaN'", 9),
    "cell": ({6: "    0.0 inf 0.0"}, "Supercell value 'inf'", 6),
    "zero volume": ({7: "    3.6 0.0 0.0"}, "Supercell: the periodic cell is singular", 4),
    "near singular": ({7: "    0.0 3.6 1e-10"}, "volume is 1.3e-09 A^3", 4),
    # rows 1 and 2 parallel, row 3 zero (2 periodic directions)
    "flat 2d cell": ({6: "    7.2 0.0 0.0", 7: "    0.0 0.0 0.0"}, "area is 0 A^2", 4),
}


@pytest.mark.parametrize("case", list(CFG_CASES))
def test_invalid_cfg_is_refused(tmp_path, capsys, case):
    changes, field, named = CFG_CASES[case]
    text = CFG
    for lineno, new in changes.items():
        text = replace_line(text, lineno, new)
    path = tmp_path / "bad.cfg"
    path.write_text(text)
    with pytest.raises(CfgFormatError) as info:
        read_cfg(path)
    assert str(info.value).startswith(f"{path}:{named}: ") and field in str(info.value)

    # nequip-train's data loading of .cfg files
    from nequip_sus2.data.cfg_dataset import CfgDataset

    with pytest.raises(CfgFormatError, match=rf"^{re.escape(str(path))}:{named}: "):
        CfgDataset(file_path=str(path), type_names=["Cu", "Se"])

    out = tmp_path / "out.xyz"
    code, err = cli(capsys, "convert", path, "-o", out, "--type-names", "Cu", "Se")
    assert_one_line_error(code, err, "convert", f"{path}:{named}: ", field)
    assert not out.exists()


def test_invalid_cfg_through_calc_errors(tmp_path, capsys):
    model = require_reference("cu2se_p.mtp")
    path = tmp_path / "bad.cfg"
    path.write_text(CFG + replace_line(CFG, 12, "    inf"))  # second configuration
    pred = tmp_path / "pred.cfg"
    code, err = cli(
        capsys, "calc-errors", model, path, "--type-names", "Cu", "Se", "--predictions", pred
    )
    assert_one_line_error(code, err, "calc-errors", f"{path}:{12 + CFG.count(chr(10))}: Energy")
    assert not pred.exists()


def test_frames_with_nan_are_not_written(tmp_path):
    frame = read_cfg(_write(tmp_path / "ok.cfg", CFG))[0]
    out = tmp_path / "out.cfg"
    frame.forces[1, 2] = math.nan
    with pytest.raises(ValueError, match=r"forces of atom 1 \(AtomData row 2\) hold nan"):
        write_cfg([frame], out)
    assert not out.exists()
    with pytest.raises(ValueError, match="the periodic cell is singular"):
        CfgFrame(types=[0], positions=[[0, 0, 0]], cell=[[1, 0, 0], [2, 0, 0], [0, 0, 1]])


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------
# extended XYZ data
# ----------------------------------------------------------------------------------------------

XYZ_CASES = {
    "position": (4, "Se nan 1.8 0.25 -0.1 -0.2 -0.3", "field 'pos': atom 1 holds nan"),
    "force": (3, "Cu 0.0 0.0 0.0 0.1 inf 0.3", "field 'forces': atom 0 holds inf"),
    "energy": (2, XYZ.split("\n")[1].replace("energy=-7.5", "energy=nan"), "field 'energy'"),
    "zero volume": (
        2,
        XYZ.split("\n")[1].replace('"3.6 0.0 0.0 0.0 3.6 0.0', '"3.6 0.0 0.0 3.6 0.0 0.0'),
        "field 'Lattice': the periodic cell is singular",
    ),
}


@pytest.mark.parametrize("case", list(XYZ_CASES))
def test_invalid_extxyz_is_refused(tmp_path, capsys, case):
    lineno, new, message = XYZ_CASES[case]
    text = XYZ
    path = tmp_path / "bad.xyz"
    # the bad frame is the second one: lines 5.. of the file
    path.write_text(text + replace_line(text, lineno, new))
    where = f"{path}:{lineno + 4}: frame 1: {message}"
    out = tmp_path / "out.cfg"
    code, err = cli(capsys, "convert", path, "-o", out, "--type-names", "Cu", "Se")
    assert_one_line_error(code, err, "convert", where)
    assert not out.exists()
    if case == "position":
        pred = tmp_path / "pred.xyz"
        model = require_reference("cu2se_p.mtp")
        code, err = cli(
            capsys, "calc-errors", model, path, "--type-names", "Cu", "Se", "--predictions", pred
        )
        assert_one_line_error(code, err, "calc-errors", where)
        assert not pred.exists()


def test_active_set_readers_refuse_invalid_structures(tmp_path):
    """``active-set`` and ``select-add`` read their structures with the same checks."""
    from nequip_sus2.active_set import _read_structures

    text = XYZ + replace_line(XYZ, 4, "Se 1.8 -inf 0.25 -0.1 -0.2 -0.3")
    path = _write(tmp_path / "md.xyz", text)
    with pytest.raises(ValueError, match=r":8: frame 1: field 'pos': atom 1 holds -inf"):
        _read_structures(path, ["Cu", "Se"])
    path = _write(tmp_path / "md.cfg", replace_line(CFG, 12, "    nan"))
    with pytest.raises(CfgFormatError, match=r":12: Energy value 'nan'"):
        _read_structures(path, ["Cu", "Se"])


# ----------------------------------------------------------------------------------------------
# training: nan loss, resume
# ----------------------------------------------------------------------------------------------


def _trainer(**kwargs) -> SimpleNamespace:
    defaults = dict(world_size=1, current_epoch=3, global_step=17, sanity_checking=False)
    return SimpleNamespace(**{**defaults, **kwargs})


def test_stop_on_non_finite_loss_callback():
    from nequip_sus2.train import NonFiniteLossError, StopOnNonFiniteLoss

    cb = StopOnNonFiniteLoss()
    cb.on_before_backward(_trainer(), None, torch.tensor(0.25))
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at epoch 3, step 17"):
        cb.on_before_backward(_trainer(), None, torch.tensor(float("nan")))
    with pytest.raises(NonFiniteLossError, match=r"training loss is inf"):
        cb.on_before_backward(_trainer(), None, torch.tensor(float("inf")))
    metrics = {"val0_epoch/weighted_sum": torch.tensor(0.5), "train_loss": torch.tensor(1.0)}
    cb.on_validation_end(_trainer(callback_metrics=metrics), None)
    metrics["val0_epoch/forces_mae"] = torch.tensor(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"val0_epoch/forces_mae are nan/inf at epoch 3"):
        cb.on_validation_end(_trainer(callback_metrics=metrics), None)
    # not during Lightning's sanity check, and not when asked not to
    cb.on_validation_end(_trainer(callback_metrics=metrics, sanity_checking=True), None)
    StopOnNonFiniteLoss(check_val=False).on_validation_end(_trainer(callback_metrics=metrics), None)


def _train(tmp_path: Path, name: str, config: str, data: Path, epochs: int, *extra: str):
    run_dir = tmp_path / name
    cmd = [
        sys.executable, "-m", "nequip.scripts.train", "-cp", str(CONFIGS), "-cn", config,
        f"data_file={data}", f"max_epochs={epochs}", f"hydra.run.dir={run_dir}",
        "trainer.enable_progress_bar=false", "run=[train]", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    return proc, run_dir


@pytest.fixture(scope="module")
def emt_data(tmp_path_factory) -> Path:
    from nequip_sus2.data.emt import write_emt_dataset

    return write_emt_dataset(tmp_path_factory.mktemp("emt") / "emt.xyz", n_structures=40, seed=3)


def test_diverging_training_stops_with_an_error(tmp_path, emt_data):
    """nequip-train with the shipped tutorial config and a learning rate that diverges: the run
    stops with the callback's message and a non-zero exit status (before: exit status 0)."""
    proc, _ = _train(
        tmp_path, "run", "tutorial.yaml", emt_data, 2, "training_module.optimizer.lr=1e8"
    )
    assert proc.returncode != 0
    assert "NonFiniteLossError: the training loss is nan at epoch 0" in proc.stderr[-5000:]


def _val_losses(run_dir: Path) -> dict[int, float]:
    metrics = next(run_dir.glob("metrics/version_*/metrics.csv"))
    with open(metrics) as f:
        return {
            int(r["epoch"]): float(r["val0_epoch/weighted_sum"])
            for r in csv.DictReader(f)
            if r.get("val0_epoch/weighted_sum")
        }


@pytest.mark.slow
def test_resumed_run_repeats_the_uninterrupted_run(tmp_path, emt_data):
    """5 epochs in one go vs 3 epochs and a resume from last.ckpt to 5, with the pre-fit config
    (LinearPrefit, EMA) and a ReduceLROnPlateau that halves the learning rate every epoch: the
    validation losses agree to rounding (before: the resumed run drew other batches and halved
    the learning rate one epoch late, ~1 % apart)."""
    plateau = [
        "training_module.lr_scheduler.scheduler.patience=0",
        "training_module.lr_scheduler.scheduler.threshold=0.5",
    ]
    full, full_dir = _train(tmp_path, "full", "tutorial_prefit.yaml", emt_data, 5, *plateau)
    assert full.returncode == 0, full.stderr[-3000:]
    part, part_dir = _train(tmp_path, "part", "tutorial_prefit.yaml", emt_data, 3, *plateau)
    assert part.returncode == 0, part.stderr[-3000:]
    resumed, resumed_dir = _train(
        tmp_path, "resumed", "tutorial_prefit.yaml", emt_data, 5, *plateau,
        f"++ckpt_path={part_dir / 'last.ckpt'}",
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # last.ckpt holds the third epoch whether or not its validation improved: resume at epoch 3
    saved = torch.load(part_dir / "last.ckpt", map_location="cpu", weights_only=False)["epoch"]
    assert saved == 2, saved
    expected, got = _val_losses(full_dir), _val_losses(resumed_dir)
    assert sorted(expected) == [0, 1, 2, 3, 4] and sorted(got) == [3, 4]
    for epoch in got:
        assert got[epoch] == pytest.approx(expected[epoch], rel=1e-6, abs=0), (expected, got)
