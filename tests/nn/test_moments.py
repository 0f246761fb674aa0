"""MomentContraction: basic moments sum_j f_mu u^k over an explicit edge list and the contraction
program, against explicit contraction formulas by hand, in float64."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import F64
from _helpers import edge_graph as _graph
from nequip.data import AtomicDataDict

from nequip_sus2._keys import SCALAR_BASIS_KEY
from nequip_sus2.nn import MomentContraction
from nequip_sus2.program import ContractionProgram

pytestmark = pytest.mark.usefixtures("float64_default_dtype")

MOM_POS = [[0.0, 0.0, 0.0], [1.2, 0.3, -0.4], [-0.2, 0.9, 0.7], [5.0, 5.0, 5.0]]
# one-directional 1 -> 2 on purpose (centre = edge_index[0]); atom 3 has no neighbours
MOM_EDGES = [(0, 1), (1, 0), (0, 2), (2, 0), (1, 2)]
MOM_F = [  # f[e, mu], mu = 0, 1, 2
    [0.8, -0.5, 1.3],
    [0.4, 0.9, -0.7],
    [-1.1, 0.6, 0.2],
    [0.3, -0.2, 0.5],
    [0.7, 1.4, -0.6],
]
MOM_BASIC = (
    (0, 0, 0, 0),  # 0: s      = sum f0
    (1, 1, 0, 0),  # 1: v_x    = sum f1 u_x
    (1, 0, 1, 0),  # 2: v_y
    (1, 0, 0, 1),  # 3: v_z
    (2, 1, 1, 0),  # 4: A_xy   = sum f2 u_x u_y
    (2, 0, 0, 2),  # 5: A_zz   = sum f2 u_z^2
    (2, 0, 3, 0),  # 6: Y      = sum f2 u_y^3
)
# file order: valid for sequential application, interleaving degrees 2, 3, 4, 2
MOM_TIMES = (
    (0, 0, 1, 7),  # 7  = s s                         (degree 2)
    (0, 7, 1, 8),  # 8  = s^3                         (degree 3)
    (1, 1, 1, 9),  # 9  = v . v                       (degree 2)
    (4, 5, 2, 11),  # 11 = 2 A_xy A_zz + 3 v_z Y      (degree 2)
    (2, 2, 1, 9),
    (3, 3, 1, 9),
    (0, 9, 1, 10),  # 10 = s (v . v)                  (degree 3)
    (3, 6, 3, 11),
    (9, 9, 1, 12),  # 12 = (v . v)^2 + 3 (s s) M_11   (degree 4)
    (7, 11, 3, 12),
    (1, 2, 1, 13),  # 13 = v_x v_y, not mapped        (degree 2)
)
# basic slots 0 and 3 in the mapping; slot 14 is never written (stays 0)
MOM_MAPPING = (0, 7, 8, 9, 10, 11, 12, 3, 14)
MOM_IRREPS = {AtomicDataDict.EDGE_EMBEDDING_KEY: "3x0e"}


def _expected_basis(atom: int) -> list[float]:
    """The scalar basis of one atom, by hand from the explicit edge list."""
    s = vx = vy = vz = axy = azz = y3 = 0.0
    for (i, j), (f0, f1, f2) in zip(MOM_EDGES, MOM_F, strict=True):
        if i != atom:
            continue
        r = math.dist(MOM_POS[i], MOM_POS[j])
        ux, uy, uz = ((MOM_POS[j][k] - MOM_POS[i][k]) / r for k in range(3))
        s += f0
        vx += f1 * ux
        vy += f1 * uy
        vz += f1 * uz
        axy += f2 * ux * uy
        azz += f2 * uz * uz
        y3 += f2 * uy**3
    vv = vx * vx + vy * vy + vz * vz
    m11 = 2 * axy * azz + 3 * vz * y3
    return [s, s * s, s**3, vv, s * vv, m11, vv * vv + 3 * s * s * m11, vz, 0.0]


def _moment_graph(requires_grad=False):
    pos = torch.tensor(MOM_POS, dtype=F64, requires_grad=requires_grad)
    f = torch.tensor(MOM_F, dtype=F64)
    return _graph(pos, [0, 0, 0, 0], MOM_EDGES, **{AtomicDataDict.EDGE_EMBEDDING_KEY: f})


def test_moment_contraction_hand_values():
    program = ContractionProgram(15, MOM_BASIC, MOM_TIMES, MOM_MAPPING)
    assert program.degrees()[7:] == [2, 3, 2, 3, 2, 4, 2, 0]
    module = MomentContraction(program, irreps_in=MOM_IRREPS)
    basis = module(_moment_graph())[SCALAR_BASIS_KEY]
    assert basis.shape == (4, len(MOM_MAPPING))
    for atom in range(4):
        expected = _expected_basis(atom)
        assert basis[atom].tolist() == pytest.approx(expected, rel=1e-13, abs=1e-14)
    # the isolated atom gets exact zeros; the centre convention is visible in atom 2 (one edge)
    assert torch.all(basis[3] == 0)
    assert basis[2, 0].item() == pytest.approx(MOM_F[3][0], rel=1e-15)


def test_moment_contraction_entry_order_irrelevant():
    """Entries in file order and the same entries grouped by degree give identical results."""
    degrees = ContractionProgram(15, MOM_BASIC, MOM_TIMES, MOM_MAPPING).degrees()
    grouped = tuple(sorted(MOM_TIMES, key=lambda e: degrees[e[3]]))
    assert grouped != MOM_TIMES
    outs = []
    for times in (MOM_TIMES, grouped):
        module = MomentContraction(
            ContractionProgram(15, MOM_BASIC, times, MOM_MAPPING), irreps_in=MOM_IRREPS
        )
        outs.append(module(_moment_graph())[SCALAR_BASIS_KEY])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-15, atol=1e-15)


def test_moment_contraction_without_contractions():
    """Only rank-0 basic moments, no entries: B = (sum_j f_0, untouched slot = 0)."""
    program = ContractionProgram(2, ((0, 0, 0, 0),), (), (0, 1))
    module = MomentContraction(program, irreps_in={AtomicDataDict.EDGE_EMBEDDING_KEY: "1x0e"})
    assert "num_entries=0" in repr(module)
    f = torch.tensor([[0.5], [0.25], [2.0]])
    data = _graph(
        MOM_POS[:3], [0, 0, 0], [(0, 1), (1, 0), (0, 2)], **{AtomicDataDict.EDGE_EMBEDDING_KEY: f}
    )
    basis = module(data)[SCALAR_BASIS_KEY]
    assert basis.tolist() == [[2.5, 0.0], [0.25, 0.0], [0.0, 0.0]]


def test_moment_contraction_rejects_invalid_program():
    bad = ContractionProgram(8, MOM_BASIC, ((0, 0, 1, 3),), (0,))  # writes into a basic slot
    with pytest.raises(ValueError, match="basic slot"):
        MomentContraction(bad, irreps_in=MOM_IRREPS)
