"""Tests of the MLIP-2 ``.cfg`` reader/writer and its ASE conversion (nequip_sus2.io.cfg)."""

from __future__ import annotations

import os
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.data import chemical_symbols
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from nequip_sus2.io.cfg import (
    MIN_CELL_MEASURE,
    VOIGT_ORDER,
    CfgFormatError,
    CfgFrame,
    cell_measure,
    iter_cfg,
    read_cfg,
    write_cfg,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "reference"
ALLOY_TRAIN = SHARED / "benchmarks" / "alloy" / "alloy_train.cfg"

ALLOY_SPECIES = (
    "Li Be Na Mg Al Si K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge Sr Y Zr Nb Mo Ru Rh Pd Ag Cd In Sn "
    "La Ce Pr Nd Sm Gd Tb Dy Ho Er Tm Lu Hf Ta W Re Os Ir Pt Au Pb"
).split()
SPECIES = {
    "alloy_sample.cfg": ALLOY_SPECIES,
    "alloy_sample_golden.cfg": ALLOY_SPECIES,
    "cathod_golden.cfg": "Li O Na Cr Mn Fe Co Ni".split(),
    "cu2se_p_golden.cfg": ["Cu", "Se"],
    "alloy_train.cfg": ALLOY_SPECIES,
}
COUNTS = {
    "alloy_sample.cfg": 200,
    "alloy_sample_golden.cfg": 200,
    "cathod_golden.cfg": 8,
    "cu2se_p_golden.cfg": 8,
    "alloy_train.cfg": 1400,
}


def _shared_file(name: str) -> Path:
    path = ALLOY_TRAIN if name == "alloy_train.cfg" else REFERENCE / name
    if not path.is_file():
        pytest.skip(f"shared fixture {path} is absent (needs the ../shared checkout)")
    return path


def assert_frames_equal(a: CfgFrame, b: CfgFrame) -> None:
    """Field-by-field exact comparison (np.array_equal), with readable failures."""
    assert np.array_equal(a.types, b.types)
    assert np.array_equal(a.positions, b.positions)
    assert (a.cell is None) == (b.cell is None)
    if a.cell is not None:
        assert np.array_equal(a.cell, b.cell)
    assert a.energy == b.energy
    for name in ("forces", "plus_stress"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert np.array_equal(x, y), name
    assert a.features == b.features
    assert np.array_equal(a._ids_or_default(), b._ids_or_default())
    assert list(a.extra_columns) == list(b.extra_columns)
    for key, values in a.extra_columns.items():
        assert np.array_equal(values, b.extra_columns[key]), key
    assert a == b


# ----------------------------------------------------------------------------------------------
# real files
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(COUNTS))
def test_read_shared_files(name: str) -> None:
    frames = read_cfg(_shared_file(name))
    assert len(frames) == COUNTS[name]
    n_species = len(SPECIES[name])
    for frame in frames:
        n = frame.n_atoms
        assert frame.positions.shape == (n, 3) and frame.positions.dtype == np.float64
        assert frame.types.dtype == np.int64 and 0 <= frame.types.min() <= frame.types.max()
        assert frame.types.max() < n_species
        assert frame.forces is not None and frame.forces.shape == (n, 3)
        assert frame.energy is not None and frame.plus_stress is not None
        assert np.array_equal(frame.ids, np.arange(1, n + 1))


def test_first_alloy_frame_values() -> None:
    frame = read_cfg(_shared_file("alloy_sample.cfg"))[0]
    assert frame.n_atoms == 21
    assert np.array_equal(np.diag(frame.cell), [4.78367856, 8.28557432, 9.55858668])
    assert frame.pbc.all()
    assert frame.types[0] == 28 and frame.types[-1] == 45
    assert np.array_equal(frame.positions[0], [2.282555, 5.010050, 1.729314])
    assert np.array_equal(frame.forces[-1], [-0.205859, 2.244255, -0.317112])
    assert frame.energy == -92.06875519
    assert np.array_equal(
        frame.plus_stress,
        [18.3945102, 9.86055708, 0.11663404, -0.36061967, 2.60284475, -0.10340308],
    )
    assert frame.features == []


@pytest.mark.parametrize("name", ["cathod_golden.cfg", "cu2se_p_golden.cfg"])
def test_non_periodic_frames(name: str) -> None:
    frames = read_cfg(_shared_file(name))
    clusters = [f for f in frames if f.cell is None]
    assert len(clusters) == 2 and all(f.n_atoms == 9 for f in clusters)
    frame = clusters[0]
    assert not frame.pbc.any() and frame.plus_stress is not None
    atoms = frame.to_atoms(SPECIES[name])
    assert not atoms.pbc.any()
    assert "stress" not in atoms.calc.results  # no volume, but the virial is kept
    assert np.array_equal(atoms.info["virial"], frame.virial)
    assert_frames_equal(CfgFrame.from_atoms(atoms, SPECIES[name]), frame)


def test_read_alloy_train_is_fast() -> None:
    path = _shared_file("alloy_train.cfg")
    start = time.perf_counter()
    frames = read_cfg(path)
    elapsed = time.perf_counter() - start
    assert len(frames) == 1400
    assert elapsed < 2.0, f"reading alloy_train.cfg took {elapsed:.2f} s"


def test_iter_cfg_streams() -> None:
    path = _shared_file("cu2se_p_golden.cfg")
    iterator = iter_cfg(path)
    first = next(iterator)
    assert_frames_equal(first, read_cfg(path)[0])
    assert sum(1 for _ in iterator) == 7


def test_read_write_read_exact(tmp_path: Path) -> None:
    frames = read_cfg(_shared_file("alloy_sample.cfg"))
    out = tmp_path / "copy.cfg"
    assert write_cfg(frames, out) == 200
    again = read_cfg(out)
    assert len(again) == len(frames)
    for a, b in zip(frames, again, strict=True):
        assert_frames_equal(a, b)
    out2 = tmp_path / "copy2.cfg"
    write_cfg(again, out2)
    assert out.read_bytes() == out2.read_bytes()  # the writer is a fixed point


@pytest.mark.parametrize("name", ["alloy_sample.cfg", "cathod_golden.cfg", "cu2se_p_golden.cfg"])
def test_cfg_atoms_cfg_exact(name: str) -> None:
    species = SPECIES[name]
    for frame in read_cfg(_shared_file(name)):
        atoms = frame.to_atoms(species)
        assert atoms.get_chemical_symbols() == [species[t] for t in frame.types]
        assert np.array_equal(atoms.pbc, frame.pbc)
        assert atoms.get_potential_energy() == frame.energy
        assert np.array_equal(atoms.get_forces(), frame.forces)
        if frame.pbc.all():
            stress = atoms.get_stress()
            np.testing.assert_allclose(
                -stress * atoms.get_volume(), frame.plus_stress, rtol=1e-12, atol=1e-12
            )
        assert_frames_equal(CfgFrame.from_atoms(atoms, species), frame)


# ----------------------------------------------------------------------------------------------
# the stress / virial convention against an independent reference (EMT finite differences)
# ----------------------------------------------------------------------------------------------


def _emt_cu() -> tuple:
    atoms = bulk("Cu", "fcc", a=3.58, cubic=True).repeat((2, 2, 1))
    rng = np.random.default_rng(7)
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + rng.uniform(-0.03, 0.03, (3, 3))), True)
    atoms.positions += rng.normal(0.0, 0.08, atoms.positions.shape)
    atoms.calc = EMT()
    return atoms


