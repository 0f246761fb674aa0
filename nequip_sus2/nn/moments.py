"""Moment tensors and their contraction to the scalar basis (docs/theory.md §2.5, §2.6)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from nequip.data import AtomicDataDict
from nequip.nn import GraphModuleMixin, model_modifier
from nequip.nn.utils import with_edge_vectors_

from .._keys import SCALAR_BASIS_KEY
from ..program import ContractionProgram
from .extrapolation import empty_grade_state, insert_extrapolation_grade


class MomentContraction(GraphModuleMixin, torch.nn.Module):
    r"""Per-atom scalar basis ``B_a(i)`` from a contraction program.

    Basic moments (slots ``0 .. n_basic-1``), with :math:`u = r_{ij}/r`:

    .. math:: M_b(i) = \sum_j f_{\mu_b}(r_{ij})\, u_x^{a_b} u_y^{b_b} u_z^{c_b}

    then every entry ``(p, q, m, o)`` adds :math:`m M_p M_q` to :math:`M_o`, and
    :math:`B_a = M_{\mathrm{mapping}[a]}`. Evaluation is vectorised: entries are grouped by the
    degree of their output slot (2, 3, 4, ...) and each group is one gather-multiply-scatter.
    The module carries its program as plain data (:attr:`program`, in the order it was given).
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
        #: the program as plain lists (``ContractionProgram.to_dict``): travels with packages
        self.program = program.to_dict()
        self.num_slots = program.moments_count
        self.num_basic = len(program.basic)
        self.num_basis = len(program.mapping)
        self.max_power = program.max_power

        # canonical layout (every generated and published program): the edge moments are
        # f[:, k, l] times the rank-l monomials, built by broadcasting (no column gathers)
        self.canonical_shape = program.canonical_shape()
        # the sorted index tuples of the rank-l monomials (xx, xy, ..., zz; xxx, ...), unrolled
        # into row products at trace time: Inductor's vectorised CPU code for row gathers
        # (index_select) of this array was miscompiled for graphs without a cell input
        self.monomial_indices = (
            [
                list(itertools.combinations_with_replacement(range(3), r))
                for r in range(self.canonical_shape[1] + 1)
            ]
            if self.canonical_shape is not None
            else []
        )
        # distinct monomials u_x^a u_y^b u_z^c, each computed once per edge
        monomials = program.monomials()
        p1 = self.max_power + 1
        self.register_buffer(
            "basic_mu", torch.as_tensor([e[0] for e in program.basic], dtype=torch.long)
        )
        self.register_buffer(
            "basic_monomial",
            torch.as_tensor(
                [monomials.index(tuple(e[1:])) for e in program.basic], dtype=torch.long
            ),
        )
        # indices into the flattened [num_edges, 3 * (max_power + 1)] table of u_x^k, u_y^k, u_z^k
        a, b, c = (list(col) for col in zip(*monomials, strict=True))
        self.register_buffer("monomial_px", torch.as_tensor(a, dtype=torch.long))
        self.register_buffer("monomial_py", torch.as_tensor([p1 + k for k in b], dtype=torch.long))
        self.register_buffer(
            "monomial_pz", torch.as_tensor([2 * p1 + k for k in c], dtype=torch.long)
        )

        entries, self.stage_bounds = program.stages()
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

    def monomial_exponents(self) -> torch.Tensor:
        """``(a, b, c)`` of every distinct monomial, [n_monomials, 3] (from the indices into
        the power table)."""
        p1 = self.max_power + 1
        return torch.stack([self.monomial_px, self.monomial_py - p1, self.monomial_pz - 2 * p1], 1)

    def contraction_program(self) -> ContractionProgram:
        """The module's program (in the order it was given)."""
        return ContractionProgram.from_dict(self.program)

    @model_modifier(persistent=False, private=False, unsupported_devices=["cuda"])
    @classmethod
    def enable_fused_moments(cls, model):
        """Evaluate SUS2 with the fused CPU kernels in inference (eval mode).

        One C++ pass over the edges builds the edge vectors and evaluates the scaling map,
        Chebyshev basis, element embedding and monomials into the basic moments ``M_b(i)``, a
        second operator runs the contraction program (and the readout); their backward passes
        give the position and cell gradients (forces, virial). Same values as the PyTorch path.
        Eager and ``nequip-compile --mode aotinductor`` models on CPU; training keeps the
        PyTorch path. The kernel modules (:mod:`nequip_sus2.kernels.fused`) replace this module
        and the per-edge modules; compiled on first use.
        """
        # a relative import: a packaged model swaps in its own copy of the kernel modules
        from ..kernels.fused import enable_fused_moments

        return enable_fused_moments(model)

    @model_modifier(persistent=True, private=False)
    @classmethod
    def add_extrapolation_grade(
        cls,
        model,
        state=None,
        num_types: int | None = None,
        num_basis: int | None = None,
        has_residual: bool = False,
    ):
        """Add (or refresh) the per-atom extrapolation grade ``sus2_extrapolation_grade``.

        Inserts :class:`~nequip_sus2.nn.ExtrapolationGrade` after the moments (see
        :func:`~nequip_sus2.nn.extrapolation.insert_extrapolation_grade`). ``state``: an active
        set file (``nequip-sus2 active-set --save-active-set``) or its buffers; without it, an
        empty grade of ``num_types`` species and ``num_basis`` basis functions (with the
        residual term if ``has_residual``) whose buffers a checkpoint's state dict fills: what
        ``nequip-sus2 active-set`` records in the checkpoints it writes.
        """
        if state is None:
            if num_types is None or num_basis is None:
                raise ValueError(
                    "add_extrapolation_grade needs `state` (an active set file) or `num_types` "
                    "and `num_basis`"
                )
            state = empty_grade_state(num_types, num_basis, has_residual)
        return insert_extrapolation_grade(model, state)

    # ------------------------------------------------------------------------------------------
    # the basis and its Jacobian for the linear pre-fit (float64, no autograd)
    # ------------------------------------------------------------------------------------------

    def edge_terms_with_derivative(
        self, radial: torch.Tensor, dradial: torch.Tensor, vec: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-edge terms ``m_e = f_mu(r) u^(a,b,c)`` of the basic moments and ``dm_e/dr_e``.

        From the radial functions ``radial`` [E, N_mu], their derivative along ``r``
        ``dradial`` and the edge vectors ``vec`` [E, 3]; returns ``[E, n_basic]`` and
        ``[E, n_basic, 3]`` (``d/dvec = (I - u u^T)/r`` on the monomials).
        """
        r = vec.square().sum(-1, keepdim=True).sqrt()
        u = vec / r
        powers = [torch.ones_like(u)]
        for _ in range(self.max_power):
            powers.append(powers[-1] * u)
        table = torch.stack(powers, -1)  # [E, 3, P + 1]: u_x^k, u_y^k, u_z^k
        ex = self.monomial_exponents().to(vec.device)  # [n_mono, 3]
        parts = [table[:, c].index_select(1, ex[:, c]) for c in range(3)]  # each [E, n_mono]
        mono = parts[0] * parts[1] * parts[2]
        lower = [table[:, c].index_select(1, (ex[:, c] - 1).clamp(min=0)) for c in range(3)]
        grad_u = torch.stack(
            [
                ex[:, 0] * lower[0] * parts[1] * parts[2],
                ex[:, 1] * parts[0] * lower[1] * parts[2],
                ex[:, 2] * parts[0] * parts[1] * lower[2],
            ],
            -1,
        )  # [E, n_mono, 3] = d mono / d u
        radial_part = grad_u - (grad_u * u.unsqueeze(1)).sum(-1, keepdim=True) * u.unsqueeze(1)
        dmono = radial_part / r.unsqueeze(1)
        f = radial.index_select(1, self.basic_mu)
        df = dradial.index_select(1, self.basic_mu)
        mono_b = mono.index_select(1, self.basic_monomial)
        dmono_b = dmono.index_select(1, self.basic_monomial)
        m = f * mono_b
        dm = (df * mono_b).unsqueeze(-1) * u.unsqueeze(1) + f.unsqueeze(-1) * dmono_b
        return m, dm

    def basis_jacobian_chunks(
        self, basic: torch.Tensor, max_elements: int = 1 << 22
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``B = P(M)`` and ``dB/dM`` of basic moments ``basic`` [N, n_basic] by forward-mode
        propagation through the program, a chunk of atoms at a time (``max_elements`` bounds
        the tangents held); yields ``(first atom, B [k, N_B], dB/dM [k, N_B, n_basic])``."""
        dtype = basic.dtype
        tw = self.times_m.to(dtype)
        bounds = self.stage_bounds
        n, nb = basic.shape
        slots = self.num_slots
        chunk = max(1, max_elements // max(slots * nb, 1))
        eye = torch.eye(nb, dtype=dtype, device=basic.device)
        for start in range(0, n, chunk):
            x = basic[start : start + chunk]
            k = x.shape[0]
            m = x.new_zeros(k, slots)
            m[:, :nb] = x
            T = x.new_zeros(k, slots, nb)  # dM_slot / dM_basic
            T[:, :nb] = eye
            for s in range(len(bounds) - 1):
                lo, hi = bounds[s], bounds[s + 1]
                p, q, o = self.times_p[lo:hi], self.times_q[lo:hi], self.times_o[lo:hi]
                w = tw[lo:hi]
                mp, mq = m.index_select(1, p), m.index_select(1, q)
                wp, wq = (mp * w).unsqueeze(-1), (mq * w).unsqueeze(-1)
                dprod = T.index_select(1, p) * wq + wp * T.index_select(1, q)
                # in place: a stage writes only slots that no entry of the same stage reads
                m.index_add_(1, o, mp * mq * w)
                T.index_add_(1, o, dprod)
            yield start, m.index_select(1, self.mapping), T.index_select(1, self.mapping)

    # ------------------------------------------------------------------------------------------
    # forward (PyTorch operations)
    # ------------------------------------------------------------------------------------------

    def _canonical_edge_moments(self, radial: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``f_{k,l} u^{(x)l}`` (symmetric components), canonical layout, [n_basic, E]."""
        K, L = self.canonical_shape
        f = radial.reshape(K, L + 1, -1)
        parts = [f[:, :1]]
        if L >= 1:
            parts.append(f[:, 1:2] * u.unsqueeze(0))
        for rank in range(2, L + 1):
            rows = []
            for index in self.monomial_indices[rank]:
                mono = u[index[0]]
                for axis in index[1:]:
                    mono = mono * u[axis]
                rows.append(mono)
            parts.append(f[:, rank : rank + 1] * torch.stack(rows, dim=0).unsqueeze(0))
        return torch.cat(parts, dim=1).reshape(self.num_basic, -1)

    def _generic_edge_moments(self, radial: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``f_mu u_x^a u_y^b u_z^c`` for any basic-slot list, [n_basic, E]."""
        powers = [torch.ones_like(u), u]
        for _ in range(2, self.max_power + 1):
            powers.append(powers[-1] * u)
        # [3 * (max_power + 1), E]: u_x^0..u_x^P, u_y^0.., u_z^0..
        table = torch.stack(powers[: self.max_power + 1], dim=1).reshape(
            3 * (self.max_power + 1), -1
        )
        monomials = (
            table.index_select(0, self.monomial_px)
            * table.index_select(0, self.monomial_py)
            * table.index_select(0, self.monomial_pz)
        )
        return radial.index_select(0, self.basic_mu) * monomials.index_select(
            0, self.basic_monomial
        )

    def _basic_moments(self, data: AtomicDataDict.Type) -> torch.Tensor:
        """``M_b(i)`` by PyTorch operations, [n_basic, num_nodes]."""
        # feature-major layout ([features, edges] / [slots, atoms]): every elementwise op runs
        # over contiguous rows; fields keep NequIP's [edges, features] shape as transposed views
        radial = data[self.in_field].T  # [N_mu, E]
        vec = data[AtomicDataDict.EDGE_VECTORS_KEY].to(radial.dtype).T  # [3, E]
        length = data[AtomicDataDict.EDGE_LENGTH_KEY].view(-1).to(radial.dtype)  # [E]
        u = vec / length
        if self.canonical_shape is not None:
            edge_moments = self._canonical_edge_moments(radial, u)
        else:
            edge_moments = self._generic_edge_moments(radial, u)
        return edge_moments.new_zeros(self.num_basic, AtomicDataDict.num_nodes(data)).index_add(
            1, data[AtomicDataDict.EDGE_INDEX_KEY][0], edge_moments
        )

    def contract(self, basic: torch.Tensor) -> torch.Tensor:
        """The contraction program (docs/theory.md §2.6): scalar basis ``[atoms, N_B]`` from the
        basic moments ``[n_basic, atoms]``, one stage per degree."""
        num_nodes = basic.shape[1]
        moments = torch.cat(
            [basic, basic.new_zeros(self.num_slots - self.num_basic, num_nodes)], dim=0
        )
        for s in range(len(self.stage_bounds) - 1):
            lo, hi = self.stage_bounds[s], self.stage_bounds[s + 1]
            prod = (
                moments.index_select(0, self.times_p[lo:hi])
                * moments.index_select(0, self.times_q[lo:hi])
                * self.times_m[lo:hi].unsqueeze(-1)
            )
            moments = moments.index_add(0, self.times_o[lo:hi], prod)
        return moments.index_select(0, self.mapping).T  # [atoms, N_B]

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        data = with_edge_vectors_(data, with_lengths=True)
        data[self.out_field] = self.contract(self._basic_moments(data))
        return data
