"""Inference and training throughput of SUS2 against NequIP and Allegro (issue #6).

Models (untrained weights: cost does not depend on their values) come from the repository's own
configs, so the comparison is with the models of comparable accuracy that ``make demo`` and
docs/comparison.md train on the same data:

- ``SUS2``: ``configs/tutorial.yaml`` (L2 K3 R8, float32), r_max 5.0;
- ``NequIP``: ``configs/nequip_baseline.yaml`` (2 layers, l_max 1, 16 features), r_max 5.0;
- ``Allegro``: ``configs/allegro_baseline.yaml`` (1 layer, l_max 1), r_max 5.0;
- ``SUS2-alloy``: ``configs/alloy.yaml`` (L2 K3 R5, 53 species), r_max 6.0, in float32 and
  float64 — the "default alloy SUS2" of the <= 10 us/atom-step target.

Inference = one model call with energy, forces and virial on a periodic random fcc alloy
(Cu Ag Au Ni Pd Pt Al) with a precomputed neighbour list, for eager and AOTInductor-compiled
(``nequip-compile --mode aotinductor --target ase``) models, per size and thread count; the SUS2
models also compiled with the fused CPU kernels (``--modifiers enable_fused_moments``,
"AOTI-fused"). All
models of one size and thread count are timed in interleaved rounds, so that ratios are stable on
a noisy machine; in each round a model is called back to back as in MD (an untimed call first
when calls are short, then timed calls for at least 20 ms), median over all timed calls. Peak memory: the largest "Total Allocated" of the
PyTorch profiler's memory events during one call (tensor memory of the call, not parameters).
Training = forward + energy/force/stress loss + backward + Adam step on batches of
``alloy_train.cfg`` (53 elements), structures per second, interleaved the same way; the SUS2
alloy model also with the fused training path (``fused``: the loss gradient by the CPU
kernels, :mod:`nequip_sus2.kernels.training`), against its PyTorch path and NequIP.

    python benchmarks/inference_throughput.py --out bench_output/performance
    python benchmarks/inference_throughput.py --quick        # smaller sizes, no 2-thread runs

Writes ``results.json``, ``table.md`` and ``throughput.png`` and prints the table with the
target ratios. ``make bench`` runs the full version.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ALLOY_CFG = ROOT.parent / "shared" / "benchmarks" / "alloy" / "alloy_train.cfg"
METALS = ["Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al"]
DEFAULT_SIZES = (256, 500, 1000, 2000, 4000, 8000, 16000)
FUSED_MODIFIER = "enable_fused_moments"
BURST_SECONDS = 0.02  # timed calls of one model per round
WARM_CALL_SECONDS = 0.1  # shorter calls get an untimed call first in each round


# ----------------------------------------------------------------------------------------------
# models from the configs
# ----------------------------------------------------------------------------------------------


def _model_block(config: str, key: str) -> dict:
    cfg = yaml.safe_load((CONFIGS / config).read_text())
    return cfg["training_module"]["model"] if key == "training_module" else cfg[key]


def _instantiate(block: dict, type_names, r_max: float, dtype: str, avg_nn: float):
    """Instantiate a config's model block with the data-dependent entries filled in."""
    from hydra.utils import instantiate

    block = copy.deepcopy(block)
    fill = {
        "seed": 0,
        "model_dtype": dtype,
        "type_names": list(type_names),
        "r_max": r_max,
        "avg_num_neighbors": avg_nn,
        "per_type_energy_shifts": 0.0,
        "per_type_energy_scales": 1.0,
    }
    for key, value in fill.items():
        # interpolations (strings such as ${seed}) and the dtype; literal numbers stay
        if key in block and (key == "model_dtype" or isinstance(block[key], str)):
            block[key] = value
    return instantiate(block, _recursive_=False, _convert_="all")


def _alloy_type_names() -> list[str]:
    return list(yaml.safe_load((CONFIGS / "alloy.yaml").read_text())["model_type_names"])


