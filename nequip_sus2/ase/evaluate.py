"""A model evaluated on a data set through :class:`~nequip_sus2.ase.SUS2Calculator`:
:func:`calc_errors` (errors against the labels, like ``mlp calc-errors``) and
:func:`calc_grade` (the MaxVol extrapolation grade of every structure, like ``mlp calc-grade``).

The model is a compiled ``.nequip.pt2``, a package, a checkpoint or a trained ``.mtp``; the data
a ``.cfg`` or extended XYZ file.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import ase.io
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator
from ase.units import GPa
from nequip.integrations.utils import basic_transforms

from .._files import replacing_text
from .._keys import EXTRAPOLATION_GRADE_KEY
from ..errors import InteropError
from ..io.cfg import CfgFrame, iter_cfg, write_cfg
from ..io.datafile import check_extxyz_frame, check_type_range, data_format, with_progress
from ..io.mtp_model import import_mtp
from ..io.species import check_type_names
from ..package import load_model, model_format
from .calculator import SUS2Calculator

__all__ = ["GRADE_FEATURE", "ase_calculator", "calc_errors", "calc_grade"]

#: name of the grade in .cfg Feature lines and extxyz info/arrays (as MLIP's calc-grade)
GRADE_FEATURE = "MV_grade"


def _load_calculator(
    model_path: str | os.PathLike,
    type_names: Sequence[str] | None,
    model_dtype: str = "float64",
    device: str = "cpu",
):
    """``(calculator, the model's type names, whether it computes the grade)``; the last is
    ``None`` when that cannot be told before an evaluation (TorchScript models)."""
    path = os.fspath(model_path)
    kind = model_format(path)
    # structures map to the model's types by chemical symbol: the names must be symbols
    given = None
    if type_names is not None:
        given = check_type_names(list(type_names), "type names", symbols=True)
    if kind == "compiled":
        calc = SUS2Calculator.from_compiled_model(
            path, device=device, chemical_species_to_atom_type_map=True
        )
        names = next(
            list(t.model_type_names) for t in calc.transforms if hasattr(t, "model_type_names")
        )
        keys = getattr(calc.model, "output_keys", None)
        has_grade = None if keys is None else EXTRAPOLATION_GRADE_KEY in keys
    else:
        if kind == "mtp":
            if given is None:
                raise InteropError(
                    f"{path}: a .mtp file stores no species; give the type names of its type "
                    "indices 0, 1, ... (--type-names)"
                )
            model = import_mtp(path, given, model_dtype=model_dtype).eval()
        else:
            model = load_model(path)
        names = list(model.type_names)
        calc = SUS2Calculator(
            model=model,
            device=device,
            transforms=basic_transforms(
                model.metadata, float(model.metadata["r_max"]), names, {t: t for t in names}
            ),
        )
        has_grade = any(type(m).__name__ == "ExtrapolationGrade" for m in model.modules())
    check_type_names(names, f"{path}: the model's type names", symbols=True)
    if given is not None and given != names:
        raise InteropError(
            f"the type names given ({' '.join(given)}) differ from those {path} carries "
            f"({' '.join(names)}); leave them out to use the model's (its order maps .cfg "
            "type indices)"
        )
    return calc, names, has_grade


def ase_calculator(
    model_path: str | os.PathLike,
    type_names: Sequence[str] | None = None,
    model_dtype: str = "float64",
    device: str = "cpu",
):
    """A NequIP ASE calculator (:class:`~nequip_sus2.ase.SUS2Calculator`, which also returns
    the extrapolation grade of a model that has one) for a compiled ``.nequip.pt2``
    (``--target ase`` or ``sus2_ase``), a package, a checkpoint or a trained ``.mtp``.

    Species map by chemical symbol. ``type_names`` is required for a ``.mtp`` file (the species
    of its type indices); for the other models, which carry their type names, it is optional
    and must equal them. Raises :class:`InteropError` for a file that is not a model (by
    suffix) and for type names that differ from the model's.
    """
    return _load_calculator(model_path, type_names, model_dtype=model_dtype, device=device)[0]


def _read_data(path: str, type_names: Sequence[str]):
    """``ase.Atoms`` of every structure of a ``.cfg`` (types are indices into ``type_names``)
    or extxyz file, with the file's labels; refuses species the model does not have."""
    if data_format(path) == "cfg":
        for index, frame in enumerate(iter_cfg(path)):
            check_type_range(frame, index, path, type_names)
            yield frame.to_atoms(type_names), frame
        return
    known = set(type_names)
    line = 1
    try:
        for index, atoms in enumerate(ase.io.iread(path, index=":", format="extxyz")):
            missing = sorted(set(atoms.get_chemical_symbols()) - known)
            if missing:
                raise InteropError(
                    f"{path}:{line}: frame {index} has species {' '.join(missing)} that the "
                    f"model does not have (its species: {' '.join(type_names)})"
                )
            check_extxyz_frame(atoms, path, line, index)
            line += len(atoms) + 2
            yield atoms, None
    except InteropError:
        raise
    except (ValueError, IndexError, KeyError) as e:
        raise InteropError(f"{path}:{line}: not a readable extxyz frame: {e}") from None


_VOIGT_PAIRS = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


def _voigt(matrix) -> np.ndarray:
    """Six components xx yy zz yz xz xy of a 3x3 (symmetrised), 9- or 6-vector."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.size == 6:
        return m.reshape(6).copy()
    if m.size != 9:
        raise InteropError(f"a stress/virial with {m.size} values (expected 6 or 9)")
    m = m.reshape(3, 3)
    return np.array([0.5 * (m[i, j] + m[j, i]) for i, j in _VOIGT_PAIRS])


def _volume(atoms) -> float | None:
    """Cell volume of a fully periodic structure, else ``None``."""
    if not bool(np.all(atoms.pbc)):
        return None
    volume = abs(float(np.linalg.det(atoms.cell.array)))
    return volume if np.isfinite(volume) and volume > 0.0 else None


def _labels(atoms) -> tuple[float | None, np.ndarray | None, np.ndarray | None]:
    """Reference energy, forces and virial (.cfg PlusStress convention, eV) of a structure as
    read: calculator results first, then ``info``/``arrays``; the virial from
    ``info["virial"]`` or, for a fully periodic cell, ``-V * stress``."""
    calc = atoms.calc
    results = dict(getattr(calc, "results", None) or {}) if calc is not None else {}
    energy = results.get("energy", atoms.info.get("energy"))
    forces = results.get("forces", atoms.arrays.get("forces"))
    virial = None
    if atoms.info.get("virial") is not None:
        virial = _voigt(atoms.info["virial"])
    else:
        stress = results.get("stress", atoms.info.get("stress"))
        volume = _volume(atoms)
        if stress is not None and volume is not None:
            virial = -volume * _voigt(stress)
    return (
        None if energy is None else float(energy),
        None if forces is None else np.asarray(forces, dtype=np.float64).reshape(len(atoms), 3),
        virial,
    )


def _evaluate(calc, atoms) -> dict[str, Any]:
    """Energy, forces, virial (fully periodic structures) and grade (if any) of ``atoms``."""
    probe = atoms.copy()
    probe.calc = calc
    calc.get_property("energy", probe)
    res = calc.results
    volume = _volume(probe)
    virial = None
    if volume is not None and "stress" in res:
        virial = -volume * np.asarray(res["stress"], dtype=np.float64).reshape(6)
    grade = res.get("extrapolation_grade")
    return {
        "energy": float(res["energy"]),
        "forces": np.array(res["forces"], dtype=np.float64).reshape(len(atoms), 3),
        "virial": virial,
        "volume": volume,
        "grade": None if grade is None else np.array(grade, dtype=np.float64).reshape(-1),
    }


def _stats(
    diffs: list[np.ndarray], refs: list[np.ndarray] | None = None
) -> dict[str, float | int | None] | None:
    """Max, mean absolute and RMS of the differences (``None`` without values); with ``refs``
    also the relative errors RMS(d)/RMS(ref) and max|d|/max|ref| (``None`` if ref is 0)."""
    if not diffs:
        return None
    d = np.concatenate([np.ravel(x) for x in diffs])
    out: dict[str, float | int | None] = {
        "rmse": float(np.sqrt(np.mean(d**2))),
        "mae": float(np.mean(np.abs(d))),
        "max": float(np.max(np.abs(d))),
        "count": int(d.size),
    }
    if refs is not None:
        r = np.concatenate([np.ravel(x) for x in refs])
        rms_ref, max_ref = float(np.sqrt(np.mean(r**2))), float(np.max(np.abs(r)))
        out["rel_rms"] = out["rmse"] / rms_ref if rms_ref > 0 else None
        out["rel_max"] = out["max"] / max_ref if max_ref > 0 else None
    return out


def _write_structures(out: str, items, type_names: Sequence[str]) -> int:
    """Write ``CfgFrame``s (``.cfg``) or ``ase.Atoms`` (extxyz) atomically; returns the count."""
    if data_format(out, "the output") == "cfg":
        return write_cfg(
            (
                item if isinstance(item, CfgFrame) else CfgFrame.from_atoms(item, type_names)
                for item in items
            ),
            out,
        )
    count = 0
    with replacing_text(out) as f:
        for item in items:
            atoms = item.to_atoms(type_names) if isinstance(item, CfgFrame) else item
            ase.io.write(f, atoms, format="extxyz")
            count += 1
    return count


def _predicted_atoms(atoms, pred: dict[str, Any]):
    """A copy of ``atoms`` whose labels are the predictions (virial/stress when periodic)."""
    out = atoms.copy()
    out.info.pop("virial", None)
    results: dict[str, Any] = {"energy": pred["energy"], "forces": pred["forces"]}
    if pred["virial"] is not None:
        w = pred["virial"]
        out.info["virial"] = np.array(
            [[w[0], w[5], w[4]], [w[5], w[1], w[3]], [w[4], w[3], w[2]]], dtype=np.float64
        )
        results["stress"] = -w / pred["volume"]
    out.calc = SinglePointCalculator(out, **results)
    return out


def calc_errors(
    model_path: str | os.PathLike,
    data_path: str | os.PathLike,
    type_names: Sequence[str] | None = None,
    model_dtype: str = "float64",
    device: str = "cpu",
    predictions: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Errors of a model (see :func:`ase_calculator`) against the labels of a ``.cfg`` or
    extended XYZ file, like ``mlp calc-errors``.

    ``type_names``: required for a ``.mtp`` model; the other models carry their own (whose
    order maps ``.cfg`` type indices), and given ones must equal them. Extended XYZ labels are
    what ``ase.io.read`` gives: calculator results (``energy``, ``forces``, ``stress``), else
    the same keys in ``info``/``arrays``; ``info["virial"]`` (eV) is used as the virial when
    present.

    Returns a dict with ``configurations``, ``atoms`` and, per quantity, ``{rmse, mae, max,
    count}`` (``None`` when the data has no such labels):

    * ``energy``: total energy, eV, one value per configuration;
    * ``energy_per_atom``: eV/atom;
    * ``forces``: force components, eV/A;
    * ``virial``: the six components of the virial ``-dE/dstrain`` (the ``.cfg`` PlusStress,
      ``-V * ASE stress``), eV, for fully periodic configurations;
    * ``stress``: virial / V of the same configurations, in GPa (1 eV/A^3 = 160.21766208
      GPa). Earlier versions reported this entry in eV/A^3.

    ``forces``, ``virial`` and ``stress`` also have the relative errors ``rel_rms`` =
    RMS(error) / RMS(reference) and ``rel_max`` = max|error| / max|reference| (``None`` when
    the reference is zero). ``predictions``: also write the structures with the predicted
    labels (``.cfg`` or extxyz, by suffix). ``progress``: a tqdm bar on stderr (``None``: when
    stderr is a terminal).
    """
    data_path = os.fspath(data_path)
    data_format(data_path)
    if predictions is not None:
        predictions = os.fspath(predictions)
        data_format(predictions, "the predictions file")
    calc, names, _ = _load_calculator(model_path, type_names, model_dtype, device)
    keys = ("energy", "energy_per_atom", "forces", "virial", "stress")
    diffs: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    refs: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    predicted = []
    count = atoms_total = 0
    items = _read_data(data_path, names)
    for atoms, frame in with_progress(items, data_path, "calc-errors", progress):
        count += 1
        atoms_total += len(atoms)
        energy, forces, virial = _labels(atoms)
        pred = _evaluate(calc, atoms)
        if not (np.isfinite(pred["energy"]) and np.isfinite(pred["forces"]).all()):
            raise InteropError(
                f"{os.fspath(model_path)}: the model predicts nan/inf energy or forces for "
                f"configuration {count - 1} of {os.fspath(data_path)} (nan/inf parameters?)"
            )
        if energy is not None:
            diffs["energy"].append(np.array([pred["energy"] - energy]))
            n = max(len(atoms), 1)
            diffs["energy_per_atom"].append(np.array([(pred["energy"] - energy) / n]))
        if forces is not None:
            diffs["forces"].append(pred["forces"] - forces)
            refs["forces"].append(forces)
        if virial is not None and pred["virial"] is not None:
            diffs["virial"].append(pred["virial"] - virial)
            refs["virial"].append(virial)
            scale = 1.0 / (pred["volume"] * GPa)
            diffs["stress"].append((pred["virial"] - virial) * scale)
            refs["stress"].append(virial * scale)
        if predictions is not None:
            if frame is None:
                predicted.append(_predicted_atoms(atoms, pred))
            else:  # the .cfg frame with its ids, columns and Feature order
                predicted.append(
                    dataclasses.replace(
                        frame,
                        energy=pred["energy"],
                        forces=pred["forces"],
                        plus_stress=pred["virial"],
                    )
                )
    if predictions is not None:
        _write_structures(predictions, predicted, names)
    return {
        "configurations": count,
        "atoms": atoms_total,
        "energy": _stats(diffs["energy"]),
        "energy_per_atom": _stats(diffs["energy_per_atom"]),
        "forces": _stats(diffs["forces"], refs["forces"]),
        "virial": _stats(diffs["virial"], refs["virial"]),
        "stress": _stats(diffs["stress"], refs["stress"]),
    }


def _no_grade(path: str) -> InteropError:
    return InteropError(
        f"{path}: the model has no extrapolation grade; add one with `nequip-sus2 active-set "
        "MODEL TRAINING_DATA -o OUT` (a .ckpt or .nequip.zip; compile it with --target "
        "sus2_ase for a .nequip.pt2) first"
    )


def calc_grade(
    model_path: str | os.PathLike,
    data_path: str | os.PathLike,
    type_names: Sequence[str] | None = None,
    output: str | os.PathLike | None = None,
    device: str = "cpu",
    progress: bool | None = None,
) -> dict[str, Any]:
    """MaxVol extrapolation grade of every structure of a ``.cfg`` or extended XYZ file, like
    ``mlp calc-grade``.

    The model (package, checkpoint, or ``.nequip.pt2`` compiled with ``--target sus2_ase``)
    must carry the grade (``nequip-sus2 active-set``); it is evaluated through
    :class:`~nequip_sus2.ase.SUS2Calculator`, so the grade is the one that calculator reports.
    ``type_names``: optional; must equal the model's (whose order maps ``.cfg`` type indices).

    Returns ``configurations``, ``atoms``, ``max_grade`` (the largest per-atom grade of each
    structure, in file order) and ``summary`` (``count``, ``min``, ``median``, ``max``, and
    ``above_1``/``above_2``/``above_10``: structures whose grade exceeds 1, 2, 10). ``output``:
    also write the structures with their grade: a ``Feature MV_grade <value>`` line per
    configuration (``.cfg``), or ``info["MV_grade"]`` plus the per-atom array ``MV_grade``
    (extxyz). ``progress``: a tqdm bar on stderr (``None``: when stderr is a terminal).
    """
    path, data_path = os.fspath(model_path), os.fspath(data_path)
    data_format(data_path)
    to_cfg = False
    if output is not None:
        output = os.fspath(output)
        to_cfg = data_format(output, "the output") == "cfg"
    if model_format(path) == "mtp":
        raise InteropError(
            f"{path}: a .mtp file carries no extrapolation grade; import it (nequip-sus2 "
            "import-mtp) and add one with `nequip-sus2 active-set` first"
        )
    calc, names, has_grade = _load_calculator(path, type_names, device=device)
    if has_grade is False:
        raise _no_grade(path)
    grades: list[float] = []
    atoms_total = 0

    def graded():
        nonlocal atoms_total
        items = _read_data(data_path, names)
        for atoms, frame in with_progress(items, data_path, "calc-grade", progress):
            gamma = _evaluate(calc, atoms)["grade"]
            if gamma is None:
                raise _no_grade(path)
            top = float(gamma.max()) if gamma.size else 0.0
            grades.append(top)
            atoms_total += len(atoms)
            if output is None:
                continue
            if to_cfg:
                if frame is None:
                    frame = CfgFrame.from_atoms(atoms, names)
                features = [(k, v) for k, v in frame.features if k != GRADE_FEATURE]
                yield dataclasses.replace(frame, features=[*features, (GRADE_FEATURE, repr(top))])
            else:  # the structure as read (its labels kept) plus the grade
                atoms.info[GRADE_FEATURE] = top
                atoms.arrays[GRADE_FEATURE] = gamma
                yield atoms

    if output is None:
        for _ in graded():
            pass
    else:
        _write_structures(output, graded(), names)
    g = np.asarray(grades, dtype=np.float64)
    summary: dict[str, Any] = {
        "count": int(g.size),
        "min": float(g.min()) if g.size else None,
        "median": float(np.median(g)) if g.size else None,
        "max": float(g.max()) if g.size else None,
    }
    for threshold in (1, 2, 10):
        summary[f"above_{threshold}"] = int(np.count_nonzero(g > threshold))
    return {
        "configurations": int(g.size),
        "atoms": atoms_total,
        "max_grade": grades,
        "summary": summary,
    }
