// Fused per-edge SUS2 (docs/theory.md §2.2-2.5) for CPU: from edge vectors to the basic moments of
// every atom in one pass over the edges, and the edge-vector gradient of the backward pass in
// another.
//
//   r* = alpha_{eta Z_i Z_j} (r - r0_{eta Z_i Z_j}),   xi = tanh(r*/2)                  (2.2)
//   Q_{eta n}(r) = sigma T_n(xi) (r - R_c)^2   for r < R_c, else 0                      (2.3)
//   f_mu(r) = w_{Z_i} w_{Z_j} sum_n c_{mu n} Q_{eta(mu) n}(r)                          (2.4)
//   M_b(i) = sum_j f_{mu_b}(r_ij) u_x^{a_b} u_y^{b_b} u_z^{c_b},   u = r_ij / r        (2.5)
//
// Backward, with G = dL/dM and m_b(u) the monomials:
//   dL/dr_ij = (sum_mu g_mu f'_mu(r)) u + (h - (u.h) u) / r,
//   g_mu = sum_{b: mu_b = mu} G_b(i) m_b(u),   h = sum_b G_b(i) f_{mu_b} grad_u m_b(u).
//
// Two forms: sus2::basic_moments reads the edge vectors r_ij ([E, 3]); the form used by models,
// sus2::basic_moments_from_positions, builds them from the positions, the cell and the edge cell
// shifts (r_ij = x_j - x_i + S_e . cell, in float64) and its backward returns dL/dx and dL/dcell
// directly (forces and, through NequIP's cell displacement, the virial), so no [E, 3] array is
// stored or scattered outside the kernel. Both passes walk the edges one centre atom at a time
// (see Block), with every per-edge step vectorised over the atom's edges. CPU kernels; shape
// functions and autograd come from nequip_sus2/kernels/ops.py. Only the geometry is
// differentiated: the operators serve inference. The same file is compiled into the LAMMPS
// plugin so that AOTInductor-compiled models calling the operators run there too.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kMaxPower = 16;     // largest monomial power per axis
constexpr int64_t kMaxRuntimeR = 64;  // largest radial basis size

// Everything the per-edge evaluation reads, as raw pointers into contiguous tensors.
template <typename T>
struct Model {
  const T* alpha;         // [N_eta, C*C]
  const T* r0;            // [N_eta, C*C]
  const T* coeffs;        // [N_mu, R]
  const int64_t* eta;     // [N_mu]
  const T* weights;       // [C]
  const int64_t* types;   // [N]
  std::vector<int64_t> mu, mono;         // per basic slot: radial function, monomial
  std::vector<int64_t> ma, mb, mc;        // per distinct monomial u_x^a u_y^b u_z^c
  std::vector<std::vector<int64_t>> slots_of_mu, slots_of_mono, mus_of_eta;  // inverse maps
  int64_t n_atoms, n_eta, n_types, n_mu, n_r, n_basic, max_power = 0;
  T r_max, sigma;
};

struct Inputs {
  at::Tensor center, neighbor, types, alpha, r0, coeffs, eta, weights, basic;
};

// The edge lists and model parameters, shared by both forms of the operator.
Inputs check(const at::Tensor& center, const at::Tensor& neighbor, const at::Tensor& types,
             const at::Tensor& alpha, const at::Tensor& r0, const at::Tensor& coeffs,
             const at::Tensor& eta, const at::Tensor& weights, const at::Tensor& basic) {
  const char* op = "sus2::basic_moments: ";
  for (const auto* t : {&center, &neighbor, &types, &eta, &basic}) {
    TORCH_CHECK(t->scalar_type() == at::kLong, op, "index tensors must be int64");
  }
  TORCH_CHECK(center.dim() == 1 && neighbor.dim() == 1 && neighbor.size(0) == center.size(0),
              op, "center and neighbor must be [E]");
  TORCH_CHECK(alpha.dim() == 2 && r0.sizes() == alpha.sizes(), op,
              "alpha and r0 must be [N_eta, C*C]");
  TORCH_CHECK(weights.size(0) <= 40000, op, "at most 40000 species");  // pair indices in int32
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) * weights.size(0) == alpha.size(1), op,
              "weights must be [C] with alpha [N_eta, C*C]");
  TORCH_CHECK(coeffs.dim() == 2 && eta.dim() == 1 && eta.size(0) == coeffs.size(0), op,
              "coeffs must be [N_mu, R] and eta_of_mu [N_mu]");
  TORCH_CHECK(basic.dim() == 2 && basic.size(1) == 4, op, "basic must be [n_basic, 4]");
  for (const auto* t : {&r0, &coeffs, &weights}) {
    TORCH_CHECK(t->scalar_type() == alpha.scalar_type(), op,
                "parameters must have the same dtype");
  }
  TORCH_CHECK(alpha.device().is_cpu() && center.device().is_cpu(), op,
              "the fused kernel runs on CPU only");
  // indices are read without bounds checks below: check their ranges once
  if (types.numel() > 0) {
    const auto [lo, hi] = at::aminmax(types);
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < weights.size(0), op,
                "atom types out of range [0, ", weights.size(0), ")");
  }
  // edge indices are checked while the kernels scan the edges (for_each_segment)
  return {center.contiguous(), neighbor.contiguous(), types.contiguous(),
          alpha.contiguous(),  r0.contiguous(),       coeffs.contiguous(),
          eta.contiguous(),    weights.contiguous(),  basic.contiguous()};
}

at::Tensor check_vec(const at::Tensor& vec, const Inputs& in) {
  const char* op = "sus2::basic_moments: ";
  TORCH_CHECK(vec.dim() == 2 && vec.size(1) == 3, op, "vec must be [E, 3]");
  TORCH_CHECK(vec.size(0) == in.center.size(0), op, "center and neighbor must be [E]");
  TORCH_CHECK(vec.scalar_type() == in.alpha.scalar_type(), op,
              "parameters and vec must have the same dtype");
  return vec.contiguous();
}

template <typename T>
Model<T> model_of(const Inputs& in, double r_max, double sigma) {
  Model<T> m;
  m.alpha = in.alpha.data_ptr<T>();
  m.r0 = in.r0.data_ptr<T>();
  m.coeffs = in.coeffs.data_ptr<T>();
  m.eta = in.eta.data_ptr<int64_t>();
  m.weights = in.weights.data_ptr<T>();
  m.types = in.types.data_ptr<int64_t>();
  m.n_atoms = in.types.numel();
  m.n_eta = in.alpha.size(0);
  m.n_types = in.weights.size(0);
  m.n_mu = in.coeffs.size(0);
  m.n_r = in.coeffs.size(1);
  m.n_basic = in.basic.size(0);
  m.r_max = static_cast<T>(r_max);
  m.sigma = static_cast<T>(sigma);
  TORCH_CHECK(m.n_r >= 1 && m.n_r <= kMaxRuntimeR, "sus2::basic_moments: 1 to ",
              kMaxRuntimeR, " radial basis functions");
  m.mus_of_eta.resize(m.n_eta);
  for (int64_t k = 0; k < m.n_mu; ++k) {
    TORCH_CHECK(m.eta[k] >= 0 && m.eta[k] < m.n_eta, "sus2::basic_moments: eta out of range");
    m.mus_of_eta[m.eta[k]].push_back(k);
  }
  const int64_t* p = in.basic.data_ptr<int64_t>();
  for (int64_t s = 0; s < m.n_basic; ++s) {
    TORCH_CHECK(p[4 * s] >= 0 && p[4 * s] < m.n_mu, "sus2::basic_moments: mu out of range");
    for (int k = 1; k < 4; ++k) {
      TORCH_CHECK(p[4 * s + k] >= 0 && p[4 * s + k] <= kMaxPower,
                  "sus2::basic_moments: monomial power out of range");
      m.max_power = std::max(m.max_power, p[4 * s + k]);
    }
    m.mu.push_back(p[4 * s]);
    int64_t j = 0;  // each distinct monomial is evaluated once per edge
    while (j < static_cast<int64_t>(m.ma.size()) &&
           !(m.ma[j] == p[4 * s + 1] && m.mb[j] == p[4 * s + 2] && m.mc[j] == p[4 * s + 3])) {
      ++j;
    }
    if (j == static_cast<int64_t>(m.ma.size())) {
      m.ma.push_back(p[4 * s + 1]);
      m.mb.push_back(p[4 * s + 2]);
      m.mc.push_back(p[4 * s + 3]);
    }
    m.mono.push_back(j);
  }
  m.slots_of_mu.resize(m.n_mu);
  m.slots_of_mono.resize(m.ma.size());
  for (int64_t k = 0; k < m.n_basic; ++k) {
    m.slots_of_mu[m.mu[k]].push_back(k);
    m.slots_of_mono[m.mono[k]].push_back(k);
  }
  return m;
}

