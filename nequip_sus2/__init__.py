"""nequip-sus2: the SUS2 machine-learning interatomic potential as a NequIP extension.

Imported by NequIP on start-up through the ``nequip.extension`` entry point, so this module stays
light: models are reached through ``_target_: nequip_sus2.model.SUS2Model`` in configs. It only
registers the ``sus2_ase`` compile target (``ase`` plus the per-atom extrapolation grade).
"""

from .active_set import register_compile_targets as _register_compile_targets

__version__ = "0.1.0"

_register_compile_targets()

__all__ = ["__version__"]
