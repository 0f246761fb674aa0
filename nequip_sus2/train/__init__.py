"""SUS2 training extras in NequIP's idioms (docs/training.md).

* :class:`LinearPrefit`: Lightning callback (``trainer.callbacks``) solving the linear readout
  and per-species offsets by weighted least squares (:func:`linear_prefit`), at the start and
  optionally every N epochs;
* :class:`SiteEnergySpread`, :class:`SiteEnergyCentre`: site-energy regularisers for the
  ``loss:`` block (``MetricsManager`` entries with ``field: null``).
"""

from .prefit import LinearPrefit, PrefitResult, linear_prefit
from .regularizers import SiteEnergyCentre, SiteEnergySpread

__all__ = [
    "LinearPrefit",
    "PrefitResult",
    "SiteEnergyCentre",
    "SiteEnergySpread",
    "linear_prefit",
]
