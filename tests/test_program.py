"""Tests of the SUS2 contraction-program generator (docs/theory.md §2.5, §2.6, §6)."""

from __future__ import annotations

import importlib.util
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from nequip_sus2.program import (
    SCALING_MAPS,
    ContractionProgram,
    basis_counts,
    generate_program,
    infer_scaling_map,
    num_scaling_channels,
    scaling_channel_of_mu,
)

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"

# (file, L, K) of the published models.
PUBLISHED = [("alloy.mtp", 2, 3), ("cathod.mtp", 3, 3), ("cu2se_p.mtp", 3, 2)]

# Basis sizes quoted in docs/theory.md §6: (published N_B, numerical rank = full-rank N_B).
QUOTED_SIZES = {(2, 3): (175, 169), (3, 3): (322, 310), (2, 2): (62, 59), (3, 2): (109, 103)}

SHAPES = [(L, K) for L in (1, 2, 3) for K in (1, 2, 3)]


def evaluate(program: ContractionProgram, u: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Reference evaluator: scalar basis ``B`` of ``program`` for environments ``u``.

    ``u``: (..., n_neighbours, 3) unit vectors, ``f``: (..., n_neighbours, n_mu) radial values.
    ``M_b = sum_j f_mu(j) u_x^a u_y^b u_z^c``, then ``M_o += m M_p M_q`` in order, then
    ``B = M[mapping]``; returns (..., N_B). Leading dimensions are independent environments.
    """
    moments = np.zeros((program.moments_count, *u.shape[:-2]))
    for slot, (mu, a, b, c) in enumerate(program.basic):
        monomial = u[..., 0] ** a * u[..., 1] ** b * u[..., 2] ** c
        moments[slot] = np.sum(f[..., mu] * monomial, axis=-1)
    for p, q, m, o in program.times:
        moments[o] += m * moments[p] * moments[q]
    return np.moveaxis(moments[list(program.mapping)], 0, -1)


def random_environments(
    rng: np.random.Generator, n_env: int, n_mu: int, n_neighbours: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Random unit vectors and independent random radial values per (neighbour, mu)."""
    u = rng.normal(size=(n_env, n_neighbours, 3))
    u /= np.linalg.norm(u, axis=-1, keepdims=True)
    f = rng.normal(size=(n_env, n_neighbours, n_mu))
    return u, f


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniform random proper rotation (QR of a Gaussian matrix, det fixed to +1)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def numerical_rank(matrix: np.ndarray, rtol: float = 1e-9) -> int:
    """Rank of ``matrix`` after normalising its columns (singular values > rtol * largest)."""
    sv = np.linalg.svd(matrix / np.linalg.norm(matrix, axis=0), compute_uv=False)
    return int(np.sum(sv > rtol * sv[0]))


def mapped_degree_counts(program: ContractionProgram) -> dict[int, int]:
    """Number of scalar basis functions per degree, read off the program."""
    degrees = program.degrees()
    return dict(Counter(degrees[slot] for slot in program.mapping))


def _read_published(name: str) -> ContractionProgram:
    if not REFERENCE.is_dir():
        pytest.skip(f"reference models not found at {REFERENCE} (shared/reference is absent)")
    if importlib.util.find_spec("nequip_sus2.io.mtp") is None:
        pytest.skip("nequip_sus2.io.mtp (read_mtp) is not available yet")
    from nequip_sus2.io.mtp import read_mtp

    return read_mtp(REFERENCE / name)


@pytest.mark.parametrize(("name", "L", "K"), PUBLISHED)
def test_reproduces_published_program(name: str, L: int, K: int) -> None:
    """The generator reproduces the published programs entry for entry."""
    mtp = _read_published(name)
    assert mtp.L == L and mtp.radial_funcs_count == K * (L + 1)
    published = mtp.program
    generated = generate_program(L, K)
    assert generated.moments_count == published.moments_count
    assert generated.basic == tuple(tuple(e) for e in published.basic)
    assert generated.times == tuple(tuple(e) for e in published.times)
    assert generated.mapping == tuple(published.mapping)
    assert generated == published


@pytest.mark.parametrize(("L", "K"), sorted(QUOTED_SIZES))
def test_quoted_basis_sizes(L: int, K: int) -> None:
    published_size, full_size = QUOTED_SIZES[L, K]
    assert len(generate_program(L, K).mapping) == published_size
    assert len(generate_program(L, K, full_rank=True).mapping) == full_size
    assert sum(basis_counts(L, K).values()) == published_size
    assert sum(basis_counts(L, K, full_rank=True).values()) == full_size


def test_quoted_degree_counts() -> None:
    """Per-degree counts quoted in docs/theory.md §6."""
    assert basis_counts(2, 3) == {1: 3, 2: 18, 3: 64, 4: 90}
    assert basis_counts(3, 3) == {1: 3, 2: 24, 3: 100, 4: 195}
    assert basis_counts(2, 2) == {1: 2, 2: 9, 3: 24, 4: 27}
    assert basis_counts(3, 2) == {1: 2, 2: 12, 3: 38, 4: 57}


@pytest.mark.parametrize("full_rank", [False, True])
@pytest.mark.parametrize("K", [1, 2, 3, 4])
@pytest.mark.parametrize("L", [1, 2, 3])
def test_counts_and_structure(L: int, K: int, full_rank: bool) -> None:
    """Degree counts match the closed forms; the program is valid with degrees <= 4."""
    program = generate_program(L, K, full_rank=full_rank)
    program.validate(radial_funcs_count=K * (L + 1))
    assert mapped_degree_counts(program) == basis_counts(L, K, full_rank=full_rank)
    degrees = program.degrees()
    assert max(degrees) == 4
    assert all(d >= 1 for d in degrees), "every slot is written"
    # Basic layout: mu-major, every mu with one rank and all its monomials.
    assert len(program.basic) == K * (L + 1) * (L + 2) * (L + 3) // 6
    for p, q, _m, o in program.times:
        assert p < o and q < o
    # The mapping is ascending and duplicate-free.
    assert list(program.mapping) == sorted(set(program.mapping))


@pytest.mark.parametrize(("L", "K"), SHAPES)
def test_full_rank_is_compact(L: int, K: int) -> None:
    """full_rank keeps the basic block, feeds every slot into a scalar, and only drops
    degree-4 duplicates."""
    full = generate_program(L, K)
    reduced = generate_program(L, K, full_rank=True)
    assert reduced.basic == full.basic
    used = set(reduced.mapping) | {s for p, q, _m, _o in reduced.times for s in (p, q)}
    assert used >= set(range(len(reduced.basic), reduced.moments_count))
    n2 = K * (K + 1) // 2
    assert len(full.mapping) - len(reduced.mapping) == {1: 0, 2: n2, 3: 2 * n2}[L]


@pytest.mark.parametrize("full_rank", [False, True])
@pytest.mark.parametrize(("L", "K"), SHAPES)
def test_rotation_invariance(L: int, K: int, full_rank: bool) -> None:
    program = generate_program(L, K, full_rank=full_rank)
    rng = np.random.default_rng(1000 * L + 10 * K + full_rank)
    u, f = random_environments(rng, n_env=8, n_mu=K * (L + 1))
    rotation = random_rotation(rng)
    before = evaluate(program, u, f)
    after = evaluate(program, u @ rotation.T, f)
    np.testing.assert_allclose(after, before, rtol=1e-10, atol=1e-10 * np.abs(before).max())
    # Non-trivial check: the basic (non-scalar) moments do change under the rotation.
    probe = ContractionProgram(
        program.moments_count, program.basic, (), tuple(range(len(program.basic)))
    )
    assert not np.allclose(evaluate(probe, u @ rotation.T, f), evaluate(probe, u, f))


@pytest.mark.parametrize(("L", "K"), SHAPES)
def test_full_rank_numerically(L: int, K: int) -> None:
    """The full-rank basis has full numerical rank on random environments; the published
    layout has exactly the duplicates named in docs/theory.md §6."""
    rng = np.random.default_rng(7 * L + K)
    full = generate_program(L, K)
    reduced = generate_program(L, K, full_rank=True)
    u, f = random_environments(rng, n_env=len(full.mapping) + 60, n_mu=K * (L + 1))
    assert numerical_rank(evaluate(reduced, u, f)) == len(reduced.mapping)
    assert numerical_rank(evaluate(full, u, f)) == len(reduced.mapping)
    if (L, K) in QUOTED_SIZES:
        assert len(reduced.mapping) == QUOTED_SIZES[L, K][1]


@pytest.mark.parametrize(("L", "K"), [(2, 2), (3, 2)])
def test_named_duplicates(L: int, K: int) -> None:
    """<SQ1_a,SQ1_b> = D_1(a,b)^2 and <OUT12_a,OUT12_b> = D_1(a,b) D_2(a,b) exactly."""
    program = generate_program(L, K)
    rng = np.random.default_rng(3)
    u, f = random_environments(rng, n_env=4, n_mu=K * (L + 1))
    values = dict(zip(program.mapping, np.moveaxis(evaluate(program, u, f), -1, 0), strict=True))
    # Scalars that are single-entry products of two scalars, i.e. D*D (and s*D, s*s).
    products = {
        o: (p, q)
        for p, q, m, o in program.times
        if m == 1 and p in values and q in values and o in values
    }
    product_values = [values[p] * values[q] for p, q in products.values()]
    duplicated = [
        o
        for o in program.mapping
        if o not in products
        and any(np.allclose(values[o], v, rtol=1e-12, atol=0) for v in product_values)
    ]
    n2 = K * (K + 1) // 2
    assert len(duplicated) == {2: n2, 3: 2 * n2}[L]


@pytest.mark.parametrize("L", [0, 4, 5, -1])
def test_invalid_L(L: int) -> None:
    with pytest.raises(ValueError, match="L = "):
        generate_program(L, 2)
    with pytest.raises(ValueError, match="L = "):
        basis_counts(L, 2)


@pytest.mark.parametrize("K", [0, -1])
def test_invalid_K(K: int) -> None:
    with pytest.raises(ValueError, match="K = "):
        generate_program(2, K)
    with pytest.raises(ValueError, match="K = "):
        basis_counts(2, K)


@pytest.mark.parametrize(("L", "K", "full_rank"), [(1, 2, False), (2, 3, False), (3, 2, True)])
def test_stages_are_independent_and_complete(L: int, K: int, full_rank: bool) -> None:
    """Each stage only reads slots that no entry of the same or a later stage writes, and the
    stages hold every entry once: evaluating stage by stage equals the entry-by-entry order."""
    program = generate_program(L, K, full_rank=full_rank)
    entries, bounds = program.stages()
    assert Counter(entries) == Counter(program.times)
    assert bounds[0] == 0 and bounds[-1] == len(entries) and bounds == sorted(set(bounds))
    for s in range(len(bounds) - 1):
        written_later = {e[3] for e in entries[bounds[s] :]}
        assert not {x for e in entries[bounds[s] : bounds[s + 1]] for x in e[:2]} & written_later
    rng = np.random.default_rng(L * 10 + K)
    basic = rng.normal(size=len(program.basic))
    by_stage = _run(program, basic)
    staged = ContractionProgram(
        program.moments_count, program.basic, tuple(entries), program.mapping
    )
    np.testing.assert_allclose(_run(staged, basic), by_stage, rtol=1e-13)


def _run(program: ContractionProgram, basic: np.ndarray) -> np.ndarray:
    moments = np.zeros(program.moments_count)
    moments[: len(basic)] = basic
    for p, q, m, o in program.times:
        moments[o] += m * moments[p] * moments[q]
    return moments[list(program.mapping)]


def test_program_dict_round_trip() -> None:
    program = generate_program(3, 2, full_rank=True)
    data = program.to_dict()
    assert all(isinstance(v, (int, list)) for v in data.values())  # plain data, no tuples
    assert ContractionProgram.from_dict(data) == program


def test_canonical_shape() -> None:
    for L, K in [(1, 3), (2, 2), (3, 1)]:
        assert generate_program(L, K).canonical_shape() == (K, L)
    program = generate_program(2, 2)
    swapped = list(program.basic)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    assert replace(program, basic=tuple(swapped)).canonical_shape() is None


@pytest.mark.parametrize("scaling_map", SCALING_MAPS)
def test_scaling_map_inference(scaling_map: str) -> None:
    """The map of a channel table is found again (ties resolve to the first of K, L, LK)."""
    for L, n_mu in [(2, 9), (3, 8), (1, 6)]:
        eta = scaling_channel_of_mu(scaling_map, L, n_mu)
        found = infer_scaling_map(eta, L)
        assert scaling_channel_of_mu(found, L, n_mu) == eta
        assert num_scaling_channels(found, n_mu, L) == max(eta) + 1
    assert infer_scaling_map([0, 0, 1, 2, 2, 2], 2) is None
    with pytest.raises(ValueError, match="scaling_map must be one of"):
        scaling_channel_of_mu("KL", 2, 9)
