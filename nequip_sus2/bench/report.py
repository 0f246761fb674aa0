"""The benchmark report: ``results.json`` (every number) and ``report.md`` (tables + figures)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["to_jsonable", "write_json", "write_markdown"]


def to_jsonable(x: Any) -> Any:
    """NumPy/torch scalars and arrays to plain Python; NaN/inf to ``None``."""
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(results: Mapping[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(to_jsonable(results), indent=1) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# markdown
# ----------------------------------------------------------------------------------------------


def _f(x: Any, scale: float = 1.0, decimals: int = 3) -> str:
    """``x * scale`` with ``decimals`` decimals (3 significant digits if tiny or huge)."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    try:
        v = float(x) * scale
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(v):
        return "–"
    if v != 0 and (abs(v) >= 1e7 or abs(v) < 0.5 * 10.0**-decimals):
        return f"{v:.3g}"
    return f"{v:.{decimals}f}"


def _g(d: Mapping | None, *keys, default=None):
    for k in keys:
        if not isinstance(d, Mapping) or k not in d or d[k] is None:
            return default
        d = d[k]
    return d


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def _img(path: str | None, alt: str) -> list[str]:
    return [f"![{alt}]({path})", ""] if path else []


def _summary(res: Mapping[str, Any]) -> list[str]:
    names = [m["name"] for m in res["models"]]
    acc, eos, md, cost = (res.get(k) or {} for k in ("accuracy", "eos", "md", "cost"))
    rows: list[list[str]] = []

    def row(label: str, values: list[str]) -> None:
        if any(v != "–" for v in values):
            rows.append([label, *values])

    models = {m["name"]: m for m in res["models"]}
    row("architecture", [models[n]["kind"] for n in names])
    row("format", [models[n]["format"] for n in names])
    row("parameters", [str(_g(models[n], "num_parameters", "total", default="–")) for n in names])
    units = (("energy_per_atom", "energy", "meV/atom"), ("forces", "force", "meV/Å"),
             ("stress", "stress", "meV/Å³"))  # fmt: skip
    for q, label, unit in units:
        for metric in ("mae", "rmse"):
            row(
                f"{label} {metric.upper()} ({unit})",
                [_f(_g(acc, n, "overall", q, metric), 1000.0, 2) for n in names],
            )
    structures: list[str] = []
    for n in names:
        for r in eos.get(n, []):
            if r["structure"] not in structures:
                structures.append(r["structure"])
    for s in structures:
        cells_b, cells_v = [], []
        for n in names:
            r = next((x for x in eos.get(n, []) if x["structure"] == s), None)
            cells_b.append(_f(_g(r, "fit", "B_GPa"), 1.0, 1))
            cells_v.append(_f(_g(r, "fit", "v0"), 1.0, 3))
        ref = next((x for n in names for x in eos.get(n, []) if x["structure"] == s
                    and x.get("reference")), None)  # fmt: skip
        suffix_b = f" [ref {_f(_g(ref, 'reference', 'fit', 'B_GPa'), 1.0, 1)}]" if ref else ""
        suffix_v = f" [ref {_f(_g(ref, 'reference', 'fit', 'v0'), 1.0, 3)}]" if ref else ""
        row(f"B (GPa), {s}{suffix_b}", cells_b)
        row(f"V0 (Å³/atom), {s}{suffix_v}", cells_v)
    row("MD stable", [_f(_g(md, n, "stable")) for n in names])
    row(
        "MD drift (meV/atom/ps)",
        [_f(_g(md, n, "energy_drift_eV_per_atom_per_ps"), 1000.0, 4) for n in names],
    )
    for variant in ("eager", "compiled"):
        sizes = sorted({r["n_atoms"] for n in names for r in _g(cost, n, variant, default=[])})
        if not sizes:
            continue
        big = sizes[-1]
        vals, mems = [], []
        for n in names:
            rows_n = _g(cost, n, variant, default=[])
            r = max(rows_n, key=lambda x: x["n_atoms"]) if rows_n else None
            vals.append(_f(_g(r, "atom_steps_per_s"), 1.0, 0) + (
                f" @{r['n_atoms']}" if r and r["n_atoms"] != big else ""))  # fmt: skip
            mems.append(_f(_g(r, "peak_memory_MB"), 1.0, 1))
        row(f"throughput, {variant} (atom-steps/s, {big} atoms)", vals)
        row(f"peak memory, {variant} (MB, {big} atoms)", mems)
    return _table(["", *names], rows)


def _names(res: Mapping[str, Any]) -> list[str]:
    return [m["name"] for m in res["models"]]


def _plots(res: Mapping[str, Any]) -> Mapping[str, Any]:
    return res.get("plots", {})


