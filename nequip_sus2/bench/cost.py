"""Cost: parameter count, inference throughput and peak memory against system size.

One "step" is what an MD code pays per time step: the neighbour list and data transforms
(``atoms_to_data``) plus one model call with forces and stress. Each size is warmed up (TorchScript
and e3nn code paths optimise themselves during the first calls), then timed step by step for at
least ``min_time`` seconds; the median step time gives the throughput in atom-steps per second,
for the full step and for the model call alone (medians resist the noise of a shared machine).

Peak memory of one step: on CUDA ``torch.cuda.max_memory_allocated`` over what was allocated
before; on CPU the same quantity from the PyTorch profiler's memory events (``profile_memory``:
the largest "Total Allocated" during the step, counted from the step's start). Both count tensor
memory allocated by the step (activations, autograd buffers), not the model's parameters.

Compiled models: ``--compile`` AOT-compiles each eager model with ``nequip-compile --mode
aotinductor --target ase`` (1.5-2.5 min per model on a CPU) and measures it beside the eager one.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from .models import BenchModel, load_bench_model
from .options import DEFAULT_SIZES
from .physics import supercell_for

__all__ = ["MEMORY_NOTE", "aoti_compile", "aoti_compile_all", "measure_cost"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MEMORY_NOTE = {
    "cuda": "torch.cuda.max_memory_allocated during one step, over what was allocated before",
    "cpu": "peak tensor memory allocated during one step (PyTorch profiler memory events)",
}


def _profiled_peak_bytes(fn) -> float | None:
    """Largest "Total Allocated" of the CPU memory events while ``fn()`` runs."""
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # no kineto start/stop lines on stderr
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text()).get("traceEvents", [])
    totals = [
        float(e["args"]["Total Allocated"])
        for e in events
        if e.get("name") == "[memory]" and "Total Allocated" in e.get("args", {})
    ]
    return max([0.0, *totals]) if totals else None


def _peak_memory_mb(model: BenchModel, atoms) -> float | None:
    """Peak tensor memory (MB) allocated by one step on ``atoms``."""
    dev = model.device
    data = model.atoms_to_data(atoms)
    if dev.type == "cuda":
        _sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        model.evaluate_data([data])
        _sync(dev)
        return (torch.cuda.max_memory_allocated(dev) - before) / 2**20
    if dev.type != "cpu":
        return None
    peak = _profiled_peak_bytes(lambda: model.evaluate_data([data]))
    return None if peak is None else peak / 2**20


def _time_steps(
    model: BenchModel, atoms, min_time: float, max_reps: int, warmup: int
) -> dict[str, Any]:
    dev = model.device
    for _ in range(max(warmup, 1)):
        model.evaluate_data([model.atoms_to_data(atoms)])
    _sync(dev)
    prep, calls = [], []
    start = time.perf_counter()
    while len(calls) < max_reps and (not calls or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        data = model.atoms_to_data(atoms)
        t1 = time.perf_counter()
        model.evaluate_data([data])
        _sync(dev)
        t2 = time.perf_counter()
        prep.append(t1 - t0)
        calls.append(t2 - t1)
    steps = [a + b for a, b in zip(prep, calls, strict=True)]
    return {
        "reps": len(calls),
        "step_s": statistics.median(steps),
        "step_mean_s": statistics.fmean(steps),
        "model_s": statistics.median(calls),
        "prep_s": statistics.median(prep),
    }


def measure_cost(
    model: BenchModel,
    base_atoms,
    sizes: Sequence[int] = DEFAULT_SIZES,
    min_time: float = 1.0,
    max_reps: int = 50,
    memory: bool = True,
    progress: bool | None = None,
    variant: str | None = None,
    warmup: int = 2,
) -> list[dict[str, Any]]:
    """Throughput and peak memory of ``model`` on ``base_atoms`` repeated to each size."""
    from tqdm.auto import tqdm

    model.check_species(base_atoms.get_chemical_symbols(), "the cost structure")
    rows = []
    for size in tqdm(
        sorted(sizes),
        desc=f"cost {model.name}{' ' + variant if variant else ''}",
        unit="size",
        disable=not progress if progress is not None else None,
        leave=False,
    ):
        atoms = supercell_for(base_atoms, int(size))
        n = len(atoms)
        t = _time_steps(model, atoms, min_time, max_reps, warmup)
        mem = _peak_memory_mb(model, atoms) if memory else None
        rows.append(
            {
                "target_atoms": int(size),
                "n_atoms": n,
                "reps": t["reps"],
                "ms_per_step": 1000.0 * t["step_s"],
                "ms_per_step_mean": 1000.0 * t["step_mean_s"],
                "ms_model": 1000.0 * t["model_s"],
                "ms_neighborlist_and_transforms": 1000.0 * t["prep_s"],
                "atom_steps_per_s": n / t["step_s"],
                "atom_steps_per_s_model_only": n / t["model_s"],
                "peak_memory_MB": mem,
            }
        )
    return rows


def aoti_compile(
    model: BenchModel,
    out_dir: str | os.PathLike,
    timeout: float = 1200.0,
    modifiers: Sequence[str] = (),
) -> BenchModel:
    """AOT-compile an eager model for the ASE target and load it (``nequip-compile``).

    Checkpoints and packages are compiled from their file; ``.mtp`` and in-memory models are
    first written as a package (:func:`nequip_sus2.package.write_package`). ``modifiers`` are
    passed to ``nequip-compile --modifiers`` (e.g. ``enable_fused_moments``).
    """
    return aoti_compile_all([(model, modifiers)], out_dir, timeout=timeout, workers=1)[0]


def aoti_compile_all(
    jobs: Sequence[tuple[BenchModel, Sequence[str]]],
    out_dir: str | os.PathLike,
    timeout: float = 1200.0,
    workers: int = 1,
) -> list[BenchModel]:
    """:func:`aoti_compile` for several ``(model, modifiers)`` pairs, ``workers`` at a time.

    Packages are written one after the other in this process; the ``nequip-compile``
    processes (mostly one busy core each) run concurrently; the compiled models are loaded in
    order. ``compile_seconds`` of each is the wall time of its own ``nequip-compile``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        commands = [
            None if model.compiled else _compile_command(model, modifiers, out_dir, Path(tmp))
            for model, modifiers in jobs
        ]
        todo = [c for c in commands if c is not None]
        targets = [target for _, target in todo]
        if len(set(targets)) != len(targets):
            raise ValueError(f"aoti_compile_all: two models compile to the same file: {targets}")
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            done = iter(list(pool.map(lambda c: _run_compile(*c, timeout), todo)))
    compiled = []
    for (model, _), cmd in zip(jobs, commands, strict=True):
        if cmd is None:
            compiled.append(model)
            continue
        target, seconds = next(done)
        result = load_bench_model(str(target), device=model.device, name=model.name)
        result.compile_seconds = seconds
        result.kind = model.kind
        compiled.append(result)
    return compiled