def build_models(avg_nn: dict[float, float]) -> dict[str, torch.nn.Module]:
    """Eager models keyed by display name."""
    from nequip_sus2.bench.models import ensure_global_state

    ensure_global_state()
    sus2 = _model_block("tutorial.yaml", "training_module")
    alloy = _model_block("alloy.yaml", "training_module")
    alloy_types = _alloy_type_names()
    return {
        "SUS2": _instantiate(sus2, METALS, 5.0, "float32", avg_nn[5.0]),
        "NequIP": _instantiate(
            _model_block("nequip_baseline.yaml", "model"), METALS, 5.0, "float32", avg_nn[5.0]
        ),
        "Allegro": _instantiate(
            _model_block("allegro_baseline.yaml", "model"), METALS, 5.0, "float32", avg_nn[5.0]
        ),
        "SUS2-alloy-f32": _instantiate(alloy, alloy_types, 6.0, "float32", avg_nn[6.0]),
        "SUS2-alloy-f64": _instantiate(alloy, alloy_types, 6.0, "float64", avg_nn[6.0]),
    }


# ----------------------------------------------------------------------------------------------
# structures and timing
# ----------------------------------------------------------------------------------------------


def alloy_cell(n_target: int, seed: int = 0):
    """A random fcc alloy supercell of about ``n_target`` atoms (Vegard lattice, rattled)."""
    from ase.build import bulk

    from nequip_sus2.bench.physics import supercell_for
    from nequip_sus2.data.emt import FCC_LATTICE_CONSTANTS

    a = float(np.mean([FCC_LATTICE_CONSTANTS[s] for s in METALS]))
    atoms = supercell_for(bulk("Cu", "fcc", a=a, cubic=True), n_target)
    rng = np.random.default_rng(seed)
    atoms.set_chemical_symbols(list(rng.choice(METALS, len(atoms))))
    atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
    return atoms


def mean_neighbours(r_max: float) -> float:
    from ase.neighborlist import neighbor_list

    atoms = alloy_cell(500)
    return len(neighbor_list("i", atoms, r_max)) / len(atoms)


def _call_seconds(bm, data) -> float:
    t0 = time.perf_counter()
    bm._call(dict(data))
    if bm.device.type == "cuda":
        torch.cuda.synchronize(bm.device)
    return time.perf_counter() - t0


def time_interleaved(
    models, atoms, min_time: float, max_rounds: int, burst: float = BURST_SECONDS
) -> dict[str, float]:
    """Median seconds per call of each model, timed round-robin on the same structure.

    In each round every model is called back to back, as an MD run calls it: one untimed call
    when its calls are shorter than ``WARM_CALL_SECONDS`` (caches and allocator state left by the
    previous model), then timed calls for at least ``burst`` seconds. Rounds repeat for
    ``min_time`` seconds (3 to ``max_rounds``); the median is over all timed calls.
    """
    datas = {name: bm.atoms_to_data(atoms) for name, bm in models.items()}
    last = {}
    for name, bm in models.items():  # warm-up (AOTI and autograd first-call costs)
        bm._call(dict(datas[name]))
        last[name] = _call_seconds(bm, datas[name])
    times: dict[str, list[float]] = {name: [] for name in models}
    start = time.perf_counter()
    rounds = 0
    while rounds < 3 or (rounds < max_rounds and time.perf_counter() - start < min_time):
        for name, bm in models.items():
            if last[name] < WARM_CALL_SECONDS:
                bm._call(dict(datas[name]))
            elapsed = 0.0
            while elapsed == 0.0 or elapsed < burst:  # at least one call
                last[name] = _call_seconds(bm, datas[name])
                times[name].append(last[name])
                elapsed += last[name]
        rounds += 1
    return {name: statistics.median(t) for name, t in times.items()}


# ----------------------------------------------------------------------------------------------
# training throughput
# ----------------------------------------------------------------------------------------------


