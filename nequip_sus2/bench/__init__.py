"""``nequip-sus2 bench``: benchmark, visualise and compare NequIP-framework models.

Python API::

    from nequip_sus2.bench import BenchOptions, run_bench

    result = run_bench(
        BenchOptions(
            {"SUS2": "sus2/best.ckpt", "NequIP": "nequip/best.ckpt", "Allegro": allegro_model},
            data=["test.xyz"],
            out_dir="bench_report",
        )
    )
    result.results["accuracy"]["SUS2"]["overall"]["forces"]["rmse"]  # eV/A

Command line: ``nequip-sus2 bench MODEL [MODEL ...] --data FILE -o DIR`` (see
:mod:`nequip_sus2.bench.cli`; ``python -m nequip_sus2.bench`` works too); each option is a field
of :class:`~nequip_sus2.bench.options.BenchOptions`. Docs: ``docs/metrology.md``.

This package module stays light (``argparse`` and dataclasses): the heavy parts load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .cli import add_parser, build_parser, main, run_from_args
from .options import BenchOptions

if TYPE_CHECKING:  # pragma: no cover
    from .models import BenchModel, load_bench_model
    from .runner import BenchResult, run_bench

__all__ = [
    "BenchModel",
    "BenchOptions",
    "BenchResult",
    "add_parser",
    "build_parser",
    "load_bench_model",
    "main",
    "run_bench",
    "run_from_args",
]

_LAZY = {
    "run_bench": "runner",
    "BenchResult": "runner",
    "BenchModel": "models",
    "load_bench_model": "models",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
