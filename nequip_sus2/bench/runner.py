"""``run_bench``: load models and data, run the selected parts, write the report."""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ase.io
import numpy as np
import torch
from tqdm.auto import tqdm

from ..package import ensure_global_state
from . import plots as P
from .accuracy import Predictions, accuracy_summary, predict_frames
from .cost import MEMORY_NOTE, aoti_compile, measure_cost
from .data import LabelledFrame, load_frames
from .environment import describe_environment
from .interpret import sus2_summary
from .models import BenchModel, load_bench_models, resolve_device
from .options import BenchOptions
from .physics import (
    EOSStructure,
    auto_eos_structures,
    equation_of_state,
    md_stability,
    read_eos_structures,
)
from .report import to_jsonable, write_json, write_markdown

__all__ = ["BenchOptions", "BenchResult", "run_bench"]


@dataclass
class BenchResult:
    """What :func:`run_bench` produced.

    Attributes:
        results: every number (the content of ``results.json``)
        out_dir: the output directory
        report: path of ``report.md``
        json: path of ``results.json``
        figures: the matplotlib figures by name (only with ``keep_figures=True``)
        predictions: per-model predictions and labels of the accuracy data
        models: the loaded models
    """

    results: dict[str, Any]
    out_dir: Path
    report: Path
    json: Path
    figures: dict[str, Any] = field(default_factory=dict)
    predictions: dict[str, Predictions] = field(default_factory=dict)
    models: list[BenchModel] = field(default_factory=list)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _common_type_names(models: Sequence[BenchModel]) -> list[str] | None:
    first = models[0].type_names
    return list(first) if all(m.type_names == first for m in models) else None


def _element_order(frames: Sequence[LabelledFrame], models: Sequence[BenchModel]) -> list[str]:
    counts = Counter(s for f in frames for s in f.atoms.get_chemical_symbols())
    order = {s: i for i, s in enumerate(models[0].type_names)}
    return sorted(counts, key=lambda s: (order.get(s, len(order)), s))


