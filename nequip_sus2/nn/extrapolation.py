"""Extrapolation grade of the scalar basis against a MaxVol active set (MLIP-style gamma)."""

from __future__ import annotations

import torch
from nequip.data import AtomicDataDict
from nequip.nn import GraphModuleMixin

from .._keys import EXTRAPOLATION_GRADE_KEY, SCALAR_BASIS_KEY


class ExtrapolationGrade(GraphModuleMixin, torch.nn.Module):
    r"""Per-atom extrapolation grade of the scalar basis ``B(i)`` (docs/theory.md §2.6) against an
    active set.

    For species ``Z`` the active set is ``N_B`` training environments whose basis rows form the
    square matrix ``A_Z`` of (locally) maximal volume (MaxVol, see
    :mod:`nequip_sus2.active_set`). The grade of atom ``i`` of species ``Z`` is

    .. math:: \gamma(i) = \max_a \left| \left(B(i)\, A_Z^{-1}\right)_a \right|

    i.e. the largest coefficient needed to write ``B(i)`` as a combination of the active rows:
    ``gamma <= 1`` is interpolation, ``gamma > 1`` extrapolation. It depends only on the span of
    the basis (invariant to any invertible linear change of basis) and inherits the rotation,
    translation and permutation invariance of ``B``.

    If the training environments of a species span fewer than ``N_B`` dimensions, MaxVol runs in
    their span (``inverse`` then maps onto it) and ``residual`` (a projector onto the orthogonal
    complement, in scaled coordinates) with ``residual_scale`` adds
    ``|B(i) R_Z| / scale_Z``: the component outside the training span relative to the largest
    one seen in training. Both are zero / one for full-rank species.

    The module stores everything in buffers of static shape (``[C, N_B, N_B]``), so it survives
    checkpoints, packaging and AOT compilation; it is inserted after ``moments`` by the
    persistent model modifier ``add_extrapolation_grade`` (of
    :class:`~nequip_sus2.nn.MomentContraction`, see :func:`insert_extrapolation_grade`) and writes
    ``sus2_extrapolation_grade`` (``[num_atoms, 1]``, in the buffers' dtype, float64 by
    default). It does not change energies, forces or stresses.

    Args:
        num_types (int): number of species C
        num_basis (int): number of scalar basis functions N_B
        inverse: ``[C, N_B, N_B]`` per-species ``A_Z^{-1}`` (in the basis' own coordinates);
            zeros if not given (filled from a ``state_dict``)
        residual: ``[C, N_B, N_B]`` per-species projector onto the complement of the training
            span, or ``None`` when every species is full rank
        residual_scale: ``[C]`` positive scales for the residual term
    """

    has_residual: bool

    def __init__(
        self,
        num_types: int,
        num_basis: int,
        inverse: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        residual_scale: torch.Tensor | None = None,
        has_residual: bool | None = None,
        in_field: str = SCALAR_BASIS_KEY,
        out_field: str = EXTRAPOLATION_GRADE_KEY,
        irreps_in=None,
    ):
        super().__init__()
        self.num_types = int(num_types)
        self.num_basis = int(num_basis)
        self.in_field = in_field
        self.out_field = out_field
        shape = (self.num_types, self.num_basis, self.num_basis)
        f64 = torch.float64
        inverse = torch.zeros(shape, dtype=f64) if inverse is None else inverse
        if has_residual is None:
            has_residual = residual is not None
        self.has_residual = bool(has_residual)
        if residual is None:
            residual = torch.zeros(shape if self.has_residual else (0,), dtype=f64)
        if residual_scale is None:
            residual_scale = torch.ones(self.num_types, dtype=f64)
        inverse = torch.as_tensor(inverse, dtype=f64).clone()
        residual = torch.as_tensor(residual, dtype=f64).clone()
        residual_scale = torch.as_tensor(residual_scale, dtype=f64).clone().view(-1)
        if tuple(inverse.shape) != shape:
            raise ValueError(f"inverse: expected shape {shape}, got {tuple(inverse.shape)}")
        if self.has_residual and tuple(residual.shape) != shape:
            raise ValueError(f"residual: expected shape {shape}, got {tuple(residual.shape)}")
        if residual_scale.shape != (self.num_types,) or not bool((residual_scale > 0).all()):
            raise ValueError("residual_scale: expected num_types positive values")
        self.register_buffer("inverse", inverse)
        self.register_buffer("residual", residual)
        self.register_buffer("residual_scale", residual_scale)
        self._init_irreps(
            irreps_in=irreps_in,
            required_irreps_in=[in_field],
            irreps_out={out_field: "0e"},
        )

    def extra_repr(self) -> str:
        return (
            f"num_types={self.num_types}, num_basis={self.num_basis}, "
            f"has_residual={self.has_residual}"
        )

    def _per_type_product(
        self, basis: torch.Tensor, matrices: torch.Tensor, types: torch.Tensor
    ) -> torch.Tensor:
        """``basis[i] @ matrices[types[i]]`` for every atom, as one GEMM and a gather."""
        n_b = self.num_basis
        # [N_B, C * N_B]: column block Z is matrices[Z]
        flat = matrices.permute(1, 0, 2).reshape(n_b, self.num_types * n_b)
        all_types = torch.mm(basis, flat).view(-1, self.num_types, n_b)
        index = types.view(-1, 1, 1).expand(-1, 1, n_b)
        return torch.gather(all_types, 1, index).view(-1, n_b)

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        basis = data[self.in_field].detach().to(self.inverse.dtype)
        types = data[AtomicDataDict.ATOM_TYPE_KEY].view(-1)
        coeff = self._per_type_product(basis, self.inverse, types)
        gamma = coeff.abs().amax(dim=-1)
        if self.has_residual:
            outside = self._per_type_product(basis, self.residual, types)
            outside = torch.linalg.vector_norm(outside, dim=-1) / torch.index_select(
                self.residual_scale, 0, types
            )
            gamma = torch.maximum(gamma, outside)
        data[self.out_field] = gamma.view(-1, 1)
        return data


