"""nequip-sus2: the SUS2 machine-learning interatomic potential as a NequIP extension.

Imported by NequIP on start-up through the ``nequip.extension`` entry point, so this module stays
light: models are reached through ``_target_: nequip_sus2.model.SUS2Model`` in configs. It only
registers the ``nequip-compile`` targets ``sus2_ase`` (``ase`` plus the per-atom extrapolation
grade), ``pair_sus2`` and ``pair_sus2_grade`` (multi-rank LAMMPS, the ``pair_allegro``
contract); see :mod:`nequip_sus2._compile`.
"""

from ._compile import register_compile_targets as _register_compile_targets

__version__ = "0.1.0"

_register_compile_targets()

__all__ = ["__version__"]
