"""The linear readout of the scalar basis (docs/theory.md §2.7)."""

from __future__ import annotations

import torch
from nequip.data import AtomicDataDict
from nequip.nn import GraphModuleMixin

from .._keys import SCALAR_BASIS_KEY


class LinearReadout(GraphModuleMixin, torch.nn.Module):
    r"""Raw per-atom output :math:`x_i = \sum_a \theta_a B_a(i)`.

    The site energy is then ``E_i = b + s (1 + x_i)`` via :class:`nequip.nn.PerTypeScaleShift`.
    """

    def __init__(
        self,
        num_basis: int,
        theta: torch.Tensor | None = None,
        theta_init_std: float = 1.0,
        in_field: str = SCALAR_BASIS_KEY,
        out_field: str = AtomicDataDict.PER_ATOM_ENERGY_KEY,
        irreps_in=None,
    ):
        super().__init__()
        dtype = torch.get_default_dtype()
        if theta is None:
            theta = torch.randn(num_basis) * (theta_init_std / num_basis**0.5)
        self.theta = torch.nn.Parameter(torch.as_tensor(theta, dtype=dtype).clone().view(-1, 1))
        assert self.theta.shape == (num_basis, 1)
        self.in_field = in_field
        self.out_field = out_field
        self._init_irreps(
            irreps_in=irreps_in,
            required_irreps_in=[in_field],
            irreps_out={out_field: "0e"},
        )

    def extra_repr(self) -> str:
        return f"num_basis={self.theta.shape[0]}"

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        data[self.out_field] = torch.mm(data[self.in_field], self.theta)
        return data