// Edges are processed per centre atom: a segment is a run of consecutive edges with the same
// centre (at most kLanes; NequIP's and LAMMPS's neighbour lists group the edges of an atom, any
// order is still correct, only slower). Structure-of-arrays over the segment's lanes, padded to
// a multiple of the vector width with edges beyond the cutoff, so every loop over the lanes is
// a vector loop (compiler-vectorised, or written with ATen's Vectorized<T> where the compiler
// fell back to scalar code). The centre's position, type and dL/dM row are loaded once per
// segment, its moments are reduced in registers, and only the neighbours' gathers and gradient
// scatters stay scalar.
constexpr int64_t kLanes = 64;

// The lane loops have no dependencies between lanes, but the compiler cannot prove that the
// block's arrays do not overlap: tell it (OpenMP SIMD, the kernels are built with -fopenmp).
#define SUS2_SIMD _Pragma("omp simd")

template <typename T>
struct Block {
  int64_t n = 0, np = 0, center = 0;  // edges, padded lanes, centre atom of this segment
  std::vector<T> r, inv, ux, uy, uz, w, env, denv;
  std::vector<T> xi;          // [N_eta][lanes]: tanh(r*/2)
  std::vector<T> f, df;       // [N_mu][lanes]
  std::vector<T> px, py, pz;  // [P+1][lanes]
  std::vector<T> mono;        // [n_mono][lanes]
  std::vector<T> half_alpha;  // [N_eta][lanes]: alpha/2 of each edge's pair
  std::vector<at::vec::int_same_size_t<T>> pair;  // Z_i C + Z_j, as vector-gather indices
  explicit Block(const Model<T>& m)
      : r(kLanes), inv(kLanes), ux(kLanes), uy(kLanes), uz(kLanes), w(kLanes), env(kLanes),
        denv(kLanes), xi(m.n_eta * kLanes), f(m.n_mu * kLanes),
        df(m.n_mu * kLanes), px((m.max_power + 1) * kLanes), py((m.max_power + 1) * kLanes),
        pz((m.max_power + 1) * kLanes), mono(m.ma.size() * kLanes),
        half_alpha(m.n_eta * kLanes), pair(kLanes) {}
};

// tanh(y) = 1 - 2 / (1 + exp(2y)): one vectorised exp (cheaper than a vectorised tanh), exact
// to a few units in the last place of 1 (xi enters the model only through polynomials of xi
// and 1 - xi^2, so absolute accuracy is what matters); exp overflow gives exactly +-1.
template <typename T>
inline void tanh_inplace(T* x, int64_t n) {
  using V = at::vec::Vectorized<T>;
  const V one(T(1)), two(T(2));
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) {
    (one - two / (one + (two * V::loadu(x + i)).exp())).store(x + i);
  }
  for (; i < n; ++i) x[i] = std::tanh(x[i]);
}

// Lane-wise partial sums of a_i b_i over np lanes (np a multiple of the vector width), stored
// to out[0 .. vector width)
template <typename T>
inline void dot_lanes(const T* a, const T* b, int64_t np, T* out) {
  using V = at::vec::Vectorized<T>;
  V acc(T(0));
  for (int64_t i = 0; i < np; i += V::size()) {
    acc = at::vec::fmadd(V::loadu(a + i), V::loadu(b + i), acc);
  }
  acc.store(out);
}

// Calls fn(e0, n, centre) for each segment of the edges [begin, end), checking the indices
// (they are read without bounds checks afterwards).
template <typename F>
void for_each_segment(const int64_t* center, const int64_t* neighbor, int64_t n_atoms,
                      int64_t begin, int64_t end, F&& fn) {
  for (int64_t e0 = begin; e0 < end;) {
    const int64_t a = center[e0];
    int64_t e1 = e0;
    bool ok = a >= 0 && a < n_atoms;
    for (; e1 < end && e1 - e0 < kLanes && center[e1] == a; ++e1) {
      ok &= neighbor[e1] >= 0 && neighbor[e1] < n_atoms;
    }
    TORCH_CHECK(ok, "sus2::basic_moments: edge index out of range [0, ", n_atoms, ")");
    fn(e0, e1 - e0, a);
    e0 = e1;
  }
}

// Where the edge vectors come from, and where their gradients go: an [E, 3] tensor
// (EdgeVectors) or positions, cell and cell shifts (Positions). load() writes the vectors of
// the segment's edges [e0, e0 + n) (centre a) to x, y, z; add_grad() takes their dL/dr_ij
// (thread tid).
template <typename T>
struct EdgeVectors {
  const T* vec;
  T* grad = nullptr;  // [E, 3]
  void load(int64_t e0, int64_t n, int64_t a, T* x, T* y, T* z) const {
    for (int64_t i = 0; i < n; ++i) {
      x[i] = vec[3 * (e0 + i)];
      y[i] = vec[3 * (e0 + i) + 1];
      z[i] = vec[3 * (e0 + i) + 2];
    }
  }
  void add_grad(int64_t e0, int64_t n, int64_t a, const T* gx, const T* gy, const T* gz,
                int tid) const {
    for (int64_t i = 0; i < n; ++i) {
      grad[3 * (e0 + i)] = gx[i];
      grad[3 * (e0 + i) + 1] = gy[i];
      grad[3 * (e0 + i) + 2] = gz[i];
    }
  }
};

