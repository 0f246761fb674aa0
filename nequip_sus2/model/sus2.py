"""Model builders: :func:`SUS2Model` (new models) and :func:`SUS2FromMTP` (published ``.mtp``)."""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import os
from collections.abc import Callable, Sequence

import torch
from hydra.utils import instantiate
from nequip.data import AtomicDataDict
from nequip.model import model_builder
from nequip.nn import (
    AtomwiseReduce,
    ForceStressOutput,
    PerTypeScaleShift,
    SequentialGraphNetwork,
)
from nequip.nn.embedding import EdgeLengthNormalizer

from ..io.mtp import read_mtp
from ..io.mtp_model import MTP_INFO_ATTR, mtp_parameters
from ..nn import (
    ChebyshevRadialBasis,
    DecoupledElementEmbedding,
    LinearReadout,
    MomentContraction,
    UniversalPairScaling,
)
from ..nn.core import AddCoreEnergy, RepulsiveCore, core_radius_table
from ..program import (
    ContractionProgram,
    generate_program,
    scaling_channel_of_mu,
)

#: atoms per cubic Angstrom assumed for the radial scaling when ``avg_num_neighbors`` is unknown
_DEFAULT_NUMBER_DENSITY = 0.05

#: arguments every NequIP model builder takes (``nequip.model.model_builder`` consumes them)
_BUILDER_ARGUMENTS = ("seed", "model_dtype", "compile_mode")


def _unknown_arguments_message(name: str, unknown: Sequence[str], valid: Sequence[str]) -> str:
    parts, guessed = [], True
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=1)
        parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        guessed = guessed and bool(close)
    noun = "argument" if len(unknown) == 1 else "arguments"
    text = f"{name}: unknown {noun} {', '.join(parts)}"
    return text if guessed else f"{text}; valid arguments: {', '.join(sorted(valid))}"


