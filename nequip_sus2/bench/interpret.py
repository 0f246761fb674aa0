r"""SUS2 interpretability: universal radial curves, per-species energy scale/shift, (alpha, r0).

A SUS2 radial function factorises (docs/theory.md §2.3-2.4) as

.. math:: f_\mu(r; Z_i, Z_j) = w_{Z_i} w_{Z_j}\,\sigma (r - R_c)^2\, g_\mu(r^*),\qquad
          g_\mu(x) = \sum_n c_{\mu n} T_n(\tanh(x/2)),\quad
          r^* = \alpha_{\eta(\mu) Z_i Z_j}(r - r^0_{\eta(\mu) Z_i Z_j})

so every species pair samples the same learned curve ``g_mu`` over its own window of ``r*``:
plotted against ``r*``, ``f_mu / (w_i w_j sigma (r - R_c)^2)`` of all pairs collapses onto
``g_mu``, while the raw ``f_mu(r)`` differ from pair to pair. The site energy is
``E_i = b_Z + s_Z (1 + sum_a theta_a B_a)``; NequIP's ``PerTypeScaleShift`` holds ``s`` as
``scales`` and ``b + s`` as ``shifts``, so ``b = shifts - scales``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["sus2_modules", "sus2_parameters", "radial_curves", "default_pairs", "sus2_summary"]


def sus2_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The SUS2 modules of a model by role (``scaling``, ``radial``, ``embedding``,
    ``scale_shift``); ``ValueError`` if it is not a SUS2 model."""
    roles = {
        "UniversalPairScaling": "scaling",
        "ChebyshevRadialBasis": "radial",
        "DecoupledElementEmbedding": "embedding",
        "PerTypeScaleShift": "scale_shift",
    }
    found: dict[str, torch.nn.Module] = {}
    for m in model.modules():
        role = roles.get(type(m).__name__)
        if role is not None and role not in found:
            found[role] = m
    missing = [r for r in roles.values() if r not in found]
    if missing:
        raise ValueError(f"not a SUS2 model (no {', '.join(missing)} module)")
    return found


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def sus2_parameters(model: torch.nn.Module, type_names: Sequence[str]) -> dict[str, Any]:
    """The interpretable parameters as NumPy arrays (float64)."""
    mods = sus2_modules(model)
    C = len(type_names)
    ss = mods["scale_shift"]
    scales = _np(ss.scales) if getattr(ss, "has_scales", True) else np.ones(1)
    shifts = _np(ss.shifts) if getattr(ss, "has_shifts", True) else np.zeros(1)
    scales = np.broadcast_to(scales.reshape(-1), (C,)).copy()
    shifts = np.broadcast_to(shifts.reshape(-1), (C,)).copy()
    emb, rad, sc = mods["embedding"], mods["radial"], mods["scaling"]
    return {
        "type_names": list(type_names),
        "alpha": _np(sc.alpha),  # [N_eta, C, C]
        "r0": _np(sc.r0),
        "coeffs": _np(emb.coeffs),  # [N_mu, R]
        "weights": _np(emb.weights),  # [C]
        "eta_of_mu": emb.eta_of_mu.detach().cpu().numpy().astype(int),
        "r_max": float(rad.r_max),
        "sigma": float(rad.radial_scaling),
        "s": scales,
        "b": shifts - scales,
        "shifts": shifts,
    }