def _header(res: Mapping[str, Any]) -> list[str]:
    """Title, the command line and where and with what the benchmark ran."""
    env = res.get("environment", {})
    lines = ["# nequip-sus2 bench report", ""]
    if res.get("command"):
        lines += ["```", res["command"], "```", ""]
    return lines + [
        f"Generated {env.get('date', '')} on {env.get('device', '')} "
        f"({env.get('threads', '?')} threads); torch {env.get('torch', '?')}, nequip "
        f"{env.get('nequip', '?')}, nequip-sus2 {env.get('nequip_sus2', '?')}. "
        "Every number is also in `results.json`.",
        "",
    ]


def _summary_section(res: Mapping[str, Any]) -> list[str]:
    """``## Summary``: the models side by side, one row per headline number."""
    return ["## Summary", "", *_summary(res)]


def _models_section(res: Mapping[str, Any]) -> list[str]:
    """``## Models``: architecture, format, source, species, cutoff, dtype, parameters."""
    return ["## Models", ""] + _table(
        ["name", "architecture", "format", "source", "types", "r_max (Å)", "dtype", "parameters"],
        [
            [
                m["name"], m["kind"], m["format"], f"`{m['source']}`", str(m["num_types"]),
                _f(m["r_max"], 1.0, 2), m["model_dtype"],
                str(_g(m, "num_parameters", "total", default="–")),
            ]
            for m in res["models"]
        ],
    )  # fmt: skip


def _data_section(res: Mapping[str, Any]) -> list[str]:
    """``## Data``: structures, atoms, files, elements and configuration groups."""
    data = res.get("data")
    if not data:
        return []
    return [
        "## Data",
        "",
        f"{data['structures']} structures, {data['atoms']} atoms from "
        + ", ".join(f"`{f}`" for f in data["files"])
        + f"; elements: {' '.join(data['elements'])}; group key: "
        f"{data.get('group_key') or '(none)'} ({len(data.get('groups', {}))} groups).",
        "",
    ]


def _accuracy_section(res: Mapping[str, Any]) -> list[str]:
    """``## Accuracy``: overall errors, per group, per element, parity plots and histograms."""
    acc = res.get("accuracy")
    if not acc:
        return []
    names = _names(res)
    lines = [
        "## Accuracy",
        "",
        "Energy per atom, force components and stress components (ASE stress; "
        "= .cfg PlusStress/V); MAE / RMSE, meV units.",
        "",
    ]
    lines += _table(
        ["model", "E MAE (meV/atom)", "E RMSE", "F MAE (meV/Å)", "F RMSE", "S MAE (meV/Å³)",
         "S RMSE", "structures", "force components"],
        [
            [
                n,
                _f(_g(acc, n, "overall", "energy_per_atom", "mae"), 1000, 2),
                _f(_g(acc, n, "overall", "energy_per_atom", "rmse"), 1000, 2),
                _f(_g(acc, n, "overall", "forces", "mae"), 1000, 2),
                _f(_g(acc, n, "overall", "forces", "rmse"), 1000, 2),
                _f(_g(acc, n, "overall", "stress", "mae"), 1000, 3),
                _f(_g(acc, n, "overall", "stress", "rmse"), 1000, 3),
                str(_g(acc, n, "overall", "energy_per_atom", "count", default="–")),
                str(_g(acc, n, "overall", "forces", "count", default="–")),
            ]
            for n in names
            if n in acc
        ],
    )  # fmt: skip
    lines += _per_group_table(acc, names) + _per_element_table(acc, names)
    for key, alt in (
        ("parity_energy_per_atom", "energy parity"),
        ("parity_forces", "force parity"),
        ("parity_stress", "stress parity"),
        ("hist_energy_per_atom", "energy error histogram"),
        ("hist_forces", "force error histogram"),
        ("hist_stress", "stress error histogram"),
        ("per_element_forces", "per-element force RMSE"),
    ):
        lines += _img(_plots(res).get(key), alt)
    return lines


def _breakdown_table(
    acc: Mapping[str, Any],
    names: list[str],
    title: str,
    section: str,
    keys: list[str],
    count: str,
    pair: tuple[tuple[str, int], tuple[str, int]],
) -> list[str]:
    """``title`` and a table with a row per key of ``acc[model][section]``: its ``count`` and,
    per model, two RMSEs in meV (``pair``: (field, digits) twice) as 'first / second'."""

    def cell(n: str, key: str) -> str:
        return " / ".join(
            _f(_g(acc, n, section, key, field, "rmse"), 1000, digits) for field, digits in pair
        )

    rows = [
        [key, str(_g(acc, names[0], section, key, count, default="–"))]
        + [cell(n, key) for n in names]
        for key in keys
    ]
    return [title, ""] + _table([section.removeprefix("per_"), count, *names], rows)


