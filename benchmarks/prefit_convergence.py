"""How much the linear pre-fit (``nequip_sus2.train.LinearPrefit``) speeds up training.

Trains the same SUS2 model on the same EMT alloy data twice, in process with NequIP's
``EMALightningModule`` and a Lightning ``Trainer`` (the objects ``nequip-train`` builds from a
config), once plain and once with the pre-fit callback, and prints the validation error per
epoch, the epochs each run needs to reach a target error (default: the plain run's final
error) and their ratio. Run from the project root::

    python benchmarks/prefit_convergence.py           # 150 structures, 16 epochs (~1.5 min)
    python benchmarks/prefit_convergence.py --quick   # the unit test's setting (~20 s)
    python benchmarks/prefit_convergence.py --ridge 1e-8 1e-3 1e-1   # compare ridges

Model: the tutorial's L2K3 R8 SUS2 in float32 (``--small-model``: L2K2 R6). Everything is
seeded and runs on one thread; numbers vary slightly between machines.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

TYPE_NAMES = ["Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al"]
#: the model of configs/tutorial.yaml (train_curve's default is the smaller L2K2 R6)
TUTORIAL_MODEL = {"radial_channels": 3, "radial_basis_size": 8}
METRIC = "val0_epoch/weighted_sum"


def _curve_callback():
    from lightning.pytorch.callbacks import Callback

    class Curve(Callback):
        """Validation metrics after every epoch (``on_validation_end``: after logging)."""

        def __init__(self):
            self.rows: list[dict[str, float]] = []

        def on_validation_end(self, trainer, pl_module):
            if trainer.sanity_checking:
                return
            m = trainer.callback_metrics
            self.rows.append({k: float(v) for k, v in m.items() if k.startswith("val0_epoch/")})

    return Curve()


def train_curve(
    data_file: str | os.PathLike,
    prefit: dict | None,
    max_epochs: int,
    seed: int = 1,
    model: dict | None = None,
    batch_size: int = 4,
    lr: float = 0.01,
    train_fraction: float = 0.8,
    out_dir: str | os.PathLike | None = None,
    ema_decay: float | None = 0.99,
) -> dict:
    """Train once; returns ``{"val": [weighted val metric per epoch], "rows": [...],
    "seconds": wall time, "prefit_history": [...]}``. ``prefit``: ``LinearPrefit`` kwargs or
    ``None`` for the plain run."""
    import lightning
    import torch
    from ase.io import read
    from hydra.utils import instantiate
    from nequip.utils.global_state import set_global_state

    from nequip_sus2.train import LinearPrefit

    set_global_state()
    lightning.seed_everything(seed, verbose=False)
    frames = read(str(data_file), index=":")
    shift = float(np.mean([a.get_potential_energy() / len(a) for a in frames]))
    model_cfg = {
        "_target_": "nequip_sus2.model.SUS2Model",
        "seed": seed,
        "model_dtype": "float32",
        "type_names": TYPE_NAMES,
        "r_max": 5.0,
        "max_rank": 2,
        "radial_channels": 2,
        "radial_basis_size": 6,
        "per_type_energy_shifts": shift,
        "per_type_energy_scales": 1.0,
        **(model or {}),
    }
    data_cfg = {
        "_target_": "nequip.data.datamodule.ASEDataModule",
        "seed": seed,
        "split_dataset": {
            "file_path": str(data_file),
            "train": train_fraction,
            "val": 1.0 - train_fraction,
        },
        "transforms": [
            {
                "_target_": "nequip.data.transforms.ChemicalSpeciesToAtomTypeMapper",
                "model_type_names": TYPE_NAMES,
                "chemical_species_to_atom_type_map": {t: t for t in TYPE_NAMES},
            },
            {"_target_": "nequip.data.transforms.NeighborListTransform", "r_max": 5.0},
        ],
        "train_dataloader": {
            "_target_": "torch.utils.data.DataLoader",
            "batch_size": batch_size,
            "shuffle": True,
        },
        "val_dataloader": {"_target_": "torch.utils.data.DataLoader", "batch_size": 20},
    }
    module_cfg = {
        "_target_": "nequip.train.NequIPLightningModule",
        "loss": {
            "_target_": "nequip.train.EnergyForceStressLoss",
            "per_atom_energy": True,
            "coeffs": {"total_energy": 1.0, "forces": 1.0, "stress": 1.0},
        },
        "val_metrics": {
            "_target_": "nequip.train.EnergyForceStressMetrics",
            "coeffs": {"per_atom_energy_mae": 1.0, "forces_mae": 1.0, "stress_mae": None},
        },
        "optimizer": {"_target_": "torch.optim.Adam", "lr": lr},
        "model": model_cfg,
    }
    if ema_decay is not None:
        module_cfg.update({"_target_": "nequip.train.EMALightningModule", "ema_decay": ema_decay})
    datamodule = instantiate(data_cfg, _recursive_=False)
    curve = _curve_callback()
    callbacks = [curve]
    pre = None
    if prefit is not None:
        pre = LinearPrefit(**prefit)
        callbacks.append(pre)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = lightning.Trainer(
            max_epochs=max_epochs,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            inference_mode=False,
            callbacks=callbacks,
            default_root_dir=out_dir or tmp,
        )
        module = instantiate(
            module_cfg,
            _recursive_=False,
            _convert_="all",
            num_datasets=datamodule.num_datasets,
            info_dict={},
        )
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, datamodule=datamodule)
        seconds = time.perf_counter() - t0
    torch.set_grad_enabled(True)
    return {
        "val": [r[METRIC] for r in curve.rows],
        "rows": curve.rows,
        "seconds": seconds,
        "prefit_history": [] if pre is None else pre.history,
    }


def epochs_to_reach(curve: list[float], target: float) -> int | None:
    """1-based epoch at which ``curve`` first reaches ``<= target`` (None if never)."""
    for k, v in enumerate(curve):
        if v <= target:
            return k + 1
    return None


def compare(
    data_file, max_epochs: int, prefits: dict[str, dict], target: float | None = None, **kwargs
) -> dict:
    """One plain run and one run per ``LinearPrefit`` setting in ``prefits`` (name -> kwargs);
    ``target`` defaults to the plain run's final error."""
    plain = train_curve(data_file, None, max_epochs, **kwargs)
    runs = {name: train_curve(data_file, pf, max_epochs, **kwargs) for name, pf in prefits.items()}
    if target is None:
        target = plain["val"][-1]
    n_plain = epochs_to_reach(plain["val"], target)
    arms = {}
    for name, run in runs.items():
        n_fit = epochs_to_reach(run["val"], target)
        ratio = (n_plain / n_fit) if (n_plain and n_fit) else math.nan
        arms[name] = {"run": run, "epochs": n_fit, "ratio": ratio}
    return {"plain": plain, "arms": arms, "target": target, "epochs_plain": n_plain}


