"""The superlinear radial basis "RBChebyshev_sss" (docs/theory.md §2.3)."""

from __future__ import annotations

import torch
from nequip.data import AtomicDataDict
from nequip.nn import GraphModuleMixin
from nequip.nn.utils import with_edge_vectors_

from .._keys import RADIAL_BASIS_KEY, SCALED_DISTANCE_KEY


def chebyshev_polynomials(x: torch.Tensor, n: int, dim: int = -1) -> torch.Tensor:
    """``T_0(x) .. T_{n-1}(x)`` stacked on a new axis ``dim`` (T_{k+1} = 2x T_k - T_{k-1})."""
    polys = [torch.ones_like(x), x]
    for _ in range(2, n):
        polys.append(2.0 * x * polys[-1] - polys[-2])
    return torch.stack(polys[:n], dim=dim)


class ChebyshevRadialBasis(GraphModuleMixin, torch.nn.Module):
    r"""Radial basis per edge, scaling channel and Chebyshev order.

    .. math:: Q_n(r) = \sigma\, T_n(\xi)\, (r - R_c)^2 \quad (r < R_c),\qquad 0 \text{ otherwise}

    ``(r - R_c)^2`` is the only envelope: value and first derivative vanish at the cutoff. Edges at
    or beyond ``R_c`` (e.g. from a neighbour list with a skin) contribute exactly zero.
    """

    def __init__(
        self,
        r_max: float,
        radial_basis_size: int,
        radial_scaling: float = 1.0,
        in_field: str = SCALED_DISTANCE_KEY,
        out_field: str = RADIAL_BASIS_KEY,
        irreps_in=None,
    ):
        super().__init__()
        if radial_basis_size < 1:
            raise ValueError(f"radial_basis_size must be >= 1, got {radial_basis_size}")
        self.r_max = float(r_max)
        self.radial_basis_size = radial_basis_size
        self.radial_scaling = float(radial_scaling)
        self.in_field = in_field
        self.out_field = out_field
        self._init_irreps(
            irreps_in=irreps_in, required_irreps_in=[in_field], irreps_out={out_field: None}
        )

    def extra_repr(self) -> str:
        return (
            f"r_max={self.r_max}, radial_basis_size={self.radial_basis_size}, "
            f"radial_scaling={self.radial_scaling}"
        )

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        data = with_edge_vectors_(data, with_lengths=True)
        xi = data[self.in_field].T  # [N_eta, E] (feature-major)
        d = data[AtomicDataDict.EDGE_LENGTH_KEY].view(-1).to(xi.dtype) - self.r_max  # [E]
        envelope = torch.where(d < 0, self.radial_scaling * d * d, torch.zeros_like(d))
        # [N_eta, R, E] in memory, exposed as the [E, N_eta, R] field
        q = chebyshev_polynomials(xi, self.radial_basis_size, dim=1) * envelope
        data[self.out_field] = q.permute(2, 0, 1)
        return data
