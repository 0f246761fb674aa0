"""Active learning with the extrapolation grade: ``nequip-sus2 learn``.

Each iteration of the loop

1. trains a model with ``nequip-train`` on the current training set (from scratch with the
   given config, or, with ``finetune_config``, starting from the previous iteration's best
   checkpoint);
2. builds its MaxVol active set on that training set
   (:func:`nequip_sus2.graded_model.write_model_with_grade`);
3. runs Langevin MD in ASE with the graded model (:class:`nequip_sus2.ase.SUS2Calculator`, eager)
   from a few starting structures; every step whose largest grade exceeds ``select`` is kept as a
   candidate, and a trajectory stops early when the grade exceeds ``break`` (MLIP-2's
   thresholds);
4. picks the candidates that extend the active set (:func:`nequip_sus2.active_set.select_add`),
   labels them with an ASE calculator (the labeller: EMT in the example, the user's DFT code in
   practice) and appends them to the training set.

The loop stops when a whole iteration's MD stays at or below ``select`` (converged) or after
``max_iterations`` iterations. After every finished iteration the loop state (settings, files,
statistics) is written to ``learn_state.json`` in the output folder; running again with the same
folder resumes after the last finished iteration (and continues a finished run when
``max_iterations`` is raised). At the end ``learning_curve.png`` (largest grade and errors per
iteration) and ``summary.md`` (the same as a table) are written.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from ._console import one_line
from ._files import replacing
from .package import load_model

__all__ = [
    "LearnError",
    "LearnSettings",
    "STATE_FILE",
    "TrainingFailed",
    "add_arguments",
    "label_structures",
    "load_labeller",
    "run_learning",
    "select_candidates",
]

STATE_FILE = "learn_state.json"
PLOT_FILE = "learning_curve.png"
SUMMARY_FILE = "summary.md"
_STATE_VERSION = 1
_PROG = "nequip-sus2 learn"


class LearnError(ValueError):
    """Bad input to the loop (reported as one line, exit status 2)."""


class TrainingFailed(RuntimeError):
    """``nequip-train`` (or another step of an iteration) failed; the message names the log."""


# ----------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------


@dataclass
class LearnSettings:
    """Everything the loop needs (the command line's options, one field each).

    Paths may be relative to the current folder. ``break_threshold`` is the command line's
    ``--break``.
    """

    train_data: str
    config: str
    labeller: str
    output: str
    data_key: str = "data_file"
    train_overrides: list[str] = field(default_factory=list)
    finetune_config: str | None = None
    checkpoint_key: str = "checkpoint_file"
    type_names: list[str] | None = None
    md_start: str | None = None
    md_structures: int = 2
    md_temperature: float = 1200.0
    md_steps: int = 300
    md_timestep: float = 2.0
    md_friction: float = 0.02
    select: float = 2.0
    break_threshold: float = 10.0
    max_iterations: int = 5
    max_select: int | None = None
    test_data: str | None = None
    tol: float = 1e-3
    seed: int = 0

    def check(self) -> None:
        """Raise :class:`LearnError` (one line, naming the option) for inconsistent values."""
        if not self.select > 0 or not math.isfinite(self.select):
            raise LearnError(f"argument --select: must be a positive number, got {self.select}")
        if not math.isfinite(self.break_threshold):
            raise LearnError(f"argument --break: must be finite, got {self.break_threshold}")
        if self.select >= self.break_threshold:
            raise LearnError(
                f"argument --select: the select threshold ({self.select:g}) must be below the "
                f"break threshold ({self.break_threshold:g})"
            )
        positive = {
            "--md-steps": self.md_steps,
            "--md-structures": self.md_structures,
            "--md-temperature": self.md_temperature,
            "--md-timestep": self.md_timestep,
            "--max-iterations": self.max_iterations,
            "--tol": self.tol,
        }
        if self.max_select is not None:
            positive["--max-select"] = self.max_select
        for name, value in positive.items():
            if not (value > 0 and math.isfinite(value)):
                raise LearnError(f"argument {name}: must be positive, got {value}")
        if not (self.md_friction >= 0 and math.isfinite(self.md_friction)):
            raise LearnError(f"argument --md-friction: must be >= 0, got {self.md_friction}")
        for name, path in (
            ("TRAIN_DATA", self.train_data),
            ("--config", self.config),
            ("--finetune-config", self.finetune_config),
            ("--md-start", self.md_start),
            ("--test-data", self.test_data),
        ):
            if path is not None and not os.path.isfile(path):
                raise LearnError(f"{path}: no such file ({name})")
        for name, path in (("--config", self.config), ("--finetune-config", self.finetune_config)):
            if path is not None and not path.endswith((".yaml", ".yml")):
                raise LearnError(f"{path}: {name} must be a nequip-train YAML config")
        if self.train_data.endswith(".cfg") and not self.type_names:
            raise LearnError(
                f"{self.train_data}: a .cfg training set needs --type-names (the species of its "
                "type indices)"
            )
        out = Path(self.output)
        if out.exists() and not out.is_dir():
            raise LearnError(f"-o {self.output}: exists and is not a folder")


# ----------------------------------------------------------------------------------------------
# labeller
# ----------------------------------------------------------------------------------------------


def load_labeller(spec: str | Callable[[], Any] | Any) -> Callable[[], Any]:
    """A factory of ASE calculators from ``spec``.

    ``spec`` is ``"module:attribute"`` (e.g. ``"ase.calculators.emt:EMT"``; the attribute may be
    dotted), a callable returning a calculator, or a calculator (used as it is). The factory is
    called once to check that it gives something with ``get_potential_energy``; a bad spec
    raises :class:`LearnError` naming it.
    """
    if not isinstance(spec, (str, type)) and hasattr(spec, "get_potential_energy"):
        calc = spec
        return lambda: calc
    if isinstance(spec, str):
        module_name, sep, attr = spec.partition(":")
        if not sep or not module_name or not attr:
            raise LearnError(
                f"argument --labeller: expected MODULE:FACTORY (e.g. ase.calculators.emt:EMT), "
                f"got {spec!r}"
            )
        try:
            obj: Any = importlib.import_module(module_name)
        except Exception as e:  # ImportError, or any error raised while importing it
            raise LearnError(
                f"argument --labeller: cannot import module {module_name!r} ({one_line(e)})"
            ) from e
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise LearnError(f"argument --labeller: {module_name!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
        factory = obj
    else:
        factory = spec
    if not callable(factory):
        raise LearnError(f"argument --labeller: {spec!r} is not callable")
    try:
        calc = factory()
    except Exception as e:
        raise LearnError(
            f"argument --labeller: {spec!r} failed to make a calculator ({one_line(e)})"
        ) from e
    if not hasattr(calc, "get_potential_energy"):
        raise LearnError(
            f"argument --labeller: {spec!r} returned {type(calc).__name__}, not an ASE calculator"
        )
    return factory


def label_structures(structures: Sequence[Any], factory: Callable[[], Any]) -> list:
    """Copies of ``structures`` (``ase.Atoms``) labelled by a calculator from ``factory``:
    energy, forces and, for fully periodic cells, stress, kept in a ``SinglePointCalculator``.
    ``info`` is kept."""
    from ase.calculators.singlepoint import SinglePointCalculator

    calc = factory()
    out = []
    for index, atoms in enumerate(structures):
        a = atoms.copy()
        a.calc = calc
        try:
            results = {"energy": a.get_potential_energy(), "forces": a.get_forces()}
            if a.pbc.all():
                results["stress"] = a.get_stress()
        except Exception as e:
            raise TrainingFailed(
                f"the labeller failed on selected structure {index} ({one_line(e)})"
            ) from e
        a.calc = SinglePointCalculator(a, **results)
        out.append(a)
    return out


# ----------------------------------------------------------------------------------------------
# one iteration's steps
# ----------------------------------------------------------------------------------------------


def _read_atoms(path: str | os.PathLike, what: str) -> list:
    from ase.io import read

    try:
        structures = list(read(os.fspath(path), index=":"))
    except Exception as e:  # ASE's readers raise anything on a malformed file
        raise LearnError(f"{path}: cannot read {what} ({one_line(e)})") from e
    if not structures:
        raise LearnError(f"{path}: no structures in the file ({what})")
    return structures


def _write_atoms(path: Path, structures: Sequence[Any]) -> None:
    """extxyz, complete or not at all."""
    from ase.io import write

    with replacing(path) as tmp:
        write(tmp, list(structures), format="extxyz")


_ABSENT = object()


def _compose_check(config: str, data_key: str, overrides: Sequence[str], extra: Sequence[str]):
    """Compose ``config`` with Hydra as ``nequip-train`` will (without resolving it) and check
    that ``data_key`` (and the keys of ``extra``) exist: a one-line :class:`LearnError` before
    any training otherwise."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    path = Path(config).resolve()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(path.parent), version_base=None):
            cfg = compose(config_name=path.name, overrides=list(overrides))
    except Exception as e:  # hydra/omegaconf: a broken file or override
        raise LearnError(f"{config}: cannot compose the config ({one_line(e)})") from e
    finally:
        GlobalHydra.instance().clear()
    tree = OmegaConf.to_container(cfg, resolve=False)
    for key, option in ((data_key, "--data-key"), *((k, "--checkpoint-key") for k in extra)):
        node: Any = tree
        for part in key.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is _ABSENT:
            raise LearnError(
                f"{config}: no key {key!r} in the config (the key {option} names, which the "
                "loop sets for every iteration)"
            )


def _train(
    config: str,
    overrides: Sequence[str],
    run_dir: Path,
    log: Path,
) -> Path:
    """``nequip-train`` in a subprocess, all output to ``log``; returns the best checkpoint."""
    path = Path(config).resolve()
    cmd = [
        sys.executable, "-m", "nequip.scripts.train", "-cp", str(path.parent), "-cn", path.name,
        f"hydra.run.dir={run_dir}", *overrides,
    ]  # fmt: skip
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        last = tail[-1].strip() if tail else ""
        raise TrainingFailed(
            f"nequip-train failed (exit {proc.returncode}): {last[:300]} (full log: {log})"
        )
    for name in ("best.ckpt", "last.ckpt"):
        if (run_dir / name).is_file():
            return run_dir / name
    raise TrainingFailed(
        f"nequip-train wrote no best.ckpt or last.ckpt in {run_dir}: the config needs a "
        "ModelCheckpoint callback (dirpath ${hydra:runtime.output_dir}, filename best)"
    )


def _thermalize(atoms, temperature: float, rng: np.random.Generator) -> None:
    from ase.md import velocitydistribution

    # ASE >= 3.29 renamed MaxwellBoltzmannDistribution (deprecated) to thermalize_momenta
    thermalize = getattr(
        velocitydistribution,
        "thermalize_momenta",
        velocitydistribution.MaxwellBoltzmannDistribution,
    )
    thermalize(atoms, temperature_K=temperature, rng=rng)


def run_md(
    calc,
    starts: Sequence[Any],
    settings: LearnSettings,
    candidates_path: Path,
    seed: Sequence[int],
) -> dict[str, Any]:
    """Langevin MD with ``calc`` (a :class:`SUS2Calculator` with a grade) from every structure
    of ``starts``: structures above ``select`` are appended to ``candidates_path``; a trajectory
    stops early above ``break``. Returns the MD statistics."""
    from ase import units
    from ase.md.langevin import Langevin

    from .ase import ExtrapolationError, ExtrapolationMonitor

    max_grades, steps, stopped = [], 0, 0
    num_saved = 0
    for index, start in enumerate(starts):
        atoms = start.copy()
        atoms.calc = calc
        rng = np.random.default_rng([*seed, index])
        _thermalize(atoms, settings.md_temperature, rng)
        monitor = ExtrapolationMonitor(
            atoms,
            save_path=candidates_path,
            save_threshold=settings.select,
            stop_threshold=settings.break_threshold,
        )
        dyn = Langevin(
            atoms,
            settings.md_timestep * units.fs,
            temperature_K=settings.md_temperature,
            friction=settings.md_friction / units.fs,
            rng=rng,
            fixcm=False,
        )
        dyn.attach(monitor, interval=1)
        try:
            dyn.run(settings.md_steps)  # the observers see the starting structure too
        except ExtrapolationError:
            stopped += 1
        steps += max(len(monitor.history) - 1, 0)
        num_saved += monitor.num_saved
        max_grades.append(max(monitor.history) if monitor.history else 0.0)
    return {
        "md_runs": len(starts),
        "md_steps": steps,
        "md_stopped": stopped,
        "max_grade": float(max(max_grades)),
        "max_grade_per_run": [float(g) for g in max_grades],
        "candidates": num_saved,
    }


def select_candidates(
    model, candidates: Sequence[Any], tol: float = 1e-3, max_select: int | None = None
) -> tuple[list[int], np.ndarray]:
    """Indices of the ``candidates`` that extend ``model``'s active set (MaxVol,
    :func:`nequip_sus2.active_set.select_add`), at most ``max_select`` of them (those with the
    largest grade), and the largest grade of every candidate."""
    from .active_set import select_add  # heavy: torch, nequip

    if not candidates:
        return [], np.zeros(0)
    chosen, gamma = select_add(model, list(candidates), tol=tol)
    if max_select is not None and len(chosen) > max_select:
        chosen = sorted(sorted(chosen, key=lambda i: -gamma[i])[:max_select])
    return list(chosen), gamma


def _errors(predicted: Sequence[Any], reference: Sequence[Any]) -> dict[str, float]:
    """Energy MAE per atom (eV/atom) and force MAE (eV/A) of ``predicted`` against
    ``reference`` (both ``ase.Atoms`` with energies and forces)."""
    de, df = [], []
    for p, r in zip(predicted, reference, strict=True):
        de.append(abs(p.get_potential_energy() - r.get_potential_energy()) / len(r))
        df.append(np.abs(p.get_forces() - r.get_forces()).ravel())
    return {
        "energy_mae": float(np.mean(de)),
        "force_mae": float(np.mean(np.concatenate(df))),
    }


def _test_errors(calc, test: Sequence[Any]) -> dict[str, float]:
    """Errors and the largest grade of ``calc``'s model on labelled ``test`` structures."""
    from ase.calculators.singlepoint import SinglePointCalculator

    predicted, grades = [], []
    for atoms in test:
        a = atoms.copy()
        a.calc = calc
        energy, forces = a.get_potential_energy(), a.get_forces()
        grades.append(float(calc.results.get("max_extrapolation_grade", np.nan)))
        a.calc = SinglePointCalculator(a, energy=energy, forces=forces)
        predicted.append(a)
    errors = _errors(predicted, test)
    return {
        "test_energy_mae": errors["energy_mae"],
        "test_force_mae": errors["force_mae"],
        "test_max_grade": float(max(grades)),
    }


# ----------------------------------------------------------------------------------------------
# state
# ----------------------------------------------------------------------------------------------


def _read_state(path: Path) -> dict | None:
    """The loop state in ``path`` (``None`` if absent); a :class:`LearnError` for a file that
    is not one."""
    if not path.exists():
        return None
    hint = "; delete it to start over"
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LearnError(f"{path}: not a valid loop state ({one_line(e)}){hint}") from e
    if (
        not isinstance(state, dict)
        or state.get("version") != _STATE_VERSION
        or not isinstance(state.get("iterations"), list)
        or not isinstance(state.get("train_data"), str)
        or not isinstance(state.get("initial_data"), str)
        or not all(
            isinstance(it, dict) and {"next_train_data", "checkpoint", "converged"} <= it.keys()
            for it in state["iterations"]
        )
    ):
        raise LearnError(f"{path}: not a valid loop state (missing or wrong fields){hint}")
    needed = [state["initial_data"]] + [it["next_train_data"] for it in state["iterations"]]
    for name in needed:
        if name is not None and not (path.parent / name).is_file():
            raise LearnError(
                f"{path}: not a valid loop state (its training set {path.parent / name} is "
                f"missing){hint}"
            )
    return state


def _write_state(path: Path, state: dict) -> None:
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(state, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------


def _relative(path: Path, out: Path) -> str:
    """``path`` relative to the output folder ``out`` (the state stays valid when the folder
    moves)."""
    return os.path.relpath(Path(path).resolve(), Path(out).resolve())


def _say(text: str) -> None:
    print(text, flush=True)


def _initial_data(settings: LearnSettings, out: Path) -> Path:
    """The training set as extxyz in the output folder (``.cfg`` converted)."""
    target = out / "train_data_001.xyz"
    if settings.train_data.endswith(".cfg"):
        from .io.convert import cfg_to_extxyz

        cfg_to_extxyz(settings.train_data, target, list(settings.type_names or []))
    else:
        _write_atoms(target, _read_atoms(settings.train_data, "the training set"))
    return target


def _starts(settings: LearnSettings, train: Sequence[Any]) -> list:
    if settings.md_start is not None:
        return _read_atoms(settings.md_start, "the MD starting structures")
    rng = np.random.default_rng(settings.seed)
    count = min(settings.md_structures, len(train))
    return [train[i].copy() for i in sorted(rng.choice(len(train), size=count, replace=False))]


def _iteration(
    k: int,
    settings: LearnSettings,
    out: Path,
    data: Path,
    previous_checkpoint: str | None,
    starts: Sequence[Any],
    test: Sequence[Any] | None,
    labeller: Callable[[], Any],
) -> dict[str, Any]:
    from .ase import SUS2Calculator
    from .graded_model import write_model_with_grade  # heavy: torch, nequip

    t0 = time.perf_counter()
    folder = out / f"iter_{k:03d}"
    if folder.exists():  # left by an interrupted run: start the iteration again
        shutil.rmtree(folder)
    folder.mkdir()
    train = _read_atoms(data, "the training set")
    finetune = settings.finetune_config is not None and previous_checkpoint is not None
    config = settings.finetune_config if finetune else settings.config
    overrides = [f"{settings.data_key}={data.resolve()}", *settings.train_overrides]
    if finetune:
        overrides.append(f"{settings.checkpoint_key}={previous_checkpoint}")
    how = "fine-tuning the previous model" if finetune else "training"
    _say(f"\n[iteration {k}] {how} on {len(train)} structures ({folder / 'train.log'})")
    checkpoint = _train(config, overrides, (folder / "train").resolve(), folder / "train.log")

    graded = folder / "model_grade.ckpt"
    active = write_model_with_grade(checkpoint, train, graded, tol=settings.tol)
    counts = zip(active.type_names, active.counts, strict=True)
    _say("  active set built on " + ", ".join(f"{c} {n}" for n, c in counts) + " environments")
    calc = SUS2Calculator._from_saved_model(str(graded), chemical_species_to_atom_type_map=True)

    record: dict[str, Any] = {
        "iteration": k,
        "train_data": _relative(data, out),
        "train_structures": len(train),
        "config": str(Path(config).resolve()),
        "checkpoint": _relative(checkpoint, out),
        "graded_model": _relative(graded, out),
    }
    if test is not None:
        record.update(_test_errors(calc, test))
        _say(
            f"  test set: energy MAE {1000 * record['test_energy_mae']:.2f} meV/atom, force MAE "
            f"{1000 * record['test_force_mae']:.0f} meV/A, max grade {record['test_max_grade']:.3g}"
        )

    candidates_path = folder / "candidates.xyz"
    md = run_md(calc, starts, settings, candidates_path, seed=(settings.seed, k))
    record.update(md)
    _say(
        f"  MD: {md['md_runs']} run(s), {md['md_steps']} steps at {settings.md_temperature:g} K: "
        f"max grade {md['max_grade']:.3g}, {md['candidates']} structures above "
        f"{settings.select:g}, {md['md_stopped']} run(s) stopped above {settings.break_threshold:g}"
    )
    record["converged"] = md["candidates"] == 0
    chosen: list[int] = []
    if md["candidates"]:
        candidates = _read_atoms(candidates_path, "the MD candidates")
        model = load_model(graded)
        chosen, _ = select_candidates(model, candidates, settings.tol, settings.max_select)
        selected = label_structures([candidates[i] for i in chosen], labeller)
        for i, a in zip(chosen, selected, strict=True):
            a.info["max_extrapolation_grade"] = candidates[i].info.get("max_extrapolation_grade")
            a.info["learn_iteration"] = k
        _write_atoms(folder / "selected.xyz", selected)
        errors = _errors([candidates[i] for i in chosen], selected)
        record["selected_energy_mae"] = errors["energy_mae"]
        record["selected_force_mae"] = errors["force_mae"]
        _say(
            f"  selected {len(chosen)} of {md['candidates']} candidates (MaxVol); model error on "
            f"them: energy {1000 * errors['energy_mae']:.1f} meV/atom, force "
            f"{1000 * errors['force_mae']:.0f} meV/A"
        )
        next_data = out / f"train_data_{k + 1:03d}.xyz"
        _write_atoms(next_data, [*train, *selected])
        record["next_train_data"] = _relative(next_data, out)
    else:
        record["next_train_data"] = None
        _say(f"  converged: the MD stayed at or below the select threshold {settings.select:g}")
    record["selected"] = len(chosen)
    record["wall_s"] = time.perf_counter() - t0
    return record


def run_learning(
    settings: LearnSettings, labeller: str | Callable[[], Any] | Any | None = None
) -> dict:
    """Run (or resume) the loop; returns the final state (also in ``learn_state.json``).

    ``labeller``: overrides ``settings.labeller`` with a calculator factory or calculator (see
    :func:`load_labeller`). Raises :class:`LearnError` for bad input (before anything is
    trained) and :class:`TrainingFailed` when a step of an iteration fails.
    """
    settings.check()
    factory = load_labeller(settings.labeller if labeller is None else labeller)
    out = Path(settings.output)
    state_path = out / STATE_FILE
    state = _read_state(state_path)
    extra = [settings.checkpoint_key] if settings.finetune_config else []
    _compose_check(settings.config, settings.data_key, settings.train_overrides, [])
    if settings.finetune_config:
        _compose_check(settings.finetune_config, settings.data_key, settings.train_overrides, extra)
    test = None
    if settings.test_data is not None:
        test = _read_atoms(settings.test_data, "the test set")
        for i, a in enumerate(test):
            try:
                a.get_potential_energy(), a.get_forces()
            except Exception as e:
                raise LearnError(
                    f"{settings.test_data}: structure {i} has no energy and forces"
                ) from e
    source = str(Path(settings.train_data).resolve())
    if state is not None and state["train_data"] != source:
        raise LearnError(
            f"{state_path}: this folder holds a loop started from {state['train_data']}, not "
            f"{source}; use another output folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    if state is None:
        data = _initial_data(settings, out)
        state = {"version": _STATE_VERSION, "train_data": source, "iterations": []}
        state["initial_data"] = _relative(data, out)
        state["status"] = "running"
        _write_state(state_path, state)
    iterations = state["iterations"]
    state["settings"] = {f.name: getattr(settings, f.name) for f in fields(settings)}
    starts = _starts(settings, _read_atoms(out / state["initial_data"], "the training set"))

    done = len(iterations)
    if done and iterations[-1]["next_train_data"] is None:
        _say(f"{state_path}: converged in iteration {done}; nothing to do")
    elif done >= settings.max_iterations:
        _say(
            f"{state_path}: {done} iteration(s) done (--max-iterations {settings.max_iterations});"
            " nothing to do"
        )
    elif done:
        _say(f"{state_path}: resuming after iteration {done}")
    while (
        len(iterations) < settings.max_iterations
        and not (iterations and iterations[-1]["next_train_data"] is None)
    ):  # fmt: skip
        k = len(iterations) + 1
        data = out / (iterations[-1]["next_train_data"] if iterations else state["initial_data"])
        previous = str((out / iterations[-1]["checkpoint"]).resolve()) if iterations else None
        record = _iteration(k, settings, out, data, previous, starts, test, factory)
        iterations.append(record)
        state["status"] = "converged" if record["converged"] else "running"
        _write_state(state_path, state)
    if iterations and iterations[-1]["converged"]:
        state["status"] = "converged"
    elif len(iterations) >= settings.max_iterations:
        state["status"] = "max_iterations"
    _write_state(state_path, state)
    _finish(state, settings, out)
    return state


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def summary_table(iterations: Sequence[dict]) -> str:
    """The per-iteration statistics as a Markdown table (energies in meV/atom, forces in
    meV/A)."""
    has_test = any("test_energy_mae" in it for it in iterations)
    head = ["iteration", "training structures", "MD steps", "max grade", "stopped", "selected"]
    head += ["error on selected E / F"]
    if has_test:
        head += ["test E MAE", "test F MAE", "test max grade"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for it in iterations:
        if "selected_energy_mae" in it:
            sel = f"{1000 * it['selected_energy_mae']:.1f} / {1000 * it['selected_force_mae']:.0f}"
        else:
            sel = "-"
        row = [
            str(it["iteration"]),
            str(it["train_structures"]),
            str(it["md_steps"]),
            f"{it['max_grade']:.3g}",
            f"{it['md_stopped']}/{it['md_runs']}",
            str(it["selected"]),
            sel,
        ]
        if has_test:
            row += [
                f"{1000 * it['test_energy_mae']:.2f}",
                f"{1000 * it['test_force_mae']:.0f}",
                f"{it['test_max_grade']:.3g}",
            ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_learning_curve(
    iterations: Sequence[dict], select: float, break_threshold: float, path: Path
) -> bool:
    """Largest MD grade and errors per iteration as a PNG; ``False`` (nothing written) when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    k = [it["iteration"] for it in iterations]
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(5.5, 5.5), dpi=90)
    ax1.semilogy(k, [it["max_grade"] for it in iterations], "o-", label="MD (max)")
    if any("test_max_grade" in it for it in iterations):
        ax1.semilogy(k, [it.get("test_max_grade", np.nan) for it in iterations], "s--",
                     label="test set (max)")  # fmt: skip
    ax1.axhline(select, color="tab:orange", ls=":", label=f"select {select:g}")
    ax1.axhline(break_threshold, color="tab:red", ls=":", label=f"break {break_threshold:g}")
    ax1.set_ylabel("extrapolation grade")
    ax1.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax1.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax1.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax1.legend(fontsize=8)
    if any("test_energy_mae" in it for it in iterations):
        energy = [1000 * it["test_energy_mae"] for it in iterations]
        force = [1000 * it["test_force_mae"] for it in iterations]
        what = "test set"
    else:
        energy = [1000 * it.get("selected_energy_mae", np.nan) for it in iterations]
        force = [1000 * it.get("selected_force_mae", np.nan) for it in iterations]
        what = "selected structures"
    ax2.plot(k, energy, "o-", color="tab:blue", label="energy MAE (meV/atom)")
    ax2.set_ylabel("energy MAE (meV/atom)", color="tab:blue")
    ax3 = ax2.twinx()
    ax3.plot(k, force, "s--", color="tab:green", label="force MAE (meV/A)")
    ax3.set_ylabel("force MAE (meV/Å)", color="tab:green")
    ax2.set_xlabel("iteration")
    ax2.set_title(f"error against the labeller on the {what}", fontsize=9)
    ax2.set_xticks(k)
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def _finish(state: dict, settings: LearnSettings, out: Path) -> None:
    iterations = state["iterations"]
    if not iterations:
        return
    table = summary_table(iterations)
    last = iterations[-1]
    if state["status"] == "converged":
        verdict = (
            f"converged in iteration {last['iteration']}: its MD stayed at or below the select "
            f"threshold {settings.select:g}"
        )
    else:
        verdict = (
            f"not converged after {len(iterations)} iteration(s); the structures selected last "
            f"are in {out / last['next_train_data']}: rerun with a larger --max-iterations to "
            "continue"
        )
    text = (
        f"# Active learning: {out}\n\n{verdict}.\n\nFinal model (with the extrapolation grade): "
        f"{last['graded_model']} (in this folder)\n\n{table}\n\nErrors against the labeller: "
        "energy in meV/atom, forces in meV/Å; 'error on selected' is the model's error on the "
        "structures it selected in that iteration, before they were added.\n"
    )
    with replacing(out / SUMMARY_FILE) as tmp:
        tmp.write_text(text)
    _say(f"\n{table}\n\n{verdict}")
    _say(f"final model: {out / last['graded_model']}")
    if plot_learning_curve(iterations, settings.select, settings.break_threshold, out / PLOT_FILE):
        _say(f"wrote {out / SUMMARY_FILE}, {out / PLOT_FILE} and {out / STATE_FILE}")
    else:
        _say(
            f"wrote {out / SUMMARY_FILE} and {out / STATE_FILE} (no plot: matplotlib is not "
            "installed)"
        )


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------

DESCRIPTION = (
    "Active learning with the extrapolation grade (like MLIP-2's loop). Each iteration trains a "
    "model with nequip-train on the current training set, builds its MaxVol active set, runs "
    "Langevin MD in ASE with the grade from a few starting structures (structures above "
    "--select become candidates; a trajectory stops above --break), selects the candidates that "
    "extend the active set (MaxVol), labels them with an ASE calculator and adds them to the "
    "training set. It stops when a whole iteration's MD stays at or below --select, or after "
    "--max-iterations. The state is saved after every iteration in OUT/learn_state.json: run "
    "the same command again to resume. Options may also come from a YAML file (--settings)."
)
EPILOG = (
    "Example: nequip-sus2 learn train.xyz --config config.yaml --labeller "
    "ase.calculators.emt:EMT --md-temperature 1200 --select 2 --break 10 -o learn_output"
)


def _defaults() -> dict[str, Any]:
    """Field name -> default of :class:`LearnSettings` (``None`` for the required ones)."""
    out: dict[str, Any] = {}
    for f in fields(LearnSettings):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = None
    return out


_OPTIONS = _defaults()
_PATH_OPTIONS = ("train_data", "config", "finetune_config", "md_start", "test_data", "output")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``nequip-sus2 learn`` (every default is ``None``: unset options come from
    ``--settings``, then from :class:`LearnSettings`)."""
    d = _OPTIONS
    parser.add_argument(
        "train_data",
        nargs="?",
        metavar="TRAIN_DATA",
        help="initial training set: extxyz (any ASE format) or .cfg (with --type-names)",
    )
    parser.add_argument("-o", "--output", metavar="OUT", help="output folder (required)")
    parser.add_argument(
        "--settings",
        metavar="FILE.yaml",
        help="YAML mapping of option names (as below, without --) to values; paths in it are "
        "relative to its folder; options on the command line win",
    )
    parser.add_argument("--config", metavar="CONFIG.yaml", help="nequip-train config (required)")
    parser.add_argument(
        "--labeller",
        metavar="MODULE:FACTORY",
        help="ASE calculator labelling the selected structures: a function or class called "
        "without arguments (required; e.g. ase.calculators.emt:EMT)",
    )
    parser.add_argument(
        "--data-key",
        metavar="KEY",
        help=f"config key of the training data file, set every iteration (default {d['data_key']})",
    )
    parser.add_argument(
        "--train-overrides",
        nargs="+",
        metavar="KEY=VALUE",
        help="extra Hydra overrides for nequip-train (e.g. max_epochs=20)",
    )
    parser.add_argument(
        "--finetune-config",
        metavar="CONFIG.yaml",
        help="from the second iteration on, train with this config, which starts from the "
        "previous iteration's best checkpoint (default: train from scratch with --config)",
    )
    parser.add_argument(
        "--checkpoint-key",
        metavar="KEY",
        help="key of --finetune-config that receives the previous checkpoint "
        f"(default {d['checkpoint_key']})",
    )
    parser.add_argument(
        "--type-names", nargs="+", metavar="NAME", help="species of .cfg type indices"
    )
    md = parser.add_argument_group("molecular dynamics (ASE Langevin)")
    md.add_argument(
        "--md-start",
        metavar="FILE",
        help="starting structures (default: --md-structures taken from the training set)",
    )
    md.add_argument(
        "--md-structures",
        type=int,
        metavar="N",
        help=f"starting structures taken from the training set (default {d['md_structures']})",
    )
    md.add_argument(
        "--md-temperature",
        type=float,
        metavar="K",
        help=f"temperature in K (default {d['md_temperature']:g})",
    )
    md.add_argument(
        "--md-steps",
        type=int,
        metavar="N",
        help=f"steps per starting structure and iteration (default {d['md_steps']})",
    )
    md.add_argument(
        "--md-timestep", type=float, metavar="FS", help=f"in fs (default {d['md_timestep']:g})"
    )
    md.add_argument(
        "--md-friction",
        type=float,
        metavar="PER_FS",
        help=f"Langevin friction in 1/fs (default {d['md_friction']:g})",
    )
    sel = parser.add_argument_group("selection (MLIP-2 thresholds)")
    sel.add_argument(
        "--select",
        type=float,
        metavar="GAMMA",
        help=f"structures with a larger grade are candidates (default {d['select']:g})",
    )
    sel.add_argument(
        "--break",
        dest="break_threshold",
        type=float,
        metavar="GAMMA",
        help=f"an MD run stops at a larger grade (default {d['break_threshold']:g})",
    )
    sel.add_argument(
        "--max-select",
        type=int,
        metavar="N",
        help="add at most N structures per iteration, those of largest grade (default: all "
        "that MaxVol selects)",
    )
    sel.add_argument("--tol", type=float, help=f"MaxVol tolerance (default {d['tol']:g})")
    parser.add_argument(
        "--max-iterations",
        type=int,
        metavar="N",
        help=f"at most N iterations (default {d['max_iterations']})",
    )
    parser.add_argument(
        "--test-data",
        metavar="FILE",
        help="labelled structures on which every iteration's model is evaluated",
    )
    parser.add_argument("--seed", type=int, help=f"MD random seed (default {d['seed']})")


def _load_settings_file(path: str) -> dict[str, Any]:
    import yaml

    if not os.path.isfile(path):
        raise LearnError(f"{path}: no such file (--settings)")
    try:
        with open(path) as f:
            values = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise LearnError(f"{path}: not valid YAML ({one_line(e)})") from e
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise LearnError(f"{path}: expected a mapping of option names to values")
    base = Path(path).resolve().parent
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name == "break":
            name = "break_threshold"
        if name not in _OPTIONS:
            raise LearnError(f"{path}: unknown option {key!r}")
        if name in _PATH_OPTIONS and isinstance(value, str):
            value = str(base / value)
        out[name] = value
    return out


def settings_from_args(args: argparse.Namespace) -> LearnSettings:
    """:class:`LearnSettings` from parsed :func:`add_arguments` options and ``--settings``."""
    values: dict[str, Any] = {}
    if args.settings is not None:
        values.update(_load_settings_file(args.settings))
    for name in _OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    for name, option in (("train_data", "TRAIN_DATA"), ("config", "--config"),
                         ("labeller", "--labeller"), ("output", "-o/--output")):  # fmt: skip
        if values.get(name) is None:
            raise LearnError(f"the following arguments are required: {option}")
    try:
        settings = LearnSettings(**values)
    except TypeError as e:
        raise LearnError(f"--settings: {one_line(e)}") from e
    for name, default in _OPTIONS.items():
        value = getattr(settings, name)
        kind = int if name == "max_select" else type(default)
        if kind not in (int, float) or (value is None and name == "max_select"):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LearnError(f"--settings: option {name!r} must be a number, got {value!r}")
        if kind is int and not isinstance(value, int):
            raise LearnError(f"--settings: option {name!r} must be an integer, got {value!r}")
    if isinstance(settings.train_overrides, str):
        settings.train_overrides = [settings.train_overrides]
    if isinstance(settings.type_names, str):
        settings.type_names = settings.type_names.split()
    return settings


def run_command(args: argparse.Namespace) -> int:
    """``nequip-sus2 learn``: returns the exit status (0 done, 1 a failed iteration); raises
    :class:`LearnError` for bad input."""
    settings = settings_from_args(args)
    try:
        run_learning(settings)
    except TrainingFailed as e:
        print(f"{_PROG}: error: {e}", file=sys.stderr)
        return 1
    return 0
