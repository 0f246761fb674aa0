/* The libtorch side of pair_style sus2: load a .nequip.pt2 AOTInductor package, check that it
   was compiled for the local + ghost atom contract, and evaluate it.
   Part of nequip-sus2 (MIT license). */

#include "sus2_model.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <algorithm>
#include <fstream>
#include <sstream>

namespace sus2 {

namespace {

// metadata keys written by nequip-compile (nequip.utils.aoti_metadata, nequip.nn.graph_model)
const char *const kInputs = "nequip_aoti_inputs";
const char *const kOutputs = "nequip_aoti_outputs";
const char *const kTypeNames = "type_names";
const char *const kRMax = "r_max";
const char *const kDevice = "AOTI_DEVICE_KEY";
const char *const kDtype = "model_dtype";
const char *const kPerEdgeTypeCutoff = "per_edge_type_cutoff";

const std::vector<std::string> kExpectedInputs = {"pos", "edge_index", "atom_types"};
const std::vector<std::string> kExpectedOutputs = {"atomic_energy", "forces", "virial"};
const char *const kGrade = "sus2_extrapolation_grade";

std::vector<std::string> words(const std::string &text)
{
  std::istringstream in(text);
  std::vector<std::string> out;
  for (std::string w; in >> w;) out.push_back(w);
  return out;
}

bool contains(const std::vector<std::string> &list, const std::string &item)
{
  return std::find(list.begin(), list.end(), item) != list.end();
}

// the nequip-compile --target that produces these fields (for error messages)
std::string guess_target(const std::vector<std::string> &inputs,
                         const std::vector<std::string> &outputs)
{
  if (contains(inputs, "batch") || contains(inputs, "num_atoms")) return "batch";
  if (contains(inputs, "edge_cell_shift") || contains(inputs, "cell")) {
    if (contains(outputs, "sus2_extrapolation_grade")) return "sus2_ase";
    if (contains(outputs, "stress") || contains(outputs, "total_energy")) return "ase";
    return "pair_nequip";
  }
  return "a custom target";
}

std::string first_line(const std::string &text)
{
  auto end = text.find('\n');
  return end == std::string::npos ? text : text.substr(0, end);
}

std::string get(const Metadata &metadata, const std::string &path, const char *key)
{
  auto it = metadata.find(key);
  if (it == metadata.end())
    throw ModelError(path + " has no '" + key +
                     "' metadata: it was not written by nequip-compile >= 0.17 "
                     "(--mode aotinductor); recompile it with --target pair_sus2");
  return it->second;
}

}    // namespace

Metadata read_metadata(const std::string &path)
{
  if (!std::ifstream(path).good()) throw ModelError("cannot open model file " + path);
  try {
    return torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(path, "model");
  } catch (const std::exception &err) {
    throw ModelError(path +
                     " is not an AOTInductor model package (.nequip.pt2 from nequip-compile "
                     "--mode aotinductor --target pair_sus2): " +
                     first_line(err.what()));
  }
}

ModelInfo check_metadata(const std::string &path, const Metadata &metadata)
{
  ModelInfo info;
  info.inputs = get(metadata, path, kInputs);
  info.outputs = get(metadata, path, kOutputs);
  auto inputs = words(info.inputs);
  auto outputs = words(info.outputs);
  bool outputs_ok = std::all_of(kExpectedOutputs.begin(), kExpectedOutputs.end(),
                                [&](const std::string &k) { return contains(outputs, k); });
  if (inputs != kExpectedInputs || !outputs_ok) {
    std::string target = guess_target(inputs, outputs);
    std::string hint;
    if (target == "pair_nequip")
      hint = " (a --target pair_nequip file is for pair_style nequip of pair_nequip_allegro, "
             "one MPI rank)";
    throw ModelError(path + " was compiled for --target " + target + " (inputs: " +
                     info.inputs + "; outputs: " + info.outputs + ")" + hint +
                     ", but pair_style sus2 needs a strictly local model compiled with "
                     "`nequip-compile MODEL OUT.nequip.pt2 --mode aotinductor --device cpu "
                     "--target pair_sus2` (or pair_sus2_grade, or pair_allegro)");
  }
  info.type_names = words(get(metadata, path, kTypeNames));
  if (info.type_names.empty()) throw ModelError(path + " lists no model type names");
  std::string r_max = get(metadata, path, kRMax);
  try {
    info.r_max = std::stod(r_max);
  } catch (const std::exception &) {
    throw ModelError(path + ": r_max metadata '" + r_max + "' is not a number");
  }
  if (!(info.r_max > 0.0)) throw ModelError(path + ": r_max metadata must be positive");
  if (metadata.count(kPerEdgeTypeCutoff))
    throw ModelError(path +
                     " uses per-edge-type cutoffs, which pair_style sus2 does not support");
  info.has_grade = contains(outputs, kGrade);
  info.device = get(metadata, path, kDevice);
  auto dtype = metadata.find(kDtype);
  info.model_dtype = dtype == metadata.end() ? "unknown" : dtype->second;
  return info;
}

struct Model::Impl {
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  c10::Device device{c10::kCPU};
  int out_energy = -1, out_forces = -1, out_virial = -1, out_grade = -1;
};

Model::Model(const std::string &path) : impl_(std::make_unique<Impl>())
{
  info_ = check_metadata(path, read_metadata(path));
  auto outputs = words(info_.outputs);
  auto index = [&](const std::string &key) {
    return static_cast<int>(std::find(outputs.begin(), outputs.end(), key) - outputs.begin());
  };
  impl_->out_energy = index("atomic_energy");
  impl_->out_forces = index("forces");
  impl_->out_virial = index("virial");
  if (info_.has_grade) impl_->out_grade = index(kGrade);
  try {
    impl_->device = c10::Device(info_.device);
    impl_->loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path, "model");
  } catch (const c10::Error &err) {
    throw ModelError("cannot load " + path + " (compiled for device " + info_.device +
                     "; AOTInductor files run only on the kind of machine and the torch "
                     "version they were compiled with): " +
                     first_line(err.what_without_backtrace()));
  } catch (const std::exception &err) {
    throw ModelError("cannot load " + path + ": " + first_line(err.what()));
  }
}

