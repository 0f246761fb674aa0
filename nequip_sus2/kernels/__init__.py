"""Fused CPU kernels of SUS2 as PyTorch custom operators (``torch.ops.sus2.*``).

The C++ sources (``src/edge_moments.cpp``: per-edge work to the basic moments;
``src/contraction.cpp``: the per-atom contraction program) are compiled on first use against the installed torch
(about 30 s, system C++ compiler) and cached per user (``$NEQUIP_SUS2_CACHE`` or
``~/.cache/nequip-sus2``) under a key of the source, the compiler command and the torch version.
Importing this package does not build anything; :mod:`nequip_sus2.kernels.ops` does (it is what
models using the kernels name for NequIP's AOTI loader). Enable the kernels on a model with the
``enable_fused_moments`` model modifier.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from .. import _cxx

__all__ = [
    "LIBRARY_FILE",
    "SOURCES",
    "KernelBuildError",
    "build",
    "cached_library",
    "capability_flags",
]

#: the C++ sources of the operators (also compiled into the LAMMPS plugin)
SOURCES = tuple(
    Path(__file__).resolve().parent / "src" / name
    for name in ("edge_moments.cpp", "contraction.cpp")
)
LIBRARY_FILE = "libsus2_kernels.so"


class KernelBuildError(RuntimeError):
    """The kernels cannot be compiled here (no compiler, or the build failed)."""


#: torch's CPU capability -> compiler flags for ATen's vectorised types (as Inductor uses them)
_CAPABILITY_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512dq",
               "-mavx512vl", "-mavx512bw", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma"],
}  # fmt: skip


def capability_flags() -> list[str]:
    """Vector-ISA flags for this CPU, from ``torch.backends.cpu.get_cpu_capability()``.

    The build cache is keyed on them, so a cache shared by machines with different CPUs keeps
    one build per instruction set. Other CPUs get portable scalar code.
    """
    import torch

    return list(_CAPABILITY_FLAGS.get(torch.backends.cpu.get_cpu_capability(), []))


def _command(cxx: str, output: Path) -> list[str]:
    # -fopenmp: at::parallel_for is inlined from ATen's OpenMP header; the OpenMP runtime
    # resolves to the libgomp that torch has already loaded (same soname)
    flags = ["-std=c++17", "-O3", "-fPIC", "-fopenmp", "-Wall", "-Wno-unused-parameter"]
    return [cxx, *flags, *capability_flags(), *_cxx.torch_compile_flags(), *map(str, SOURCES),
            *_cxx.torch_link_flags(), "-o", str(output)]  # fmt: skip


def cached_library(cxx: str | None = None) -> Path:
    """Where :func:`build` puts the library for this source, compiler and torch."""
    cxx = _cxx.compiler(cxx, KernelBuildError)
    import torch

    h = hashlib.sha256()
    for source in SOURCES:
        h.update(source.read_bytes())
    for part in (torch.__version__, *_command(cxx, Path(LIBRARY_FILE))):
        h.update(part.encode() + b"\0")
    return _cxx.cache_root() / "kernels" / h.hexdigest()[:16] / LIBRARY_FILE


def build(force: bool = False, cxx: str | None = None, verbose: bool = False) -> Path:
    """Compile the operator library (if not cached, or ``force``) and return its path."""
    target = cached_library(cxx)
    if target.is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: concurrent builds never expose a partial file
    with tempfile.TemporaryDirectory(prefix="build-", dir=target.parent) as tmp:
        partial = Path(tmp) / LIBRARY_FILE
        _cxx.run(
            _command(_cxx.compiler(cxx, KernelBuildError), partial),
            Path(tmp),
            verbose,
            KernelBuildError,
        )
        os.replace(partial, target)
    return target
