"""``nequip-train`` trains a SUS2 model from the tutorial config on EMT alloy data."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
from _helpers import run_ok

from nequip_sus2.data.emt import write_emt_dataset

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _epoch_series(metrics_csv: Path, column: str) -> list[float]:
    with open(metrics_csv) as f:
        rows = [r for r in csv.DictReader(f) if r.get(column)]
    return [float(r[column]) for r in rows]


@pytest.mark.slow
def test_tutorial_config_trains(tmp_path):
    data = write_emt_dataset(tmp_path / "emt.xyz", n_structures=80, seed=3)
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "nequip.scripts.train",
        "-cp", str(CONFIGS), "-cn", "tutorial.yaml",
        f"data_file={data}", "max_epochs=6", f"hydra.run.dir={run_dir}",
        "trainer.enable_progress_bar=false",
    ]  # fmt: skip
    run_ok(cmd)
    metrics = next(run_dir.glob("metrics/version_*/metrics.csv"))
    val = _epoch_series(metrics, "val0_epoch/weighted_sum")
    train = _epoch_series(metrics, "train_loss_epoch/weighted_sum")
    forces = _epoch_series(metrics, "val0_epoch/forces_mae")
    assert len(val) == 6 and len(train) == 6
    assert val[-1] < 0.7 * val[0], val
    assert train[-1] < 0.7 * train[0], train
    assert forces[-1] < forces[0], forces
    assert (run_dir / "best.ckpt").exists()
    test = _epoch_series(metrics, "test0_epoch/forces_mae")
    assert len(test) == 1 and test[0] < forces[0]