def test_plus_stress_is_minus_v_times_ase_stress_and_minus_de_dstrain() -> None:
    atoms = _emt_cu()
    stress = atoms.get_stress()  # ASE Voigt xx yy zz yz xz xy, eV/A^3
    volume = atoms.get_volume()
    frame = CfgFrame.from_atoms(atoms, ["Cu"])
    assert np.array_equal(frame.plus_stress, -volume * stress)
    assert frame.energy == atoms.get_potential_energy()

    # independent: W_ab = -dE/d(eps_ab) under a symmetric strain, by central differences
    cell0, pos0 = atoms.cell.array.copy(), atoms.positions.copy()
    probe = atoms.copy()
    probe.calc = EMT()
    h = 1e-5
    fd = np.empty(6)
    for k, (i, j) in enumerate([(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]):
        energies = []
        for sign in (1.0, -1.0):
            eps = np.zeros((3, 3))
            eps[i, j] += 0.5 * sign * h
            eps[j, i] += 0.5 * sign * h
            deform = np.eye(3) + eps
            probe.set_cell(cell0 @ deform, scale_atoms=False)
            probe.positions = pos0 @ deform
            energies.append(probe.get_potential_energy())
        # d/dh with eps_ij = eps_ji = h/2 is dE/d(eps_ij) for an off-diagonal pair
        fd[k] = -(energies[0] - energies[1]) / (2 * h)
    np.testing.assert_allclose(frame.plus_stress, fd, rtol=0, atol=1e-6)
    assert np.abs(frame.plus_stress[3:]).max() > 1e-2  # the check is not vacuous off-diagonal

    # compressing the cell gives a positive (repulsive) virial
    squeezed = atoms.copy()
    squeezed.set_cell(cell0 * 0.95, scale_atoms=True)
    squeezed.calc = EMT()
    squeezed.get_stress()  # from_atoms reads results, it never computes
    assert CfgFrame.from_atoms(squeezed, ["Cu"]).plus_stress[:3].min() > 0

    # and back: to_atoms gives ASE's stress and the virial
    back = frame.to_atoms(["Cu"])
    np.testing.assert_allclose(back.get_stress(), stress, rtol=1e-13, atol=1e-15)
    np.testing.assert_array_equal(back.info["virial"], frame.virial)
    assert VOIGT_ORDER == ("xx", "yy", "zz", "yz", "xz", "xy")


# ----------------------------------------------------------------------------------------------
# hand-written files: layout variants
# ----------------------------------------------------------------------------------------------

VARIANT = """\
BEGIN_CFG
 Size
\t3\t
 SuperCell
   5.0 0 0
   0 0 0
   0 0 6.5
AtomData:   id  type cartes_x cartes_y cartes_z  nbh_grades fx fy fz
  7 2 0.1 0.2 0.3  1.5 1e-3 -2E+1 0
  8 0 1.1 1.2 1.3  0.0 0 0 0
  9 1 2.1 2.2 2.3  2.5 0 0 0

 PlusStress: xy xx yy zz yz xz
\t6 1 2 3 4 5~~~
 Feature EFS_by  VASP   PBE~~
 Feature from md
 Feature EFS_by again
END_CFG
BEGIN_CFG
 Size
 1
 AtomData: id type cartes_z cartes_y cartes_x
 1 0 3 2 1
END_CFG
""".replace("~", " ")  # "~" marks trailing blanks


def test_layout_variants(tmp_path: Path) -> None:
    path = tmp_path / "variant.cfg"
    path.write_text(VARIANT)
    first, second = read_cfg(path)
    assert np.array_equal(first.ids, [7, 8, 9]) and np.array_equal(first.types, [2, 0, 1])
    assert np.array_equal(first.pbc, [True, False, True])
    assert np.array_equal(first.cell, [[5, 0, 0], [0, 0, 0], [0, 0, 6.5]])
    assert np.array_equal(first.forces[0], [1e-3, -20.0, 0.0])
    assert first.energy is None
    assert np.array_equal(first.plus_stress, [1, 2, 3, 4, 5, 6])  # reordered by header names
    assert list(first.extra_columns) == ["nbh_grades"]
    assert np.array_equal(first.extra_columns["nbh_grades"], [1.5, 0.0, 2.5])
    assert first.features == [("EFS_by", "VASP   PBE"), ("from", "md"), ("EFS_by", "again")]
    assert second.cell is None and second.forces is None and second.plus_stress is None
    assert np.array_equal(second.positions, [[1.0, 2.0, 3.0]])

    out = tmp_path / "out.cfg"
    write_cfg([first, second], out)
    for a, b in zip([first, second], read_cfg(out), strict=True):
        assert_frames_equal(a, b)

    atoms = first.to_atoms(["Cu", "Ag", "Au"])
    assert atoms.info["EFS_by"] == ["VASP   PBE", "again"] and atoms.info["from"] == "md"
    assert np.array_equal(atoms.pbc, [True, False, True])
    assert "stress" not in atoms.calc.results
    assert np.array_equal(atoms.arrays["cfg_id"], [7, 8, 9])
    back = CfgFrame.from_atoms(atoms, ["Cu", "Ag", "Au"])
    # documented: repeated feature keys come back grouped by key
    assert back.features == [("EFS_by", "VASP   PBE"), ("EFS_by", "again"), ("from", "md")]
    back.features = first.features
    assert_frames_equal(back, first)


def test_all_zero_supercell_is_a_cluster(tmp_path: Path) -> None:
    path = tmp_path / "zero.cfg"
    path.write_text(
        "BEGIN_CFG\n Size\n 1\n Supercell\n 0 0 0\n 0 0 0\n 0 0 0\n"
        " AtomData: id type cartes_x cartes_y cartes_z\n 1 0 0 0 0\nEND_CFG\n"
    )
    (frame,) = read_cfg(path)
    assert frame.cell is None


def test_from_atoms_general_atoms() -> None:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.info.update(config_type="fcc", note="two words", weight=2.0, multi="a\nb", pad=" x")
    atoms.pbc = [True, True, False]
    frame = CfgFrame.from_atoms(atoms, ["Ag", "Cu"])
    assert np.array_equal(frame.types, [1, 1, 1, 1])
    assert np.array_equal(frame.cell[2], [0, 0, 0]) and frame.cell[0, 0] == 3.6
    assert frame.energy is None and frame.forces is None and frame.plus_stress is None
    assert frame.features == [("config_type", "fcc"), ("note", "two words")]
    with pytest.raises(ValueError, match="not in type_names"):
        CfgFrame.from_atoms(atoms, ["Ag"])
    with pytest.raises(ValueError, match="type index"):
        frame.to_atoms(["Cu"])


# ----------------------------------------------------------------------------------------------
# property-based round trips
# ----------------------------------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
moderate = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
token = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Zs")),
    min_size=1,
    max_size=8,
)
feature_value = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=12
).map(str.strip)
column_name = st.from_regex(r"[a-z][a-z0-9_]{0,7}", fullmatch=True).filter(
    lambda s: s not in {"id", "type", "cartes_x", "cartes_y", "cartes_z", "fx", "fy", "fz"}
)