class _Recorder:
    """Runs one part for one model; a failure is recorded (or raised with ``strict``)."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.errors: list[str] = []

    def run(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - reported in the results and the report
            if self.strict:
                raise
            msg = f"{what}: {type(exc).__name__}: {exc}"
            self.errors.append(msg)
            warnings.warn(f"nequip-sus2 bench: {msg}", stacklevel=2)
            return None


@dataclass
class _Run:
    """What the parts of one run share: options, output folder, models, results, figures."""

    options: BenchOptions
    out: Path
    device: torch.device
    models: list[BenchModel]
    rec: _Recorder
    res: dict[str, Any]
    figures: dict[str, Any] = field(default_factory=dict)

    def emit(self, key: str, fig, store: dict | None = None) -> str:
        """Save ``fig`` as ``figures/<key>.png`` and record its path in ``store`` (default: the
        results' ``plots``) under the last part of ``key``."""
        path = self.out / "figures" / f"{_safe(key)}.png"
        P.save(fig, path)
        rel = f"figures/{path.name}"
        (self.res["plots"] if store is None else store)[key.split("/")[-1]] = rel
        if self.options.keep_figures:
            self.figures[key] = fig
        return rel


def run_bench(options: BenchOptions) -> BenchResult:
    """Benchmark NequIP-framework models side by side and write a report.

    ``options`` (:class:`BenchOptions`) names the models, the data, the output directory and
    the parts to run with their settings.
    """
    o = options
    run = _start_run(o)
    frames, elements = _load_data(run)
    preds = _run_accuracy(run, frames, elements) if o.accuracy and frames else {}
    structures, base, base_label = _pick_structures(run, frames)
    if o.eos and structures:
        _run_eos(run, structures)
    if o.md and base is not None:
        _run_md(run, base, base_label)
    if o.cost and base is not None:
        _run_cost(run, base, base_label, frames)
    if o.sus2:
        _run_sus2(run, frames)
    return _write_report(run, preds)


def _start_run(o: BenchOptions) -> _Run:
    """Threads, global state, device and output folder; load the models; the results' header."""
    if o.threads:
        torch.set_num_threads(o.threads)
    ensure_global_state()
    dev = resolve_device(o.device)
    out = Path(o.out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    rec = _Recorder(o.strict)
    models = load_bench_models(
        o.models, device=dev, type_names=o.type_names, model_dtype=o.model_dtype
    )
    res: dict[str, Any] = {
        "command": o.command,
        "environment": describe_environment(dev),
        "models": [m.describe() for m in models],
        "settings": {
            "batch_size": o.batch_size,
            "max_frames": o.max_frames,
            "group_key": o.group_key,
            "eos_points": o.eos_points,
            "eos_strain": o.eos_strain,
            "md_steps": o.md_steps,
            "md_timestep_fs": o.md_timestep_fs,
            "md_temperature_K": o.md_temperature_K,
            "md_min_atoms": o.md_min_atoms,
            "sizes": list(o.sizes),
            "compile": o.compile,
        },
        "plots": {},
    }
    return _Run(o, out, dev, models, rec, res)


def _load_data(run: _Run) -> tuple[list[LabelledFrame], list[str]]:
    """Read the labelled structures and describe them (``data``); their elements in order."""
    data, type_names = run.options.data, run.options.type_names
    if not data:
        return [], []
    cfg_names = type_names
    if cfg_names is None and any(str(p).lower().endswith(".cfg") for p in data):
        cfg_names = _common_type_names(run.models)
    frames, used_key = load_frames(
        data, type_names=cfg_names, group_key=run.options.group_key,
        max_frames=run.options.max_frames,
    )  # fmt: skip
    elements = _element_order(frames, run.models)
    run.res["data"] = {
        "files": [os.fspath(p) for p in data],
        "type_names_for_cfg": None if cfg_names is None else list(cfg_names),
        "structures": len(frames),
        "atoms": int(sum(f.n_atoms for f in frames)),
        "elements": elements,
        "element_counts": dict(Counter(s for f in frames for s in f.atoms.get_chemical_symbols())),
        "group_key": used_key,
        "groups": dict(Counter(f.group for f in frames)),
        "with_energy": sum(f.energy is not None for f in frames),
        "with_forces": sum(f.forces is not None for f in frames),
        "with_stress": sum(f.stress is not None for f in frames),
    }
    return frames, elements


def _run_accuracy(
    run: _Run, frames: list[LabelledFrame], elements: list[str]
) -> dict[str, Predictions]:
    """Predict every structure with every model: error statistics, predictions, parity plots."""
    o = run.options
    preds: dict[str, Predictions] = {}
    acc: dict[str, Any] = {}
    if o.save_predictions:
        (run.out / "predictions").mkdir(exist_ok=True)
    for m in run.models:
        p = run.rec.run(f"accuracy/{m.name}", predict_frames, m, frames, o.batch_size, o.progress)
        if p is None:
            continue
        preds[m.name] = p
        acc[m.name] = accuracy_summary(p, elements)
        if o.save_predictions:
            p.save(run.out / "predictions" / f"{_safe(m.name)}.npz")
    run.res["accuracy"] = acc
    if o.plots and preds:
        for q in ("energy_per_atom", "forces", "stress"):
            if any(np.isfinite(p.errors()[q]).any() for p in preds.values()):
                run.emit(f"parity_{q}", P.parity_figure(preds, q))
                run.emit(f"hist_{q}", P.error_hist_figure(preds, q))
        run.emit("per_element_forces", P.per_element_figure(acc, "forces"))
    return preds


def _pick_structures(
    run: _Run, frames: list[LabelledFrame]
) -> tuple[list[EOSStructure], Any, str | None]:
    """The EOS structures, and the starting structure (with its label) of the MD and cost."""
    o = run.options
    models = run.models
    structures: list[EOSStructure] = []
    for path in o.eos_structures:
        structures.extend(read_eos_structures(os.fspath(path)))
    common = [t for t in models[0].type_names if all(t in m.type_names for m in models)]
    eos_elements = o.eos_elements
    if not eos_elements and not frames:  # fcc/bcc of the models' first common element
        eos_elements = common[:1]
    auto = auto_eos_structures(frames, o.eos_auto, eos_elements)
    base, base_label = None, None
    if o.md_structure is not None:
        base = ase.io.read(os.fspath(o.md_structure), index=0)
        base.calc = None
        base_label = os.path.basename(os.fspath(o.md_structure))
    else:
        data_auto = auto_eos_structures(frames, ("data",))
        pool = data_auto or structures or auto
        if not pool:
            pool = auto_eos_structures([], ("fcc",), common[:1]) if common else []
        if pool:
            base, base_label = pool[0].atoms, pool[0].label
    structures.extend(auto)
    return structures, base, base_label


def _run_eos(run: _Run, structures: list[EOSStructure]) -> None:
    """Equation of state of every structure with every model."""
    o = run.options
    eos_res: dict[str, list] = {}
    jobs = [(m, s) for m in run.models for s in structures]
    for m, s in tqdm(
        jobs, desc="eos", unit="curve",
        disable=not o.progress if o.progress is not None else None, leave=False,
    ):  # fmt: skip
        r = run.rec.run(
            f"eos/{m.name}/{s.label}", equation_of_state, m, s, o.eos_points, o.eos_strain
        )
        if r is not None:
            eos_res.setdefault(m.name, []).append(r)
    run.res["eos"] = eos_res
    if o.plots and eos_res:
        run.emit("eos", P.eos_figure(eos_res))


def _run_md(run: _Run, base, base_label: str | None) -> None:
    """A short NVE run of every model from ``base``: stability and energy drift."""
    o = run.options
    md_res: dict[str, Any] = {}
    for m in run.models:
        r = run.rec.run(
            f"md/{m.name}", md_stability, m, base, steps=o.md_steps,
            timestep_fs=o.md_timestep_fs, temperature_K=o.md_temperature_K,
            min_atoms=o.md_min_atoms, seed=o.md_seed, progress=o.progress, label=base_label,
        )  # fmt: skip
        if r is not None:
            md_res[m.name] = r
    run.res["md"] = md_res
    if o.plots and md_res:
        run.emit("md", P.md_figure(md_res))


def _run_cost(run: _Run, base, base_label: str | None, frames: list[LabelledFrame]) -> None:
    """Parameters, throughput and peak memory of every model on ``base`` repeated to each size
    (and of its AOT-compiled form with ``compile``)."""
    o = run.options
    cost_res: dict[str, Any] = {}
    for m in run.models:
        entry: dict[str, Any] = {"num_parameters": m.num_parameters(), "structure": base_label}
        variant = "compiled" if m.compiled else "eager"
        rows = run.rec.run(
            f"cost/{m.name}", measure_cost, m, base, o.sizes, o.cost_min_time,
            memory=o.cost_memory, progress=o.progress, variant=variant,
        )  # fmt: skip
        entry[variant] = rows or []
        if o.compile and not m.compiled:
            _cost_compiled(run, m, base, frames, entry)
        cost_res[m.name] = entry
    run.res["cost"] = cost_res
    run.res["cost_memory_note"] = MEMORY_NOTE.get(run.device.type, "not available on this device")
    if o.plots:
        run.emit("cost", P.cost_figure({n: {k: v for k, v in e.items() if k in
                                            ("eager", "compiled")} for n, e in cost_res.items()}))  # fmt: skip


def _cost_compiled(
    run: _Run, m: BenchModel, base, frames: list[LabelledFrame], entry: dict[str, Any]
) -> None:
    """AOT-compile eager model ``m``, measure it and check it against ``m`` (into ``entry``)."""
    o = run.options
    # SUS2 on CPU with its fused kernels: the fastest deployment of each model
    modifiers = ["enable_fused_moments"] if m.kind == "SUS2" and m.device.type == "cpu" else []
    cm = run.rec.run(
        f"compile/{m.name}", aoti_compile, m, run.out / "compiled", modifiers=modifiers
    )
    if cm is None:
        return
    entry["compile_seconds"] = cm.compile_seconds
    entry["compile_modifiers"] = " ".join(modifiers)  # a list reads as rows
    entry["compiled_path"] = cm.source
    rows = run.rec.run(
        f"cost/{m.name}/compiled", measure_cost, cm, base, o.sizes, o.cost_min_time,
        memory=o.cost_memory, progress=o.progress, variant="compiled",
    )  # fmt: skip
    entry["compiled"] = rows or []
    if frames:
        entry["compiled_vs_eager"] = run.rec.run(
            f"compile/{m.name}/check", _compare, m, cm, frames[:8]
        )


def _run_sus2(run: _Run, frames: list[LabelledFrame]) -> None:
    """The learned radial curves, per-species scale/shift and (alpha, r0) maps of SUS2 models."""
    o = run.options
    sus2_res: dict[str, Any] = {}
    pairs = None if o.sus2_pairs is None else [_pair(p) for p in o.sus2_pairs]
    present = [s for s, _ in Counter(
        s for f in frames for s in f.atoms.get_chemical_symbols()).most_common()]  # fmt: skip
    for m in run.models:
        if m.kind != "SUS2" or m.eager is None:
            continue
        out3 = run.rec.run(
            f"sus2/{m.name}", sus2_summary, m.eager, m.type_names, pairs, present or None,
            o.sus2_r_min,
        )  # fmt: skip
        if out3 is None:
            continue
        summary, params, curves = out3
        shown = [s for s in m.type_names if s in set(present)] or list(m.type_names)
        summary["species_shown"] = shown
        sus2_res[m.name] = summary
        if o.plots:
            store = run.res["plots"].setdefault("sus2", {}).setdefault(m.name, {})
            run.emit(f"sus2_{m.name}/radial",
                     P.sus2_radial_figure(curves, m.name, o.sus2_max_curves), store)  # fmt: skip
            run.emit(f"sus2_{m.name}/scale_shift",
                     P.sus2_scale_shift_figure(params, m.name, shown), store)  # fmt: skip
            run.emit(f"sus2_{m.name}/maps", P.sus2_maps_figure(params, m.name, shown), store)
    if sus2_res:
        run.res["sus2"] = sus2_res


def _write_report(run: _Run, preds: dict[str, Predictions]) -> BenchResult:
    """Record the problems, write ``results.json`` and ``report.md``."""
    run.res["errors"] = run.rec.errors
    res = to_jsonable(run.res)
    json_path = write_json(res, run.out / "results.json")
    md_path = write_markdown(res, run.out / "report.md")
    return BenchResult(
        results=res,
        out_dir=run.out,
        report=md_path,
        json=json_path,
        figures=run.figures,
        predictions=preds,
        models=run.models,
    )


def _pair(p: str | tuple[str, str]) -> tuple[str, str]:
    if isinstance(p, str):
        a, sep, b = p.partition("-")
        if not sep or not a or not b:
            raise ValueError(f"species pair {p!r}: write it as A-B, e.g. Cu-Ag")
        return a, b
    a, b = p
    return str(a), str(b)


def _compare(eager: BenchModel, compiled: BenchModel, frames: Sequence[LabelledFrame]) -> dict:
    atoms = [f.atoms for f in frames]
    pe = eager.evaluate(atoms, batch_size=len(atoms))
    pc = compiled.evaluate(atoms, batch_size=len(atoms))
    de = max(abs(a["energy"] - b["energy"]) / len(x) for a, b, x in zip(pe, pc, atoms, strict=True))
    df = max(float(np.abs(a["forces"] - b["forces"]).max()) for a, b in zip(pe, pc, strict=True))
    return {"structures": len(atoms), "max_abs_energy_per_atom": de, "max_abs_force": df}


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `nequip-sus2 bench` or `python -m nequip_sus2.bench`")
