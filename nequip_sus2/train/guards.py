"""Lightning callbacks that keep ``nequip-train`` runs honest (``trainer.callbacks``).

* :class:`StopOnNonFiniteLoss`: stop a run whose training loss (or a validation metric) becomes
  nan or inf with a clear error and a non-zero exit status, before the bad step changes the
  weights (Lightning's ``EarlyStopping(check_finite=True)`` stops too, but exits with status 0);
* :class:`ReproducibleResume`: make a run resumed from ``last.ckpt`` repeat the uninterrupted
  run (same batches, same learning-rate schedule, so the same losses).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

__all__ = ["NonFiniteLossError", "ReproducibleResume", "StopOnNonFiniteLoss"]


class NonFiniteLossError(RuntimeError):
    """The training loss or a validation metric became nan or inf."""


def _value(x: Any) -> float | None:
    if isinstance(x, torch.Tensor):
        return float(x.detach().float().reshape(-1)[0]) if x.numel() == 1 else None
    if isinstance(x, (int, float)):
        return float(x)
    return None


class StopOnNonFiniteLoss(Callback):
    """Raise :class:`NonFiniteLossError` when the training loss becomes nan or inf.

    The loss of every training step is checked before its backward pass (so the bad step does
    not change the weights); with ``check_val: true`` (default) the
    validation metrics are checked at the end of each validation too. The error names the epoch,
    the step and the usual causes; ``nequip-train`` then exits with a non-zero status. Under DDP
    the ranks agree on the decision, so that no rank is left waiting.

    Args:
        check_val (bool): also check the validation metrics (default ``True``)
    """

    def __init__(self, check_val: bool = True) -> None:
        self.check_val = check_val

    @staticmethod
    def _any_rank(trainer, bad: bool) -> bool:
        if trainer.world_size > 1:
            return bool(trainer.strategy.reduce_boolean_decision(bad, all=False))
        return bad

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if self._any_rank(trainer, bad):
            value = _value(loss) if bad else None
            raise NonFiniteLossError(
                f"the training loss is {value if value is not None else 'nan/inf'} at epoch "
                f"{trainer.current_epoch}, step {trainer.global_step}: training stopped before "
                "this step changed the weights (last.ckpt holds the last checkpoint written). Usual "
                "causes: a nan/inf label or position in the training data, a learning rate that "
                "diverges, or a structure with atoms far too close"
            )

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self.check_val or trainer.sanity_checking:
            return
        bad = sorted(
            key
            for key, x in trainer.callback_metrics.items()
            if key.startswith("val") and (v := _value(x)) is not None and not math.isfinite(v)
        )
        if self._any_rank(trainer, bool(bad)):
            raise NonFiniteLossError(
                f"validation metric(s) {', '.join(bad) or '(on another rank)'} are nan/inf at "
                f"epoch {trainer.current_epoch}: training stopped. Usual causes: a nan/inf label "
                "or position in the validation data, or diverged weights"
            )


_RESUME_KEY = "nequip_sus2_reproducible_resume"


class ReproducibleResume(Callback):
    """Make a run resumed from a checkpoint (``ckpt_path``) repeat the uninterrupted run.

    Without it a run resumed from ``last.ckpt`` drifts from the uninterrupted run (validation
    losses about a percent apart after a few epochs) for two reasons outside SUS2:

    * NequIP's data module saves the state of its training-data generator in checkpoints, but
      Lightning restores it after ``setup`` has already built the generator from the seed, so
      the resumed run draws its batches in another order. The restored state is put into the
      generator as soon as the checkpoint is loaded.
    * Checkpoints are written at the end of an epoch, before Lightning steps the epoch-interval
      ``ReduceLROnPlateau`` schedulers; on resume Lightning skips that step (the metric it
      needs is not in the checkpoint), so the learning-rate reductions come one epoch late. The
      monitored value is saved with the checkpoint and the step is made when training resumes.

    Without a resume it does nothing. Other schedulers, the optimizer, EMA weights and the
    SUS2 callbacks are restored by Lightning and NequIP as they are.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        progress = trainer.fit_loop.epoch_loop.batch_progress
        if not getattr(progress, "is_last_batch", False):
            return  # mid-epoch: Lightning makes the epoch-end step itself when it gets there
        monitored = {}
        for index, config in enumerate(trainer.lr_scheduler_configs):
            if not (config.reduce_on_plateau and config.interval == "epoch"):
                continue
            if (trainer.current_epoch + 1) % config.frequency:
                continue
            value = trainer.callback_metrics.get(config.monitor)
            if value is not None:
                monitored[index] = float(value)
        checkpoint[_RESUME_KEY] = {"epoch": trainer.current_epoch, "plateau_monitor": monitored}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        dm = getattr(trainer, "datamodule", None)
        generator = getattr(dm, "train_generator", None)
        state = getattr(dm, "train_generator_state", None)
        if isinstance(generator, torch.Generator) and isinstance(state, torch.Tensor):
            generator.set_state(state)
        self._pending = checkpoint.get(_RESUME_KEY)

    def on_train_start(self, trainer, pl_module) -> None:
        pending, self._pending = self._pending, None
        if not pending or pending.get("epoch") != trainer.current_epoch - 1:
            return
        configs = trainer.lr_scheduler_configs
        for index, value in pending.get("plateau_monitor", {}).items():
            if int(index) < len(configs):
                pl_module.lr_scheduler_step(configs[int(index)].scheduler, value)
