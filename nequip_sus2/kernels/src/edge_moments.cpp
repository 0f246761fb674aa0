// Fused per-edge SUS2 (spec 2.2-2.5) for CPU: from edge vectors to the basic moments of every
// atom in one pass over the edges, and the edge-vector gradient of the backward pass in another.
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
// stored or scattered outside the kernel. CPU kernels; shape functions and autograd come from
// nequip_sus2/kernels/ops.py. Only the geometry is differentiated: the operators serve inference. The same file is compiled into the LAMMPS
// plugin so that AOTInductor-compiled models calling the operators run there too.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kMaxPower = 16;  // largest monomial power per axis

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
  int64_t n_eta, n_types, n_mu, n_r, n_basic, max_power = 0;
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
  if (center.numel() > 0) {
    const int64_t n = types.numel();
    for (const auto* t : {&center, &neighbor}) {
      const auto [lo, hi] = at::aminmax(*t);
      TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < n, op,
                  "edge index out of range [0, ", n, ")");
    }
  }
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
  m.n_eta = in.alpha.size(0);
  m.n_types = in.weights.size(0);
  m.n_mu = in.coeffs.size(0);
  m.n_r = in.coeffs.size(1);
  m.n_basic = in.basic.size(0);
  m.r_max = static_cast<T>(r_max);
  m.sigma = static_cast<T>(sigma);
  for (int64_t k = 0; k < m.n_mu; ++k) {
    TORCH_CHECK(m.eta[k] >= 0 && m.eta[k] < m.n_eta, "sus2::basic_moments: eta out of range");
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
  return m;
}

// Edges are processed in blocks of kBlock, structure-of-arrays: every loop over the block is a
// plain loop over contiguous arrays that the compiler vectorises; tanh uses ATen's vectorised
// (Sleef) implementation. Only the gathers (pair tables, moment rows) are scalar.
constexpr int64_t kBlock = 64;

template <typename T>
struct Block {
  int64_t n = 0;  // edges in this block
  std::vector<T> r, inv, ux, uy, uz, w, env, denv, arg;
  std::vector<T> cheb, dcheb, dxi;  // [N_eta][R][B], [N_eta][R][B], [N_eta][B]
  std::vector<T> f, df;             // [N_mu][B]
  std::vector<T> px, py, pz;        // [P+1][B]
  std::vector<T> mono;              // [n_mono][B]
  std::vector<T> slot;              // [n_basic][B]: moments (forward) or dL/dM (backward)
  std::vector<int64_t> pair;
  explicit Block(const Model<T>& m)
      : r(kBlock), inv(kBlock), ux(kBlock), uy(kBlock), uz(kBlock), w(kBlock), env(kBlock),
        denv(kBlock), arg(kBlock), cheb(m.n_eta * m.n_r * kBlock),
        dcheb(m.n_eta * m.n_r * kBlock), dxi(m.n_eta * kBlock), f(m.n_mu * kBlock),
        df(m.n_mu * kBlock), px((m.max_power + 1) * kBlock), py((m.max_power + 1) * kBlock),
        pz((m.max_power + 1) * kBlock), mono(m.ma.size() * kBlock), slot(m.n_basic * kBlock),
        pair(kBlock) {}
};

template <typename T>
inline void tanh_inplace(T* x, int64_t n) {
  using V = at::vec::Vectorized<T>;
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) V::loadu(x + i).tanh().store(x + i);
  for (; i < n; ++i) x[i] = std::tanh(x[i]);
}

