"""Former home of the ``.mtp``/``.cfg`` translation, packaging and error evaluation, kept so
that scripts written against it still run: each name is looked up in its module now (with a
``DeprecationWarning`` naming it). New code imports from those modules directly."""

import importlib
import warnings

#: name -> the module that owns it now
MOVED = {
    "InteropError": "nequip_sus2.errors",
    "ase_calculator": "nequip_sus2.ase.evaluate",
    "calc_errors": "nequip_sus2.ase.evaluate",
    "calc_grade": "nequip_sus2.ase.evaluate",
    "cfg_to_extxyz": "nequip_sus2.io.convert",
    "extxyz_to_cfg": "nequip_sus2.io.convert",
    "example_data": "nequip_sus2.package",
    "load_model": "nequip_sus2.package",
    "write_package": "nequip_sus2.package",
    "PACKAGE_SUFFIX": "nequip_sus2.package",
    "export_mtp": "nequip_sus2.io.mtp_model",
    "import_mtp": "nequip_sus2.io.mtp_model",
    "import_mtp_to_package": "nequip_sus2.io.mtp_model",
    "model_to_mtp": "nequip_sus2.io.mtp_model",
    "read_type_names": "nequip_sus2.io.species",
    "shortest_pair_distances": "nequip_sus2.data.distances",
}

__all__ = sorted(MOVED)


def __getattr__(name: str):
    if name not in MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = MOVED[name]
    warnings.warn(
        f"nequip_sus2.interop.{name} moved to {module}.{name}; import it from there",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(module), name)
