"""Training time in the metrics log, for accuracy-against-time curves (``trainer.callbacks``)."""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

__all__ = ["TrainingClock"]


class TrainingClock(Callback):
    """Logs ``time/train_seconds``, the wall-clock seconds since training started (validation
    included), at the end of every validation during training, beside the validation metrics
    of that epoch; a run resumed from a checkpoint continues its count (the seconds are
    checkpointed)."""

    def __init__(self):
        self._start: float | None = None
        self._offset = 0.0

    def seconds(self) -> float:
        return self._offset + (0.0 if self._start is None else time.perf_counter() - self._start)

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self._start is None or trainer.state.fn != TrainerFn.FITTING:
            return
        pl_module.log("time/train_seconds", self.seconds(), on_epoch=True, sync_dist=False)

    def state_dict(self) -> dict:
        return {"seconds": self.seconds()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._offset = float(state_dict.get("seconds", 0.0))
