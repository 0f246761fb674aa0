"""Tests of the offline EMT alloy data set (nequip_sus2.data.emt)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.emt import EMT
from ase.io import read
from ase.neighborlist import neighbor_list

from nequip_sus2.data.emt import (
    CONFIG_TYPES,
    ELEMENTS,
    MAX_FORCE,
    MIN_DISTANCE,
    dataset_summary,
    generate_emt_dataset,
    generate_structure,
    main,
    write_emt_dataset,
)
from nequip_sus2.io.cfg import CfgFrame

N = 40  # four passes over the kind schedule; every element is the "primary" one several times


@pytest.fixture(scope="module")
def dataset() -> list[Atoms]:
    return generate_emt_dataset(N, seed=0)


def _same(a: Atoms, b: Atoms) -> bool:
    return (
        a.get_chemical_symbols() == b.get_chemical_symbols()
        and np.array_equal(a.positions, b.positions)
        and np.array_equal(a.cell.array, b.cell.array)
        and np.array_equal(a.pbc, b.pbc)
        and a.get_potential_energy() == b.get_potential_energy()
        and np.array_equal(a.get_forces(), b.get_forces())
        and np.array_equal(a.get_stress(), b.get_stress())
        and a.info == b.info
    )


def test_deterministic(dataset: list[Atoms]) -> None:
    again = generate_emt_dataset(N, seed=0)
    assert all(_same(a, b) for a, b in zip(dataset, again, strict=True))
    # structure i depends only on (seed, i): smaller sets are prefixes
    assert _same(generate_structure(13, seed=0), dataset[13])
    other = generate_emt_dataset(10, seed=1)
    assert not all(_same(a, b) for a, b in zip(dataset[:10], other, strict=True))


def test_kinds_and_elements_present(dataset: list[Atoms]) -> None:
    kinds = {a.info["config_type"] for a in dataset}
    assert kinds == set(CONFIG_TYPES)
    assert set(CONFIG_TYPES) >= {"fcc", "bcc", "strained", "rattled", "liquid", "vacancy"}
    assert {"surface_111", "surface_100"} <= kinds
    symbols = {s for a in dataset for s in a.get_chemical_symbols()}
    assert symbols == set(ELEMENTS) == {"Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al"}
    assert any(len(set(a.get_chemical_symbols())) >= 3 for a in dataset)  # real alloys


def test_physically_sane(dataset: list[Atoms]) -> None:
    for atoms in dataset:
        kind = atoms.info["config_type"]
        assert 8 <= len(atoms) <= 40, kind
        assert atoms.pbc.all() and atoms.get_volume() > 0
        d = neighbor_list("d", atoms, 3.0)
        assert d.min() >= MIN_DISTANCE, (kind, d.min())
        forces = atoms.get_forces()
        assert forces.shape == (len(atoms), 3) and np.isfinite(forces).all()
        assert np.abs(forces).max() <= MAX_FORCE <= 20.0, kind
        energy_per_atom = atoms.get_potential_energy() / len(atoms)
        assert -1.0 < energy_per_atom < 2.0, (kind, energy_per_atom)  # EMT zero = fcc bulk
        stress = atoms.get_stress()
        assert stress.shape == (6,) and np.isfinite(stress).all()
        assert np.abs(stress).max() < 1.0  # eV/A^3 (160 GPa)
        if kind == "liquid":
            assert d.min() >= 2.0
        if kind.startswith("surface"):
            z = atoms.positions[:, 2]
            assert atoms.cell[2, 2] - (z.max() - z.min()) > 9.0  # vacuum gap
    strained = [a for a in dataset if a.info["config_type"] == "strained"]
    assert strained and all(a.cell.get_bravais_lattice().name == "TRI" for a in strained)


def test_labels_are_emt(dataset: list[Atoms]) -> None:
    for atoms in dataset[:10]:
        fresh = atoms.copy()
        fresh.calc = EMT()
        np.testing.assert_allclose(fresh.get_potential_energy(), atoms.get_potential_energy())
        np.testing.assert_allclose(fresh.get_forces(), atoms.get_forces(), atol=1e-12)
        np.testing.assert_allclose(fresh.get_stress(), atoms.get_stress(), atol=1e-12)


def test_cfg_export_uses_virial_convention(dataset: list[Atoms]) -> None:
    atoms = dataset[2]
    frame = CfgFrame.from_atoms(atoms, ELEMENTS)
    assert np.array_equal(frame.plus_stress, -atoms.get_volume() * atoms.get_stress())
    assert ("config_type", atoms.info["config_type"]) in frame.features


def test_write_and_cli(tmp_path: Path, dataset: list[Atoms], capsys) -> None:
    out = write_emt_dataset(tmp_path / "sub" / "emt.xyz", n_structures=12, seed=0)
    assert sorted(p.name for p in out.parent.iterdir()) == ["emt.xyz"]  # no temp leftovers
    back = read(out, index=":")
    assert len(back) == 12
    for a, b in zip(dataset[:12], back, strict=True):
        assert a.get_chemical_symbols() == b.get_chemical_symbols()
        assert b.info["config_type"] == a.info["config_type"]
        np.testing.assert_allclose(b.positions, a.positions, atol=1e-6)
        np.testing.assert_allclose(b.get_potential_energy(), a.get_potential_energy(), rtol=1e-8)
        np.testing.assert_allclose(b.get_forces(), a.get_forces(), atol=1e-6)
        np.testing.assert_allclose(b.get_stress(), a.get_stress(), atol=1e-8)

    main(["--out", str(tmp_path / "cli.xyz"), "--n", "10", "--seed", "0"])
    text = capsys.readouterr().out
    assert "wrote 10 EMT structures" in text and str(tmp_path / "cli.xyz") in text
    assert "liquid 1" in text and "Cu " in text
    assert dataset_summary(dataset[:10]).splitlines()[1] in text


def test_module_entry_point(tmp_path: Path) -> None:
    target = tmp_path / "m.xyz"
    result = subprocess.run(
        [sys.executable, "-m", "nequip_sus2.data.emt", "--out", str(target), "--n", "3"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert "wrote 3 EMT structures" in result.stdout
    assert len(read(target, index=":")) == 3


def test_bad_size() -> None:
    with pytest.raises(ValueError):
        generate_emt_dataset(-1)
    assert generate_emt_dataset(0) == []
