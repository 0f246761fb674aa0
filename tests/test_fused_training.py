"""The fused training path (``sus2::basic_moments_jvp``, ``nequip_sus2.kernels.training``).

* the operator's moments, their tangent and its parameter gradients equal the equations of
  docs/theory.md written independently in ``test_fused_kernels`` (forward-mode autograd over
  them), float64 and float32, long segments and two threads;
* loss gradients of energy, force, stress, virial and site-energy terms equal PyTorch's double
  backward (float64, 1e-10 of each parameter block's largest entry) for generated L1-L3 models,
  both scaling maps, batches of periodic cells, a non-periodic molecule, the repulsive core, the
  published models on their structures; float32 is close;
* the comparison is sensitive: a kernel whose tangent misses a term fails it;
* unsupported models and devices are refused with a clear message.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _helpers import build, frame_data, perturb_parameters, random_fcc_structure
from conftest import GOLDEN, SPECIES, require_reference
from nequip.data import AtomicDataDict as D
from test_fused_kernels import _problem, _spec_basic_moments, ops  # noqa: F401 (fixture)

from nequip_sus2.io.cfg import read_cfg
from nequip_sus2.kernels.training import FusedLossGradient
from nequip_sus2.model import SUS2FromMTP, SUS2Model

EMT = ["Cu", "Ag", "Au"]
PARAMS = ("alpha", "r0", "coeffs", "weights")


def _jvp_args(p: dict, dvec: torch.Tensor) -> tuple:
    keys = ("center", "neighbor", "types", *PARAMS[:3], "eta_of_mu", "weights", "basic")
    return (p["vec"], dvec, *(p[k] for k in keys), p["r_max"], p["sigma"], p["num_nodes"])


def _jvp_case(p: dict, seed: int = 5):
    """Random tangents and cotangents, and the reference values by forward-mode autograd over the
    equations of docs/theory.md: M, dM and the gradients of sum(Gm M + Gd dM)."""
    gen = torch.Generator().manual_seed(seed)
    dvec = torch.randn(p["vec"].shape, generator=gen, dtype=torch.float64)
    shape = (p["num_nodes"], len(p["basic"]))
    gm = torch.randn(shape, generator=gen, dtype=torch.float64)
    gd = torch.randn(shape, generator=gen, dtype=torch.float64)
    q = {**p, **{k: p[k].clone().requires_grad_(True) for k in PARAMS}}
    m, m_dot = torch.func.jvp(lambda v: _spec_basic_moments(q, v), (q["vec"],), (dvec,))
    phi = (gm * m).sum() + (gd * m_dot).sum()
    grads = torch.autograd.grad(phi, [q[k] for k in PARAMS])
    return dvec, gm, gd, (m.detach(), m_dot.detach(), *grads)


def _op_values(ops, p: dict, dvec, gm, gd, dtype=torch.float64):  # noqa: F811
    cast = {k: v.to(dtype) for k, v in p.items() if torch.is_tensor(v) and v.is_floating_point()}
    q = {**p, **cast, **{k: cast[k].clone().requires_grad_(True) for k in PARAMS}}
    m, m_dot = ops.basic_moments_jvp(*_jvp_args(q, dvec.to(dtype)))
    phi = (gm.to(dtype) * m).sum() + (gd.to(dtype) * m_dot).sum()
    grads = torch.autograd.grad(phi, [q[k] for k in PARAMS])
    return tuple(t.detach().double() for t in (m, m_dot, *grads))


def _assert_blocks_close(ours, ref, rtol: float) -> None:
    for a, b in zip(ours, ref, strict=True):
        scale = float(b.abs().max())
        assert scale > 1e-3  # every block is exercised
        assert float((a - b).abs().max()) <= rtol * scale, (float((a - b).abs().max()), scale)


def test_jvp_operator_matches_the_spec_equations(ops):  # noqa: F811
    p = _problem()
    dvec, gm, gd, ref = _jvp_case(p)
    _assert_blocks_close(_op_values(ops, p, dvec, gm, gd), ref, 1e-12)
    # float32: the same to single precision
    _assert_blocks_close(_op_values(ops, p, dvec, gm, gd, torch.float32), ref, 1e-5)


@pytest.mark.parametrize("edges", [3000, 5000])
def test_jvp_operator_with_long_segments_and_threads(ops, edges):  # noqa: F811
    """Hundreds of edges per atom (several segments per atom), one and two threads, sizes on
    both sides of the operator's threading threshold (4096 edges)."""
    p = _problem(seed=3, E=edges, N=6, R=7)
    order = torch.argsort(p["center"], stable=True)
    p["center"], p["neighbor"], p["vec"] = p["center"][order], p["neighbor"][order], p["vec"][order]
    dvec, gm, gd, ref = _jvp_case(p, seed=7)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            _assert_blocks_close(_op_values(ops, p, dvec, gm, gd), ref, 1e-11)
    finally:
        torch.set_num_threads(threads)


