"""Compiling C++ against the installed torch: flags, the per-user build cache, the compiler call.

Shared by the fused kernels (:mod:`nequip_sus2.kernels`) and the LAMMPS plugin
(:mod:`nequip_sus2.lammps.build`).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

__all__ = ["cache_root", "compiler", "run", "torch_compile_flags", "torch_link_flags"]

_TORCH_LIBS = ("torch", "torch_cpu", "c10")


def cache_root() -> Path:
    """Per-user build cache: ``$NEQUIP_SUS2_CACHE`` or ``~/.cache/nequip-sus2``."""
    root = os.environ.get("NEQUIP_SUS2_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nequip-sus2"


def compiler(cxx: str | None, error: type[Exception]) -> str:
    """The C++ compiler: ``cxx``, else ``$CXX``, else ``g++``; ``error`` if it is not found."""
    cxx = cxx or os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None:
        raise error(f"C++ compiler {cxx!r} not found (set CXX or install g++)")
    return cxx


def torch_compile_flags() -> list[str]:
    """Include folders and the C++ ABI setting of the installed torch."""
    import torch
    from torch.utils import cpp_extension

    flags = [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    return flags + [f"-isystem{d}" for d in cpp_extension.include_paths()]


def torch_link_flags() -> list[str]:
    """``-shared`` plus torch's library folders (also as rpath) and libraries."""
    from torch.utils import cpp_extension

    flags = ["-shared"]
    for d in cpp_extension.library_paths():
        flags += [f"-L{d}", f"-Wl,-rpath,{d}"]
    return flags + [f"-l{lib}" for lib in _TORCH_LIBS]


def run(cmd: list[str], cwd: Path, verbose: bool, error: type[Exception]) -> None:
    """Run a compiler command; ``error`` with the command and the end of stderr if it fails."""
    if verbose:
        print("+ " + shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise error(f"command failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stderr[-6000:]}")