def training_throughput(
    models: dict[str, torch.nn.Module], n_structures: int, batch_size: int, min_time: float
) -> dict[str, float] | None:
    """Structures per second of forward + E/F/stress loss + backward + Adam step (models whose
    name ends in ``fused``: the gradient by the fused training path)."""
    if not ALLOY_CFG.exists():
        return None
    from nequip.data import AtomicDataDict, compute_neighborlist_, from_dict

    from nequip_sus2.io.cfg import iter_cfg

    frames = []
    for frame in iter_cfg(ALLOY_CFG):
        frames.append(frame)
        if len(frames) >= n_structures:
            break
    batches: dict[float, list] = {}
    for r_max in {float(m.metadata["r_max"]) for m in models.values()}:
        datas = []
        for f in frames:
            d = {
                "pos": np.asarray(f.positions, dtype=np.float64),
                "atom_types": np.asarray(f.types),
                "cell": np.asarray(f.cell, dtype=np.float64),
                "pbc": np.ones(3, dtype=bool),
                "total_energy": np.array([f.energy]),
                "forces": np.asarray(f.forces),
            }
            datas.append(compute_neighborlist_(from_dict(d), r_max=r_max))
        batches[r_max] = [
            AtomicDataDict.batched_from_list(datas[i : i + batch_size])
            for i in range(0, len(datas) - batch_size + 1, batch_size)
        ]
    opts = {name: torch.optim.Adam(m.parameters(), lr=1e-4) for name, m in models.items()}
    from nequip_sus2.kernels.training import FusedLossGradient

    fused = {name: FusedLossGradient(m) for name, m in models.items() if name.endswith("fused")}

    def step(name: str, batch) -> None:
        model = models[name]
        opts[name].zero_grad()
        out = fused[name].outputs(model, dict(batch)) if name in fused else model(dict(batch))
        loss = (out["total_energy"] - batch["total_energy"]).square().mean() + (
            out["forces"] - batch["forces"]
        ).square().mean()
        if "virial" in out:
            loss = loss + 1e-3 * out["virial"].square().mean()
        if name in fused:
            fused[name].backward(loss, out)
        else:
            loss.backward()
        opts[name].step()

    seconds: dict[str, list[float]] = {name: [] for name in models}
    start = time.perf_counter()
    k = 0
    while k < 3 or time.perf_counter() - start < min_time:
        for name, model in models.items():
            r_batches = batches[float(model.metadata["r_max"])]
            t0 = time.perf_counter()
            step(name, r_batches[k % len(r_batches)])
            seconds[name].append(time.perf_counter() - t0)
        k += 1
    return {name: batch_size / statistics.median(s[1:]) for name, s in seconds.items()}


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------


