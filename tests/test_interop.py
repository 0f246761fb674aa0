"""Python API of .mtp import/export, NequIP packages and .cfg <-> extxyz conversion.

References are independent of the code under test: the published ``.mtp`` bytes, the golden
predictions of the published models, NequIP's own loaders (``ModelFromPackage``,
``nequip-package info``, the ASE calculator), models evaluated before export, and ASE's extxyz
reader.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _helpers import build, predict
from conftest import GOLDEN, SHARED, SPECIES, require_reference
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from nequip_sus2.errors import InteropError
from nequip_sus2.io.cfg import MIN_CELL_MEASURE, CfgFrame, cell_measure, read_cfg, write_cfg
from nequip_sus2.io.convert import _RESERVED_INFO, cfg_to_extxyz, extxyz_to_cfg
from nequip_sus2.io.mtp import format_mtp, read_mtp, write_mtp
from nequip_sus2.io.mtp_model import export_mtp, import_mtp, import_mtp_to_package, model_to_mtp
from nequip_sus2.io.species import read_type_names
from nequip_sus2.model import SUS2FromMTP, SUS2Model
from nequip_sus2.package import example_data, write_package
from nequip_sus2.program import generate_program


def published(name: str) -> tuple[Path, str]:
    path = require_reference(f"{name}.mtp")
    return path, path.read_text()


# ----------------------------------------------------------------------------------------------
# import -> export
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SPECIES))
def test_import_export_is_byte_exact(name, tmp_path):
    path, text = published(name)
    model = import_mtp(path, SPECIES[name])
    assert format_mtp(model_to_mtp(model)) == text.rstrip("\n")
    assert export_mtp(model, tmp_path / "out.mtp") == SPECIES[name]
    # the original writer's layout: no final newline
    assert (tmp_path / "out.mtp").read_bytes() == text.rstrip("\n").encode()


def test_export_after_changing_parameters():
    """Changed blocks are written from the model; b = (b + s) - s only where b + s changed."""
    path, text = published("alloy")
    mtp = read_mtp(path)
    model = import_mtp(path, SPECIES["alloy"])
    shifts = model.model.func.per_type_energy_scale_shift.shifts
    theta = model.model.func.readout.theta
    with torch.no_grad():
        shifts[3] += 0.25
        theta[7] *= 2.0
    out = model_to_mtp(model)
    s = np.array(mtp.species_coeffs)
    b = np.array(mtp.shift_coeffs)
    expected_b = b.copy()
    expected_b[3] = (b[3] + s[3] + 0.25) - s[3]
    assert out.shift_coeffs == expected_b.tolist()
    assert out.moment_coeffs[7] == 2.0 * mtp.moment_coeffs[7]
    assert out.moment_coeffs[:7] == mtp.moment_coeffs[:7]
    assert out.scal_coeffs == mtp.scal_coeffs and out.radial_coeffs == mtp.radial_coeffs


def test_export_without_recorded_file_info():
    """Without the file's header info (only the program is recorded, on the contraction
    module) the export still holds the model: header defaults, values equal (b up to rounding);
    without the program, refused."""
    path, _ = published("alloy")
    mtp = read_mtp(path)
    model = import_mtp(path, SPECIES["alloy"])
    moments = model.model.func.moments
    assert moments.mtp_info["potential_name"] == mtp.potential_name  # what is dropped here
    moments.mtp_info = {}
    with pytest.warns(UserWarning, match="min_dist"):
        out = model_to_mtp(model)
    assert out.program == mtp.program
    assert out.sigma == mtp.sigma and out.potential_name is None
    assert out.scal_coeffs == mtp.scal_coeffs and out.moment_coeffs == mtp.moment_coeffs
    np.testing.assert_allclose(out.shift_coeffs, mtp.shift_coeffs, rtol=1e-15, atol=0)
    del moments.program
    with pytest.raises(InteropError, match="does not record its contraction program"):
        model_to_mtp(model)


def _perturb(model, seed: int) -> None:
    """Random, non-trivial parameters (alpha, r0, c, w, theta, s, b) for export tests."""
    g = torch.Generator().manual_seed(seed)
    f = model.model.func
    with torch.no_grad():
        for p in (f.scaling.alpha, f.embedding.weights):
            p.mul_(0.8 + 0.4 * torch.rand(p.shape, generator=g, dtype=p.dtype))
        f.scaling.r0.add_(0.3 * torch.rand(f.scaling.r0.shape, generator=g, dtype=torch.float64))
        for p in (f.embedding.coeffs, f.readout.theta):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
        sc = f.per_type_energy_scale_shift
        sc.scales.copy_(1 + torch.rand(sc.scales.shape, generator=g, dtype=torch.float64))
        sc.shifts.copy_(-3 + torch.rand(sc.shifts.shape, generator=g, dtype=torch.float64))


def _structures(type_count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    cell = np.diag([6.2, 6.6, 7.0]) + rng.uniform(-0.3, 0.3, (3, 3))
    for n, periodic in ((10, True), (6, False)):
        pos = rng.uniform(0, 6.0, (n, 3))
        yield rng.integers(0, type_count, n), pos, cell if periodic else None


@pytest.mark.parametrize(
    ("L", "K", "basis"), [(2, 2, "full_rank"), (3, 2, "full_rank"), (2, 2, "published")]
)
def test_new_models_export_and_reload_identically(L, K, basis, tmp_path):
    """A new model written as .mtp and loaded back with SUS2FromMTP predicts the same energies,
    forces and virials; a full-rank model is re-expanded to the published program."""
    names = ["Cu", "Se", "Te"]
    model = build(
        SUS2Model, seed=1, model_dtype="float64", type_names=names, r_max=5.0, max_rank=L,
        radial_channels=K, radial_basis_size=4, scaling_map="LK" if L == 3 else "K",
        basis=basis, min_dist=1.2,
    )  # fmt: skip
    _perturb(model, seed=L + K)
    mtp = model_to_mtp(model)
    assert mtp.program == generate_program(L, K)  # the published layout, entry for entry
    assert mtp.min_dist == 1.2 and mtp.scaling_map == ("LK" if L == 3 else "K")
    if basis == "full_rank":
        n_full = len(generate_program(L, K, full_rank=True).mapping)
        assert sum(t != 0.0 for t in mtp.moment_coeffs) == n_full < len(mtp.moment_coeffs)
        with pytest.raises(InteropError, match="full-rank basis"):
            model_to_mtp(model, expand_full_rank=False)
    write_mtp(mtp, tmp_path / "new.mtp")
    again = build(SUS2FromMTP, mtp_path=str(tmp_path / "new.mtp"), type_names=names)
    for types, pos, cell in _structures(len(names)):
        a, b = predict(model, types, pos, cell), predict(again, types, pos, cell)
        assert abs(a["energy"] - b["energy"]) <= 1e-12 * (1 + abs(a["energy"]))
        np.testing.assert_allclose(b["forces"], a["forces"], rtol=0, atol=1e-10)
        np.testing.assert_allclose(b["virial"], a["virial"], rtol=0, atol=1e-10)


def test_export_refuses_what_mtp_cannot_hold():
    names = ["Cu", "Se"]
    model = build(
        SUS2Model, seed=0, model_dtype="float64", type_names=names, r_max=5.0,
        pair_potential={"_target_": "nequip.nn.pair_potential.ZBL", "units": "metal",
                        "chemical_species": names},
    )  # fmt: skip
    with pytest.raises(InteropError, match="pair_potential .*cannot represent"):
        model_to_mtp(model)
    with pytest.raises(InteropError, match="not a SUS2 model"):
        model_to_mtp(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------------------------
# species lists
# ----------------------------------------------------------------------------------------------


def test_species_count_mismatch_names_file_line_field():
    path, text = published("cu2se_p")
    line = text.splitlines().index("species_count = 2") + 1
    with pytest.raises(InteropError) as info:
        import_mtp(path, ["Cu", "Se", "Te"])
    msg = str(info.value)
    assert msg.startswith(f"{path}:{line}: field 'species_count'"), msg
    with pytest.raises(InteropError, match="listed twice"):
        import_mtp(path, ["Cu", "Cu"])


names_strategy = st.lists(
    st.from_regex(r"[A-Z][a-z]?[0-9]{0,2}", fullmatch=True), min_size=1, max_size=8, unique=True
)


@settings(max_examples=60, deadline=None)
@given(names=names_strategy, form=st.sampled_from(["list", "string", "mapping", "index", "json"]))
def test_property_type_names_file_round_trip(names, form):
    text = {
        "list": yaml.safe_dump(names),
        "string": " ".join(names),
        "mapping": yaml.safe_dump({"type_names": names}),
        "index": yaml.safe_dump(dict(enumerate(names))),
        "json": json.dumps({"species": names}),
    }[form]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "species.yaml"
        path.write_text(text)
        assert read_type_names(path) == names


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[Cu, Cu]", "listed twice"),
        ("{1: Cu, 2: Se}", "keys 0..N-1"),
        ("[Cu, [Se]]", "type name 1"),
        ("42", "expected a list"),
        ("[Cu, Se\n", r"species\.yaml:\d+: not valid YAML"),
        ("", "expected a list"),
    ],
)
def test_type_names_file_errors(text, match, tmp_path):
    path = tmp_path / "species.yaml"
    path.write_text(text)
    with pytest.raises(InteropError, match=match) as info:
        read_type_names(path)
    assert str(path) in str(info.value)


# ----------------------------------------------------------------------------------------------
# packages
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cu2se_package(tmp_path_factory):
    path, _ = published("cu2se_p")
    out = tmp_path_factory.mktemp("pkg") / "cu2se.nequip.zip"
    import_mtp_to_package(path, SPECIES["cu2se_p"], out)
    return out


def test_package_is_accepted_by_nequip(cu2se_package):
    from nequip.integrations.ase import NequIPCalculator
    from nequip.model import ModelFromPackage, ModelTypeNamesFromPackage
    from nequip.scripts.package import main as nequip_package

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        nequip_package(["info", str(cu2se_package), "--yaml"])
    meta = yaml.safe_load(stdout.getvalue())["package_metadata"]
    assert meta["atom_types"] == {0: "Cu", 1: "Se"}
    assert meta["available_models"] == ["eager", "compile"]
    assert ModelTypeNamesFromPackage(str(cu2se_package)) == ["Cu", "Se"]

    eager = ModelFromPackage(str(cu2se_package), compile_mode="eager")["sole_model"]
    compiled = ModelFromPackage(str(cu2se_package), compile_mode="compile")["sole_model"]
    assert not eager.is_compile_graph_model and compiled.is_compile_graph_model
    assert eager.training  # packaged in training mode, as nequip-package does (fine-tuning)
    assert eager.metadata["type_names"] == "Cu Se" and eager.metadata["model_dtype"] == "float64"

    frames = read_cfg(require_reference(GOLDEN["cu2se_p"]))
    for frame in frames[:3] + frames[-2:]:
        out = predict(eager.eval(), frame.types, frame.positions, frame.cell)
        np.testing.assert_allclose(out["energy"], frame.energy, rtol=1e-8, atol=0)
        np.testing.assert_allclose(out["forces"], frame.forces, rtol=0, atol=1e-7)

    calc = NequIPCalculator._from_saved_model(
        str(cu2se_package), chemical_species_to_atom_type_map=True
    )
    atoms = frames[0].to_atoms(SPECIES["cu2se_p"])
    atoms.calc = calc
    np.testing.assert_allclose(atoms.get_potential_energy(), frames[0].energy, rtol=1e-8)
    virial = -atoms.get_stress(voigt=True) * atoms.get_volume()
    np.testing.assert_allclose(virial, frames[0].plus_stress, rtol=0, atol=1e-7)


def test_package_export_round_trip(cu2se_package, tmp_path):
    _, text = published("cu2se_p")
    export_mtp(cu2se_package, tmp_path / "back.mtp")
    assert (tmp_path / "back.mtp").read_text() == text.rstrip("\n")


def test_freeze_modifier_on_packaged_model(cu2se_package):
    """freeze_pair_scaling (a persistent model modifier carried inside the package) stops
    alpha/r0 from changing under an optimiser step while the rest trains."""
    from nequip.model import ModelFromPackage, modify

    model = modify(
        {"_target_": "nequip.model.ModelFromPackage", "package_path": str(cu2se_package)},
        [{"modifier": "freeze_pair_scaling"}],
    )["sole_model"]
    assert model.training
    scaling = model.model.func.scaling
    assert not scaling.alpha.requires_grad and not scaling.r0.requires_grad
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = example_data(model)
    for _ in range(2):
        opt.zero_grad()
        out = model(dict(data))
        loss = out["total_energy"].square().sum() + out["forces"].square().sum()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for key in ("alpha", "r0"):
        full = f"model.func.scaling.{key}"
        assert torch.equal(after[full], before[full]), key  # bit for bit
    assert not torch.equal(after["model.func.readout.theta"], before["model.func.readout.theta"])
    # the package itself is unchanged; `frozen: false` unfreezes
    assert ModelFromPackage(str(cu2se_package))["sole_model"].model.func.scaling.r0.requires_grad
    thawed = modify(model, [{"modifier": "freeze_pair_scaling", "frozen": False}])
    assert thawed.model.func.scaling.alpha.requires_grad


def test_write_package_leaves_nothing_on_failure(tmp_path, monkeypatch):
    path, _ = published("cu2se_p")
    model = import_mtp(path, SPECIES["cu2se_p"])
    with pytest.raises(InteropError, match=r"must end with \.nequip\.zip"):
        write_package(model, tmp_path / "model.zip")
    with pytest.raises(InteropError, match="GraphModel"):
        write_package(torch.nn.Linear(1, 1), tmp_path / "m.nequip.zip")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch.package.PackageExporter, "save_pickle", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_package(model, tmp_path / "m.nequip.zip")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# .cfg <-> extxyz
# ----------------------------------------------------------------------------------------------


def _same_frames(a: list[CfgFrame], b: list[CfgFrame]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x == y


@pytest.mark.parametrize("name", ["alloy_sample.cfg", "cathod_golden.cfg", "cu2se_p_golden.cfg"])
def test_cfg_extxyz_cfg_is_exact(name, tmp_path):
    src = require_reference(name)
    names = SPECIES["alloy" if name.startswith("alloy") else name.split("_golden")[0]]
    assert cfg_to_extxyz(src, tmp_path / "a.xyz", names) == len(read_cfg(src))
    extxyz_to_cfg(tmp_path / "a.xyz", tmp_path / "b.cfg", names)
    _same_frames(read_cfg(tmp_path / "b.cfg"), read_cfg(src))
    # and the .cfg text written from both is identical
    write_cfg(read_cfg(src), tmp_path / "c.cfg")
    assert (tmp_path / "b.cfg").read_bytes() == (tmp_path / "c.cfg").read_bytes()


def test_extxyz_is_read_by_ase_with_the_right_conventions(tmp_path):
    """ASE's own reader sees stress = -PlusStress / V and virial = PlusStress (docs/theory.md
    §2.8)."""
    import ase.io

    src = require_reference("cathod_golden.cfg")
    names = SPECIES["cathod"]
    cfg_to_extxyz(src, tmp_path / "a.xyz", names)
    images = ase.io.read(tmp_path / "a.xyz", index=":")
    for frame, atoms in zip(read_cfg(src), images, strict=True):
        assert atoms.get_chemical_symbols() == [names[t] for t in frame.types]
        assert np.array_equal(atoms.positions, frame.positions)
        assert atoms.get_potential_energy() == frame.energy
        assert np.array_equal(atoms.get_forces(), frame.forces)
        assert np.array_equal(atoms.info["virial"], frame.virial)
        if frame.cell is None:
            assert not atoms.pbc.any()
        else:
            volume = abs(np.linalg.det(frame.cell))
            np.testing.assert_allclose(
                atoms.get_stress(voigt=False), -frame.virial / volume, rtol=1e-15, atol=0
            )


def test_extxyz_cfg_extxyz(tmp_path):
    """Other direction on a real third-party extxyz (mlearn Li): every value survives."""
    import ase.io

    src = SHARED / "benchmarks" / "mlearn" / "Li_train.extxyz"
    if not src.is_file():
        pytest.skip(f"{src} is absent")
    original = ase.io.read(src, index=":40")
    ase.io.write(tmp_path / "in.xyz", original, format="extxyz")
    extxyz_to_cfg(tmp_path / "in.xyz", tmp_path / "li.cfg", ["Li"])
    frames = read_cfg(tmp_path / "li.cfg")
    assert [f.features for f in frames] == [[("group", a.info["group"])] for a in original]
    cfg_to_extxyz(tmp_path / "li.cfg", tmp_path / "out.xyz", ["Li"])
    back = ase.io.read(tmp_path / "out.xyz", index=":")
    for a, b in zip(ase.io.read(tmp_path / "in.xyz", index=":"), back, strict=True):
        assert np.array_equal(a.positions, b.positions) and np.array_equal(a.cell, b.cell)
        assert a.get_potential_energy() == b.get_potential_energy()
        assert np.array_equal(a.get_forces(), b.get_forces())
        assert a.info["group"] == b.info["group"] and list(a.pbc) == list(b.pbc)


def test_extxyz_to_cfg_reports_unrepresentable(tmp_path):
    import ase.io
    from ase.build import bulk

    atoms = bulk("Cu", cubic=True)
    atoms.info["temperature"] = 300.0
    ase.io.write(tmp_path / "a.xyz", atoms, format="extxyz")
    with pytest.warns(UserWarning, match="temperature"):
        extxyz_to_cfg(tmp_path / "a.xyz", tmp_path / "a.cfg", ["Cu"])
    with pytest.raises(InteropError, match=r"a\.xyz:1: frame 0: .*not in type_names"):
        extxyz_to_cfg(tmp_path / "a.xyz", tmp_path / "b.cfg", ["Se"])
    assert not (tmp_path / "b.cfg").exists()


feature_key = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True).filter(
    lambda k: k not in _RESERVED_INFO
)
feature_value = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=10
).map(str.strip)
number = st.floats(allow_nan=False, allow_infinity=False, width=64)


@st.composite
def frames(draw) -> CfgFrame:
    n = draw(st.integers(0, 5))

    def array(shape):
        size = int(np.prod(shape))
        return np.array(draw(st.lists(number, min_size=size, max_size=size))).reshape(shape)

    cell = None
    if draw(st.booleans()):
        cell = np.zeros((3, 3))
        for i, periodic in enumerate(draw(st.lists(st.booleans(), min_size=3, max_size=3))):
            if periodic:
                cell[i] = draw(st.lists(number, min_size=3, max_size=3).filter(any))
        cell = cell if cell.any() else None
        if cell is not None:  # singular periodic cells are refused: keep the regular ones
            assume(not cell_measure(cell, np.any(cell != 0, axis=1)) < MIN_CELL_MEASURE)
    keys = draw(st.lists(feature_key, max_size=3, unique=True))
    features = [(k, draw(feature_value)) for k in keys for _ in range(draw(st.integers(1, 2)))]
    return CfgFrame(
        types=draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)),
        positions=array((n, 3)),
        cell=cell,
        energy=draw(st.none() | number),
        forces=array((n, 3)) if draw(st.booleans()) else None,
        plus_stress=array((6,)) if draw(st.booleans()) else None,
        features=features,
        ids=draw(st.none() | st.lists(st.integers(-(10**9), 10**9), min_size=n, max_size=n)),
        extra_columns={"q": array((n,))} if draw(st.booleans()) else {},
    )


@settings(max_examples=120, deadline=None)
@given(data=st.lists(frames(), min_size=1, max_size=3))
def test_property_cfg_extxyz_round_trip(data):
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ASE warns about odd cells; values are what matter
        tmp = Path(tmp)
        write_cfg(data, tmp / "in.cfg")
        cfg_to_extxyz(tmp / "in.cfg", tmp / "a.xyz", ["Cu", "Se", "O"])
        extxyz_to_cfg(tmp / "a.xyz", tmp / "out.cfg", ["Cu", "Se", "O"])
        _same_frames(read_cfg(tmp / "out.cfg"), data)


def test_former_interop_names_still_import_with_a_warning():
    """Scripts written against ``nequip_sus2.interop`` keep working: every former name is the
    object of its new module, with a DeprecationWarning that names where it lives now."""
    import importlib

    import nequip_sus2.interop as former

    for name, module in former.MOVED.items():
        with pytest.warns(DeprecationWarning, match=f"{module}.{name}"):
            obj = getattr(former, name)
        assert obj is getattr(importlib.import_module(module), name)
    with pytest.raises(AttributeError, match="no_such_name"):
        former.no_such_name  # noqa: B018
