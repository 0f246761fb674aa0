"""``run_bench``: load models and data, run the selected parts, write the report."""

from __future__ import annotations

import datetime
import os
import platform
import re
import sys
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import plots as P
from .accuracy import Predictions, accuracy_summary, predict_frames
from .cost import DEFAULT_SIZES, MEMORY_NOTE, aoti_compile, measure_cost
from .data import LabelledFrame, load_frames
from .interpret import sus2_summary
from .models import BenchModel, ensure_global_state, load_bench_models, resolve_device
from .physics import (
    EOSStructure,
    auto_eos_structures,
    equation_of_state,
    md_stability,
    read_eos_structures,
)
from .report import to_jsonable, write_json, write_markdown

__all__ = ["BenchResult", "run_bench"]


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


def _environment(device: torch.device) -> dict[str, Any]:
    import nequip

    from .. import __version__

    env = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "nequip": getattr(nequip, "__version__", "?"),
        "nequip_sus2": __version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import allegro

        env["nequip_allegro"] = getattr(allegro, "__version__", "?")
    except ImportError:
        pass
    cpu = cpu_model()
    if cpu is not None:
        env["cpu"] = cpu
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def cpu_model() -> str | None:
    """The CPU's model name from ``/proc/cpuinfo`` (``None`` where that is not available)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


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


def run_bench(
    models: Iterable[Any] | Mapping[str, Any],
    data: Sequence[str | os.PathLike] = (),
    out_dir: str | os.PathLike = "bench_report",
    *,
    type_names: Sequence[str] | None = None,
    model_dtype: str = "float64",
    device: str | torch.device | None = "auto",
    group_key: str | None = None,
    max_frames: int | None = None,
    batch_size: int = 16,
    accuracy: bool = True,
    eos: bool = True,
    md: bool = True,
    cost: bool = True,
    sus2: bool = True,
    plots: bool = True,
    eos_structures: Sequence[str | os.PathLike] = (),
    eos_auto: Sequence[str] = ("data",),
    eos_elements: Sequence[str] | None = None,
    eos_points: int = 9,
    eos_strain: float = 0.05,
    md_structure: str | os.PathLike | None = None,
    md_steps: int = 200,
    md_timestep_fs: float = 1.0,
    md_temperature_K: float = 300.0,
    md_min_atoms: int = 32,
    md_seed: int = 0,
    sizes: Sequence[int] = DEFAULT_SIZES,
    compile: bool = False,
    cost_min_time: float = 1.0,
    cost_memory: bool = True,
    sus2_pairs: Sequence[str | tuple[str, str]] | None = None,
    sus2_max_curves: int = 6,
    sus2_r_min: float | None = None,
    save_predictions: bool = True,
    keep_figures: bool = False,
    progress: bool | None = None,
    strict: bool = False,
    command: str | None = None,
) -> BenchResult:
    """Benchmark NequIP-framework models side by side and write a report.

    Args:
        models: paths (``.ckpt``, ``.nequip.zip``, ``.nequip.pt2`` compiled with ``--target
            ase``, trained ``.mtp``), ``"NAME=PATH"`` strings, in-memory ``GraphModel`` objects,
            ``(name, model)`` pairs or a ``{name: model_or_path}`` mapping
        data: labelled structures: ``.cfg`` files (with ``type_names``) or ASE-readable files
        out_dir: output directory (``report.md``, ``results.json``, ``figures/``,
            ``predictions/``)
        type_names: species of ``.cfg`` type indices and of ``.mtp`` models; default for
            ``.cfg`` data: the models' type names when all models share them
        model_dtype: precision of models built from ``.mtp`` files
        device: ``auto`` (GPU when present), ``cpu``, ``cuda``, ...
        group_key: info key of the configuration group (``config_type``, ``group``, a ``.cfg``
            Feature key); default: the first of ``config_type``, ``group``, ... present
        max_frames: at most this many structures per data file (evenly spread)
        batch_size: structures per model call in the accuracy part
        accuracy, eos, md, cost, sus2, plots: which parts to run
        eos_structures: files with structures for the EOS (several frames of one composition
            with energies at different volumes = a reference curve)
        eos_auto: automatic EOS structures: ``data`` (lowest reference energy per atom of the
            data), ``fcc``, ``bcc`` (of ``eos_elements`` or the most common element)
        eos_points, eos_strain: points of the scan and largest linear strain
        md_structure: starting structure of the MD (default: the ``data`` EOS structure)
        md_steps, md_timestep_fs, md_temperature_K, md_min_atoms, md_seed: NVE run settings
        sizes: system sizes (atoms) of the cost part
        compile: also AOT-compile each eager model (``nequip-compile``) and measure it
        cost_min_time: seconds of timing per size (at least one step)
        cost_memory: measure peak memory
        sus2_pairs: species pairs (``"Cu-Ag"`` or tuples) of the radial-curve plot
        sus2_max_curves: radial functions shown
        sus2_r_min: smallest distance of the radial-curve plot (default ``0.25 r_max``)
        save_predictions: write ``predictions/<model>.npz``
        keep_figures: keep the matplotlib figures in the result (for inspection)
        progress: tqdm progress bars (``None``: only on a terminal)
        strict: raise the first error instead of recording it and going on
        command: the command line, shown in the report
    """
    ensure_global_state()
    dev = resolve_device(device)
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    rec = _Recorder(strict)
    bench_models = load_bench_models(
        models, device=dev, type_names=type_names, model_dtype=model_dtype
    )
    res: dict[str, Any] = {
        "command": command,
        "environment": _environment(dev),
        "models": [m.describe() for m in bench_models],
        "settings": {
            "batch_size": batch_size,
            "max_frames": max_frames,
            "group_key": group_key,
            "eos_points": eos_points,
            "eos_strain": eos_strain,
            "md_steps": md_steps,
            "md_timestep_fs": md_timestep_fs,
            "md_temperature_K": md_temperature_K,
            "md_min_atoms": md_min_atoms,
            "sizes": list(sizes),
            "compile": compile,
        },
        "plots": {},
    }
    figures: dict[str, Any] = {}

    def emit(key: str, fig, store: dict | None = None) -> str:
        path = out / "figures" / f"{_safe(key)}.png"
        P.save(fig, path)
        rel = f"figures/{path.name}"
        (res["plots"] if store is None else store)[key.split("/")[-1]] = rel
        if keep_figures:
            figures[key] = fig
        return rel

    # -- data ---------------------------------------------------------------------------------
    frames: list[LabelledFrame] = []
    if data:
        cfg_names = type_names
        if cfg_names is None and any(str(p).lower().endswith(".cfg") for p in data):
            cfg_names = _common_type_names(bench_models)
        frames, used_key = load_frames(
            data, type_names=cfg_names, group_key=group_key, max_frames=max_frames
        )
        elements = _element_order(frames, bench_models)
        groups = Counter(f.group for f in frames)
        res["data"] = {
            "files": [os.fspath(p) for p in data],
            "type_names_for_cfg": None if cfg_names is None else list(cfg_names),
            "structures": len(frames),
            "atoms": int(sum(f.n_atoms for f in frames)),
            "elements": elements,
            "element_counts": dict(
                Counter(s for f in frames for s in f.atoms.get_chemical_symbols())
            ),
            "group_key": used_key,
            "groups": dict(groups),
            "with_energy": sum(f.energy is not None for f in frames),
            "with_forces": sum(f.forces is not None for f in frames),
            "with_stress": sum(f.stress is not None for f in frames),
        }
    else:
        elements = []

    # -- accuracy -----------------------------------------------------------------------------
    preds: dict[str, Predictions] = {}
    if accuracy and frames:
        acc: dict[str, Any] = {}
        if save_predictions:
            (out / "predictions").mkdir(exist_ok=True)
        for m in bench_models:
            p = rec.run(f"accuracy/{m.name}", predict_frames, m, frames, batch_size, progress)
            if p is None:
                continue
            preds[m.name] = p
            acc[m.name] = accuracy_summary(p, elements)
            if save_predictions:
                p.save(out / "predictions" / f"{_safe(m.name)}.npz")
        res["accuracy"] = acc
        if plots and preds:
            for q in ("energy_per_atom", "forces", "stress"):
                if any(np.isfinite(p.errors()[q]).any() for p in preds.values()):
                    emit(f"parity_{q}", P.parity_figure(preds, q))
                    emit(f"hist_{q}", P.error_hist_figure(preds, q))
            emit("per_element_forces", P.per_element_figure(acc, "forces"))

    # -- structures for EOS / MD / cost ---------------------------------------------------------
    structures: list[EOSStructure] = []
    for path in eos_structures:
        structures.extend(read_eos_structures(os.fspath(path)))
    common = [t for t in bench_models[0].type_names if all(t in m.type_names for m in bench_models)]
    if not eos_elements and not frames:  # fcc/bcc of the models' first common element
        eos_elements = common[:1]
    auto = auto_eos_structures(frames, eos_auto, eos_elements)
    base = None
    if md_structure is not None:
        import ase.io

        base = ase.io.read(os.fspath(md_structure), index=0)
        base.calc = None
        base_label = os.path.basename(os.fspath(md_structure))
    else:
        data_auto = auto_eos_structures(frames, ("data",))
        pool = data_auto or structures or auto
        if not pool:
            pool = auto_eos_structures([], ("fcc",), common[:1]) if common else []
        if pool:
            base, base_label = pool[0].atoms, pool[0].label
    structures.extend(auto)

    if eos and structures:
        eos_res: dict[str, list] = {}
        from tqdm.auto import tqdm

        jobs = [(m, s) for m in bench_models for s in structures]
        for m, s in tqdm(
            jobs, desc="eos", unit="curve",
            disable=not progress if progress is not None else None, leave=False,
        ):  # fmt: skip
            r = rec.run(f"eos/{m.name}/{s.label}", equation_of_state, m, s, eos_points, eos_strain)
            if r is not None:
                eos_res.setdefault(m.name, []).append(r)
        res["eos"] = eos_res
        if plots and eos_res:
            emit("eos", P.eos_figure(eos_res))

    if md and base is not None:
        md_res: dict[str, Any] = {}
        for m in bench_models:
            r = rec.run(
                f"md/{m.name}", md_stability, m, base, steps=md_steps,
                timestep_fs=md_timestep_fs, temperature_K=md_temperature_K,
                min_atoms=md_min_atoms, seed=md_seed, progress=progress, label=base_label,
            )  # fmt: skip
            if r is not None:
                md_res[m.name] = r
        res["md"] = md_res
        if plots and md_res:
            emit("md", P.md_figure(md_res))

    if cost and base is not None:
        cost_res: dict[str, Any] = {}
        for m in bench_models:
            entry: dict[str, Any] = {
                "num_parameters": m.num_parameters(),
                "structure": base_label,
            }
            variant = "compiled" if m.compiled else "eager"
            rows = rec.run(
                f"cost/{m.name}", measure_cost, m, base, sizes, cost_min_time,
                memory=cost_memory, progress=progress, variant=variant,
            )  # fmt: skip
            entry[variant] = rows or []
            if compile and not m.compiled:
                # SUS2 on CPU with its fused kernels: the fastest deployment of each model
                modifiers = (
                    ["enable_fused_moments"] if m.kind == "SUS2" and m.device.type == "cpu" else []
                )
                cm = rec.run(
                    f"compile/{m.name}", aoti_compile, m, out / "compiled", modifiers=modifiers
                )
                if cm is not None:
                    entry["compile_seconds"] = cm.compile_seconds
                    entry["compile_modifiers"] = " ".join(modifiers)  # a list reads as rows
                    entry["compiled_path"] = cm.source
                    entry["compiled"] = (
                        rec.run(
                            f"cost/{m.name}/compiled",
                            measure_cost,
                            cm,
                            base,
                            sizes,
                            cost_min_time,
                            memory=cost_memory,
                            progress=progress,
                            variant="compiled",
                        )  # fmt: skip
                        or []
                    )
                    if frames:
                        entry["compiled_vs_eager"] = rec.run(
                            f"compile/{m.name}/check", _compare, m, cm, frames[:8]
                        )
            cost_res[m.name] = entry
        res["cost"] = cost_res
        res["cost_memory_note"] = MEMORY_NOTE.get(dev.type, "not available on this device")
        if plots:
            emit("cost", P.cost_figure({n: {k: v for k, v in e.items() if k in
                                            ("eager", "compiled")} for n, e in cost_res.items()}))  # fmt: skip

    # -- SUS2 ---------------------------------------------------------------------------------
    if sus2:
        sus2_res: dict[str, Any] = {}
        pairs = None if sus2_pairs is None else [_pair(p) for p in sus2_pairs]
        present = [s for s, _ in Counter(
            s for f in frames for s in f.atoms.get_chemical_symbols()).most_common()]  # fmt: skip
        for m in bench_models:
            if m.kind != "SUS2" or m.eager is None:
                continue
            out3 = rec.run(
                f"sus2/{m.name}", sus2_summary, m.eager, m.type_names, pairs, present or None,
                sus2_r_min,
            )  # fmt: skip
            if out3 is None:
                continue
            summary, params, curves = out3
            shown = [s for s in m.type_names if s in set(present)] or list(m.type_names)
            summary["species_shown"] = shown
            sus2_res[m.name] = summary
            if plots:
                store = res["plots"].setdefault("sus2", {}).setdefault(m.name, {})
                emit(f"sus2_{m.name}/radial",
                     P.sus2_radial_figure(curves, m.name, sus2_max_curves), store)  # fmt: skip
                emit(f"sus2_{m.name}/scale_shift",
                     P.sus2_scale_shift_figure(params, m.name, shown), store)  # fmt: skip
                emit(f"sus2_{m.name}/maps", P.sus2_maps_figure(params, m.name, shown), store)
        if sus2_res:
            res["sus2"] = sus2_res

    res["errors"] = rec.errors
    res = to_jsonable(res)
    json_path = write_json(res, out / "results.json")
    md_path = write_markdown(res, out / "report.md")
    return BenchResult(
        results=res,
        out_dir=out,
        report=md_path,
        json=json_path,
        figures=figures,
        predictions=preds,
        models=bench_models,
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
