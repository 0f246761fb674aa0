"""NequIP model files: packages (``.nequip.zip``) written like ``nequip-package build`` does,
saved models (checkpoint or package) loaded back, and the kind of a model file by its name.

:func:`write_package` writes the layout ``nequip-package info``, ``nequip-compile``, the NequIP
ASE calculator and ``ModelFromPackage`` accept (eager and train-time-compile variants, example
data for ``nequip-compile``, metadata). All nequip internals (``_``-prefixed names) the project
relies on for this are reached through :func:`_nequip_internals` only. Saved models are
rewritten with :func:`rewrite_package` (a package re-exported with its model variants edited)
and :func:`package_checkpoint` (``nequip-package build``), quietly (:func:`quiet_packaging`).

torch and nequip are imported inside the functions: ``nequip_sus2`` is imported by nequip on
start-up (its extension entry point) and must stay light.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ._files import replacing
from .errors import InteropError

__all__ = [
    "PACKAGE_SUFFIX",
    "ensure_global_state",
    "example_data",
    "load_model",
    "model_format",
    "package_checkpoint",
    "quiet_packaging",
    "rewrite_package",
    "write_package",
]

PACKAGE_SUFFIX = ".nequip.zip"
#: compiled models (AOTInductor .nequip.pt2, TorchScript .nequip.pth), by suffix
_COMPILED_SUFFIXES = (".pt2", ".nequip.pth")


def _nequip_internals() -> dict[str, Any]:
    """The private nequip names the project uses (so a nequip upgrade breaks in one place)."""
    from nequip.model.saved_models.package import (
        _cpu_deserialize_always,
        _suppress_package_importer_exporter_warnings,
    )
    from nequip.model.utils import _EAGER_MODEL_KEY
    from nequip.scripts._package_utils import (
        _EXTERNAL_MODULES,
        _INTERNAL_MODULES,
        _MOCK_MODULES,
        _PACKAGING_MODES,
    )
    from nequip.scripts.package import _CURRENT_NEQUIP_PACKAGE_VERSION
    from nequip.train.lightning import _SOLE_MODEL_KEY

    return {
        "suppress_warnings": _suppress_package_importer_exporter_warnings,
        "cpu_deserialize": _cpu_deserialize_always,
        "eager": _EAGER_MODEL_KEY,
        "external": _EXTERNAL_MODULES,
        "internal": _INTERNAL_MODULES,
        "mock": _MOCK_MODULES,
        "packaging_modes": _PACKAGING_MODES,
        "package_version": _CURRENT_NEQUIP_PACKAGE_VERSION,
        "sole_model": _SOLE_MODEL_KEY,
    }


def ensure_global_state() -> None:
    """nequip's global state (default dtypes, TF32 switches), set once as nequip's tools do."""
    from nequip.utils.global_state import global_state_initialized, set_global_state

    if not global_state_initialized():
        set_global_state()


def model_format(path: str | os.PathLike) -> str:
    """``"compiled"``, ``"package"``, ``"checkpoint"`` or ``"mtp"``, by the file name."""
    name = os.fspath(path).lower()
    if name.endswith(_COMPILED_SUFFIXES):
        return "compiled"
    if name.endswith(PACKAGE_SUFFIX):
        return "package"
    if name.endswith(".ckpt"):
        return "checkpoint"
    if name.endswith(".mtp"):
        return "mtp"
    raise InteropError(
        f"{os.fspath(path)}: MODEL is not a model file (expected a compiled .nequip.pt2, a "
        f"{PACKAGE_SUFFIX} package, a .ckpt checkpoint or a trained .mtp file)"
    )


# ----------------------------------------------------------------------------------------------
# writing packages
# ----------------------------------------------------------------------------------------------


def example_data(model, num_cells: int = 2, seed: int = 0):
    """A small periodic structure of the model's species with neighbours, as a batched
    ``AtomicDataDict`` (the example data ``nequip-compile`` traces the model with).

    A simple-cubic ``num_cells``^3 supercell with spacing 0.45 ``r_max``, types cycling through
    the species, positions jittered by up to 0.05 ``r_max`` (fixed seed).
    """
    import torch
    from nequip.data import AtomicDataDict, compute_neighborlist_, from_dict
    from nequip.utils.dtype import torch_default_dtype

    r_max = float(model.metadata["r_max"])
    num_types = len(model.type_names)
    spacing = 0.45 * r_max
    grid = np.stack(np.meshgrid(*[np.arange(num_cells)] * 3, indexing="ij"), -1).reshape(-1, 3)
    rng = np.random.default_rng(seed)
    pos = grid * spacing + rng.uniform(-0.05, 0.05, size=grid.shape) * r_max
    with torch_default_dtype(torch.float64):
        data = from_dict(
            {
                "pos": pos,
                "cell": np.eye(3) * spacing * num_cells,
                "pbc": np.ones(3, dtype=bool),
                "atom_types": np.arange(len(pos)) % num_types,
            }
        )
        data = compute_neighborlist_(data, r_max=r_max)
    return AtomicDataDict.batched_from_list([data])


def _as_compile_model(model):
    """The same model in NequIP's train-time-compile wrapper (``CompileGraphModel``)."""
    from nequip.nn.compile import CompileGraphModel
    from nequip.utils.dtype import dtype_to_name, torch_default_dtype

    metadata = model.metadata
    config = {
        "model_dtype": dtype_to_name(model.model_dtype),
        "type_names": list(model.type_names),
        "r_max": metadata["r_max"],
    }
    with torch_default_dtype(model.model_dtype):
        return CompileGraphModel(
            model=copy.deepcopy(model.model),
            model_config=config,
            model_input_fields=model.model.irreps_in,
        )


