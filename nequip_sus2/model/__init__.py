"""SUS2 model builders for NequIP configs (``_target_: nequip_sus2.model.SUS2Model``)."""

from .sus2 import SUS2FromMTP, SUS2Model

__all__ = ["SUS2Model", "SUS2FromMTP"]
