"""SUS2 training extras in NequIP's idioms (docs/training.md).

* :class:`LinearPrefit`: Lightning callback (``trainer.callbacks``) solving the linear readout
  and per-species offsets by weighted least squares (:func:`linear_prefit`), at the start and
  optionally every N epochs;
* :class:`SiteEnergySpread`, :class:`SiteEnergyCentre`: site-energy regularisers for the
  ``loss:`` block (``MetricsManager`` entries with ``field: null``);
* :class:`StopOnNonFiniteLoss`: callback that stops a run whose loss becomes nan/inf with an
  error (non-zero exit status);
* :class:`ReproducibleResume`: callback that makes a run resumed from ``last.ckpt`` repeat the
  uninterrupted run.
"""

from .guards import NonFiniteLossError, ReproducibleResume, StopOnNonFiniteLoss
from .prefit import LinearPrefit, PrefitResult, linear_prefit
from .regularizers import SiteEnergyCentre, SiteEnergySpread

__all__ = [
    "LinearPrefit",
    "NonFiniteLossError",
    "PrefitResult",
    "ReproducibleResume",
    "SiteEnergyCentre",
    "SiteEnergySpread",
    "StopOnNonFiniteLoss",
    "linear_prefit",
]
