/* pair_style sus2 (see pair_sus2.h). Part of nequip-sus2 (MIT license).

   Each step every MPI rank builds a graph from its full neighbour list: nodes are the local
   atoms of the list (the centres, first) and the local or ghost atoms within r_max of them;
   edges go from a centre to each such neighbour. The compiled model returns per-node energies,
   forces and the virial of this graph. Only the centres' energies are tallied; forces on ghost
   nodes are folded back onto their owners by LAMMPS (newton pair on) or by this style's own
   reverse communication (newton pair off). The model's virial is this rank's share of the
   global virial (LAMMPS sums the ranks). */

#include "pair_sus2.h"

#include "atom.h"
#include "comm.h"
#include "error.h"
#include "force.h"
#include "memory.h"
#include "neigh_list.h"
#include "neighbor.h"
#include "update.h"

#include "sus2_model.h"

#include <algorithm>
#include <cstring>

using namespace LAMMPS_NS;

PairSUS2::PairSUS2(LAMMPS *lmp) : Pair(lmp)
{
  single_enable = 0;
  restartinfo = 0;
  one_coeff = 1;
  manybody_flag = 1;
  no_virial_fdotr_compute = 1;    // the model returns the virial
  centroidstressflag = CENTROID_NOTAVAIL;
  comm_reverse = 3;
  comm_reverse_off = 3;    // ghost forces are folded back by hand when newton pair is off
}

PairSUS2::~PairSUS2()
{
  if (copymode) return;
  if (allocated) {
    memory->destroy(setflag);
    memory->destroy(cutsq);
  }
}

void PairSUS2::allocate()
{
  allocated = 1;
  int n = atom->ntypes + 1;
  memory->create(setflag, n, n, "pair:setflag");
  memory->create(cutsq, n, n, "pair:cutsq");
  for (int i = 0; i < n; i++)
    for (int j = 0; j < n; j++) setflag[i][j] = 0;
  type_of_.assign(n, -1);
}

void PairSUS2::settings(int narg, char ** /*arg*/)
{
  if (narg != 0)
    error->all(FLERR,
               "pair_style sus2 takes no arguments; give the model and the species with "
               "pair_coeff * * model.nequip.pt2 NAME ...");
}

void PairSUS2::coeff(int narg, char **arg)
{
  if (!allocated) allocate();
  const int ntypes = atom->ntypes;
  if (narg < 3 || strcmp(arg[0], "*") != 0 || strcmp(arg[1], "*") != 0)
    error->all(FLERR,
               "pair_coeff for pair_style sus2 must be: pair_coeff * * model.nequip.pt2 NAME "
               "... (one model type name or NULL per LAMMPS atom type)");
  if (narg != 3 + ntypes)
    error->all(FLERR,
               "pair_coeff for pair_style sus2 needs one model type name (or NULL) for each of "
               "the {} LAMMPS atom types after the model file, got {}",
               ntypes, narg - 3);

  model_path_ = arg[2];
  model_.reset();
  try {
    model_ = std::make_unique<sus2::Model>(model_path_);
  } catch (const sus2::ModelError &err) {
    error->all(FLERR, "pair_style sus2: {}", err.what());
  }
  const sus2::ModelInfo &info = model_->info();
  r_max_ = info.r_max;

  std::string known;
  for (const auto &name : info.type_names) known += (known.empty() ? "" : " ") + name;
  int mapped = 0;
  for (int t = 1; t <= ntypes; t++) {
    std::string name = arg[2 + t];
    type_of_[t] = -1;
    if (name == "NULL") continue;
    for (std::size_t k = 0; k < info.type_names.size(); k++)
      if (info.type_names[k] == name) type_of_[t] = static_cast<int>(k);
    if (type_of_[t] < 0)
      error->all(FLERR,
                 "pair_style sus2: species '{}' given for LAMMPS atom type {} is not a type of "
                 "model {} (its types: {})",
                 name, t, model_path_, known);
    mapped++;
  }
  if (mapped == 0) error->all(FLERR, "pair_style sus2: pair_coeff maps no atom type to the model");
  for (int i = 1; i <= ntypes; i++)
    for (int j = 1; j <= ntypes; j++) setflag[i][j] = (type_of_[i] >= 0 && type_of_[j] >= 0);

  if (comm->me == 0)
    utils::logmesg(lmp,
                   "pair_style sus2: {} ({} model types: {}; r_max {} A; {}; device {})\n",
                   model_path_, info.type_names.size(), known, r_max_, info.model_dtype,
                   info.device);
}

void PairSUS2::init_style()
{
  if (!model_) error->all(FLERR, "pair_style sus2: pair_coeff * * model.nequip.pt2 ... is missing");
  if (strcmp(update->unit_style, "metal") != 0)
    error->all(FLERR, "pair_style sus2 needs units metal (eV, Angstrom), not units {}",
               update->unit_style);
  neighbor->add_request(this, NeighConst::REQ_FULL);
}

double PairSUS2::init_one(int /*i*/, int /*j*/)
{
  return r_max_;
}

