"""Freezing parameter blocks for fine-tuning (docs/theory.md §4.5: the original keeps alpha, r0
fixed)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def set_block_trainable(
    model: torch.nn.Module, cls: type, names: Sequence[str], trainable: bool
) -> torch.nn.Module:
    """Set ``requires_grad = trainable`` on the parameters ``names`` of every ``cls`` in ``model``.

    Raises ``ValueError`` when the model has no such block, so a modifier naming the wrong model
    fails loudly instead of silently training everything.
    """
    found = False
    for module in model.modules():
        if isinstance(module, cls):
            found = True
            for name in names:
                getattr(module, name).requires_grad_(trainable)
    if not found:
        raise ValueError(f"the model has no {cls.__name__} block to (un)freeze")
    return model