def test_jvp_operator_refuses_geometry_gradients_and_bad_shapes(ops):  # noqa: F811
    p = _problem()
    dvec = torch.zeros_like(p["vec"])
    vec = p["vec"].clone().requires_grad_(True)
    m, _ = ops.basic_moments_jvp(*_jvp_args({**p, "vec": vec}, dvec))
    with pytest.raises(RuntimeError, match="parameters alpha, r0, coeffs and weights only"):
        m.sum().backward()
    with pytest.raises(RuntimeError, match="dvec must be like vec"):
        ops.basic_moments_jvp(*_jvp_args(p, dvec[:5]))


@pytest.mark.parametrize(("L", "K", "basis"), [(1, 2, "full_rank"), (2, 3, "published"),
                                             (3, 2, "full_rank")])  # fmt: skip
def test_contract_jvp_matches_forward_mode_autograd_of_the_program(ops, L, K, basis):  # noqa: F811
    """B and dB of ``sus2::contract_jvp`` and the gradients of sum(gB B + gD dB) with respect
    to M and dM equal autograd (forward mode, then reverse) over the PyTorch program; 70 atoms
    (a partial block of 64)."""
    model = _model(L, K, basis=basis)
    (mom,) = [m for m in model.modules() if type(m).__name__ == "MomentContraction"]
    gen = torch.Generator().manual_seed(L * 10 + K)
    basic = torch.randn(70, mom.num_basic, generator=gen, dtype=torch.float64)
    tangent = torch.randn(70, mom.num_basic, generator=gen, dtype=torch.float64)
    g_b = torch.randn(70, mom.num_basis, generator=gen, dtype=torch.float64)
    g_d = torch.randn(70, mom.num_basis, generator=gen, dtype=torch.float64)

    def values(fn):
        m, d = basic.clone().requires_grad_(True), tangent.clone().requires_grad_(True)
        b, b_dot = fn(m, d)
        grads = torch.autograd.grad((g_b * b).sum() + (g_d * b_dot).sum(), [m, d])
        return b.detach(), b_dot.detach(), *grads

    ref = values(lambda m, d: torch.func.jvp(lambda x: mom.contract(x.T), (m,), (d,)))
    args = (mom.times_p, mom.times_q, mom.times_m, mom.times_o, mom.mapping, mom.num_slots)
    ours = values(lambda m, d: ops.contract_jvp(m, d, *args))
    _assert_blocks_close(ours, ref, 1e-12)


# ----------------------------------------------------------------------------------------------
# loss gradients of models against PyTorch's double backward
# ----------------------------------------------------------------------------------------------


