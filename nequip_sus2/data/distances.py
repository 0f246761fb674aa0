"""Shortest distance of each species pair in a data set (the inner radii of a repulsive core)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from ase.neighborlist import neighbor_list

__all__ = ["shortest_pair_distances"]


def shortest_pair_distances(
    frames: Iterable, type_names: Sequence[str] | None = None, cutoff: float = 6.0
) -> dict[str, float]:
    """Shortest distance of each species pair in ``frames`` (ASE ``Atoms``), ``{"A-B": r}``.

    Pairs are keyed by their chemical symbols in ``type_names`` order (``"Cu-Ni"``, not
    ``"Ni-Cu"``; all symbols found when ``type_names`` is ``None``); pairs never closer than
    ``cutoff`` are left out. Periodic images count. The result is what ``repulsive_core`` of
    :func:`nequip_sus2.model.SUS2Model` takes (add a ``default`` for the pairs left out).
    """
    frames = list(frames)
    if type_names is None:
        type_names = sorted({s for atoms in frames for s in atoms.get_chemical_symbols()})
    names = list(type_names)
    num = len(names)
    best = np.full(num * num, np.inf)
    for atoms in frames:
        types = np.array([names.index(s) for s in atoms.get_chemical_symbols()], dtype=np.int64)
        i, j, d = neighbor_list("ijd", atoms, cutoff)
        a, b = types[i], types[j]
        np.minimum.at(best, np.minimum(a, b) * num + np.maximum(a, b), d)
    return {
        f"{names[a]}-{names[b]}": float(best[a * num + b])
        for a in range(num)
        for b in range(a, num)
        if np.isfinite(best[a * num + b])
    }
