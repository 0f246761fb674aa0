/* A compiled (AOTInductor) NequIP-framework model with the pair_sus2 / pair_allegro contract,
   behind an interface of plain C++ types: the LAMMPS side never includes torch headers (both
   bundle their own {fmt}), and this side never includes LAMMPS headers.
   Part of nequip-sus2 (MIT license). */

#ifndef NEQUIP_SUS2_SUS2_MODEL_H
#define NEQUIP_SUS2_SUS2_MODEL_H

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace sus2 {

using Metadata = std::unordered_map<std::string, std::string>;

/* A problem with the model file or its evaluation, worded for the LAMMPS user. */
class ModelError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/* What the pair style needs to know about a compiled model, read from its metadata. */
struct ModelInfo {
  std::vector<std::string> type_names;  // index = model atom type
  double r_max = 0.0;                   // Angstrom
  std::string device;                   // "cpu", "cuda", ...
  std::string model_dtype;              // "float32" or "float64"
  std::string inputs, outputs;          // nequip's field lists, space-separated
  bool has_grade = false;               // outputs the per-atom extrapolation grade
};

/* Metadata of a .nequip.pt2 file (the AOTInductor package's metadata dictionary). */
Metadata read_metadata(const std::string &path);

/* Check that the metadata describe a pair_sus2 / pair_allegro model and extract its info;
   throws ModelError naming the target the file was compiled for otherwise. */
ModelInfo check_metadata(const std::string &path, const Metadata &metadata);

class Model {
 public:
  explicit Model(const std::string &path);
  ~Model();
  Model(const Model &) = delete;
  Model &operator=(const Model &) = delete;

  const ModelInfo &info() const { return info_; }

  /* One evaluation. pos: [n, 3]; types: [n]; edges: [2, e] (row 0 = centres, row 1 =
     neighbours). Fills energy [n], forces [n, 3] (row-major) and virial [3, 3]; and grade [n]
     when the model has one (info().has_grade; grade is left untouched otherwise). */
  void evaluate(const double *pos, const int64_t *types, int64_t n, const int64_t *edges,
                int64_t e, std::vector<double> &energy, std::vector<double> &forces,
                double virial[9], std::vector<double> &grade);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  ModelInfo info_;
};

}    // namespace sus2

#endif
