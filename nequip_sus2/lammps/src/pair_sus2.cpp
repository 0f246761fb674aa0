/* pair_style sus2 (see pair_sus2.h). Part of nequip-sus2 (MIT license).

   Each step every MPI rank builds a graph from its full neighbour list: nodes are the local
   atoms of the list (the centres, first) and the local or ghost atoms within r_max of them;
   edges go from a centre to each such neighbour. The compiled model returns per-node energies,
   forces and the virial of this graph. Only the centres' energies are tallied; forces on ghost
   nodes are folded back onto their owners by LAMMPS (newton pair on) or by this style's own
   reverse communication (newton pair off). The model's virial is this rank's share of the
   global virial (LAMMPS sums the ranks).

   Per-atom virials: on the steps that need them (compute stress/atom, heat/flux) every edge
   gets its own neighbour node (a copy of the neighbour atom). The model's force on that copy
   is then the force of this one edge, F_e = -dE/dr_e with r_e = r_neighbour - r_centre, and
   the edge's virial r_e (x) F_e is shared half and half by its two atoms (the sum over atoms
   is the global virial). The centroid (heat flux) form gives the whole edge virial to the
   neighbour: W_j = sum over the edges e ending at j of r_e (x) F_e, the per-atom virial of a
   sum of site energies E_i (with pe/atom it gives the exact heat current). Energies and forces
   are the same as with the shared nodes; the evaluation costs more (one node per edge).

   Extrapolation grade: models compiled with --target pair_sus2_grade return the grade of
   every node; the centres' grades are the local atoms' grades. The largest grade of the step
   is reduced over the ranks, so every rank takes the same select / break decision. */

#include "pair_sus2.h"

#include "atom.h"
#include "comm.h"
#include "domain.h"
#include "error.h"
#include "force.h"
#include "memory.h"
#include "neigh_list.h"
#include "neighbor.h"
#include "update.h"

#include "sus2_model.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <mpi.h>

using namespace LAMMPS_NS;

PairSUS2::PairSUS2(LAMMPS *lmp) : Pair(lmp)
{
  single_enable = 0;
  restartinfo = 0;
  one_coeff = 1;
  manybody_flag = 1;
  no_virial_fdotr_compute = 1;    // the model returns the virial
  centroidstressflag = CENTROID_AVAIL;
  comm_reverse = 18;       // forces (3), per-atom virials (6) and centroid virials (9)
  comm_reverse_off = 18;    // ghost forces are folded back by hand when newton pair is off
  nextra = 1;              // compute pair sus2: the largest extrapolation grade of the step
  pvector = grade_max_;
}

