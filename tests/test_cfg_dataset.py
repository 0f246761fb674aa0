"""``.cfg`` files as NequIP data sets (nequip_sus2.data.cfg_dataset) and in ``nequip-train``.

The labels must be exactly those of NequIP's own ASE path (``nequip.data.from_ase`` on
``CfgFrame.to_atoms`` plus ``ChemicalSpeciesToAtomTypeMapper``), and the stress sign/volume
convention is checked against the published model's own predictions (the golden labels).
"""

from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import build, predict, run_ok
from conftest import SHARED, require_reference
from nequip.data import AtomicDataDict, from_ase
from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform

from nequip_sus2.data.cfg_dataset import CfgDataModule, CfgDataset
from nequip_sus2.io.cfg import CfgFormatError, CfgFrame, read_cfg, write_cfg
from nequip_sus2.model import SUS2FromMTP

ALLOY = (
    "Li Be Na Mg Al Si K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge Sr Y Zr Nb Mo Ru Rh Pd Ag Cd In Sn "
    "La Ce Pr Nd Sm Gd Tb Dy Ho Er Tm Lu Hf Ta W Re Os Ir Pt Au Pb"
).split()
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALLOY_TRAIN = SHARED / "benchmarks" / "alloy" / "alloy_train.cfg"


def _alloy_train() -> Path:
    if not ALLOY_TRAIN.is_file():
        pytest.skip(f"shared fixture {ALLOY_TRAIN} is absent (needs ../shared)")
    return ALLOY_TRAIN


def _ase_path(frame: CfgFrame, names: list[str]) -> AtomicDataDict.Type:
    """NequIP's ASE route for the same frame (the reference the data set must equal)."""
    data = from_ase(frame.to_atoms(names))
    mapper = ChemicalSpeciesToAtomTypeMapper(
        model_type_names=names, chemical_species_to_atom_type_map={n: n for n in names}
    )
    return mapper(data)


def test_labels_equal_nequip_ase_path():
    path = require_reference("alloy_sample.cfg")
    dataset = CfgDataset(str(path), ALLOY)
    frames = read_cfg(path)
    assert len(dataset) == len(frames) == 200
    for index in range(0, 200, 7):
        ours, ref = dataset[index], _ase_path(frames[index], ALLOY)
        for key in ("pos", "cell", "pbc", "atom_types", "total_energy", "forces", "stress"):
            assert ours[key].dtype == ref[key].dtype, key
            assert ours[key].shape == ref[key].shape, key
            assert torch.equal(ours[key], ref[key]), key
        assert torch.equal(ours["atomic_numbers"], ref["atomic_numbers"])


def test_stress_sign_and_volume_against_the_published_model():
    """The model's ``stress`` and ``virial`` outputs on CfgDataset items equal the data set's
    labels: the golden labels are the published model's own predictions (docs/theory.md §5)."""
    path = require_reference("alloy_sample_golden.cfg")
    model = build(SUS2FromMTP, mtp_path=str(require_reference("alloy.mtp")), type_names=ALLOY)
    dataset = CfgDataset(
        str(path),
        ALLOY,
        transforms=[NeighborListTransform(r_max=float(model.metadata["r_max"]))],
        include_virial=True,
    )
    frames = read_cfg(path)
    for index in (0, 50, 123):
        data = dataset[index]
        volume = abs(np.linalg.det(frames[index].cell))
        np.testing.assert_array_equal(
            data["stress"][0].numpy(), -frames[index].virial / volume
        )  # independent: stress = -PlusStress / V
        np.testing.assert_array_equal(data["virial"][0].numpy(), frames[index].virial)
        out = model(AtomicDataDict.batched_from_list([data]))
        w = out["virial"].detach()
        s = out["stress"].detach()
        assert torch.allclose(w, data["virial"], rtol=0, atol=1e-7)
        assert torch.allclose(s, data["stress"], rtol=0, atol=1e-7 / volume)


def _frames(tmp_path: Path, frames: list[CfgFrame], name: str = "d.cfg") -> str:
    path = tmp_path / name
    write_cfg(frames, path)
    return str(path)


def _frame(n=2, periodic=True, **kw) -> CfgFrame:
    rng = np.random.default_rng(n)
    base = {
        "types": np.arange(n) % 2,
        "positions": rng.uniform(0, 3, (n, 3)),
        "cell": np.diag([4.0, 5.0, 6.0]) if periodic else None,
        "energy": -1.0 * n,
        "forces": rng.normal(size=(n, 3)),
        "plus_stress": rng.normal(size=6),
    }
    base.update(kw)
    return CfgFrame(**base)


def test_mixed_periodicity(tmp_path, caplog):
    path = _frames(tmp_path, [_frame(3), _frame(2, periodic=False)])
    with caplog.at_level(logging.WARNING):
        dataset = CfgDataset(path, ["Cu", "Se"])
    assert "stress" not in dataset[0] and "stress" not in dataset[1]
    assert "1 of 2 configurations have no stress" in caplog.text
    virial = CfgDataset(path, ["Cu", "Se"], include_virial=True)
    assert torch.equal(virial[1]["virial"][0], torch.from_numpy(read_cfg(path)[1].virial))
    with pytest.raises(CfgFormatError, match=r"d\.cfg:\d+: .*is not periodic") as info:
        CfgDataset(path, ["Cu", "Se"], include_stress=True)
    second_begin = Path(path).read_text().splitlines().index("BEGIN_CFG", 1) + 1
    assert info.value.lineno == second_begin and info.value.field == "PlusStress"
    assert (
        "stress"
        not in CfgDataset(_frames(tmp_path, [_frame(3)]), ["Cu", "Se"], include_stress=False)[0]
    )


