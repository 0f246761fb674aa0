"""Accuracy against reference labels: energy per atom, force and stress errors.

Statistics are accumulated with ``torch_runstats.RunningStats`` (MAE and RMSE, overall and binned
by element, configuration group and file with ``accumulate_by``); maxima come from NumPy.

Conventions (the same as ``tests/test_reference_parity.py`` and ``nequip-sus2 calc-errors``):

* energy: ``(E_model - E_ref) / N`` per structure, eV/atom;
* forces: every Cartesian component of every atom, eV/A;
* stress: the six Voigt components of ASE's stress (= .cfg PlusStress / V up to sign), eV/A^3,
  fully periodic structures with a reference stress only.

Per element: force components of atoms of that element; energy and stress of the structures
that contain the element.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .data import LabelledFrame
from .models import BenchModel

__all__ = ["Predictions", "error_stats", "binned_stats", "accuracy_summary", "predict_frames"]

QUANTITIES = ("energy_per_atom", "forces", "stress")
UNITS = {"energy_per_atom": "eV/atom", "forces": "eV/A", "stress": "eV/A^3"}


@dataclass
class Predictions:
    """Model predictions and reference labels of a list of frames, flattened for statistics."""

    model: str
    # per structure
    energy_pred: np.ndarray  # eV, NaN where no reference
    energy_ref: np.ndarray
    n_atoms: np.ndarray
    # per atom
    forces_pred: np.ndarray  # (A, 3)
    forces_ref: np.ndarray  # (A, 3), NaN where no reference
    atom_frame: np.ndarray  # (A,) frame index of each atom
    symbols: list[str]  # (A,)
    # per structure, (F, 6); NaN rows where no reference stress
    stress_pred: np.ndarray
    stress_ref: np.ndarray
    groups: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def errors(self) -> dict[str, np.ndarray]:
        """Signed errors: ``energy_per_atom`` (F,), ``forces`` (A, 3), ``stress`` (F, 6) with
        NaN for missing references."""
        return {
            "energy_per_atom": (self.energy_pred - self.energy_ref) / self.n_atoms,
            "forces": self.forces_pred - self.forces_ref,
            "stress": self.stress_pred - self.stress_ref,
        }

    def save(self, path) -> None:
        """All predictions and labels as a NumPy ``.npz``."""
        np.savez_compressed(
            path,
            energy_pred=self.energy_pred,
            energy_ref=self.energy_ref,
            n_atoms=self.n_atoms,
            forces_pred=self.forces_pred,
            forces_ref=self.forces_ref,
            atom_frame=self.atom_frame,
            symbols=np.array(self.symbols),
            stress_pred=self.stress_pred,
            stress_ref=self.stress_ref,
            groups=np.array(self.groups),
            files=np.array(self.files),
        )


def predict_frames(
    model: BenchModel,
    frames: Sequence[LabelledFrame],
    batch_size: int = 16,
    progress: bool | None = None,
) -> Predictions:
    """Evaluate ``model`` on every frame (batched where the model allows)."""
    from tqdm.auto import tqdm

    model.check_species(
        {s for f in frames for s in f.atoms.get_chemical_symbols()}, "the benchmark data"
    )
    step = max(1, batch_size) if model.batched else 1
    results: list[dict] = []
    with tqdm(
        total=len(frames),
        desc=f"accuracy {model.name}",
        unit="frame",
        disable=not progress if progress is not None else None,
        leave=False,
    ) as bar:
        for i in range(0, len(frames), step):
            chunk = frames[i : i + step]
            results.extend(model.evaluate_batches([model.atoms_to_data(f.atoms) for f in chunk]))
            bar.update(len(chunk))
    nan3 = np.full(3, np.nan)
    n_atoms = np.array([f.n_atoms for f in frames], dtype=np.float64)
    forces_ref = [
        f.forces if f.forces is not None else np.tile(nan3, (f.n_atoms, 1)) for f in frames
    ]
    stress_ref = [
        f.stress if (f.stress is not None and f.periodic) else np.full(6, np.nan) for f in frames
    ]
    stress_pred = [
        r["stress"] if f.periodic else np.full(6, np.nan)
        for r, f in zip(results, frames, strict=True)
    ]
    return Predictions(
        model=model.name,
        energy_pred=np.array([r["energy"] for r in results], dtype=np.float64),
        energy_ref=np.array(
            [np.nan if f.energy is None else f.energy for f in frames], dtype=np.float64
        ),
        n_atoms=n_atoms,
        forces_pred=np.concatenate([r["forces"] for r in results]).reshape(-1, 3),
        forces_ref=np.concatenate(forces_ref).reshape(-1, 3),
        atom_frame=np.concatenate(
            [np.full(f.n_atoms, k, dtype=np.int64) for k, f in enumerate(frames)]
        ),
        symbols=[s for f in frames for s in f.atoms.get_chemical_symbols()],
        stress_pred=np.array(stress_pred, dtype=np.float64).reshape(-1, 6),
        stress_ref=np.array(stress_ref, dtype=np.float64).reshape(-1, 6),
        groups=[f.group for f in frames],
        files=[f.file for f in frames],
    )


# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------


def binned_stats(
    errors: np.ndarray, bins: np.ndarray | None = None, n_bins: int | None = None
) -> list[dict[str, float] | None]:
    """MAE, RMSE, max |error| and count of ``errors`` (samples along axis 0, any number of
    components each) per bin, with ``torch_runstats``. Rows with any NaN are left out.

    Returns one dict per bin (``None`` for an empty bin); with ``bins=None`` one overall bin.
    """
    from torch_runstats import Reduction, RunningStats

    x = np.asarray(errors, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    x = x.reshape(x.shape[0], int(np.prod(x.shape[1:])))
    b = np.zeros(x.shape[0], dtype=np.int64) if bins is None else np.asarray(bins, np.int64)
    n_bins = int(n_bins if n_bins is not None else (b.max() + 1 if b.size else 1))
    keep = ~np.isnan(x).any(axis=1)
    x, b = x[keep], b[keep]
    out: list[dict[str, float] | None] = [None] * n_bins
    if x.shape[0] == 0:
        return out
    width = x.shape[1]
    t = torch.from_numpy(x)
    tb = torch.from_numpy(b)
    rms = RunningStats(dim=(width,), reduction=Reduction.RMS, reduce_dims=0)
    mean = RunningStats(dim=(width,), reduction=Reduction.MEAN, reduce_dims=0)
    for stats in (rms, mean):  # their state is created in the default dtype
        stats.to(dtype=torch.float64)
    rms.accumulate_batch(t, accumulate_by=tb)
    mean.accumulate_batch(t.abs(), accumulate_by=tb)
    rmse = rms.current_result().reshape(-1).numpy()
    mae = mean.current_result().reshape(-1).numpy()
    counts = np.bincount(b, minlength=n_bins)
    amax = np.zeros(n_bins)
    np.maximum.at(amax, b, np.abs(x).max(axis=1))
    for k in range(n_bins):
        if counts[k]:
            out[k] = {
                "mae": float(mae[k]),
                "rmse": float(rmse[k]),
                "max": float(amax[k]),
                "count": int(counts[k] * width),
            }
    return out


def error_stats(errors: np.ndarray) -> dict[str, float] | None:
    """Overall MAE, RMSE, max |error| and count (NaN rows left out)."""
    return binned_stats(errors)[0]


def _by_label(errors: np.ndarray, labels: Sequence[str]) -> dict[str, dict | None]:
    names = sorted(set(labels))
    index = {n: i for i, n in enumerate(names)}
    bins = np.array([index[lab] for lab in labels], dtype=np.int64)
    stats = binned_stats(errors, bins, len(names))
    return {n: s for n, s in zip(names, stats, strict=True) if s is not None}


def accuracy_summary(pred: Predictions, elements: Sequence[str] | None = None) -> dict[str, Any]:
    """Overall, per-element, per-group and per-file statistics of one model's errors."""
    err = pred.errors()
    frame_groups = pred.groups
    atom_groups = [frame_groups[k] for k in pred.atom_frame]
    out: dict[str, Any] = {
        "overall": {q: error_stats(err[q]) for q in QUANTITIES},
        "units": dict(UNITS),
    }
    # per element: forces by atom; energy/stress by structures containing the element
    present = sorted(set(pred.symbols))
    if elements is not None:
        present = [e for e in elements if e in set(pred.symbols)]
    per_element: dict[str, Any] = {}
    forces_by_el = _by_label(err["forces"], pred.symbols)
    frame_symbols: list[set[str]] = [set() for _ in range(len(pred.n_atoms))]
    for k, s in zip(pred.atom_frame.tolist(), pred.symbols, strict=True):
        frame_symbols[k].add(s)
    rows = [(k, s) for k, syms in enumerate(frame_symbols) for s in sorted(syms)]
    frame_idx = np.array([k for k, _ in rows], dtype=np.int64)
    labels = [s for _, s in rows]
    e_by_el = _by_label(err["energy_per_atom"][frame_idx], labels) if rows else {}
    s_by_el = _by_label(err["stress"][frame_idx], labels) if rows else {}
    for el in present:
        per_element[el] = {
            "atoms": int(sum(1 for s in pred.symbols if s == el)),
            "structures": int(sum(1 for syms in frame_symbols if el in syms)),
            "forces": forces_by_el.get(el),
            "energy_per_atom": e_by_el.get(el),
            "stress": s_by_el.get(el),
        }
    out["per_element"] = per_element
    out["per_group"] = _grouped(err, frame_groups, atom_groups)
    if len(set(pred.files)) > 1:
        atom_files = [pred.files[k] for k in pred.atom_frame]
        out["per_file"] = _grouped(err, pred.files, atom_files)
    return out


def _grouped(err, frame_labels, atom_labels) -> dict[str, Any]:
    e = _by_label(err["energy_per_atom"], frame_labels)
    s = _by_label(err["stress"], frame_labels)
    f = _by_label(err["forces"], atom_labels)
    out = {}
    for g in sorted(set(frame_labels)):
        out[g] = {
            "structures": int(sum(1 for x in frame_labels if x == g)),
            "energy_per_atom": e.get(g),
            "forces": f.get(g),
            "stress": s.get(g),
        }
    return out
