"""Packaging and the demo: the configs ship inside the package (a non-editable install finds
them), ``nequip-sus2 demo`` options and errors, the demo's output filter, and the Makefile's
install stamps (which PyTorch build, which extras)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from nequip_sus2 import demo
from nequip_sus2.cli import main

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_CONFIGS = ROOT / "nequip_sus2" / "configs"


def _files(folder: Path, patterns: tuple[str, ...]) -> set[str]:
    """Paths (relative to the repository root) of the files matching ``patterns``."""
    return {p.relative_to(ROOT).as_posix() for pattern in patterns for p in folder.glob(pattern)}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------------------------
# the configs folder
# ----------------------------------------------------------------------------------------------


def test_root_configs_is_the_package_configs():
    """``nequip-train -cp $(pwd)/configs`` at the repository root reads the shipped files."""
    assert (ROOT / "configs").resolve() == PACKAGE_CONFIGS.resolve()
    assert (ROOT / "configs" / "tutorial.yaml").is_file()
    assert demo.config_dir().resolve() == PACKAGE_CONFIGS.resolve()


def test_every_config_composes_from_the_package_folder():
    """The defaults lists of the configs (tutorial_prefit -> tutorial, benchmarks/* ->
    alloy_common, ...) resolve inside the shipped folder."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    names = sorted(
        p.relative_to(PACKAGE_CONFIGS).with_suffix("").as_posix()
        for p in PACKAGE_CONFIGS.rglob("*.yaml")
    )
    assert "tutorial" in names and "benchmarks/alloy_common" in names
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(PACKAGE_CONFIGS), version_base=None):
            for name in names:
                cfg = compose(config_name=name)
                assert "data" in cfg or "training_module" in cfg, name
    finally:
        GlobalHydra.instance().clear()


def test_every_training_config_writes_last_ckpt_at_every_validation():
    """Resuming from last.ckpt continues from the latest state: each config with checkpoints has
    a ModelCheckpoint without a monitor writing last.ckpt at every validation (Lightning 2.6's
    ``save_last`` on the best checkpoint writes only together with a new best)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    target = "lightning.pytorch.callbacks.ModelCheckpoint"
    checked = []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(PACKAGE_CONFIGS), version_base=None):
            for path in sorted(PACKAGE_CONFIGS.rglob("*.yaml")):
                name = path.relative_to(PACKAGE_CONFIGS).with_suffix("").as_posix()
                cfg = compose(config_name=name)
                callbacks = cfg.get("trainer", {}).get("callbacks") or []
                ckpts = [c for c in callbacks if c.get("_target_") == target]
                if not ckpts:
                    continue
                checked.append(name)
                last = [c for c in ckpts if c.get("filename") == "last"]
                assert len(last) == 1 and last[0].get("monitor") is None, name
                assert last[0].get("enable_version_counter") is False, name
                # save_last only where it writes the same file (a run without validation)
                assert [c for c in ckpts if c.get("save_last")] == last, name
                assert any(c.get("filename") == "best" and c.get("monitor") for c in ckpts), name
    finally:
        GlobalHydra.instance().clear()
    assert {"tutorial", "mlearn", "alloy_lbfgs", "benchmarks/mlearn_sus2_lbfgs"} <= set(checked)


# ----------------------------------------------------------------------------------------------
# nequip-sus2 demo: options and errors
# ----------------------------------------------------------------------------------------------


def test_demo_help_has_example(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "-o DIR, --output DIR" in out
    assert "Example: nequip-sus2 demo -o" in out


@pytest.mark.parametrize("flag", ["-o", "--output", "--out"])
def test_demo_dry_run_output_spellings(flag, tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run_cli(
        capsys, "demo", flag, out_dir, "--dry-run", "--epochs", "3", "--structures", "40"
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"config: {PACKAGE_CONFIGS.resolve() / 'tutorial.yaml'}"
    train = next(line for line in lines if line.startswith("[2/5]"))
    assert f"-cp {PACKAGE_CONFIGS.resolve()} -cn tutorial.yaml" in train
    assert f"data_file={out_dir.resolve() / 'emt_alloy.xyz'}" in train
    assert train.endswith("max_epochs=3")
    assert "--n 40 " in next(line for line in lines if line.startswith("[1/5]"))
    compile_ = next(line for line in lines if line.startswith("[4/5]"))
    assert f"{out_dir.resolve() / 'sus2_tutorial.nequip.pt2'} --mode aotinductor" in compile_
    assert not out_dir.exists()  # a dry run writes nothing


def test_demo_print_config_dir(capsys):
    code, out, _ = run_cli(capsys, "demo", "--print-config-dir")
    assert code == 0
    assert out.strip() == str(PACKAGE_CONFIGS.resolve())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--structures", "5"], "argument --structures: must be at least 20, got 5"),
        (["--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
        (["--nve-steps", "x"], "argument --nve-steps: expected an integer, got 'x'"),
        (["--temperature", "-3"], "argument --temperature: must be positive, got -3"),
    ],
)
def test_demo_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", *args, "--dry-run"])
    assert e.value.code == 2
    assert f"nequip-sus2 demo: error: {message}" in capsys.readouterr().err


def test_demo_output_is_a_file(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("x")
    code, out, err = run_cli(capsys, "demo", "-o", target)
    assert code == 2
    assert err.strip() == f"nequip-sus2 demo: error: -o {target}: exists and is not a folder"
    assert out == ""
    assert target.read_text() == "x"


# ----------------------------------------------------------------------------------------------
# the demo's terminal output: warnings go to the log only, known harmless messages become notes
# ----------------------------------------------------------------------------------------------

_NOISY = r"""
import sys, warnings
print("epoch 1/2")
sys.stdout.write("progress 50%\r")
sys.stdout.write("progress 100%\n")
sys.stdout.flush()
warnings.warn("something deprecated", FutureWarning)
sys.stderr.flush()
print("W1206 08:27:47.911000 5746 torch/_inductor/ir.py:9214] aten._linalg_det.default is "
      "missing a c-shim implementation, using proxy executor as fallback", flush=True)
print("W1206 08:27:48.911000 5746 torch/_inductor/ir.py:9214] aten._linalg_det.default is "
      "missing a c-shim implementation, using proxy executor as fallback", flush=True)
print("W1206 08:27:49.000000 5746 torch/_inductor/ir.py:9214] aten.foo.default is missing a "
      "c-shim implementation", flush=True)
print("done", flush=True)
"""


def test_run_filters_warnings_and_notes_harmless_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "_NOTES", demo._Notes())
    script = tmp_path / "noisy.py"  # a file, so that Python prints the source line of a warning
    script.write_text(_NOISY)
    log = tmp_path / "cmd.log"
    demo._run([sys.executable, str(script)], log)
    out = capsys.readouterr().out
    body = out.split("\n", 1)[1]  # after the "$ command" line
    assert "epoch 1/2\n" in body
    assert "progress 50%\rprogress 100%\n" in body  # the bar redraws in place
    assert "something deprecated" not in body
    assert "warnings.warn" not in body  # nor the source line printed under the warning
    assert body.count("note: Inductor's 'aten._linalg_det.default is missing a c-shim") == 1
    assert "aten.foo.default is missing a c-shim implementation" in body  # unknown: shown
    assert body.endswith("done\n")
    text = log.read_text()
    assert "FutureWarning: something deprecated" in text
    assert 'warnings.warn("something deprecated", FutureWarning)' in text
    assert text.count("aten._linalg_det.default is missing a c-shim implementation") == 2


def test_run_failure_names_the_log(tmp_path, capsys):
    log = tmp_path / "fail.log"
    with pytest.raises(SystemExit, match=f"command failed \\(exit 3\\); full log: {log}"):
        demo._run([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], log)
    assert "boom" in log.read_text()


def test_outdated_pt2_warning_becomes_a_note(capsys, caplog, monkeypatch):
    monkeypatch.setattr(demo, "_NOTES", demo._Notes())
    logger = logging.getLogger("torch._inductor.package.package")
    with caplog.at_level(logging.WARNING, logger=logger.name), demo._quiet_pt2_loader():
        logger.warning("Loading outdated pt2 file. Please regenerate your package.")
        logger.warning("Model model not found in package")
    assert [r.getMessage() for r in caplog.records] == ["Model model not found in package"]
    assert "note: PyTorch's 'Loading outdated pt2 file' warning is harmless" in (
        capsys.readouterr().out
    )
    # outside the loader the filter is gone
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Loading outdated pt2 file. Please regenerate your package.")
    assert len(caplog.records) == 1


# ----------------------------------------------------------------------------------------------
# a built wheel: configs and C++ sources inside, the demo finds its config when installed
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_wheel_ships_configs_and_sources_and_demo_finds_them(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "nequip_sus2",
        src / "nequip_sus2",
        ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info"),
    )
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(wheels), str(src)],
        check=True, cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    (wheel,) = wheels.glob("nequip_sus2-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "nequip-sus2 = nequip_sus2.cli:main" in z.read(entry_points).decode()
    expected = (
        _files(PACKAGE_CONFIGS, ("*.yaml", "benchmarks/*.yaml"))
        | _files(ROOT / "nequip_sus2" / "lammps" / "src", ("*.cpp", "*.h"))
        | _files(ROOT / "nequip_sus2" / "kernels" / "src", ("*.cpp",))
    )
    assert "nequip_sus2/configs/tutorial.yaml" in expected
    assert "nequip_sus2/lammps/src/pair_sus2.cpp" in expected
    assert "nequip_sus2/kernels/src/contraction.cpp" in expected
    assert expected - names == set()

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
         str(wheel)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    # the installed copy comes before the editable checkout; cwd is not the repository
    env = {**os.environ, "PYTHONPATH": str(target)}
    work = tmp_path / "work"
    work.mkdir()

    def python(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, *args], cwd=work, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    installed = target / "nequip_sus2"
    assert python("-c", "import nequip_sus2; print(nequip_sus2.__file__)").strip() == str(
        installed / "__init__.py"
    )
    assert python("-m", "nequip_sus2.demo", "--print-config-dir").strip() == str(
        installed / "configs"
    )
    out = python("-m", "nequip_sus2.demo", "--dry-run", "-o", str(work / "demo"))
    assert out.splitlines()[0] == f"config: {installed / 'configs' / 'tutorial.yaml'}"
    assert f"-cp {installed / 'configs'} -cn tutorial.yaml" in out
    assert not (work / "demo").exists()
    script = subprocess.run(
        [str(target / "bin" / "nequip-sus2"), "demo", "--print-config-dir"],
        cwd=work, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert script.returncode == 0, script.stderr
    assert script.stdout.strip() == str(installed / "configs")
    assert (installed / "configs" / "benchmarks" / "alloy_common.yaml").is_file()


# ----------------------------------------------------------------------------------------------
# Makefile: the install stamps follow TORCH; demo installs the package alone, test the extra
# ----------------------------------------------------------------------------------------------

pytestmark_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def _make_dry_run(venv: Path, *args: str) -> subprocess.CompletedProcess:
    # not the settings of a calling make (`make test TORCH=cuda`) nor of the environment
    drop = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "TORCH", "VENV", "OUT", "PYTHON"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return subprocess.run(
        ["make", "-n", "--no-print-directory", "-C", str(ROOT), f"VENV={venv}", *args],
        capture_output=True,
        text=True,
        env=env,
    )


def _fake_venv(tmp_path: Path, *stamps: str) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\n")
    for stamp in stamps:
        (venv / stamp).touch()
    return venv


@pytestmark_make
def test_make_fresh_clone_demo_installs_package_without_test_extra(tmp_path):
    proc = _make_dry_run(tmp_path / "none", "demo")
    assert proc.returncode == 0, proc.stderr
    plan = proc.stdout
    assert "-m venv" in plan
    assert '"torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu' in plan
    assert "pip install -q -e .\n" in plan
    assert ".[test]" not in plan
    assert plan.rstrip().endswith("nequip-sus2 demo -o demo_output")


@pytestmark_make
def test_make_test_installs_the_test_extra(tmp_path):
    proc = _make_dry_run(_fake_venv(tmp_path, ".torch-cpu", ".installed-demo"), "test")
    assert proc.returncode == 0, proc.stderr
    assert 'pip install -q -e ".[test]"' in proc.stdout
    assert "torch==" not in proc.stdout  # torch stays


@pytestmark_make
def test_make_demo_after_test_reinstalls_torch_only_when_torch_changes(tmp_path):
    venv = _fake_venv(tmp_path, ".torch-cpu", ".installed-demo", ".installed-test")
    same = _make_dry_run(venv, "demo")
    assert same.returncode == 0, same.stderr
    assert "pip" not in same.stdout  # nothing to install
    cuda = _make_dry_run(venv, "demo", "TORCH=cuda")
    assert cuda.returncode == 0, cuda.stderr
    assert 'pip install -q "torch==2.13.0"' in cuda.stdout
    assert "uninstall -q -y torch" in cuda.stdout  # a CPU build is removed first
    assert "touch " + str(venv / ".torch-cuda") in cuda.stdout
    assert "pip install -q -e" not in cuda.stdout  # the package is not reinstalled


@pytestmark_make
def test_make_rejects_unknown_torch(tmp_path):
    proc = _make_dry_run(tmp_path / "none", "demo", "TORCH=rocm")
    assert proc.returncode == 2
    assert "TORCH must be cpu or cuda, not 'rocm'" in proc.stderr
