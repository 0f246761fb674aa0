"""ASE integration: :class:`SUS2Calculator` (NequIP's calculator plus the extrapolation grade),
the MD observer :class:`ExtrapolationMonitor`, and the evaluation of a model on a data set
(:mod:`nequip_sus2.ase.evaluate`: ``calc-errors``, ``calc-grade``)."""

from .calculator import ExtrapolationError, ExtrapolationMonitor, SUS2Calculator

__all__ = ["ExtrapolationError", "ExtrapolationMonitor", "SUS2Calculator"]
