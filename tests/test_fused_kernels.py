"""The fused CPU kernels (``enable_fused_moments``) equal the PyTorch path (issue #6).

The operators ``sus2::basic_moments`` and ``sus2::contract_moments`` are checked against an
independent evaluation of the equations of docs/theory.md written here, and by finite differences;
models with the modifier are checked against the same models without it (float64, 1e-10 relative) on
random periodic structures (with edges beyond the cutoff) and on the published models. The AOTI
route (compile with the modifier, load in a fresh process) is covered against the golden
predictions in ``test_cli.py``, the LAMMPS route in ``test_lammps.py``.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from _helpers import (
    assert_same,
    build,
    evaluate_model,
    frame_data,
    perturb_parameters,
    random_fcc_structure,
)
from conftest import GOLDEN, SPECIES, require_reference
from nequip.data import AtomicDataDict

from nequip_sus2.io.cfg import read_cfg
from nequip_sus2.kernels.fused import FusedMomentContraction, _swapped
from nequip_sus2.model import SUS2FromMTP, SUS2Model
from nequip_sus2.nn import LinearReadout, MomentContraction

EMT = ["Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al"]


@pytest.fixture(scope="module")
def ops():
    """The operator library (compiled on first use, ~40 s); a failing build fails the tests,
    only a missing compiler skips them (then nothing of the AOTI route works either)."""
    from nequip_sus2 import _cxx
    from nequip_sus2.kernels import KernelBuildError

    try:
        _cxx.compiler(None, KernelBuildError)
    except KernelBuildError as e:
        pytest.skip(str(e))
    from nequip_sus2.kernels import ops

    return ops


def _fused_twin(model, folded: bool = True):
    twin = copy.deepcopy(model)
    MomentContraction.enable_fused_moments(twin)
    (moments,) = [m for m in twin.modules() if isinstance(m, MomentContraction)]
    assert moments.fold_readout == folded  # the readout goes into the fused contraction
    return twin.eval()


def _randomised(model, seed: int):
    return perturb_parameters(model, seed).eval()


def _small_model(seed: int, radial_channels: int, radial_basis_size: int, **kwargs):
    """A randomised float64 L2 SUS2 model for the seven EMT species (eval mode)."""
    kwargs.setdefault("model_dtype", "float64")
    model = build(
        SUS2Model, seed=seed, r_max=5.0, type_names=EMT, max_rank=2,
        radial_channels=radial_channels, radial_basis_size=radial_basis_size, **kwargs,
    )  # fmt: skip
    return _randomised(model, seed)


# ----------------------------------------------------------------------------------------------
# the operators against the equations of docs/theory.md
# ----------------------------------------------------------------------------------------------


def _problem(seed: int = 0, E: int = 400, N: int = 30, R: int = 6):
    """Random edges (some at or beyond the cutoff), 3 species, 2 scaling channels, a slot list
    with the canonical L2 K2 slots plus a non-canonical one (u_y^4 u_z, power 4)."""
    gen = torch.Generator().manual_seed(seed)
    C, r_max = 3, 5.0
    directions = torch.nn.functional.normalize(
        torch.randn(E, 3, generator=gen, dtype=torch.float64), dim=1
    )
    lengths = 0.8 + 5.0 * torch.rand(E, 1, generator=gen, dtype=torch.float64)  # up to 5.8 > r_max
    lengths[:3] = r_max
    eta = torch.tensor([0, 1, 0, 1, 0, 1])
    basic = [
        (k * 3 + rank, idx.count(0), idx.count(1), idx.count(2))
        for k in range(2)
        for rank in range(3)
        for idx in itertools.combinations_with_replacement(range(3), rank)
    ] + [(5, 0, 4, 1)]
    return {
        "vec": directions * lengths,
        "center": torch.randint(0, N, (E,), generator=gen),
        "neighbor": torch.randint(0, N, (E,), generator=gen),
        "types": torch.randint(0, C, (N,), generator=gen),
        "alpha": 0.5 + torch.rand(2, C * C, generator=gen, dtype=torch.float64),
        "r0": torch.rand(2, C * C, generator=gen, dtype=torch.float64),
        "coeffs": torch.randn(6, R, generator=gen, dtype=torch.float64),
        "eta_of_mu": eta,
        "weights": 0.5 + torch.rand(C, generator=gen, dtype=torch.float64),
        "basic": torch.tensor(basic),
        "r_max": r_max,
        "sigma": 0.03,
        "num_nodes": N,
    }


def _spec_basic_moments(p: dict, vec: torch.Tensor) -> torch.Tensor:
    """Spec 2.2-2.5 slot by slot over all edges, with T_n(cos t) = cos(n t)."""
    C = p["weights"].shape[0]
    zi, zj = p["types"][p["center"]], p["types"][p["neighbor"]]
    pair = zi * C + zj
    r = vec.norm(dim=1)
    u = vec / r[:, None]
    envelope = torch.where(r < p["r_max"], p["sigma"] * (r - p["r_max"]) ** 2, 0.0)
    n = torch.arange(p["coeffs"].shape[1], dtype=vec.dtype)
    out = torch.zeros(p["num_nodes"], len(p["basic"]), dtype=vec.dtype)
    for s, (mu, a, b, c) in enumerate(p["basic"].tolist()):
        eta = int(p["eta_of_mu"][mu])
        xi = torch.tanh(p["alpha"][eta, pair] * (r - p["r0"][eta, pair]) / 2)
        cheb = torch.cos(n[None, :] * torch.acos(xi)[:, None])  # [E, R]
        f = p["weights"][zi] * p["weights"][zj] * envelope * (cheb @ p["coeffs"][mu])
        out[:, s].index_add_(0, p["center"], f * u[:, 0] ** a * u[:, 1] ** b * u[:, 2] ** c)
    return out


def _args(p: dict, vec: torch.Tensor) -> tuple:
    keys = ("center", "neighbor", "types", "alpha", "r0", "coeffs", "eta_of_mu", "weights")
    return (vec, *(p[k] for k in keys), p["basic"], p["r_max"], p["sigma"], p["num_nodes"])


def test_basic_moments_match_the_spec_equations(ops):
    p = _problem()
    ours = ops.basic_moments(*_args(p, p["vec"]))
    ref = _spec_basic_moments(p, p["vec"])
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-13)
    assert ref.abs().max() > 0.1  # a real test: the moments are not all zero
    # edges at and beyond the cutoff are present (and skipped by both)
    assert (p["vec"].norm(dim=1) >= p["r_max"]).sum() > 3


def test_basic_moments_in_float32(ops):
    p = _problem()
    p32 = {
        k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in p.items()
    }
    ours = ops.basic_moments(*_args(p32, p32["vec"]))
    assert ours.dtype == torch.float32
    torch.testing.assert_close(
        ours.double(), _spec_basic_moments(p, p["vec"]), rtol=1e-5, atol=1e-5
    )


def test_basic_moments_gradient_by_finite_differences(ops):
    p = _problem()
    vec = p["vec"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: ops.basic_moments(*_args(p, v)), (vec,))


def test_basic_moments_with_long_segments_and_threads(ops):
    """Edges sorted by centre with hundreds per atom (the kernels split an atom's edges into
    several segments), two threads (per-thread accumulators) and a radial basis size without an
    unrolled kernel (7): same moments as docs/theory.md, gradients by finite differences."""
    p = _problem(seed=3, E=5000, N=6, R=7)
    order = torch.argsort(p["center"], stable=True)
    p["center"], p["neighbor"], p["vec"] = p["center"][order], p["neighbor"][order], p["vec"][order]
    ref = _spec_basic_moments(p, p["vec"])
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.testing.assert_close(
                ops.basic_moments(*_args(p, p["vec"])), ref, rtol=1e-12, atol=1e-12
            )
        q = dict(p, center=p["center"][:300], neighbor=p["neighbor"][:300])  # 5 segments of atom 0
        vec = p["vec"][:300].clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda v: ops.basic_moments(*_args(q, v)), (vec,))
    finally:
        torch.set_num_threads(threads)


def test_positions_form_equals_the_vector_form(ops):
    """Two frames with cells (batch index) and one without: r_ij = x_j - x_i + S_e . cell; the
    gradients with respect to positions and cells by finite differences."""
    p = _problem()
    gen = torch.Generator().manual_seed(7)
    N, E = p["num_nodes"], p["center"].shape[0]
    batch = (torch.arange(N) >= N // 2).long()
    frame = batch[p["center"]]
    # neighbours in the same frame, never the centre itself
    h = N // 2
    local = p["neighbor"] % h
    neighbor = frame * h + local
    neighbor = torch.where(neighbor == p["center"], frame * h + (local + 1) % h, neighbor)
    pos = 3.0 * torch.rand(N, 3, generator=gen, dtype=torch.float64)
    cell = 4.0 * torch.eye(3, dtype=torch.float64) + 0.3 * torch.rand(2, 3, 3, generator=gen)
    shift = torch.randint(-1, 2, (E, 3), generator=gen).double()
    q = dict(p, neighbor=neighbor)
    rest = _args(q, None)[1:-1]  # center .. sigma
    vec = pos[neighbor] - pos[p["center"]] + torch.einsum("ei,eij->ej", shift, cell[frame])
    ours = ops.basic_moments_from_positions(pos, cell, shift, batch, *rest)
    torch.testing.assert_close(ours, ops.basic_moments(vec, *rest, N), rtol=1e-12, atol=1e-13)
    assert ours.abs().max() > 0.1

    leaves = (pos.clone().requires_grad_(True), cell.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(
        lambda x, c: ops.basic_moments_from_positions(x, c, shift, batch, *rest), leaves
    )
    # no cell: empty cell, shifts and batch
    empty = (torch.zeros(0, 3, 3, dtype=torch.float64), torch.zeros(0, 3, dtype=torch.float64))
    plain = ops.basic_moments_from_positions(pos, *empty, torch.zeros(0, dtype=torch.long), *rest)
    vec0 = pos[neighbor] - pos[p["center"]]
    torch.testing.assert_close(plain, ops.basic_moments(vec0, *rest, N), rtol=1e-12, atol=1e-13)
    leaf = pos.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: ops.basic_moments_from_positions(
            x, *empty, torch.zeros(0, dtype=torch.long), *rest
        ),
        (leaf,),
    )


def test_contract_moments_match_the_program(ops):
    """``M_o += m M_p M_q`` entry by entry, ``B = M[mapping]``, and its gradient."""
    from nequip_sus2.program import generate_program

    program = generate_program(2, 3)
    module = MomentContraction(program, irreps_in={"edge_embedding": None})
    gen = torch.Generator().manual_seed(1)
    basic = torch.randn(7, len(program.basic), generator=gen, dtype=torch.float64)
    args = (
        module.times_p,
        module.times_q,
        module.times_m.double(),
        module.times_o,
        module.mapping,
        module.num_slots,
    )
    ours = ops.contract_moments(basic, *args)
    moments = torch.zeros(7, program.moments_count, dtype=torch.float64)
    moments[:, : len(program.basic)] = basic
    for p, q, m, o in program.times:  # the file's own entry order
        moments[:, o] += m * moments[:, p] * moments[:, q]
    torch.testing.assert_close(ours, moments[:, program.mapping], rtol=1e-13, atol=1e-13)
    leaf = basic.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda b: ops.contract_moments(b, *args), (leaf,))


@pytest.mark.parametrize(("L", "K", "full_rank"), [(2, 3, False), (3, 2, True), (1, 2, False)])
def test_contract_readout_matches_the_program(ops, L, K, full_rank):
    """``x = theta . B`` with the degree-4 products D_l(a,b) D_l'(a',b') (l, l' >= 1) as a
    quadratic form, against the program run entry by entry; ``dx/dM`` by autograd of that
    loop and by gradcheck."""
    from nequip_sus2.program import basis_counts, generate_program

    program = generate_program(L, K, full_rank=full_rank)
    module = _swapped(
        FusedMomentContraction, MomentContraction(program, irreps_in={"edge_embedding": None})
    )
    readout = LinearReadout(len(program.mapping), irreps_in=module.irreps_out).double()
    module.attach(torch.nn.Sequential(module, readout), [], readout)
    n2 = K * (K + 1) // 2
    assert module.fold_readout
    assert (
        module.readout_quad.numel() == L * n2 * (L * n2 + 1) // 2
    )  # N(N+1)/2 of docs/theory.md §6.7
    assert module.readout_quad_slots.numel() == L * n2  # the rank >= 1 Gram entries D_l(a,b)
    assert module.readout_quad.numel() + module.readout_linear.numel() == sum(
        basis_counts(L, K, full_rank).values()
    )
    gen = torch.Generator().manual_seed(L * 10 + K)
    basic = torch.randn(21, len(program.basic), generator=gen, dtype=torch.float64)
    theta = readout.theta.detach().view(-1)

    def by_loop(b):
        moments = [b[:, k] for k in range(len(program.basic))]
        moments += [torch.zeros_like(b[:, 0])] * (program.moments_count - len(program.basic))
        for p, q, m, o in program.times:
            moments[o] = moments[o] + m * moments[p] * moments[q]
        return sum(t * moments[s] for t, s in zip(theta, program.mapping, strict=True))

    leaf = basic.clone().requires_grad_(True)
    ours = module._fused_readout(leaf)
    expected = by_loop(leaf)
    torch.testing.assert_close(ours.view(-1), expected, rtol=1e-12, atol=1e-12)
    (g_ours,) = torch.autograd.grad(ours.sum(), leaf)
    (g_loop,) = torch.autograd.grad(expected.sum(), leaf)
    torch.testing.assert_close(g_ours, g_loop, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(module._fused_readout, (leaf,))
    (g,) = torch.autograd.grad(module._fused_readout(leaf).square().sum(), leaf, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivatives"):
        g.sum().backward()


def test_operators_reject_bad_input_clearly(ops):
    p = _problem()
    with pytest.raises(RuntimeError, match=r"sus2::basic_moments: vec must be \[E, 3\]"):
        ops.basic_moments(*_args(p, p["vec"][:, :2]))
    with pytest.raises(RuntimeError, match="mu out of range"):
        ops.basic_moments(*_args(dict(p, basic=p["basic"] + torch.tensor([9, 0, 0, 0])), p["vec"]))
    with pytest.raises(RuntimeError, match="atom types out of range"):
        ops.basic_moments(*_args(dict(p, types=p["types"] + 3), p["vec"]))
    with pytest.raises(RuntimeError, match="edge index out of range"):
        ops.basic_moments(*_args(dict(p, neighbor=p["neighbor"] + p["num_nodes"]), p["vec"]))
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.basic_moments(*_args(dict(p, alpha=p["alpha"].float()), p["vec"]))
    with pytest.raises(RuntimeError, match="indexes a slot out of range"):
        ops.contract_moments(
            torch.zeros(2, 3, dtype=torch.float64),
            torch.tensor([0]),
            torch.tensor([1]),
            torch.tensor([1.0]),
            torch.tensor([7]),
            torch.tensor([0]),
            4,
        )


# ----------------------------------------------------------------------------------------------
# models with the modifier against the PyTorch path
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("L", "K", "basis", "scaling_map"),
    [(1, 3, "full_rank", "K"), (2, 3, "published", "K"), (3, 2, "published", "LK"),
     (3, 3, "full_rank", "L")],
)  # fmt: skip
def test_fused_model_equals_pytorch_path_on_random_structures(ops, L, K, basis, scaling_map):
    model = build(
        SUS2Model,
        seed=L * 10 + K,
        model_dtype="float64",
        r_max=5.0,
        type_names=EMT,
        max_rank=L,
        radial_channels=K,
        radial_basis_size=6,
        basis=basis,
        scaling_map=scaling_map,
    )
    model = _randomised(model, L + K)
    fused = _fused_twin(model)
    rng = np.random.default_rng(L * 100 + K)
    for _ in range(3):
        # a neighbour list with a skin: edges beyond the model's cutoff must contribute nothing
        data = random_fcc_structure(rng, len(EMT), 5.6)
        assert_same(evaluate_model(fused, data), evaluate_model(model, data))


@pytest.mark.parametrize("name", list(SPECIES))
def test_fused_model_equals_pytorch_path_on_reference_models(ops, name):
    path = require_reference(f"{name}.mtp")
    model = build(SUS2FromMTP, mtp_path=str(path), type_names=SPECIES[name], model_dtype="float64")
    fused = _fused_twin(model.eval())
    r_max = float(model.metadata["r_max"])
    for frame in read_cfg(require_reference(GOLDEN[name]))[:4]:
        data = frame_data(frame.types, frame.positions, frame.cell, r_max)
        assert_same(evaluate_model(fused, data), evaluate_model(model, data))


def test_fused_model_on_a_batch_and_with_a_pair_potential(ops):
    """Batched frames (batch index, several cells) and a ZBL pair potential (whose module builds
    the edge vectors first, so the kernel's vector form is used)."""
    from nequip.data import AtomicDataDict as D

    zbl = {"_target_": "nequip.nn.pair_potential.ZBL", "units": "metal",
           "chemical_species": EMT}  # fmt: skip
    for pair_potential in (None, zbl):
        model = _small_model(11, 2, 5, pair_potential=pair_potential)
        fused = _fused_twin(model)
        rng = np.random.default_rng(11)
        frames = [random_fcc_structure(rng, len(EMT), 5.0) for _ in range(2)]
        batch = D.batched_from_list(frames)
        assert_same(evaluate_model(fused, batch), evaluate_model(model, batch))


def test_fused_model_with_an_extrapolation_grade(ops):
    """A model with an extrapolation grade needs the basis: the fused path keeps the readout
    out of the kernel (either order of the two modifiers) and gives the same grade."""
    from nequip_sus2._keys import EXTRAPOLATION_GRADE_KEY
    from nequip_sus2.active_set import compute_scalar_basis
    from nequip_sus2.nn.extrapolation import insert_extrapolation_grade

    model = _small_model(13, 2, 5)
    n_basis = next(m for m in model.modules() if isinstance(m, MomentContraction)).num_basis
    gen = torch.Generator().manual_seed(13)
    state = {
        "inverse": torch.randn(len(EMT), n_basis, n_basis, generator=gen, dtype=torch.float64),
        "residual": torch.zeros(0),
        "residual_scale": torch.ones(len(EMT), dtype=torch.float64),
    }
    graded = insert_extrapolation_grade(copy.deepcopy(model), state)
    before = _fused_twin(graded, folded=False)  # grade first, then the fused kernels
    after = copy.deepcopy(model)
    MomentContraction.enable_fused_moments(after)
    insert_extrapolation_grade(after, state).eval()  # fused kernels first: unfolded again
    data = random_fcc_structure(np.random.default_rng(13), len(EMT), 5.0)
    reference = graded.eval()(dict(data))[EXTRAPOLATION_GRADE_KEY].detach()
    for fused in (before, after):
        assert not next(m for m in fused.modules() if isinstance(m, MomentContraction)).fold_readout
        assert_same(evaluate_model(fused, data), evaluate_model(graded, data))
        torch.testing.assert_close(fused(dict(data))[EXTRAPOLATION_GRADE_KEY], reference)
    with pytest.raises(ValueError, match="never forms the scalar basis"):
        compute_scalar_basis(_fused_twin(model), [data])


def test_fused_float32_model_is_close(ops):
    model = _small_model(3, 3, 6, model_dtype="float32")
    fused = _fused_twin(model)
    data = random_fcc_structure(np.random.default_rng(3), len(EMT), 5.0)
    assert_same(evaluate_model(fused, data), evaluate_model(model, data), rtol=1e-5)


def test_training_keeps_the_pytorch_path(ops):
    """In train() mode the modifier changes nothing: parameter gradients of a force loss exist
    and equal the unmodified model's; in eval() mode parameters are not differentiated."""
    model = _small_model(5, 2, 5)
    fused = _fused_twin(model)
    data = random_fcc_structure(np.random.default_rng(5), len(EMT), 5.0)
    assert_same(
        evaluate_model(fused.train(), data, with_param_grads=True),
        evaluate_model(model.train(), data, with_param_grads=True),
    )
    out = fused.eval()(dict(data))
    coeffs = [p for n, p in fused.named_parameters() if n.endswith("coeffs")]
    with pytest.raises(RuntimeError, match="not have been used in the graph"):
        torch.autograd.grad(out[AtomicDataDict.TOTAL_ENERGY_KEY].sum(), coeffs)


def test_no_second_derivatives(ops):
    p = _problem()
    vec = p["vec"].clone().requires_grad_(True)
    out = ops.basic_moments(*_args(p, vec))
    (g,) = torch.autograd.grad(out.square().sum(), vec, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivatives"):
        g.sum().backward()


def test_modifier_needs_a_sus2_model(ops):
    with pytest.raises(ValueError, match="enable_fused_moments needs a SUS2 model"):
        MomentContraction.enable_fused_moments(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_library_build_is_cached(ops, tmp_path, monkeypatch):
    """A second build call reuses the cached library; the key depends on the ISA flags."""
    from nequip_sus2 import kernels

    first = kernels.build()
    stamp = first.stat().st_mtime_ns
    assert kernels.build() == first and first.stat().st_mtime_ns == stamp
    monkeypatch.setattr(kernels, "capability_flags", lambda: [])
    assert kernels.cached_library() != first


def test_modifier_swaps_modules_and_keeps_the_state(ops):
    """The kernel modules replace the concept modules with the same state dict (keys, values);
    a second application changes nothing; train() mode gives the unmodified model's output."""
    from nequip_sus2.kernels import fused as kernel_modules

    model = _small_model(17, 2, 5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fused = copy.deepcopy(model)
    for _ in range(2):
        MomentContraction.enable_fused_moments(fused)
    assert fused.state_dict().keys() == state.keys()
    for key, value in fused.state_dict().items():
        assert torch.equal(value, state[key]), key
    kinds = {type(m) for m in fused.modules()}
    for name in ("FusedPairScaling", "FusedRadialBasis", "FusedElementEmbedding",
                 "FusedMomentContraction", "FusedReadout"):  # fmt: skip
        assert getattr(kernel_modules, name) in kinds
    data = random_fcc_structure(np.random.default_rng(17), len(EMT), 5.0)
    assert_same(evaluate_model(fused.eval(), data), evaluate_model(model.eval(), data))
    assert_same(evaluate_model(fused.train(), data), evaluate_model(model.train(), data))
