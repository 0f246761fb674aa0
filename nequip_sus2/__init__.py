"""nequip-sus2: the SUS2 machine-learning interatomic potential as a NequIP extension.

Imported by NequIP on start-up through the ``nequip.extension`` entry point, so this module stays
light: models are reached through ``_target_: nequip_sus2.model.SUS2Model`` in configs. It only
registers the compile targets ``sus2_ase`` (``ase`` plus the per-atom extrapolation grade) and
``pair_sus2`` (multi-rank LAMMPS, the ``pair_allegro`` contract; see ``nequip_sus2.lammps``).
"""

from .active_set import register_compile_targets as _register_compile_targets
from .lammps.target import register_compile_target as _register_lammps_target

__version__ = "0.1.0"

_register_compile_targets()
_register_lammps_target()

__all__ = ["__version__"]
