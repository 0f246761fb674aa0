"""Fine-tuning with frozen blocks (issue #7): the universal-scaling block (alpha, r0) and the
element embedding (c, w) stay bit-identical through training, packaging and AOTI compile."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import build, run_ok

from nequip_sus2.data.emt import ELEMENTS, write_emt_dataset
from nequip_sus2.model import SUS2Model
from nequip_sus2.nn import DecoupledElementEmbedding, UniversalPairScaling
from nequip_sus2.package import example_data, write_package

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FROZEN = ("scaling.alpha", "scaling.r0", "embedding.coeffs", "embedding.weights")
TRAINED = ("readout.theta",)


def _small_model(**kwargs):
    return build(
        SUS2Model,
        seed=3,
        model_dtype="float64",
        r_max=4.5,
        type_names=list(ELEMENTS),
        max_rank=2,
        radial_channels=2,
        radial_basis_size=6,
        **kwargs,
    )


def _blocks(model) -> dict[str, torch.Tensor]:
    """The SUS2 parameters of a GraphModel (or a ModuleDict holding one) by short name."""
    out = {}
    for name, p in model.named_parameters():
        short = name.split("func.")[-1]
        if short in FROZEN + TRAINED:
            out[short] = p
    assert set(out) == set(FROZEN + TRAINED), sorted(out)
    return out


def _optimiser_steps(model, steps: int = 3) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = example_data(model)
    for _ in range(steps):
        opt.zero_grad()
        out = model(dict(data))
        (out["total_energy"].square().sum() + out["forces"].square().sum()).backward()
        opt.step()


def test_builder_flags_freeze_scaling_and_embedding():
    model = _small_model(pair_scaling_trainable=False, element_embedding_trainable=False)
    before = {k: v.detach().clone() for k, v in _blocks(model).items()}
    assert not any(_blocks(model)[k].requires_grad for k in FROZEN)
    _optimiser_steps(model)
    after = _blocks(model)
    for key in FROZEN:
        assert torch.equal(after[key], before[key]), key
    assert not torch.equal(after["readout.theta"], before["readout.theta"])


def test_element_embedding_modifier_freezes_and_unfreezes():
    from nequip.model import modify

    model = _small_model()
    assert _blocks(model)["embedding.coeffs"].requires_grad
    frozen = modify(model, [{"modifier": "freeze_element_embedding"}])
    blocks = _blocks(frozen)
    assert not blocks["embedding.coeffs"].requires_grad
    assert not blocks["embedding.weights"].requires_grad
    assert blocks["scaling.alpha"].requires_grad  # only the named block
    before = {k: v.detach().clone() for k, v in blocks.items()}
    _optimiser_steps(frozen)
    assert torch.equal(_blocks(frozen)["embedding.coeffs"], before["embedding.coeffs"])
    assert not torch.equal(_blocks(frozen)["scaling.alpha"], before["scaling.alpha"])
    thawed = modify(frozen, [{"modifier": "freeze_element_embedding", "frozen": False}])
    assert _blocks(thawed)["embedding.weights"].requires_grad


@pytest.mark.parametrize("cls", [UniversalPairScaling, DecoupledElementEmbedding])
def test_freeze_modifiers_reject_models_without_the_block(cls):
    name = "freeze_pair_scaling" if cls is UniversalPairScaling else "freeze_element_embedding"
    with pytest.raises(ValueError, match=f"no {cls.__name__} block"):
        getattr(cls, name)(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def _compiled_constants(pt2: Path, workdir: Path) -> list[torch.Tensor]:
    """The constants (weights) baked into an AOTInductor ``.pt2``'s shared library."""
    with zipfile.ZipFile(pt2) as zf:
        zf.extractall(workdir)
    (so,) = workdir.glob("**/*.wrapper.so")
    runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(so), 1)
    # clone: the tensors view memory owned by the runner
    return [c.clone() for c in runner.extract_constants_map(False).values()]


@pytest.mark.slow
def test_frozen_blocks_survive_training_packaging_and_compile(tmp_path):
    """configs/finetune_tutorial.yaml end to end: package -> nequip-train (frozen) ->
    nequip-package -> nequip-compile; alpha, r0, c, w equal the starting package bit for bit."""
    from nequip.model import ModelFromCheckpoint, ModelFromPackage

    start = write_package(_small_model(), tmp_path / "start.nequip.zip")
    reference = {k: v.detach().clone() for k, v in _blocks(ModelFromPackage(str(start))).items()}
    data = write_emt_dataset(tmp_path / "emt.xyz", n_structures=30, seed=5)
    run_dir = tmp_path / "run"
    run_ok(
        [
            sys.executable, "-m", "nequip.scripts.train",
            "-cp", str(CONFIGS), "-cn", "finetune_tutorial.yaml",
            f"package_file={start}", f"data_file={data}", "max_epochs=2",
            "run=[train]", f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false",
        ],
        tmp_path,
    )  # fmt: skip

    # training: the frozen blocks did not move, the readout did
    trained = _blocks(ModelFromCheckpoint(str(run_dir / "last.ckpt")))
    for key in FROZEN:
        assert torch.equal(trained[key], reference[key]), key
        assert not trained[key].requires_grad, key
    assert not torch.equal(trained["readout.theta"], reference["readout.theta"])

    # packaging: values and the frozen state (a persistent modifier) are carried
    package = tmp_path / "tuned.nequip.zip"
    run_ok([sys.executable, "-m", "nequip.scripts.package", "build", str(run_dir / "last.ckpt"),
          str(package)], tmp_path)  # fmt: skip
    packaged = _blocks(ModelFromPackage(str(package)))
    for key in FROZEN:
        assert torch.equal(packaged[key], reference[key]), key
        assert not packaged[key].requires_grad, key
    assert torch.equal(packaged["readout.theta"], trained["readout.theta"])

    # compile: the frozen tensors are among the compiled file's constants, bit for bit (the
    # species weights w are not listed as a separate constant by AOTInductor; the energies
    # below cover them)
    pt2 = tmp_path / "tuned.nequip.pt2"
    run_ok([sys.executable, "-m", "nequip.scripts.compile", str(package), str(pt2),
          "--mode", "aotinductor", "--device", "cpu", "--target", "ase"], tmp_path)  # fmt: skip
    constants = _compiled_constants(pt2, tmp_path / "unzipped")
    for key in ("scaling.alpha", "scaling.r0", "embedding.coeffs", "readout.theta"):
        want = packaged[key].detach()
        assert any(c.shape == want.shape and torch.equal(c, want) for c in constants), key

    # and the compiled model predicts what the packaged one does
    from ase.io import read
    from nequip.integrations.ase import NequIPCalculator

    atoms = read(data, index=0)
    atoms.calc = NequIPCalculator.from_compiled_model(
        str(pt2), chemical_species_to_atom_type_map=True
    )
    e_compiled, f_compiled = atoms.get_potential_energy(), atoms.get_forces()
    atoms.calc = NequIPCalculator._from_saved_model(
        str(package), chemical_species_to_atom_type_map=True
    )
    np.testing.assert_allclose(e_compiled, atoms.get_potential_energy(), rtol=1e-12)
    np.testing.assert_allclose(f_compiled, atoms.get_forces(), rtol=0, atol=1e-10)
