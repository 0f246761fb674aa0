"""The decoupled element embedding (docs/theory.md §2.4)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from nequip.data import AtomicDataDict
from nequip.nn import GraphModuleMixin, model_modifier

from .._keys import RADIAL_BASIS_KEY
from .freezing import set_block_trainable


class DecoupledElementEmbedding(GraphModuleMixin, torch.nn.Module):
    r"""Radial functions from species-independent coefficients and per-species weights.

    .. math:: f_\mu(r; Z_i, Z_j) = w_{Z_i} w_{Z_j} \sum_n c_{\mu n}\, Q_n(r; \eta(\mu))

    ``coeffs`` is ``c`` with shape ``[N_mu, R]``, ``weights`` is ``w`` with shape ``[C]`` and
    ``eta_of_mu`` selects the scaling channel of each radial function (docs/theory.md §2.2). The
    ``.mtp`` format stores a weight row per ``mu`` but only row 0 is used; rows ``mu >= 1`` are
    kept as the frozen parameter ``unused_weights`` so that files round-trip and the parameter
    count equals the original tools' ``C + 2 N_eta C^2 + N_mu (R + C) + C + N_B``.
    """

    def __init__(
        self,
        type_names: Sequence[str],
        eta_of_mu: Sequence[int],
        radial_basis_size: int,
        coeffs: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        unused_weights: torch.Tensor | None = None,
        coeffs_init_range: float = 0.005,
        trainable: bool = True,
        in_field: str = RADIAL_BASIS_KEY,
        out_field: str = AtomicDataDict.EDGE_EMBEDDING_KEY,
        irreps_in=None,
    ):
        super().__init__()
        dtype = torch.get_default_dtype()
        num_types, n_mu = len(type_names), len(eta_of_mu)
        self.in_field = in_field
        self.out_field = out_field
        self.num_radial_funcs = n_mu
        if coeffs is None:
            coeffs = (2 * torch.rand(n_mu, radial_basis_size) - 1) * coeffs_init_range
        if weights is None:
            weights = torch.ones(num_types)
        self.coeffs = torch.nn.Parameter(
            torch.as_tensor(coeffs, dtype=dtype).clone(), requires_grad=trainable
        )
        self.weights = torch.nn.Parameter(
            torch.as_tensor(weights, dtype=dtype).clone(), requires_grad=trainable
        )
        assert self.coeffs.shape == (n_mu, radial_basis_size)
        assert self.weights.shape == (num_types,)
        if unused_weights is None:
            unused_weights = torch.ones(max(n_mu - 1, 0), num_types)
        # frozen: counted in the parameter count like the original tools, never used or trained
        self.unused_weights = torch.nn.Parameter(
            torch.as_tensor(unused_weights, dtype=dtype).clone(), requires_grad=False
        )
        assert self.unused_weights.shape == (max(n_mu - 1, 0), num_types)
        self.register_buffer("eta_of_mu", torch.as_tensor(list(eta_of_mu), dtype=torch.long))
        # [N_mu, N_eta, 1] one-hot of eta(mu): turns c into the block matrix of one GEMM
        num_channels = max(eta_of_mu) + 1
        self.register_buffer(
            "channel_onehot",
            torch.nn.functional.one_hot(self.eta_of_mu, num_channels).to(dtype).unsqueeze(-1),
        )
        self._init_irreps(
            irreps_in=irreps_in, required_irreps_in=[in_field], irreps_out={out_field: f"{n_mu}x0e"}
        )

    def extra_repr(self) -> str:
        return f"num_radial_funcs={self.num_radial_funcs}, radial_basis_size={self.coeffs.shape[1]}"

    @model_modifier(persistent=True, private=False)
    @classmethod
    def freeze_element_embedding(cls, model, frozen: bool = True):
        """Freeze (or, with ``frozen: false``, unfreeze) the element embedding c and w.

        Sets ``requires_grad`` of the radial coefficients ``coeffs`` and the species weights
        ``weights``; use it on a packaged model with ``nequip.model.modify``.
        """
        return set_block_trainable(model, cls, ("coeffs", "weights"), not frozen)

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        q = data[self.in_field].permute(1, 2, 0)  # [N_eta, R, E] (feature-major)
        # sum_n c[mu, n] Q[eta(mu), n, :] as [N_mu, N_eta R] @ [N_eta R, E]
        block = (self.channel_onehot * self.coeffs.unsqueeze(1)).reshape(self.num_radial_funcs, -1)
        radial = torch.mm(block, q.reshape(block.shape[1], -1))  # [N_mu, E]
        types = data[AtomicDataDict.ATOM_TYPE_KEY].view(-1)
        edge_index = data[AtomicDataDict.EDGE_INDEX_KEY]
        w = self.weights.index_select(0, types)
        pair_weight = w.index_select(0, edge_index[0]) * w.index_select(0, edge_index[1])
        data[self.out_field] = (radial * pair_weight).T  # [E, N_mu] view
        return data