@st.composite
def cfg_frames(draw: st.DrawFn, floats: st.SearchStrategy[float] = finite) -> CfgFrame:
    n = draw(st.integers(0, 9))

    def array(shape: tuple[int, ...]) -> np.ndarray:
        values = draw(st.lists(floats, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
        return np.array(values, dtype=np.float64).reshape(shape)

    cell = None
    if draw(st.booleans()):
        periodic = draw(st.lists(st.booleans(), min_size=3, max_size=3).filter(any))
        cell = np.zeros((3, 3))
        for i, flag in enumerate(periodic):
            if flag:
                cell[i] = draw(st.lists(floats, min_size=3, max_size=3).filter(any))
        # singular periodic cells are refused (MIN_CELL_MEASURE); keep the regular ones
        assume(not cell_measure(cell, np.array(periodic)) < MIN_CELL_MEASURE)
    extra_names = draw(st.lists(column_name, max_size=2, unique=True))
    return CfgFrame(
        types=np.array(draw(st.lists(st.integers(0, 60), min_size=n, max_size=n)), dtype=int),
        positions=array((n, 3)),
        cell=cell,
        energy=draw(st.none() | floats),
        forces=array((n, 3)) if draw(st.booleans()) else None,
        plus_stress=array((6,)) if draw(st.booleans()) else None,
        features=draw(st.lists(st.tuples(token, feature_value), max_size=4)),
        ids=draw(
            st.none()
            | st.lists(st.integers(-(10**12), 10**12), min_size=n, max_size=n).map(np.array)
        ),
        extra_columns={name: array((n,)) for name in extra_names},
    )


@settings(max_examples=150, deadline=None)
@given(frames=st.lists(cfg_frames(), max_size=4))
def test_property_write_read_round_trip(frames: list[CfgFrame]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random.cfg"
        assert write_cfg(frames, path) == len(frames)
        again = read_cfg(path)
    assert len(again) == len(frames)
    for a, b in zip(frames, again, strict=True):
        assert_frames_equal(a, b)


TYPE_NAMES = chemical_symbols[1:62]


@settings(max_examples=100, deadline=None)
@given(frame=cfg_frames(floats=moderate))
def test_property_atoms_round_trip(frame: CfgFrame) -> None:
    frame.features = [(k, v) for k, v in dict(frame.features).items() if k != "virial"]
    atoms = frame.to_atoms(TYPE_NAMES)
    assert_frames_equal(CfgFrame.from_atoms(atoms, TYPE_NAMES), frame)


# ----------------------------------------------------------------------------------------------
# malformed input
# ----------------------------------------------------------------------------------------------

GOOD = [
    "BEGIN_CFG",  # 1
    " Size",  # 2
    "    2",  # 3
    " Supercell",  # 4
    "    3.0 0.0 0.0",  # 5
    "    0.0 3.0 0.0",  # 6
    "    0.0 0.0 3.0",  # 7
    " AtomData:  id type cartes_x cartes_y cartes_z fx fy fz",  # 8
    "    1 0 0.0 0.0 0.0 0.1 0.2 0.3",  # 9
    "    2 1 1.5 1.5 1.5 -0.1 -0.2 -0.3",  # 10
    " Energy",  # 11
    "    -3.5",  # 12
    " PlusStress:  xx yy zz yz xz xy",  # 13
    "    1 2 3 4 5 6",  # 14
    " Feature from test",  # 15
    "END_CFG",  # 16
]


def _edit(**changes: str | None) -> list[str]:
    """GOOD with line ``l<k>`` replaced (``None`` deletes it)."""
    lines = list(GOOD)
    for key, value in sorted(changes.items(), key=lambda kv: -int(kv[0][1:])):
        k = int(key[1:]) - 1
        if value is None:
            del lines[k]
        else:
            lines[k] = value
    return lines


MALFORMED = {
    "truncated": (GOOD[:9], 9, "END_CFG"),
    "missing END_CFG": (GOOD[:15] + GOOD, 16, "END_CFG"),
    "Size too large": (_edit(l3="    3"), 8, "Size"),
    "Size too small": (_edit(l3="    1"), 8, "Size"),
    "Size not an integer": (_edit(l3="    two"), 3, "Size"),
    "Size missing": (_edit(l2=None, l3=None), 14, "Size"),
    "AtomData missing": (GOOD[:7] + GOOD[10:], 13, "AtomData"),
    "short row": (_edit(l10="    2 1 1.5 1.5 1.5 -0.1 -0.2"), 10, "AtomData"),
    "long row": (_edit(l9="    1 0 0.0 0.0 0.0 0.1 0.2 0.3 9"), 9, "AtomData"),
    "missing id column": (
        _edit(l8=" AtomData: type cartes_x cartes_y cartes_z fx fy fz"),
        8,
        "id",
    ),
    "missing cartes_y column": (
        _edit(l8=" AtomData:  id type cartes_x cartes_z fx fy fz"),
        8,
        "cartes_y",
    ),
    "partial forces": (
        _edit(l8=" AtomData:  id type cartes_x cartes_y cartes_z fx fy ff"),
        8,
        "fz",
    ),
    "duplicate column": (
        _edit(l8=" AtomData:  id type cartes_x cartes_y cartes_z fx fy fx"),
        8,
        "fx",
    ),
    "non-numeric position": (_edit(l9="    1 0 0.0 abc 0.0 0.1 0.2 0.3"), 9, "cartes_y"),
    "non-numeric force": (_edit(l10="    2 1 1.5 1.5 1.5 -0.1 x -0.3"), 10, "fy"),
    "fractional type": (_edit(l10="    2 1.5 1.5 1.5 1.5 -0.1 -0.2 -0.3"), 10, "type"),
    "negative type": (_edit(l10="    2 -1 1.5 1.5 1.5 -0.1 -0.2 -0.3"), 10, "type"),
    "non-numeric id": (_edit(l9="    1a 0 0.0 0.0 0.0 0.1 0.2 0.3"), 9, "id"),
    "non-numeric energy": (_edit(l12="    -3.5eV"), 12, "Energy"),
    "energy value missing": (_edit(l12=None), 11, "Energy"),
    "energy two values": (_edit(l12="    -3.5 1"), 12, "Energy"),
    "non-numeric cell": (_edit(l6="    0.0 3,0 0.0"), 6, "Supercell"),
    "cell row of 2": (_edit(l6="    0.0 3.0"), 6, "Supercell"),
    "cell of 4 rows": (GOOD[:7] + ["    1 1 1"] + GOOD[7:], 4, "Supercell"),
    "PlusStress 5 values": (_edit(l14="    1 2 3 4 5"), 14, "PlusStress"),
    "PlusStress 7 values": (_edit(l14="    1 2 3 4 5 6 7"), 14, "PlusStress"),
    "PlusStress non-numeric": (_edit(l14="    1 2 3 4 five 6"), 14, "PlusStress"),
    "PlusStress bad header": (_edit(l13=" PlusStress:  xx yy zz yz xz zx"), 13, "PlusStress"),
    "unknown keyword": (_edit(l13=" Stresses:  xx yy zz yz xz xy"), 13, "Stresses"),
    "unknown keyword 2": (_edit(l11=" EnergyWeight"), 11, "EnergyWeight"),
    "duplicate Energy": (GOOD[:12] + [" Energy", "  1.0"] + GOOD[12:], 13, "Energy"),
    "Feature without key": (_edit(l15=" Feature"), 15, "Feature"),
    "stray numbers": (GOOD[:14] + ["   7 8 9"] + GOOD[14:], 15, "section"),
    "text before BEGIN_CFG": (["hello"] + GOOD, 1, "BEGIN_CFG"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_input(case: str, tmp_path: Path) -> None:
    lines, lineno, field = MALFORMED[case]
    path = tmp_path / "broken.cfg"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CfgFormatError) as info:
        read_cfg(path)
    err = info.value
    message = str(err)
    assert isinstance(err, ValueError)
    assert message.startswith(f"{path}:{lineno}: "), message
    assert "broken.cfg" in message
    assert err.lineno == lineno and err.field == field, (err.lineno, err.field, message)
    assert field in message
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == message and again.lineno == lineno


def test_good_template_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "good.cfg"
    path.write_text("\n".join(GOOD) + "\n")
    (frame,) = read_cfg(path)
    assert frame.features == [("from", "test")] and frame.energy == -3.5


def test_row_message_names_columns(tmp_path: Path) -> None:
    path = tmp_path / "alloy.cfg"
    path.write_text("\n".join(MALFORMED["short row"][0]) + "\n")
    with pytest.raises(CfgFormatError, match="AtomData row has 7 columns, expected 8 "):
        read_cfg(path)
    with pytest.raises(CfgFormatError, match=r"\(id type cartes_x cartes_y cartes_z fx fy fz\)"):
        read_cfg(path)


# ----------------------------------------------------------------------------------------------
# atomic writing
# ----------------------------------------------------------------------------------------------


def _frame(n: int = 2) -> CfgFrame:
    return CfgFrame(types=np.zeros(n, dtype=int), positions=np.arange(3.0 * n).reshape(n, 3))


def test_write_failure_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "out.cfg"

    def frames():
        yield _frame()
        yield _frame()
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_cfg(frames(), target)
    assert not target.exists()
    assert os.listdir(tmp_path) == []

    # an invalid frame (mutated after construction) fails cleanly too, old content survives
    write_cfg([_frame()], target)
    before = target.read_bytes()
    bad = _frame()
    bad.positions = np.zeros((5, 3))
    with pytest.raises(ValueError, match="frame 1"):
        write_cfg([_frame(3), bad], target)
    bad = _frame()
    bad.features = [("two words", "x")]
    with pytest.raises(ValueError, match="Feature key"):
        write_cfg([bad], target)
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["out.cfg"]


def test_frame_validation() -> None:
    with pytest.raises(ValueError, match="positions"):
        CfgFrame(types=[0, 1], positions=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="integers"):
        CfgFrame(types=[0.5], positions=np.zeros((1, 3)))
    with pytest.raises(ValueError, match="plus_stress"):
        CfgFrame(types=[0], positions=np.zeros((1, 3)), plus_stress=np.zeros(5))
    with pytest.raises(ValueError, match="Feature"):
        CfgFrame(types=[0], positions=np.zeros((1, 3)), features={"k": "line\nbreak"})
    frame = CfgFrame(types=[0], positions=np.zeros((1, 3)), features={"k": "v"})
    assert frame.features == [("k", "v")] and frame.types.dtype == np.int64
