/* LAMMPS plugin entry point: registers pair_style sus2 (`plugin load sus2plugin.so`).
   Part of nequip-sus2 (MIT license). */

#include "sus2_lammpsplugin.h"

#include "lammps.h"
#include "pair_sus2.h"

#ifndef SUS2_LAMMPS_VERSION
#error "build with -DSUS2_LAMMPS_VERSION=\"<LAMMPS version string>\" (nequip-sus2 lammps-plugin --build does)"
#endif

using namespace LAMMPS_NS;

static void *create_pair_sus2(void *lmp)
{
  Pair *pair = new PairSUS2(static_cast<LAMMPS *>(lmp));
  return pair;    // LAMMPS casts the factory's result back to Pair *
}

extern "C" void lammpsplugin_init(void *lmp, void *handle, void *regfunc)
{
  sus2_lammpsplugin_t plugin;
  plugin.version = SUS2_LAMMPS_VERSION;
  plugin.style = "pair";
  plugin.name = "sus2";
  plugin.info = "SUS2 / strictly local NequIP AOTInductor models (nequip-sus2)";
  plugin.author = "nequip-sus2 developers";
  plugin.creator.v1 = &create_pair_sus2;
  plugin.handle = handle;
  reinterpret_cast<sus2_plugin_register_t>(regfunc)(&plugin, lmp);
}