def write_package(
    model,
    out: str | os.PathLike,
    *,
    data=None,
    config: Mapping | None = None,
    compile_variants: bool = True,
) -> Path:
    """Write ``model`` (an eager NequIP ``GraphModel`` built in this process) as a package.

    The zip has the layout ``nequip-package build`` writes (package format version of the
    installed nequip): ``model/eager_model.pkl`` and, if ``compile_variants``, the
    train-time-compile variant, each a ``ModuleDict({"sole_model": model})``;
    ``model/example_data.pkl`` (``data``, default :func:`example_data`); ``model/config.yaml``
    (``config``: provenance, informational only) and ``model/package_metadata.txt``.
    The file is written to a temporary name and renamed, so a failure leaves nothing behind.
    """
    import torch
    from nequip.utils.versions import get_current_code_versions
    from nequip.utils.versions.version_utils import get_version_safe

    nq = _nequip_internals()
    out = Path(out)
    if not out.name.endswith(PACKAGE_SUFFIX):
        raise InteropError(f"{out}: a NequIP package file name must end with {PACKAGE_SUFFIX}")
    if not hasattr(model, "is_graph_model"):
        raise InteropError("write_package needs a NequIP GraphModel (e.g. from import_mtp)")
    if type(model).__module__.startswith("<torch_package"):
        raise InteropError(
            "the model was loaded from a package; re-package it with `nequip-package build` "
            "from a checkpoint instead"
        )
    if getattr(model, "is_compile_graph_model", False):
        raise InteropError("write_package needs the eager model (not a CompileGraphModel)")
    ensure_global_state()
    # packaged like `nequip-package build` does: on CPU, in training mode (ModelFromPackage
    # fine-tuning needs it; inference callers switch to eval themselves)
    model = copy.deepcopy(model).to("cpu").train()
    if data is None:
        data = example_data(model)

    modes = [nq["eager"]]
    if compile_variants:
        modes = list(nq["packaging_modes"]["nequip"]())
    variants = {}
    for mode in modes:
        inner = model if mode == nq["eager"] else _as_compile_model(model)
        variants[mode] = torch.nn.ModuleDict({nq["sole_model"]: inner})

    metadata = {
        "versions": get_current_code_versions(verbose=False),
        "external_modules": {k: get_version_safe(k) for k in nq["external"]},
        "package_version_id": nq["package_version"],
        "available_models": list(variants),
        "atom_types": dict(enumerate(model.type_names)),
    }
    config_text = yaml.safe_dump(dict(config) if config else {"source": "nequip_sus2"})

    metadata_text = yaml.dump(metadata, default_flow_style=False)
    with replacing(out) as tmp, nq["suppress_warnings"]():
        _export(tmp, variants, data, config_text, metadata_text)
    return out