def _targets(batch: D.Type, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    n, frames = batch[D.POSITIONS_KEY].shape[0], D.num_frames(batch)
    return {
        "energy": torch.randn(frames, 1, generator=gen, dtype=torch.float64),
        "forces": torch.randn(n, 3, generator=gen, dtype=torch.float64),
        "stress": 0.01 * torch.randn(frames, 3, 3, generator=gen, dtype=torch.float64),
    }


def _loss(out: D.Type, target: dict, periodic: bool = True) -> torch.Tensor:
    """Per-atom energy, forces, stress, virial and a site-energy term (all the outputs a loss
    may read)."""
    if D.BATCH_KEY in out:
        atoms = torch.bincount(out[D.BATCH_KEY]).view(-1, 1)
    else:
        atoms = out[D.POSITIONS_KEY].shape[0]
    loss = ((out[D.TOTAL_ENERGY_KEY] - target["energy"]) / atoms).square().mean()
    loss = loss + 0.7 * (out[D.FORCE_KEY] - target["forces"]).square().mean()
    loss = loss + 0.02 * out[D.PER_ATOM_ENERGY_KEY].var()
    if periodic:
        loss = loss + 30.0 * (out[D.STRESS_KEY] - target["stress"]).square().mean()
    return loss + 0.01 * out[D.VIRIAL_KEY].square().mean()


def _gradients(model, batch, target, fused: bool, periodic: bool = True) -> list[torch.Tensor]:
    model = copy.deepcopy(model).train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not fused:
        return list(torch.autograd.grad(_loss(model(dict(batch)), target, periodic), params))
    fl = FusedLossGradient(model)
    out = fl.outputs(model, dict(batch))
    fl.backward(_loss(out, target, periodic), out)
    return [torch.zeros_like(p) if p.grad is None else p.grad for p in params]


def _assert_same_gradients(model, batch, seed: int, rtol: float = 1e-10, periodic: bool = True):
    target = _targets(batch, seed)
    ref = _gradients(model, batch, target, fused=False, periodic=periodic)
    ours = _gradients(model, batch, target, fused=True, periodic=periodic)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, ours, ref, strict=True):
        scale = float(b.abs().max())
        assert scale > 0, name
        assert float((a - b).abs().max()) <= rtol * scale, (name, float((a - b).abs().max()), scale)


def _model(L: int, K: int, scaling_map: str = "K", dtype: str = "float64", **kwargs):
    model = build(
        SUS2Model, seed=L * 10 + K, model_dtype=dtype, r_max=5.0, type_names=EMT, max_rank=L,
        radial_channels=K, radial_basis_size=6, scaling_map=scaling_map, **kwargs,
    )  # fmt: skip
    return perturb_parameters(model, L + K)


def _batch(seed: int, frames: int = 3, r_max: float = 5.0) -> D.Type:
    rng = np.random.default_rng(seed)
    return D.batched_from_list([random_fcc_structure(rng, len(EMT), r_max) for _ in range(frames)])


@pytest.mark.parametrize(
    ("L", "K", "scaling_map", "basis"),
    [(1, 3, "K", "full_rank"), (2, 2, "LK", "published"), (3, 2, "L", "full_rank")],
)
def test_loss_gradient_equals_double_backward(ops, L, K, scaling_map, basis):  # noqa: F811
    """A batch of three periodic cells, neighbour lists with a skin (edges beyond the cutoff)."""
    model = _model(L, K, scaling_map, basis=basis)
    _assert_same_gradients(model, _batch(L * 7 + K, r_max=5.6), seed=L)


def test_loss_gradient_of_one_molecule(ops):  # noqa: F811
    """One non-periodic frame (no batch index, no cell): energy, forces, virial."""
    rng = np.random.default_rng(4)
    pos = rng.normal(0.0, 1.6, (9, 3))
    data = frame_data(rng.integers(0, len(EMT), 9), pos, None, 5.0)
    _assert_same_gradients(_model(2, 2), data, seed=4, periodic=False)


def test_loss_gradient_with_the_repulsive_core(ops):  # noqa: F811
    """Atoms pushed inside the core radius: the floored edge vectors carry the tangent."""
    model = _model(2, 2, repulsive_core={"default": 2.6}, repulsive_core_width=0.5)
    batch = _batch(8, frames=2)
    pos = batch[D.POSITIONS_KEY].clone()
    pos[1] = pos[0] + torch.tensor([1.9, 0.6, 0.2], dtype=pos.dtype)  # 2.0 A: inside the core
    batch[D.POSITIONS_KEY] = pos
    from nequip.data import compute_neighborlist_

    batch = compute_neighborlist_(batch, r_max=5.0)
    _assert_same_gradients(model, batch, seed=8)


