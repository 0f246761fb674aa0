"""The fused CPU kernels as swappable modules (the ``enable_fused_moments`` model modifier).

The concept modules of :mod:`nequip_sus2.nn` stay the reference implementation; this modifier
replaces them in a model with the subclasses below, which keep their parameters, buffers and
state-dict keys and, in ``eval()`` mode, hand the whole per-edge computation (scaling map,
Chebyshev basis, element embedding, monomials, scatter to the basic moments) and the contraction
to the operators of :mod:`nequip_sus2.kernels.ops`. In ``train()`` mode every module runs its
PyTorch path, exactly as before the swap.

:math:`x_i = \\sum_a \\theta_a B_a(i)` can run inside the contraction operator too (the readout
is "folded"): single-product basis functions ``B = m M_p M_q`` of two degree-2 slots (the block
:math:`D_l(a,b) D_{l'}(a',b')`, docs/theory.md §6.7) become the quadratic form
:math:`D^T \\Theta D`, and :math:`\\partial x/\\partial M` comes out of the same pass. The
readout is folded while the model's one :class:`~nequip_sus2.nn.LinearReadout` is the only
reader of the scalar basis (an extrapolation grade also reads it, then the basis is formed),
decided each time the model runs.
"""

from __future__ import annotations

import importlib
from collections import Counter

import torch
from nequip.data import AtomicDataDict
from nequip.nn import replace_submodules

from ..nn.embedding import DecoupledElementEmbedding
from ..nn.moments import MomentContraction
from ..nn.radial import ChebyshevRadialBasis
from ..nn.readout import LinearReadout
from ..nn.scaling import UniversalPairScaling

#: the library NequIP's AOTI loader imports before loading a model compiled with the kernels
OPS_LIBRARY = "nequip_sus2.kernels.ops"


def _swapped(kind: type, old: torch.nn.Module) -> torch.nn.Module:
    """``old`` as an instance of its subclass ``kind``: same parameters, buffers and state."""
    new = kind.__new__(kind)
    new.__dict__.update(old.__dict__)
    return new


class _ComputedByKernel:
    """Mixin of the per-edge modules: in eval mode the fused kernel has done their work."""

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        if self.training:
            return super().forward(data)
        return data


class FusedPairScaling(_ComputedByKernel, UniversalPairScaling):
    """:class:`~nequip_sus2.nn.UniversalPairScaling`, evaluated by the kernel in eval mode."""


class FusedRadialBasis(_ComputedByKernel, ChebyshevRadialBasis):
    """:class:`~nequip_sus2.nn.ChebyshevRadialBasis`, evaluated by the kernel in eval mode."""


class FusedElementEmbedding(_ComputedByKernel, DecoupledElementEmbedding):
    """:class:`~nequip_sus2.nn.DecoupledElementEmbedding`, evaluated by the kernel in eval
    mode."""


class FusedReadout(LinearReadout):
    """:class:`~nequip_sus2.nn.LinearReadout`, applied by the contraction kernel in eval mode
    while the readout is folded (:attr:`FusedMomentContraction.fold_readout`)."""

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        if not self.training and self._moments[0].fold_readout:
            return data
        return super().forward(data)


class FusedMomentContraction(MomentContraction):
    """:class:`~nequip_sus2.nn.MomentContraction` whose eval mode runs the fused operators
    ``sus2::basic_moments[_from_positions]`` and ``sus2::contract_moments`` or
    ``sus2::contract_readout`` (parameters detached: inference only)."""

    _nequip_custom_ops_libs = (OPS_LIBRARY,)

    def attach(self, network: torch.nn.Module, sources: list, readout) -> None:
        """Record the modules whose parameters the kernels read (plain lists: they stay where
        they are registered, the state dict is unchanged) and the readout-folding tables."""
        importlib.import_module(OPS_LIBRARY)  # by name: the installed library, also for packages
        table = torch.cat(
            [self.basic_mu.unsqueeze(1), self.monomial_exponents()[self.basic_monomial]], 1
        )
        self.register_buffer("basic_table", table.contiguous(), persistent=False)
        self._sources = list(sources)
        self._network = [network]
        self._readout = [] if readout is None else [readout]
        if readout is not None:
            self._quadratic_readout_tables()

    @property
    def fold_readout(self) -> bool:
        """Whether the kernel applies the readout: the model's one readout is the only reader
        of the scalar basis (evaluated when the model runs, so a grade inserted later counts)."""
        if not self._readout:
            return False
        readers = [
            m for m in self._network[0].modules() if getattr(m, "in_field", None) == self.out_field
        ]
        return readers == self._readout

    def _quadratic_readout_tables(self) -> None:
        """Split ``theta . B`` into a linear part over slots and the quadratic form ``D^T Theta D``
        over the degree-2 slots ``D`` whose products are written once and read by nothing else."""
        program = self.contraction_program()
        degree = program.degrees()
        p, q, m, o = (t.tolist() for t in (self.times_p, self.times_q, self.times_m, self.times_o))
        mapping = self.mapping.tolist()
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
        scaling, basis, embedding = self._sources
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
            return torch.ops.sus2.basic_moments(vec, *params, pos.shape[0])
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
        return torch.ops.sus2.basic_moments_from_positions(pos.to(f64), cell, shift, batch, *params)

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        if self.training:
            return super().forward(data)
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


#: the concept module -> its kernel-backed replacement
_REPLACEMENTS = (
    (UniversalPairScaling, FusedPairScaling),
    (ChebyshevRadialBasis, FusedRadialBasis),
    (DecoupledElementEmbedding, FusedElementEmbedding),
    (MomentContraction, FusedMomentContraction),
)


def _only(model: torch.nn.Module, kind: type) -> torch.nn.Module:
    found = [m for m in model.modules() if isinstance(m, kind)]
    if len(found) != 1:
        raise ValueError(
            f"enable_fused_moments needs a SUS2 model with one {kind.__name__}, found {len(found)}"
        )
    return found[0]


def enable_fused_moments(model: torch.nn.Module) -> torch.nn.Module:
    """Swap the kernel modules into ``model`` (in place) and return it."""
    for kind, _ in _REPLACEMENTS:
        _only(model, kind)
    for kind, fused in _REPLACEMENTS:
        replace_submodules(model, kind, lambda old, fused=fused: _swapped(fused, old))
    moments = _only(model, FusedMomentContraction)
    network = next(m for m in model.modules() if moments in m.children())
    readouts = [m for m in model.modules() if isinstance(m, LinearReadout)]
    readout = None
    if len(readouts) == 1:
        readout = readouts[0]
        if type(readout) is LinearReadout:
            readout = _swapped(FusedReadout, readout)
            replace_submodules(model, LinearReadout, lambda old: readout)
        readout._moments = [moments]
    sources = [_only(model, kind) for kind, _ in _REPLACEMENTS[:3]]
    moments.attach(network, sources, readout)
    return model
