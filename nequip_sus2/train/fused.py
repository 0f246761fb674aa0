"""Mini-batch training on the fused CPU kernels (``training_module._target_``).

:class:`FusedNequIPLightningModule` and :class:`FusedEMALightningModule` are NequIP's
``NequIPLightningModule`` and ``EMALightningModule`` whose training steps take the loss gradient
from :class:`~nequip_sus2.kernels.training.FusedLossGradient` (docs/theory.md §4.6) instead of
PyTorch's double backward: the same gradient to rounding, several times faster on CPU. The
step returns ``loss + (Phi - Phi.detach())``: NequIP's loss value (logged as usual) whose
gradient is the fused one, so the optimiser, gradient clipping, EMA, DDP and the callbacks
work unchanged. Validation runs on the inference kernels.
"""

from __future__ import annotations

from nequip.train import EMALightningModule, NequIPLightningModule

from ..kernels.training import FusedLossGradient

__all__ = ["FusedEMALightningModule", "FusedNequIPLightningModule", "FusedTrainingMixin"]


class FusedTrainingMixin:
    """Routes the training forward through the kernels and turns the step's loss into one
    whose gradient is the fused path's."""

    _fused: FusedLossGradient | None = None
    _fused_out = None

    def forward(self, inputs):
        if self.training:
            # the kernel modules are swapped in at the first training step, not when the module
            # is built, so that a model loaded from the checkpoint is the plain one
            if self._fused is None:
                self._fused = FusedLossGradient(self.model)
            self._fused_out = self._fused.outputs(super().forward, inputs)
            return self._fused_out
        return super().forward(inputs)

    def training_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        loss = super().training_step(batch, batch_idx, dataloader_idx)
        out, self._fused_out = self._fused_out, None
        phi = self._fused.loss_objective(loss, out)
        return loss.detach() + (phi - phi.detach()).to(loss.dtype)


class FusedNequIPLightningModule(FusedTrainingMixin, NequIPLightningModule):
    """``nequip.train.NequIPLightningModule`` with the fused training path (CPU, SUS2 models);
    same arguments."""


class FusedEMALightningModule(FusedTrainingMixin, EMALightningModule):
    """``nequip.train.EMALightningModule`` with the fused training path (CPU, SUS2 models);
    same arguments."""