def _export(path, variants: Mapping, example, config_text: str, metadata_text: str, importer=None):
    """Write the zip layout of ``nequip-package``: ``model/example_data.pkl``,
    ``model/config.yaml``, ``model/package_metadata.txt`` and ``model/<variant>_model.pkl``,
    with nequip's mock/extern/intern module lists (``importer``: where the classes come from,
    default the running code)."""
    import torch

    nq = _nequip_internals()
    options = {} if importer is None else {"importer": importer}
    with torch.package.PackageExporter(path, **options) as exp:
        exp.mock([f"{pkg}.**" for pkg in nq["mock"]])
        exp.extern([f"{pkg}.**" for pkg in nq["external"]])
        exp.intern([f"{pkg}.**" for pkg in nq["internal"]])
        exp.save_pickle("model", "example_data.pkl", example, dependencies=True)
        exp.save_text("model", "config.yaml", config_text)
        exp.save_text("model", "package_metadata.txt", metadata_text)
        for name, variant in variants.items():
            exp.save_pickle("model", f"{name}_model.pkl", variant, dependencies=True)


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (the provenance a package records of its source file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# loading saved models
# ----------------------------------------------------------------------------------------------


def load_model(path: str | os.PathLike, model_key: str | None = None):
    """The eager model of a checkpoint (``.ckpt``) or a package (``.nequip.zip``), in eval mode.

    ``model_key`` selects one model of a multi-model checkpoint (default: the sole model). A
    ``.mtp`` file is refused with a hint (read it with
    :func:`nequip_sus2.io.mtp_model.import_mtp`); so is a file of another kind, naming it.
    """
    from nequip.model.saved_models.load_utils import load_saved_model

    nq = _nequip_internals()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InteropError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"MTP") or path.endswith(".mtp"):
        raise InteropError(
            f"{path}: a .mtp file, not a nequip-train checkpoint (.ckpt) or a .nequip.zip "
            "package (read .mtp files with import_mtp)"
        )
    ensure_global_state()
    try:
        models = load_saved_model(path, compile_mode=nq["eager"], model_key=None)
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, RuntimeError, KeyError) as e:
        # torch.load / torch.package on a file of another kind (text, truncated, foreign zip)
        kind = "package" if path.endswith(PACKAGE_SUFFIX) else "checkpoint"
        detail = (str(e).strip().splitlines() or [""])[0]
        detail = re.sub(r"^\[enforce fail at [^\]]*\][\s.]*", "", detail)[:200]
        if "failed reading zip archive" in detail:
            detail = "truncated or damaged zip archive"
        zipped = head[:2] == b"PK" or head[:1] == b"\x80"  # zip or legacy torch.save pickle
        what = f"{type(e).__name__}: {detail}" if zipped else "not a zip archive"
        raise InteropError(
            f"{path}: not a readable nequip-train checkpoint (.ckpt) or .nequip.zip package "
            f"(read as a {kind}: {what})"
        ) from e
    keys = list(models.keys())
    if model_key is None:
        if len(keys) != 1:
            raise InteropError(f"{path}: holds several models {keys}; choose one with model_key")
        model_key = keys[0]
    if model_key not in keys:
        raise InteropError(f"{path}: no model {model_key!r} (models: {keys})")
    return models[model_key].eval()


# ----------------------------------------------------------------------------------------------
# rewriting saved models
# ----------------------------------------------------------------------------------------------


class _NameLookupNoise(logging.Filter):
    """Drops torch.package's "Tried to call get_name with obj ..." warnings: re-exporting a
    package asks each importer in turn for every class, and each miss is logged although the
    next importer finds it (no importer finding it is an error of its own, still raised)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Tried to call get_name with obj ")


@contextlib.contextmanager
def quiet_packaging() -> Iterator[None]:
    """Silence the harmless noise of reading and writing packages: torch.package's importer
    misses (above) and the TypedStorage deprecation warnings nequip suppresses; every other
    warning and log record still shows."""
    logger = logging.getLogger("torch.package.importer")
    noise = _NameLookupNoise()
    logger.addFilter(noise)
    try:
        with _nequip_internals()["suppress_warnings"]():
            yield
    finally:
        logger.removeFilter(noise)


def rewrite_package(
    src: str | os.PathLike, out: str | os.PathLike, edit: Callable[[Any, Any], None]
) -> None:
    """Copy package ``src`` to ``out`` with ``edit(models, importer)`` applied (in place) to the
    ``ModuleDict`` of every model variant, re-exported the way ``nequip-package modify`` does:
    the package's own code is kept (``importer``: its ``PackageImporter``, for classes of that
    code). ``out`` appears complete or not at all."""
    import torch

    nq = _nequip_internals()
    with quiet_packaging():
        imp = torch.package.PackageImporter(os.fspath(src))
        meta_text = imp.load_text("model", "package_metadata.txt")
        variants = yaml.safe_load(meta_text)["available_models"]
        with nq["cpu_deserialize"]():
            example = imp.load_pickle("model", "example_data.pkl")
            models = {
                v: imp.load_pickle("model", f"{v}_model.pkl", map_location="cpu") for v in variants
            }
        for model_dict in models.values():
            edit(model_dict, imp)
    with replacing(out) as tmp, quiet_packaging():
        config_text = imp.load_text("model", "config.yaml")
        importers = (imp, torch.package.importer.sys_importer)
        _export(tmp, models, example, config_text, meta_text, importer=importers)


def package_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike) -> None:
    """``nequip-package build CHECKPOINT OUT`` (persistent model modifiers applied) without
    its packaging noise; ``out`` appears complete or not at all."""
    from nequip.scripts.package import main as package_main

    out = Path(out)
    with (
        replacing(out) as tmp,
        tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmpdir,
    ):
        built = Path(tmpdir) / out.name  # `nequip-package build` insists on the suffix
        with quiet_packaging():
            package_main(["build", os.fspath(checkpoint), str(built)])
        os.replace(built, tmp)
