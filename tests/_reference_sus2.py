"""An independent SUS2 evaluator written from the equations of docs/theory.md §2, for tests only.

It shares no code with ``nequip_sus2.nn``: numpy in extended precision (``np.longdouble``),
ASE's neighbour list, an explicit loop over the contraction program, and the published
coefficient layout read straight from the parsed file. Used to check the model and to arbitrate
where the golden files' own rounding shows.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.neighborlist import neighbor_list

LD = np.longdouble


def reference_energy(mtp, types, positions, cell) -> LD:
    """Total energy E = sum_i b_Zi + s_Zi (1 + sum_a theta_a B_a(i)) in extended precision."""
    C, L, R, n_mu = mtp.species_count, mtp.L, mtp.radial_basis_size, mtp.radial_funcs_count
    types = np.asarray(types)
    pbc = cell is not None
    atoms = Atoms(
        numbers=np.ones(len(types), dtype=int),
        positions=np.asarray(positions, dtype=np.float64),
        cell=np.asarray(cell) if pbc else None,
        pbc=np.abs(np.asarray(cell)).sum(1) > 0 if pbc else False,
    )
    i, j, shift = neighbor_list("ijS", atoms, mtp.max_dist)
    pos = np.asarray(positions, dtype=LD)
    vec = pos[j] - pos[i]
    if pbc:
        vec = vec + shift.astype(LD) @ np.asarray(cell, dtype=LD)
    r = np.sqrt((vec * vec).sum(1))
    keep = r < LD(mtp.max_dist)
    i, j, vec, r = i[keep], j[keep], vec[keep], r[keep]
    u = vec / r[:, None]

    if mtp.scaling_map == "K":
        eta = [mu // (L + 1) for mu in range(n_mu)]
    elif mtp.scaling_map == "L":
        eta = [mu % (L + 1) for mu in range(n_mu)]
    else:
        eta = list(range(n_mu))
    n_eta = max(eta) + 1
    scal = np.array([LD(x) for x in mtp.scal_coeffs]).reshape(n_eta, 2, C, C)
    rows = np.array([[LD(x) for x in row] for row in mtp.radial_coeffs])
    c, w = rows[:, :R], rows[0, R:]
    sigma = LD(mtp.scaling) * LD(1.0 if mtp.radial_scaling is None else mtp.radial_scaling)
    zi, zj = types[i], types[j]
    envelope = sigma * (r - LD(mtp.max_dist)) ** 2

    f = np.zeros((len(r), n_mu), dtype=LD)
    for mu in range(n_mu):
        alpha, r0 = scal[eta[mu], 0, zi, zj], scal[eta[mu], 1, zi, zj]
        xi = np.tanh(alpha * (r - r0) / 2)
        t_prev, t = np.ones_like(xi), xi
        acc = c[mu, 0] * t_prev + (c[mu, 1] * t if R > 1 else 0)
        for n in range(2, R):
            t_prev, t = t, 2 * xi * t - t_prev
            acc = acc + c[mu, n] * t
        f[:, mu] = w[zi] * w[zj] * acc * envelope

    moments = np.zeros((len(types), mtp.program.moments_count), dtype=LD)
    for slot, (mu, a, b, cc) in enumerate(mtp.program.basic):
        np.add.at(moments[:, slot], i, f[:, mu] * u[:, 0] ** a * u[:, 1] ** b * u[:, 2] ** cc)
    for p, q, m, o in mtp.program.times:
        moments[:, o] += m * moments[:, p] * moments[:, q]
    basis = moments[:, list(mtp.program.mapping)]
    theta = np.array([LD(x) for x in mtp.moment_coeffs])
    s = np.array([LD(x) for x in mtp.species_coeffs])
    b = np.array([LD(x) for x in mtp.shift_coeffs])
    return (b[types] + s[types] * (1 + basis @ theta)).sum()


def reference_forces(mtp, types, positions, cell, atoms_idx, h: float = 1e-3) -> np.ndarray:
    """Forces -dE/dr on the given atoms: central differences of the energy above, Richardson
    extrapolated (error O(h^4)), in extended precision."""
    pos = np.asarray(positions, dtype=LD)
    out = np.zeros((len(atoms_idx), 3), dtype=LD)

    def central(a: int, d: int, step: LD) -> LD:
        plus, minus = pos.copy(), pos.copy()
        plus[a, d] += step
        minus[a, d] -= step
        e_p = reference_energy(mtp, types, plus, cell)
        e_m = reference_energy(mtp, types, minus, cell)
        return -(e_p - e_m) / (2 * step)

    for k, a in enumerate(atoms_idx):
        for d in range(3):
            coarse, fine = central(a, d, LD(h)), central(a, d, LD(h) / 2)
            out[k, d] = (4 * fine - coarse) / 3
    return out
