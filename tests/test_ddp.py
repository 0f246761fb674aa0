"""Distributed data-parallel training gives the model of one process with the doubled batch.

``nequip-train`` runs the tutorial config twice on a tiny EMT data set (40 structures: 32 train,
4 validation, 4 test), in float64, for 3 epochs of one optimizer step each:

* 1 process, ``batch_size=32``;
* 2 CPU processes (gloo backend) under NequIP's ``SimpleDDPStrategy``, ``batch_size=16`` each.

Each step's batch is the whole training set in both runs. That is deliberate: in a training
run Lightning always gives every rank a shuffled ``DistributedSampler`` shard, whose order cannot
be reproduced by a single-process ``DataLoader``; with full-set batches the *set* of structures
per step is the same whatever the order, so the comparison can be exact. What is compared:

* the per-step training losses: NequIP syncs the loss metric over ranks, so rank 0 must log the
  loss of the 32-structure batch;
* all weights and their EMA copies after the 3 steps, to 1e-9 relative (float64 round-off from
  a different summation order; measured differences are ~1e-18). The optimizer is switched to
  plain SGD for this test: Adam is nearly invariant to the scale of the gradient, so it would hide
  a wrong DDP gradient normalisation (NequIP multiplies the loss by the world size and the
  strategy averages gradients over ranks), while with SGD the update is the gradient itself.
  Adam's update is a deterministic function of the gradients, so equal gradients imply equal Adam
  runs.

A check against the untrained weights makes sure training moved them far more than the
tolerance (the comparison is not vacuous).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nequip_sus2.data.emt import write_emt_dataset

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STEPS = 3

# variables through which a launcher (torchrun, SLURM, an outer Lightning run) would make the
# child `nequip-train` join *its* process group instead of starting its own two processes
_LAUNCHER_ENV = ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _train(data: Path, run_dir: Path, batch_size: int, devices: int) -> str:
    """Run ``nequip-train``; return its combined output."""
    cmd = [
        sys.executable, "-m", "nequip.scripts.train",
        "-cp", str(CONFIGS), "-cn", "tutorial.yaml",
        f"data_file={data}", f"hydra.run.dir={run_dir}",
        "run=[train]", f"max_epochs={STEPS}",
        "training_module.model.model_dtype=float64",
        "training_module.optimizer._target_=torch.optim.SGD",
        f"data.train_dataloader.batch_size={batch_size}",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
    ]  # fmt: skip
    if devices > 1:
        cmd += [
            "trainer.accelerator=cpu",
            f"+trainer.devices={devices}",
            "+trainer.strategy._target_=nequip.train.SimpleDDPStrategy",
        ]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _LAUNCHER_ENV and not k.startswith(("SLURM_", "TORCHELASTIC_", "PL_"))
    }
    env["OMP_NUM_THREADS"] = "1"  # two ranks on a 2-core CI runner
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


def _checkpoint(run_dir: Path) -> dict:
    ckpt = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == STEPS, ckpt["global_step"]
    return ckpt


def _float_tensors(state_dict: dict) -> dict[str, torch.Tensor]:
    return {
        k: v
        for k, v in state_dict.items()
        if isinstance(v, torch.Tensor) and torch.is_floating_point(v) and v.numel()
    }


def _step_losses(run_dir: Path) -> list[float]:
    column = "train_loss_step/weighted_sum"
    metrics = next(run_dir.glob("metrics/version_*/metrics.csv"))
    with open(metrics) as f:
        return [float(row[column]) for row in csv.DictReader(f) if row.get(column)]


def _untrained_weights(ckpt: dict) -> dict[str, torch.Tensor]:
    """The model of the checkpoint's (resolved, seeded) config, before any training step."""
    from hydra.utils import get_method
    from nequip.utils.global_state import global_state_initialized, set_global_state

    if not global_state_initialized():
        set_global_state()
    config = dict(ckpt["hyper_parameters"]["info_dict"]["training_module"]["model"])
    model = get_method(config.pop("_target_"))(**config)
    return {f"model.sole_model.{k}": v for k, v in _float_tensors(model.state_dict()).items()}


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_doubled_batch(tmp_path):
    data = write_emt_dataset(tmp_path / "emt.xyz", n_structures=40, seed=5)
    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    _train(data, single_dir, batch_size=32, devices=1)
    log = _train(data, ddp_dir, batch_size=16, devices=2)

    # it really ran as two gloo processes
    assert "distributed_backend=gloo" in log, log[-4000:]
    assert "Starting with 2 processes" in log, log[-4000:]

    # the logged (rank-synced) loss of every step is that of the doubled batch
    losses_single, losses_ddp = _step_losses(single_dir), _step_losses(ddp_dir)
    assert len(losses_single) == STEPS
    assert losses_ddp == pytest.approx(losses_single, rel=1e-9, abs=0.0)
    assert losses_single[-1] < losses_single[0]

    # identical weights and EMA weights after the same optimizer steps
    single, ddp = _checkpoint(single_dir), _checkpoint(ddp_dir)
    w_single = _float_tensors(single["state_dict"])
    w_ddp = _float_tensors(ddp["state_dict"])
    assert w_single.keys() == w_ddp.keys()
    assert any(k.startswith("ema.") for k in w_single)
    for key, value in w_single.items():
        torch.testing.assert_close(w_ddp[key], value, rtol=1e-9, atol=1e-12, msg=key)

    # ... and those weights are not the initial ones: several blocks moved by >> the tolerance
    initial = _untrained_weights(single)
    assert initial.keys() <= w_single.keys()
    moved = [k for k, v in initial.items() if (w_single[k] - v).abs().max() > 1e-6]
    assert len(moved) >= 5, moved
