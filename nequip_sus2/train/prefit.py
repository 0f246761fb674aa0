r"""Linear pre-fit of the SUS2 readout (docs/theory.md §4.4) and the Lightning callback that runs
it.

With the nonlinear parameters (pair scaling, radial coefficients, species weights) fixed, the
SUS2 energy

.. math:: E = \sum_i \left[b_{Z_i} + s_{Z_i}\left(1 + \textstyle\sum_a \theta_a B_a(i)\right)\right]

is bilinear in ``s`` and ``theta``. The pre-fit keeps the per-species scales ``s`` fixed (their
current values, or 1 with ``reset_scales``, which is the original code's choice) and solves for
the per-species offsets ``p_Z = b_Z + s_Z`` (the ``shifts`` of ``PerTypeScaleShift``) and the
global ``theta``, in which energy, forces and stresses are *exactly linear*:

.. math::

    E_f = \sum_Z n_{fZ}\, p_Z + \sum_a \theta_a G_{fa} + c_f, \qquad
    G_{fa} = \sum_{i \in f} s_{Z_i} B_a(i),

    F_{i\alpha} = -\sum_a \theta_a\, \partial G_{fa} / \partial r_{i\alpha} - \partial c_f/\partial r_{i\alpha},
    \qquad \sigma_{f,\alpha\beta} = \frac{1}{V_f}\left(\sum_a \theta_a\,
    \partial G_{fa}/\partial \varepsilon_{\alpha\beta} + \partial c_f/\partial\varepsilon_{\alpha\beta}\right)

where ``c_f`` is whatever else the model adds (e.g. a ZBL pair potential); it is removed by
linearising around the current parameters (the targets become ``y - prediction + A x_current``,
exact because the model is linear in ``x``). The derivative columns use the structure of the
basis, ``B(i) = P(sum_e m(r_e))``: per-edge derivatives of the basic moments (one forward-mode
pass through the radial modules; the monomials analytically), the per-atom Jacobian of the small
contraction polynomial (forward mode), and their product per edge, scattered into forces and
virials; only the current energy needs a backward pass (a generic path, one backward pass per
basis function, is the fallback). Only the normal equations ``A^T W A`` and ``A^T W y``
(``(C + N_B)^2`` numbers) are kept, so memory is bounded by one batch.

Weights per configuration (the original's loss with the "vibrations" weighting): energy
residual divided by the number of atoms ``N``, weight ``w_E``; every force component, ``w_F``
(optionally ``w_F f0^2/(|F_ref|^2 + f0^2)``); the virial ``W = -V sigma`` divided by ``N``, all
9 components (the Frobenius norm), weight ``w_S``. Frames without an energy / stress label
(missing or NaN) contribute only the rows they have. A ridge ``ridge * (A^T W A)_aa`` is added
to the diagonal entry of every ``theta_a`` (relative to its own column, so independent of the
very different scales of the basis functions; the offsets are not penalised). A small ridge
(default 1e-3) keeps ``theta`` from large cancelling contributions of nearly collinear basis
functions, which the least-squares optimum has at random initial features and which make the
subsequent gradient steps on the nonlinear parameters unstable.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace

import lightning
import torch
from lightning.pytorch.callbacks import Callback, Timer
from nequip.data import AtomicDataDict
from nequip.utils import RankedLogger

from .._keys import SCALAR_BASIS_KEY
from ..data.frames import frame_index

logger = RankedLogger(__name__, rank_zero_only=True)

__all__ = ["LinearPrefit", "NormalEquations", "PrefitResult", "linear_prefit"]

_F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# the model's linear parameters (found by class name: packaged models have other classes)
# ----------------------------------------------------------------------------------------------


@dataclass
class _LinearParts:
    net: torch.nn.Module  # SequentialGraphNetwork holding `moments`
    readout: torch.nn.Module  # LinearReadout (theta [N_B, 1])
    scale_shift: torch.nn.Module | None  # PerTypeScaleShift (scales, shifts [C or 1, 1])
    num_types: int

    @property
    def num_basis(self) -> int:
        return int(self.readout.theta.shape[0])

    @property
    def has_shifts(self) -> bool:
        return self.scale_shift is not None and bool(self.scale_shift.has_shifts)

    @property
    def per_type_shifts(self) -> bool:
        return self.has_shifts and self.scale_shift.shifts.numel() > 1

    @property
    def num_offsets(self) -> int:
        if not self.has_shifts:
            return 0
        return self.num_types if self.per_type_shifts else 1

    def atom_scales(self, types: torch.Tensor) -> torch.Tensor:
        """s_{Z_i} per atom (float64)."""
        if self.scale_shift is None or not self.scale_shift.has_scales:
            return torch.ones(types.shape[0], dtype=_F64, device=types.device)
        s = self.scale_shift.scales.detach().to(_F64).view(-1)
        return s.expand(self.num_types).index_select(0, types) if s.numel() == 1 else s[types]

    def current(self) -> torch.Tensor:
        """The current unknowns x = [offsets, theta] (float64)."""
        theta = self.readout.theta.detach().to(_F64).view(-1)
        if not self.has_shifts:
            return theta
        return torch.cat([self.scale_shift.shifts.detach().to(_F64).view(-1), theta])


def _graph_models(model) -> list:
    if hasattr(model, "is_graph_model"):
        return [model]
    if isinstance(model, torch.nn.ModuleDict) or hasattr(model, "values"):
        return [m for m in model.values() if hasattr(m, "is_graph_model")]
    raise TypeError("expected a NequIP GraphModel or a ModuleDict of them")


def _linear_parts(graph_model) -> _LinearParts:
    from ..model.sus2 import sus2_network

    net = sus2_network(graph_model)
    if net is None:
        raise TypeError("not a SUS2 model: expected one SequentialGraphNetwork with `moments`")
    readout = net._modules.get("readout")
    if readout is None or not hasattr(readout, "theta"):
        raise TypeError("not a SUS2 model: no `readout` with `theta`")
    scale_shift = net._modules.get("per_type_energy_scale_shift")
    return _LinearParts(net, readout, scale_shift, len(graph_model.type_names))


# ----------------------------------------------------------------------------------------------
# normal equations
# ----------------------------------------------------------------------------------------------


@dataclass
class NormalEquations:
    """Accumulated ``A^T W A``, ``A^T W y``, ``y^T W y`` and row counts (float64)."""

    ata: torch.Tensor
    aty: torch.Tensor
    yty: torch.Tensor
    counts: torch.Tensor  # per unknown: rows in which it appears with a non-zero coefficient
    num_rows: dict

    @classmethod
    def zeros(cls, n: int, device=None) -> NormalEquations:
        z = dict(dtype=_F64, device=device)
        return cls(
            torch.zeros(n, n, **z),
            torch.zeros(n, **z),
            torch.zeros((), **z),
            torch.zeros(n, **z),
            {"energy": 0, "forces": 0, "stress": 0},
        )

    def add(self, A: torch.Tensor, y: torch.Tensor, w: torch.Tensor, kind: str) -> None:
        keep = torch.isfinite(y) & (w > 0)
        A, y, w = A[keep], y[keep], w[keep]
        if A.shape[0] == 0:
            return
        Aw = A * w.unsqueeze(1)
        self.ata += Aw.T @ A
        self.aty += Aw.T @ y
        self.yty += (w * y * y).sum()
        self.counts += (A != 0).sum(0).to(_F64)
        self.num_rows[kind] += int(A.shape[0])

    def loss(self, x: torch.Tensor) -> float:
        """Weighted sum of squared residuals at ``x``."""
        return float(self.yty - 2 * x @ self.aty + x @ self.ata @ x)


def _strained_forward(parts, data, batch_index, num_frames):
    """Run the model's graph network with NequIP's symmetric-strain trick; returns the output,
    the position leaf, the displacement leaf and the unstrained cell (or ``None``)."""
    pos = data[AtomicDataDict.POSITIONS_KEY].detach().clone().requires_grad_(True)
    disp = torch.zeros(num_frames, 3, 3, dtype=pos.dtype, device=pos.device, requires_grad=True)
    sym = 0.5 * (disp + disp.transpose(-1, -2))
    data = dict(data)
    data[AtomicDataDict.POSITIONS_KEY] = pos + torch.bmm(
        pos.unsqueeze(-2), sym.index_select(0, batch_index)
    ).squeeze(-2)
    cell = None
    if AtomicDataDict.CELL_KEY in data:
        cell = data[AtomicDataDict.CELL_KEY].view(-1, 3, 3).expand(num_frames, 3, 3)
        data[AtomicDataDict.CELL_KEY] = cell + torch.bmm(cell, sym)
        cell = cell.detach()
    return parts.net(data), pos, disp, cell


def _frame_sums(parts, B, batch_index, num_frames, types):
    """G_f = sum over the atoms of frame f of s_Z B(i)  [F, N_B] (float64)."""
    return torch.zeros(num_frames, parts.num_basis, dtype=_F64, device=B.device).index_add(
        0, batch_index, parts.atom_scales(types).unsqueeze(1) * B.to(_F64)
    )


def _basis_jacobians_autograd(parts, data, batch_index, num_frames, types):
    """Generic path: one backward pass through the whole network per basis function."""
    n_b = parts.num_basis
    out, pos, disp, cell = _strained_forward(parts, data, batch_index, num_frames)
    G = _frame_sums(parts, out[SCALAR_BASIS_KEY], batch_index, num_frames, types)
    E = out[AtomicDataDict.TOTAL_ENERGY_KEY].to(_F64).view(-1)
    cols = [G[:, a] for a in range(n_b)] + [E]
    dpos, dstrain = [], []
    for k, col in enumerate(cols):
        gp, gs = torch.autograd.grad(
            col.sum(), [pos, disp], retain_graph=k < len(cols) - 1, allow_unused=True
        )
        dpos.append(torch.zeros_like(pos) if gp is None else gp)
        dstrain.append(torch.zeros_like(disp) if gs is None else gs)
    return (
        torch.stack(dpos[:n_b], -1).to(_F64).detach(),  # [N, 3, N_B]
        dpos[n_b].to(_F64).detach(),  # [N, 3]
        torch.stack(dstrain[:n_b], -1).to(_F64).detach(),  # [F, 3, 3, N_B]
        dstrain[n_b].to(_F64).detach(),  # [F, 3, 3]
        G.detach(),
        E.detach(),
        cell,
    )


class _Unstructured(Exception):
    """The moments module does not have the layout the structured path reads."""


def _basis_jacobians_structured(parts, data, batch_index, num_frames, types):
    """Fast path using B(i) = P(sum_e m(r_e)) (docs/theory.md §2.5-2.6).

    Per edge, ``m_e = f_mu(|r_e|) u_e^(a,b,c)``: the radial functions and their derivative along
    ``r`` come from one forward-mode pass through the modules before ``moments`` (they depend on
    the edge vector only through its length), the monomials are differentiated analytically.
    Per atom, ``dB/dM`` of the small contraction polynomial by forward mode. Forces and virials
    of every basis function then follow from ``dB(i)/dr_e = dB/dM(i) dm_e/dr_e``, a chunk of
    atoms at a time, the edges of an atom in one matrix product (``dB/dM`` is never held for all
    atoms); only the current energy needs a backward pass. The recomputed ``B`` is checked
    against the model's (else the caller falls back to the generic path).
    """
    from nequip.nn.utils import with_edge_vectors_

    net = parts.net
    names = list(net._modules)
    moments = net._modules["moments"]
    if not hasattr(moments, "basis_jacobian_chunks"):  # a model packaged by an older version
        raise _Unstructured("the moments module does not offer the basis Jacobian")
    in_field = getattr(moments, "in_field", AtomicDataDict.EDGE_EMBEDDING_KEY)
    n_b = parts.num_basis

    # current energy, its derivatives and B: one strained forward, one backward
    out, pos, disp, cell = _strained_forward(parts, data, batch_index, num_frames)
    E = out[AtomicDataDict.TOTAL_ENERGY_KEY].to(_F64).view(-1)
    dE_pos, dE_eps = torch.autograd.grad(E.sum(), [pos, disp], allow_unused=True)
    dE_pos = torch.zeros_like(pos) if dE_pos is None else dE_pos
    dE_eps = torch.zeros_like(disp) if dE_eps is None else dE_eps
    B_model = out[SCALAR_BASIS_KEY].detach()

    # radial functions of the edges and their derivative along r (forward mode, tangent u)
    plain = with_edge_vectors_(dict(data), with_lengths=False)
    vec0 = plain.pop(AtomicDataDict.EDGE_VECTORS_KEY).detach()
    plain.pop(AtomicDataDict.EDGE_LENGTH_KEY, None)
    before = [net._modules[n] for n in names[: names.index("moments")]]

    def radial_of(vec: torch.Tensor) -> torch.Tensor:
        d = dict(plain)
        d[AtomicDataDict.EDGE_VECTORS_KEY] = vec
        for module in before:
            d = module(d)
        return d[in_field]

    unit = vec0 / vec0.square().sum(-1, keepdim=True).sqrt()
    import torch.autograd.forward_ad as fwad

    with torch.no_grad(), fwad.dual_level():
        radial, dradial = fwad.unpack_dual(radial_of(fwad.make_dual(vec0, unit)))
    vec64 = vec0.to(_F64)
    m_e, dm = moments.edge_terms_with_derivative(
        radial.detach().to(_F64), dradial.detach().to(_F64), vec64
    )
    centre, neighbour = data[AtomicDataDict.EDGE_INDEX_KEY]
    n_atoms = types.shape[0]
    basic = m_e.new_zeros(n_atoms, m_e.shape[1]).index_add(0, centre, m_e)
    scales = parts.atom_scales(types).to(_F64)
    nbasic = dm.shape[1]
    dmT = dm.transpose(1, 2)  # [E, 3, n_basic]
    # r_e = r_j - r_i: the centre part of the forces design, summed over the edges of i ...
    D = dm.new_zeros(n_atoms, 3, nbasic).index_add(0, centre, dmT)
    # ... and the virial design X_ab = sum_e r_a g_b at atom level: Q_i = sum_e r_e (x) dm_e
    Q = dm.new_zeros(n_atoms, 9, nbasic).index_add(
        0, centre, (vec64.view(-1, 3, 1, 1) * dmT.unsqueeze(1)).reshape(-1, 9, nbasic)
    )
    # the edges grouped by centre atom, so that the neighbour part of each atom is one product
    order = torch.argsort(centre, stable=True)
    degree = torch.bincount(centre, minlength=n_atoms)
    first = torch.cumsum(degree, 0) - degree
    c_sorted = centre.index_select(0, order)
    place = torch.arange(order.shape[0], device=order.device) - first.index_select(0, c_sorted)
    dmT_sorted, n_sorted = dmT.index_select(0, order), neighbour.index_select(0, order)

    dG_pos = dm.new_zeros(n_atoms, 3, n_b)
    X = dm.new_zeros(num_frames, 9, n_b)  # [F, a (r) b (grad), N_B]
    Bs = []
    for lo, B, J in moments.basis_jacobian_chunks(basic):
        k = B.shape[0]
        hi = lo + k
        Bs.append(B)
        sJt = (J * scales[lo:hi].view(-1, 1, 1)).transpose(1, 2)  # s_Z dB/dM, [k, n_basic, N_B]
        dG_pos[lo:hi] -= torch.bmm(D[lo:hi], sJt)
        X.index_add_(0, batch_index[lo:hi], torch.bmm(Q[lo:hi], sJt))
        e_lo, e_hi = int(first[lo]), int(first[hi - 1] + degree[hi - 1])
        if e_hi == e_lo:
            continue
        width = int(degree[lo:hi].max())
        rows = (c_sorted[e_lo:e_hi] - lo) * width + place[e_lo:e_hi]
        padded = dm.new_zeros(k * width, 3, nbasic).index_copy_(0, rows, dmT_sorted[e_lo:e_hi])
        g = torch.bmm(padded.view(k, width * 3, nbasic), sJt).view(k * width, 3, n_b)
        dG_pos.index_add_(0, n_sorted[e_lo:e_hi], g.index_select(0, rows))
    B = torch.cat(Bs)
    scale = float(B_model.abs().max()) if B_model.numel() else 0.0
    tol = (1e-4 if B_model.dtype == torch.float32 else 1e-9) * scale + 1e-12
    if B.shape != B_model.shape or (B.numel() and float((B - B_model).abs().max()) > tol):
        raise _Unstructured("the recomputed scalar basis does not match the model's")
    X = X.view(num_frames, 3, 3, n_b)
    dG_eps = 0.5 * (X + X.transpose(1, 2))
    G = _frame_sums(parts, B_model, batch_index, num_frames, types)
    return (
        dG_pos,  # [N, 3, N_B]
        dE_pos.to(_F64).detach(),
        dG_eps.contiguous(),
        dE_eps.to(_F64).detach(),
        G,
        E.detach(),
        cell,
    )


def _basis_jacobians(parts, data, batch_index, num_frames, types, structured: bool = True):
    """G_f (per-frame sum of s_Z B(i)), the energy E_f of the current model, and their
    derivatives with respect to positions and (symmetric) strain."""
    if structured:
        try:
            return _basis_jacobians_structured(parts, data, batch_index, num_frames, types)
        except _Unstructured as err:
            logger.warning(f"LinearPrefit: generic (slower) Jacobians: {err}")
    return _basis_jacobians_autograd(parts, data, batch_index, num_frames, types)


#: MLIP-2's ``--weighting``: powers of the atom count dividing the squared energy, force and
#: virial residuals of a configuration
WEIGHTING_POWERS = {"vibrations": (1, 0, 1), "structures": (2, 1, 2), "molecules": (0, 0, 0)}


@dataclass(frozen=True)
class PrefitSettings:
    """Weights and regularisation of the pre-fit (the keyword arguments of
    :func:`linear_prefit` and :class:`LinearPrefit`, with their defaults).

    Args:
        energy_weight, force_weight, stress_weight (float): ``w_E``, ``w_F``, ``w_S``
        weighting (str): how configurations of different size count, as MLIP-2's
            ``--weighting``: ``vibrations`` (default, the original's: squared energy and virial
            residuals divided by the atom count N), ``structures`` (energy and virial by N²,
            forces by N: every configuration counts the same, like NequIP's per-atom energy
            MSE) or ``molecules`` (no division)
        per_atom_weighting (bool): ``false`` is ``weighting: molecules`` (kept for old configs)
        force_scale (float): if set, force rows get ``w_F s^2 / (|F_ref|^2 + s^2)``
        ridge (float): relative ridge on ``theta``, ``ridge * (A^T W A)_aa``
        reset_scales (bool): set ``s = 1`` before solving (the original code's convention)
        max_batches (int): use at most this many batches per solve
    """

    energy_weight: float = 1.0
    force_weight: float = 0.01
    stress_weight: float = 0.001
    weighting: str = "vibrations"
    per_atom_weighting: bool = True
    force_scale: float | None = None
    ridge: float = 1e-3
    reset_scales: bool = False
    max_batches: int | None = None

    def __post_init__(self):
        if self.weighting not in WEIGHTING_POWERS:
            raise ValueError(
                f"LinearPrefit: weighting must be one of {sorted(WEIGHTING_POWERS)}, got "
                f"{self.weighting!r}"
            )

    def size_powers(self) -> tuple[int, int, int]:
        """Powers of the atom count dividing the squared energy, force and virial residuals."""
        return WEIGHTING_POWERS["molecules" if not self.per_atom_weighting else self.weighting]


def accumulate_batch(
    graph_model,
    batch: AtomicDataDict.Type,
    neq: NormalEquations,
    settings: PrefitSettings = PrefitSettings(),
    parts: _LinearParts | None = None,
    structured: bool = True,
) -> None:
    """Add the rows of one batch to ``neq`` (``structured=False``: the generic, slower
    derivative path, one backward pass per basis function)."""
    energy_weight, force_weight = settings.energy_weight, settings.force_weight
    stress_weight = settings.stress_weight
    p_energy, p_forces, p_stress = settings.size_powers()
    force_scale = settings.force_scale
    parts = _linear_parts(graph_model) if parts is None else parts
    data = {k: batch[k] for k in graph_model.model_input_fields if k in batch}
    batch_index, num_frames = frame_index(batch)
    types = batch[AtomicDataDict.ATOM_TYPE_KEY].view(-1)
    n_atoms = torch.bincount(batch_index, minlength=num_frames).to(_F64)
    n_b, n_off = parts.num_basis, parts.num_offsets
    device = types.device

    # --- forward with the strain trick (as NequIP's ForceStressOutput) ---
    with torch.enable_grad():
        dG_pos, dE_pos, dG_eps, dE_eps, G, E, cell = _basis_jacobians(
            parts, data, batch_index, num_frames, types, structured=structured
        )
    x_cur = parts.current().to(device)
    has_cell = cell is not None
    pos = data[AtomicDataDict.POSITIONS_KEY]

    # --- energy rows: [n_fZ | G_f] ---
    if AtomicDataDict.TOTAL_ENERGY_KEY in batch:
        if n_off == 0:
            off = torch.zeros(num_frames, 0, dtype=_F64, device=device)
        elif parts.per_type_shifts:
            off = torch.zeros(num_frames, n_off, dtype=_F64, device=device)
            ones = torch.ones_like(types, dtype=_F64)
            off.index_put_((batch_index, types), ones, accumulate=True)
        else:
            off = n_atoms.unsqueeze(1)
        A = torch.cat([off, G], 1)
        ref = batch[AtomicDataDict.TOTAL_ENERGY_KEY].to(_F64).view(-1)
        y = ref - E + A @ x_cur
        neq.add(A, y, energy_weight / n_atoms**p_energy, "energy")

    # --- force rows: F = -dE/dr ---
    if AtomicDataDict.FORCE_KEY in batch and force_weight > 0:
        A = torch.cat(
            [torch.zeros(pos.shape[0] * 3, n_off, dtype=_F64, device=device),
             -dG_pos.reshape(-1, n_b)], 1,
        )  # fmt: skip
        ref = batch[AtomicDataDict.FORCE_KEY].to(_F64)
        y = (ref + dE_pos).reshape(-1) + A @ x_cur
        atoms_of_row = n_atoms.index_select(0, batch_index).repeat_interleave(3)
        w = force_weight / atoms_of_row**p_forces
        if force_scale is not None:
            s2 = force_scale**2
            f2 = torch.nan_to_num(ref).square().sum(-1, keepdim=True).expand(-1, 3)
            w = w * (s2 / (f2 + s2)).reshape(-1)
        neq.add(A, y, w, "forces")

    # --- stress rows: sigma = (1/V) dE/deps; squared residual of W = -V sigma, divided by N ---
    if has_cell and AtomicDataDict.STRESS_KEY in batch and stress_weight > 0:
        volume = torch.linalg.det(cell.to(_F64)).abs()
        ok = volume > 0
        safe_v = torch.where(ok, volume, torch.ones_like(volume))
        A = torch.cat(
            [torch.zeros(num_frames * 9, n_off, dtype=_F64, device=device),
             (dG_eps / safe_v.view(-1, 1, 1, 1)).reshape(-1, n_b)], 1,
        )  # fmt: skip
        ref = batch[AtomicDataDict.STRESS_KEY].to(_F64).reshape(num_frames, 9)
        pred = dE_eps.reshape(num_frames, 9) / safe_v.unsqueeze(1)
        y = (ref - pred).reshape(-1) + A @ x_cur
        w = (stress_weight * safe_v**2 / n_atoms**p_stress).repeat_interleave(9)
        w = torch.where(ok.repeat_interleave(9), w, torch.zeros_like(w))
        neq.add(A, y, w, "stress")


@dataclass
class PrefitResult:
    """Outcome of :func:`linear_prefit` (losses are the weighted sums of squared residuals)."""

    x: torch.Tensor
    loss_before: float
    loss_after: float
    num_rows: dict
    num_offsets: int

    @property
    def offsets(self) -> torch.Tensor:
        return self.x[: self.num_offsets]

    @property
    def theta(self) -> torch.Tensor:
        return self.x[self.num_offsets :]


def ridge_diagonal(ata: torch.Tensor, ridge: float) -> torch.Tensor:
    """``ridge * diag(A^T W A)`` (floored at ``ridge * 1e-12 * max diag`` for empty columns):
    a ridge on each unknown relative to its own column, i.e. on the size of its contribution to
    the fit, independent of the (very different) scales of the basis functions."""
    d = torch.diagonal(ata).clone()
    floor = 1e-12 * float(d.max()) if d.numel() else 0.0
    return ridge * torch.clamp(d, min=floor)


def solve_normal_equations(
    neq: NormalEquations, ridge: float, x_current: torch.Tensor, num_offsets: int
) -> torch.Tensor:
    """Ridge solution; offsets of species absent from the data keep their current values."""
    n = neq.ata.shape[0]
    present = torch.ones(n, dtype=torch.bool, device=neq.ata.device)
    present[:num_offsets] = neq.counts[:num_offsets] > 0
    idx = torch.nonzero(present).view(-1)
    M = neq.ata[idx][:, idx]
    lam = ridge_diagonal(M, ridge)
    lam[: int(present[:num_offsets].sum())] = 0.0  # offsets are not penalised
    M = M + torch.diag(lam)
    rhs = neq.aty[idx]
    try:
        sol = torch.linalg.solve(M, rhs)
    except RuntimeError:  # singular even with the ridge (e.g. ridge = 0)
        sol = torch.linalg.lstsq(M, rhs.unsqueeze(1)).solution.view(-1)
    x = x_current.clone()
    x[idx] = sol
    return x


def _set_parameters(parts: _LinearParts, x: torch.Tensor) -> None:
    n_off = parts.num_offsets
    with torch.no_grad():
        theta = parts.readout.theta
        theta.copy_(x[n_off:].view_as(theta).to(theta.dtype))
        if n_off:
            shifts = parts.scale_shift.shifts
            shifts.copy_(x[:n_off].view_as(shifts).to(shifts.dtype))


def linear_prefit(
    model,
    batches: Iterable[AtomicDataDict.Type],
    *,
    apply: bool = True,
    reduce=None,
    structured: bool = True,
    **settings,
) -> PrefitResult:
    """Solve the SUS2 readout ``theta`` and per-species offsets ``b + s`` by weighted ridge least
    squares over ``batches`` (``AtomicDataDict`` batches with labels) and set them in ``model``
    (a ``GraphModel``; ``apply=False`` only solves). See the module docstring for the equations.

    ``settings``: the fields of :class:`PrefitSettings` (weights, ridge, ``reset_scales``,
    ``max_batches``). ``reduce``: optional function summing a tensor over distributed ranks.
    """
    options = PrefitSettings(**settings)
    gms = _graph_models(model)
    if len(gms) != 1:
        raise ValueError("linear_prefit works on one model at a time")
    gm = gms[0]
    parts = _linear_parts(gm)
    if options.reset_scales and parts.scale_shift is not None and parts.scale_shift.has_scales:
        with torch.no_grad():
            parts.scale_shift.scales.fill_(1.0)
    device = parts.readout.theta.device
    n = parts.num_offsets + parts.num_basis
    neq = NormalEquations.zeros(n, device=device)
    for k, batch in enumerate(batches):
        if options.max_batches is not None and k >= options.max_batches:
            break
        batch = AtomicDataDict.to_(dict(batch), device)
        accumulate_batch(gm, batch, neq, options, parts=parts, structured=structured)
    if reduce is not None:
        neq.ata, neq.aty, neq.yty, neq.counts = (
            reduce(t) for t in (neq.ata, neq.aty, neq.yty, neq.counts)
        )
    x_cur = parts.current().to(device)
    x = solve_normal_equations(neq, options.ridge, x_cur, parts.num_offsets)
    result = PrefitResult(x, neq.loss(x_cur), neq.loss(x), dict(neq.num_rows), parts.num_offsets)
    if apply:
        _set_parameters(parts, x)
    return result


# ----------------------------------------------------------------------------------------------
# Lightning callback
# ----------------------------------------------------------------------------------------------


class LinearPrefit(Callback):
    """Linear pre-fit of the SUS2 readout at the start of training and every ``every_n_epochs``.

    Solves ``theta`` and the per-species offsets ``b + s`` (``s`` fixed) by weighted ridge least
    squares over the training set with the nonlinear parameters fixed (:func:`linear_prefit`),
    then writes them into the model (and into the EMA copy when training with
    ``EMALightningModule``, so that validation sees them at once).

    .. code-block:: yaml

      trainer:
        callbacks:
          - _target_: nequip_sus2.train.LinearPrefit
            every_n_epochs: 5      # also re-solve at epochs 5, 10, ... (null: only at the start)
            energy_weight: 1.0     # w_E (squared energy residual / N atoms)
            force_weight: 0.01     # w_F (per force component)
            stress_weight: 0.001   # w_S (squared virial residual / N atoms)

    Args:
        at_start (bool): solve before the first training epoch (default ``True``; not when
            resuming at a later epoch)
        every_n_epochs (int): also solve at the start of every ``every_n_epochs``-th epoch
        update_ema (bool): also write the solution into the EMA weights (default ``True``)
        reset_optimizer_state (bool): drop the optimizer state (e.g. Adam's moments) of the
            re-solved parameters, which would otherwise push them off the new solution
            (default ``True``)
        **settings: the fields of :class:`PrefitSettings` (``energy_weight`` 1.0,
            ``force_weight`` 0.01, ``stress_weight`` 0.001, ``weighting`` vibrations,
            ``force_scale``, ``ridge`` 1e-3, ``reset_scales`` false: only the first solve,
            ``max_batches``: training batches per solve)
    """

    def __init__(
        self,
        at_start: bool = True,
        every_n_epochs: int | None = None,
        update_ema: bool = True,
        reset_optimizer_state: bool = True,
        **settings,
    ):
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1 or null, got {every_n_epochs}")
        self.at_start = at_start
        self.every_n_epochs = every_n_epochs
        self.settings = PrefitSettings(**settings)
        self.update_ema = update_ema
        self.reset_optimizer_state = reset_optimizer_state
        self.history: list[dict] = []
        self.last_solve_seconds: float | None = None

    def _due(self, trainer: lightning.Trainer) -> bool:
        epoch = trainer.current_epoch
        if epoch == 0 and trainer.global_step == 0:
            return self.at_start
        return self.every_n_epochs is not None and epoch > 0 and epoch % self.every_n_epochs == 0

    @staticmethod
    def _time_left(trainer: lightning.Trainer) -> float | None:
        """Seconds left of ``trainer.max_time`` (``None`` without a time limit)."""
        for callback in trainer.callbacks:
            if isinstance(callback, Timer):
                return callback.time_remaining("train")
        return None

    def on_train_epoch_start(self, trainer: lightning.Trainer, pl_module) -> None:
        if not self._due(trainer):
            return
        # Lightning checks max_time only between batches: a periodic re-solve that cannot finish
        # in the time left would overrun the budget, so it is skipped (the first solve never is)
        left = self._time_left(trainer)
        if self.history and self.last_solve_seconds is not None and left is not None:
            if left < self.last_solve_seconds:
                logger.info(
                    f"LinearPrefit: skipping the epoch-{trainer.current_epoch} solve: the last "
                    f"took {self.last_solve_seconds:.0f} s, {max(left, 0):.0f} s of "
                    "trainer.max_time are left"
                )
                return
        start = time.perf_counter()
        self.run(trainer, pl_module)
        self.last_solve_seconds = time.perf_counter() - start

    def run(self, trainer: lightning.Trainer, pl_module) -> list[PrefitResult]:
        """Solve now (for every model of ``pl_module``) and set the parameters."""
        loader = trainer.train_dataloader
        if loader is None:
            raise RuntimeError("LinearPrefit: the trainer has no training dataloader")
        reduce = None
        if trainer.world_size > 1:

            def reduce(t):
                return trainer.strategy.reduce(t, reduce_op="sum")

        results = []
        ema = getattr(pl_module, "ema", None) if self.update_ema else None
        params = list(pl_module.model.parameters())
        for name, gm in pl_module.model.items():
            before = {id(p): p.detach().clone() for p in params}
            settings = replace(
                self.settings, reset_scales=self.settings.reset_scales and not self.history
            )
            res = linear_prefit(gm, loader, reduce=reduce, **asdict(settings))
            results.append(res)
            changed = [p for p in params if not torch.equal(before[id(p)], p.detach())]
            if ema is not None and getattr(ema, "is_holding_ema_weights", False):
                with torch.no_grad():
                    for p, p_ema in zip(params, ema.ema_weights, strict=True):
                        if not torch.equal(before[id(p)], p.detach()):
                            p_ema.copy_(p.detach())
            if self.reset_optimizer_state:
                # stale moments (e.g. Adam's momentum) would push the new solution away at once
                for opt in trainer.optimizers:
                    for p in changed:
                        opt.state.pop(p, None)
            rms = math.sqrt(max(res.loss_after, 0.0) / max(sum(res.num_rows.values()), 1))
            logger.info(
                f"LinearPrefit ({name}, epoch {trainer.current_epoch}): weighted loss "
                f"{res.loss_before:.6g} -> {res.loss_after:.6g} over {res.num_rows} rows "
                f"(weighted RMS residual {rms:.4g})"
            )
            self.history.append(
                {
                    "epoch": trainer.current_epoch,
                    "model": name,
                    "loss_before": res.loss_before,
                    "loss_after": res.loss_after,
                    "num_rows": res.num_rows,
                }
            )
        return results

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))
