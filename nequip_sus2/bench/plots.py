"""Figures of the benchmark (matplotlib, Agg canvas, no pyplot state).

Every function returns a :class:`matplotlib.figure.Figure`; :func:`save` writes it as PNG. Figures
are built on their own Agg canvas, so they work headless and never touch pyplot's global state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .accuracy import Predictions

__all__ = [
    "cost_figure",
    "eos_figure",
    "error_hist_figure",
    "figure",
    "md_figure",
    "parity_figure",
    "per_element_figure",
    "save",
    "sus2_maps_figure",
    "sus2_radial_figure",
    "sus2_scale_shift_figure",
]

_LABELS = {
    "energy_per_atom": ("energy", "eV/atom", "meV/atom"),
    "forces": ("force components", "eV/Å", "meV/Å"),
    "stress": ("stress components", "eV/Å³", "meV/Å³"),
}


def figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: str | Path, dpi: int = 100) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path


def _legend(ax, fontsize: int = 6) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize)


def _colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _values(pred: Predictions, quantity: str) -> tuple[np.ndarray, np.ndarray]:
    if quantity == "energy_per_atom":
        x, y = pred.energy_ref / pred.n_atoms, pred.energy_pred / pred.n_atoms
    elif quantity == "forces":
        x, y = pred.forces_ref.ravel(), pred.forces_pred.ravel()
    else:
        x, y = pred.stress_ref.ravel(), pred.stress_pred.ravel()
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def parity_figure(preds: Mapping[str, Predictions], quantity: str):
    """Model against reference, one panel per model, RMSE in the title."""
    title, unit, _ = _LABELS[quantity]
    n = max(len(preds), 1)
    fig = figure(3.4 * n, 3.5)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (name, pred), color in zip(axes, preds.items(), _colors(n), strict=False):
        x, y = _values(pred, quantity)
        if x.size:
            lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
            pad = 0.03 * (hi - lo or 1.0)
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.5", lw=0.8, ls="--")
            ax.scatter(x, y, s=4 if x.size > 2000 else 9, alpha=0.6, color=color, lw=0)
            rmse = float(np.sqrt(np.mean((y - x) ** 2)))
            ax.set_title(f"{name}\nRMSE {rmse:.4g} {unit}", fontsize=9)
        else:
            ax.set_title(f"{name}\n(no reference {title})", fontsize=9)
        ax.set_xlabel(f"reference {title} ({unit})", fontsize=8)
        ax.set_ylabel(f"model ({unit})", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"Parity: {title}", fontsize=10)
    return fig


def error_hist_figure(preds: Mapping[str, Predictions], quantity: str):
    """Histograms of signed errors (meV units) of all models on common bins."""
    title, _, unit = _LABELS[quantity]
    fig = figure(5.0, 3.4)
    ax = fig.subplots()
    errs = {}
    for name, pred in preds.items():
        x, y = _values(pred, quantity)
        errs[name] = 1000.0 * (y - x)
    allv = np.concatenate(list(errs.values())) if errs else np.zeros(0)
    if allv.size:
        lim = float(np.percentile(np.abs(allv), 99.5)) or 1.0
        bins = np.linspace(-lim, lim, 61)
        for (name, e), color in zip(errs.items(), _colors(len(errs)), strict=True):
            ax.hist(
                np.clip(e, -lim, lim), bins=bins, histtype="step", lw=1.4, color=color,
                label=f"{name} (MAE {np.mean(np.abs(e)):.3g})",
            )  # fmt: skip
        _legend(ax, 7)
    ax.set_xlabel(f"{title} error ({unit}; clipped at the 99.5th percentile)", fontsize=8)
    ax.set_ylabel("count", fontsize=8)
    ax.set_title(f"Error distribution: {title}", fontsize=10)
    ax.tick_params(labelsize=7)
    return fig


def per_element_figure(accuracy: Mapping[str, dict], quantity: str = "forces", metric="rmse"):
    """Per-element error bars, one bar per model."""
    title, _, unit = _LABELS[quantity]
    elements: list[str] = []
    for acc in accuracy.values():
        for el, row in acc["per_element"].items():
            if row.get(quantity) and el not in elements:
                elements.append(el)
    n_models = max(len(accuracy), 1)
    fig = figure(max(5.0, 0.28 * len(elements) * n_models + 2.0), 3.4)
    ax = fig.subplots()
    width = 0.8 / n_models
    x = np.arange(len(elements))
    for k, ((name, acc), color) in enumerate(zip(accuracy.items(), _colors(n_models), strict=True)):
        vals = [
            1000.0 * acc["per_element"].get(el, {}).get(quantity, {}).get(metric, np.nan)
            if acc["per_element"].get(el, {}).get(quantity)
            else np.nan
            for el in elements
        ]
        ax.bar(x + (k - (n_models - 1) / 2) * width, vals, width, color=color, label=name)
    ax.set_xticks(x, elements, fontsize=7 if len(elements) < 30 else 5, rotation=90)
    ax.set_ylabel(f"{title} {metric.upper()} ({unit})", fontsize=8)
    ax.set_title(f"Per-element {title} {metric.upper()}", fontsize=10)
    ax.tick_params(axis="y", labelsize=7)
    if n_models > 1:
        _legend(ax, 7)
    return fig


def eos_figure(eos: Mapping[str, list[dict]]):
    """E(V) per structure (one panel each), all models, reference points and fits."""
    labels: list[str] = []
    for rows in eos.values():
        for r in rows:
            if r["structure"] not in labels:
                labels.append(r["structure"])
    n = max(len(labels), 1)
    fig = figure(3.8 * n, 3.4)
    axes = fig.subplots(1, n, squeeze=False)[0]
    colors = _colors(len(eos))
    for ax, label in zip(axes, labels, strict=False):
        ref_drawn = False
        for (name, rows), color in zip(eos.items(), colors, strict=True):
            for r in rows:
                if r["structure"] != label or not r.get("volumes"):
                    continue
                v, e = np.asarray(r["volumes"]), np.asarray(r["energies"])
                fit = r.get("fit") or {}
                lab = name
                if fit.get("B_GPa") is not None:
                    lab += f" (B {fit['B_GPa']:.0f} GPa)"
                ax.plot(v, e, "o-", ms=3, lw=1.2, color=color, label=lab)
                ref = r.get("reference")
                if ref and not ref_drawn:
                    rfit = ref.get("fit") or {}
                    rlab = "reference"
                    if rfit.get("B_GPa") is not None:
                        rlab += f" (B {rfit['B_GPa']:.0f} GPa)"
                    ax.plot(v, ref["energies"], "k^", ms=5, label=rlab)
                    ref_drawn = True
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("volume (Å³/atom)", fontsize=8)
        ax.set_ylabel("energy (eV/atom)", fontsize=8)
        ax.tick_params(labelsize=7)
        _legend(ax, 6)
    fig.suptitle("Equation of state", fontsize=10)
    return fig


def md_figure(md: Mapping[str, dict]):
    """Total-energy deviation per atom and temperature against time, all models."""
    fig = figure(8.0, 3.2)
    ax_e, ax_t = fig.subplots(1, 2)
    for (name, r), color in zip(md.items(), _colors(len(md)), strict=True):
        tr = r["trace"]
        t = np.asarray(tr["time_ps"])
        e = np.asarray(tr["total_energy_per_atom"])
        if e.size:
            drift = r.get("energy_drift_eV_per_atom_per_ps")
            lab = name if drift is None else f"{name} (drift {1000 * drift:.3g} meV/atom/ps)"
            ax_e.plot(t, 1000.0 * (e - e[0]), color=color, lw=1.2, label=lab)
            ax_t.plot(t, tr["temperature_K"], color=color, lw=1.2, label=name)
    ax_e.set_xlabel("time (ps)", fontsize=8)
    ax_e.set_ylabel("E_total - E_total(0) (meV/atom)", fontsize=8)
    ax_e.set_title("NVE energy conservation", fontsize=10)
    ax_t.set_xlabel("time (ps)", fontsize=8)
    ax_t.set_ylabel("temperature (K)", fontsize=8)
    ax_t.set_title("Temperature", fontsize=10)
    for ax in (ax_e, ax_t):
        ax.tick_params(labelsize=7)
        _legend(ax, 6)
    return fig


def cost_figure(cost: Mapping[str, Mapping[str, list[dict]]]):
    """Throughput and peak memory against atoms (log-log); eager solid, compiled dashed."""
    fig = figure(8.0, 3.3)
    ax_s, ax_m = fig.subplots(1, 2)
    any_mem = False
    for (name, variants), color in zip(cost.items(), _colors(len(cost)), strict=True):
        for variant, rows in variants.items():
            if not rows:
                continue
            n = [r["n_atoms"] for r in rows]
            style = "--" if variant == "compiled" else "-"
            ax_s.plot(n, [r["atom_steps_per_s"] for r in rows], style, marker="o", ms=3,
                      color=color, label=f"{name} ({variant})")  # fmt: skip
            # a zero rise (memory the allocator had cached) cannot go on a log axis
            mem = [r["peak_memory_MB"] if (r["peak_memory_MB"] or 0) > 0 else np.nan for r in rows]
            if np.isfinite(mem).any():
                any_mem = True
                ax_m.plot(n, mem, style, marker="o", ms=3, color=color, label=f"{name} ({variant})")
    ax_s.set_xscale("log")
    ax_s.set_yscale("log")
    ax_s.set_xlabel("atoms", fontsize=8)
    ax_s.set_ylabel("atom-steps / s (neighbour list + forces)", fontsize=8)
    ax_s.set_title("Inference throughput", fontsize=10)
    ax_m.set_xscale("log")
    if any_mem:
        ax_m.set_yscale("log")
    ax_m.set_xlabel("atoms", fontsize=8)
    ax_m.set_ylabel("peak memory (MB)", fontsize=8)
    ax_m.set_title("Peak memory per step", fontsize=10)
    for ax in (ax_s, ax_m):
        ax.tick_params(labelsize=7)
        _legend(ax, 6)
    return fig


def sus2_radial_figure(curves: Mapping[str, Any], name: str, max_mu: int = 6):
    """Top: raw ``f_mu(r)`` per pair. Bottom: ``f_mu / (w_i w_j sigma (r - R_c)^2)`` against
    ``r* = alpha (r - r0)``, collapsing onto the universal curve ``g_mu(r*)`` (grey)."""
    from .interpret import universal_curve

    n_mu = min(int(curves["num_radial_funcs"]), max_mu)
    fig = figure(2.7 * n_mu, 5.4)
    axes = fig.subplots(2, n_mu, squeeze=False)
    r = curves["r"]
    pairs = curves["pairs"]
    colors = _colors(len(pairs))
    coeffs = curves.get("coeffs")
    for mu in range(n_mu):
        top, bottom = axes[0][mu], axes[1][mu]
        lo = min(float(np.min(p["mu"][mu]["r_star"])) for p in pairs)
        hi = max(float(np.max(p["mu"][mu]["r_star"])) for p in pairs)
        if coeffs is not None:
            xs = np.linspace(lo, hi, 300)
            bottom.plot(xs, universal_curve(np.asarray(coeffs[mu]), xs), color="0.75", lw=5,
                        label="g_μ(r*)", zorder=1)  # fmt: skip
        for p, color in zip(pairs, colors, strict=True):
            m = p["mu"][mu]
            top.plot(r, m["f"], color=color, lw=1.2, label=p["pair"])
            bottom.plot(m["r_star"], m["collapsed"], color=color, lw=1.0, zorder=2)
        top.set_title(f"μ = {mu}", fontsize=9)
        top.set_xlabel("r (Å)", fontsize=8)
        bottom.set_xlabel("r* = α (r − r₀)", fontsize=8)
        for ax in (top, bottom):
            ax.tick_params(labelsize=7)
        if mu == 0:
            top.set_ylabel("f_μ(r)", fontsize=8)
            bottom.set_ylabel("f_μ / (w_i w_j σ (r − R_c)²)", fontsize=8)
            _legend(top)
            _legend(bottom)
    fig.suptitle(f"{name}: radial functions per species pair, raw (top) and universal (bottom)",
                 fontsize=10)  # fmt: skip
    return fig


def sus2_scale_shift_figure(params: Mapping[str, Any], name: str, species: Sequence[str] | None):
    """Per-species energy scale ``s`` and shift ``b`` (bars)."""
    names = list(params["type_names"])
    keep = [names.index(s) for s in species] if species else list(range(len(names)))
    labels = [names[k] for k in keep]
    fig = figure(max(5.0, 0.22 * len(labels) + 2.5), 4.6)
    ax_s, ax_b = fig.subplots(2, 1, sharex=True)
    x = np.arange(len(labels))
    ax_s.bar(x, params["s"][keep], color="tab:blue")
    ax_b.bar(x, params["b"][keep], color="tab:orange")
    ax_s.set_ylabel("s (eV)", fontsize=8)
    ax_b.set_ylabel("b (eV)", fontsize=8)
    ax_b.set_xticks(x, labels, fontsize=7 if len(labels) < 30 else 5, rotation=90)
    for ax in (ax_s, ax_b):
        ax.tick_params(axis="y", labelsize=7)
        ax.axhline(0.0, color="0.4", lw=0.6)
    ax_s.set_title(f"{name}: per-species energy scale s and shift b (E_i = b + s(1 + θ·B))",
                   fontsize=10)  # fmt: skip
    return fig


def sus2_maps_figure(params: Mapping[str, Any], name: str, species: Sequence[str] | None):
    """Heat maps of ``alpha`` and ``r0`` (centre type x neighbour type), one column per scaling
    channel."""
    names = list(params["type_names"])
    keep = [names.index(s) for s in species] if species else list(range(len(names)))
    labels = [names[k] for k in keep]
    alpha = params["alpha"][:, keep][:, :, keep]
    r0 = params["r0"][:, keep][:, :, keep]
    n_eta = alpha.shape[0]
    size = 2.4 + 0.06 * len(labels)
    fig = figure(size * n_eta + 0.8, 2 * size)
    axes = fig.subplots(2, n_eta, squeeze=False)
    fs = 7 if len(labels) <= 12 else (5 if len(labels) <= 30 else 3)
    for row, (table, sym, cmap) in enumerate(
        ((alpha, "α (1/Å)", "viridis"), (r0, "r₀ (Å)", "magma"))
    ):
        vmin, vmax = float(table.min()), float(table.max())
        for eta in range(n_eta):
            ax = axes[row][eta]
            im = ax.imshow(table[eta], cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_title(f"{sym}, η = {eta}", fontsize=9)
            # species labels on the outer axes only (hundreds of labels are slow to draw)
            ax.set_xticks(range(len(labels)), labels if row == 1 else [], fontsize=fs, rotation=90)
            ax.set_yticks(range(len(labels)), labels if eta == 0 else [], fontsize=fs)
            if row == 1:
                ax.set_xlabel("neighbour", fontsize=7)
            if eta == 0:
                ax.set_ylabel("centre", fontsize=7)
        fig.colorbar(im, ax=list(axes[row]), shrink=0.8).ax.tick_params(labelsize=7)
    fig.suptitle(f"{name}: universal pair scaling maps", fontsize=10)
    return fig
