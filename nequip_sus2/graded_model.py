"""Saved models with the extrapolation grade: a checkpoint or package plus its training data
in, the same model with :class:`nequip_sus2.nn.ExtrapolationGrade` out.

A checkpoint records the persistent model modifier ``add_extrapolation_grade``
(:mod:`nequip_sus2.nn.extrapolation`) in its model config and the grade's buffers in its state
dict, so ``nequip-package``, ``nequip-compile`` and continued training keep the grade; a
package holds the module itself. ``nequip-sus2 active-set`` is the command line.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ._files import replacing
from .active_set import (
    _LEGACY_BUILDER,
    _MODIFY,
    ActiveSet,
    add_extrapolation_grade,
    build_active_set,
)
from .nn.extrapolation import (
    GRADE_MODIFIER,
    GRADE_MODULE_NAME,
    grade_modifier_config,
    moments_networks,
)
from .package import (
    PACKAGE_SUFFIX,
    _nequip_internals,
    load_model,
    package_checkpoint,
    rewrite_package,
)

__all__ = ["check_graded_output", "write_model_with_grade"]


def _ungraded_config(model_cfg):
    """A checkpoint's model config without a grade added by :func:`write_model_with_grade`
    (either layout), so that refreshing the grade does not stack a second one."""
    target = model_cfg.get("_target_") if hasattr(model_cfg, "get") else None
    if target == _LEGACY_BUILDER:
        return model_cfg["model"]
    if target == _MODIFY:
        modifiers = model_cfg.get("modifiers")
        names = [m.get("modifier") for m in modifiers] if isinstance(modifiers, list) else []
        if names == [GRADE_MODIFIER]:
            return model_cfg["model"]
    return model_cfg


def _graded_config(model_cfg, active_set: ActiveSet) -> dict:
    """``model_cfg`` built with the ``add_extrapolation_grade`` modifier of ``active_set``'s
    shapes: ``{_target_: nequip.model.modify, modifiers: [...], model: model_cfg}``."""
    grade = grade_modifier_config(
        len(active_set.type_names), active_set.num_basis, active_set.residual is not None
    )
    return {"_target_": _MODIFY, "modifiers": [grade], "model": _ungraded_config(model_cfg)}


def _grade_state_keys(model) -> dict[str, str]:
    """Checkpoint ``state_dict`` key -> buffer name of the grade module that the modifier puts
    into every moments network of ``model`` (the eager model of the checkpoint)."""
    prefix = f"model.{_nequip_internals()['sole_model']}."
    nets = {id(m) for m in moments_networks(model)}
    keys = {}
    for name, module in model.named_modules():
        if id(module) in nets:
            path = ".".join(p for p in (name, GRADE_MODULE_NAME) if p)
            for buf in ("inverse", "residual", "residual_scale"):
                keys[f"{prefix}{path}.{buf}"] = buf
    return keys


def _write_checkpoint(src: str, out: Path, active_set: ActiveSet, model) -> None:
    """A copy of checkpoint ``src`` (whose eager model is ``model``) whose model config applies
    the ``add_extrapolation_grade`` modifier and whose state holds the active set's buffers."""
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    hp = ckpt["hyper_parameters"]
    graded = _graded_config(hp["model"], active_set)
    hp["model"] = graded
    info = hp.get("info_dict")
    if info is not None and "training_module" in info:
        info["training_module"]["model"] = copy.deepcopy(graded)
    state = active_set.state()
    sd = ckpt["state_dict"]
    for key, buf in _grade_state_keys(model).items():
        sd[key] = state[buf].clone()
    with replacing(out) as tmp:
        torch.save(ckpt, tmp)


def _package_grade_class(importer):
    """The grade module class inside a package (its importer) if it has one, else ``None``."""
    try:
        return importer.import_module("nequip_sus2.nn.extrapolation").ExtrapolationGrade
    except Exception:
        return None


def check_graded_output(out: Path, is_package: bool) -> None:
    """Refuse an output :func:`write_model_with_grade` cannot write (``ValueError``)."""
    if not out.name.endswith((".ckpt", PACKAGE_SUFFIX)):
        raise ValueError(f"{out}: the output must be a .ckpt or a {PACKAGE_SUFFIX} file")
    if is_package and out.name.endswith(".ckpt"):
        raise ValueError(
            f"{out}: a package can only be written back as a package ({PACKAGE_SUFFIX})"
        )
    if not out.parent.is_dir():
        raise ValueError(f"{out}: the output directory {out.parent} does not exist")


def write_model_with_grade(
    model_path: str | os.PathLike,
    data: str | os.PathLike | Iterable[Any],
    out: str | os.PathLike,
    tol: float = 1e-3,
    rank_rtol: float | None = None,
    batch_size: int = 8,
    chemical_species_to_atom_type_map: dict[str, str] | None = None,
    progress: bool | None = False,
    model=None,
) -> ActiveSet:
    """Build the active set of a checkpoint (``.ckpt``) or package (``.nequip.zip``) on
    ``data`` (its training set: extxyz/``.cfg`` path or structures) and write the model with the
    extrapolation grade included.

    ``out``: a checkpoint (``.ckpt``; from a checkpoint only: its model config gets the
    persistent ``add_extrapolation_grade`` modifier, its state dict the buffers) or a package
    (``.nequip.zip``; from a checkpoint via ``nequip-package build`` of that checkpoint, from a
    package by re-exporting it with the module inserted). The grade of the evaluation weights
    (EMA, if trained with EMA) is what the active set is built from; continued training makes
    it stale (rebuild it afterwards). ``model``: the model of ``model_path`` if already loaded.
    The output appears complete or not at all.
    """
    model_path, out = os.fspath(model_path), Path(out)
    is_package = model_path.endswith(PACKAGE_SUFFIX)
    check_graded_output(out, is_package)
    if model is None:
        model = load_model(model_path)
    active = build_active_set(
        model,
        data,
        tol=tol,
        rank_rtol=rank_rtol,
        batch_size=batch_size,
        chemical_species_to_atom_type_map=chemical_species_to_atom_type_map,
        progress=progress,
    )
    if is_package:

        def insert(models, importer) -> None:
            add_extrapolation_grade(models, active, module_class=_package_grade_class(importer))

        rewrite_package(model_path, out, insert)
    elif out.name.endswith(".ckpt"):
        _write_checkpoint(model_path, out, active, model)
    else:
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmpdir:
            ckpt = Path(tmpdir) / "with_grade.ckpt"
            _write_checkpoint(model_path, ckpt, active, model)
            package_checkpoint(ckpt, out)
    return active
