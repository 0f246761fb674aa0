"""Tests of the ``.mtp`` reader and writer (docs/theory.md §3.1) and the parameter count
(docs/theory.md §2.9).

Values of the published files are checked against numbers read from the file text by the small,
independent helpers below, never against the parser itself.
"""

from __future__ import annotations

import functools
import math
import os
import random
import re
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import nequip_sus2.io.mtp as mtp_module
from nequip_sus2.io.mtp import MTPFile, MTPFormatError, format_mtp, read_mtp, write_mtp
from nequip_sus2.program import ContractionProgram, generate_program

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
PUBLISHED = ["alloy.mtp", "cathod.mtp", "cu2se_p.mtp"]
# Parameter counts quoted in docs/theory.md §2.9 (cu2se_p is computed from its header only).
QUOTED_PARAMETER_COUNT = {"alloy.mtp": 17657, "cathod.mtp": 2066, "cu2se_p.mtp": None}
COEFF_KEYS = ("shift_coeffs", "scal_coeffs", "species_coeffs", "moment_coeffs")


def reference_text(name: str) -> tuple[Path, str]:
    """Path and text of a published model; skip when ``../shared/reference`` is absent."""
    path = REFERENCE / name
    if not path.is_file():
        pytest.skip(
            f"published model {path} is absent (needs the ../shared checkout beside the project)"
        )
    return path, path.read_text()


# ---------------------------------------------------------------------------------------------
# Independent readers of the file text (no use of nequip_sus2.io.mtp)
# ---------------------------------------------------------------------------------------------


def raw_value(text: str, key: str, indent: str = "") -> str | None:
    """Value of ``<indent><key> = value``; None if absent; fails if the key appears twice."""
    found = re.findall(rf"^{indent}{re.escape(key)} = (.*)$", text, flags=re.MULTILINE)
    assert len(found) <= 1, f"{key} appears {len(found)} times"
    return found[0] if found else None


def int_value(text: str, key: str) -> int:
    value = raw_value(text, key, indent="\t?")
    assert value is not None, key
    return int(value)


def float_list(value: str) -> list[float]:
    assert value.startswith("{") and value.endswith("}"), value
    return [float(tok) for tok in value[1:-1].split(", ")]


def int_entries(value: str) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in e.split(",")) for e in re.findall(r"\{([^{}]*)\}", value)]


def radial_rows(text: str) -> list[list[float]]:
    return [float_list(line[3:]) for line in text.split("\n") if line.startswith("\t\t\t{")]