def checked_arguments(builder: Callable) -> Callable:
    """Refuse unknown keyword arguments of a model builder with one message that names each and
    the closest valid one (a misspelled key of a config's ``model`` block), instead of a
    ``TypeError`` deep inside Hydra's instantiation. The signature stays the builder's own."""
    params = inspect.signature(builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return builder
    valid = tuple(dict.fromkeys([*params, *_BUILDER_ARGUMENTS]))

    @functools.wraps(builder)
    def checked(*args, **kwargs):
        unknown = [key for key in kwargs if key not in valid]
        if unknown:
            raise TypeError(_unknown_arguments_message(builder.__name__, unknown, valid))
        return builder(*args, **kwargs)

    return checked


def default_radial_scaling(r_max: float, avg_num_neighbors: float | None) -> float:
    """sigma = 10 / (N_nb R_c^2): makes the basic moments O(1) at initialisation.

    ``R_c^2 / 10`` is the mean of ``(R_c - r)^2`` over neighbours spread uniformly in the cutoff
    sphere, so ``sum_j sigma (r_j - R_c)^2 ~ 1``. Without ``avg_num_neighbors`` a number density
    of 0.05 atoms/A^3 is assumed.
    """
    if avg_num_neighbors is None:
        avg_num_neighbors = _DEFAULT_NUMBER_DENSITY * 4.0 / 3.0 * math.pi * r_max**3
    return 10.0 / (max(float(avg_num_neighbors), 1.0) * r_max**2)


def sus2_network(model: torch.nn.Module) -> torch.nn.Module | None:
    """The ``SequentialGraphNetwork`` of a SUS2 model (the one holding the module named
    ``moments``), or ``None`` when ``model`` holds none or several."""
    nets = [
        m
        for m in model.modules()
        if type(m).__name__ == "SequentialGraphNetwork" and "moments" in m._modules
    ]
    return nets[0] if len(nets) == 1 else None


def _per_type(value, type_names: Sequence[str], what: str):
    """Accept a float, a {type: value} dict or a per-type sequence; return a float or dict."""
    if value is None or isinstance(value, (int, float)):
        return value
    if isinstance(value, dict):
        if set(value) != set(type_names):
            raise ValueError(
                f"{what}: keys {sorted(value)} do not match type_names {list(type_names)}"
            )
        return {k: float(value[k]) for k in type_names}
    values = [float(v) for v in value]
    if len(values) != len(type_names):
        raise ValueError(f"{what}: {len(values)} values for {len(type_names)} type_names")
    return dict(zip(type_names, values, strict=True))


def repulsive_core_options(
    repulsive_core: float | dict[str, float] | str | bool | None,
    width: float,
    type_names: Sequence[str],
    min_dist: float,
) -> dict | None:
    """The :class:`~nequip_sus2.nn.core.RepulsiveCore` arguments of a builder's
    ``repulsive_core`` (``None``/``False``: no core; ``"min_dist"``/``True``: the model's
    ``min_dist`` for every pair; a float; or ``{"A-B": r, ..., "default": r}``)."""
    if repulsive_core is None or repulsive_core is False:
        return None
    if repulsive_core is True or repulsive_core == "min_dist":
        repulsive_core = float(min_dist)
    elif isinstance(repulsive_core, str):
        raise ValueError(
            f"repulsive_core must be 'min_dist', a radius or a {{'A-B': radius}} mapping, "
            f"got {repulsive_core!r}"
        )
    if not isinstance(repulsive_core, (int, float)):
        repulsive_core = dict(repulsive_core)  # an OmegaConf DictConfig from a config
    return {
        "inner_radius": core_radius_table(repulsive_core, type_names),
        "width": float(width),
    }


def _assemble(
    *,
    r_max: float,
    type_names: Sequence[str],
    program: ContractionProgram,
    eta_of_mu: Sequence[int],
    radial_basis_size: int,
    radial_scaling: float,
    alpha,
    r0,
    pair_scaling_trainable: bool,
    element_embedding_trainable: bool = True,
    radial_coeffs=None,
    species_weights=None,
    unused_weights=None,
    theta=None,
    per_type_energy_scales=None,
    per_type_energy_shifts=None,
    per_type_energy_scales_trainable: bool = True,
    per_type_energy_shifts_trainable: bool = True,
    pair_potential: dict | None = None,
    do_derivatives: bool = True,
    mtp_info: dict | None = None,
    repulsive_core: dict | None = None,
) -> ForceStressOutput:
    """Chain the SUS2 modules: scaling -> radial basis -> embedding -> moments -> readout."""
    modules: dict[str, torch.nn.Module] = {}
    prev = None
    if repulsive_core is not None:
        if pair_potential is not None:
            raise ValueError("repulsive_core and pair_potential cannot be combined; choose one")
        # first: ZBL from the true lengths, then the learned part sees the floored ones
        modules["repulsive_core"] = prev = RepulsiveCore(type_names=type_names, **repulsive_core)
    if pair_potential is not None:
        # host pair potentials (e.g. ZBL) read the normalised edge length
        modules["edge_norm"] = prev = EdgeLengthNormalizer(r_max=r_max, type_names=type_names)
    num_channels = max(eta_of_mu) + 1
    modules["scaling"] = prev = UniversalPairScaling(
        type_names=type_names,
        num_channels=num_channels,
        alpha=alpha,
        r0=r0,
        trainable=pair_scaling_trainable,
        irreps_in=None if prev is None else prev.irreps_out,
    )
    modules["radial_basis"] = prev = ChebyshevRadialBasis(
        r_max=r_max,
        radial_basis_size=radial_basis_size,
        radial_scaling=radial_scaling,
        irreps_in=prev.irreps_out,
    )
    modules["embedding"] = prev = DecoupledElementEmbedding(
        type_names=type_names,
        eta_of_mu=eta_of_mu,
        radial_basis_size=radial_basis_size,
        coeffs=radial_coeffs,
        weights=species_weights,
        unused_weights=unused_weights,
        coeffs_init_range=1.0 / math.sqrt(radial_basis_size),
        trainable=element_embedding_trainable,
        irreps_in=prev.irreps_out,
    )
    modules["moments"] = prev = MomentContraction(program=program, irreps_in=prev.irreps_out)
    # what an .mtp export needs beyond the parameters and the program (header fields)
    setattr(prev, MTP_INFO_ATTR, dict(mtp_info or {}))
    modules["readout"] = prev = LinearReadout(
        num_basis=len(program.mapping), theta=theta, irreps_in=prev.irreps_out
    )
    modules["per_type_energy_scale_shift"] = prev = PerTypeScaleShift(
        type_names=type_names,
        field=AtomicDataDict.PER_ATOM_ENERGY_KEY,
        out_field=AtomicDataDict.PER_ATOM_ENERGY_KEY,
        scales=_per_type(per_type_energy_scales, type_names, "per_type_energy_scales"),
        shifts=_per_type(per_type_energy_shifts, type_names, "per_type_energy_shifts"),
        scales_trainable=per_type_energy_scales_trainable,
        shifts_trainable=per_type_energy_shifts_trainable,
        irreps_in=prev.irreps_out,
    )
    if repulsive_core is not None:
        modules["repulsive_core_energy"] = prev = AddCoreEnergy(irreps_in=prev.irreps_out)
    if pair_potential is not None:
        modules["pair_potential"] = prev = instantiate(
            pair_potential, type_names=type_names, irreps_in=prev.irreps_out
        )
    modules["total_energy_sum"] = AtomwiseReduce(
        irreps_in=prev.irreps_out,
        reduce="sum",
        field=AtomicDataDict.PER_ATOM_ENERGY_KEY,
        out_field=AtomicDataDict.TOTAL_ENERGY_KEY,
    )
    return ForceStressOutput(SequentialGraphNetwork(modules), do_derivatives=do_derivatives)


@checked_arguments
@model_builder
def SUS2Model(
    r_max: float,
    type_names: Sequence[str],
    max_rank: int = 2,
    radial_channels: int = 3,
    radial_basis_size: int = 8,
    scaling_map: str = "K",
    basis: str = "full_rank",
    min_dist: float | None = None,
    radial_scaling: float | None = None,
    avg_num_neighbors: float | None = None,
    per_type_energy_scales: float | dict[str, float] | None = 1.0,
    per_type_energy_shifts: float | dict[str, float] | None = 0.0,
    per_type_energy_scales_trainable: bool = True,
    per_type_energy_shifts_trainable: bool = True,
    pair_scaling_trainable: bool = True,
    element_embedding_trainable: bool = True,
    pair_potential: dict | None = None,
    do_derivatives: bool = True,
    repulsive_core: float | dict[str, float] | str | bool | None = None,
    repulsive_core_width: float = 0.5,
):
    r"""SUS2 model (Hu et al., PNAS 2025): energies, forces, and stresses/virials.

    Site energy :math:`E_i = b_{Z_i} + s_{Z_i}(1 + \sum_a \theta_a B_a(i))` with the scalar basis
    :math:`B_a` contracted from moment tensors of the radial functions
    :math:`f_\mu = w_{Z_i} w_{Z_j}\sum_n c_{\mu n}\,\sigma T_n(\tanh(r^*/2))(r - R_c)^2`,
    :math:`r^* = \alpha_{\eta Z_i Z_j}(r - r^0_{\eta Z_i Z_j})`.

    Args:
        seed (int): seed for reproducibility
        model_dtype (str): ``float32`` or ``float64``
        r_max (float): cutoff radius R_c (Angstrom)
        type_names (Sequence[str]): atom type names
        max_rank (int): largest moment-tensor rank L (1, 2 or 3; default 2)
        radial_channels (int): radial channels K (N_mu = K (L+1) radial functions; default 3)
        radial_basis_size (int): Chebyshev polynomials R per radial function (default 8)
        scaling_map (str): which part of mu the pair scaling (alpha, r0) depends on: ``K``
            (one per radial channel, default), ``L`` (one per rank) or ``LK`` (one per mu)
        basis (str): ``full_rank`` (default; drops the exact duplicates of the published basis)
            or ``published`` (the basis of the published SUS2 programs, exportable as ``.mtp``)
        min_dist (float): R_min for initialising alpha = 6.6/(R_c - R_min) and
            r0 = (R_min + R_c)/2 (default ``0.25 * r_max``)
        radial_scaling (float): global radial scaling sigma (default from ``avg_num_neighbors``,
            see :func:`default_radial_scaling`)
        avg_num_neighbors (float): mean neighbour count of the data, e.g.
            ``${training_data_stats:num_neighbors_mean}``; only sets the default sigma
        per_type_energy_scales: per-species energy scale s (float or ``{type: value}``)
        per_type_energy_shifts: per-species isolated-atom energy b + s (float or dict)
        per_type_energy_scales_trainable (bool): train s (default ``True``)
        per_type_energy_shifts_trainable (bool): train b + s (default ``True``)
        pair_scaling_trainable (bool): train alpha and r0 (``False`` freezes the scaling block)
        element_embedding_trainable (bool): train the radial coefficients c and the species
            weights w (``False`` freezes the element embedding)
        pair_potential (dict): optional host pair potential, e.g. ``nequip.nn.pair_potential.ZBL``
        do_derivatives (bool): compute forces and stresses/virials by autograd (default ``True``)
        repulsive_core: ZBL below the trained domain (:mod:`nequip_sus2.nn.core`): the inner
            radius of every species pair, e.g. the shortest distances of the training data from
            :func:`nequip_sus2.data.distances.shortest_pair_distances` as ``{"A-B": r, ...}``
            (plus a ``default``), one float for all pairs, or ``min_dist``; ``None`` (default):
            no core
        repulsive_core_width (float): width w of the switch below each inner radius (default
            0.5 Angstrom)
    """
    try:
        r_max_ok = 0 < float(r_max) < math.inf
    except (TypeError, ValueError):
        r_max_ok = False
    if not r_max_ok:
        raise ValueError(f"r_max must be positive and finite, got {r_max!r}")
    if max_rank not in (1, 2, 3):
        raise ValueError(f"max_rank (L) must be 1, 2 or 3, got {max_rank}")
    if basis not in ("full_rank", "published"):
        raise ValueError(f"basis must be 'full_rank' or 'published', got {basis!r}")
    if radial_channels < 1:
        raise ValueError(f"radial_channels must be >= 1, got {radial_channels}")
    program = generate_program(max_rank, radial_channels, full_rank=basis == "full_rank")
    n_mu = radial_channels * (max_rank + 1)
    eta_of_mu = scaling_channel_of_mu(scaling_map, max_rank, n_mu)
    if min_dist is None:
        min_dist = 0.25 * r_max
    if not 0 < min_dist < r_max:
        raise ValueError(f"min_dist must lie in (0, r_max = {r_max}), got {min_dist!r}")
    if radial_scaling is not None and not math.isfinite(radial_scaling):
        raise ValueError(f"radial_scaling must be a finite number, got {radial_scaling!r}")
    if radial_scaling is None:
        radial_scaling = default_radial_scaling(r_max, avg_num_neighbors)
    core = repulsive_core_options(repulsive_core, repulsive_core_width, type_names, min_dist)
    return _assemble(
        r_max=r_max,
        type_names=type_names,
        program=program,
        eta_of_mu=eta_of_mu,
        radial_basis_size=radial_basis_size,
        radial_scaling=radial_scaling,
        alpha=6.6 / (r_max - min_dist),
        r0=0.5 * (min_dist + r_max),
        pair_scaling_trainable=pair_scaling_trainable,
        element_embedding_trainable=element_embedding_trainable,
        per_type_energy_scales=per_type_energy_scales,
        per_type_energy_shifts=per_type_energy_shifts,
        per_type_energy_scales_trainable=per_type_energy_scales_trainable,
        per_type_energy_shifts_trainable=per_type_energy_shifts_trainable,
        pair_potential=pair_potential,
        do_derivatives=do_derivatives,
        mtp_info={"L": max_rank, "scaling_map": scaling_map, "min_dist": float(min_dist)},
        repulsive_core=core,
    )


@model_builder
def _SUS2FromParameters(r_max: float, type_names: Sequence[str], **kwargs):
    return _assemble(r_max=r_max, type_names=type_names, **kwargs)


@checked_arguments
def SUS2FromMTP(
    mtp_path: str | os.PathLike,
    type_names: Sequence[str],
    seed: int = 0,
    model_dtype: str = "float64",
    pair_scaling_trainable: bool = True,
    element_embedding_trainable: bool = True,
    per_type_energy_scales_trainable: bool = True,
    per_type_energy_shifts_trainable: bool = True,
    pair_potential: dict | None = None,
    do_derivatives: bool = True,
    compile_mode: str | None = None,
    repulsive_core: float | dict[str, float] | str | bool | None = None,
    repulsive_core_width: float = 0.5,
):
    """A SUS2 model with exactly the parameters and program of a published ``.mtp`` file.

    The cutoff and all hyper-parameters come from the file; ``type_names`` gives the species of
    the file's type indices 0..C-1 in order (the file stores no element symbols). Use it in a
    config (``_target_: nequip_sus2.model.SUS2FromMTP``) to evaluate or fine-tune a published
    model; ``pair_scaling_trainable: false`` freezes alpha and r0 as the original fine-tuning does,
    ``element_embedding_trainable: false`` freezes the radial coefficients and species weights.
    The ``.mtp`` file must stay at ``mtp_path`` for checkpoints that refer to it.

    ``repulsive_core: min_dist`` adds ZBL below the file's ``min_dist`` (the shortest distance
    the model was fitted for) and floors the distances the learned part sees there
    (:mod:`nequip_sus2.nn.core`); a float or ``{"A-B": r, ...}`` sets the inner radii directly,
    ``repulsive_core_width`` the width of the switch (default 0.5 Angstrom). Predictions at
    distances at or beyond the inner radii are unchanged.
    """
    mtp = read_mtp(mtp_path)
    type_names = list(type_names)
    if len(type_names) != mtp.species_count:
        raise ValueError(
            f"{mtp_path}: species_count = {mtp.species_count} but {len(type_names)} type_names "
            f"were given ({' '.join(type_names)})"
        )
    extra = {} if compile_mode is None else {"compile_mode": compile_mode}
    core = repulsive_core_options(repulsive_core, repulsive_core_width, type_names, mtp.min_dist)
    if core is not None:
        extra["repulsive_core"] = core
    return _SUS2FromParameters(
        seed=seed,
        model_dtype=model_dtype,
        type_names=type_names,
        pair_scaling_trainable=pair_scaling_trainable,
        element_embedding_trainable=element_embedding_trainable,
        per_type_energy_scales_trainable=per_type_energy_scales_trainable,
        per_type_energy_shifts_trainable=per_type_energy_shifts_trainable,
        pair_potential=pair_potential,
        do_derivatives=do_derivatives,
        **mtp_parameters(mtp, type_names),
        **extra,
    )
