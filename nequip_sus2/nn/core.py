r"""A repulsive core below the trained domain: ZBL switched on, and the learned part floored.

For an edge of species pair :math:`(a, b)` with inner radius :math:`r_{ab}` (the shortest
distance of the pair the model was trained on; a symmetric table) and width :math:`w`, let
:math:`t = (r_{ab} - r)/w` and :math:`s = \tau^3 (10 - 15 \tau + 6 \tau^2)` with
:math:`\tau = \mathrm{clip}(t, 0, 1)` (the quintic smoothstep: 0 at :math:`r \ge r_{ab}`, 1 at
:math:`r \le r_{ab} - w`, C2). Then

.. math::

    E_\mathrm{core} = \tfrac12 \sum_{i \ne j} s_{ij}\, E_\mathrm{ZBL}(r_{ij}; Z_i, Z_j)

is added to the site energies, and the learned part sees every edge at the floored length

.. math::

    \phi(r) = r + w\,S(t),\qquad S(t) = \int_0^t s = \tau^4 (5/2 - 3 \tau + \tau^2)
    + \max(t - 1, 0),

along the same direction: :math:`\phi' = 1 - s`, so :math:`\phi(r) = r` for :math:`r \ge r_{ab}`
and :math:`\phi(r) = r_{ab} - w/2` for :math:`r \le r_{ab} - w`. Below :math:`r_{ab} - w` the pair's
learned energy no longer changes with :math:`r` (the model is never asked about distances far below
its data) and ZBL alone pushes the atoms apart. At and beyond :math:`r_{ab}` both terms are exact
no-ops (:math:`s = 0`, :math:`\phi(r) = r`): energies, forces and virials inside the trained
domain are bit for bit those of the model without the core.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from nequip.data import AtomicDataDict
from nequip.data.misc import chemical_symbols_to_atomic_numbers_dict
from nequip.nn import GraphModuleMixin
from nequip.nn.pair_potential import _ZBL
from nequip.nn.utils import with_edge_vectors_

#: per-atom core energy, from :class:`RepulsiveCore` to :class:`AddCoreEnergy`
CORE_ENERGY_KEY = "repulsive_core_energy"

#: e^2 / (4 pi eps0) in eV Angstrom, the value LAMMPS' ``metal`` units use
_COULOMB_EV_A = 14.399645

__all__ = [
    "CORE_ENERGY_KEY",
    "AddCoreEnergy",
    "RepulsiveCore",
    "core_radius_table",
    "smoothstep",
]


def smoothstep(t: torch.Tensor) -> torch.Tensor:
    """``t^3 (10 - 15 t + 6 t^2)`` of ``t`` clipped to [0, 1]."""
    t = t.clamp(0.0, 1.0)
    return t * t * t * (10.0 + t * (-15.0 + 6.0 * t))


def _pair_key(a: str, b: str) -> str:
    return f"{a}-{b}"


def core_radius_table(
    radius: float | Mapping[str, float], type_names: Sequence[str]
) -> list[list[float]]:
    """The symmetric ``[C, C]`` table of inner radii from a float (all pairs) or a mapping
    ``{"A-B": r, ...}`` (either order of a pair; ``default`` for the pairs not named)."""
    names = list(type_names)
    if not isinstance(radius, Mapping):
        value = float(radius)
        table = [[value] * len(names) for _ in names]
    else:
        given: dict[tuple[int, int], float] = {}
        default = radius.get("default")
        for key, value in radius.items():
            if key == "default":
                continue
            parts = str(key).split("-")
            if len(parts) != 2 or any(p not in names for p in parts):
                raise ValueError(
                    f"repulsive_core: {key!r} is not a pair 'A-B' of type_names {names}"
                )
            i, j = sorted(names.index(p) for p in parts)
            if (i, j) in given and given[(i, j)] != float(value):
                raise ValueError(f"repulsive_core: two different radii for the pair {key!r}")
            given[(i, j)] = float(value)
        table = [[0.0] * len(names) for _ in names]
        missing = []
        for i in range(len(names)):
            for j in range(i, len(names)):
                value = given.get((i, j), default)
                if value is None:
                    missing.append(_pair_key(names[i], names[j]))
                    continue
                table[i][j] = table[j][i] = float(value)
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise ValueError(
                f"repulsive_core: no inner radius for {len(missing)} pair(s) ({shown}); "
                "name them or give a 'default'"
            )
    for i, row in enumerate(table):
        for j, value in enumerate(row):
            if not 0 < value < math.inf:
                raise ValueError(
                    f"repulsive_core: the inner radius of {_pair_key(names[i], names[j])} must "
                    f"be positive and finite, got {value}"
                )
    return table


class RepulsiveCore(GraphModuleMixin, torch.nn.Module):
    """ZBL below the trained domain and the floored edge lengths of the learned part (see the
    module docstring); goes first in the model, :class:`AddCoreEnergy` after the site energies.

    ``inner_radius`` is the ``[C, C]`` table of :math:`r_{ab}` (see :func:`core_radius_table`),
    ``width`` is :math:`w` in Angstrom and ``chemical_species`` the element of each type (ZBL
    needs the nuclear charges; default: the type names). Energies in eV, distances in Angstrom.
    """

    def __init__(
        self,
        type_names: Sequence[str],
        inner_radius: float | Mapping[str, float] | Sequence[Sequence[float]],
        width: float = 0.5,
        chemical_species: Sequence[str] | None = None,
        out_field: str = CORE_ENERGY_KEY,
        irreps_in=None,
    ):
        super().__init__()
        names = list(type_names)
        species = list(chemical_species) if chemical_species is not None else names
        if len(species) != len(names):
            raise ValueError(
                f"repulsive_core: {len(species)} chemical_species for {len(names)} type_names"
            )
        unknown = [s for s in species if s not in chemical_symbols_to_atomic_numbers_dict]
        if unknown:
            raise ValueError(
                f"repulsive_core: ZBL needs chemical symbols, got {unknown} (type_names that are "
                "not elements need chemical_species)"
            )
        if isinstance(inner_radius, (int, float, Mapping)):
            inner_radius = core_radius_table(inner_radius, names)
        dtype = torch.get_default_dtype()
        table = torch.as_tensor(inner_radius, dtype=dtype)
        if tuple(table.shape) != (len(names), len(names)) or not torch.equal(table, table.T):
            raise ValueError(
                f"repulsive_core: inner_radius must be a symmetric [C, C] = "
                f"[{len(names)}, {len(names)}] table, got shape {list(table.shape)}"
            )
        width = float(width)
        if not 0 < width <= float(table.min()):
            raise ValueError(
                f"repulsive_core: the width must lie in (0, smallest inner radius = "
                f"{float(table.min())}], got {width}"
            )
        self.num_types = len(names)
        self.width = width
        self.out_field = out_field
        self.register_buffer("inner_radius", table)
        self.register_buffer(
            "atomic_numbers",
            torch.as_tensor(
                [chemical_symbols_to_atomic_numbers_dict[s] for s in species], dtype=dtype
            ),
        )
        self.chemical_species = species
        self._zbl = _ZBL()
        self._init_irreps(irreps_in=irreps_in, irreps_out={out_field: "0e"})

    def extra_repr(self) -> str:
        r = self.inner_radius
        return (
            f"inner_radius=[{float(r.min()):.4g}, {float(r.max()):.4g}] A, width={self.width} A, "
            f"chemical_species={self.chemical_species}"
        )

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        data = with_edge_vectors_(data, with_lengths=True)
        vec = data[AtomicDataDict.EDGE_VECTORS_KEY]
        r = data[AtomicDataDict.EDGE_LENGTH_KEY].view(-1)
        types = data[AtomicDataDict.ATOM_TYPE_KEY].view(-1)
        edge_index = data[AtomicDataDict.EDGE_INDEX_KEY]
        pair = types.index_select(0, edge_index[0]) * self.num_types + types.index_select(
            0, edge_index[1]
        )
        r_in = self.inner_radius.view(-1).index_select(0, pair).to(r.dtype)
        t = (r_in - r) / self.width
        switch = smoothstep(t)
        # half of each pair's ZBL energy on each of its two edges
        zbl = self._zbl(self.atomic_numbers, r, types, edge_index, 0.5 * _COULOMB_EV_A)
        energy = torch.zeros(AtomicDataDict.num_nodes(data), dtype=r.dtype, device=r.device)
        energy = energy.index_add(0, edge_index[0], switch * zbl.to(r.dtype))
        data[self.out_field] = energy.unsqueeze(-1)
        # the learned part sees phi(r) = r + w S(t) along the same direction; exactly r, and the
        # very same tensors, at and beyond the inner radius
        tc = t.clamp(0.0, 1.0)
        integral = tc**4 * (2.5 + tc * (-3.0 + tc)) + (t - 1.0).clamp(min=0.0)
        phi = r + self.width * integral
        inside = r < r_in
        floored = torch.where(inside, phi, r)
        data[AtomicDataDict.EDGE_VECTORS_KEY] = torch.where(
            inside.unsqueeze(-1), vec * (phi / r).unsqueeze(-1), vec
        )
        data[AtomicDataDict.EDGE_LENGTH_KEY] = floored.unsqueeze(-1)
        return data


class AddCoreEnergy(GraphModuleMixin, torch.nn.Module):
    """Adds the per-atom core energy of :class:`RepulsiveCore` to the site energies (after the
    per-species scale and shift, so that the core is in eV whatever the learned scales)."""

    def __init__(
        self,
        in_field: str = CORE_ENERGY_KEY,
        out_field: str = AtomicDataDict.PER_ATOM_ENERGY_KEY,
        irreps_in=None,
    ):
        super().__init__()
        self.in_field = in_field
        self.out_field = out_field
        self._init_irreps(
            irreps_in=irreps_in, required_irreps_in=[in_field, out_field], irreps_out={}
        )

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        energy = data[self.out_field]
        data[self.out_field] = energy + data[self.in_field].to(energy.dtype)
        return data
