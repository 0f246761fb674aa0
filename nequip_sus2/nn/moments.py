"""Moment tensors and their contraction to the scalar basis (spec §2.5, §2.6)."""

from __future__ import annotations

import importlib
import itertools
from collections import Counter
from typing import TYPE_CHECKING

import torch
from nequip.data import AtomicDataDict
from nequip.nn import GraphModuleMixin, model_modifier
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

    With the ``enable_fused_moments`` modifier, inference (``eval()`` mode) computes the basic
    moments with the fused CPU operator ``sus2::basic_moments`` (:mod:`nequip_sus2.kernels`).
    """

    #: set by ``enable_fused_moments`` (a class default, so models pickled earlier load too)
    fused: bool = False
    #: the fused path also applies the readout (``x = theta . B``, see :meth:`_fold_readout`)
    fold_readout: bool = False

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

        # canonical layout (every generated and published program): basic slots mu-major with
        # mu = k (L+1) + l and the rank-l monomials in sorted-index order; then the edge moments
        # are f[:, k, l] times the rank-l monomials, built by broadcasting (no column gathers)
        self.canonical_shape = _canonical_shape(program.basic)
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
            f"num_entries={self.times_o.numel()}, num_basis={self.num_basis}, fused={self.fused}, "
            f"fold_readout={self.fold_readout}"
        )

    @model_modifier(persistent=False, private=False, unsupported_devices=["cuda"])
    @classmethod
    def enable_fused_moments(cls, model):
        """Evaluate SUS2 with the fused CPU kernels in inference (eval mode).

        One C++ pass over the edges builds the edge vectors and evaluates the scaling map,
        Chebyshev basis, element embedding and monomials into the basic moments ``M_b(i)``, a
        second operator runs the contraction program; their backward passes give the position
        and cell gradients (forces, virial). Same values as the PyTorch path. Eager and
        ``nequip-compile --mode aotinductor`` models on CPU; training keeps the PyTorch path
        (the kernels have no parameter or second derivatives). Compiled on first use.
        """
        # by name, so that packaged copies of this module use the installed library
        importlib.import_module("nequip_sus2.kernels.ops")
        from .embedding import DecoupledElementEmbedding
        from .radial import ChebyshevRadialBasis
        from .scaling import UniversalPairScaling

        parts = {}
        for kind in (UniversalPairScaling, ChebyshevRadialBasis, DecoupledElementEmbedding, cls):
            found = [m for m in model.modules() if isinstance(m, kind)]
            if len(found) != 1:
                raise ValueError(
                    f"enable_fused_moments needs a SUS2 model with one {kind.__name__}, "
                    f"found {len(found)}"
                )
            parts[kind] = found[0]
        moments = parts[cls]
        # (mu, a, b, c) of every basic slot, from the persistent buffers
        p1 = moments.max_power + 1
        mono = moments.basic_monomial
        table = torch.stack(
            [
                moments.basic_mu,
                moments.monomial_px[mono],
                moments.monomial_py[mono] - p1,
                moments.monomial_pz[mono] - 2 * p1,
            ],
            dim=1,
        )
        moments.register_buffer("basic_table", table.contiguous(), persistent=False)
        # a plain list: the other modules stay where they are registered (same state dict)
        moments._fused_sources = [
            parts[UniversalPairScaling],
            parts[ChebyshevRadialBasis],
            parts[DecoupledElementEmbedding],
        ]
        for module in parts.values():
            module.fused = True  # the per-edge modules skip their work in eval mode
        moments._fold_readout(model)
        # NequIP's AOTI loader imports these before loading a compiled model
        moments._nequip_custom_ops_libs = ("nequip_sus2.kernels.ops",)
        return model

    def _fold_readout(self, model: torch.nn.Module) -> None:
        r"""Let the fused path apply the model's linear readout too (``sus2::contract_readout``).

        :math:`x_i = \sum_a \theta_a B_a(i)` is evaluated without the basis: single-product
        basis functions ``B = m M_p M_q`` of two degree-2 slots (the block
        :math:`D_l(a,b) D_{l'}(a',b')` of spec §6) become the quadratic form
        :math:`D^T \Theta D`, and :math:`\partial x/\partial M` comes out of the same pass.
        Only for models whose one ``LinearReadout`` reads this module's output and that have no
        other reader of the basis (an extrapolation grade keeps the plain fused path).
        """
        from .readout import LinearReadout

        readouts = [m for m in model.modules() if isinstance(m, LinearReadout)]
        readers = [m for m in model.modules() if getattr(m, "in_field", None) == self.out_field]
        if len(readouts) != 1 or readers != readouts:
            self._unfold_readout()
            return
        p, q, m, o = (t.tolist() for t in (self.times_p, self.times_q, self.times_m, self.times_o))
        mapping = self.mapping.tolist()
        degree = [1] * self.num_basic + [0] * (self.num_slots - self.num_basic)
        for pk, qk, ok in zip(p, q, o, strict=True):
            degree[ok] = degree[pk] + degree[qk]
        writes, mapped = Counter(o), Counter(mapping)
        reads = set(p) | set(q)
        entry_of = {slot: k for k, slot in enumerate(o)}  # the only entry of a slot written once
        quad = [
            a
            for a, slot in enumerate(mapping)
            if writes[slot] == 1
            and slot not in reads
            and mapped[slot] == 1
            and degree[slot] == 4
            and degree[p[entry_of[slot]]] == degree[q[entry_of[slot]]] == 2
        ]
        quad_set = set(quad)
        quad_out = {mapping[a] for a in quad}
        keep = [k for k in range(len(o)) if o[k] not in quad_out]
        entries = [entry_of[mapping[a]] for a in quad]
        nodes = sorted({p[k] for k in entries} | {q[k] for k in entries})
        device = self.mapping.device

        def buffer(name: str, values: list, dtype: torch.dtype = torch.long) -> None:
            self.register_buffer(name, torch.tensor(values, dtype=dtype, device=device), False)

        for name, column in zip("pqo", (p, q, o), strict=True):
            buffer(f"readout_{name}", [column[k] for k in keep])
        buffer("readout_m", [m[k] for k in keep], self.times_m.dtype)
        linear = [a for a in range(len(mapping)) if a not in quad_set]
        buffer("readout_linear", linear)
        buffer("readout_slots", [mapping[a] for a in linear])
        buffer("readout_quad", quad)
        buffer("readout_quad_m", [m[k] for k in entries], self.times_m.dtype)
        buffer("readout_quad_slots", nodes)
        buffer("readout_quad_p", [nodes.index(p[k]) for k in entries])
        buffer("readout_quad_q", [nodes.index(q[k]) for k in entries])
        self._readout = [readouts[0]]  # a plain list: the readout stays where it is registered
        self.fold_readout = readouts[0].fused = True

    def _unfold_readout(self) -> None:
        """Undo :meth:`_fold_readout`: the fused path forms the basis, the readout applies theta
        (for a reader of the basis such as an extrapolation grade)."""
        self.fold_readout = False
        for readout in getattr(self, "_readout", []):
            readout.fused = False

    def _fused_readout(self, basic: torch.Tensor) -> torch.Tensor:
        """``x = theta . B`` [num_nodes, 1] from the basic moments (``sus2::contract_readout``)."""
        theta = self._readout[0].theta.detach().view(-1)
        n = self.readout_quad_slots.numel()
        # Theta symmetric: theta m M_p M_q = D_p (theta m / 2) D_q + D_q (theta m / 2) D_p
        half = theta.index_select(0, self.readout_quad) * self.readout_quad_m * 0.5
        flat = half.new_zeros(n * n)
        flat = flat.index_add(0, self.readout_quad_p * n + self.readout_quad_q, half)
        flat = flat.index_add(0, self.readout_quad_q * n + self.readout_quad_p, half)
        x, _ = torch.ops.sus2.contract_readout(
            basic,
            self.readout_p,
            self.readout_q,
            self.readout_m,
            self.readout_o,
            self.readout_slots,
            theta.index_select(0, self.readout_linear),
            self.readout_quad_slots,
            flat.view(n, n),
            self.num_slots,
        )
        return x

    def _fused_basic(self, data: AtomicDataDict.Type) -> torch.Tensor:
        """``M_b(i)`` by the fused kernels, [num_nodes, n_basic] (parameters detached).

        Edge vectors given in ``data`` (edge-force inference, pair potentials) are used as they
        are; otherwise the kernel builds them from positions, cell and cell shifts and returns
        position and cell gradients directly.
        """
        scaling, basis, embedding = self._fused_sources
        alpha = scaling.alpha.detach()
        edge_index = data[AtomicDataDict.EDGE_INDEX_KEY]
        pos = data[AtomicDataDict.POSITIONS_KEY]
        params = (
            edge_index[0],
            edge_index[1],
            data[AtomicDataDict.ATOM_TYPE_KEY].view(-1),
            alpha.reshape(alpha.shape[0], -1),
            scaling.r0.detach().reshape(alpha.shape[0], -1),
            embedding.coeffs.detach(),
            embedding.eta_of_mu,
            embedding.weights.detach(),
            self.basic_table,
            basis.r_max,
            basis.radial_scaling,
        )
        if AtomicDataDict.EDGE_VECTORS_KEY in data:
            vec = data[AtomicDataDict.EDGE_VECTORS_KEY].to(alpha.dtype).contiguous()
            basic = torch.ops.sus2.basic_moments(vec, *params, pos.shape[0])
        else:
            f64 = torch.float64
            if AtomicDataDict.CELL_KEY in data:
                cell = data[AtomicDataDict.CELL_KEY].to(f64)
                shift = data[AtomicDataDict.EDGE_CELL_SHIFT_KEY].to(f64)
            else:
                cell = pos.new_zeros((0, 3, 3), dtype=f64)
                shift = pos.new_zeros((0, 3), dtype=f64)
            if AtomicDataDict.BATCH_KEY in data:
                batch = data[AtomicDataDict.BATCH_KEY]
            else:
                batch = edge_index.new_zeros((0,))
            basic = torch.ops.sus2.basic_moments_from_positions(
                pos.to(f64), cell, shift, batch, *params
            )
        return basic

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

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        if self.fused and not self.training:
            basic = self._fused_basic(data)
            if self.fold_readout:
                data[self._readout[0].out_field] = self._fused_readout(basic)
            else:
                data[self.out_field] = torch.ops.sus2.contract_moments(
                    basic,
                    self.times_p,
                    self.times_q,
                    self.times_m,
                    self.times_o,
                    self.mapping,
                    self.num_slots,
                )
            return data
        data = with_edge_vectors_(data, with_lengths=True)
        basic = self._basic_moments(data)
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
        data[self.out_field] = moments.index_select(0, self.mapping).T  # [atoms, N_B]
        return data


def _canonical_shape(basic) -> tuple[int, int] | None:
    """``(K, L)`` if the basic slots have the canonical layout of spec §6, else ``None``."""
    if not basic:
        return None
    L = max(a + b + c for _, a, b, c in basic)
    n_mu = max(e[0] for e in basic) + 1
    if n_mu % (L + 1):
        return None
    K = n_mu // (L + 1)
    canonical = [
        (k * (L + 1) + rank, idx.count(0), idx.count(1), idx.count(2))
        for k in range(K)
        for rank in range(L + 1)
        for idx in itertools.combinations_with_replacement(range(3), rank)
    ]
    return (K, L) if [tuple(e) for e in basic] == canonical else None
