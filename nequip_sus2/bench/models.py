"""Loading any NequIP-framework model for benchmarking, behind one small interface.

A :class:`BenchModel` wraps an eager ``GraphModel`` (from a checkpoint, a package, a ``.mtp``
file or the caller's memory) or an AOT-compiled ``.nequip.pt2`` and evaluates structures the way
the NequIP ASE calculator does (``from_ase`` + the host's ``basic_transforms``: species map and
neighbour list), in batches where the model accepts them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..package import ensure_global_state

__all__ = [
    "BenchModel",
    "ModelSpec",
    "load_bench_model",
    "load_bench_models",
    "model_kind",
    "resolve_device",
]

#: label fields that ``from_ase`` copies from an attached calculator; never fed to a model
_LABEL_KEYS = ("total_energy", "forces", "stress", "virial", "atomic_energy", "free_energy")
_COMPILED_SUFFIXES = (".nequip.pt2", ".nequip.pth")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/``None`` -> ``cuda`` when available, else ``cpu``."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_kind(model: torch.nn.Module | None) -> str:
    """``SUS2``, ``Allegro``, ``NequIP`` or ``other``, from the model's module classes.

    Works for packaged models too (their classes keep their names inside ``torch.package``).
    """
    if model is None:
        return "unknown"
    names = {type(m).__name__ for m in model.modules()}
    if "UniversalPairScaling" in names and "MomentContraction" in names:
        return "SUS2"
    if "Allegro_Module" in names:
        return "Allegro"
    if "ConvNetLayer" in names:
        return "NequIP"
    return "other"


def _strip_package_suffix(name: str) -> str:
    for suffix in (".nequip.zip", *_COMPILED_SUFFIXES, ".ckpt", ".mtp"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


@dataclass
class ModelSpec:
    """A model to benchmark: a path (``.ckpt``, ``.nequip.zip``, ``.nequip.pt2``, ``.mtp``) or
    an in-memory ``GraphModel``, with an optional display name."""

    source: str | os.PathLike | torch.nn.Module
    name: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``PATH`` or ``NAME=PATH`` (a name may not contain ``/`` or ``=``)."""
        name, sep, path = text.partition("=")
        if sep and name and "/" not in name and not os.path.exists(text):
            return cls(source=path, name=name)
        return cls(source=text)