@pytest.mark.parametrize("name", list(SPECIES))
def test_loss_gradient_of_the_published_models(ops, name):  # noqa: F811
    path = require_reference(f"{name}.mtp")
    model = build(SUS2FromMTP, mtp_path=str(path), type_names=SPECIES[name], model_dtype="float64")
    r_max = float(model.metadata["r_max"])
    frames = read_cfg(require_reference(GOLDEN[name]))[:3]
    batch = D.batched_from_list([frame_data(f.types, f.positions, f.cell, r_max) for f in frames])
    _assert_same_gradients(model, batch, seed=11)


def test_float32_loss_gradient_is_close(ops):  # noqa: F811
    _assert_same_gradients(_model(2, 2, dtype="float32"), _batch(3), seed=3, rtol=1e-4)


def test_the_comparison_catches_a_wrong_tangent(ops, monkeypatch):  # noqa: F811
    """A kernel that drops part of the tangent (here: the direction change u' of the edges)
    fails the comparison by orders of magnitude more than its tolerance."""
    from nequip_sus2.kernels import training

    real = training.edge_tangents

    def radial_only(data, vec, *bars):
        dvec = real(data, vec, *bars)
        u = vec / vec.norm(dim=1, keepdim=True)
        return u * (u * dvec).sum(1, keepdim=True)  # keeps r', drops u'

    monkeypatch.setattr(training, "edge_tangents", radial_only)
    with pytest.raises(AssertionError):
        _assert_same_gradients(_model(2, 2), _batch(5), seed=5, rtol=1e-3)


def test_unsupported_models_are_refused(ops):  # noqa: F811
    zbl = {"_target_": "nequip.nn.pair_potential.ZBL", "units": "metal", "chemical_species": EMT}
    with pytest.raises(ValueError, match="pair_potential.*train without `fused_training`"):
        FusedLossGradient(_model(1, 2, pair_potential=zbl))
    with pytest.raises(ValueError, match="not a SUS2 model"):
        FusedLossGradient(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("ema", [False, True], ids=["adam", "ema"])
def test_fused_minibatch_training_follows_the_pytorch_path(ops, tmp_path, ema, monkeypatch):  # noqa: F811
    """Four epochs of Adam (batches of 3, float64) with the fused training module end with the
    weights of NequIP's own module to rounding, and log the same training losses; every
    training step went through the fused objective."""
    from test_lbfgs import _datamodule, _fit, _module, _series

    steps = []
    objective = FusedLossGradient.objective
    monkeypatch.setattr(
        FusedLossGradient, "objective", lambda self, *a: steps.append(1) or objective(self, *a)
    )

    from nequip_sus2.data.emt import write_emt_dataset

    data = write_emt_dataset(tmp_path / "emt.xyz", n_structures=12, seed=0)
    base = "nequip.train.EMALightningModule" if ema else "nequip.train.NequIPLightningModule"
    fused = "nequip_sus2.train.FusedEMALightningModule" if ema else (
        "nequip_sus2.train.FusedNequIPLightningModule")  # fmt: skip
    runs = {}
    for target in (base, fused):
        dm = _datamodule(data)
        module = _module(dm, target=target, optimizer={"_target_": "torch.optim.Adam", "lr": 0.01})
        rows = _fit(module, dm, 4, tmp_path / target.rsplit(".", 1)[-1])
        runs[target] = (module, _series(rows, "train_loss_step/weighted_sum"))
    (ref, ref_losses), (ours, losses) = runs[base], runs[fused]
    assert len(losses) == len(ref_losses) == len(steps) >= 8
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-8)
    assert losses[-1] < losses[0]
    for a, b in zip(ours.model.parameters(), ref.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
