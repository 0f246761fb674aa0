"""The moment-tensor contraction program (docs/theory.md §2.5, §2.6, §6) and the scaling maps
eta(mu).

A program lists the basic moments ``M_b(i) = sum_j f_mu(r_ij) u_x^a u_y^b u_z^c`` (slots
``0 .. len(basic)-1``), the contraction entries ``M_o += m * M_p * M_q`` applied in order, and the
slots that are the scalar basis functions ``B_a(i)``. Published ``.mtp`` files carry one; new
models get one from :func:`generate_program` (the structural rule of docs/theory.md §6). This
module is the one place that works out the layout (slot degrees, evaluation stages, the
canonical basic slot order) and the radial function -> scaling channel maps; the model, the
kernels, the pre-fit and the ``.mtp`` translation ask it.
"""

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

BasicEntry = tuple[int, int, int, int]  # (mu, a, b, c)
TimesEntry = tuple[int, int, int, int]  # (p, q, m, o)

#: the radial function -> scaling channel maps eta(mu) of the ``.mtp`` field ``scaling_map``
SCALING_MAPS = ("K", "L", "LK")


def _check_scaling_map(scaling_map: str) -> None:
    if scaling_map not in SCALING_MAPS:
        raise ValueError(f"scaling_map must be one of {SCALING_MAPS}, got {scaling_map!r}")