void PairSUS2::build_graph()
{
  const int nall = atom->nlocal + atom->nghost;
  double **x = atom->x;
  const int *type = atom->type;
  const int inum = list->inum;
  const int *ilist = list->ilist;
  const int *numneigh = list->numneigh;
  int **firstneigh = list->firstneigh;
  const double cutsq_model = r_max_ * r_max_;

  node_of_.assign(nall, -1);
  atom_of_.clear();
  pos_.clear();
  types_.clear();
  src_.clear();
  dst_.clear();
  auto add_node = [&](int a, int64_t model_type, double px, double py, double pz) {
    int node = static_cast<int>(atom_of_.size());
    if (a >= 0) node_of_[a] = node;
    atom_of_.push_back(a);
    types_.push_back(model_type);
    pos_.push_back(px);
    pos_.push_back(py);
    pos_.push_back(pz);
    return node;
  };

  for (int ii = 0; ii < inum; ii++) {
    int i = ilist[ii];
    if (type_of_[type[i]] >= 0) add_node(i, type_of_[type[i]], x[i][0], x[i][1], x[i][2]);
  }
  ncentres_ = static_cast<int>(atom_of_.size());

  for (int ii = 0; ii < inum; ii++) {
    const int i = ilist[ii];
    const int ni = node_of_[i];
    if (ni < 0) continue;
    const int *jlist = firstneigh[i];
    for (int jj = 0; jj < numneigh[i]; jj++) {
      const int j = jlist[jj] & NEIGHMASK;
      const int tj = type_of_[type[j]];
      if (tj < 0) continue;
      const double dx = x[j][0] - x[i][0];
      const double dy = x[j][1] - x[i][1];
      const double dz = x[j][2] - x[i][2];
      if (dx * dx + dy * dy + dz * dz >= cutsq_model) continue;
      int nj = node_of_[j];
      if (nj < 0) nj = add_node(j, tj, x[j][0], x[j][1], x[j][2]);
      src_.push_back(ni);
      dst_.push_back(nj);
    }
  }

  // compiled models take at least 2 nodes and 2 edges (dynamic dimensions start at 2): pad
  // with two unconnected dummy atoms exactly r_max apart, whose edges contribute nothing
  if (src_.size() < 2) {
    int a = add_node(-1, 0, 0.0, 0.0, 0.0);
    int b = add_node(-1, 0, r_max_, 0.0, 0.0);
    src_.push_back(a);
    dst_.push_back(b);
    src_.push_back(b);
    dst_.push_back(a);
  }
  edges_.resize(2 * src_.size());
  std::copy(src_.begin(), src_.end(), edges_.begin());
  std::copy(dst_.begin(), dst_.end(), edges_.begin() + src_.size());
}

void PairSUS2::compute(int eflag, int vflag)
{
  ev_init(eflag, vflag);
  if (vflag_atom)
    error->all(FLERR,
               "pair_style sus2 does not compute per-atom virials (compute stress/atom); the "
               "global virial and pressure are available");
  if (neighbor->cutneighmax < r_max_)
    error->all(FLERR, "pair_style sus2: the neighbour cutoff {} is smaller than the model's "
               "r_max {}", neighbor->cutneighmax, r_max_);

  build_graph();
  const int64_t nnodes = static_cast<int64_t>(atom_of_.size());
  const int64_t nedges = static_cast<int64_t>(src_.size());
  double v[9];
  try {
    model_->evaluate(pos_.data(), types_.data(), nnodes, edges_.data(), nedges, energy_,
                     forces_, v);
  } catch (const sus2::ModelError &err) {
    error->one(FLERR, "pair_style sus2: {}", err.what());
  }

  const int nlocal = atom->nlocal;
  const int nall = nlocal + atom->nghost;
  const bool newton = force->newton_pair != 0;
  double **f = atom->f;
  if (!newton) fcomm_.assign(3 * static_cast<std::size_t>(nall), 0.0);

  for (int64_t node = 0; node < nnodes; node++) {
    const int a = atom_of_[node];
    if (a < 0) continue;
    const double *fn = &forces_[3 * node];
    double *target = (a < nlocal || newton) ? f[a] : &fcomm_[3 * static_cast<std::size_t>(a)];
    target[0] += fn[0];
    target[1] += fn[1];
    target[2] += fn[2];
  }

  if (eflag_either) {
    for (int node = 0; node < ncentres_; node++) {
      const double e = energy_[node];
      if (eflag_global) eng_vdwl += e;
      if (eflag_atom) eatom[atom_of_[node]] += e;
    }
  }

  if (vflag_global) {
    virial[0] += v[0];
    virial[1] += v[4];
    virial[2] += v[8];
    virial[3] += 0.5 * (v[1] + v[3]);
    virial[4] += 0.5 * (v[2] + v[6]);
    virial[5] += 0.5 * (v[5] + v[7]);
  }

  if (!newton) {
    comm->reverse_comm(this, 3);
    for (int i = 0; i < nlocal; i++) {
      f[i][0] += fcomm_[3 * i];
      f[i][1] += fcomm_[3 * i + 1];
      f[i][2] += fcomm_[3 * i + 2];
    }
  }
}

int PairSUS2::pack_reverse_comm(int n, int first, double *buf)
{
  int m = 0;
  for (int i = first; i < first + n; i++) {
    buf[m++] = fcomm_[3 * i];
    buf[m++] = fcomm_[3 * i + 1];
    buf[m++] = fcomm_[3 * i + 2];
  }
  return m;
}

void PairSUS2::unpack_reverse_comm(int n, int *list, double *buf)
{
  int m = 0;
  for (int k = 0; k < n; k++) {
    const int j = list[k];
    fcomm_[3 * j] += buf[m++];
    fcomm_[3 * j + 1] += buf[m++];
    fcomm_[3 * j + 2] += buf[m++];
  }
}

double PairSUS2::memory_usage()
{
  double bytes = Pair::memory_usage();
  bytes += sizeof(int) * (node_of_.capacity() + atom_of_.capacity());
  bytes += sizeof(double) * (pos_.capacity() + energy_.capacity() + forces_.capacity() +
                             fcomm_.capacity());
  bytes += sizeof(int64_t) *
      (types_.capacity() + src_.capacity() + dst_.capacity() + edges_.capacity());
  return bytes;
}