@dataclass
class BenchModel:
    """A loaded model plus what the benchmark needs to know about it.

    Attributes:
        name: display name (unique within a run)
        source: file path, or ``<in-memory>``
        fmt: ``checkpoint``, ``package``, ``compiled``, ``mtp`` or ``in-memory``
        kind: ``SUS2``, ``NequIP``, ``Allegro``, ``other`` (eager) or ``unknown`` (compiled)
        model: callable on an ``AtomicDataDict`` (eager ``GraphModel`` or compiled wrapper)
        type_names: the model's atom types (chemical symbols map onto them by name)
        r_max: cutoff radius (Angstrom)
        device: where the model runs
        batched: whether ``model`` accepts several frames in one call
        metadata: the model's metadata (strings as NequIP stores them)
    """

    name: str
    source: str
    fmt: str
    kind: str
    model: torch.nn.Module
    type_names: list[str]
    r_max: float
    device: torch.device
    batched: bool
    metadata: dict[str, Any] = field(default_factory=dict)
    compile_seconds: float | None = None
    _transforms: list | None = field(default=None, repr=False)

    # -- facts ------------------------------------------------------------------------------

    @property
    def compiled(self) -> bool:
        return self.fmt == "compiled"

    @property
    def eager(self) -> torch.nn.Module | None:
        """The eager ``GraphModel`` (``None`` for a compiled model)."""
        return None if self.compiled else self.model

    @property
    def dtype(self) -> str:
        return str(self.metadata.get("model_dtype", "unknown"))

    def num_parameters(self) -> dict[str, int] | None:
        """Total and trainable parameter counts (``None`` for a compiled model)."""
        if self.compiled:
            return None
        params = list(self.model.parameters())
        return {
            "total": int(sum(p.numel() for p in params)),
            "trainable": int(sum(p.numel() for p in params if p.requires_grad)),
        }

    def describe(self) -> dict[str, Any]:
        """JSON-ready description."""
        return {
            "name": self.name,
            "source": self.source,
            "format": self.fmt,
            "kind": self.kind,
            "type_names": list(self.type_names),
            "num_types": len(self.type_names),
            "r_max": self.r_max,
            "model_dtype": self.dtype,
            "device": str(self.device),
            "num_parameters": self.num_parameters(),
            "compile_seconds": self.compile_seconds,
        }

    # -- evaluation -------------------------------------------------------------------------

    @property
    def transforms(self) -> list:
        if self._transforms is None:
            from nequip.integrations.utils import basic_transforms

            self._transforms = basic_transforms(
                self.metadata, self.r_max, list(self.type_names), {t: t for t in self.type_names}
            )
        return self._transforms

    def check_species(self, symbols: Iterable[str], where: str = "the data") -> None:
        missing = sorted(set(symbols) - set(self.type_names))
        if missing:
            raise ValueError(
                f"model {self.name!r} has no atom type for {' '.join(missing)} found in {where} "
                f"(its type_names: {' '.join(self.type_names)})"
            )

    def atoms_to_data(self, atoms) -> dict[str, torch.Tensor]:
        """One structure as a model input (labels stripped), on CPU."""
        from nequip.data import from_ase

        data = from_ase(atoms)
        for key in _LABEL_KEYS:
            data.pop(key, None)
        for t in self.transforms:
            data = t(data)
        return data

    def _call(self, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from nequip.data import AtomicDataDict

        data = AtomicDataDict.to_(data, self.device)
        return self.model(data)

    def evaluate_data(
        self, datas: Sequence[dict[str, torch.Tensor]]
    ) -> list[dict[str, np.ndarray]]:
        """Predictions for prepared inputs (one call if batched, else one call per frame).

        Each result has ``energy`` (float), ``forces`` ``(N, 3)`` and ``stress`` ``(6,)``
        (ASE Voigt order and sign, eV/A^3; NaN where the model gives none), in float64.
        """
        from nequip.data import AtomicDataDict

        if not datas:
            return []
        if not self.batched or len(datas) == 1:
            results = []
            for d in datas:
                if self.batched:
                    d = AtomicDataDict.batched_from_list([d])
                results.extend(_split_outputs(self._call(d), [_num_atoms(d)]))
            return results
        batch = AtomicDataDict.batched_from_list(list(datas))
        return _split_outputs(self._call(batch), [_num_atoms(d) for d in datas])

    def evaluate(self, atoms_list: Sequence, batch_size: int = 16) -> list[dict[str, np.ndarray]]:
        """Predictions for ASE ``Atoms`` (see :meth:`evaluate_data`)."""
        out: list[dict[str, np.ndarray]] = []
        step = max(1, batch_size if self.batched else 1)
        for i in range(0, len(atoms_list), step):
            datas = [self.atoms_to_data(a) for a in atoms_list[i : i + step]]
            out.extend(self.evaluate_batches(datas))
        return out

    def evaluate_batches(self, datas: Sequence[dict[str, torch.Tensor]]) -> list:
        """Like :meth:`evaluate_data` but frames whose fields differ go in separate calls."""
        groups: dict[tuple, list[int]] = {}
        for i, d in enumerate(datas):
            groups.setdefault(tuple(sorted(d.keys())), []).append(i)
        results: list = [None] * len(datas)
        for idx in groups.values():
            for i, r in zip(idx, self.evaluate_data([datas[i] for i in idx]), strict=True):
                results[i] = r
        return results

    def calculator(self):
        """A NequIP ASE calculator on this model (for EOS and MD)."""
        from nequip.integrations.ase import NequIPCalculator

        return NequIPCalculator(model=self.model, device=self.device, transforms=self.transforms)


def _num_atoms(data: dict[str, torch.Tensor]) -> int:
    return int(data["pos"].shape[0])


def _split_outputs(out: dict[str, torch.Tensor], sizes: Sequence[int]) -> list[dict]:
    from ase.stress import full_3x3_to_voigt_6_stress

    n_frames = len(sizes)
    energy = out["total_energy"].detach().to("cpu", torch.float64).reshape(n_frames)
    forces = out["forces"].detach().to("cpu", torch.float64).numpy()
    stress = None
    if "stress" in out:
        stress = out["stress"].detach().to("cpu", torch.float64).reshape(n_frames, 3, 3).numpy()
    results, start = [], 0
    for k, n in enumerate(sizes):
        s = (
            full_3x3_to_voigt_6_stress(stress[k])
            if stress is not None
            else np.full(6, np.nan, dtype=np.float64)
        )
        results.append(
            {
                "energy": float(energy[k]),
                "forces": forces[start : start + n].copy(),
                "stress": np.asarray(s, dtype=np.float64),
            }
        )
        start += n
    return results


def _unique_name(name: str, taken: set[str]) -> str:
    out, k = name, 2
    while out in taken:
        out, k = f"{name}-{k}", k + 1
    return out


def _eager_metadata(model: torch.nn.Module) -> dict[str, Any]:
    metadata = dict(getattr(model, "metadata", {}) or {})
    if "r_max" not in metadata or "type_names" not in metadata:
        raise ValueError(
            "an in-memory model must be a NequIP GraphModel (with metadata r_max and type_names)"
        )
    return metadata


def load_bench_model(
    spec: ModelSpec | str | os.PathLike | torch.nn.Module,
    *,
    device: str | torch.device | None = "auto",
    type_names: Sequence[str] | None = None,
    model_dtype: str = "float64",
    model_key: str | None = None,
    name: str | None = None,
) -> BenchModel:
    """Load one model for benchmarking.

    Args:
        spec: a path (``.ckpt``, ``.nequip.zip``, ``.nequip.pt2`` compiled with ``--target ase``
            or ``batch``, trained ``.mtp``), ``NAME=PATH``, an in-memory ``GraphModel`` or a
            :class:`ModelSpec`
        device: ``auto`` (GPU when present), ``cpu``, ``cuda``, ...
        type_names: species of a ``.mtp`` file's type indices (required for ``.mtp``)
        model_dtype: precision of a model built from a ``.mtp`` file
        model_key: model to use from a multi-model checkpoint/package (default: the only one)
        name: display name (default: from ``NAME=`` or the file name)
    """
    if not isinstance(spec, ModelSpec):
        spec = ModelSpec.parse(spec) if isinstance(spec, str) else ModelSpec(spec)
    dev = resolve_device(device)
    ensure_global_state()
    src = spec.source
    if isinstance(src, torch.nn.Module):
        metadata = _eager_metadata(src)
        model = src.eval().to(dev)
        kind = model_kind(model)
        return BenchModel(
            name=name or spec.name or (kind if kind != "other" else "model"),
            source="<in-memory>",
            fmt="in-memory",
            kind=kind,
            model=model,
            type_names=_type_names(metadata),
            r_max=float(metadata["r_max"]),
            device=dev,
            batched=True,
            metadata=metadata,
        )
    path = os.fspath(src)
    display = name or spec.name or _strip_package_suffix(os.path.basename(path))
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such model file")
    if path.endswith(_COMPILED_SUFFIXES):
        from nequip.model.inference_models import load_compiled_model
        from nequip.utils.aoti_metadata import NEQUIP_AOTI_INPUTS_KEY

        try:
            model, metadata = load_compiled_model(path, dev)
        except RuntimeError as exc:
            # an AOTI artefact runs only on the device it was compiled for; with "auto", use it
            if not (device in (None, "auto") and dev.type != "cpu" and "compiled for" in str(exc)):
                raise
            dev = torch.device("cpu")
            model, metadata = load_compiled_model(path, dev)
        inputs = str(metadata.get(NEQUIP_AOTI_INPUTS_KEY, ""))
        return BenchModel(
            name=display,
            source=path,
            fmt="compiled",
            kind="unknown",
            model=model.eval(),
            type_names=_type_names(metadata),
            r_max=float(metadata["r_max"]),
            device=dev,
            batched="batch" in inputs.split(),
            metadata={k: v for k, v in metadata.items() if isinstance(v, (str, int, float))}
            | {"type_names": " ".join(_type_names(metadata))},
        )
    if path.endswith(".mtp"):
        if type_names is None:
            raise ValueError(
                f"{path}: a .mtp file stores no element symbols; give the species of its type "
                "indices with --type-names (Python: type_names=[...])"
            )
        from ..model import SUS2FromMTP

        model = SUS2FromMTP(path, type_names=list(type_names), model_dtype=model_dtype)
        fmt = "mtp"
    else:
        from nequip.model.saved_models.load_utils import load_saved_model

        models = load_saved_model(path, compile_mode="eager", model_key=None)
        keys = list(models.keys())
        key = model_key if model_key is not None else (keys[0] if len(keys) == 1 else None)
        if key not in keys:
            raise ValueError(
                f"{path}: holds models {keys}; choose one with NAME=PATH and --model-key"
            )
        model = models[key]
        fmt = "package" if path.endswith(".nequip.zip") else "checkpoint"
    model = model.eval().to(dev)
    metadata = _eager_metadata(model)
    return BenchModel(
        name=display,
        source=path,
        fmt=fmt,
        kind=model_kind(model),
        model=model,
        type_names=_type_names(metadata),
        r_max=float(metadata["r_max"]),
        device=dev,
        batched=True,
        metadata=metadata,
    )


def _type_names(metadata: Mapping[str, Any]) -> list[str]:
    names = metadata["type_names"]
    return names.split(" ") if isinstance(names, str) else list(names)


def load_bench_models(
    specs: Iterable[Any] | Mapping[str, Any],
    **kwargs,
) -> list[BenchModel]:
    """Load several models (paths, ``NAME=PATH`` strings, in-memory models, ``(name, model)``
    pairs or a ``{name: model_or_path}`` mapping); names are made unique."""
    items: list[tuple[str | None, Any]]
    if isinstance(specs, Mapping):
        items = list(specs.items())
    else:
        items = []
        for s in specs:
            if isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], str):
                items.append((s[0], s[1]))
            elif isinstance(s, BenchModel):
                items.append((None, s))
            else:
                items.append((None, s))
    out: list[BenchModel] = []
    taken: set[str] = set()
    for given, src in items:
        bm = src if isinstance(src, BenchModel) else load_bench_model(src, name=given, **kwargs)
        bm.name = _unique_name(bm.name, taken)
        taken.add(bm.name)
        out.append(bm)
    if not out:
        raise ValueError("no models to benchmark")
    return out