def scaling_channel_of_mu(scaling_map: str, max_rank: int, radial_funcs_count: int) -> list[int]:
    """eta(mu) (docs/theory.md §2.2): K -> floor(mu/(L+1)), L -> mu mod (L+1), LK -> mu."""
    _check_scaling_map(scaling_map)
    L1 = max_rank + 1
    rule = {"K": lambda mu: mu // L1, "L": lambda mu: mu % L1, "LK": lambda mu: mu}[scaling_map]
    return [rule(mu) for mu in range(radial_funcs_count)]


def num_scaling_channels(scaling_map: str, radial_funcs_count: int, L: int) -> int:
    """N_eta of docs/theory.md §2.2: K -> N_mu/(L+1), L -> L+1, LK -> N_mu."""
    return {"K": radial_funcs_count // (L + 1), "L": L + 1, "LK": radial_funcs_count}[scaling_map]


def infer_scaling_map(eta_of_mu: list[int], max_rank: int) -> str | None:
    """The first map of :data:`SCALING_MAPS` that gives ``eta_of_mu``, or ``None``."""
    for name in SCALING_MAPS:
        if scaling_channel_of_mu(name, max_rank, len(eta_of_mu)) == list(eta_of_mu):
            return name
    return None


@dataclass(frozen=True)
class ContractionProgram:
    """A contraction program exactly as stored in an ``.mtp`` file."""

    moments_count: int
    basic: tuple[BasicEntry, ...]
    times: tuple[TimesEntry, ...]
    mapping: tuple[int, ...]

    @classmethod
    def from_dict(cls, data: dict) -> "ContractionProgram":
        """Inverse of :meth:`to_dict`."""
        return cls(
            moments_count=int(data["moments_count"]),
            basic=tuple(tuple(int(v) for v in e) for e in data["basic"]),
            times=tuple((int(p), int(q), m, int(o)) for p, q, m, o in data["times"]),
            mapping=tuple(int(v) for v in data["mapping"]),
        )

    def to_dict(self) -> dict:
        """The program as plain lists (what packaged models carry)."""
        return {
            "moments_count": self.moments_count,
            "basic": [list(e) for e in self.basic],
            "times": [list(e) for e in self.times],
            "mapping": list(self.mapping),
        }

    @property
    def max_power(self) -> int:
        """The largest exponent of one Cartesian component in a basic moment."""
        return max((max(e[1:]) for e in self.basic), default=0)

    def monomials(self) -> list[tuple[int, int, int]]:
        """The distinct monomials ``(a, b, c)`` of the basic slots, in order of first use."""
        return list(dict.fromkeys(tuple(e[1:]) for e in self.basic))

    def stages(self) -> tuple[list[TimesEntry], list[int]]:
        """Entries grouped by the degree of their output slot, and the group bounds.

        Within a stage no entry reads a slot written by the same stage (its inputs have lower
        degree), so each stage is one vectorised gather-multiply-scatter. Returns
        ``(entries, bounds)``: stage ``s`` is ``entries[bounds[s]:bounds[s + 1]]``.
        """
        degrees = self.degrees()
        entries = sorted(self.times, key=lambda e: degrees[e[3]])
        stage_of = [degrees[e[3]] for e in entries]
        if not entries:
            return [], [0]
        inner = [k for k in range(1, len(entries)) if stage_of[k] != stage_of[k - 1]]
        return entries, [0, *inner, len(entries)]

    def canonical_shape(self) -> tuple[int, int] | None:
        """``(K, L)`` if the basic slots have the canonical layout of docs/theory.md §6.6, else
        ``None``.

        Canonical: mu-major with ``mu = k (L+1) + l`` and the rank-``l`` monomials in
        sorted-index order (every generated and published program).
        """
        if not self.basic:
            return None
        L = max(a + b + c for _, a, b, c in self.basic)
        n_mu = max(e[0] for e in self.basic) + 1
        if n_mu % (L + 1):
            return None
        K = n_mu // (L + 1)
        canonical = [
            (k * (L + 1) + rank, idx.count(0), idx.count(1), idx.count(2))
            for k in range(K)
            for rank in range(L + 1)
            for idx in itertools.combinations_with_replacement(range(3), rank)
        ]
        return (K, L) if [tuple(e) for e in self.basic] == canonical else None

    def degrees(self) -> list[int]:
        """Degree (number of basic factors) of every slot; ``degree(o) = degree(p) + degree(q)``."""
        deg = [0] * self.moments_count
        for slot in range(len(self.basic)):
            deg[slot] = 1
        for p, q, _, o in self.times:
            d = deg[p] + deg[q]
            if deg[o] not in (0, d):
                raise ValueError(f"slot {o} receives products of degree {deg[o]} and {d}")
            deg[o] = d
        return deg

    def validate(self, radial_funcs_count: int | None = None) -> None:
        """Check the structural invariants the vectorised evaluator relies on.

        Raises ``ValueError`` naming the offending entry.
        """
        n = self.moments_count
        if len(self.basic) > n:
            raise ValueError(f"{len(self.basic)} basic moments but moments_count = {n}")
        for k, (mu, a, b, c) in enumerate(self.basic):
            if min(mu, a, b, c) < 0:
                raise ValueError(
                    f"alpha_index_basic entry {k} = {(mu, a, b, c)} has a negative index"
                )
            if radial_funcs_count is not None and mu >= radial_funcs_count:
                raise ValueError(
                    f"alpha_index_basic entry {k} uses radial function {mu} "
                    f">= radial_funcs_count = {radial_funcs_count}"
                )
        nb = len(self.basic)
        for k, (p, q, _m, o) in enumerate(self.times):
            if not (0 <= p < n and 0 <= q < n and 0 <= o < n):
                raise ValueError(f"alpha_index_times entry {k} = {(p, q, _m, o)} is out of range")
            if o < nb:
                raise ValueError(f"alpha_index_times entry {k} writes into basic slot {o}")
            if p >= o or q >= o:
                raise ValueError(f"alpha_index_times entry {k} = {(p, q, _m, o)} needs p, q < o")
        for k, slot in enumerate(self.mapping):
            if not 0 <= slot < n:
                raise ValueError(f"alpha_moment_mapping entry {k} = {slot} is out of range")
        self.degrees()


# ---------------------------------------------------------------------------------------------
# Generator (docs/theory.md §6)
# ---------------------------------------------------------------------------------------------

_SUPPORTED_L = (1, 2, 3)
# |T|: number of same-channel pair-tensor types per L (L=1: none, see generate_program).
_PAIR_TYPES = {1: 0, 2: 2, 3: 4}
# Pair types whose self-contraction <P_a, P_b> is an exact duplicate (SQ1; OUT12 for L=3).
_DUPLICATE_PAIR_TYPES = {1: 0, 2: 1, 3: 2}

Index = tuple[int, ...]  # sorted Cartesian index tuple, 0=x, 1=y, 2=z


def _check_shape(L: int, K: int) -> None:
    """Raise ``ValueError`` unless ``L`` in {1, 2, 3} and ``K >= 1``."""
    if isinstance(L, bool) or not isinstance(L, int) or L not in _SUPPORTED_L:
        raise ValueError(
            f"L = {L!r} is not supported: the SUS2 contraction rule is defined for L in "
            f"{{1, 2, 3}} (L = 2, 3 published, L = 1 our extension)"
        )
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"K = {K!r} radial channels: need an integer K >= 1")


def basis_counts(L: int, K: int, full_rank: bool = False) -> dict[int, int]:
    """Number of scalar basis functions per degree, from the closed forms of docs/theory.md §6.3.

    With ``n2 = K(K+1)/2``, ``N = L n2`` and ``|T|`` pair types (0, 2, 4 for L = 1, 2, 3):
    degree 1: ``K``; degree 2: ``(L+1) n2``; degree 3: ``C(K+2,3) + L K n2 + |T| K^2``;
    degree 4: ``N(N+1)/2 + |T| n2``. ``full_rank`` removes the ``n2`` exact duplicates
    ``<SQ1_a,SQ1_b>`` (L >= 2) and ``<OUT12_a,OUT12_b>`` (L = 3) from degree 4.
    """
    _check_shape(L, K)
    n2 = K * (K + 1) // 2
    n_pair = _PAIR_TYPES[L]
    n_rank_ge1 = L * n2
    n_dup = _DUPLICATE_PAIR_TYPES[L] if full_rank else 0
    return {
        1: K,
        2: (L + 1) * n2,
        3: math.comb(K + 2, 3) + L * K * n2 + n_pair * K * K,
        4: n_rank_ge1 * (n_rank_ge1 + 1) // 2 + (n_pair - n_dup) * n2,
    }


def _multiplicity(index: Index) -> int:
    """Number of distinct orderings of ``index`` (multinomial ``l! / (n_x! n_y! n_z!)``)."""
    return math.factorial(len(index)) // math.prod(
        math.factorial(index.count(axis)) for axis in range(3)
    )