def test_errors_name_file_line_and_field(tmp_path):
    path = _frames(tmp_path, [_frame(2), _frame(3, types=[0, 1, 2])])
    with pytest.raises(CfgFormatError) as info:
        CfgDataset(path, ["Cu", "Se"])
    msg = str(info.value)
    assert msg.startswith(f"{path}:"), msg
    assert info.value.field == "type" and "out of range" in msg
    # the third atom row of the second configuration
    assert Path(path).read_text().splitlines()[info.value.lineno - 1].split()[1] == "2"

    path = _frames(tmp_path, [_frame(2), _frame(3, energy=None)], "e.cfg")
    with pytest.raises(CfgFormatError, match=r"e\.cfg:\d+: Energy is missing") as info:
        CfgDataset(path, ["Cu", "Se"])
    assert info.value.field == "Energy"

    path = _frames(tmp_path, [_frame(2, plus_stress=None)], "v.cfg")
    with pytest.raises(CfgFormatError, match=r"v\.cfg:1: virial labels were requested"):
        CfgDataset(path, ["Cu", "Se"], include_virial=True)

    bad = tmp_path / "m.cfg"
    bad.write_text(Path(_frames(tmp_path, [_frame(2)])).read_text().replace(" cartes_y", ""))
    with pytest.raises(CfgFormatError, match=r"m\.cfg:\d+: AtomData is missing .*cartes_y"):
        CfgDataset(str(bad), ["Cu", "Se"])


def test_non_symbol_type_names_and_no_labels(tmp_path):
    path = _frames(tmp_path, [_frame(2, energy=None, forces=None, plus_stress=None)])
    data = CfgDataset(path, ["A1", "B2"])[0]
    assert "atomic_numbers" not in data
    assert not {"total_energy", "forces", "stress"} & set(data)
    assert torch.equal(data["atom_types"], torch.tensor([0, 1]))


def test_plugs_into_nequip_datamodules(tmp_path):
    path = str(require_reference("cu2se_p_golden.cfg"))
    transforms = [NeighborListTransform(r_max=6.5)]
    loader = {"_target_": "torch.utils.data.DataLoader", "batch_size": 3}
    generic = {
        "_target_": "nequip.data.datamodule.NequIPDataModule",
        "seed": 3,
        "split_dataset": {
            "dataset": {
                "_target_": "nequip_sus2.data.cfg_dataset.CfgDataset",
                "file_path": path,
                "type_names": ["Cu", "Se"],
                "transforms": transforms,
                "include_virial": True,
            },
            "train": 6,
            "val": 2,
        },
        "train_dataloader": loader,
    }
    from hydra.utils import instantiate

    modules = [
        instantiate(generic, _recursive_=False),
        CfgDataModule(
            seed=3,
            type_names=["Cu", "Se"],
            split_dataset={"file_path": path, "train": 6, "val": 2},
            transforms=transforms,
            include_virial=True,
            train_dataloader=loader,
        ),
    ]
    batches = []
    for dm in modules:
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        assert AtomicDataDict.num_frames(batch) == 3
        assert {"virial", "total_energy", "forces", "edge_index"} <= set(batch)
        assert "stress" not in batch  # the golden set mixes clusters and cells
        batches.append(batch)
    # same split, same seed: the two routes give the same data
    assert torch.equal(batches[0]["total_energy"], batches[1]["total_energy"])


def _epoch_series(metrics_csv: Path, column: str) -> list[float]:
    with open(metrics_csv) as f:
        return [float(r[column]) for r in csv.DictReader(f) if r.get(column)]


@pytest.mark.slow
def test_train_config_reads_cfg_directly(tmp_path):
    """configs/alloy_cfg_direct.yaml trains a new SUS2 model straight from alloy_train.cfg."""
    from nequip_sus2.io.cfg import iter_cfg

    frames = iter_cfg(_alloy_train())
    data = tmp_path / "alloy_64.cfg"  # the first 64 structures, to keep the run short
    write_cfg((next(frames) for _ in range(64)), data)
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "nequip.scripts.train",
        "-cp", str(CONFIGS), "-cn", "alloy_cfg_direct.yaml",
        f"data_file={data}", "max_epochs=4", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    run_ok(cmd)
    metrics = next(run_dir.glob("metrics/version_*/metrics.csv"))
    train = _epoch_series(metrics, "train_loss_epoch/weighted_sum")
    val = _epoch_series(metrics, "val0_epoch/weighted_sum")
    assert len(train) == 4 and len(val) == 4
    assert train[-1] < train[0], train
    assert val[-1] < val[0], val
    assert (run_dir / "last.ckpt").exists()

    # the trained (published-basis, float32) model goes to .mtp and back unchanged
    from nequip_sus2.cli import main
    from nequip_sus2.package import load_model

    mtp = tmp_path / "new.mtp"
    assert main(["export-mtp", str(run_dir / "last.ckpt"), "-o", str(mtp)]) == 0
    trained = load_model(run_dir / "last.ckpt")
    again = build(SUS2FromMTP, mtp_path=str(mtp), type_names=ALLOY)
    for frame in read_cfg(data)[:4]:
        a = predict(trained, frame.types, frame.positions, frame.cell)
        b = predict(again, frame.types, frame.positions, frame.cell)
        np.testing.assert_allclose(b["energy"], a["energy"], rtol=1e-5)
        np.testing.assert_allclose(b["forces"], a["forces"], rtol=0, atol=1e-4)
