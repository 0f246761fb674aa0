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
// Registered as sus2::basic_moments and sus2::basic_moments_backward (CPU kernels; shape
// functions and autograd come from nequip_sus2/kernels/ops.py). Only the edge vectors are
// differentiated: the operators serve inference. The same file is compiled into the LAMMPS
// plugin so that AOTInductor-compiled models calling the operators run there too.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
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
  at::Tensor vec, center, neighbor, types, alpha, r0, coeffs, eta, weights, basic;
};

Inputs check(const at::Tensor& vec, const at::Tensor& center, const at::Tensor& neighbor,
             const at::Tensor& types, const at::Tensor& alpha, const at::Tensor& r0,
             const at::Tensor& coeffs, const at::Tensor& eta, const at::Tensor& weights,
             const at::Tensor& basic) {
  const char* op = "sus2::basic_moments: ";
  TORCH_CHECK(vec.dim() == 2 && vec.size(1) == 3, op, "vec must be [E, 3]");
  const int64_t E = vec.size(0);
  for (const auto* t : {&center, &neighbor, &types, &eta, &basic}) {
    TORCH_CHECK(t->scalar_type() == at::kLong, op, "index tensors must be int64");
  }
  TORCH_CHECK(center.dim() == 1 && center.size(0) == E && neighbor.dim() == 1 &&
                  neighbor.size(0) == E,
              op, "center and neighbor must be [E]");
  TORCH_CHECK(alpha.dim() == 2 && r0.sizes() == alpha.sizes(), op,
              "alpha and r0 must be [N_eta, C*C]");
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) * weights.size(0) == alpha.size(1), op,
              "weights must be [C] with alpha [N_eta, C*C]");
  TORCH_CHECK(coeffs.dim() == 2 && eta.dim() == 1 && eta.size(0) == coeffs.size(0), op,
              "coeffs must be [N_mu, R] and eta_of_mu [N_mu]");
  TORCH_CHECK(basic.dim() == 2 && basic.size(1) == 4, op, "basic must be [n_basic, 4]");
  for (const auto* t : {&alpha, &r0, &coeffs, &weights}) {
    TORCH_CHECK(t->scalar_type() == vec.scalar_type(), op,
                "parameters and vec must have the same dtype");
  }
  TORCH_CHECK(vec.device().is_cpu(), op, "the fused kernel runs on CPU only");
  return {vec.contiguous(),   center.contiguous(), neighbor.contiguous(), types.contiguous(),
          alpha.contiguous(), r0.contiguous(),     coeffs.contiguous(),   eta.contiguous(),
          weights.contiguous(), basic.contiguous()};
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