def _sym(*axes: int) -> Index:
    """Stored (sorted) component of a symmetric tensor."""
    return tuple(sorted(axes))


class _Builder:
    """Allocates slots in order and emits the entries that fill each new slot."""

    def __init__(self, basic: list[BasicEntry]) -> None:
        self.times: list[TimesEntry] = []
        self.next_slot = len(basic)
        self.scalars: list[int] = []
        self.duplicates: list[int] = []

    def new(self, entries: list[tuple[int, int, int]], scalar: bool = True) -> int:
        """New slot ``o`` with ``M_o = sum m * M_p * M_q`` over ``entries`` = [(p, q, m)]."""
        o = self.next_slot
        self.next_slot += 1
        self.times.extend((p, q, m, o) for p, q, m in entries)
        if scalar:
            self.scalars.append(o)
        return o


def generate_program(L: int, K: int, full_rank: bool = False) -> ContractionProgram:
    """Contraction program of an SUS2 model with max rank ``L`` and ``K`` radial channels (§6).

    Radial function ``mu = k (L+1) + l`` is used with rank ``l`` only; ``M_{k,l}`` is the
    symmetric rank-``l`` moment of channel ``k``. The scalar basis is, by degree:
    ``s_k``; ``D_l(a,b) = <M_{a,l}, M_{b,l}>``; ``s_a s_b s_c``, ``s_c D_l(a,b)`` (l >= 1) and
    ``<M_{c,rank P}, P_a>``; ``D_l(a,b) D_l'(a',b')`` (l, l' >= 1) and ``<P_a, P_b>``, with the
    same-channel pair tensors ``P`` in SQ1 = v v, SQ2 = A.A and, for L = 3, OUT12 = v (x) A and
    SQ3 = T:T (two indices contracted). Slots, entries and multiplicities follow the published
    layout, so (L, K) = (2, 3), (3, 3), (3, 2) reproduce alloy.mtp, cathod.mtp and cu2se_p.mtp
    entry for entry.

    ``L = 1`` (not published, our extension): there are no rank-2/3 moments, so the pair-type
    set is empty (an SQ1 block would only give ``<SQ1_a,SQ1_b> = D_1(a,b)^2``); the basis is
    ``s_k``, ``D_0``, ``D_1``, ``s s s``, ``s D_1`` and ``D_1 D_1`` in the same slot layout.

    ``full_rank=True`` drops the exact duplicates ``<SQ1_a,SQ1_b> = D_1(a,b)^2`` and
    ``<OUT12_a,OUT12_b> = D_1(a,b) D_2(a,b)`` from the mapping, removes the slots and entries
    that then feed no scalar and renumbers the rest (order, and so ``p, q < o``, preserved).

    Raises ``ValueError`` unless ``L`` in {1, 2, 3} and ``K >= 1``.
    """
    _check_shape(L, K)

    # Basic moments: mu-major, monomials with sorted index tuples xx, xy, xz, yy, yz, zz, ...
    basic: list[BasicEntry] = []
    moment: dict[tuple[int, int], dict[Index, int]] = {}
    for k in range(K):
        for rank in range(L + 1):
            comps: dict[Index, int] = {}
            for index in itertools.combinations_with_replacement(range(3), rank):
                comps[index] = len(basic)
                basic.append((k * (L + 1) + rank, index.count(0), index.count(1), index.count(2)))
            moment[k, rank] = comps
    b = _Builder(basic)
    s = [moment[k, 0][()] for k in range(K)]
    b.scalars.extend(s)
    channel_pairs = [(a, c) for a in range(K) for c in range(a, K)]

    # s_a s_b (= D_0), then s_c (s_a s_b) for c >= b.
    for a, c in channel_pairs:
        ab = b.new([(s[a], s[c], 1)])
        for d in range(c, K):
            b.new([(s[d], ab, 1)])

    gram: dict[int, list[int]] = {}

    def add_gram(rank: int) -> None:
        """D_rank(a,b) = sum over stored components of m * M_a * M_b, for a <= b."""
        gram[rank] = [
            b.new(
                [
                    (moment[a, rank][idx], moment[c, rank][idx], _multiplicity(idx))
                    for idx in moment[a, rank]
                ]
            )
            for a, c in channel_pairs
        ]

    def add_s_times_gram(rank: int) -> None:
        """s_c D_rank(a,b): c outer, (a,b) inner."""
        for c in range(K):
            for d in gram[rank]:
                b.new([(s[c], d, 1)])

    def add_gram_products(r1: int, r2: int) -> None:
        """D_r1 D_r2: unordered pairs within one rank, full product across ranks."""
        for i, d1 in enumerate(gram[r1]):
            for d2 in gram[r2][i if r1 == r2 else 0 :]:
                b.new([(d1, d2, 1)])

    def pair_block(
        rank: int,
        make: Callable[[int], list[tuple[Index, int, list[tuple[int, int, int]]]]],
        duplicate: bool,
    ) -> None:
        """One pair-type block: per channel a the components of P_a, then <M_{c,rank}, P_a>
        for c = 0..K-1; after all channels <P_a, P_b> for a <= b.

        ``make(a)`` lists the stored components of P_a as (full index, contraction weight,
        defining entries [(p, q, m)]).
        """
        stored: list[list[tuple[Index, int, int]]] = []
        for a in range(K):
            comps = [(idx, w, b.new(entries, scalar=False)) for idx, w, entries in make(a)]
            stored.append(comps)
            for c in range(K):
                b.new([(moment[c, rank][_sym(*idx)], slot, w) for idx, w, slot in comps])
        for a, c in channel_pairs:
            slot = b.new(
                [(pa, pc, w) for (_, w, pa), (_, _, pc) in zip(stored[a], stored[c], strict=True)]
            )
            if duplicate:
                b.duplicates.append(slot)

    pairs2 = list(itertools.combinations_with_replacement(range(3), 2))

    def sq1(a: int) -> list[tuple[Index, int, list[tuple[int, int, int]]]]:
        """SQ1_a[ij] = v_i v_j."""
        v = moment[a, 1]
        return [((i, j), _multiplicity((i, j)), [(v[(i,)], v[(j,)], 1)]) for i, j in pairs2]

    def sq2(a: int) -> list[tuple[Index, int, list[tuple[int, int, int]]]]:
        """SQ2_a[ij] = sum_k A_ik A_kj."""
        A = moment[a, 2]
        return [
            ((i, j), _multiplicity((i, j)), [(A[_sym(i, k)], A[_sym(k, j)], 1) for k in range(3)])
            for i, j in pairs2
        ]

    def sq3(a: int) -> list[tuple[Index, int, list[tuple[int, int, int]]]]:
        """SQ3_a[ij] = sum_kn T_ikn T_jkn (kn over stored pairs with multiplicity)."""
        T = moment[a, 3]
        return [
            (
                (i, j),
                _multiplicity((i, j)),
                [(T[_sym(i, k, n)], T[_sym(j, k, n)], _multiplicity((k, n))) for k, n in pairs2],
            )
            for i, j in pairs2
        ]

    def out12(a: int) -> list[tuple[Index, int, list[tuple[int, int, int]]]]:
        """OUT12_a[i, jk] = v_i A_jk (vector index outer, symmetric pair inner)."""
        v, A = moment[a, 1], moment[a, 2]
        return [
            ((i, j, k), _multiplicity((j, k)), [(v[(i,)], A[(j, k)], 1)])
            for i in range(3)
            for j, k in pairs2
        ]

    low = [rank for rank in (1, 2) if rank <= L]
    for rank in low:
        add_gram(rank)
    for rank in low:
        add_s_times_gram(rank)
    for r1, r2 in ((1, 1), (1, 2), (2, 2)):
        if r2 <= L:
            add_gram_products(r1, r2)
    if L >= 3:
        add_gram(3)
        pair_block(3, out12, duplicate=True)
        pair_block(2, sq3, duplicate=False)
        for r1 in (1, 2, 3):
            add_gram_products(r1, 3)
        add_s_times_gram(3)
    if L >= 2:
        pair_block(2, sq1, duplicate=True)
        pair_block(2, sq2, duplicate=False)

    program = ContractionProgram(
        moments_count=b.next_slot,
        basic=tuple(basic),
        times=tuple(b.times),
        mapping=tuple(sorted(b.scalars)),
    )
    if full_rank:
        dropped = set(b.duplicates)
        program = _compact(program, tuple(o for o in program.mapping if o not in dropped))
    return program


def _compact(program: ContractionProgram, mapping: tuple[int, ...]) -> ContractionProgram:
    """Program computing only ``mapping``: drop slots/entries feeding none of it, renumber.

    Basic slots are always kept; the remaining slots keep their relative order, so
    ``p, q < o`` and the entry order are preserved.
    """
    needed = set(mapping)
    for p, q, _m, o in reversed(program.times):
        if o in needed:
            needed.update((p, q))
    keep = sorted(needed | set(range(len(program.basic))))
    new = {old: i for i, old in enumerate(keep)}
    return ContractionProgram(
        moments_count=len(keep),
        basic=program.basic,
        times=tuple((new[p], new[q], m, new[o]) for p, q, m, o in program.times if o in new),
        mapping=tuple(new[o] for o in mapping),
    )
