"""Physical checks: equation of state (Birch-Murnaghan via ``ase.eos``) and short NVE MD.

EOS: the structure is scaled homogeneously (no relaxation) to volumes ``(1 + x)^3 V`` for
``x`` in ``[-strain, +strain]``; E(V) is fitted with ``ase.eos.EquationOfState(...,
eos="birchmurnaghan")``. If the minimum falls on the edge of the scan the scan is re-centred on
it (up to ``max_recentre`` times). A reference curve is a file with several frames of one
composition at different volumes and reference energies: the model is evaluated on exactly those
frames, and both curves are fitted the same way.

MD: velocity Verlet (NVE) from Maxwell-Boltzmann velocities; energy drift is the slope of a
straight-line fit of the total energy per atom against time (eV/atom/ps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .data import LabelledFrame
from .models import BenchModel

__all__ = [
    "EOSStructure",
    "auto_eos_structures",
    "bulk_modulus_gpa",
    "eos_fit",
    "equation_of_state",
    "md_stability",
    "read_eos_structures",
    "supercell_for",
]


@dataclass
class EOSStructure:
    """A structure to scan; ``reference`` optionally holds frames (Atoms with reference
    energies) that make a reference E(V) curve."""

    label: str
    atoms: object
    reference: list | None = None  # list[(atoms, energy)]


def bulk_modulus_gpa(b_ev_per_a3: float) -> float:
    from ase.units import GPa

    return float(b_ev_per_a3 / GPa)


def eos_fit(volumes: Sequence[float], energies: Sequence[float]) -> dict[str, Any]:
    """Birch-Murnaghan fit of E(V): ``v0``, ``e0`` (same units as given), ``B_GPa`` and
    ``bracketed`` (the minimum lies inside the scanned range); ``error`` when it fails."""
    import warnings

    from ase.eos import EquationOfState

    v = np.asarray(volumes, dtype=np.float64)
    e = np.asarray(energies, dtype=np.float64)
    out: dict[str, Any] = {"v0": None, "e0": None, "B_GPa": None, "bracketed": False}
    if len(v) < 5 or not np.all(np.isfinite(e)):
        out["error"] = "need at least 5 finite points"
        return out
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            v0, e0, b = EquationOfState(v, e, eos="birchmurnaghan").fit(warn=False)
    except Exception as exc:  # noqa: BLE001 - ase raises several types for a failed fit
        out["error"] = f"fit failed: {exc}"
        return out
    if not (np.isfinite(v0) and np.isfinite(e0) and np.isfinite(b)):
        out["error"] = "fit failed: non-finite result"
        return out
    out.update(
        v0=float(v0),
        e0=float(e0),
        B_GPa=bulk_modulus_gpa(b),
        bracketed=bool(v.min() < v0 < v.max()),
    )
    return out


def _scaled(atoms, factor: float):
    a = atoms.copy()
    a.set_cell(atoms.cell * factor, scale_atoms=True)
    return a


def equation_of_state(
    model: BenchModel,
    structure: EOSStructure,
    n_points: int = 9,
    strain: float = 0.05,
    max_recentre: int = 2,
) -> dict[str, Any]:
    """E(V) scan and fit of ``structure`` with ``model``; energies and volumes per atom."""
    atoms = structure.atoms
    n = len(atoms)
    model.check_species(atoms.get_chemical_symbols(), f"EOS structure {structure.label}")
    result: dict[str, Any] = {
        "structure": structure.label,
        "formula": atoms.get_chemical_formula(),
        "n_atoms": n,
    }
    if structure.reference:
        ref_atoms = [a for a, _ in structure.reference]
        preds = model.evaluate(ref_atoms, batch_size=len(ref_atoms))
        vols = [a.get_volume() / n for a in ref_atoms]
        e_model = [p["energy"] / n for p in preds]
        e_ref = [e / n for _, e in structure.reference]
        order = np.argsort(vols)
        result["volumes"] = [float(vols[i]) for i in order]
        result["energies"] = [float(e_model[i]) for i in order]
        result["fit"] = eos_fit(vols, e_model)
        result["reference"] = {
            "energies": [float(e_ref[i]) for i in order],
            "fit": eos_fit(vols, e_ref),
        }
        return result
    centre = 1.0
    vols: list[float] = []
    energies: list[float] = []
    fit: dict[str, Any] = {}
    for _ in range(max_recentre + 1):
        xs = np.linspace(-strain, strain, n_points)
        frames = [_scaled(atoms, centre * (1 + x)) for x in xs]
        preds = model.evaluate(frames, batch_size=len(frames))
        vols = [a.get_volume() / n for a in frames]
        energies = [p["energy"] / n for p in preds]
        fit = eos_fit(vols, energies)
        i_min = int(np.nanargmin(energies)) if np.any(np.isfinite(energies)) else 0
        if fit.get("bracketed") or i_min not in (0, n_points - 1):
            break
        centre *= 1 + xs[i_min]  # minimum on the edge: scan again around it
    result["volumes"] = [float(v) for v in vols]
    result["energies"] = [float(e) for e in energies]
    result["fit"] = fit
    return result


# ----------------------------------------------------------------------------------------------
# structures
# ----------------------------------------------------------------------------------------------


def _lattice_guess(symbol: str, lattice: str) -> float:
    """fcc/bcc lattice constant: ASE's reference state where it has this lattice, else from the
    nearest-neighbour distance 2 x covalent radius."""
    from ase.data import atomic_numbers, covalent_radii, reference_states

    z = atomic_numbers[symbol]
    ref = reference_states[z] or {}
    if ref.get("symmetry") == lattice and "a" in ref:
        return float(ref["a"])
    d = 2.0 * float(covalent_radii[z])
    return d * math.sqrt(2.0) if lattice == "fcc" else 2.0 * d / math.sqrt(3.0)


def auto_eos_structures(
    frames: Sequence[LabelledFrame],
    kinds: Sequence[str] = ("data",),
    elements: Sequence[str] | None = None,
) -> list[EOSStructure]:
    """Structures built automatically.

    * ``data``: the fully periodic data structure with the lowest reference energy per atom;
    * ``fcc``/``bcc``: the cubic cell of each of ``elements`` (default: the most common element
      of the data).
    """
    from ase.build import bulk

    out: list[EOSStructure] = []
    if "data" in kinds:
        labelled = [f for f in frames if f.periodic and f.energy is not None]
        if labelled:
            best = min(labelled, key=lambda f: f.energy / f.n_atoms)
            label = f"data:{best.atoms.get_chemical_formula()}#{best.index}"
            out.append(EOSStructure(label=label, atoms=best.atoms.copy()))
    lattices = [k for k in kinds if k in ("fcc", "bcc")]
    if lattices:
        if not elements:
            counts: dict[str, int] = {}
            for f in frames:
                for s in f.atoms.get_chemical_symbols():
                    counts[s] = counts.get(s, 0) + 1
            elements = [max(counts, key=counts.get)] if counts else []
        for el in elements:
            for lat in lattices:
                atoms = bulk(el, lat, a=_lattice_guess(el, lat), cubic=True)
                out.append(EOSStructure(label=f"{lat}-{el}", atoms=atoms))
    return out


def read_eos_structures(path: str) -> list[EOSStructure]:
    """Structures from a file. Several frames of one composition at different volumes, all with
    reference energies, make one structure with a reference curve; otherwise each frame is a
    structure of its own."""
    import os

    import ase.io

    frames = ase.io.read(path, index=":")
    base = os.path.basename(path)
    energies = []
    for a in frames:
        try:
            energies.append(a.get_potential_energy() if a.calc is not None else None)
        except Exception:  # noqa: BLE001 - no energy stored
            energies.append(None)
    same = len({(len(a), a.get_chemical_formula()) for a in frames}) == 1
    vols = [a.get_volume() if a.pbc.all() else 0.0 for a in frames]
    if (
        len(frames) >= 5
        and same
        and all(e is not None for e in energies)
        and np.ptp(vols) > 1e-6 * max(vols)
    ):
        i_mid = int(np.argmin(energies))
        atoms = frames[i_mid].copy()
        atoms.calc = None
        ref = []
        for a, e in zip(frames, energies, strict=True):
            b = a.copy()
            b.calc = None
            ref.append((b, float(e)))
        return [
            EOSStructure(label=f"{base}:{atoms.get_chemical_formula()}", atoms=atoms, reference=ref)
        ]
    out = []
    for i, a in enumerate(frames):
        b = a.copy()
        b.calc = None
        out.append(EOSStructure(label=f"{base}#{i}:{b.get_chemical_formula()}", atoms=b))
    return out


def supercell_for(atoms, n_target: int):
    """``atoms`` repeated to roughly ``n_target`` atoms in a near-cubic supercell."""
    n = len(atoms)
    if n >= n_target or not atoms.pbc.all():
        return atoms.copy()
    lengths = atoms.cell.lengths()
    side = (n_target / n * atoms.get_volume()) ** (1.0 / 3.0)
    reps = [max(1, int(round(side / max(L, 1e-9)))) for L in lengths]
    # grow the shortest direction until the target is reached
    while n * int(np.prod(reps)) < 0.9 * n_target:
        k = int(np.argmin(np.asarray(reps) * lengths))
        reps[k] += 1
    return atoms.repeat(reps)


# ----------------------------------------------------------------------------------------------
# molecular dynamics
# ----------------------------------------------------------------------------------------------


def _min_distance(atoms, cutoff: float) -> float:
    from ase.neighborlist import neighbor_list

    d = neighbor_list("d", atoms, cutoff)
    return float(d.min()) if len(d) else float(cutoff)


def md_stability(
    model: BenchModel,
    atoms,
    steps: int = 200,
    timestep_fs: float = 1.0,
    temperature_K: float = 300.0,
    min_atoms: int = 32,
    seed: int = 0,
    sample_every: int = 5,
    progress: bool | None = None,
    label: str | None = None,
) -> dict[str, Any]:
    """Short NVE run; stops early if the energy is not finite, two atoms come closer than
    0.5 A or the temperature exceeds 20 x its target (+1000 K)."""
    from ase import units
    from ase.md import velocitydistribution as vd
    from ase.md.verlet import VelocityVerlet
    from tqdm.auto import tqdm

    model.check_species(atoms.get_chemical_symbols(), "the MD structure")
    atoms = supercell_for(atoms, min_atoms)
    atoms.calc = model.calculator()
    rng = np.random.default_rng(seed)
    if hasattr(vd, "thermalize_momenta"):  # ase >= 3.29
        vd.thermalize_momenta(atoms, temperature_K, rng=rng)
    else:  # pragma: no cover - older ase
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
    vd.Stationary(atoms)
    n = len(atoms)
    dyn = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    times, e_tot, e_pot, temps = [], [], [], []
    max_force, min_dist = 0.0, math.inf
    reason = None
    cutoff = 3.0

    def sample(step: int) -> bool:
        nonlocal max_force, min_dist, reason
        ep = float(atoms.get_potential_energy())
        ek = float(atoms.get_kinetic_energy())
        f = atoms.get_forces()
        t = float(atoms.get_temperature())
        times.append(step * timestep_fs / 1000.0)
        e_pot.append(ep / n)
        e_tot.append((ep + ek) / n)
        temps.append(t)
        max_force = max(max_force, float(np.abs(f).max()) if f.size else 0.0)
        if step % sample_every == 0 or step == steps:
            min_dist = min(min_dist, _min_distance(atoms, cutoff))
        if not (np.isfinite(ep) and np.isfinite(f).all()):
            reason = "non-finite energy or forces"
        elif min_dist < 0.5:
            reason = f"atoms closer than 0.5 A ({min_dist:.3f} A)"
        elif t > 20 * temperature_K + 1000.0:
            reason = f"temperature {t:.0f} K exceeds 20 x target"
        return reason is None

    import time

    start = time.perf_counter()
    ok = sample(0)
    done = 0
    with tqdm(
        total=steps,
        desc=f"md {label or model.name}",
        unit="step",
        disable=not progress if progress is not None else None,
        leave=False,
    ) as bar:
        while ok and done < steps:
            dyn.run(1)
            done += 1
            ok = sample(done)
            bar.update(1)
    wall = time.perf_counter() - start
    t_arr, e_arr = np.asarray(times), np.asarray(e_tot)
    finite = np.isfinite(e_arr)
    drift = None
    if finite.sum() >= 3 and np.ptp(t_arr[finite]) > 0:
        drift = float(np.polyfit(t_arr[finite], e_arr[finite], 1)[0])
    return {
        "structure": label,
        "formula": atoms.get_chemical_formula(),
        "n_atoms": n,
        "steps_requested": steps,
        "steps_completed": done,
        "timestep_fs": timestep_fs,
        "temperature_target_K": temperature_K,
        "stable": reason is None,
        "stop_reason": reason,
        "energy_drift_eV_per_atom_per_ps": drift,
        "max_abs_energy_deviation_eV_per_atom": float(np.nanmax(np.abs(e_arr - e_arr[0])))
        if e_arr.size
        else None,
        "max_force_eV_per_A": max_force,
        "min_distance_A": min_dist,
        "temperature_mean_K": float(np.nanmean(temps)) if temps else None,
        "temperature_final_K": float(temps[-1]) if temps else None,
        "wall_seconds": wall,
        "steps_per_second": done / wall if wall > 0 else None,
        "trace": {
            "time_ps": [float(x) for x in times],
            "total_energy_per_atom": [float(x) for x in e_tot],
            "potential_energy_per_atom": [float(x) for x in e_pot],
            "temperature_K": [float(x) for x in temps],
        },
    }
