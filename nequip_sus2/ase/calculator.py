"""ASE calculator with the SUS2 extrapolation grade, and an MD observer for active learning.

:class:`SUS2Calculator` is NequIP's ``NequIPCalculator`` plus the per-atom results
``extrapolation_grade`` and ``max_extrapolation_grade`` when the model computes
``sus2_extrapolation_grade`` (see :func:`nequip_sus2.graded_model.write_model_with_grade`). For a
compiled model use ``nequip-compile --mode aotinductor --target sus2_ase`` (the ``ase`` target
plus the grade output); a model compiled with ``--target ase`` still loads, without the grade.

:class:`ExtrapolationMonitor` is an MD observer (``dyn.attach(monitor)``) that saves the
structures whose largest grade exceeds ``save_threshold`` and stops the run (raises
:class:`ExtrapolationError`) above ``stop_threshold``, like MLIP's ``select`` thresholds.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from nequip.integrations.ase import NequIPCalculator

from .._compile import SUS2_ASE_TARGET, register_compile_targets
from .._keys import EXTRAPOLATION_GRADE_KEY as _GRADE_KEY

__all__ = ["ExtrapolationError", "ExtrapolationMonitor", "SUS2Calculator"]

register_compile_targets()


class SUS2Calculator(NequIPCalculator):
    """``NequIPCalculator`` that also returns the extrapolation grade.

    Results (when the model has an extrapolation grade): ``extrapolation_grade`` (per atom,
    ``[N]``) and ``max_extrapolation_grade`` (float). Build it like ``NequIPCalculator``:
    ``SUS2Calculator.from_compiled_model(path.nequip.pt2)`` or, for a checkpoint or package,
    ``SUS2Calculator._from_saved_model(path)`` (the host's loader).
    """

    implemented_properties = [
        *NequIPCalculator.implemented_properties,
        "extrapolation_grade",
        "max_extrapolation_grade",
    ]

    @classmethod
    def _get_aoti_compile_target(cls) -> dict:
        from nequip.scripts._compile_utils import COMPILE_TARGET_DICT

        register_compile_targets()
        return COMPILE_TARGET_DICT[SUS2_ASE_TARGET]

    @classmethod
    def from_compiled_model(cls, compile_path, *args, **kwargs):
        """As ``NequIPCalculator.from_compiled_model``; accepts ``--target sus2_ase`` (with the
        grade) and ``--target ase`` (without) artifacts."""
        try:
            return super().from_compiled_model(compile_path, *args, **kwargs)
        except ValueError as err:
            if "do not match metadata" not in str(err) or cls is _PlainASETarget:
                raise
        return _PlainASETarget.from_compiled_model(compile_path, *args, **kwargs)

    def save_extra_outputs(self, out) -> None:
        if _GRADE_KEY in out:
            gamma = out[_GRADE_KEY].detach().reshape(-1).to("cpu").double().numpy()
            self.results["extrapolation_grade"] = gamma
            self.results["max_extrapolation_grade"] = float(gamma.max()) if gamma.size else 0.0

    def get_extrapolation_grade(self, atoms=None) -> np.ndarray:
        """Per-atom extrapolation grade of ``atoms``."""
        return self.get_property("extrapolation_grade", atoms)


class _PlainASETarget(SUS2Calculator):
    """A SUS2Calculator for artifacts compiled with ``--target ase`` (no grade output)."""

    @classmethod
    def _get_aoti_compile_target(cls) -> dict:
        return NequIPCalculator._get_aoti_compile_target()


class ExtrapolationError(RuntimeError):
    """Raised by :class:`ExtrapolationMonitor` when the grade exceeds ``stop_threshold``."""

    def __init__(self, step: int, grade: float, threshold: float):
        super().__init__(
            f"step {step}: extrapolation grade {grade:.3g} exceeds the stop threshold "
            f"{threshold:g}; the model is outside its training domain"
        )
        self.step = step
        self.grade = grade


class ExtrapolationMonitor:
    """MD observer: save extrapolating structures, stop on strong extrapolation.

    After each call (attach it to an ASE dynamics object, ``dyn.attach(monitor, interval=1)``),
    the largest grade of ``atoms`` is read from its :class:`SUS2Calculator` (no extra model
    evaluation: the dynamics has just computed the forces). Above ``save_threshold`` the
    structure is appended to ``save_path`` (extxyz, with ``info["max_extrapolation_grade"]``);
    above ``stop_threshold`` :class:`ExtrapolationError` is raised (after saving), which ends
    ``dyn.run``. ``history`` holds the largest grade of every call.

    Typical thresholds (MLIP's defaults): save above 2, stop above 10.
    """

    def __init__(
        self,
        atoms,
        save_path: str | os.PathLike | None = None,
        save_threshold: float = 2.0,
        stop_threshold: float | None = 10.0,
    ):
        if stop_threshold is not None and stop_threshold < save_threshold:
            raise ValueError("stop_threshold must be >= save_threshold")
        self.atoms = atoms
        self.save_path = None if save_path is None else Path(save_path)
        self.save_threshold = float(save_threshold)
        self.stop_threshold = None if stop_threshold is None else float(stop_threshold)
        self.history: list[float] = []
        self.num_saved = 0

    def __call__(self) -> None:
        calc = self.atoms.calc
        if "max_extrapolation_grade" not in calc.results:
            calc.get_forces(self.atoms)  # compute results if the dynamics has not
        if "max_extrapolation_grade" not in calc.results:
            raise RuntimeError(
                "the calculator returns no extrapolation grade: use SUS2Calculator with a "
                "model that has one (nequip-sus2 active-set; compile with --target sus2_ase)"
            )
        grade = float(calc.results["max_extrapolation_grade"])
        step = len(self.history)
        self.history.append(grade)
        if grade > self.save_threshold and self.save_path is not None:
            self._save(grade)
        if self.stop_threshold is not None and grade > self.stop_threshold:
            raise ExtrapolationError(step, grade, self.stop_threshold)

    def _save(self, grade: float) -> None:
        from ase.calculators.singlepoint import SinglePointCalculator
        from ase.io import write

        snap = self.atoms.copy()
        snap.info["max_extrapolation_grade"] = grade
        snap.calc = SinglePointCalculator(
            snap,
            energy=self.atoms.calc.results.get("energy"),
            forces=self.atoms.calc.results.get("forces"),
        )
        write(self.save_path, snap, format="extxyz", append=True)
        self.num_saved += 1