def n_eta_by_hand(scaling_map: str, L: int, n_mu: int) -> int:
    """Spec §2.2 table: K -> N_mu/(L+1), L -> L+1, LK -> N_mu."""
    return {"K": n_mu // (L + 1), "L": L + 1, "LK": n_mu}[scaling_map]


def line_no(text: str, prefix: str, occurrence: int = 0) -> int:
    """1-based number of the ``occurrence``-th line starting with ``prefix``."""
    hits = [i + 1 for i, line in enumerate(text.split("\n")) if line.startswith(prefix)]
    assert len(hits) > occurrence, f"no line starting with {prefix!r}"
    return hits[occurrence]


def f15(x: float) -> float:
    """The value a float has after one write/read cycle (written as '%.15e')."""
    return float("%.15e" % x)  # noqa: UP031 (the file format is printf's %.15e)


# ---------------------------------------------------------------------------------------------
# 1. Published files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_round_trip_byte_exact(name: str, tmp_path: Path) -> None:
    path, text = reference_text(name)
    mtp = read_mtp(path)
    out = format_mtp(mtp)
    assert not out.endswith("\n")  # the original writer ends without a newline
    assert text in (out, out + "\n")  # byte-exact up to one final newline

    target = tmp_path / name
    write_mtp(mtp, target)
    assert target.read_bytes() == out.encode()
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left behind
    again = read_mtp(target)
    assert again == mtp
    assert format_mtp(again) == out


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_values_match_file_text(name: str) -> None:
    path, text = reference_text(name)
    mtp = read_mtp(path)
    assert mtp.is_trained

    L, C = int_value(text, "L"), int_value(text, "species_count")
    R, n_mu = int_value(text, "radial_basis_size"), int_value(text, "radial_funcs_count")
    scaling_map = raw_value(text, "scaling_map")
    assert (mtp.L, mtp.species_count, mtp.scaling_map) == (L, C, scaling_map)
    assert (mtp.radial_basis_size, mtp.radial_funcs_count) == (R, n_mu)
    assert mtp.radial_basis_type == raw_value(text, "radial_basis_type")
    assert mtp.version == raw_value(text, "version")
    assert mtp.potential_name == raw_value(text, "potential_name")
    assert mtp.min_dist == float(raw_value(text, "min_dist", indent="\t"))
    assert mtp.max_dist == float(raw_value(text, "max_dist", indent="\t"))
    assert 0 < mtp.min_dist < mtp.max_dist

    # sigma = top-level scaling (1 if absent) x optional scaling inside the radial block.
    top = raw_value(text, "scaling")
    radial = raw_value(text, "scaling", indent="\t")
    sigma = (1.0 if top is None else float(top)) * (1.0 if radial is None else float(radial))
    assert mtp.sigma == sigma
    assert mtp.scaling == (1.0 if top is None else float(top))
    assert mtp.radial_scaling == (None if radial is None else float(radial))

    # Contraction program: header counts, entry counts in the text and parsed program agree.
    basic = int_entries(raw_value(text, "alpha_index_basic"))
    times = int_entries(raw_value(text, "alpha_index_times"))
    mapping = [int(v) for v in raw_value(text, "alpha_moment_mapping")[1:-1].split(", ")]
    prog = mtp.program
    assert isinstance(prog, ContractionProgram)
    assert len(prog.basic) == len(basic) == int_value(text, "alpha_index_basic_count")
    assert len(prog.times) == len(times) == int_value(text, "alpha_index_times_count")
    assert len(prog.mapping) == len(mapping) == int_value(text, "alpha_scalar_moments")
    assert prog.moments_count == int_value(text, "alpha_moments_count")
    assert (tuple(prog.basic[0]), tuple(prog.basic[-1])) == (basic[0], basic[-1])
    assert (tuple(prog.times[0]), tuple(prog.times[-1])) == (times[0], times[-1])
    assert list(prog.mapping) == mapping
    assert all(len(e) == 4 for e in basic + times)

    # Coefficient blocks.
    theta = float_list(raw_value(text, "moment_coeffs"))
    assert len(mtp.moment_coeffs) == len(theta) == len(mapping)
    assert mtp.moment_coeffs[0] == theta[0] and mtp.moment_coeffs[-1] == theta[-1]
    assert mtp.moment_coeffs == theta
    assert mtp.shift_coeffs == float_list(raw_value(text, "shift_coeffs"))
    assert mtp.species_coeffs == float_list(raw_value(text, "species_coeffs"))
    assert len(mtp.shift_coeffs) == len(mtp.species_coeffs) == C
    scal = float_list(raw_value(text, "scal_coeffs"))
    assert mtp.scal_coeffs == scal
    assert len(scal) == 2 * n_eta_by_hand(scaling_map, L, n_mu) * C * C
    assert mtp.num_scaling_channels == n_eta_by_hand(scaling_map, L, n_mu)
    rows = radial_rows(text)
    assert len(rows) == n_mu and all(len(row) == R + C for row in rows)
    assert mtp.radial_coeffs == rows


@pytest.mark.parametrize("name", PUBLISHED)
def test_parameter_count_by_hand(name: str) -> None:
    """P = C + 2 N_eta C^2 + N_mu (R + C) + C + N_B (docs/theory.md §2.9), from the header
    values."""
    path, text = reference_text(name)
    C, L = int_value(text, "species_count"), int_value(text, "L")
    R, n_mu = int_value(text, "radial_basis_size"), int_value(text, "radial_funcs_count")
    n_b = int_value(text, "alpha_scalar_moments")
    n_eta = n_eta_by_hand(raw_value(text, "scaling_map"), L, n_mu)
    expected = C + 2 * n_eta * C**2 + n_mu * (R + C) + C + n_b
    if QUOTED_PARAMETER_COUNT[name] is not None:
        assert expected == QUOTED_PARAMETER_COUNT[name]
    else:  # cu2se_p: C 2, L 3, K map (N_eta 2), R 8, N_mu 8, N_B 109
        assert expected == 2 + 2 * 2 * 4 + 8 * (8 + 2) + 2 + 109 == 209
    assert read_mtp(path).parameter_count() == expected
    # Every stored coefficient (dead radial weights included) is one counted parameter.
    stored = sum(len(float_list(raw_value(text, key))) for key in COEFF_KEYS)
    stored += sum(len(row) for row in radial_rows(text))
    assert stored == expected


# ---------------------------------------------------------------------------------------------
# 2. Untrained templates (tolerant spacing)
# ---------------------------------------------------------------------------------------------


def template_text(program: ContractionProgram, L: int, scaling_map: str, C: int, R: int) -> str:
    """An untrained template in the terse style of the original templates (docs/theory.md §3.1)."""
    n_mu = 1 + max(mu for mu, *_ in program.basic)

    def entries(es) -> str:
        return "{" + ",".join("{" + ",".join(map(str, e)) + "}" for e in es) + "}"

    return "\n".join(
        [
            "MTP",
            "version = 1.1.0",
            f"potential_name = MTP_l{L}",
            f"L = {L}",
            f"scaling_map ={scaling_map}",
            f"species_count= {C}",
            "potential_tag = ",
            "radial_basis_type = RBChebyshev_sss",
            "\tmin_dist = 1.45",
            "\tmax_dist = 6",
            f"\tradial_basis_size = {R}",
            f"\tradial_funcs_count={n_mu}",
            f"alpha_moments_count ={program.moments_count}",
            f"alpha_index_basic_count ={len(program.basic)}",
            f"alpha_index_basic = {entries(program.basic)}",
            f"alpha_index_times_count ={len(program.times)}",
            f"alpha_index_times = {entries(program.times)}",
            f"alpha_scalar_moments ={len(program.mapping)}",
            "alpha_moment_mapping = {" + ",".join(map(str, program.mapping)) + "}",
            "",
        ]
    )


@pytest.mark.parametrize(
    ("L", "K", "scaling_map", "full_rank"),
    [(1, 1, "L", False), (2, 2, "K", False), (2, 3, "K", True), (3, 2, "LK", False)],
)
def test_untrained_template(L: int, K: int, scaling_map: str, full_rank: bool, tmp_path) -> None:
    program = generate_program(L, K, full_rank=full_rank)
    C, R = 3, 5
    text = template_text(program, L, scaling_map, C, R)
    assert "alpha_moments_count =" in text and "{{0,0,0,0}," in text
    path = tmp_path / "template.mtp"
    path.write_text(text)
    mtp = read_mtp(path)
    assert not mtp.is_trained
    assert all(getattr(mtp, key) is None for key in (*COEFF_KEYS, "radial_coeffs"))
    assert mtp.program == program
    assert (mtp.L, mtp.scaling_map, mtp.species_count) == (L, scaling_map, C)
    assert (mtp.radial_basis_size, mtp.radial_funcs_count) == (R, K * (L + 1))
    assert (mtp.min_dist, mtp.max_dist, mtp.sigma) == (1.45, 6.0, 1.0)
    assert (mtp.potential_name, mtp.potential_tag) == (f"MTP_l{L}", "")
    n_eta = n_eta_by_hand(scaling_map, L, K * (L + 1))
    n_mu = K * (L + 1)
    assert mtp.parameter_count() == C + 2 * n_eta * C**2 + n_mu * (R + C) + C + len(program.mapping)
    # A template also round-trips through the writer (in the writer's layout).
    out = format_mtp(mtp)
    assert "shift_coeffs" not in out and "radial_coeffs" not in out
    write_mtp(mtp, tmp_path / "again.mtp")
    assert read_mtp(tmp_path / "again.mtp") == mtp


# ---------------------------------------------------------------------------------------------
# 3. Property-based round trips
# ---------------------------------------------------------------------------------------------

# |x| <= 1e300: '%.15e' rounds the largest doubles up past DBL_MAX (they would read back as inf).
finite = st.floats(min_value=-1e300, max_value=1e300, allow_nan=False, allow_infinity=False)
interesting = st.sampled_from([0.0, -0.0, 1.0, math.nextafter(1.0, 2.0), 5e-324, -1e-310, 1e300])
floats = st.one_of(finite, interesting)
token = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-", max_size=12)


@functools.cache
def program_for(L: int, K: int) -> ContractionProgram:
    return generate_program(L, K)


@st.composite
def mtp_files(draw) -> MTPFile:
    L = draw(st.sampled_from([1, 2, 3]))
    K = draw(st.sampled_from([1, 2]))
    C = draw(st.integers(1, 3))
    R = draw(st.integers(1, 4))
    scaling_map = draw(st.sampled_from(["K", "L", "LK"]))
    n_mu = K * (L + 1)
    n_eta = n_eta_by_hand(scaling_map, L, n_mu)
    program = program_for(L, K)

    def vec(n: int) -> list[float]:
        return draw(st.lists(floats, min_size=n, max_size=n))

    # the reader refuses a cutoff that is not 0 < min_dist < max_dist (as written, '%.15e')
    positive = floats.filter(lambda x: x > 0)
    min_dist, max_dist = sorted(draw(st.lists(positive, min_size=2, max_size=2)))
    assume(f15(min_dist) < f15(max_dist))

    return MTPFile(
        L=L,
        scaling_map=scaling_map,
        species_count=C,
        min_dist=min_dist,
        max_dist=max_dist,
        radial_basis_size=R,
        radial_funcs_count=n_mu,
        program=program,
        radial_basis_type=draw(st.sampled_from(["RBChebyshev_sss", "RBChebyshev_sss_lmp"])),
        potential_name=draw(st.none() | token.filter(bool)),
        scaling=draw(floats),
        radial_scaling=draw(st.none() | floats),
        potential_tag=draw(st.none() | token),
        shift_coeffs=vec(C),
        scal_coeffs=vec(2 * n_eta * C * C),
        radial_coeffs=[vec(R + C) for _ in range(n_mu)],
        species_coeffs=vec(C),
        moment_coeffs=vec(len(program.mapping)),
    )


def _check_round_trip(mtp: MTPFile) -> None:
    text = format_mtp(mtp)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random.mtp"
        write_mtp(mtp, path)
        assert path.read_text() == text
        parsed = read_mtp(path)
        assert format_mtp(parsed) == text  # format(parse(format(x))) == format(x)
        write_mtp(parsed, path)
        assert read_mtp(path) == parsed  # values exact after one cycle

    # Non-float fields survive unchanged; floats become exactly float('%.15e' % x).
    assert parsed.program == mtp.program
    for key in ("L", "scaling_map", "species_count", "radial_basis_size", "radial_funcs_count"):
        assert getattr(parsed, key) == getattr(mtp, key)
    assert (parsed.radial_basis_type, parsed.version) == (mtp.radial_basis_type, mtp.version)
    assert parsed.potential_name == mtp.potential_name
    assert parsed.potential_tag == mtp.potential_tag
    assert parsed.is_trained
    assert (parsed.min_dist, parsed.max_dist) == (f15(mtp.min_dist), f15(mtp.max_dist))
    assert parsed.scaling == f15(mtp.scaling)
    assert parsed.radial_scaling == (
        None if mtp.radial_scaling is None else f15(mtp.radial_scaling)
    )
    for key in COEFF_KEYS:
        assert getattr(parsed, key) == [f15(x) for x in getattr(mtp, key)], key
    assert parsed.radial_coeffs == [[f15(x) for x in row] for row in mtp.radial_coeffs]
    assert parsed.parameter_count() == mtp.parameter_count()


@settings(max_examples=40, deadline=None)
@given(mtp=mtp_files())
def test_random_files_round_trip(mtp: MTPFile) -> None:
    _check_round_trip(mtp)


@pytest.mark.parametrize(
    ("scaling", "written"),
    [
        (math.nextafter(1.0, 2.0), False),  # prints as 1.000000000000000e+00
        (1.0 + 4.4e-16, False),
        (1.0, False),
        (math.nextafter(1.0, 0.0), True),  # prints as 9.999999999999999e-01
        (1.0 + 2e-15, True),
    ],
)
def test_scaling_that_prints_as_one(scaling: float, written: bool) -> None:
    """A top-level scaling that prints as 1 is not written (else the file read back would be
    written differently); any other value is."""
    mtp = replace(synthetic_mtp(), scaling=scaling)
    assert ("\nscaling = " in format_mtp(mtp)) == written
    _check_round_trip(mtp)


# ---------------------------------------------------------------------------------------------
# 4. Malformed files
# ---------------------------------------------------------------------------------------------


def synthetic_mtp() -> MTPFile:
    """A small trained model (L 2, K 2, C 2, R 3) with distinct coefficient values."""
    L, K, C, R = 2, 2, 2, 3
    program = program_for(L, K)
    n_mu = K * (L + 1)
    rng = random.Random(1234)

    def vec(n: int) -> list[float]:
        return [rng.uniform(-3.0, 3.0) for _ in range(n)]

    return MTPFile(
        L=L,
        scaling_map="K",
        species_count=C,
        min_dist=1.5,
        max_dist=5.5,
        radial_basis_size=R,
        radial_funcs_count=n_mu,
        program=program,
        potential_name="MTP_l2k2",
        scaling=0.025,
        radial_scaling=0.5,
        potential_tag="",
        shift_coeffs=vec(C),
        scal_coeffs=vec(2 * K * C * C),
        radial_coeffs=[vec(R) + [1.0] * C for _ in range(n_mu)],
        species_coeffs=vec(C),
        moment_coeffs=vec(len(program.mapping)),
    )


@pytest.fixture(params=["synthetic", "cu2se_p.mtp"])
def base_text(request) -> str:
    """Text of a valid trained file to corrupt (a synthetic one and a published one)."""
    if request.param == "synthetic":
        return format_mtp(synthetic_mtp())
    return reference_text(request.param)[1]


def set_line(text: str, prefix: str, new: str, occurrence: int = 0) -> str:
    lines = text.split("\n")
    lines[line_no(text, prefix, occurrence) - 1] = new
    return "\n".join(lines)


def insert_after(text: str, prefix: str, new: str) -> str:
    lines = text.split("\n")
    lines.insert(line_no(text, prefix), new)
    return "\n".join(lines)


def delete_line(text: str, prefix: str, occurrence: int = 0) -> str:
    lines = text.split("\n")
    del lines[line_no(text, prefix, occurrence) - 1]
    return "\n".join(lines)


def cut_in(text: str, prefix: str, fraction: float = 0.5, sep: str = ", ") -> str:
    """``text`` cut inside the line starting with ``prefix``, just after a ``sep``."""
    start = text.index("\n" + prefix) + 1
    end = text.find("\n", start) % (len(text) + 1)  # the last line may have no newline
    cut = text.index(sep, start + int(fraction * (end - start)))
    assert cut < end
    return text[: cut + len(sep)]


def parse_error(
    tmp_path: Path, text: str | bytes, *fields: str, line: int | None = None
) -> MTPFormatError:
    """Parse ``text`` and return the MTPFormatError; check it names file, line and fields."""
    path = tmp_path / "broken.mtp"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(MTPFormatError) as info:
        read_mtp(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:"), msg
    if line is not None:
        assert msg.startswith(f"{path}:{line}: "), msg
    for name in fields:
        assert name in msg, msg
    return info.value


def first_times_entry(text: str) -> tuple[int, ...]:
    return int_entries(raw_value(text, "alpha_index_times"))[0]


def test_not_starting_with_mtp(tmp_path: Path, base_text: str) -> None:
    parse_error(tmp_path, "MTQ" + base_text[3:], "'MTP'", line=1)
    parse_error(tmp_path, base_text[4:], "'MTP'", "version", line=1)  # header line dropped
    parse_error(tmp_path, "", "'MTP'")
    parse_error(tmp_path, b"MTP\n\xff\xfe\x00binary", "not a text file")


def test_truncated_in_coefficient_blocks(tmp_path: Path, base_text: str) -> None:
    # The program follows the radial block, so a file cut there lacks the program.
    for prefix in ("shift_coeffs", "scal_coeffs", "\t\t\t{"):
        parse_error(tmp_path, cut_in(base_text, prefix), "alpha_moments_count", "missing")
    text = cut_in(base_text, "\t\t\t{")  # cut in the first radial row
    assert text.count("\n\t\t\t{") == 1
    # Cut inside the last two blocks.
    parse_error(tmp_path, cut_in(base_text, "species_coeffs"), "moment_coeffs", "missing")
    cut = cut_in(base_text, "moment_coeffs", 0.7)
    parse_error(tmp_path, cut, "moment_coeffs", line=line_no(cut, "moment_coeffs"))
    # Cut between blocks (at a line end).
    end_of_radial = base_text.index("\nalpha_moments_count")
    parse_error(tmp_path, base_text[:end_of_radial], "alpha_moments_count", "missing")


def test_truncated_in_program(tmp_path: Path, base_text: str) -> None:
    times_line = line_no(base_text, "alpha_index_times =")
    cut = cut_in(base_text, "alpha_index_times =", sep="}, ")  # whole entries: count mismatch
    parse_error(tmp_path, cut, "alpha_index_times", "alpha_index_times_count", line=times_line)
    cut = base_text[: len(cut_in(base_text, "alpha_index_times =", 0.3, sep="}, {")) + 1]
    assert cut[-1].isdigit()  # cut after the first digit of an entry
    parse_error(tmp_path, cut, "alpha_index_times", "multiple of 4", line=times_line)
    cut = cut_in(base_text, "alpha_index_basic =", sep="}, ")
    parse_error(tmp_path, cut, "alpha_index_basic", line=line_no(base_text, "alpha_index_basic ="))
    cut = base_text[: base_text.index("\nalpha_scalar_moments")]
    parse_error(tmp_path, cut, "alpha_moment_mapping", "missing")


def test_truncated_anywhere_never_crashes(tmp_path: Path) -> None:
    """Every prefix of a file either parses or raises MTPFormatError naming the file."""
    text = format_mtp(synthetic_mtp())
    path = tmp_path / "prefix.mtp"
    for n in range(0, len(text), 17):
        path.write_text(text[:n])
        try:
            read_mtp(path)
        except MTPFormatError as e:
            assert str(e).startswith(f"{path}:")
        else:  # only a cut inside the very last number can leave a complete file
            assert n > text.rindex(", ")


def test_random_corruption_never_crashes(tmp_path: Path) -> None:
    text = format_mtp(synthetic_mtp())
    rng = random.Random(7)
    alphabet = "0123456789{},=-+.e \t\nxnaNIf"
    path = tmp_path / "corrupt.mtp"
    for _ in range(300):
        chars = list(text)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(chars))
            op = rng.random()
            if op < 0.4:
                chars[i] = rng.choice(alphabet)
            elif op < 0.7:
                del chars[i]
            else:
                chars.insert(i, rng.choice(alphabet))
        path.write_text("".join(chars))
        try:
            read_mtp(path)
        except MTPFormatError as e:
            assert str(e).startswith(f"{path}:")


def test_wrong_counts(tmp_path: Path, base_text: str) -> None:
    text = base_text
    n_basic = int_value(text, "alpha_index_basic_count")
    bad = set_line(text, "alpha_index_basic_count", f"alpha_index_basic_count = {n_basic + 1}")
    err = parse_error(tmp_path, bad, "alpha_index_basic", line=line_no(text, "alpha_index_basic ="))
    assert "alpha_index_basic_count" in str(err) and str(n_basic + 1) in str(err)

    n_times = int_value(text, "alpha_index_times_count")
    bad = set_line(text, "alpha_index_times_count", f"alpha_index_times_count = {n_times - 1}")
    parse_error(tmp_path, bad, "alpha_index_times_count", line=line_no(text, "alpha_index_times ="))

    n_b = int_value(text, "alpha_scalar_moments")
    bad = set_line(text, "alpha_scalar_moments", f"alpha_scalar_moments = {n_b - 1}")
    parse_error(
        tmp_path,
        bad,
        "alpha_scalar_moments",
        "alpha_moment_mapping",
        line=line_no(text, "alpha_moment_mapping"),
    )

    # scal_coeffs with one value too few / too many.
    scal = float_list(raw_value(text, "scal_coeffs"))
    line = line_no(text, "scal_coeffs")
    for values in (scal[:-1], [*scal, 1.0]):
        new = "scal_coeffs = {" + ", ".join(map(str, values)) + "}"
        err = parse_error(tmp_path, set_line(text, "scal_coeffs", new), "scal_coeffs", line=line)
        assert f"expected {len(scal)}" in str(err)

    # moment_coeffs / shift_coeffs with the wrong number of values.
    theta = float_list(raw_value(text, "moment_coeffs"))
    new = "moment_coeffs = {" + ", ".join(map(str, theta[1:])) + "}"
    line = line_no(text, "moment_coeffs")
    parse_error(tmp_path, set_line(text, "moment_coeffs", new), "moment_coeffs", line=line)
    new = "shift_coeffs = {1.0}" if int_value(text, "species_count") > 1 else "shift_coeffs = {}"
    line = line_no(text, "shift_coeffs")
    parse_error(tmp_path, set_line(text, "shift_coeffs", new), "shift_coeffs", line=line)

    # A radial_coeffs row with the wrong length (the third row).
    row = radial_rows(text)[2]
    new = "\t\t\t{" + ", ".join(map(str, row[:-1])) + "}"
    line = line_no(text, "\t\t\t{", 2)
    err = parse_error(tmp_path, set_line(text, "\t\t\t{", new, 2), "radial_coeffs", line=line)
    assert str(len(row)) in str(err)

    # Too few / too many radial_coeffs rows.
    n_rows = len(radial_rows(text))
    short = delete_line(text, "\t\t\t{", n_rows - 1)
    line = line_no(short, "\t\t\t{", n_rows - 2)  # the last row left
    parse_error(tmp_path, short, "radial_coeffs", "radial_funcs_count", line=line)
    long = insert_after(text, "\t\t\t{", "\t\t\t{" + ", ".join(map(str, row)) + "}")
    line = line_no(long, "\t\t\t{", n_rows)
    parse_error(tmp_path, long, "radial_coeffs", "radial_funcs_count", line=line)

    # radial_funcs_count not a multiple of L+1 under scaling_map K.
    if raw_value(text, "scaling_map") == "K":
        n_mu = int_value(text, "radial_funcs_count")
        bad = set_line(text, "\tradial_funcs_count", f"\tradial_funcs_count = {n_mu + 1}")
        line = line_no(text, "\tradial_funcs_count")
        parse_error(tmp_path, bad, "radial_funcs_count", line=line)


def test_unknown_key(tmp_path: Path, base_text: str) -> None:
    bad = insert_after(base_text, "species_count", "species_names = Cu Se")
    line = line_no(base_text, "species_count") + 1
    parse_error(tmp_path, bad, "unknown key", "species_names", line=line)
    bad = insert_after(base_text, "alpha_scalar_moments", "just some words")
    line = line_no(base_text, "alpha_scalar_moments") + 1
    parse_error(tmp_path, bad, "key = value", line=line)


@pytest.mark.parametrize(
    ("prefix", "replacement", "field"),
    [
        ("L =", "L = two", "'L'"),
        ("L =", "L = 2.0", "'L'"),
        ("species_count", "species_count = 2x", "'species_count'"),
        ("\tmin_dist", "\tmin_dist = 1.2.3", "'min_dist'"),
        ("\tmax_dist", "\tmax_dist = ", "'max_dist'"),
        ("\tradial_basis_size", "\tradial_basis_size = five", "'radial_basis_size'"),
        ("scaling =", "scaling = 0.0l", "'scaling'"),
        ("shift_coeffs", "shift_coeffs = {1.0, abc}", "'shift_coeffs'"),
        ("species_coeffs", "species_coeffs = {1.0, 2.0.0}", "'species_coeffs'"),
        ("alpha_moments_count", "alpha_moments_count = lots", "'alpha_moments_count'"),
        ("alpha_index_basic =", "alpha_index_basic = {{0, 0, 0, x}}", "'alpha_index_basic'"),
        ("alpha_index_basic =", "alpha_index_basic = {{0.5, 0, 0, 0}}", "'alpha_index_basic'"),
        ("alpha_index_basic =", "alpha_index_basic = {{nan, 0, 0, 0}}", "'alpha_index_basic'"),
        ("alpha_moment_mapping", "alpha_moment_mapping = {inf}", "'alpha_moment_mapping'"),
        ("alpha_index_times =", "alpha_index_times = {{0, 0, 1, 4e}}", "'alpha_index_times'"),
    ],
)
def test_non_numeric_value(
    tmp_path: Path, base_text: str, prefix: str, replacement: str, field: str
) -> None:
    parse_error(
        tmp_path, set_line(base_text, prefix, replacement), field, line=line_no(base_text, prefix)
    )


def test_non_numeric_radial_row(tmp_path: Path, base_text: str) -> None:
    row = radial_rows(base_text)[1]
    new = "\t\t\t{" + ", ".join(map(str, row[:-1])) + ", one}"
    line = line_no(base_text, "\t\t\t{", 1)
    parse_error(tmp_path, set_line(base_text, "\t\t\t{", new, 1), "radial_coeffs", line=line)


def test_unsupported_radial_basis_type(tmp_path: Path, base_text: str) -> None:
    for rb in ("RBChebyshev", "RBChebyshev_repuls", ""):
        bad = set_line(base_text, "radial_basis_type", f"radial_basis_type = {rb}")
        err = parse_error(
            tmp_path, bad, "radial_basis_type", line=line_no(base_text, "radial_basis_type")
        )
        assert "RBChebyshev_sss" in str(err)  # names what is supported


@pytest.mark.parametrize("value", ["KL", "k", "", "LK K"])
def test_bad_scaling_map(tmp_path: Path, base_text: str, value: str) -> None:
    bad = set_line(base_text, "scaling_map", f"scaling_map = {value}")
    parse_error(tmp_path, bad, "scaling_map", line=line_no(base_text, "scaling_map"))


@pytest.mark.parametrize("key", ["species_count", "\tradial_basis_size", "\tradial_funcs_count"])
def test_non_positive_sizes(tmp_path: Path, base_text: str, key: str) -> None:
    for value in (0, -2):
        bad = set_line(base_text, key, f"{key} = {value}")
        parse_error(tmp_path, bad, key.strip(), ">= 1", line=line_no(base_text, key))


def test_bad_contraction_entries(tmp_path: Path, base_text: str) -> None:
    text = base_text
    times_line = line_no(text, "alpha_index_times =")
    p, q, m, o = first_times_entry(text)
    n_slots = int_value(text, "alpha_moments_count")

    def with_first_times(entry: tuple[int, ...]) -> str:
        old = "{{" + ", ".join(map(str, (p, q, m, o))) + "}"
        new = "{{" + ", ".join(map(str, entry)) + "}"
        assert raw_value(text, "alpha_index_times").startswith(old)
        return text.replace("alpha_index_times = " + old, "alpha_index_times = " + new, 1)

    for entry, what in [
        ((p, q, m, n_slots), "out of range"),  # o == alpha_moments_count
        ((n_slots + 5, q, m, o), "out of range"),
        ((-1, q, m, o), "out of range"),
        ((o, q, m, o), "p, q < o"),  # p == o
        ((p, o + 1, m, o), "p, q < o"),  # q > o
        ((p, q, m, 0), "basic slot"),  # writes into a basic moment
    ]:
        parse_error(tmp_path, with_first_times(entry), "alpha_index_times", what, line=times_line)

    # Mapping slot out of range, basic entry with mu >= radial_funcs_count or negative power.
    mapping = raw_value(text, "alpha_moment_mapping")
    bad = text.replace(mapping, "{" + str(n_slots) + mapping[mapping.index(",") :], 1)
    line = line_no(text, "alpha_moment_mapping")
    parse_error(tmp_path, bad, "alpha_moment_mapping", "out of range", line=line)
    n_mu = int_value(text, "radial_funcs_count")
    basic_line = line_no(text, "alpha_index_basic =")
    for first in (f"{{{{{n_mu}, 0, 0, 0}}", "{{0, -1, 0, 0}"):
        bad = text.replace("alpha_index_basic = {{0, 0, 0, 0}", "alpha_index_basic = " + first)
        assert bad != text
        parse_error(tmp_path, bad, "alpha_index_basic", line=basic_line)
    # More basic moments than slots.
    bad = set_line(text, "alpha_moments_count", "alpha_moments_count = 3")
    parse_error(tmp_path, bad, "alpha_moments_count", line=line_no(text, "alpha_moments_count"))


def test_duplicated_key(tmp_path: Path, base_text: str) -> None:
    first = line_no(base_text, "L =")
    bad = insert_after(base_text, "scaling_map", "L = 2")
    err = parse_error(tmp_path, bad, "'L'", "twice", line=line_no(bad, "L =", 1))
    assert f"line {first}" in str(err)

    bad = insert_after(
        base_text, "moment_coeffs", "moment_coeffs = " + raw_value(base_text, "moment_coeffs")
    )
    parse_error(tmp_path, bad, "moment_coeffs", "twice", line=line_no(bad, "moment_coeffs", 1))

    # The radial-block scaling twice, and a second radial_coeffs block.
    bad = insert_after(base_text, "radial_basis_type", "\tscaling = 1.0")
    bad = insert_after(bad, "radial_basis_type", "\tscaling = 2.0")
    parse_error(tmp_path, bad, "'scaling'", "twice", line=line_no(bad, "\tscaling", 1))
    block = base_text[base_text.index("\t\t0-0\n") :].split("\nalpha_moments_count")[0]
    bad = base_text.replace(
        "\nalpha_moments_count", "\n\tradial_coeffs\n" + block + "\nalpha_moments_count", 1
    )
    parse_error(tmp_path, bad, "radial_coeffs", "twice", line=line_no(bad, "\tradial_coeffs", 1))


@pytest.mark.parametrize(
    "prefix",
    [
        "L =",
        "scaling_map",
        "species_count",
        "radial_basis_type",
        "\tmin_dist",
        "\tmax_dist",
        "\tradial_basis_size",
        "\tradial_funcs_count",
        "alpha_moments_count",
        "alpha_index_basic_count",
        "alpha_index_basic =",
        "alpha_index_times_count",
        "alpha_index_times =",
        "alpha_scalar_moments",
        "alpha_moment_mapping",
    ],
)
def test_missing_required_key(tmp_path: Path, base_text: str, prefix: str) -> None:
    key = prefix.strip().removesuffix(" =")
    parse_error(tmp_path, delete_line(base_text, prefix), f"'{key}'", "missing")


@pytest.mark.parametrize("key", [*COEFF_KEYS, "\tradial_coeffs"])
def test_missing_coefficient_block(tmp_path: Path, base_text: str, key: str) -> None:
    if key == "\tradial_coeffs":
        start = base_text.index("\n\tradial_coeffs")
        bad = base_text[:start] + base_text[base_text.index("\nalpha_moments_count") :]
    else:
        bad = delete_line(base_text, key)
    parse_error(tmp_path, bad, key.strip(), "missing")


def test_optional_keys_may_be_absent(tmp_path: Path, base_text: str) -> None:
    """version, potential_name, scaling and potential_tag are optional (docs/theory.md §3.1)."""
    text = base_text
    for prefix in ("version", "potential_name", "scaling =", "potential_tag"):
        text = delete_line(text, prefix)
    path = tmp_path / "minimal.mtp"
    path.write_text(text)
    mtp = read_mtp(path)
    assert (mtp.potential_name, mtp.potential_tag, mtp.scaling) == (None, None, 1.0)
    assert mtp.moment_coeffs == float_list(raw_value(base_text, "moment_coeffs"))


# ---------------------------------------------------------------------------------------------
# 5. Atomic writes
# ---------------------------------------------------------------------------------------------

OLD = "old content\n"


@pytest.fixture(params=[False, True], ids=["no-target", "existing-target"])
def target(request, tmp_path: Path) -> Path:
    path = tmp_path / "model.mtp"
    if request.param:
        path.write_text(OLD)
    return path


def assert_untouched(target: Path, existed: bool) -> None:
    assert sorted(p.name for p in target.parent.iterdir()) == ([target.name] if existed else [])
    if existed:
        assert target.read_text() == OLD


def test_write_failure_while_formatting(target: Path) -> None:
    existed = target.exists()
    bad = replace(synthetic_mtp(), shift_coeffs=None)  # trained, but a block is missing
    with pytest.raises(TypeError):
        write_mtp(bad, target)
    assert_untouched(target, existed)
    rows = [list(row) for row in synthetic_mtp().radial_coeffs]
    rows[-1][1] = None
    with pytest.raises(TypeError):
        write_mtp(replace(synthetic_mtp(), radial_coeffs=rows), target)
    assert_untouched(target, existed)


class _FailingFile:
    """A file object that writes the first half of what it is given, then fails."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()

    def write(self, text: str) -> int:
        self.f.write(text[: len(text) // 2])
        self.f.flush()
        raise OSError(28, "No space left on device")


def test_write_failure_while_writing(target: Path, monkeypatch) -> None:
    existed = target.exists()
    real_fdopen = os.fdopen
    monkeypatch.setattr(
        mtp_module.os, "fdopen", lambda fd, *a, **k: _FailingFile(real_fdopen(fd, *a, **k))
    )
    with pytest.raises(OSError, match="No space left"):
        write_mtp(synthetic_mtp(), target)
    monkeypatch.undo()
    assert_untouched(target, existed)


@pytest.mark.parametrize("exc", [OSError("rename failed"), KeyboardInterrupt()])
def test_write_failure_while_renaming(target: Path, monkeypatch, exc: BaseException) -> None:
    existed = target.exists()
    seen: list[Path] = []

    def failing_replace(src, dst) -> None:
        seen.append(Path(src))
        assert Path(src).read_text() == format_mtp(synthetic_mtp())  # fully written temp file
        raise exc

    monkeypatch.setattr(mtp_module.os, "replace", failing_replace)
    with pytest.raises(type(exc)):
        write_mtp(synthetic_mtp(), target)
    monkeypatch.undo()
    assert len(seen) == 1 and seen[0].parent == target.parent and not seen[0].exists()
    assert_untouched(target, existed)


def test_write_replaces_existing_file(target: Path) -> None:
    mtp = synthetic_mtp()
    write_mtp(mtp, target)
    assert target.read_text() == format_mtp(mtp)
    assert [p.name for p in target.parent.iterdir()] == [target.name]
    assert read_mtp(target) == read_mtp(target)  # deterministic
    assert format_mtp(read_mtp(target)) == format_mtp(mtp)


@settings(max_examples=1, deadline=None)
@given(mtp=mtp_files())
@example(mtp=None)
def test_strategy_and_synthetic_are_valid(mtp: MTPFile | None) -> None:
    """The generated objects have the block sizes the parser expects (sanity of the tests)."""
    mtp = synthetic_mtp() if mtp is None else mtp
    n_eta = n_eta_by_hand(mtp.scaling_map, mtp.L, mtp.radial_funcs_count)
    assert len(mtp.scal_coeffs) == 2 * n_eta * mtp.species_count**2
    assert len(mtp.radial_coeffs) == mtp.radial_funcs_count
    assert len(mtp.moment_coeffs) == len(mtp.program.mapping)
    mtp.program.validate(radial_funcs_count=mtp.radial_funcs_count)