def machine() -> dict:
    from nequip_sus2.bench.environment import cpu_model

    return {
        "cpu": cpu_model() or platform.processor() or platform.machine(),
        "logical_cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def fit_slope(sizes, seconds) -> float:
    """Slope of log(time) against log(atoms): 1 = linear scaling."""
    x, y = np.log(np.asarray(sizes, float)), np.log(np.asarray(seconds, float))
    return float(np.polyfit(x, y, 1)[0])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench_output" / "performance")
    p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--no-compile", action="store_true", help="eager models only")
    p.add_argument(
        "--compile-jobs", type=int, default=min(2, os.cpu_count() or 1),
        help="nequip-compile processes at a time (default: 2, or 1 on one core)",
    )  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--min-time", type=float, default=2.0, help="seconds per size and threads")
    p.add_argument("--train-structures", type=int, default=96)
    p.add_argument("--train-batch", type=int, default=32, help="structures per training step")
    p.add_argument("--quick", action="store_true", help="sizes 256-2000, 1 thread, short runs")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.threads, args.min_time = [256, 1000, 2000], [1], 1.0
        args.train_structures, args.train_batch = 16, 8
    args.out.mkdir(parents=True, exist_ok=True)
    from nequip_sus2.bench.cost import _peak_memory_mb, aoti_compile_all
    from nequip_sus2.bench.models import load_bench_model

    torch.set_num_threads(1)
    avg_nn = {r: mean_neighbours(r) for r in (5.0, 6.0)}
    eager = build_models(avg_nn)
    params = {name: int(sum(p.numel() for p in m.parameters())) for name, m in eager.items()}
    bench = {
        f"{name} eager": load_bench_model(m, device=args.device, name=f"{name} eager")
        for name, m in eager.items()
    }
    compile_seconds = {}
    if not args.no_compile:
        jobs = []  # (key in bench, source model, modifiers)
        for name in eager:
            jobs.append((f"{name} AOTI", bench[f"{name} eager"], []))
            if name.startswith("SUS2") and args.device == "cpu":
                # the fused CPU kernels: nequip-compile --modifiers enable_fused_moments
                source = load_bench_model(eager[name], device="cpu", name=f"{name} fused")
                jobs.append((f"{name} AOTI-fused", source, [FUSED_MODIFIER]))
        print(
            f"compiling {len(jobs)} models (nequip-compile --mode aotinductor, "
            f"{args.compile_jobs} at a time) ...",
            flush=True,
        )
        compiled = aoti_compile_all(
            [(m, mods) for _, m, mods in jobs], args.out / "compiled", workers=args.compile_jobs
        )
        for (key, _, _), model in zip(jobs, compiled, strict=True):
            model.name = key
            bench[key] = model
            compile_seconds[key] = model.compile_seconds
    results = {"machine": machine(), "parameters": params, "mean_neighbours": avg_nn,
               "compile_seconds": compile_seconds, "inference": []}  # fmt: skip
    for threads in args.threads:
        torch.set_num_threads(threads)
        for size in args.sizes:
            atoms = alloy_cell(size)
            secs = time_interleaved(bench, atoms, args.min_time, max_rounds=50)
            for name, s in secs.items():
                results["inference"].append(
                    {
                        "model": name,
                        "threads": threads,
                        "atoms": len(atoms),
                        "seconds": s,
                        "us_per_atom_step": 1e6 * s / len(atoms),
                        "atom_steps_per_s": len(atoms) / s,
                    }  # fmt: skip
                )
            line = ", ".join(f"{n} {1e6 * s / len(atoms):.1f}" for n, s in secs.items())
            print(f"[{threads} thread(s), {len(atoms)} atoms] us/atom-step: {line}", flush=True)
    torch.set_num_threads(1)
    mem_atoms = alloy_cell(2000)
    results["peak_memory_MB_per_1000_atoms"] = {}
    for name, bm in bench.items():
        mb = _peak_memory_mb(bm, mem_atoms)  # CUDA allocator stats, or CPU profiler events
        results["peak_memory_MB_per_1000_atoms"][name] = (
            None if mb is None else 1000 * mb / len(mem_atoms)
        )
    print("training throughput on alloy_train.cfg ...", flush=True)
    train_models = {
        **{
            f"SUS2-alloy-{dtype}{variant}": copy.deepcopy(eager[f"SUS2-alloy-{dtype}"])
            for dtype in ("f32", "f64")
            for variant in ("", " fused")
        },
        **{
            name: _instantiate(
                _model_block(cfg, "model"), _alloy_type_names(), 6.0, "float32", avg_nn[6.0]
            )
            for name, cfg in (
                ("NequIP", "nequip_baseline.yaml"),
                ("Allegro", "allegro_baseline.yaml"),
            )
        },
    }
    for m in train_models.values():
        m.train()
    results["train_batch"] = args.train_batch
    results["training_structures_per_s"] = training_throughput(
        train_models, args.train_structures, args.train_batch, args.min_time * 3
    )
    summarize(results, args.out)
    return results


def _lookup(results, model, threads, atoms) -> float | None:
    rows = [r for r in results["inference"] if r["model"] == model and r["threads"] == threads]
    if not rows:
        return None
    best = min(rows, key=lambda r: abs(math.log(r["atoms"] / atoms)))
    return best["seconds"] / best["atoms"]


def summarize(results: dict, out: Path) -> None:
    """Table, targets, plot and JSON."""
    models = list(dict.fromkeys(r["model"] for r in results["inference"]))
    threads = sorted({r["threads"] for r in results["inference"]})
    sizes = sorted({r["atoms"] for r in results["inference"]})
    lines = [f"Machine: {results['machine']['cpu']}, {results['machine']['logical_cores']} "
             f"logical cores, torch {results['machine']['torch']}", ""]  # fmt: skip
    for t in threads:
        lines += [f"### Inference, {t} thread(s): microseconds per atom-step (E+F+virial)", ""]
        lines += ["| model | params | " + " | ".join(str(n) for n in sizes) + " | slope |"]
        lines += ["|---" * (len(sizes) + 3) + "|"]
        for m in models:
            rows = {
                r["atoms"]: r for r in results["inference"] if r["model"] == m and r["threads"] == t
            }
            base = m.rsplit(" ", 1)[0]
            slope = (
                fit_slope(list(rows), [r["seconds"] for r in rows.values()])
                if len(rows) > 1
                else float("nan")
            )
            cells = " | ".join(
                f"{rows[n]['us_per_atom_step']:.1f}" if n in rows else "" for n in sizes
            )
            lines.append(f"| {m} | {results['parameters'].get(base, '')} | {cells} | {slope:.2f} |")
        lines.append("")
    targets = []
    # (SUS2 variant, baseline variant): the fused SUS2 against the best compiled baselines
    for variant, base in (("eager", "eager"), ("AOTI", "AOTI"), ("AOTI-fused", "AOTI")):
        s = _lookup(results, f"SUS2 {variant}", 1, 2000)
        for other, goal in (("Allegro", 20), ("NequIP", 50)):
            o = _lookup(results, f"{other} {base}", 1, 2000)
            if s and o:
                targets.append(f"- SUS2 {variant} vs {other} {base}, 1 thread, ~2000 atoms: "
                               f"{o / s:.2f}x the throughput (target >= {goal}x)")  # fmt: skip
    for dtype, variant in itertools.product(("f32", "f64"), ("AOTI", "AOTI-fused")):
        s = _lookup(results, f"SUS2-alloy-{dtype} {variant}", 1, 2000)
        if s:
            targets.append(f"- SUS2-alloy ({dtype}) {variant}, 1 thread, ~2000 atoms: "
                           f"{1e6 * s:.1f} us/atom-step (target <= 10)")  # fmt: skip
    lines += ["### Targets", ""] + targets + [""]
    mem = results.get("peak_memory_MB_per_1000_atoms", {})
    lines += ["### Peak memory of one call (MB per 1000 atoms, 2000-atom cell, 1 thread)", ""]
    lines += [f"- {m}: {v:.1f}" if v is not None else f"- {m}: n/a" for m, v in mem.items()]
    train = results.get("training_structures_per_s")
    if train:
        lines += ["", f"### Training on alloy_train.cfg (batch {results['train_batch']}, "
                  "E+F+virial loss, Adam): structures per second", ""]  # fmt: skip
        lines += [f"- {m}: {v:.1f}" for m, v in train.items()]
        for dtype in ("f32", "f64"):
            fused = train.get(f"SUS2-alloy-{dtype} fused")
            for other, goal in ((f"SUS2-alloy-{dtype}", 10), ("NequIP", 20)):
                if fused and train.get(other):
                    lines.append(f"- target: SUS2-alloy ({dtype}) fused training step vs "
                                 f"{other}: {fused / train[other]:.1f}x (target >= {goal}x)")  # fmt: skip
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n" + table)
    _plot(results, out / "throughput.png")
    print(f"wrote {out / 'table.md'}, {out / 'results.json'}, {out / 'throughput.png'}")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = sorted({r["threads"] for r in results["inference"]})
    fig, axes = plt.subplots(1, len(threads), figsize=(6 * len(threads), 4.5), squeeze=False)
    names = list(dict.fromkeys(r["model"] for r in results["inference"]))
    bases = list(dict.fromkeys(m.rsplit(" ", 1)[0] for m in names))
    colours = {b: f"C{k}" for k, b in enumerate(bases)}  # one colour per model, style per variant
    for ax, t in zip(axes[0], threads, strict=True):
        for m in names:
            rows = sorted((r["atoms"], r["atom_steps_per_s"]) for r in results["inference"]
                          if r["model"] == m and r["threads"] == t)  # fmt: skip
            style = {"AOTI": "-", "AOTI-fused": "-."}.get(m.rsplit(" ", 1)[1], "--")
            base = m.rsplit(" ", 1)[0]
            ax.plot(*zip(*rows, strict=True), style, marker="o", color=colours[base], label=m)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("atoms")
        ax.set_ylabel("atom-steps per second (E+F+virial)")
        ax.set_title(f"CPU, {t} thread(s)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
