/* pair_style sus2: SUS2 (or any strictly local NequIP-framework) models compiled with
   `nequip-compile --mode aotinductor --target pair_sus2` (or `--target pair_allegro`), run
   through libtorch's AOTInductor package loader, on any number of MPI ranks.
   Part of nequip-sus2 (MIT license).

   Usage:   pair_style sus2
            pair_coeff * * model.nequip.pt2 Cu Ag Au   (the model type name of each LAMMPS
                                                         atom type; NULL = not this style's)
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
  double memory_usage() override;

 protected:
  void allocate();
  void build_graph();

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
  std::vector<double> energy_, forces_;
  std::vector<double> fcomm_;         // [atoms, 3] ghost forces folded back when newton is off
};

}    // namespace LAMMPS_NS

#endif
