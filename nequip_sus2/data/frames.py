"""Which configuration (frame) of a batch each atom belongs to."""

from __future__ import annotations

import torch
from nequip.data import AtomicDataDict

__all__ = ["frame_index"]


def frame_index(data: AtomicDataDict.Type) -> tuple[torch.Tensor, int]:
    """Per-atom frame index ``[N]`` and the number of frames; an unbatched structure is one
    frame (all zeros)."""
    if AtomicDataDict.BATCH_KEY in data:
        return data[AtomicDataDict.BATCH_KEY].view(-1), AtomicDataDict.num_frames(data)
    pos = data[AtomicDataDict.POSITIONS_KEY]
    return torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device), 1
