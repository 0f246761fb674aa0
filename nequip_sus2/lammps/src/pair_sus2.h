/* pair_style sus2: SUS2 (or any strictly local NequIP-framework) models compiled with
   `nequip-compile --mode aotinductor --target pair_sus2` (or `--target pair_allegro`), run
   through libtorch's AOTInductor package loader, on any number of MPI ranks.
   Part of nequip-sus2 (MIT license).

   Usage:   pair_style sus2 [select G] [break G] [selected FILE]
            pair_coeff * * model.nequip.pt2 Cu Ag Au   (the model type name of each LAMMPS
                                                         atom type; NULL = not this style's)

   A model compiled with --target pair_sus2_grade also returns the per-atom extrapolation
   grade: `fix ID all pair N sus2 grade 0` makes it a per-atom vector for dump, and
   `compute ID all pair sus2` gives the largest grade of the step as c_ID[1]. Above `select`
   the configuration is appended to FILE (MLIP-2 .cfg, default selected.cfg); above `break`
   the run stops with an error. Per-atom virials (compute stress/atom, and the site-energy
   centroid form for compute centroid/stress/atom and heat/flux) are computed on the steps
   that ask for them.
*/

#ifndef NEQUIP_SUS2_PAIR_SUS2_H
#define NEQUIP_SUS2_PAIR_SUS2_H

#include "pair.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace sus2 {
class Model;
}

namespace LAMMPS_NS {

class PairSUS2 : public Pair {
 public:
  explicit PairSUS2(class LAMMPS *);
  ~PairSUS2() override;

  void compute(int, int) override;
  void settings(int, char **) override;
  void coeff(int, char **) override;
  void init_style() override;
  double init_one(int, int) override;
  int pack_reverse_comm(int, int, double *) override;
  void unpack_reverse_comm(int, int *, double *) override;
  void *extract_peratom(const char *, int &) override;
  double memory_usage() override;

 protected:
  void allocate();
  void build_graph(bool per_edge_nodes);
  void tally_atom_virial(bool newton);    // vatom and cvatom from the per-edge graph
  void check_grade();
  void write_selected(double max_grade);

  std::unique_ptr<sus2::Model> model_;
  std::string model_path_;
  std::vector<int> type_of_;    // LAMMPS type (1..ntypes) -> model type, -1 = NULL
  double r_max_ = 0.0;

  // graph of the current step; buffers reused between steps
  std::vector<int> node_of_;          // atom (local + ghost) -> node, -1 if not in the graph
  std::vector<int> atom_of_;          // node -> atom, -1 for padding nodes
  std::vector<double> pos_;           // [nodes, 3]
  std::vector<int64_t> types_;        // [nodes]
  std::vector<int64_t> src_, dst_;    // edge centres (local atoms) and neighbours
  std::vector<int64_t> edges_;        // [2, edges]
  int ncentres_ = 0;                  // nodes 0..ncentres_-1: the local atoms of the list
  std::vector<double> energy_, forces_, grade_;
  std::vector<double> rcomm_;         // [atoms, rcomm_width_] ghost forces (and per-atom
  int rcomm_width_ = 3;               // virials) folded back when newton is off

  // extrapolation grade: thresholds (negative = off), per-atom values of the local atoms
  double select_ = -1.0, break_ = -1.0;
  std::string selected_path_ = "selected.cfg";
  double *grade_atom_ = nullptr;
  int grade_nmax_ = 0;
  double grade_max_[1] = {0.0};       // pvector: largest grade of the step (on rank 0)
  bigint nselected_ = 0;
};

}    // namespace LAMMPS_NS

#endif