def universal_curve(coeffs_mu: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``g_mu(x) = sum_n c_n T_n(tanh(x / 2))``."""
    xi = np.tanh(0.5 * np.asarray(x, dtype=np.float64))
    return np.polynomial.chebyshev.chebval(xi, coeffs_mu)


def default_pairs(type_names: Sequence[str], present: Sequence[str] | None, n: int = 4):
    """Ordered pairs (centre, neighbour) among the first ``n`` species of ``present`` (or of the
    model): all homo-nuclear pairs, then hetero-nuclear ones."""
    species = [s for s in (present or type_names) if s in type_names][:n]
    homo = [(a, a) for a in species]
    hetero = list(itertools.combinations(species, 2))
    return (homo + hetero)[: max(n + 2, 2)]


def radial_curves(
    params: dict[str, Any],
    pairs: Sequence[tuple[str, str]],
    r_min: float | None = None,
    n_r: int = 200,
) -> dict[str, Any]:
    """``f_mu(r)`` and the collapsed ``f_mu / (w_i w_j sigma (r - R_c)^2)`` against ``r*`` for
    each pair; ``r`` from ``r_min`` (default ``0.25 R_c``) to just below ``R_c``."""
    names = params["type_names"]
    index = {s: i for i, s in enumerate(names)}
    rc, sigma = params["r_max"], params["sigma"]
    r_lo = 0.25 * rc if r_min is None else float(r_min)
    r = np.linspace(r_lo, rc, n_r, endpoint=False)
    env = sigma * (r - rc) ** 2
    coeffs, w, eta = params["coeffs"], params["weights"], params["eta_of_mu"]
    out_pairs = []
    for a, b in pairs:
        i, j = index[a], index[b]
        per_mu = []
        for mu in range(coeffs.shape[0]):
            alpha = float(params["alpha"][eta[mu], i, j])
            r0 = float(params["r0"][eta[mu], i, j])
            rstar = alpha * (r - r0)
            g = universal_curve(coeffs[mu], rstar)
            per_mu.append(
                {
                    "alpha": alpha,
                    "r0": r0,
                    "r_star": rstar,
                    "f": w[i] * w[j] * env * g,
                    "collapsed": g,
                }
            )
        out_pairs.append({"pair": f"{a}-{b}", "centre": a, "neighbour": b, "mu": per_mu})
    return {
        "r": r,
        "pairs": out_pairs,
        "num_radial_funcs": int(coeffs.shape[0]),
        "coeffs": coeffs,
    }


def sus2_summary(
    model: torch.nn.Module,
    type_names: Sequence[str],
    pairs: Sequence[tuple[str, str]] | None = None,
    present: Sequence[str] | None = None,
    r_min: float | None = None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``(json_summary, params, curves)`` of a SUS2 model. ``present``: species of the data (used
    for the default pairs and to order the per-species tables)."""
    params = sus2_parameters(model, type_names)
    names = list(type_names)
    if pairs is None:
        pairs = default_pairs(names, present)
    for a, b in pairs:
        for s in (a, b):
            if s not in names:
                raise ValueError(
                    f"pair {a}-{b}: {s} is not a type of the model ({' '.join(names)})"
                )
    curves = radial_curves(params, pairs, r_min=r_min)
    windows = {}
    for p in curves["pairs"]:
        windows[p["pair"]] = [
            {
                "mu": mu,
                "alpha": m["alpha"],
                "r0": m["r0"],
                "r_star_min": float(np.min(m["r_star"])),
                "r_star_max": float(np.max(m["r_star"])),
            }
            for mu, m in enumerate(p["mu"])
        ]
    summary = {
        "num_types": len(names),
        "num_scaling_channels": int(params["alpha"].shape[0]),
        "num_radial_funcs": int(params["coeffs"].shape[0]),
        "radial_basis_size": int(params["coeffs"].shape[1]),
        "r_max": params["r_max"],
        "sigma": params["sigma"],
        "eta_of_mu": params["eta_of_mu"].tolist(),
        "pairs": [f"{a}-{b}" for a, b in pairs],
        "r_star_windows": windows,
        "per_species": {
            s: {
                "s": float(params["s"][k]),
                "b": float(params["b"][k]),
                "isolated_atom_energy": float(params["shifts"][k]),
                "w": float(params["weights"][k]),
            }
            for k, s in enumerate(names)
        },
        "universal_coeffs": params["coeffs"].tolist(),
        "alpha": params["alpha"].tolist(),
        "r0": params["r0"].tolist(),
        "alpha_stats": _stats(params["alpha"]),
        "r0_stats": _stats(params["r0"]),
    }
    return summary, params, curves


def _stats(x: np.ndarray) -> dict[str, float]:
    return {
        "min": float(x.min()),
        "max": float(x.max()),
        "mean": float(x.mean()),
        "std": float(x.std()),
        "asymmetry_rms": float(np.sqrt(np.mean((x - np.swapaxes(x, -1, -2)) ** 2))),
    }
