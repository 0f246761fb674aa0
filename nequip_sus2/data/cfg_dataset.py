"""MLIP-2 ``.cfg`` files as NequIP data sets: no conversion step before ``nequip-train``.

:class:`CfgDataset` is a :class:`nequip.data.dataset.AtomicDataset`, so it goes wherever NequIP
takes a data set config (``train_dataset``, ``split_dataset: {dataset: ...}``,
``SubsetByRandomSlice``); :class:`CfgDataModule` is the ``.cfg`` twin of NequIP's
``ASEDataModule`` (file paths instead of data set configs)::

    data:
      _target_: nequip_sus2.data.cfg_dataset.CfgDataModule
      seed: 1
      type_names: [Li, Be, Na, ...]        # species of the file's `type` column, in order
      split_dataset: {file_path: /abs/path/alloy_train.cfg, train: 0.9, val: 0.1}
      transforms:
        - _target_: nequip.data.transforms.NeighborListTransform
          r_max: 6.0

Labels follow NequIP's ASE path exactly (``nequip.data.from_ase`` of
``CfgFrame.to_atoms``): ``total_energy`` (eV), ``forces`` (eV/A) and ``stress`` = ``-PlusStress /
V`` (eV/A^3, ASE sign) for fully periodic frames; optionally ``virial`` = ``PlusStress`` (eV,
NequIP's ``virial``, also for non-periodic frames). ``atom_types`` is the file's ``type`` column;
``atomic_numbers`` is added when every type name is a chemical symbol, so a
``ChemicalSpeciesToAtomTypeMapper`` can remap to a model with another species order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from nequip.data import AtomicDataDict, from_dict
from nequip.data.datamodule import NequIPDataModule
from nequip.data.dataset import AtomicDataset

from ..io.cfg import CfgFormatError, CfgFrame, iter_cfg
from ..io.datafile import cfg_error, check_type_range
from ..io.species import check_type_names

__all__ = ["CfgDataModule", "CfgDataset", "frame_to_data"]

logger = logging.getLogger(__name__)


def _atomic_numbers(type_names: Sequence[str]) -> np.ndarray | None:
    from ase.data import atomic_numbers

    if all(name in atomic_numbers for name in type_names):
        return np.array([atomic_numbers[name] for name in type_names], dtype=np.int64)
    return None


def frame_to_data(
    frame: CfgFrame,
    numbers: np.ndarray | None = None,
    stress: bool = True,
    virial: bool = False,
) -> AtomicDataDict.Type:
    """One frame as an ``AtomicDataDict`` (float64), with the labels of NequIP's ASE path.

    Args:
        frame: the configuration
        numbers: atomic number per type index (adds ``atomic_numbers``), or ``None``
        stress: add ``stress = -PlusStress / V`` (the frame must be fully periodic)
        virial: add ``virial = PlusStress`` (3x3, eV)
    """
    from nequip.utils.dtype import torch_default_dtype

    data: dict[str, Any] = {
        AtomicDataDict.POSITIONS_KEY: frame.positions,
        AtomicDataDict.CELL_KEY: np.zeros((3, 3)) if frame.cell is None else frame.cell,
        AtomicDataDict.PBC_KEY: frame.pbc,
        AtomicDataDict.ATOM_TYPE_KEY: frame.types,
    }
    if numbers is not None:
        data[AtomicDataDict.ATOMIC_NUMBERS_KEY] = numbers[frame.types]
    if frame.energy is not None:
        data[AtomicDataDict.TOTAL_ENERGY_KEY] = np.float64(frame.energy)
    if frame.forces is not None:
        data[AtomicDataDict.FORCE_KEY] = frame.forces
    if stress:
        volume = abs(float(np.linalg.det(frame.cell)))
        data[AtomicDataDict.STRESS_KEY] = (-frame.virial / volume)[None]
    if virial:
        data[AtomicDataDict.VIRIAL_KEY] = frame.virial[None]
    with torch_default_dtype(torch.float64):
        return from_dict(data)


class CfgDataset(AtomicDataset):
    """An MLIP-2 ``.cfg`` file as a NequIP data set (read once, kept in memory).

    Args:
        file_path (str): the ``.cfg`` file
        type_names (List[str]): species of the file's ``type`` indices 0..C-1, in order (the
            file stores no element symbols); usually the model's ``type_names``
        transforms (List[Callable]): data transforms (e.g. ``NeighborListTransform``)
        include_stress (bool): ``stress`` labels. ``null`` (default): included when every frame
            is fully periodic and has PlusStress, else left out with a warning; ``true``: required
            (error naming the first frame without); ``false``: never
        include_virial (bool): also give ``virial`` = PlusStress (every frame needs PlusStress)

    Every frame must carry the same labels (NequIP batches need the same keys): a file where
    only some frames have ``Energy`` or forces is refused with an error naming file and line.
    """

    def __init__(
        self,
        file_path: str,
        type_names: Sequence[str],
        transforms: list[Callable] = [],  # noqa: B006 (NequIP's data set signature)
        include_stress: bool | None = None,
        include_virial: bool = False,
    ):
        super().__init__(transforms=transforms)
        self.file_path = os.fspath(file_path)
        self.type_names = check_type_names(list(type_names), f"{self.file_path}: type_names")
        frames = list(iter_cfg(self.file_path))
        if not frames:
            raise CfgFormatError(self.file_path, 1, "BEGIN_CFG", "no configurations in file")
        self._check(frames)
        stress = self._decide_stress(frames, include_stress)
        if include_virial:
            self._require(frames, lambda f: f.plus_stress is not None, "PlusStress", "virial")
        numbers = _atomic_numbers(self.type_names)
        self.data_list: list[AtomicDataDict.Type] = [
            frame_to_data(f, numbers, stress=stress, virial=include_virial) for f in frames
        ]

    # -- checks ---------------------------------------------------------------------------------

    def _error(self, index: int, field: str, message: str) -> CfgFormatError:
        return cfg_error(self.file_path, index, field, message)

    def _check(self, frames: list[CfgFrame]) -> None:
        for index, frame in enumerate(frames):
            check_type_range(frame, index, self.file_path, self.type_names)
        for field, has in (
            ("Energy", lambda f: f.energy is not None),
            ("fx", lambda f: f.forces is not None),
        ):
            present = [has(f) for f in frames]
            if any(present) and not all(present):
                index = present.index(False)
                raise self._error(
                    index,
                    field,
                    f"{field} is missing here but present in {sum(present)} of {len(frames)} "
                    "configurations; every configuration needs the same labels",
                )

    def _require(self, frames, ok: Callable[[CfgFrame], bool], field: str, label: str) -> None:
        for index, frame in enumerate(frames):
            if not ok(frame):
                raise self._error(
                    index, field, f"{label} labels were requested but this configuration has none"
                )

    def _decide_stress(self, frames: list[CfgFrame], include: bool | None) -> bool:
        def ok(f: CfgFrame) -> bool:
            return f.plus_stress is not None and bool(f.pbc.all())

        if include is False:
            return False
        if include:
            for index, frame in enumerate(frames):
                if not ok(frame):
                    why = "has no PlusStress" if frame.plus_stress is None else "is not periodic"
                    raise self._error(
                        index,
                        "PlusStress",
                        f"stress labels were requested but this configuration {why}",
                    )
            return True
        good = sum(ok(f) for f in frames)
        if good and good < len(frames):
            logger.warning(
                "%s: %d of %d configurations have no stress (no PlusStress or not fully "
                "periodic); stress labels are left out (include_virial: true keeps virials)",
                self.file_path,
                len(frames) - good,
                len(frames),
            )
        return good == len(frames)

    # -- AtomicDataset --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.data_list)

    def _get_data_list(self, indices) -> list[AtomicDataDict.Type]:
        if isinstance(indices, slice):
            return self.data_list[indices]
        return [self.data_list[int(i)] for i in indices]


class CfgDataModule(NequIPDataModule):
    """``NequIPDataModule`` for ``.cfg`` files, like NequIP's ``ASEDataModule``.

    Args:
        seed (int): data seed for reproducibility
        type_names (List[str]): species of the files' ``type`` indices, in order
        train_file_path, val_file_path, test_file_path, predict_file_path (str/List[str]):
            ``.cfg`` files for each role
        split_dataset (Dict/List[Dict]): ``{file_path: ..., train: ..., val: ..., ...}``
            (fractions summing to 1 or counts summing to the number of frames)
        transforms (List[Callable]): data transforms
        include_stress (bool), include_virial (bool): see :class:`CfgDataset`
        **kwargs: the remaining ``NequIPDataModule`` arguments (data loaders, stats manager)
    """

    def __init__(
        self,
        seed: int,
        type_names: Sequence[str],
        train_file_path: str | list[str] = [],  # noqa: B006 (NequIP's signature)
        val_file_path: str | list[str] = [],  # noqa: B006
        test_file_path: str | list[str] = [],  # noqa: B006
        predict_file_path: str | list[str] = [],  # noqa: B006
        split_dataset: dict | list[dict] = [],  # noqa: B006
        transforms: list[Callable] = [],  # noqa: B006
        include_stress: bool | None = None,
        include_virial: bool = False,
        **kwargs,
    ):
        from omegaconf import DictConfig, ListConfig, OmegaConf

        def plain(x):
            if isinstance(x, (DictConfig, ListConfig)):
                x = OmegaConf.to_container(x, resolve=True)
            return x if isinstance(x, list) else [x]

        template = {
            "_target_": "nequip_sus2.data.cfg_dataset.CfgDataset",
            "type_names": list(plain(type_names)),
            "transforms": transforms,
            "include_stress": include_stress,
            "include_virial": include_virial,
        }
        roles = []
        for paths in (train_file_path, val_file_path, test_file_path, predict_file_path):
            roles.append([{**template, "file_path": p} for p in plain(paths)])
        splits = []
        for entry in plain(split_dataset):
            entry = dict(entry)
            file_path = entry.pop("file_path", None)
            if file_path is None:
                raise ValueError("each entry of `split_dataset` needs a `file_path`")
            splits.append({**entry, "dataset": {**template, "file_path": file_path}})
        super().__init__(
            seed=seed,
            train_dataset=roles[0],
            val_dataset=roles[1],
            test_dataset=roles[2],
            predict_dataset=roles[3],
            split_dataset=splits,
            **kwargs,
        )