// Where the edge vectors come from, and where their gradients go: an [E, 3] tensor
// (EdgeVectors) or positions, cell and cell shifts (Positions). load() writes the vectors of
// edges [e0, e0 + n) to x, y, z; add_grad() takes dL/dr_ij of those edges (thread tid).
template <typename T>
struct EdgeVectors {
  const T* vec;
  T* grad = nullptr;  // [E, 3]
  void load(int64_t e0, int64_t n, T* x, T* y, T* z) const {
    for (int64_t i = 0; i < n; ++i) {
      x[i] = vec[3 * (e0 + i)];
      y[i] = vec[3 * (e0 + i) + 1];
      z[i] = vec[3 * (e0 + i) + 2];
    }
  }
  void add_grad(int64_t e0, int64_t n, const T* gx, const T* gy, const T* gz, int tid) const {
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
  const int64_t* center;
  const int64_t* neighbor;
  double* grad_pos = nullptr;   // [threads][N, 3]
  double* grad_cell = nullptr;  // [threads][B, 3, 3]
  int64_t n_atoms = 0, n_frames = 0;
  void load(int64_t e0, int64_t n, T* x, T* y, T* z) const {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t e = e0 + i, a = center[e], b = neighbor[e];
      double d[3] = {pos[3 * b] - pos[3 * a], pos[3 * b + 1] - pos[3 * a + 1],
                     pos[3 * b + 2] - pos[3 * a + 2]};
      if (cell != nullptr) {
        const double* c = cell + 9 * (batch != nullptr ? batch[a] : 0);
        const double* s = shift + 3 * e;
        for (int k = 0; k < 3; ++k) d[k] += s[0] * c[k] + s[1] * c[3 + k] + s[2] * c[6 + k];
      }
      x[i] = static_cast<T>(d[0]);
      y[i] = static_cast<T>(d[1]);
      z[i] = static_cast<T>(d[2]);
    }
  }
  void add_grad(int64_t e0, int64_t n, const T* gx, const T* gy, const T* gz, int tid) const {
    double* gp = grad_pos + tid * n_atoms * 3;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t e = e0 + i, a = center[e], b = neighbor[e];
      const double g[3] = {gx[i], gy[i], gz[i]};
      for (int k = 0; k < 3; ++k) {
        gp[3 * b + k] += g[k];
        gp[3 * a + k] -= g[k];
      }
      if (cell != nullptr) {
        double* gc = grad_cell + (tid * n_frames + (batch != nullptr ? batch[a] : 0)) * 9;
        const double* s = shift + 3 * e;
        for (int r = 0; r < 3; ++r) {
          for (int k = 0; k < 3; ++k) gc[3 * r + k] += s[r] * g[k];
        }
      }
    }
  }
};

// Radial functions f (and f' if with_derivative) and monomials of the edges [e0, e0 + blk.n),
// whose vectors are in blk.ux, blk.uy, blk.uz.
template <typename T>
void evaluate_block(const Model<T>& m, const int64_t* center, const int64_t* neighbor,
                    int64_t e0, bool with_derivative, Block<T>& blk) {
  const int64_t n = blk.n, CC = m.n_types * m.n_types;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = e0 + i;
    const int64_t zi = m.types[center[e]], zj = m.types[neighbor[e]];
    blk.pair[i] = zi * m.n_types + zj;
    blk.w[i] = m.weights[zi] * m.weights[zj];
  }
  for (int64_t i = 0; i < n; ++i) {
    blk.r[i] = std::sqrt(blk.ux[i] * blk.ux[i] + blk.uy[i] * blk.uy[i] + blk.uz[i] * blk.uz[i]);
  }
  for (int64_t i = 0; i < n; ++i) {
    const T r = blk.r[i], d = r - m.r_max;
    const bool inside = r < m.r_max;  // the envelope vanishes at and beyond the cutoff
    blk.inv[i] = T(1) / r;
    blk.ux[i] *= blk.inv[i];
    blk.uy[i] *= blk.inv[i];
    blk.uz[i] *= blk.inv[i];
    blk.env[i] = inside ? m.sigma * d * d : T(0);
    blk.denv[i] = inside ? T(2) * m.sigma * d : T(0);
  }
  for (int64_t eta = 0; eta < m.n_eta; ++eta) {
    const T* alpha = m.alpha + eta * CC;
    const T* r0 = m.r0 + eta * CC;
    for (int64_t i = 0; i < n; ++i) {
      blk.arg[i] = T(0.5) * alpha[blk.pair[i]] * (blk.r[i] - r0[blk.pair[i]]);
    }
    tanh_inplace(blk.arg.data(), n);
    // T_0 = 1, T_1 = xi, T_{k+1} = 2 xi T_k - T_{k-1};  T'_{k+1} = 2 T_k + 2 xi T'_k - T'_{k-1}
    T* t = blk.cheb.data() + eta * m.n_r * kBlock;
    T* dt = blk.dcheb.data() + eta * m.n_r * kBlock;
    const T* xi = blk.arg.data();
    for (int64_t i = 0; i < n; ++i) t[i] = T(1);
    if (m.n_r > 1) {
      for (int64_t i = 0; i < n; ++i) t[kBlock + i] = xi[i];
    }
    for (int64_t k = 2; k < m.n_r; ++k) {
      T* tk = t + k * kBlock;
      for (int64_t i = 0; i < n; ++i) tk[i] = T(2) * xi[i] * tk[i - kBlock] - tk[i - 2 * kBlock];
    }
    if (with_derivative) {
      for (int64_t i = 0; i < n; ++i) dt[i] = T(0);
      if (m.n_r > 1) {
        for (int64_t i = 0; i < n; ++i) dt[kBlock + i] = T(1);
      }
      for (int64_t k = 2; k < m.n_r; ++k) {
        const T* tk1 = t + (k - 1) * kBlock;
        T* dtk = dt + k * kBlock;
        for (int64_t i = 0; i < n; ++i) {
          dtk[i] = T(2) * tk1[i] + T(2) * xi[i] * dtk[i - kBlock] - dtk[i - 2 * kBlock];
        }
      }
      T* dxi = blk.dxi.data() + eta * kBlock;
      for (int64_t i = 0; i < n; ++i) {
        dxi[i] = T(0.5) * alpha[blk.pair[i]] * (T(1) - xi[i] * xi[i]);
      }
    }
  }
  for (int64_t mu = 0; mu < m.n_mu; ++mu) {
    const T* c = m.coeffs + mu * m.n_r;
    const T* t = blk.cheb.data() + m.eta[mu] * m.n_r * kBlock;
    T* f = blk.f.data() + mu * kBlock;
    for (int64_t i = 0; i < n; ++i) f[i] = T(0);
    for (int64_t k = 0; k < m.n_r; ++k) {
      for (int64_t i = 0; i < n; ++i) f[i] += c[k] * t[k * kBlock + i];
    }
    if (with_derivative) {
      const T* dt = blk.dcheb.data() + m.eta[mu] * m.n_r * kBlock;
      const T* dxi = blk.dxi.data() + m.eta[mu] * kBlock;
      T* df = blk.df.data() + mu * kBlock;
      for (int64_t i = 0; i < n; ++i) df[i] = T(0);
      for (int64_t k = 0; k < m.n_r; ++k) {
        for (int64_t i = 0; i < n; ++i) df[i] += c[k] * dt[k * kBlock + i];
      }
      // f' = w (sum_k c_k T'_k xi' env + (sum_k c_k T_k) env')
      for (int64_t i = 0; i < n; ++i) {
        df[i] = blk.w[i] * (df[i] * dxi[i] * blk.env[i] + f[i] * blk.denv[i]);
      }
    }
    for (int64_t i = 0; i < n; ++i) f[i] *= blk.w[i] * blk.env[i];
  }
  for (int64_t i = 0; i < n; ++i) {
    blk.px[i] = blk.py[i] = blk.pz[i] = T(1);
  }
  for (int64_t k = 1; k <= m.max_power; ++k) {
    for (int64_t i = 0; i < n; ++i) {
      blk.px[k * kBlock + i] = blk.px[(k - 1) * kBlock + i] * blk.ux[i];
      blk.py[k * kBlock + i] = blk.py[(k - 1) * kBlock + i] * blk.uy[i];
      blk.pz[k * kBlock + i] = blk.pz[(k - 1) * kBlock + i] * blk.uz[i];
    }
  }
  for (size_t j = 0; j < m.ma.size(); ++j) {
    const T* px = blk.px.data() + m.ma[j] * kBlock;
    const T* py = blk.py.data() + m.mb[j] * kBlock;
    const T* pz = blk.pz.data() + m.mc[j] * kBlock;
    T* out = blk.mono.data() + j * kBlock;
    for (int64_t i = 0; i < n; ++i) out[i] = px[i] * py[i] * pz[i];
  }
}