// r_ij = x_j - x_i + S_e . cell_b (cell vectors as rows, b the frame of atom i), in float64
template <typename T>
struct Positions {
  const double* pos;    // [N, 3]
  const double* cell;   // [B, 3, 3] or nullptr (no cell)
  const double* shift;  // [E, 3] or nullptr
  const int64_t* batch;  // [N] or nullptr (one frame)
  const int64_t* neighbor;
  double* grad_pos = nullptr;   // [threads][N, 3]
  double* grad_cell = nullptr;  // [threads][B, 3, 3]
  int64_t n_atoms = 0, n_frames = 0;
  const double* cell_of(int64_t a) const { return cell + 9 * (batch != nullptr ? batch[a] : 0); }
  void load(int64_t e0, int64_t n, int64_t a, T* x, T* y, T* z) const {
    const double xa = pos[3 * a], ya = pos[3 * a + 1], za = pos[3 * a + 2];
    const int64_t* nb = neighbor + e0;
    if (cell == nullptr) {
      for (int64_t i = 0; i < n; ++i) {
        x[i] = static_cast<T>(pos[3 * nb[i]] - xa);
        y[i] = static_cast<T>(pos[3 * nb[i] + 1] - ya);
        z[i] = static_cast<T>(pos[3 * nb[i] + 2] - za);
      }
      return;
    }
    const double* c = cell_of(a);
    const double* s = shift + 3 * e0;
    for (int64_t i = 0; i < n; ++i) {
      const double s0 = s[3 * i], s1 = s[3 * i + 1], s2 = s[3 * i + 2];
      x[i] = static_cast<T>(pos[3 * nb[i]] - xa + (s0 * c[0] + s1 * c[3] + s2 * c[6]));
      y[i] = static_cast<T>(pos[3 * nb[i] + 1] - ya + (s0 * c[1] + s1 * c[4] + s2 * c[7]));
      z[i] = static_cast<T>(pos[3 * nb[i] + 2] - za + (s0 * c[2] + s1 * c[5] + s2 * c[8]));
    }
  }
  // dL/dx_j += g_ij, dL/dx_i -= sum_j g_ij, dL/dcell_b += sum_j S_e (x) g_ij
  void add_grad(int64_t e0, int64_t n, int64_t a, const T* gx, const T* gy, const T* gz,
                int tid) const {
    double* gp = grad_pos + tid * n_atoms * 3;
    const int64_t* nb = neighbor + e0;
    double sx = 0, sy = 0, sz = 0;
    for (int64_t i = 0; i < n; ++i) {
      gp[3 * nb[i]] += gx[i];
      gp[3 * nb[i] + 1] += gy[i];
      gp[3 * nb[i] + 2] += gz[i];
      sx += gx[i];
      sy += gy[i];
      sz += gz[i];
    }
    gp[3 * a] -= sx;
    gp[3 * a + 1] -= sy;
    gp[3 * a + 2] -= sz;
    if (cell == nullptr) return;
    double c[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
    const double* s = shift + 3 * e0;
    for (int64_t i = 0; i < n; ++i) {
      const double g[3] = {gx[i], gy[i], gz[i]};
      for (int r = 0; r < 3; ++r) {
        for (int k = 0; k < 3; ++k) c[3 * r + k] += s[3 * i + r] * g[k];
      }
    }
    double* gc = grad_cell + (tid * n_frames + (batch != nullptr ? batch[a] : 0)) * 9;
    for (int k = 0; k < 9; ++k) gc[k] += c[k];
  }
};

// Radial functions of the block from xi (per eta): f_mu = w env sum_k c_{mu k} T_k(xi) and
// f'_mu = w (env xi' sum_k c_{mu k} T'_k(xi) + env' sum_k c_{mu k} T_k(xi)), one vector of lanes
// at a time with the Chebyshev values in registers:
//   T_0 = 1, T_1 = xi, T_{k+1} = 2 xi T_k - T_{k-1};  T'_{k+1} = 2 T_k + 2 xi T'_k - T'_{k-1}.
// kR is the basis size when known at compile time (loops unrolled), else 0 (up to kMaxRuntimeR).

template <typename T, int kR>
void radial_functions_r(const Model<T>& m, bool with_derivative, Block<T>& blk) {
  using V = at::vec::Vectorized<T>;
  const int64_t R = kR > 0 ? kR : m.n_r;
  constexpr int64_t kSize = kR > 0 ? kR : kMaxRuntimeR;
  for (int64_t i = 0; i < blk.np; i += V::size()) {
    const V w = V::loadu(blk.w.data() + i), env = V::loadu(blk.env.data() + i);
    const V denv = V::loadu(blk.denv.data() + i), two(T(2));
    for (int64_t eta = 0; eta < m.n_eta; ++eta) {
      const V xi = V::loadu(blk.xi.data() + eta * kLanes + i);
      V t[kSize], dt[kSize];
      t[0] = V(T(1));
      if (R > 1) t[1] = xi;
      for (int64_t k = 2; k < R; ++k) t[k] = two * xi * t[k - 1] - t[k - 2];
      if (with_derivative) {
        dt[0] = V(T(0));
        if (R > 1) dt[1] = V(T(1));
        for (int64_t k = 2; k < R; ++k) dt[k] = two * t[k - 1] + two * xi * dt[k - 1] - dt[k - 2];
      }
      const V dxi = V::loadu(blk.half_alpha.data() + eta * kLanes + i) * (V(T(1)) - xi * xi);
      for (const int64_t mu : m.mus_of_eta[eta]) {
        const T* c = m.coeffs + mu * R;
        V s(T(0));
        for (int64_t k = 0; k < R; ++k) s = at::vec::fmadd(V(c[k]), t[k], s);
        (w * env * s).store(blk.f.data() + mu * kLanes + i);
        if (with_derivative) {
          V ds(T(0));
          for (int64_t k = 1; k < R; ++k) ds = at::vec::fmadd(V(c[k]), dt[k], ds);
          (w * (ds * dxi * env + s * denv)).store(blk.df.data() + mu * kLanes + i);
        }
      }
    }
  }
}

template <typename T>
void radial_functions(const Model<T>& m, bool with_derivative, Block<T>& blk) {
  switch (m.n_r) {  // the common basis sizes unrolled, others at run time
    case 4: return radial_functions_r<T, 4>(m, with_derivative, blk);
    case 5: return radial_functions_r<T, 5>(m, with_derivative, blk);
    case 6: return radial_functions_r<T, 6>(m, with_derivative, blk);
    case 8: return radial_functions_r<T, 8>(m, with_derivative, blk);
    case 10: return radial_functions_r<T, 10>(m, with_derivative, blk);
    default: return radial_functions_r<T, 0>(m, with_derivative, blk);
  }
}

// Radial functions f (and f' if with_derivative) and monomials of the segment's edges, whose
// vectors are in blk.ux, blk.uy, blk.uz (lanes [n, np) are set here to padding edges beyond the
// cutoff, which contribute exactly zero).
template <typename T>
void evaluate_block(const Model<T>& m, const int64_t* neighbor, int64_t e0, bool with_derivative,
                    Block<T>& blk) {
  const int64_t n = blk.n, np = blk.np, CC = m.n_types * m.n_types;
  const int64_t zi = m.types[blk.center];
  for (int64_t i = 0; i < n; ++i) {
    const int64_t zj = m.types[neighbor[e0 + i]];
    blk.pair[i] = zi * m.n_types + zj;
    blk.w[i] = m.weights[zi] * m.weights[zj];
  }
  SUS2_SIMD
  for (int64_t i = n; i < np; ++i) {
    blk.pair[i] = zi * m.n_types;
    blk.w[i] = T(0);
    blk.ux[i] = T(2) * m.r_max + T(1);
    blk.uy[i] = blk.uz[i] = T(0);
  }
  using V = at::vec::Vectorized<T>;
  using I = at::vec::Vectorized<at::vec::int_same_size_t<T>>;
  const V r_max(m.r_max), sigma(m.sigma), one(T(1)), zero(T(0));
  for (int64_t i = 0; i < np; i += V::size()) {
    const V x = V::loadu(blk.ux.data() + i), y = V::loadu(blk.uy.data() + i),
            z = V::loadu(blk.uz.data() + i);
    const V r = (x * x + y * y + z * z).sqrt(), inv = one / r, d = r - r_max;
    const V inside = r < r_max;  // the envelope vanishes at and beyond the cutoff
    r.store(blk.r.data() + i);
    inv.store(blk.inv.data() + i);
    (x * inv).store(blk.ux.data() + i);
    (y * inv).store(blk.uy.data() + i);
    (z * inv).store(blk.uz.data() + i);
    V::blendv(zero, sigma * d * d, inside).store(blk.env.data() + i);
    V::blendv(zero, V(T(2)) * sigma * d, inside).store(blk.denv.data() + i);
  }
  for (int64_t eta = 0; eta < m.n_eta; ++eta) {
    const T* alpha = m.alpha + eta * CC;
    const T* r0 = m.r0 + eta * CC;
    T* ha = blk.half_alpha.data() + eta * kLanes;
    T* xi = blk.xi.data() + eta * kLanes;
    for (int64_t i = 0; i < np; i += V::size()) {  // pair-table lookups by vector gathers
      const I pair = I::loadu(blk.pair.data() + i);
      const V a = V(T(0.5)) * at::vec::gather<sizeof(T)>(alpha, pair);
      a.store(ha + i);
      (a * (V::loadu(blk.r.data() + i) - at::vec::gather<sizeof(T)>(r0, pair))).store(xi + i);
    }
    tanh_inplace(xi, np);
  }
  radial_functions(m, with_derivative, blk);
  SUS2_SIMD
  for (int64_t i = 0; i < np; ++i) {
    blk.px[i] = blk.py[i] = blk.pz[i] = T(1);
  }
  for (int64_t k = 1; k <= m.max_power; ++k) {
    SUS2_SIMD
    for (int64_t i = 0; i < np; ++i) {
      blk.px[k * kLanes + i] = blk.px[(k - 1) * kLanes + i] * blk.ux[i];
      blk.py[k * kLanes + i] = blk.py[(k - 1) * kLanes + i] * blk.uy[i];
      blk.pz[k * kLanes + i] = blk.pz[(k - 1) * kLanes + i] * blk.uz[i];
    }
  }
  for (size_t j = 0; j < m.ma.size(); ++j) {
    const T* px = blk.px.data() + m.ma[j] * kLanes;
    const T* py = blk.py.data() + m.mb[j] * kLanes;
    const T* pz = blk.pz.data() + m.mc[j] * kLanes;
    T* out = blk.mono.data() + j * kLanes;
    SUS2_SIMD
    for (int64_t i = 0; i < np; ++i) out[i] = px[i] * py[i] * pz[i];
  }
}

// Loads and evaluates the segment [e0, e0 + n) of centre a into blk.
template <typename T, typename Geometry>
void load_segment(const Model<T>& m, const Geometry& geo, const int64_t* neighbor, int64_t e0,
                  int64_t n, int64_t a, bool with_derivative, Block<T>& blk) {
  constexpr int64_t V = at::vec::Vectorized<T>::size();
  blk.n = n;
  blk.np = (n + V - 1) / V * V;
  blk.center = a;
  geo.load(e0, n, a, blk.ux.data(), blk.uy.data(), blk.uz.data());
  evaluate_block(m, neighbor, e0, with_derivative, blk);
}

// M_b(a) += sum over the segment's edges of f_{mu_b} m_b, for the edges [begin, end)
template <typename T, typename Geometry>
void forward_range(const Model<T>& m, const Geometry& geo, const int64_t* center,
                   const int64_t* neighbor, int64_t begin, int64_t end, T* out) {
  Block<T> blk(m);
  std::vector<T> lanes(m.n_basic * at::vec::Vectorized<T>::size());
  for_each_segment(center, neighbor, m.n_atoms, begin, end, [&](int64_t e0, int64_t n, int64_t a) {
    load_segment(m, geo, neighbor, e0, n, a, false, blk);
    // all slots' lane sums first, then their horizontal sums (no store-to-load stalls)
    constexpr int64_t VS = at::vec::Vectorized<T>::size();
    for (int64_t k = 0; k < m.n_basic; ++k) {
      dot_lanes(blk.f.data() + m.mu[k] * kLanes, blk.mono.data() + m.mono[k] * kLanes, blk.np,
                lanes.data() + k * VS);
    }
    T* row = out + a * m.n_basic;
    for (int64_t k = 0; k < m.n_basic; ++k) {
      T sum = T(0);
      for (int64_t l = 0; l < VS; ++l) sum += lanes[k * VS + l];
      row[k] += sum;
    }
  });
}

// dL/dr_ij of the lanes [i, i + NV vector widths) of a segment, in registers:
//   g_mu = sum_{k: mu_k = mu} G_k m_k,  dL/dr = sum_mu g_mu f'_mu,
//   S_j = sum_{k: mono_k = j} G_k f_{mu_k},  h = sum_j S_j grad_u m_j  (d(u_x^a)/du_x = a u_x^(a-1)),
//   dL/dr_ij = (dL/dr) u + (h - (u.h) u) / r.
// NV vectors at a time give NV independent chains of multiply-adds (the sums over slots are
// otherwise bound by the multiply-add latency).
template <int NV, typename T>
inline void edge_gradients(const Model<T>& m, const Block<T>& blk, const T* Ga, int64_t i,
                           T* gv) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t W = V::size();
  V gr[NV], hx[NV], hy[NV], hz[NV];
  for (int v = 0; v < NV; ++v) gr[v] = hx[v] = hy[v] = hz[v] = V(T(0));
  for (int64_t mu = 0; mu < m.n_mu; ++mu) {
    V g[NV];
    for (int v = 0; v < NV; ++v) g[v] = V(T(0));
    for (const int64_t k : m.slots_of_mu[mu]) {
      const V G(Ga[k]);
      const T* mono = blk.mono.data() + m.mono[k] * kLanes + i;
      for (int v = 0; v < NV; ++v) g[v] = at::vec::fmadd(G, V::loadu(mono + v * W), g[v]);
    }
    const T* df = blk.df.data() + mu * kLanes + i;
    for (int v = 0; v < NV; ++v) gr[v] = at::vec::fmadd(g[v], V::loadu(df + v * W), gr[v]);
  }
  for (size_t j = 0; j < m.ma.size(); ++j) {
    V S[NV];
    for (int v = 0; v < NV; ++v) S[v] = V(T(0));
    for (const int64_t k : m.slots_of_mono[j]) {
      const V G(Ga[k]);
      const T* f = blk.f.data() + m.mu[k] * kLanes + i;
      for (int v = 0; v < NV; ++v) S[v] = at::vec::fmadd(G, V::loadu(f + v * W), S[v]);
    }
    const int64_t pa = m.ma[j], pb = m.mb[j], pc = m.mc[j];
    const T* px = blk.px.data() + pa * kLanes + i;
    const T* py = blk.py.data() + pb * kLanes + i;
    const T* pz = blk.pz.data() + pc * kLanes + i;
    for (int v = 0; v < NV; ++v) {
      const V x = V::loadu(px + v * W), y = V::loadu(py + v * W), z = V::loadu(pz + v * W);
      if (pa > 0) hx[v] = at::vec::fmadd(S[v] * V(T(pa)), V::loadu(px - kLanes + v * W) * y * z, hx[v]);
      if (pb > 0) hy[v] = at::vec::fmadd(S[v] * V(T(pb)), x * V::loadu(py - kLanes + v * W) * z, hy[v]);
      if (pc > 0) hz[v] = at::vec::fmadd(S[v] * V(T(pc)), x * y * V::loadu(pz - kLanes + v * W), hz[v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    const int64_t l = i + v * W;
    const V ux = V::loadu(blk.ux.data() + l), uy = V::loadu(blk.uy.data() + l),
            uz = V::loadu(blk.uz.data() + l), inv = V::loadu(blk.inv.data() + l);
    const V hu = hx[v] * ux + hy[v] * uy + hz[v] * uz;
    (gr[v] * ux + (hx[v] - hu * ux) * inv).store(gv + l);
    (gr[v] * uy + (hy[v] - hu * uy) * inv).store(gv + kLanes + l);
    (gr[v] * uz + (hz[v] - hu * uz) * inv).store(gv + 2 * kLanes + l);
  }
}

// dL/dr_ij of each segment's edges (edge_gradients, up to three vectors of lanes at a time),
// added to the geometry's gradients.
template <typename T, typename Geometry>
void backward_range(const Model<T>& m, const Geometry& geo, const int64_t* center,
                    const int64_t* neighbor, const T* G, int64_t begin, int64_t end, int tid) {
  constexpr int64_t W = at::vec::Vectorized<T>::size();
  Block<T> blk(m);
  std::vector<T> gv(3 * kLanes);
  for_each_segment(center, neighbor, m.n_atoms, begin, end, [&](int64_t e0, int64_t n, int64_t a) {
    load_segment(m, geo, neighbor, e0, n, a, true, blk);
    const T* Ga = G + a * m.n_basic;  // dL/dM of the centre
    int64_t i = 0;
    for (; i + 3 * W <= blk.np; i += 3 * W) edge_gradients<3>(m, blk, Ga, i, gv.data());
    if (blk.np - i == 2 * W) edge_gradients<2>(m, blk, Ga, i, gv.data());
    if (blk.np - i == W) edge_gradients<1>(m, blk, Ga, i, gv.data());
    geo.add_grad(e0, n, a, gv.data(), gv.data() + kLanes, gv.data() + 2 * kLanes, tid);
  });
}

// The forward pass over all edges: one accumulator per thread when threaded (the edges of one
// atom may fall in several chunks), then a sum.
template <typename T, typename Geometry>
void forward_all(const Model<T>& m, const Geometry& geo, const int64_t* center,
                 const int64_t* neighbor, int64_t E, at::Tensor& out) {
  const int64_t grain = 32 * kLanes, N = out.size(0);
  const int threads = at::get_num_threads();
  if (threads <= 1 || E < 2 * grain) {
    forward_range(m, geo, center, neighbor, 0, E, out.template data_ptr<T>());
    return;
  }
  auto partial = at::zeros({threads, N, m.n_basic}, out.options());
  T* p = partial.template data_ptr<T>();
  at::parallel_for(0, E, grain, [&](int64_t begin, int64_t end) {
    forward_range(m, geo, center, neighbor, begin, end, p + at::get_thread_num() * N * m.n_basic);
  });
  at::sum_out(out, partial, 0);
}

template <typename T, typename Geometry>
void backward_all(const Model<T>& m, const Geometry& geo, const int64_t* center,
                  const int64_t* neighbor, const T* G, int64_t E) {
  at::parallel_for(0, E, 16 * kLanes, [&](int64_t begin, int64_t end) {
    backward_range(m, geo, center, neighbor, G, begin, end, at::get_thread_num());
  });
}

at::Tensor basic_moments(const at::Tensor& vec, const at::Tensor& center,
                         const at::Tensor& neighbor, const at::Tensor& types,
                         const at::Tensor& alpha, const at::Tensor& r0, const at::Tensor& coeffs,
                         const at::Tensor& eta, const at::Tensor& weights,
                         const at::Tensor& basic, double r_max, double sigma,
                         int64_t num_nodes) {
  const Inputs in = check(center, neighbor, types, alpha, r0, coeffs, eta, weights, basic);
  const auto v = check_vec(vec, in);
  TORCH_CHECK(types.numel() == num_nodes, "sus2::basic_moments: types must be [num_nodes]");
  const int64_t E = vec.size(0);
  auto out = at::zeros({num_nodes, basic.size(0)}, vec.options());
  if (E == 0 || basic.size(0) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(vec.scalar_type(), "sus2_basic_moments", [&] {
    const auto m = model_of<scalar_t>(in, r_max, sigma);
    const EdgeVectors<scalar_t> geo{v.data_ptr<scalar_t>()};
    forward_all(m, geo, in.center.data_ptr<int64_t>(), in.neighbor.data_ptr<int64_t>(), E, out);
  });
  return out;
}

at::Tensor basic_moments_backward(const at::Tensor& grad_in, const at::Tensor& vec,
                                  const at::Tensor& center, const at::Tensor& neighbor,
                                  const at::Tensor& types, const at::Tensor& alpha,
                                  const at::Tensor& r0, const at::Tensor& coeffs,
                                  const at::Tensor& eta, const at::Tensor& weights,
                                  const at::Tensor& basic, double r_max, double sigma) {
  const Inputs in = check(center, neighbor, types, alpha, r0, coeffs, eta, weights, basic);
  const auto v = check_vec(vec, in);
  const auto grad = grad_in.to(vec.scalar_type()).contiguous();
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == types.numel() && grad.size(1) == basic.size(0),
              "sus2::basic_moments_backward: grad must be [num_nodes, n_basic]");
  const int64_t E = vec.size(0);
  auto grad_vec = at::zeros_like(v);
  if (E == 0 || basic.size(0) == 0) return grad_vec;
  AT_DISPATCH_FLOATING_TYPES(vec.scalar_type(), "sus2_basic_moments_backward", [&] {
    const auto m = model_of<scalar_t>(in, r_max, sigma);
    EdgeVectors<scalar_t> geo{v.data_ptr<scalar_t>()};
    geo.grad = grad_vec.data_ptr<scalar_t>();
    backward_all(m, geo, in.center.data_ptr<int64_t>(), in.neighbor.data_ptr<int64_t>(),
                 grad.data_ptr<scalar_t>(), E);
  });
  return grad_vec;
}

// --- from positions: r_ij = x_j - x_i + S_e . cell (the edge vectors are never stored) -------

struct Frames {
  at::Tensor pos, cell, shift, batch;  // float64 / int64, contiguous; cell, shift, batch may be empty
  int64_t n_frames;
};

Frames check_frames(const at::Tensor& pos, const at::Tensor& cell, const at::Tensor& shift,
                    const at::Tensor& batch, const at::Tensor& center) {
  const char* op = "sus2::basic_moments_from_positions: ";
  TORCH_CHECK(pos.dim() == 2 && pos.size(1) == 3, op, "pos must be [N, 3]");
  TORCH_CHECK(pos.scalar_type() == at::kDouble, op, "pos must be float64");
  Frames f{pos.contiguous(), cell, shift, batch, 1};
  if (cell.numel() > 0) {
    TORCH_CHECK(cell.scalar_type() == at::kDouble && shift.scalar_type() == at::kDouble, op,
                "cell and cell shifts must be float64");
    f.cell = cell.reshape({-1, 3, 3}).contiguous();
    f.n_frames = f.cell.size(0);
    TORCH_CHECK(shift.dim() == 2 && shift.size(0) == center.size(0) && shift.size(1) == 3, op,
                "cell shifts must be [E, 3]");
    f.shift = shift.contiguous();
    if (batch.numel() > 0) {
      TORCH_CHECK(batch.scalar_type() == at::kLong && batch.numel() == pos.size(0), op,
                  "batch must be int64 [N]");
      f.batch = batch.contiguous();
    } else {
      TORCH_CHECK(f.n_frames == 1, op, "several cells need a batch index");
    }
  }
  return f;
}

template <typename T>
Positions<T> positions_of(const Frames& f, const Inputs& in) {
  const bool periodic = f.cell.numel() > 0;
  Positions<T> geo{f.pos.data_ptr<double>(),
                   periodic ? f.cell.data_ptr<double>() : nullptr,
                   periodic ? f.shift.data_ptr<double>() : nullptr,
                   periodic && f.batch.numel() > 0 ? f.batch.data_ptr<int64_t>() : nullptr,
                   in.neighbor.data_ptr<int64_t>()};
  geo.n_atoms = f.pos.size(0);
  geo.n_frames = f.n_frames;
  return geo;
}

at::Tensor basic_moments_from_positions(const at::Tensor& pos, const at::Tensor& cell,
                                        const at::Tensor& shift, const at::Tensor& batch,
                                        const at::Tensor& center, const at::Tensor& neighbor,
                                        const at::Tensor& types, const at::Tensor& alpha,
                                        const at::Tensor& r0, const at::Tensor& coeffs,
                                        const at::Tensor& eta, const at::Tensor& weights,
                                        const at::Tensor& basic, double r_max, double sigma) {
  const Frames f = check_frames(pos, cell, shift, batch, center);
  const Inputs in = check(center, neighbor, types, alpha, r0, coeffs, eta, weights, basic);
  TORCH_CHECK(types.numel() == pos.size(0),
              "sus2::basic_moments_from_positions: types must be [N] with pos [N, 3]");
  const int64_t E = center.size(0);
  auto out = at::zeros({pos.size(0), basic.size(0)}, alpha.options());
  if (E == 0 || basic.size(0) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(alpha.scalar_type(), "sus2_basic_moments_from_positions", [&] {
    const auto m = model_of<scalar_t>(in, r_max, sigma);
    forward_all(m, positions_of<scalar_t>(f, in), in.center.data_ptr<int64_t>(),
                in.neighbor.data_ptr<int64_t>(), E, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> basic_moments_from_positions_backward(
    const at::Tensor& grad_in, const at::Tensor& pos, const at::Tensor& cell,
    const at::Tensor& shift, const at::Tensor& batch, const at::Tensor& center,
    const at::Tensor& neighbor, const at::Tensor& types, const at::Tensor& alpha,
    const at::Tensor& r0, const at::Tensor& coeffs, const at::Tensor& eta,
    const at::Tensor& weights, const at::Tensor& basic, double r_max, double sigma) {
  const Frames f = check_frames(pos, cell, shift, batch, center);
  const Inputs in = check(center, neighbor, types, alpha, r0, coeffs, eta, weights, basic);
  const auto grad = grad_in.to(alpha.scalar_type()).contiguous();
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == pos.size(0) && grad.size(1) == basic.size(0),
              "sus2::basic_moments_from_positions_backward: grad must be [N, n_basic]");
  const int64_t E = center.size(0), N = pos.size(0);
  const int threads = at::get_num_threads();
  // one gradient accumulator per thread: an atom's edges fall in several chunks
  auto grad_pos = at::zeros({threads, N, 3}, f.pos.options());
  auto grad_cell = at::zeros({threads, f.n_frames, 3, 3}, f.pos.options());
  if (E > 0 && basic.size(0) > 0) {
    AT_DISPATCH_FLOATING_TYPES(alpha.scalar_type(), "sus2_from_positions_backward", [&] {
      const auto m = model_of<scalar_t>(in, r_max, sigma);
      auto geo = positions_of<scalar_t>(f, in);
      geo.grad_pos = grad_pos.data_ptr<double>();
      geo.grad_cell = grad_cell.data_ptr<double>();
      backward_all(m, geo, in.center.data_ptr<int64_t>(), in.neighbor.data_ptr<int64_t>(),
                   grad.data_ptr<scalar_t>(), E);
    });
  }
  auto cell_grad = grad_cell.sum(0);
  if (cell.numel() > 0) cell_grad = cell_grad.reshape(cell.sizes());
  else cell_grad = at::zeros_like(cell);
  return {grad_pos.sum(0), cell_grad};
}

// --- training (docs/theory.md §4.6): the moments' tangent and its parameter gradients --------
//
// sus2::basic_moments_jvp(vec, dvec, ...) returns the basic moments M and their tangent
// Mdot = dM/dt of r_ij -> r_ij + t d_ij (d the edges' tangents dvec), with
//   rdot = u.d,   udot = (d - u rdot) / r,
//   Mdot_b(i) = sum_j f'_mu(r) rdot m_b(u) + f_mu(r) grad m_b(u).udot.
// Its backward returns the gradients of Phi = sum Mbar M + Mdotbar Mdot with respect to the
// parameters alpha, r0, c and w (not the geometry). Per edge, with P_mu = sum_{b: mu_b = mu}
// (Mbar_b m_b + Mdotbar_b grad m_b.udot), Q_mu = sum_{b: mu_b = mu} Mdotbar_b m_b,
// W = w_i w_j, f_mu = W env g_mu(xi), f'_mu = W (env' g_mu + env xi_r g'_mu),
// xi_r = dxi/dr = (alpha/2)(1 - xi^2), g_mu = sum_n c_{mu n} T_n(xi):
//   Phi_e = W sum_mu [A_mu g_mu(xi) + B_mu xi_r g'_mu(xi)],
//   A_mu = P_mu env + Q_mu rdot env',   B_mu = Q_mu rdot env,
//   dPhi/dc_{mu n} = W (A_mu T_n + B_mu xi_r T'_n),   dPhi/dw_i = w_j Phi_e / W (and i <-> j),
//   dPhi/dalpha = (X - Y alpha xi) dxi/dalpha + Y (1 - xi^2) / 2,   dPhi/dr0 = -(X - Y alpha xi) xi_r,
//   X = W sum_{mu in eta} (A_mu g'_mu + B_mu xi_r g''_mu),   Y = W sum_{mu in eta} B_mu g'_mu,
//   dxi/dalpha = (1 - xi^2)(r - r0) / 2.
// This is what training needs: the loss gradient of the forces is the parameter gradient of a
// directional derivative of the energy (nequip_sus2/kernels/training.py).

// rdot, udot and the monomials' tangents grad m_j . udot of a loaded segment ([n_mono][lanes])
template <typename T>
void tangents(const Model<T>& m, const Block<T>& blk, const T* dvec, int64_t e0, T* rdot,
              T* udx, T* udy, T* udz, T* dmono) {
  for (int64_t i = 0; i < blk.np; ++i) {
    const bool real = i < blk.n;  // padding lanes have no tangent
    const T dx = real ? dvec[3 * (e0 + i)] : T(0), dy = real ? dvec[3 * (e0 + i) + 1] : T(0),
            dz = real ? dvec[3 * (e0 + i) + 2] : T(0);
    const T ux = blk.ux[i], uy = blk.uy[i], uz = blk.uz[i];
    const T rd = ux * dx + uy * dy + uz * dz;
    rdot[i] = rd;
    udx[i] = (dx - ux * rd) * blk.inv[i];
    udy[i] = (dy - uy * rd) * blk.inv[i];
    udz[i] = (dz - uz * rd) * blk.inv[i];
  }
  for (size_t j = 0; j < m.ma.size(); ++j) {
    const int64_t pa = m.ma[j], pb = m.mb[j], pc = m.mc[j];
    const T* px = blk.px.data();
    const T* py = blk.py.data();
    const T* pz = blk.pz.data();
    T* out = dmono + j * kLanes;
    for (int64_t i = 0; i < blk.np; ++i) {
      const T x = px[pa * kLanes + i], y = py[pb * kLanes + i], z = pz[pc * kLanes + i];
      T s = T(0);
      if (pa > 0) s += T(pa) * px[(pa - 1) * kLanes + i] * y * z * udx[i];
      if (pb > 0) s += T(pb) * x * py[(pb - 1) * kLanes + i] * z * udy[i];
      if (pc > 0) s += T(pc) * x * y * pz[(pc - 1) * kLanes + i] * udz[i];
      out[i] = s;
    }
  }
}

// Per-thread work space of the training passes
template <typename T>
struct TangentBlock {
  std::vector<T> rdot, udx, udy, udz, dmono, fr;
  explicit TangentBlock(const Model<T>& m)
      : rdot(kLanes), udx(kLanes), udy(kLanes), udz(kLanes), dmono(m.ma.size() * kLanes),
        fr(m.n_mu * kLanes) {}
};

// M and Mdot of the centres of the edges [begin, end), added to out and out_dot
template <typename T>
void jvp_range(const Model<T>& m, const EdgeVectors<T>& geo, const T* dvec, const int64_t* center,
               const int64_t* neighbor, int64_t begin, int64_t end, T* out, T* out_dot) {
  Block<T> blk(m);
  TangentBlock<T> tb(m);
  constexpr int64_t VS = at::vec::Vectorized<T>::size();
  std::vector<T> lanes(2 * m.n_basic * VS), extra(VS);
  for_each_segment(center, neighbor, m.n_atoms, begin, end, [&](int64_t e0, int64_t n, int64_t a) {
    load_segment(m, geo, neighbor, e0, n, a, true, blk);
    tangents(m, blk, dvec, e0, tb.rdot.data(), tb.udx.data(), tb.udy.data(), tb.udz.data(),
             tb.dmono.data());
    for (int64_t mu = 0; mu < m.n_mu; ++mu) {
      SUS2_SIMD
      for (int64_t i = 0; i < blk.np; ++i) {
        tb.fr[mu * kLanes + i] = blk.df[mu * kLanes + i] * tb.rdot[i];
      }
    }
    for (int64_t k = 0; k < m.n_basic; ++k) {
      const int64_t mu = m.mu[k], j = m.mono[k];
      dot_lanes(blk.f.data() + mu * kLanes, blk.mono.data() + j * kLanes, blk.np,
                lanes.data() + k * VS);
      dot_lanes(tb.fr.data() + mu * kLanes, blk.mono.data() + j * kLanes, blk.np,
                lanes.data() + (m.n_basic + k) * VS);
      dot_lanes(blk.f.data() + mu * kLanes, tb.dmono.data() + j * kLanes, blk.np, extra.data());
      for (int64_t l = 0; l < VS; ++l) lanes[(m.n_basic + k) * VS + l] += extra[l];
    }
    for (int64_t k = 0; k < m.n_basic; ++k) {
      T s = T(0), sd = T(0);
      for (int64_t l = 0; l < VS; ++l) {
        s += lanes[k * VS + l];
        sd += lanes[(m.n_basic + k) * VS + l];
      }
      out[a * m.n_basic + k] += s;
      out_dot[a * m.n_basic + k] += sd;
    }
  });
}

// dPhi/d(alpha, r0, c, w) of one loaded segment, vectorised over its lanes. The c gradient
// goes to per-lane partial sums gc [N_mu * R][vector width]; the per-pair alpha and r0
// gradients and Phi_e / W of each lane to da, dr [N_eta][lanes] and S [lanes], scattered by the
// caller (padding lanes have W = 0 and contribute zero).
template <typename T, int kR>
void param_gradients_r(const Model<T>& m, const Block<T>& blk, const TangentBlock<T>& tb,
                       const T* Ga, const T* Gda, T* P, T* Q, T* gc, T* da, T* dr, T* S) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t VS = V::size();
  const int64_t R = kR > 0 ? kR : m.n_r, np = blk.np, CC = m.n_types * m.n_types;
  constexpr int64_t kSize = kR > 0 ? kR : kMaxRuntimeR;
  std::fill(P, P + m.n_mu * kLanes, T(0));
  std::fill(Q, Q + m.n_mu * kLanes, T(0));
  for (int64_t k = 0; k < m.n_basic; ++k) {  // P_mu = sum G m + Gdot m', Q_mu = sum Gdot m
    const T ga = Ga[k], gd = Gda[k];
    const T* mono = blk.mono.data() + m.mono[k] * kLanes;
    const T* dmono = tb.dmono.data() + m.mono[k] * kLanes;
    T* Pm = P + m.mu[k] * kLanes;
    T* Qm = Q + m.mu[k] * kLanes;
    SUS2_SIMD
    for (int64_t i = 0; i < np; ++i) {
      Pm[i] += ga * mono[i] + gd * dmono[i];
      Qm[i] += gd * mono[i];
    }
  }
  using I = at::vec::Vectorized<at::vec::int_same_size_t<T>>;
  const V one(T(1)), two(T(2)), half(T(0.5));
  for (int64_t i = 0; i < np; i += VS) {
    const V env = V::loadu(blk.env.data() + i), denv = V::loadu(blk.denv.data() + i);
    const V W = V::loadu(blk.w.data() + i), rd = V::loadu(tb.rdot.data() + i);
    const V r = V::loadu(blk.r.data() + i);
    const I pair = I::loadu(blk.pair.data() + i);
    V Sv(T(0));
    for (int64_t eta = 0; eta < m.n_eta; ++eta) {
      const V xi = V::loadu(blk.xi.data() + eta * kLanes + i);
      const V ha = V::loadu(blk.half_alpha.data() + eta * kLanes + i);
      const V one_m = one - xi * xi, xi_r = ha * one_m;
      V t[kSize], dt[kSize], ddt[kSize];
      t[0] = one;
      dt[0] = ddt[0] = V(T(0));
      if (R > 1) {
        t[1] = xi;
        dt[1] = one;
        ddt[1] = V(T(0));
      }
      for (int64_t k = 2; k < R; ++k) {
        t[k] = two * xi * t[k - 1] - t[k - 2];
        dt[k] = two * t[k - 1] + two * xi * dt[k - 1] - dt[k - 2];
        ddt[k] = V(T(4)) * dt[k - 1] + two * xi * ddt[k - 1] - ddt[k - 2];
      }
      V X(T(0)), Y(T(0));
      for (const int64_t mu : m.mus_of_eta[eta]) {
        const V Pv = V::loadu(P + mu * kLanes + i), Qv = V::loadu(Q + mu * kLanes + i);
        const V A = Pv * env + Qv * rd * denv, B = Qv * rd * env, Bx = B * xi_r;
        const V WA = W * A, WBx = W * Bx;
        const T* c = m.coeffs + mu * R;
        T* g_lanes = gc + mu * R * VS;
        V g(T(0)), dg(T(0)), ddg(T(0));
        for (int64_t k = 0; k < R; ++k) {
          const V ck(c[k]);
          g = at::vec::fmadd(ck, t[k], g);
          dg = at::vec::fmadd(ck, dt[k], dg);
          ddg = at::vec::fmadd(ck, ddt[k], ddg);
          const V acc = V::loadu(g_lanes + k * VS);
          at::vec::fmadd(WA, t[k], at::vec::fmadd(WBx, dt[k], acc)).store(g_lanes + k * VS);
        }
        Sv = Sv + A * g + Bx * dg;
        X = X + A * dg + Bx * ddg;
        Y = Y + B * dg;
      }
      X = X * W;
      Y = Y * W;
      const V r0 = at::vec::gather<sizeof(T)>(m.r0 + eta * CC, pair);
      const V Z = X - Y * two * ha * xi;  // X - Y alpha xi
      (Z * one_m * (r - r0) * half + Y * one_m * half).store(da + eta * kLanes + i);
      (V(T(0)) - Z * xi_r).store(dr + eta * kLanes + i);
    }
    Sv.store(S + i);
  }
}

// dPhi/d(alpha, r0, c, w) of the edges [begin, end), added to grad ([alpha | r0 | c | w],
// this thread's copy)
template <typename T>
void jvp_backward_range(const Model<T>& m, const EdgeVectors<T>& geo, const T* dvec,
                        const int64_t* center, const int64_t* neighbor, const T* Gm,
                        const T* Gd, int64_t begin, int64_t end, T* grad) {
  constexpr int64_t VS = at::vec::Vectorized<T>::size();
  const int64_t CC = m.n_types * m.n_types, R = m.n_r;
  T* g_alpha = grad;
  T* g_r0 = grad + m.n_eta * CC;
  T* g_c = g_r0 + m.n_eta * CC;
  T* g_w = g_c + m.n_mu * R;
  Block<T> blk(m);
  TangentBlock<T> tb(m);
  std::vector<T> P(m.n_mu * kLanes), Q(m.n_mu * kLanes), gc(m.n_mu * R * VS);
  std::vector<T> da(m.n_eta * kLanes), dr(m.n_eta * kLanes), S(kLanes);
  for_each_segment(center, neighbor, m.n_atoms, begin, end, [&](int64_t e0, int64_t n, int64_t a) {
    load_segment(m, geo, neighbor, e0, n, a, true, blk);
    tangents(m, blk, dvec, e0, tb.rdot.data(), tb.udx.data(), tb.udy.data(), tb.udz.data(),
             tb.dmono.data());
    const T* Ga = Gm + a * m.n_basic;
    const T* Gda = Gd + a * m.n_basic;
    auto args = std::make_tuple(Ga, Gda, P.data(), Q.data(), gc.data(), da.data(), dr.data(),
                                S.data());
    auto call = [&](auto fn) {
      std::apply([&](auto... xs) { fn(m, blk, tb, xs...); }, args);
    };
    switch (m.n_r) {  // the common basis sizes unrolled, others at run time
      case 4: call(param_gradients_r<T, 4>); break;
      case 5: call(param_gradients_r<T, 5>); break;
      case 6: call(param_gradients_r<T, 6>); break;
      case 8: call(param_gradients_r<T, 8>); break;
      case 10: call(param_gradients_r<T, 10>); break;
      default: call(param_gradients_r<T, 0>); break;
    }
    const int64_t zi = m.types[a];
    for (int64_t i = 0; i < n; ++i) {
      const int64_t zj = m.types[neighbor[e0 + i]], pair = zi * m.n_types + zj;
      for (int64_t eta = 0; eta < m.n_eta; ++eta) {
        g_alpha[eta * CC + pair] += da[eta * kLanes + i];
        g_r0[eta * CC + pair] += dr[eta * kLanes + i];
      }
      g_w[zi] += S[i] * m.weights[zj];
      g_w[zj] += S[i] * m.weights[zi];
    }
  });
  for (int64_t k = 0; k < m.n_mu * R; ++k) {
    for (int64_t l = 0; l < VS; ++l) g_c[k] += gc[k * VS + l];
  }
}

struct Jvp {
  Inputs in;
  at::Tensor vec, dvec;
};

Jvp check_jvp(const at::Tensor& vec, const at::Tensor& dvec, const at::Tensor& center,
              const at::Tensor& neighbor, const at::Tensor& types, const at::Tensor& alpha,
              const at::Tensor& r0, const at::Tensor& coeffs, const at::Tensor& eta,
              const at::Tensor& weights, const at::Tensor& basic) {
  Jvp j{check(center, neighbor, types, alpha, r0, coeffs, eta, weights, basic)};
  j.vec = check_vec(vec, j.in);
  TORCH_CHECK(dvec.sizes() == vec.sizes() && dvec.scalar_type() == vec.scalar_type(),
              "sus2::basic_moments_jvp: dvec must be like vec [E, 3]");
  j.dvec = dvec.contiguous();
  return j;
}

std::tuple<at::Tensor, at::Tensor> basic_moments_jvp(
    const at::Tensor& vec, const at::Tensor& dvec, const at::Tensor& center,
    const at::Tensor& neighbor, const at::Tensor& types, const at::Tensor& alpha,
    const at::Tensor& r0, const at::Tensor& coeffs, const at::Tensor& eta,
    const at::Tensor& weights, const at::Tensor& basic, double r_max, double sigma,
    int64_t num_nodes) {
  const Jvp j = check_jvp(vec, dvec, center, neighbor, types, alpha, r0, coeffs, eta, weights,
                          basic);
  TORCH_CHECK(types.numel() == num_nodes, "sus2::basic_moments_jvp: types must be [num_nodes]");
  const int64_t E = vec.size(0), nb = basic.size(0);
  const int threads = E < 64 * kLanes ? 1 : at::get_num_threads();
  auto both = at::zeros({threads, 2, num_nodes, nb}, vec.options());
  if (E > 0 && nb > 0) {
    AT_DISPATCH_FLOATING_TYPES(vec.scalar_type(), "sus2_basic_moments_jvp", [&] {
      const auto m = model_of<scalar_t>(j.in, r_max, sigma);
      const EdgeVectors<scalar_t> geo{j.vec.data_ptr<scalar_t>()};
      scalar_t* p = both.data_ptr<scalar_t>();
      auto run = [&](int64_t begin, int64_t end, int tid) {
        scalar_t* mine = p + tid * 2 * num_nodes * nb;
        jvp_range(m, geo, j.dvec.data_ptr<scalar_t>(), j.in.center.data_ptr<int64_t>(),
                  j.in.neighbor.data_ptr<int64_t>(), begin, end, mine, mine + num_nodes * nb);
      };
      if (threads == 1) {
        run(0, E, 0);
      } else {
        at::parallel_for(0, E, 32 * kLanes, [&](int64_t begin, int64_t end) {
          run(begin, end, at::get_thread_num());
        });
      }
    });
  }
  auto sum = threads > 1 ? both.sum(0) : both[0];
  return {sum[0], sum[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> basic_moments_jvp_backward(
    const at::Tensor& grad_m, const at::Tensor& grad_mdot, const at::Tensor& vec,
    const at::Tensor& dvec, const at::Tensor& center, const at::Tensor& neighbor,
    const at::Tensor& types, const at::Tensor& alpha, const at::Tensor& r0,
    const at::Tensor& coeffs, const at::Tensor& eta, const at::Tensor& weights,
    const at::Tensor& basic, double r_max, double sigma) {
  const Jvp j = check_jvp(vec, dvec, center, neighbor, types, alpha, r0, coeffs, eta, weights,
                          basic);
  const auto gm = grad_m.to(vec.scalar_type()).contiguous();
  const auto gd = grad_mdot.to(vec.scalar_type()).contiguous();
  for (const auto* g : {&gm, &gd}) {
    TORCH_CHECK(g->dim() == 2 && g->size(0) == types.numel() && g->size(1) == basic.size(0),
                "sus2::basic_moments_jvp_backward: grads must be [num_nodes, n_basic]");
  }
  const int64_t E = vec.size(0);
  const int64_t n_pair = alpha.numel(), n_c = coeffs.numel(), C = weights.numel();
  const int threads = E < 64 * kLanes ? 1 : at::get_num_threads();
  auto flat = at::zeros({threads, 2 * n_pair + n_c + C}, vec.options());
  if (E > 0 && basic.size(0) > 0) {
    AT_DISPATCH_FLOATING_TYPES(vec.scalar_type(), "sus2_basic_moments_jvp_backward", [&] {
      const auto m = model_of<scalar_t>(j.in, r_max, sigma);
      const EdgeVectors<scalar_t> geo{j.vec.data_ptr<scalar_t>()};
      scalar_t* p = flat.data_ptr<scalar_t>();
      auto run = [&](int64_t begin, int64_t end, int tid) {
        jvp_backward_range(m, geo, j.dvec.data_ptr<scalar_t>(), j.in.center.data_ptr<int64_t>(),
                           j.in.neighbor.data_ptr<int64_t>(), gm.data_ptr<scalar_t>(),
                           gd.data_ptr<scalar_t>(), begin, end, p + tid * flat.size(1));
      };
      if (threads == 1) {  // one accumulator: no parallel region may write it concurrently
        run(0, E, 0);
      } else {
        at::parallel_for(0, E, 16 * kLanes, [&](int64_t begin, int64_t end) {
          run(begin, end, at::get_thread_num());
        });
      }
    });
  }
  const auto g = flat.sum(0);
  return {g.narrow(0, 0, n_pair).view(alpha.sizes()),
          g.narrow(0, n_pair, n_pair).view(r0.sizes()),
          g.narrow(0, 2 * n_pair, n_c).view(coeffs.sizes()),
          g.narrow(0, 2 * n_pair + n_c, C).view(weights.sizes())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sus2, m) {
  m.def(
      "basic_moments_from_positions(Tensor pos, Tensor cell, Tensor shift, Tensor batch, "
      "Tensor center, Tensor neighbor, Tensor types, Tensor alpha, Tensor r0, Tensor coeffs, "
      "Tensor eta_of_mu, Tensor weights, Tensor basic, float r_max, float sigma) -> Tensor");
  m.def(
      "basic_moments_from_positions_backward(Tensor grad, Tensor pos, Tensor cell, Tensor shift, "
      "Tensor batch, Tensor center, Tensor neighbor, Tensor types, Tensor alpha, Tensor r0, "
      "Tensor coeffs, Tensor eta_of_mu, Tensor weights, Tensor basic, float r_max, "
      "float sigma) -> (Tensor, Tensor)");
  m.def(
      "basic_moments(Tensor vec, Tensor center, Tensor neighbor, Tensor types, Tensor alpha, "
      "Tensor r0, Tensor coeffs, Tensor eta_of_mu, Tensor weights, Tensor basic, float r_max, "
      "float sigma, SymInt num_nodes) -> Tensor");
  m.def(
      "basic_moments_backward(Tensor grad, Tensor vec, Tensor center, Tensor neighbor, "
      "Tensor types, Tensor alpha, Tensor r0, Tensor coeffs, Tensor eta_of_mu, Tensor weights, "
      "Tensor basic, float r_max, float sigma) -> Tensor");
  m.def(
      "basic_moments_jvp(Tensor vec, Tensor dvec, Tensor center, Tensor neighbor, Tensor types, "
      "Tensor alpha, Tensor r0, Tensor coeffs, Tensor eta_of_mu, Tensor weights, Tensor basic, "
      "float r_max, float sigma, SymInt num_nodes) -> (Tensor, Tensor)");
  m.def(
      "basic_moments_jvp_backward(Tensor grad_m, Tensor grad_mdot, Tensor vec, Tensor dvec, "
      "Tensor center, Tensor neighbor, Tensor types, Tensor alpha, Tensor r0, Tensor coeffs, "
      "Tensor eta_of_mu, Tensor weights, Tensor basic, float r_max, float sigma) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sus2, CPU, m) {
  m.impl("basic_moments_jvp", &basic_moments_jvp);
  m.impl("basic_moments_jvp_backward", &basic_moments_jvp_backward);
  m.impl("basic_moments", &basic_moments);
  m.impl("basic_moments_backward", &basic_moments_backward);
  m.impl("basic_moments_from_positions", &basic_moments_from_positions);
  m.impl("basic_moments_from_positions_backward", &basic_moments_from_positions_backward);
}
