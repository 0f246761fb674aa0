"""Read and write SUS2/MTP potential files (``.mtp``, docs/theory.md §3.1).

Trained files round-trip byte for byte through :func:`read_mtp` and :func:`write_mtp` (up to the
final newline, which the original writer omits). Untrained templates (no coefficient blocks) are
read too. Errors raise :class:`MTPFormatError` naming the file, the line and the field, including
nan/inf numbers and a cutoff that is not ``0 < min_dist < max_dist``; :func:`write_mtp` refuses
those too (``ValueError`` naming the field).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .._files import replacing_text
from ..program import SCALING_MAPS, ContractionProgram, num_scaling_channels

RADIAL_BASIS_TYPES = ("RBChebyshev_sss", "RBChebyshev_sss_lmp")
_PROGRAM_LISTS = ("alpha_index_basic", "alpha_index_times", "alpha_moment_mapping")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf)", re.IGNORECASE)


class MTPFormatError(ValueError):
    """A malformed ``.mtp`` file; the message names file, line and field."""


@dataclass
class MTPFile:
    """Everything an ``.mtp`` file stores, in file units (eV, Angstrom)."""

    L: int
    scaling_map: str
    species_count: int
    min_dist: float
    max_dist: float
    radial_basis_size: int
    radial_funcs_count: int
    program: ContractionProgram
    radial_basis_type: str = "RBChebyshev_sss"
    version: str = "1.1.0"
    potential_name: str | None = None
    scaling: float = 1.0  # top-level `scaling` (1 when absent)
    radial_scaling: float | None = None  # optional `scaling` inside the radial-basis block
    potential_tag: str | None = None
    shift_coeffs: list[float] | None = None  # b, C
    scal_coeffs: list[float] | None = None  # alpha/r0, 2*N_eta*C*C
    radial_coeffs: list[list[float]] | None = None  # N_mu rows of R + C
    species_coeffs: list[float] | None = None  # s, C
    moment_coeffs: list[float] | None = None  # theta, N_B
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def is_trained(self) -> bool:
        return self.moment_coeffs is not None

    @property
    def num_scaling_channels(self) -> int:
        return num_scaling_channels(self.scaling_map, self.radial_funcs_count, self.L)

    @property
    def sigma(self) -> float:
        """Global radial scaling sigma: the top-level and radial-block ``scaling`` multiplied."""
        return self.scaling * (1.0 if self.radial_scaling is None else self.radial_scaling)

    def parameter_count(self) -> int:
        """P = C + 2 N_eta C^2 + N_mu (R + C) + C + N_B (docs/theory.md §2.9)."""
        C, n_mu = self.species_count, self.radial_funcs_count
        return (
            C
            + 2 * self.num_scaling_channels * C * C
            + n_mu * (self.radial_basis_size + C)
            + C
            + len(self.program.mapping)
        )


class _Lines:
    """Line cursor that knows the file name for error messages."""

    def __init__(self, path: str, text: str):
        self.path = path
        self.lines = text.split("\n")
        self.i = 0

    def error(self, msg: str, line: int | None = None) -> MTPFormatError:
        return MTPFormatError(f"{self.path}:{(self.i if line is None else line)}: {msg}")

    def peek(self) -> str | None:
        while self.i < len(self.lines) and not self.lines[self.i].strip():
            self.i += 1
        return self.lines[self.i] if self.i < len(self.lines) else None

    def next(self, what: str) -> str:
        line = self.peek()
        if line is None:
            raise MTPFormatError(f"{self.path}:{self.i}: file ends where {what} was expected")
        self.i += 1
        return line


def _split_key(cur: _Lines, line: str) -> tuple[str, str]:
    if "=" not in line:
        raise cur.error(f"expected 'key = value', got {line.strip()!r}")
    key, value = line.split("=", 1)
    return key.strip(), value.strip()


def _numbers(cur: _Lines, key: str, value: str) -> list[float]:
    body = value.replace("{", " ").replace("}", " ").replace(",", " ")
    tokens = body.split()
    out = []
    for tok in tokens:
        if not _NUMBER.fullmatch(tok):
            raise cur.error(f"field '{key}': {tok!r} is not a number")
        out.append(float(tok))
    return out


def _int(cur: _Lines, key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise cur.error(f"field '{key}': {value!r} is not an integer") from None


def _float(cur: _Lines, key: str, value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise cur.error(f"field '{key}': {value!r} is not a number") from None
    if not math.isfinite(x):
        raise cur.error(f"field '{key}': {value!r} is not a finite number")
    return x


def _first_non_finite(values: list[float]) -> int | None:
    """Index of the first nan/inf of ``values``, or ``None``."""
    return next((k for k, v in enumerate(values) if not math.isfinite(v)), None)


def _check_finite(path: str, line: int, key: str, values: list[float]) -> None:
    k = _first_non_finite(values)
    if k is not None:
        raise MTPFormatError(
            f"{path}:{line}: field '{key}': value {k + 1} of {len(values)} is {values[k]!r} "
            "(coefficients must be finite numbers)"
        )


def _tuples(cur: _Lines, key: str, value: str, width: int) -> list[tuple[int, ...]]:
    vals = _numbers(cur, key, value)
    if len(vals) % width:
        raise cur.error(f"field '{key}': {len(vals)} numbers is not a multiple of {width}")
    if not all(math.isfinite(v) for v in vals):
        raise cur.error(f"field '{key}': entries must be finite integers")
    ints = [int(v) for v in vals]
    if any(float(i) != v for i, v in zip(ints, vals, strict=True)):
        raise cur.error(f"field '{key}': entries must be integers")
    return [tuple(ints[k : k + width]) for k in range(0, len(ints), width)]


def _expect_count(
    cur: _Lines, key: str, got: int, expected: int, what: str, count_key: str | None = None
) -> None:
    if got != expected:
        source = f" ({count_key} = {expected})" if count_key else ""
        raise cur.error(f"field '{key}': {got} {what}, expected {expected}{source}")


def read_mtp(path: str | os.PathLike) -> MTPFile:
    """Parse a trained ``.mtp`` file or an untrained template (docs/theory.md §3.1)."""
    path = str(path)
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError:
        raise MTPFormatError(f"{path}: not a text file") from None
    cur = _Lines(path, text)
    first = cur.next("the 'MTP' header")
    if first.strip() != "MTP":
        raise cur.error(f"first line must be 'MTP', got {first.strip()!r}")

    values: dict[str, str] = {}
    lines_of: dict[str, int] = {}
    radial_rows: list[list[float]] | None = None
    row_lines: list[int] = []
    in_radial_block = False
    known = {
        "version", "potential_name", "scaling", "L", "scaling_map", "species_count",
        "potential_tag", "radial_basis_type", "min_dist", "max_dist", "radial_basis_size",
        "radial_funcs_count", "shift_coeffs", "scal_coeffs", "alpha_moments_count",
        "alpha_index_basic_count", "alpha_index_basic", "alpha_index_times_count",
        "alpha_index_times", "alpha_scalar_moments", "alpha_moment_mapping", "species_coeffs",
        "moment_coeffs",
    }  # fmt: skip
    while cur.peek() is not None:
        raw = cur.next("a key")
        lineno = cur.i
        stripped = raw.strip()
        if stripped == "radial_coeffs":
            if radial_rows is not None:
                raise cur.error(
                    f"key 'radial_coeffs' appears twice (first on line {lines_of['radial_coeffs']})"
                )
            radial_rows = []
            lines_of["radial_coeffs"] = lineno
            in_radial_block = True
            continue
        if in_radial_block and re.fullmatch(r"\d+-\d+", stripped):
            continue
        if in_radial_block and stripped.startswith("{"):
            radial_rows.append(_numbers(cur, "radial_coeffs", stripped))
            row_lines.append(lineno)
            continue
        in_radial_block = False
        key, value = _split_key(cur, raw)
        if key == "scaling" and raw.startswith("\t"):
            key = "radial_scaling"
        elif key not in known:
            raise cur.error(f"unknown key {key!r}")
        if key in values:
            shown = "scaling" if key == "radial_scaling" else key
            raise cur.error(f"key {shown!r} appears twice (first on line {lines_of[key]})")
        values[key] = value
        lines_of[key] = lineno

    # a missing field is reported at the last line (where the file ends, e.g. when truncated)
    last_line = max((n for n, line in enumerate(cur.lines, 1) if line.strip()), default=0)

    def need(key: str) -> str:
        if key not in values:
            raise MTPFormatError(
                f"{path}:{last_line}: required field '{key}' is missing "
                f"(not found up to the end of the file, line {last_line})"
            )
        return values[key]

    def at(key: str) -> _Lines:
        cur.i = lines_of.get(key, cur.i)
        return cur

    L = _int(at("L"), "L", need("L"))
    if L < 0:
        raise at("L").error(f"field 'L': must be >= 0, got {L}")
    scaling_map = need("scaling_map")
    if scaling_map not in SCALING_MAPS:
        raise at("scaling_map").error(
            f"field 'scaling_map': {scaling_map!r} is not one of {', '.join(SCALING_MAPS)}"
        )
    C = _int(at("species_count"), "species_count", need("species_count"))
    rb_type = need("radial_basis_type")
    if rb_type not in RADIAL_BASIS_TYPES:
        raise at("radial_basis_type").error(
            f"field 'radial_basis_type': {rb_type!r} is not supported "
            f"(supported: {', '.join(RADIAL_BASIS_TYPES)})"
        )
    R = _int(at("radial_basis_size"), "radial_basis_size", need("radial_basis_size"))
    n_mu = _int(at("radial_funcs_count"), "radial_funcs_count", need("radial_funcs_count"))
    for key, n in (("species_count", C), ("radial_basis_size", R), ("radial_funcs_count", n_mu)):
        if n < 1:
            raise at(key).error(f"field '{key}': must be >= 1, got {n}")
    if scaling_map == "K" and n_mu % (L + 1):
        raise at("radial_funcs_count").error(
            f"field 'radial_funcs_count': {n_mu} is not a multiple of L+1 = {L + 1} "
            "(needed by scaling_map K)"
        )

    n_slots = _int(at("alpha_moments_count"), "alpha_moments_count", need("alpha_moments_count"))
    basic = _tuples(at("alpha_index_basic"), "alpha_index_basic", need("alpha_index_basic"), 4)
    n_basic = _int(
        at("alpha_index_basic_count"), "alpha_index_basic_count", need("alpha_index_basic_count")
    )
    _expect_count(
        at("alpha_index_basic"),
        "alpha_index_basic",
        len(basic),
        n_basic,
        "entries",
        "alpha_index_basic_count",
    )
    times = _tuples(at("alpha_index_times"), "alpha_index_times", need("alpha_index_times"), 4)
    n_times = _int(
        at("alpha_index_times_count"), "alpha_index_times_count", need("alpha_index_times_count")
    )
    _expect_count(
        at("alpha_index_times"),
        "alpha_index_times",
        len(times),
        n_times,
        "entries",
        "alpha_index_times_count",
    )
    mapping = [
        t[0]
        for t in _tuples(
            at("alpha_moment_mapping"), "alpha_moment_mapping", need("alpha_moment_mapping"), 1
        )
    ]
    n_b = _int(at("alpha_scalar_moments"), "alpha_scalar_moments", need("alpha_scalar_moments"))
    _expect_count(
        at("alpha_moment_mapping"),
        "alpha_moment_mapping",
        len(mapping),
        n_b,
        "slots",
        "alpha_scalar_moments",
    )
    program = ContractionProgram(n_slots, tuple(basic), tuple(times), tuple(mapping))
    try:
        program.validate(radial_funcs_count=n_mu)
    except ValueError as e:
        # Point at the line of the field the offending entry belongs to.
        msg = str(e)
        bad = next((k for k in _PROGRAM_LISTS if msg.startswith(k)), None)
        if bad is None:
            bad = "alpha_moments_count" if "moments_count" in msg else "alpha_index_times"
        raise at(bad).error(f"field '{bad}': contraction program: {msg}") from None

    mtp = MTPFile(
        L=L,
        scaling_map=scaling_map,
        species_count=C,
        min_dist=_float(at("min_dist"), "min_dist", need("min_dist")),
        max_dist=_float(at("max_dist"), "max_dist", need("max_dist")),
        radial_basis_size=R,
        radial_funcs_count=n_mu,
        program=program,
        radial_basis_type=rb_type,
        version=values.get("version", "1.1.0"),
        potential_name=values.get("potential_name"),
        potential_tag=values.get("potential_tag"),
    )
    if not mtp.min_dist > 0:
        raise at("min_dist").error(f"field 'min_dist': must be positive, got {mtp.min_dist!r}")
    if not mtp.max_dist > mtp.min_dist:
        raise at("max_dist").error(
            f"field 'max_dist': the cutoff must be larger than min_dist = {mtp.min_dist!r}, "
            f"got {mtp.max_dist!r}"
        )
    if "scaling" in values:
        mtp.scaling = _float(at("scaling"), "scaling", values["scaling"])
    if "radial_scaling" in values:
        mtp.radial_scaling = _float(at("radial_scaling"), "scaling", values["radial_scaling"])

    coeff_keys = ("shift_coeffs", "scal_coeffs", "species_coeffs", "moment_coeffs")
    present = [k for k in coeff_keys if k in values] + (["radial_coeffs"] if radial_rows else [])
    if not present:
        return mtp  # untrained template
    missing = [k for k in (*coeff_keys, "radial_coeffs") if k not in present]
    if missing:
        raise MTPFormatError(
            f"{path}:{last_line}: trained file is missing coefficient block(s): "
            f"{', '.join(missing)} (not found up to the end of the file, line {last_line})"
        )
    n_eta = mtp.num_scaling_channels
    expected = {
        "shift_coeffs": C,
        "scal_coeffs": 2 * n_eta * C * C,
        "species_coeffs": C,
        "moment_coeffs": n_b,
    }
    for key, n in expected.items():
        vals = _numbers(at(key), key, values[key])
        _expect_count(at(key), key, len(vals), n, "values")
        _check_finite(path, lines_of[key], key, vals)
        setattr(mtp, key, vals)
    if len(radial_rows) != n_mu:
        raise MTPFormatError(
            f"{path}:{row_lines[-1] if row_lines else '?'}: field 'radial_coeffs': "
            f"{len(radial_rows)} rows, expected radial_funcs_count = {n_mu}"
        )
    for row, lineno in zip(radial_rows, row_lines, strict=True):
        if len(row) != R + C:
            raise MTPFormatError(
                f"{path}:{lineno}: field 'radial_coeffs': row has {len(row)} values, "
                f"expected radial_basis_size + species_count = {R + C}"
            )
        _check_finite(path, lineno, "radial_coeffs", row)
    mtp.radial_coeffs = radial_rows
    return mtp


def _fmt(x: float) -> str:
    return "%.15e" % x  # noqa: UP031 (the original writer's printf format, byte for byte)


def _flist(xs) -> str:
    return "{" + ", ".join(_fmt(x) for x in xs) + "}"


def _ilist(entries) -> str:
    return "{" + ", ".join("{" + ", ".join(str(int(v)) for v in e) + "}" for e in entries) + "}"


def check_finite(mtp: MTPFile) -> None:
    """Refuse an ``MTPFile`` with a nan/inf number (ValueError naming the field and the entry)
    or a cutoff that is not ``0 < min_dist < max_dist``."""
    scalars = {"scaling": mtp.scaling, "min_dist": mtp.min_dist, "max_dist": mtp.max_dist}
    if mtp.radial_scaling is not None:
        scalars["scaling (radial basis)"] = mtp.radial_scaling
    for key, value in scalars.items():
        if not math.isfinite(value):
            raise ValueError(f"field '{key}' is {value!r}: a .mtp file holds finite numbers only")
    if not 0 < mtp.min_dist < mtp.max_dist:
        raise ValueError(
            f"fields 'min_dist' = {mtp.min_dist!r} and 'max_dist' = {mtp.max_dist!r}: "
            "need 0 < min_dist < max_dist"
        )
    blocks = {
        "shift_coeffs": mtp.shift_coeffs,
        "scal_coeffs": mtp.scal_coeffs,
        "species_coeffs": mtp.species_coeffs,
        "moment_coeffs": mtp.moment_coeffs,
    }
    for row, values in enumerate(mtp.radial_coeffs or []):
        blocks[f"radial_coeffs row {row + 1}"] = values
    for key, values in blocks.items():
        k = None if values is None else _first_non_finite([float(v) for v in values])
        if k is not None:
            raise ValueError(
                f"field '{key}': value {k + 1} of {len(values)} is {float(values[k])!r}: "
                "a .mtp file holds finite numbers only"
            )


def format_mtp(mtp: MTPFile) -> str:
    """The text of an ``.mtp`` file in the original writer's layout (no final newline).

    Raises ``ValueError`` (naming the field) for a nan/inf number or an invalid cutoff."""
    check_finite(mtp)
    lines = ["MTP", f"version = {mtp.version}"]
    if mtp.potential_name is not None:
        lines.append(f"potential_name = {mtp.potential_name}")
    if _fmt(mtp.scaling) != _fmt(1.0):  # as written, so that re-reading writes the same text
        lines.append(f"scaling = {_fmt(mtp.scaling)}")
    lines += [f"L = {mtp.L}", f"scaling_map = {mtp.scaling_map}"]
    lines.append(f"species_count = {mtp.species_count}")
    if mtp.potential_tag is not None:
        lines.append(f"potential_tag = {mtp.potential_tag}".rstrip() + " ")
    lines.append(f"radial_basis_type = {mtp.radial_basis_type}")
    if mtp.radial_scaling is not None:
        lines.append(f"\tscaling = {_fmt(mtp.radial_scaling)}")
    lines += [
        f"\tmin_dist = {_fmt(mtp.min_dist)}",
        f"\tmax_dist = {_fmt(mtp.max_dist)}",
        f"\tradial_basis_size = {mtp.radial_basis_size}",
        f"\tradial_funcs_count = {mtp.radial_funcs_count}",
    ]
    if mtp.is_trained:
        lines += [
            f"shift_coeffs = {_flist(mtp.shift_coeffs)}",
            f"scal_coeffs = {_flist(mtp.scal_coeffs)}",
            "\tradial_coeffs",
            "\t\t0-0",
        ]
        lines += [f"\t\t\t{_flist(row)}" for row in mtp.radial_coeffs]
    prog = mtp.program
    lines += [
        f"alpha_moments_count = {prog.moments_count}",
        f"alpha_index_basic_count = {len(prog.basic)}",
        f"alpha_index_basic = {_ilist(prog.basic)}",
        f"alpha_index_times_count = {len(prog.times)}",
        f"alpha_index_times = {_ilist(prog.times)}",
        f"alpha_scalar_moments = {len(prog.mapping)}",
        "alpha_moment_mapping = {" + ", ".join(str(i) for i in prog.mapping) + "}",
    ]
    if mtp.is_trained:
        lines += [
            f"species_coeffs = {_flist(mtp.species_coeffs)}",
            f"moment_coeffs = {_flist(mtp.moment_coeffs)}",
        ]
    return "\n".join(lines)


def write_mtp(mtp: MTPFile, path: str | os.PathLike) -> None:
    """Write ``mtp`` atomically (temporary file + rename): no partial file on failure."""
    text = format_mtp(mtp)
    with replacing_text(path) as stream:
        stream.write(text)