template <typename T, typename Geometry>
void forward_range(const Model<T>& m, const Geometry& geo, const int64_t* center,
                   const int64_t* neighbor, int64_t begin, int64_t end, T* out) {
  Block<T> blk(m);
  for (int64_t e0 = begin; e0 < end; e0 += kBlock) {
    blk.n = std::min(kBlock, end - e0);
    const int64_t n = blk.n;
    geo.load(e0, n, blk.ux.data(), blk.uy.data(), blk.uz.data());
    evaluate_block(m, center, neighbor, e0, false, blk);
    for (int64_t k = 0; k < m.n_basic; ++k) {
      const T* f = blk.f.data() + m.mu[k] * kBlock;
      const T* mono = blk.mono.data() + m.mono[k] * kBlock;
      T* v = blk.slot.data() + k * kBlock;
      for (int64_t i = 0; i < n; ++i) v[i] = f[i] * mono[i];
    }
    for (int64_t i = 0; i < n; ++i) {
      T* row = out + center[e0 + i] * m.n_basic;
      for (int64_t k = 0; k < m.n_basic; ++k) row[k] += blk.slot[k * kBlock + i];
    }
  }
}

template <typename T, typename Geometry>
void backward_range(const Model<T>& m, const Geometry& geo, const int64_t* center,
                    const int64_t* neighbor, const T* G, int64_t begin, int64_t end, int tid) {
  Block<T> blk(m);
  std::vector<T> g(m.n_mu * kBlock), h(3 * kBlock), S(m.ma.size() * kBlock), gv(3 * kBlock);
  for (int64_t e0 = begin; e0 < end; e0 += kBlock) {
    blk.n = std::min(kBlock, end - e0);
    const int64_t n = blk.n;
    geo.load(e0, n, blk.ux.data(), blk.uy.data(), blk.uz.data());
    evaluate_block(m, center, neighbor, e0, true, blk);
    for (int64_t i = 0; i < n; ++i) {  // dL/dM rows of the centres, transposed
      const T* row = G + center[e0 + i] * m.n_basic;
      for (int64_t k = 0; k < m.n_basic; ++k) blk.slot[k * kBlock + i] = row[k];
    }
    std::fill(g.begin(), g.end(), T(0));
    std::fill(S.begin(), S.end(), T(0));
    // g_mu = sum_{k: mu_k = mu} G_k m_k;  S_j = sum_{k: mono_k = j} G_k f_{mu_k}
    for (int64_t k = 0; k < m.n_basic; ++k) {
      const T* Gk = blk.slot.data() + k * kBlock;
      const T* f = blk.f.data() + m.mu[k] * kBlock;
      const T* mono = blk.mono.data() + m.mono[k] * kBlock;
      T* gmu = g.data() + m.mu[k] * kBlock;
      T* Sj = S.data() + m.mono[k] * kBlock;
      for (int64_t i = 0; i < n; ++i) {
        gmu[i] += Gk[i] * mono[i];
        Sj[i] += Gk[i] * f[i];
      }
    }
    // h = sum_j S_j grad_u m_j, with d(u_x^a)/du_x = a u_x^(a-1)
    T* hx = h.data();
    T* hy = hx + kBlock;
    T* hz = hy + kBlock;
    for (int64_t i = 0; i < 3 * kBlock; ++i) h[i] = T(0);
    for (size_t j = 0; j < m.ma.size(); ++j) {
      const int64_t a = m.ma[j], b = m.mb[j], c = m.mc[j];
      const T* Sj = S.data() + j * kBlock;
      const T* px = blk.px.data() + a * kBlock;
      const T* py = blk.py.data() + b * kBlock;
      const T* pz = blk.pz.data() + c * kBlock;
      if (a > 0) {
        const T* pxm = px - kBlock;
        for (int64_t i = 0; i < n; ++i) hx[i] += Sj[i] * (T(a) * pxm[i] * py[i] * pz[i]);
      }
      if (b > 0) {
        const T* pym = py - kBlock;
        for (int64_t i = 0; i < n; ++i) hy[i] += Sj[i] * (T(b) * px[i] * pym[i] * pz[i]);
      }
      if (c > 0) {
        const T* pzm = pz - kBlock;
        for (int64_t i = 0; i < n; ++i) hz[i] += Sj[i] * (T(c) * px[i] * py[i] * pzm[i]);
      }
    }
    T* gr = blk.arg.data();  // reused: dL/dr per edge
    for (int64_t i = 0; i < n; ++i) gr[i] = T(0);
    for (int64_t mu = 0; mu < m.n_mu; ++mu) {
      const T* gmu = g.data() + mu * kBlock;
      const T* df = blk.df.data() + mu * kBlock;
      for (int64_t i = 0; i < n; ++i) gr[i] += gmu[i] * df[i];
    }
    T* gx = gv.data();
    T* gy = gx + kBlock;
    T* gz = gy + kBlock;
    for (int64_t i = 0; i < n; ++i) {
      const T ux = blk.ux[i], uy = blk.uy[i], uz = blk.uz[i];
      const T dot = hx[i] * ux + hy[i] * uy + hz[i] * uz;
      gx[i] = gr[i] * ux + (hx[i] - dot * ux) * blk.inv[i];
      gy[i] = gr[i] * uy + (hy[i] - dot * uy) * blk.inv[i];
      gz[i] = gr[i] * uz + (hz[i] - dot * uz) * blk.inv[i];
    }
    geo.add_grad(e0, n, gx, gy, gz, tid);
  }
}

// The forward pass over all edges: one accumulator per thread when threaded (the edges of one
// atom may fall in several chunks), then a sum.
template <typename T, typename Geometry>
void forward_all(const Model<T>& m, const Geometry& geo, const int64_t* center,
                 const int64_t* neighbor, int64_t E, at::Tensor& out) {
  const int64_t grain = 32 * kBlock, N = out.size(0);
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
  at::parallel_for(0, E, 16 * kBlock, [&](int64_t begin, int64_t end) {
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
  TORCH_CHECK(grad.dim() == 2 && grad.size(1) == basic.size(0),
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
                   in.center.data_ptr<int64_t>(),
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
  TORCH_CHECK(grad.dim() == 2 && grad.size(1) == basic.size(0),
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
}

TORCH_LIBRARY_IMPL(sus2, CPU, m) {
  m.impl("basic_moments", &basic_moments);
  m.impl("basic_moments_backward", &basic_moments_backward);
  m.impl("basic_moments_from_positions", &basic_moments_from_positions);
  m.impl("basic_moments_from_positions_backward", &basic_moments_from_positions_backward);
}