def _report(res: dict) -> str:
    names = list(res["arms"])
    curves = [res["plain"]["val"]] + [res["arms"][n]["run"]["val"] for n in names]
    header = f"{'epoch':>5} {'plain':>10} " + " ".join(f"{n:>14}" for n in names)
    lines = [header + "   (val: 0.5 (E MAE/atom + F MAE))"]
    for k in range(max(len(c) for c in curves)):
        vals = [c[k] if k < len(c) else math.nan for c in curves]
        lines.append(f"{k + 1:>5} {vals[0]:>10.4f} " + " ".join(f"{v:>14.4f}" for v in vals[1:]))
    runs = {"plain": res["plain"], **{n: res["arms"][n]["run"] for n in names}}
    for name, run in runs.items():
        last = run["rows"][-1]
        lines.append(
            f"{name}: final E MAE {1000 * last['val0_epoch/per_atom_energy_mae']:.1f} meV/atom, "
            f"F MAE {last['val0_epoch/forces_mae']:.4f} eV/A, {run['seconds']:.1f} s"
        )
        for h in run["prefit_history"]:
            lines.append(
                f"  prefit at epoch {h['epoch']}: weighted loss {h['loss_before']:.4g} -> "
                f"{h['loss_after']:.4g}"
            )
    lines.append(f"target {res['target']:.4f}: plain needs {res['epochs_plain']} epochs")
    for name in names:
        arm = res["arms"][name]
        lines.append(f"  {name}: {arm['epochs']} epochs, ratio {arm['ratio']:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="the unit test's setting (60 structures, 6 epochs)"
    )
    parser.add_argument("--structures", type=int, default=None, help="EMT structures (150)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (16)")
    parser.add_argument("--every", type=int, default=None, help="re-solve every N epochs (4)")
    parser.add_argument(
        "--ridge", type=float, nargs="+", default=[1e-3], help="LinearPrefit ridge(s) (1e-3)"
    )
    parser.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (0.01)")
    parser.add_argument("--ema", type=float, default=0.99, help="EMA decay (0: no EMA)")
    parser.add_argument("--small-model", action="store_true", help="L2K2 R6 instead of L2K3 R8")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    from nequip_sus2.data.emt import write_emt_dataset

    torch.set_num_threads(args.threads)
    n = args.structures or (60 if args.quick else 150)
    epochs = args.epochs or (6 if args.quick else 16)
    every = args.every if args.every is not None else (2 if args.quick else 4)
    model, shape = (None, "L2K2 R6") if args.small_model else (TUTORIAL_MODEL, "L2K3 R8")
    with tempfile.TemporaryDirectory() as tmp:
        data = write_emt_dataset(Path(tmp) / "emt.xyz", n_structures=n, seed=0)
        prefits = {f"ridge {r:g}": {"every_n_epochs": every, "ridge": r} for r in args.ridge}
        res = compare(data, epochs, prefits, lr=args.lr, ema_decay=args.ema or None, model=model)
    print(
        f"{n} EMT structures (80/20 split), {shape} SUS2 float32, Adam lr {args.lr:g}, "
        f"EMA {args.ema or 'off'}, batch 4; pre-fit at the start and every {every} epochs"
    )
    print(_report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