PairSUS2::~PairSUS2()
{
  if (copymode) return;
  pvector = nullptr;
  memory->destroy(grade_atom_);
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

void PairSUS2::settings(int narg, char **arg)
{
  select_ = break_ = -1.0;
  selected_path_ = "selected.cfg";
  const char *usage = "pair_style sus2 [select GRADE] [break GRADE] [selected FILE.cfg]";
  for (int iarg = 0; iarg < narg; iarg += 2) {
    const std::string key = arg[iarg];
    if (key != "select" && key != "break" && key != "selected")
      error->all(FLERR,
                 "pair_style sus2: unknown keyword '{}' (usage: {}; the model and the species "
                 "go in pair_coeff * * model.nequip.pt2 NAME ...)",
                 key, usage);
    if (iarg + 1 >= narg)
      error->all(FLERR, "pair_style sus2: keyword '{}' needs a value (usage: {})", key, usage);
    if (key == "selected") {
      selected_path_ = arg[iarg + 1];
      continue;
    }
    double value = utils::numeric(FLERR, arg[iarg + 1], false, lmp);
    if (!std::isfinite(value) || value <= 0.0)
      error->all(FLERR, "pair_style sus2: {} threshold must be a positive number, got {}", key,
                 arg[iarg + 1]);
    (key == "select" ? select_ : break_) = value;
  }
  if (select_ > 0.0 && break_ > 0.0 && break_ < select_)
    error->all(FLERR, "pair_style sus2: break threshold {} is below the select threshold {}",
               break_, select_);
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

  if ((select_ > 0.0 || break_ > 0.0) && !model_->info().has_grade)
    error->all(FLERR,
               "pair_style sus2: select/break thresholds need a model with an extrapolation "
               "grade, and {} has none: add one with `nequip-sus2 active-set` and compile with "
               "--target pair_sus2_grade",
               model_path_);
  if (select_ > 0.0) {
    int ok = 1;
    if (comm->me == 0) {
      FILE *fp = fopen(selected_path_.c_str(), "a");
      if (fp == nullptr) ok = 0;
      else fclose(fp);
    }
    MPI_Bcast(&ok, 1, MPI_INT, 0, world);
    if (!ok)
      error->all(FLERR, "pair_style sus2: cannot open {} for appending selected configurations",
                 selected_path_);
  }
  if (comm->me == 0 && (select_ > 0.0 || break_ > 0.0))
    utils::logmesg(lmp, "pair_style sus2: extrapolation grade: select above {} (to {}), break "
                   "above {}\n", select_ > 0.0 ? fmt::format("{}", select_) : "off",
                   selected_path_, break_ > 0.0 ? fmt::format("{}", break_) : "off");
}

double PairSUS2::init_one(int /*i*/, int /*j*/)
{
  return r_max_;
}

void PairSUS2::build_graph(bool per_edge_nodes)
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
  auto add_node = [&](int a, int64_t model_type, double px, double py, double pz,
                      bool shared = true) {
    int node = static_cast<int>(atom_of_.size());
    if (a >= 0 && shared) node_of_[a] = node;
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
      int nj = per_edge_nodes ? -1 : node_of_[j];
      if (nj < 0) nj = add_node(j, tj, x[j][0], x[j][1], x[j][2], !per_edge_nodes);
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
  if (neighbor->cutneighmax < r_max_)
    error->all(FLERR, "pair_style sus2: the neighbour cutoff {} is smaller than the model's "
               "r_max {}", neighbor->cutneighmax, r_max_);

  const bool per_atom_virial = vflag_atom || cvflag_atom;
  build_graph(per_atom_virial);
  const int64_t nnodes = static_cast<int64_t>(atom_of_.size());
  const int64_t nedges = static_cast<int64_t>(src_.size());
  double v[9];
  try {
    model_->evaluate(pos_.data(), types_.data(), nnodes, edges_.data(), nedges, energy_,
                     forces_, v, grade_);
  } catch (const sus2::ModelError &err) {
    error->one(FLERR, "pair_style sus2: {}", err.what());
  }

  const int nlocal = atom->nlocal;
  const int nall = nlocal + atom->nghost;
  const bool newton = force->newton_pair != 0;
  double **f = atom->f;
  rcomm_width_ = 3 + (vflag_atom ? 6 : 0) + (cvflag_atom ? 9 : 0);
  if (!newton) rcomm_.assign(static_cast<std::size_t>(rcomm_width_) * nall, 0.0);

  for (int64_t node = 0; node < nnodes; node++) {
    const int a = atom_of_[node];
    if (a < 0) continue;
    const double *fn = &forces_[3 * node];
    double *target =
        (a < nlocal || newton) ? f[a] : &rcomm_[static_cast<std::size_t>(rcomm_width_) * a];
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

  if (per_atom_virial) tally_atom_virial(newton);

  if (!newton) {
    comm->reverse_comm(this, rcomm_width_);
    for (int i = 0; i < nlocal; i++) {
      const double *r = &rcomm_[static_cast<std::size_t>(rcomm_width_) * i];
      f[i][0] += r[0];
      f[i][1] += r[1];
      f[i][2] += r[2];
      int m = 3;
      if (vflag_atom)
        for (int k = 0; k < 6; k++) vatom[i][k] += r[m++];
      if (cvflag_atom)
        for (int k = 0; k < 9; k++) cvatom[i][k] += r[m++];
    }
  }

  if (model_->info().has_grade) check_grade();
}

/* per-atom virials from the per-edge graph (build_graph(true)): node dst_[e] is edge e's own
   copy of its neighbour atom, so forces_[dst_[e]] is the force of edge e alone */
void PairSUS2::tally_atom_virial(bool newton)
{
  const int nlocal = atom->nlocal;
  const std::size_t nedges = src_.size();
  for (std::size_t e = 0; e < nedges; e++) {
    const int64_t c = src_[e], n = dst_[e];
    const int i = atom_of_[c], j = atom_of_[n];
    if (i < 0 || j < 0) continue;    // padding
    const double *rc = &pos_[3 * c];
    const double *rn = &pos_[3 * n];
    const double *fe = &forces_[3 * n];
    const double dx = rn[0] - rc[0], dy = rn[1] - rc[1], dz = rn[2] - rc[2];
    // r_e (x) F_e in LAMMPS's order xx yy zz xy xz yz yx zx zy
    const double w[9] = {dx * fe[0], dy * fe[1], dz * fe[2], dx * fe[1], dx * fe[2],
                         dy * fe[2], dy * fe[0], dz * fe[0], dz * fe[1]};
    const bool j_here = j < nlocal || newton;
    double *extra = j_here ? nullptr : &rcomm_[static_cast<std::size_t>(rcomm_width_) * j + 3];
    if (vflag_atom) {
      const double h[6] = {0.5 * w[0], 0.5 * w[1], 0.5 * w[2], 0.25 * (w[3] + w[6]),
                           0.25 * (w[4] + w[7]), 0.25 * (w[5] + w[8])};
      double *tj = j_here ? vatom[j] : extra;
      for (int k = 0; k < 6; k++) {
        vatom[i][k] += h[k];    // centres are local atoms
        tj[k] += h[k];
      }
      if (extra) extra += 6;
    }
    if (cvflag_atom) {
      double *tj = j_here ? cvatom[j] : extra;
      for (int k = 0; k < 9; k++) tj[k] += w[k];
    }
  }
}

/* per-atom grades of the local atoms, the step's largest grade on all ranks, select / break */
void PairSUS2::check_grade()
{
  const int nlocal = atom->nlocal;
  if (atom->nmax > grade_nmax_) {
    grade_nmax_ = atom->nmax;
    memory->destroy(grade_atom_);
    memory->create(grade_atom_, grade_nmax_, "pair:sus2_grade");
  }
  std::fill(grade_atom_, grade_atom_ + nlocal, 0.0);
  double local_max = 0.0;
  for (int node = 0; node < ncentres_; node++) {
    const double g = grade_[node];
    grade_atom_[atom_of_[node]] = g;
    // a NaN grade must count as above every threshold
    local_max = (std::isnan(g) || std::isnan(local_max)) ? NAN : std::max(local_max, g);
  }
  double global_max = 0.0;
  int local_nan = std::isnan(local_max) ? 1 : 0, any_nan = 0;
  if (local_nan) local_max = 0.0;
  MPI_Allreduce(&local_max, &global_max, 1, MPI_DOUBLE, MPI_MAX, world);
  MPI_Allreduce(&local_nan, &any_nan, 1, MPI_INT, MPI_MAX, world);
  if (any_nan) global_max = NAN;
  grade_max_[0] = comm->me == 0 ? global_max : 0.0;    // compute pair sums over the ranks

  const bool above_select = select_ > 0.0 && !(global_max <= select_);
  const bool above_break = break_ > 0.0 && !(global_max <= break_);
  if (above_select) write_selected(global_max);
  if (above_break)
    error->all(FLERR, "sus2: extrapolation grade {} above break threshold {} at step {}",
               global_max, break_, update->ntimestep);
}

/* append the whole configuration (gathered on rank 0) to selected_path_ as an MLIP-2 .cfg
   frame: ids, model types, Cartesian positions (box origin at 0), the per-atom grades as
   column nbh_grades, the step's largest grade as Feature MV_grade */
void PairSUS2::write_selected(double max_grade)
{
  const int nlocal = atom->nlocal;
  const int *type = atom->type;
  const tagint *tag = atom->tag;
  double **x = atom->x;
  const double *lo = domain->boxlo;
  constexpr int kWidth = 6;    // id, type, x, y, z, grade
  std::vector<double> mine;
  mine.reserve(static_cast<std::size_t>(kWidth) * nlocal);
  for (int i = 0; i < nlocal; i++) {
    const int t = type_of_[type[i]];
    if (t < 0) continue;
    mine.insert(mine.end(), {static_cast<double>(tag[i]), static_cast<double>(t),
                             x[i][0] - lo[0], x[i][1] - lo[1], x[i][2] - lo[2],
                             grade_atom_[i]});
  }
  int count = static_cast<int>(mine.size());
  std::vector<int> counts(comm->nprocs), offsets(comm->nprocs, 0);
  MPI_Gather(&count, 1, MPI_INT, counts.data(), 1, MPI_INT, 0, world);
  std::vector<double> all;
  if (comm->me == 0) {
    for (int r = 1; r < comm->nprocs; r++) offsets[r] = offsets[r - 1] + counts[r - 1];
    all.resize(static_cast<std::size_t>(offsets.back()) + counts.back());
  }
  MPI_Gatherv(mine.data(), count, MPI_DOUBLE, all.data(), counts.data(), offsets.data(),
              MPI_DOUBLE, 0, world);
  nselected_++;

  int ok = 1;
  if (comm->me == 0) {
    const std::size_t n = all.size() / kWidth;
    std::vector<std::size_t> order(n);
    for (std::size_t k = 0; k < n; k++) order[k] = k;
    std::sort(order.begin(), order.end(),
              [&](std::size_t a, std::size_t b) { return all[kWidth * a] < all[kWidth * b]; });
    std::string text = fmt::format("BEGIN_CFG\n Size\n    {}\n", n);
    const double cell[3][3] = {{domain->xprd, 0.0, 0.0},
                               {domain->xy, domain->yprd, 0.0},
                               {domain->xz, domain->yz, domain->zprd}};
    text += " Supercell\n";
    for (int d = 0; d < 3; d++) {
      if (domain->periodicity[d])
        text += fmt::format("    {:.17g} {:.17g} {:.17g}\n", cell[d][0], cell[d][1], cell[d][2]);
      else
        text += "    0 0 0\n";
    }
    text += " AtomData:  id type cartes_x cartes_y cartes_z nbh_grades\n";
    for (std::size_t k : order) {
      const double *row = &all[kWidth * k];
      text += fmt::format("    {} {} {:.17g} {:.17g} {:.17g} {:.17g}\n",
                          static_cast<tagint>(row[0]), static_cast<int>(row[1]), row[2], row[3],
                          row[4], row[5]);
    }
    text += fmt::format(" Feature MV_grade {:.17g}\n Feature sus2_step {}\nEND_CFG\n\n",
                        max_grade, update->ntimestep);
    FILE *fp = fopen(selected_path_.c_str(), "a");
    if (fp == nullptr || fputs(text.c_str(), fp) < 0) ok = 0;
    if (fp != nullptr && fclose(fp) != 0) ok = 0;
  }
  MPI_Bcast(&ok, 1, MPI_INT, 0, world);
  if (!ok)
    error->all(FLERR, "pair_style sus2: cannot append the selected configuration to {}",
               selected_path_);
}

void *PairSUS2::extract_peratom(const char *name, int &ncol)
{
  if (strcmp(name, "grade") != 0) return nullptr;
  if (model_ && !model_->info().has_grade)
    error->all(FLERR,
               "pair_style sus2: model {} has no extrapolation grade: add one with `nequip-sus2 "
               "active-set` and compile with --target pair_sus2_grade",
               model_path_);
  ncol = 0;
  if (grade_atom_ == nullptr) {
    grade_nmax_ = std::max(atom->nmax, 1);
    memory->create(grade_atom_, grade_nmax_, "pair:sus2_grade");
    std::fill(grade_atom_, grade_atom_ + grade_nmax_, 0.0);
  }
  return grade_atom_;
}

int PairSUS2::pack_reverse_comm(int n, int first, double *buf)
{
  int m = 0;
  const std::size_t w = rcomm_width_;
  for (int i = first; i < first + n; i++)
    for (std::size_t k = 0; k < w; k++) buf[m++] = rcomm_[w * i + k];
  return m;
}

void PairSUS2::unpack_reverse_comm(int n, int *list, double *buf)
{
  int m = 0;
  const std::size_t w = rcomm_width_;
  for (int k = 0; k < n; k++) {
    const std::size_t j = list[k];
    for (std::size_t c = 0; c < w; c++) rcomm_[w * j + c] += buf[m++];
  }
}

double PairSUS2::memory_usage()
{
  double bytes = Pair::memory_usage();
  bytes += sizeof(int) * (node_of_.capacity() + atom_of_.capacity());
  bytes += sizeof(double) * (pos_.capacity() + energy_.capacity() + forces_.capacity() +
                             grade_.capacity() + rcomm_.capacity() + grade_nmax_);
  bytes += sizeof(int64_t) *
      (types_.capacity() + src_.capacity() + dst_.capacity() + edges_.capacity());
  return bytes;
}
