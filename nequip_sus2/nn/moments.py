"""Moment tensors and their contraction to the scalar basis (spec §2.5, §2.6)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from nequip.data import AtomicDataDict
from nequip.nn import GraphModuleMixin
from nequip.nn.utils import with_edge_vectors_

from .._keys import SCALAR_BASIS_KEY

if TYPE_CHECKING:  # the program is only read at construction; packaged models need not import it
    from ..program import ContractionProgram


class MomentContraction(GraphModuleMixin, torch.nn.Module):
    r"""Per-atom scalar basis ``B_a(i)`` from a contraction program.

    Basic moments (slots ``0 .. n_basic-1``), with :math:`u = r_{ij}/r`:

    .. math:: M_b(i) = \sum_j f_{\mu_b}(r_{ij})\, u_x^{a_b} u_y^{b_b} u_z^{c_b}

    then every entry ``(p, q, m, o)`` adds :math:`m M_p M_q` to :math:`M_o`, and
    :math:`B_a = M_{\mathrm{mapping}[a]}`. Evaluation is vectorised: entries are grouped by the
    degree of their output slot (2, 3, 4, ...) and each group is one gather-multiply-scatter.
    """

    def __init__(
        self,
        program: ContractionProgram,
        in_field: str = AtomicDataDict.EDGE_EMBEDDING_KEY,
        out_field: str = SCALAR_BASIS_KEY,
        irreps_in=None,
    ):
        super().__init__()
        program.validate()
        self.in_field = in_field
        self.out_field = out_field
        self.num_slots = program.moments_count
        self.num_basic = len(program.basic)
        self.num_basis = len(program.mapping)
        self.max_power = max((max(e[1:]) for e in program.basic), default=0)

        mu = [e[0] for e in program.basic]
        # distinct monomials u_x^a u_y^b u_z^c, each computed once per edge
        monomials = list(dict.fromkeys(e[1:] for e in program.basic))
        p1 = self.max_power + 1
        self.register_buffer("basic_mu", torch.as_tensor(mu, dtype=torch.long))
        self.register_buffer(
            "basic_monomial",
            torch.as_tensor([monomials.index(e[1:]) for e in program.basic], dtype=torch.long),
        )
        # indices into the flattened [num_edges, 3 * (max_power + 1)] table of u_x^k, u_y^k, u_z^k
        a, b, c = (list(col) for col in zip(*monomials, strict=True))
        self.register_buffer("monomial_px", torch.as_tensor(a, dtype=torch.long))
        self.register_buffer("monomial_py", torch.as_tensor([p1 + k for k in b], dtype=torch.long))
        self.register_buffer(
            "monomial_pz", torch.as_tensor([2 * p1 + k for k in c], dtype=torch.long)
        )

        degrees = program.degrees()
        order = sorted(range(len(program.times)), key=lambda k: degrees[program.times[k][3]])
        entries = [program.times[k] for k in order]
        stage_of = [degrees[e[3]] for e in entries]
        self.stage_bounds = (
            [0]
            + [k for k in range(1, len(entries)) if stage_of[k] != stage_of[k - 1]]
            + [len(entries)]
        )
        if not entries:
            self.stage_bounds = [0]
        p, q, m, o = (list(col) for col in zip(*entries, strict=True)) if entries else ([],) * 4
        dtype = torch.get_default_dtype()
        self.register_buffer("times_p", torch.as_tensor(p, dtype=torch.long))
        self.register_buffer("times_q", torch.as_tensor(q, dtype=torch.long))
        self.register_buffer("times_m", torch.as_tensor(m, dtype=dtype))
        self.register_buffer("times_o", torch.as_tensor(o, dtype=torch.long))
        self.register_buffer("mapping", torch.as_tensor(program.mapping, dtype=torch.long))
        self._init_irreps(
            irreps_in=irreps_in,
            required_irreps_in=[in_field],
            irreps_out={out_field: f"{self.num_basis}x0e"},
        )

    def extra_repr(self) -> str:
        return (
            f"num_slots={self.num_slots}, num_basic={self.num_basic}, "
            f"num_entries={self.times_o.numel()}, num_basis={self.num_basis}"
        )

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        data = with_edge_vectors_(data, with_lengths=True)
        radial = data[self.in_field]  # [num_edges, N_mu]
        vec = data[AtomicDataDict.EDGE_VECTORS_KEY].to(radial.dtype)
        length = data[AtomicDataDict.EDGE_LENGTH_KEY].view(-1, 1).to(radial.dtype)
        u = vec / length
        powers = [torch.ones_like(u), u]
        for _ in range(2, self.max_power + 1):
            powers.append(powers[-1] * u)
        # [num_edges, 3 * (max_power + 1)]: u_x^0..u_x^P, u_y^0.., u_z^0..
        table = torch.stack(powers[: self.max_power + 1], dim=-1).reshape(
            -1, 3 * (self.max_power + 1)
        )
        monomials = (
            table.index_select(1, self.monomial_px)
            * table.index_select(1, self.monomial_py)
            * table.index_select(1, self.monomial_pz)
        )
        edge_moments = radial.index_select(1, self.basic_mu) * monomials.index_select(
            1, self.basic_monomial
        )
        num_nodes = AtomicDataDict.num_nodes(data)
        basic = edge_moments.new_zeros(num_nodes, self.num_basic).index_add(
            0, data[AtomicDataDict.EDGE_INDEX_KEY][0], edge_moments
        )
        moments = torch.cat(
            [basic, basic.new_zeros(basic.shape[0], self.num_slots - self.num_basic)], dim=1
        )
        for s in range(len(self.stage_bounds) - 1):
            lo, hi = self.stage_bounds[s], self.stage_bounds[s + 1]
            prod = (
                moments.index_select(1, self.times_p[lo:hi])
                * moments.index_select(1, self.times_q[lo:hi])
                * self.times_m[lo:hi]
            )
            moments = moments.index_add(1, self.times_o[lo:hi], prod)
        data[self.out_field] = moments.index_select(1, self.mapping)
        return data
