"""SUS2 training extras in NequIP's idioms (docs/training.md).

* :class:`FullBatchLBFGSLightningModule`: training module (``training_module._target_``)
  minimising the loss over the whole training set with L-BFGS, one iteration per epoch (the
  original code's full-batch optimiser);
* :class:`FusedNequIPLightningModule`, :class:`FusedEMALightningModule`: NequIP's mini-batch
  training modules with the loss gradient from the fused CPU kernels;
* :class:`LinearPrefit`: Lightning callback (``trainer.callbacks``) solving the linear readout
  and per-species offsets by weighted least squares (:func:`linear_prefit`), at the start and
  optionally every N epochs;
* :class:`SiteEnergySpread`, :class:`SiteEnergyCentre`: site-energy regularisers for the
  ``loss:`` block (``MetricsManager`` entries with ``field: null``);
* :class:`StopOnNonFiniteLoss`: callback that stops a run whose loss becomes nan/inf with an
  error (non-zero exit status);
* :class:`TrainingClock`: callback logging the training seconds at every validation
  (``time/train_seconds``, for accuracy-against-time curves);
* :class:`ReproducibleResume`: callback that makes a run resumed from ``last.ckpt`` repeat the
  uninterrupted run.
"""

from .clock import TrainingClock
from .fused import FusedEMALightningModule, FusedNequIPLightningModule
from .guards import NonFiniteLossError, ReproducibleResume, StopOnNonFiniteLoss
from .lbfgs import FullBatchLBFGSLightningModule
from .prefit import LinearPrefit, PrefitResult, PrefitSettings, linear_prefit
from .regularizers import SiteEnergyCentre, SiteEnergySpread

__all__ = [
    "FullBatchLBFGSLightningModule",
    "FusedEMALightningModule",
    "FusedNequIPLightningModule",
    "LinearPrefit",
    "NonFiniteLossError",
    "PrefitResult",
    "PrefitSettings",
    "ReproducibleResume",
    "SiteEnergyCentre",
    "SiteEnergySpread",
    "StopOnNonFiniteLoss",
    "TrainingClock",
    "linear_prefit",
]