def _per_group_table(acc: Mapping[str, Any], names: list[str]) -> list[str]:
    """Energy and force RMSE per configuration group (only with more than one group)."""
    groups = sorted({g for n in names for g in _g(acc, n, "per_group", default={})})
    if len(groups) <= 1:
        return []
    title = "### Per configuration group (E RMSE meV/atom / F RMSE meV/Å)"
    pair = (("energy_per_atom", 2), ("forces", 1))
    return _breakdown_table(acc, names, title, "per_group", groups, "structures", pair)


def _per_element_table(acc: Mapping[str, Any], names: list[str]) -> list[str]:
    """Force RMSE of each element's atoms and energy RMSE of the structures containing it."""
    elements: list[str] = []
    for n in names:
        for el in _g(acc, n, "per_element", default={}):
            if el not in elements:
                elements.append(el)
    if not elements:
        return []
    title = (
        "### Per element (F RMSE meV/Å of its atoms / E RMSE meV/atom of structures containing it)"
    )
    pair = (("forces", 1), ("energy_per_atom", 1))
    return _breakdown_table(acc, names, title, "per_element", elements, "atoms", pair)


def _eos_section(res: Mapping[str, Any]) -> list[str]:
    """``## Equation of state``: the Birch-Murnaghan fit of each structure and model."""
    eos = res.get("eos")
    if not eos:
        return []
    rows = []
    for n in _names(res):
        for r in eos.get(n, []):
            ref = r.get("reference") or {}
            rows.append(
                [
                    r["structure"], n, _f(_g(r, "fit", "v0"), 1, 3),
                    _f(_g(r, "fit", "e0"), 1, 4), _f(_g(r, "fit", "B_GPa"), 1, 1),
                    _f(_g(r, "fit", "bracketed")), _f(_g(ref, "fit", "v0"), 1, 3),
                    _f(_g(ref, "fit", "B_GPa"), 1, 1),
                ]
            )  # fmt: skip
    lines = [
        "## Equation of state",
        "",
        "Homogeneous scaling of each structure (no relaxation), Birch-Murnaghan fit "
        "(`ase.eos`). `bracketed`: the minimum lies inside the scanned volumes.",
        "",
    ]
    lines += _table(
        ["structure", "model", "V0 (Å³/atom)", "E0 (eV/atom)", "B (GPa)", "bracketed",
         "ref V0", "ref B (GPa)"],
        rows,
    )  # fmt: skip
    return lines + _img(_plots(res).get("eos"), "equation of state")


def _md_section(res: Mapping[str, Any]) -> list[str]:
    """``## Molecular dynamics (NVE)``: stability, energy drift and extremes of each run."""
    md = res.get("md")
    if not md:
        return []
    lines = ["## Molecular dynamics (NVE)", ""]
    lines += _table(
        ["model", "structure", "atoms", "steps", "stable", "drift (meV/atom/ps)",
         "max |ΔE| (meV/atom)", "max |F| (eV/Å)", "min distance (Å)", "T mean (K)",
         "steps/s"],
        [
            [
                n, str(r.get("structure")), str(r["n_atoms"]),
                f"{r['steps_completed']}/{r['steps_requested']}",
                _f(r["stable"]) + (f" ({r['stop_reason']})" if r.get("stop_reason") else ""),
                _f(r.get("energy_drift_eV_per_atom_per_ps"), 1000, 4),
                _f(r.get("max_abs_energy_deviation_eV_per_atom"), 1000, 3),
                _f(r.get("max_force_eV_per_A"), 1, 2), _f(r.get("min_distance_A"), 1, 3),
                _f(r.get("temperature_mean_K"), 1, 0), _f(r.get("steps_per_second"), 1, 1),
            ]
            for n, r in md.items()
        ],
    )  # fmt: skip
    return lines + _img(_plots(res).get("md"), "NVE MD")