def _compile_command(
    model: BenchModel, modifiers: Sequence[str], out_dir: Path, tmp: Path
) -> tuple[list[str], Path]:
    """The ``nequip-compile`` command line for ``model`` (written as a package if needed) and
    the file it writes."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model.name)
    target = out_dir / f"{safe}.nequip.pt2"
    source = model.source
    if model.fmt not in ("checkpoint", "package"):
        from ..package import write_package

        source = str(tmp / f"{safe}.nequip.zip")
        eager = model.model
        write_package(eager.to("cpu"), source, compile_variants=False)
        eager.to(model.device)
    cmd = [
        sys.executable, "-m", "nequip.scripts.compile", source, str(target),
        "--mode", "aotinductor", "--device", model.device.type, "--target", "ase",
    ]  # fmt: skip
    if modifiers:
        cmd += ["--modifiers", *modifiers]
    return cmd, target


def _run_compile(cmd: list[str], target: Path, timeout: float) -> tuple[Path, float]:
    """Runs one ``nequip-compile`` command; returns the compiled file and the wall time."""
    start = time.perf_counter()
    # the compile traces the model: keep to this process's thread budget (--threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not target.exists():
        raise RuntimeError(
            f"nequip-compile failed for {target.name} ({proc.returncode}):\n"
            + (proc.stdout[-2000:] + proc.stderr[-2000:])
        )
    return target, seconds