#: name of the grade module inside the SequentialGraphNetwork (right after ``moments``)
GRADE_MODULE_NAME = "extrapolation_grade"
#: name of the persistent model modifier that inserts it (``MomentContraction``'s)
GRADE_MODIFIER = "add_extrapolation_grade"
_STATE_KEYS = ("inverse", "residual", "residual_scale")


def moments_networks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every ``SequentialGraphNetwork`` in ``model`` with a ``moments`` child (by class name, so
    that models loaded from packages qualify too); ``TypeError`` if there is none."""
    nets = [
        m
        for m in model.modules()
        if type(m).__name__ == "SequentialGraphNetwork" and "moments" in m._modules
    ]
    if not nets:
        raise TypeError("not a SUS2 model: no SequentialGraphNetwork with a `moments` module")
    return nets


def empty_grade_state(num_types: int, num_basis: int, has_residual: bool = False) -> dict:
    """Grade buffers of the given shapes (zero inverses, unit scales) for a model whose buffers
    a checkpoint's ``state_dict`` fills afterwards."""
    shape = (int(num_types), int(num_basis), int(num_basis))
    f64 = torch.float64
    return {
        "inverse": torch.zeros(shape, dtype=f64),
        "residual": torch.zeros(shape if has_residual else (0,), dtype=f64),
        "residual_scale": torch.ones(int(num_types), dtype=f64),
    }


def grade_modifier_config(num_types: int, num_basis: int, has_residual: bool) -> dict:
    """The ``nequip.model.modify`` entry that rebuilds a grade of these shapes (what a
    checkpoint with a grade records; its ``state_dict`` holds the buffers)."""
    return {
        "modifier": GRADE_MODIFIER,
        "num_types": int(num_types),
        "num_basis": int(num_basis),
        "has_residual": bool(has_residual),
    }


def insert_extrapolation_grade(model: torch.nn.Module, state, module_class=None):
    """Insert (or refresh) an :class:`ExtrapolationGrade` after ``moments``, in place: the body
    of the ``add_extrapolation_grade`` model modifier.

    ``state``: a dict with the buffers ``inverse`` ``[C, N_B, N_B]``, ``residual`` (same shape,
    or empty when every species is full rank) and ``residual_scale`` ``[C]``, or the path of
    such a dict saved with ``torch.save`` (``ActiveSet.save`` /
    ``nequip-sus2 active-set --save-active-set``). Every ``SequentialGraphNetwork`` with a
    ``moments`` child gets one (also inside a train-time-compile wrapper); ``module_class``
    overrides the class (for models loaded from packages, whose code comes from the package).
    Returns ``model``.
    """
    if isinstance(state, (str, bytes)) or hasattr(state, "__fspath__"):
        state = torch.load(state, map_location="cpu", weights_only=True)
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"extrapolation grade state lacks {missing}")
    inverse = torch.as_tensor(state["inverse"], dtype=torch.float64)
    residual = torch.as_tensor(state["residual"], dtype=torch.float64)
    scale = torch.as_tensor(state["residual_scale"], dtype=torch.float64)
    has_residual = residual.numel() > 0
    cls = ExtrapolationGrade if module_class is None else module_class
    for net in moments_networks(model):
        existing = net._modules.get(GRADE_MODULE_NAME)
        if existing is not None:
            if existing.inverse.shape != inverse.shape or existing.has_residual != has_residual:
                raise ValueError("the model's extrapolation grade module has other shapes")
            with torch.no_grad():
                existing.inverse.copy_(inverse)
                existing.residual.copy_(residual)
                existing.residual_scale.copy_(scale)
            continue
        moments = net._modules["moments"]
        if int(moments.num_basis) != inverse.shape[-1]:
            raise ValueError(
                f"the model has N_B = {moments.num_basis}, the active set {inverse.shape[-1]}"
            )
        module = cls(
            num_types=inverse.shape[0],
            num_basis=inverse.shape[-1],
            inverse=inverse,
            residual=residual if has_residual else None,
            residual_scale=scale,
            irreps_in=moments.irreps_out,
        )
        net.insert(GRADE_MODULE_NAME, module, after="moments")
    return model
