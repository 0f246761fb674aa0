"""The universal-scaling layer: per ordered species pair affine distance map (docs/theory.md §2.2),
and the prior that keeps it near a reference during training (docs/theory.md §4.8).

The per-species energy scale ``s`` and shift ``b`` of the site energy (docs/theory.md §2.7) are
applied by the host's :class:`nequip.nn.PerTypeScaleShift` (scale ``s``, shift ``b + s``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from nequip.data import AtomicDataDict
from nequip.nn import GraphModuleMixin, model_modifier
from nequip.nn.utils import with_edge_vectors_

from .._keys import SCALED_DISTANCE_KEY
from .freezing import set_block_trainable


class UniversalPairScaling(GraphModuleMixin, torch.nn.Module):
    r"""Scaled distance per edge and scaling channel.

    .. math:: r^* = \alpha_{\eta Z_i Z_j}(r - r^0_{\eta Z_i Z_j}),\qquad \xi = \tanh(r^*/2)

    ``alpha`` and ``r0`` have shape ``[N_eta, C, C]`` indexed by (channel, centre type, neighbour
    type); they are not symmetric in the pair.
    """

    def __init__(
        self,
        type_names: Sequence[str],
        num_channels: int,
        alpha: float | torch.Tensor,
        r0: float | torch.Tensor,
        trainable: bool = True,
        out_field: str = SCALED_DISTANCE_KEY,
        irreps_in=None,
    ):
        super().__init__()
        self.num_types = len(type_names)
        self.num_channels = num_channels
        self.out_field = out_field
        shape = (num_channels, self.num_types, self.num_types)
        dtype = torch.get_default_dtype()
        tables = {}
        for name, value in (("alpha", alpha), ("r0", r0)):
            value = torch.as_tensor(value, dtype=dtype)
            if value.numel() != 1 and tuple(value.shape) != shape:
                raise ValueError(
                    f"{name} must be a scalar or have shape [N_eta, C, C] = {list(shape)}, "
                    f"got {list(value.shape)}"
                )
            tables[name] = value.expand(shape).clone()
        self.alpha = torch.nn.Parameter(tables["alpha"], requires_grad=trainable)
        self.r0 = torch.nn.Parameter(tables["r0"], requires_grad=trainable)
        self._init_irreps(irreps_in=irreps_in, irreps_out={out_field: f"{num_channels}x0e"})

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}, num_types={self.num_types}"

    @model_modifier(persistent=True, private=False)
    @classmethod
    def freeze_pair_scaling(cls, model, frozen: bool = True):
        """Freeze (or, with ``frozen: false``, unfreeze) the universal-scaling block alpha, r0.

        Sets ``requires_grad`` of every ``alpha`` and ``r0`` in the model, as the original SUS2
        code's fine-tuning does; use it on a packaged model with ``nequip.model.modify``.
        """
        return set_block_trainable(model, cls, ("alpha", "r0"), not frozen)

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        data = with_edge_vectors_(data, with_lengths=True)
        r = data[AtomicDataDict.EDGE_LENGTH_KEY].view(-1).to(self.alpha.dtype)  # [E]
        types = data[AtomicDataDict.ATOM_TYPE_KEY].view(-1)
        edge_index = data[AtomicDataDict.EDGE_INDEX_KEY]
        pair = types.index_select(0, edge_index[0]) * self.num_types + types.index_select(
            0, edge_index[1]
        )
        # one [2 N_eta, C*C] table gathered by ordered pair -> [2 N_eta, E] (feature-major)
        table = torch.cat([self.alpha, self.r0], dim=0).reshape(2 * self.num_channels, -1)
        alpha, r0 = table.index_select(1, pair).chunk(2, dim=0)
        data[self.out_field] = torch.tanh(0.5 * alpha * (r - r0)).T  # [E, N_eta] view
        return data


def pair_scaling_prior(
    module: UniversalPairScaling, alpha_ref: torch.Tensor, r0_ref: torch.Tensor
) -> torch.Tensor:
    r"""Squared departure of the pair scaling from a reference ``alpha_ref`` = :math:`\alpha^0`,
    ``r0_ref`` = :math:`\hat r^0`, in units of the scaled distance (docs/theory.md §4.8):

    .. math:: P = \sum_{\eta a b} \left(\frac{\alpha_{\eta ab} - \alpha^0_{\eta ab}}
       {\alpha^0_{\eta ab}}\right)^2 + \left(\alpha^0_{\eta ab}\,(r^0_{\eta ab} -
       \hat r^0_{\eta ab})\right)^2

    Entries whose reference ``alpha`` is 0 count their absolute change.
    """
    safe = torch.where(alpha_ref == 0, torch.ones_like(alpha_ref), alpha_ref)
    relative = (module.alpha - alpha_ref) / safe.abs()
    shift = safe * (module.r0 - r0_ref)
    return relative.square().sum() + shift.square().sum()