Model::~Model() = default;

void Model::evaluate(const double *pos, const int64_t *types, int64_t n, const int64_t *edges,
                     int64_t e, std::vector<double> &energy, std::vector<double> &forces,
                     double virial[9], std::vector<double> &grade)
{
  std::vector<at::Tensor> out;
  try {
    c10::InferenceMode guard;
    auto f64 = at::TensorOptions().dtype(at::kDouble);
    auto i64 = at::TensorOptions().dtype(at::kLong);
    std::vector<at::Tensor> in = {
        at::from_blob(const_cast<double *>(pos), {n, 3}, f64).to(impl_->device),
        at::from_blob(const_cast<int64_t *>(edges), {2, e}, i64).to(impl_->device),
        at::from_blob(const_cast<int64_t *>(types), {n}, i64).to(impl_->device)};
    out = impl_->loader->run(in);
    auto host = [&](int k, int64_t numel, const char *what) {
      if (k >= static_cast<int>(out.size()))
        throw ModelError(std::string("the model returned no ") + what);
      at::Tensor t = out[k].to(at::kCPU, at::kDouble).contiguous();
      if (t.numel() != numel)
        throw ModelError(std::string("the model returned ") + std::to_string(t.numel()) +
                         " values of " + what + ", expected " + std::to_string(numel));
      return t;
    };
    at::Tensor te = host(impl_->out_energy, n, "atomic_energy");
    at::Tensor tf = host(impl_->out_forces, 3 * n, "forces");
    at::Tensor tv = host(impl_->out_virial, 9, "virial");
    energy.assign(te.data_ptr<double>(), te.data_ptr<double>() + n);
    forces.assign(tf.data_ptr<double>(), tf.data_ptr<double>() + 3 * n);
    std::copy(tv.data_ptr<double>(), tv.data_ptr<double>() + 9, virial);
    if (impl_->out_grade >= 0) {
      at::Tensor tg = host(impl_->out_grade, n, "sus2_extrapolation_grade");
      grade.assign(tg.data_ptr<double>(), tg.data_ptr<double>() + n);
    }
  } catch (const c10::Error &err) {
    throw ModelError("model evaluation failed (" + std::to_string(n) + " atoms, " +
                     std::to_string(e) + " edges): " +
                     first_line(err.what_without_backtrace()));
  }
}

}    // namespace sus2