def _cost_section(res: Mapping[str, Any]) -> list[str]:
    """``## Cost``: time per step and peak memory per model, variant and size; compile times."""
    cost = res.get("cost")
    if not cost:
        return []
    names = _names(res)
    rows = []
    for n in names:
        for variant, rs in (cost.get(n) or {}).items():
            if not isinstance(rs, list):
                continue
            for r in rs:
                rows.append(
                    [
                        n, variant, str(r["n_atoms"]), _f(r["ms_per_step"], 1, 2),
                        _f(r["ms_model"], 1, 2), _f(r["atom_steps_per_s"], 1, 0),
                        _f(r["atom_steps_per_s_model_only"], 1, 0),
                        _f(r["peak_memory_MB"], 1, 1),
                    ]
                )  # fmt: skip
    lines = [
        "## Cost",
        "",
        "One step = neighbour list and transforms + energy/forces/stress. Peak memory: "
        f"{res.get('cost_memory_note', '')}",
        "",
    ]
    lines += _table(
        ["model", "variant", "atoms", "ms/step", "ms model", "atom-steps/s",
         "atom-steps/s (model only)", "peak memory (MB)"],
        rows,
    )  # fmt: skip
    compiled = {n: _g(cost, n, "compile_seconds") for n in names}
    if any(v is not None for v in compiled.values()):
        lines += [
            "AOT compile time: "
            + ", ".join(f"{n} {_f(v, 1, 0)} s" for n, v in compiled.items() if v is not None)
            + ".",
            "",
        ]
    return lines + _img(_plots(res).get("cost"), "cost")


def _sus2_section(res: Mapping[str, Any]) -> list[str]:
    """``## SUS2 interpretability``: the factorised radial functions, then each SUS2 model."""
    sus2 = res.get("sus2")
    if not sus2:
        return []
    lines = [
        "## SUS2 interpretability",
        "",
        "f_μ(r; Z_i, Z_j) = w_i w_j σ (r − R_c)² g_μ(r*), r* = α (r − r₀): every pair "
        "reads the same learned curve g_μ over its own window of r*. Top row of the radial "
        "figure: raw f_μ(r); bottom: f_μ / (w_i w_j σ (r − R_c)²) against r*, which "
        "collapses onto g_μ (grey). Site energy E_i = b + s (1 + θ·B).",
        "",
    ]
    for n, s in sus2.items():
        lines += _sus2_model(n, s, _plots(res))
    return lines


def _sus2_model(n: str, s: Mapping[str, Any], plots: Mapping[str, Any]) -> list[str]:
    """One SUS2 model: sizes, per-species s, b and w, the r* window of each pair, figures."""
    lines = [
        f"### {n}",
        "",
        f"{s['num_types']} types, {s['num_scaling_channels']} scaling channels, "
        f"{s['num_radial_funcs']} radial functions × {s['radial_basis_size']} Chebyshev "
        f"polynomials, R_c {_f(s['r_max'], 1, 2)} Å; α in "
        f"[{_f(s['alpha_stats']['min'])}, {_f(s['alpha_stats']['max'])}] 1/Å, r₀ in "
        f"[{_f(s['r0_stats']['min'])}, {_f(s['r0_stats']['max'])}] Å.",
        "",
    ]
    shown = s.get("species_shown") or list(s["per_species"])
    lines += _table(
        ["species", "s (eV)", "b (eV)", "b + s (isolated atom, eV)", "w"],
        [
            [
                el, _f(s["per_species"][el]["s"], 1, 4), _f(s["per_species"][el]["b"], 1, 4),
                _f(s["per_species"][el]["isolated_atom_energy"], 1, 4),
                _f(s["per_species"][el]["w"], 1, 4),
            ]
            for el in shown
        ],
    )  # fmt: skip
    lines += ["r* window of each pair (μ = 0):", ""]
    lines += _table(
        ["pair", "α (1/Å)", "r₀ (Å)", "r* range"],
        [
            [
                pair, _f(w[0]["alpha"], 1, 3), _f(w[0]["r0"], 1, 3),
                f"[{_f(w[0]['r_star_min'], 1, 2)}, {_f(w[0]['r_star_max'], 1, 2)}]",
            ]
            for pair, w in s["r_star_windows"].items()
        ],
    )  # fmt: skip
    for key, alt in (("radial", "radial curves"), ("scale_shift", "s and b"),
                     ("maps", "alpha and r0 maps")):  # fmt: skip
        lines += _img(_g(plots, "sus2", n, key), f"{n} {alt}")
    return lines


def _problems_section(res: Mapping[str, Any]) -> list[str]:
    """``## Problems``: what failed (recorded instead of raised)."""
    errors = res.get("errors")
    if not errors:
        return []
    return ["## Problems", "", *[f"- {e}" for e in errors], ""]


#: the sections of ``report.md``, in order
_SECTIONS = (
    _header,
    _summary_section,
    _models_section,
    _data_section,
    _accuracy_section,
    _eos_section,
    _md_section,
    _cost_section,
    _sus2_section,
    _problems_section,
)


def write_markdown(res: Mapping[str, Any], path: str | Path) -> Path:
    """``report.md`` with the summary table first, then one section per benchmark part."""
    path = Path(path)
    path.write_text("\n".join(line for section in _SECTIONS for line in section(res)))
    return path