// Geometry, radial functions f (and f' if with_derivative) and monomial powers of the edges
// [e0, e0 + blk.n).
template <typename T>
void evaluate_block(const Model<T>& m, const T* vec, const int64_t* center,
                    const int64_t* neighbor, int64_t e0, bool with_derivative, Block<T>& blk) {
  const int64_t n = blk.n, CC = m.n_types * m.n_types;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = e0 + i;
    const int64_t zi = m.types[center[e]], zj = m.types[neighbor[e]];
    blk.pair[i] = zi * m.n_types + zj;
    blk.w[i] = m.weights[zi] * m.weights[zj];
    const T x = vec[3 * e], y = vec[3 * e + 1], z = vec[3 * e + 2];
    blk.r[i] = std::sqrt(x * x + y * y + z * z);
    blk.ux[i] = x;
    blk.uy[i] = y;
    blk.uz[i] = z;
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

template <typename T>
void forward_range(const Model<T>& m, const T* vec, const int64_t* center,
                   const int64_t* neighbor, int64_t begin, int64_t end, T* out) {
  Block<T> blk(m);
  for (int64_t e0 = begin; e0 < end; e0 += kBlock) {
    blk.n = std::min(kBlock, end - e0);
    const int64_t n = blk.n;
    evaluate_block(m, vec, center, neighbor, e0, false, blk);
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

template <typename T>
void backward_range(const Model<T>& m, const T* vec, const int64_t* center,
                    const int64_t* neighbor, const T* G, int64_t begin, int64_t end, T* gv) {
  Block<T> blk(m);
  std::vector<T> g(m.n_mu * kBlock), h(3 * kBlock), S(m.ma.size() * kBlock);
  for (int64_t e0 = begin; e0 < end; e0 += kBlock) {
    blk.n = std::min(kBlock, end - e0);
    const int64_t n = blk.n;
    evaluate_block(m, vec, center, neighbor, e0, true, blk);
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
    for (int64_t i = 0; i < n; ++i) {
      const T ux = blk.ux[i], uy = blk.uy[i], uz = blk.uz[i];
      const T dot = hx[i] * ux + hy[i] * uy + hz[i] * uz;
      T* out = gv + 3 * (e0 + i);
      out[0] = gr[i] * ux + (hx[i] - dot * ux) * blk.inv[i];
      out[1] = gr[i] * uy + (hy[i] - dot * uy) * blk.inv[i];
      out[2] = gr[i] * uz + (hz[i] - dot * uz) * blk.inv[i];
    }
  }
}

at::Tensor basic_moments(const at::Tensor& vec, const at::Tensor& center,
                         const at::Tensor& neighbor, const at::Tensor& types,
                         const at::Tensor& alpha, const at::Tensor& r0, const at::Tensor& coeffs,
                         const at::Tensor& eta, const at::Tensor& weights,
                         const at::Tensor& basic, double r_max, double sigma,
                         int64_t num_nodes) {
  const Inputs in = check(vec, center, neighbor, types, alpha, r0, coeffs, eta, weights, basic);
  const int64_t E = vec.size(0);
  auto out = at::zeros({num_nodes, basic.size(0)}, vec.options());
  if (E == 0 || basic.size(0) == 0) return out;
  const int64_t grain = 32 * kBlock;
  const int threads = at::get_num_threads();
  AT_DISPATCH_FLOATING_TYPES(vec.scalar_type(), "sus2_basic_moments", [&] {
    const auto m = model_of<scalar_t>(in, r_max, sigma);
    const scalar_t* v = in.vec.data_ptr<scalar_t>();
    const int64_t* ci = in.center.data_ptr<int64_t>();
    const int64_t* nj = in.neighbor.data_ptr<int64_t>();
    if (threads <= 1 || E < 2 * grain) {
      forward_range(m, v, ci, nj, 0, E, out.data_ptr<scalar_t>());
      return;
    }
    // one accumulator per thread (the edges of one atom may fall in several chunks), then a sum
    auto partial = at::zeros({threads, num_nodes, m.n_basic}, vec.options());
    scalar_t* p = partial.data_ptr<scalar_t>();
    at::parallel_for(0, E, grain, [&](int64_t begin, int64_t end) {
      forward_range(m, v, ci, nj, begin, end, p + at::get_thread_num() * num_nodes * m.n_basic);
    });
    at::sum_out(out, partial, 0);
  });
  return out;
}

at::Tensor basic_moments_backward(const at::Tensor& grad_in, const at::Tensor& vec,
                                  const at::Tensor& center, const at::Tensor& neighbor,
                                  const at::Tensor& types, const at::Tensor& alpha,
                                  const at::Tensor& r0, const at::Tensor& coeffs,
                                  const at::Tensor& eta, const at::Tensor& weights,
                                  const at::Tensor& basic, double r_max, double sigma) {
  const Inputs in = check(vec, center, neighbor, types, alpha, r0, coeffs, eta, weights, basic);
  const auto grad = grad_in.to(vec.scalar_type()).contiguous();
  TORCH_CHECK(grad.dim() == 2 && grad.size(1) == basic.size(0),
              "sus2::basic_moments_backward: grad must be [num_nodes, n_basic]");
  const int64_t E = vec.size(0);
  auto grad_vec = at::zeros_like(in.vec);
  if (E == 0 || basic.size(0) == 0) return grad_vec;
  AT_DISPATCH_FLOATING_TYPES(vec.scalar_type(), "sus2_basic_moments_backward", [&] {
    const auto m = model_of<scalar_t>(in, r_max, sigma);
    const scalar_t* v = in.vec.data_ptr<scalar_t>();
    const int64_t* ci = in.center.data_ptr<int64_t>();
    const int64_t* nj = in.neighbor.data_ptr<int64_t>();
    const scalar_t* G = grad.data_ptr<scalar_t>();
    scalar_t* gv = grad_vec.data_ptr<scalar_t>();
    at::parallel_for(0, E, 16 * kBlock, [&](int64_t begin, int64_t end) {
      backward_range(m, v, ci, nj, G, begin, end, gv);
    });
  });
  return grad_vec;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sus2, m) {
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
}
