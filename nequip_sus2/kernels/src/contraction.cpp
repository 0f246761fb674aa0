// Fused contraction program of SUS2 (docs/theory.md §2.6) for CPU: per atom, starting from the
// basic moments M_0 .. M_{n_basic-1},
//
//   M_o += m M_p M_q   for every entry (p, q, m, o), in order,      B_a = M_{mapping[a]},
//
// and its vector-Jacobian product (the entries in reverse order, with M recomputed):
//
//   dL/dM_p += m M_q dL/dM_o,   dL/dM_q += m M_p dL/dM_o.
//
// Atoms are processed in blocks of kAtoms with the slots as rows ([slot][atom]), so every entry
// is one vector multiply-add (or two) over the block. Registered as sus2::contract_moments and
// sus2::contract_moments_backward, and sus2::contract_readout, which applies the linear readout
// in the same pass (shape functions and autograd in nequip_sus2/kernels/ops.py).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace {

// 64 atoms per block: four or eight independent vectors per entry (the entries writing one
// slot are dependent), the block's slots still in L2; 1.3-1.9x faster than 16 atoms
constexpr int64_t kAtoms = 64;

template <typename T>
struct Program {
  std::vector<int64_t> p, q, o, mapping;
  std::vector<T> m;
  int64_t n_slots, n_basic;
};

template <typename T>
Program<T> program_of(const at::Tensor& p, const at::Tensor& q, const at::Tensor& m,
                      const at::Tensor& o, const at::Tensor& mapping, int64_t n_slots,
                      int64_t n_basic) {
  const char* op = "sus2::contract_moments: ";
  TORCH_CHECK(p.dim() == 1 && q.sizes() == p.sizes() && m.sizes() == p.sizes() &&
                  o.sizes() == p.sizes(),
              op, "p, q, m, o must be [n_entries]");
  for (const auto* t : {&p, &q, &o, &mapping}) {
    TORCH_CHECK(t->scalar_type() == at::kLong, op, "index tensors must be int64");
  }
  Program<T> prog;
  prog.n_slots = n_slots;
  prog.n_basic = n_basic;
  const auto pc = p.contiguous(), qc = q.contiguous(), oc = o.contiguous();
  const auto mc = m.to(at::CppTypeToScalarType<T>::value).contiguous();
  const auto mapc = mapping.contiguous();
  for (int64_t k = 0; k < p.size(0); ++k) {
    const int64_t pk = pc.data_ptr<int64_t>()[k], qk = qc.data_ptr<int64_t>()[k];
    const int64_t ok = oc.data_ptr<int64_t>()[k];
    TORCH_CHECK(pk >= 0 && pk < n_slots && qk >= 0 && qk < n_slots && ok >= n_basic &&
                    ok < n_slots,
                op, "entry ", k, " indexes a slot out of range");
    prog.p.push_back(pk);
    prog.q.push_back(qk);
    prog.o.push_back(ok);
    prog.m.push_back(mc.template data_ptr<T>()[k]);
  }
  for (int64_t a = 0; a < mapping.size(0); ++a) {
    const int64_t s = mapc.data_ptr<int64_t>()[a];
    TORCH_CHECK(s >= 0 && s < n_slots, op, "mapping indexes a slot out of range");
    prog.mapping.push_back(s);
  }
  return prog;
}

// M [n_slots][kAtoms] of atoms [i0, i0 + n) from basic [N, n_basic]
template <typename T>
void evaluate(const Program<T>& prog, const T* basic, int64_t i0, int64_t n, T* M) {
  for (int64_t i = 0; i < n; ++i) {
    const T* row = basic + (i0 + i) * prog.n_basic;
    for (int64_t b = 0; b < prog.n_basic; ++b) M[b * kAtoms + i] = row[b];
  }
  std::fill(M + prog.n_basic * kAtoms, M + prog.n_slots * kAtoms, T(0));
  using V = at::vec::Vectorized<T>;
  for (size_t k = 0; k < prog.p.size(); ++k) {
    const T* Mp = M + prog.p[k] * kAtoms;
    const T* Mq = M + prog.q[k] * kAtoms;
    T* Mo = M + prog.o[k] * kAtoms;
    const V mk(prog.m[k]);
    for (int64_t i = 0; i < kAtoms; i += V::size()) {
      at::vec::fmadd(mk * V::loadu(Mp + i), V::loadu(Mq + i), V::loadu(Mo + i)).store(Mo + i);
    }
  }
}

// The vector-Jacobian product of the entries, in reverse order: dL/dM_p += m M_q dL/dM_o and
// dL/dM_q += m M_p dL/dM_o (a square, p == q, gets both terms, as the product rule says), with
// G = dL/dM [n_slots][kAtoms] seeded; writes the basic rows of atoms [i0, i0 + n) to gb.
template <typename T>
void reverse(const Program<T>& prog, const T* M, T* G, int64_t i0, int64_t n, T* gb) {
  using V = at::vec::Vectorized<T>;
  for (int64_t k = static_cast<int64_t>(prog.p.size()) - 1; k >= 0; --k) {
    const T* Mp = M + prog.p[k] * kAtoms;
    const T* Mq = M + prog.q[k] * kAtoms;
    const T* Go = G + prog.o[k] * kAtoms;
    T* Gp = G + prog.p[k] * kAtoms;
    T* Gq = G + prog.q[k] * kAtoms;
    const V mk(prog.m[k]);
    for (int64_t i = 0; i < kAtoms; i += V::size()) {
      const V go = mk * V::loadu(Go + i);
      const V mq = V::loadu(Mq + i), mp = V::loadu(Mp + i);
      at::vec::fmadd(go, mq, V::loadu(Gp + i)).store(Gp + i);
      at::vec::fmadd(go, mp, V::loadu(Gq + i)).store(Gq + i);
    }
  }
  const int64_t nb = prog.n_basic;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < nb; ++c) gb[(i0 + i) * nb + c] = G[c * kAtoms + i];
  }
}

// Runs body(i0, n, M, G) for every block of kAtoms atoms (threads over blocks): M holds the
// block's slots evaluated by the program, G is zeroed ([n_slots][kAtoms] each, per thread).
template <typename T, typename F>
void for_each_block(const Program<T>& prog, const T* basic, int64_t N, const F& body) {
  at::parallel_for(0, N, 4 * kAtoms, [&](int64_t begin, int64_t end) {
    std::vector<T> M(prog.n_slots * kAtoms), G(prog.n_slots * kAtoms);
    for (int64_t i0 = begin; i0 < end; i0 += kAtoms) {
      const int64_t n = std::min(kAtoms, end - i0);
      evaluate(prog, basic, i0, n, M.data());
      std::fill(G.begin(), G.end(), T(0));
      body(i0, n, M.data(), G.data());
    }
  });
}

at::Tensor contract_moments(const at::Tensor& basic_in, const at::Tensor& p, const at::Tensor& q,
                            const at::Tensor& m, const at::Tensor& o, const at::Tensor& mapping,
                            int64_t num_slots) {
  TORCH_CHECK(basic_in.dim() == 2, "sus2::contract_moments: basic must be [N, n_basic]");
  TORCH_CHECK(basic_in.device().is_cpu(), "sus2::contract_moments: CPU only");
  const auto basic = basic_in.contiguous();
  const int64_t N = basic.size(0), n_basis = mapping.size(0);
  auto out = at::empty({N, n_basis}, basic.options());
  AT_DISPATCH_FLOATING_TYPES(basic.scalar_type(), "sus2_contract_moments", [&] {
    const auto prog = program_of<scalar_t>(p, q, m, o, mapping, num_slots, basic.size(1));
    const scalar_t* b = basic.data_ptr<scalar_t>();
    scalar_t* y = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 4 * kAtoms, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> M(num_slots * kAtoms);
      for (int64_t i0 = begin; i0 < end; i0 += kAtoms) {
        const int64_t n = std::min(kAtoms, end - i0);
        evaluate(prog, b, i0, n, M.data());
        for (int64_t i = 0; i < n; ++i) {
          scalar_t* yi = y + (i0 + i) * n_basis;
          for (int64_t a = 0; a < n_basis; ++a) yi[a] = M[prog.mapping[a] * kAtoms + i];
        }
      }
    });
  });
  return out;
}

at::Tensor contract_moments_backward(const at::Tensor& grad_in, const at::Tensor& basic_in,
                                     const at::Tensor& p, const at::Tensor& q,
                                     const at::Tensor& m, const at::Tensor& o,
                                     const at::Tensor& mapping, int64_t num_slots) {
  const auto basic = basic_in.contiguous();
  const auto grad = grad_in.to(basic.scalar_type()).contiguous();
  const int64_t N = basic.size(0), n_basis = mapping.size(0), nb = basic.size(1);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == N && grad.size(1) == n_basis,
              "sus2::contract_moments_backward: grad must be [N, n_basis]");
  auto grad_basic = at::empty_like(basic);
  AT_DISPATCH_FLOATING_TYPES(basic.scalar_type(), "sus2_contract_moments_backward", [&] {
    const auto prog = program_of<scalar_t>(p, q, m, o, mapping, num_slots, nb);
    const scalar_t* b = basic.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* gb = grad_basic.data_ptr<scalar_t>();
    for_each_block(prog, b, N, [&](int64_t i0, int64_t n, const scalar_t* M, scalar_t* G) {
      // slot rows of dL/dB, one slot at a time (a slot may feed several basis functions)
      for (int64_t a = 0; a < n_basis; ++a) {
        scalar_t* Ga = G + prog.mapping[a] * kAtoms;
        const scalar_t* ga = g + i0 * n_basis + a;
        for (int64_t i = 0; i < n; ++i) Ga[i] += ga[i * n_basis];
      }
      reverse(prog, M, G, i0, n, gb);
    });
  });
  return grad_basic;
}

// Contraction program and linear readout in one pass (docs/theory.md §2.6, §2.7), for inference:
//
//   x_i = sum_a theta_a M_{slot_a}(i) + sum_{p,q} D_p(i) Q_pq D_q(i),   D_p = M_{quad_slots[p]},
//
// where the quadratic form (Q symmetric) replaces the basis functions that are single products
// of two slots (the degree-4 block D_l(a,b) D_l'(a',b') of docs/theory.md §6.7) and the program
// holds the entries of the other slots only. Returns x [N, 1] and dx_i/dbasic_i [N, n_basic] from
// the reverse pass run right after the forward one (G = theta at the readout slots, 2 Q D at the
// quadratic-form slots, then the entries in reverse order): the backward is one multiply.
std::tuple<at::Tensor, at::Tensor> contract_readout(
    const at::Tensor& basic_in, const at::Tensor& p, const at::Tensor& q, const at::Tensor& m,
    const at::Tensor& o, const at::Tensor& slots, const at::Tensor& theta_in,
    const at::Tensor& quad_slots_in, const at::Tensor& quad_in, int64_t num_slots) {
  const char* op = "sus2::contract_readout: ";
  TORCH_CHECK(basic_in.dim() == 2, op, "basic must be [N, n_basic]");
  TORCH_CHECK(basic_in.device().is_cpu(), op, "CPU only");
  const auto basic = basic_in.contiguous();
  const int64_t N = basic.size(0), nb = basic.size(1), nq = quad_slots_in.size(0);
  TORCH_CHECK(theta_in.dim() == 1 && theta_in.size(0) == slots.size(0), op,
              "theta must be [len(slots)]");
  TORCH_CHECK(quad_in.dim() == 2 && quad_in.size(0) == nq && quad_in.size(1) == nq, op,
              "quad must be [n_quad, n_quad]");
  TORCH_CHECK(quad_slots_in.scalar_type() == at::kLong, op, "quad_slots must be int64");
  const auto theta = theta_in.to(basic.scalar_type()).contiguous();
  const auto quad = quad_in.to(basic.scalar_type()).contiguous();
  const auto quad_slots = quad_slots_in.contiguous();
  for (int64_t k = 0; k < nq; ++k) {
    const int64_t s = quad_slots.data_ptr<int64_t>()[k];
    TORCH_CHECK(s >= 0 && s < num_slots, op, "quad_slots indexes a slot out of range");
  }
  auto x = at::empty({N, 1}, basic.options());
  auto grad_basic = at::empty_like(basic);
  AT_DISPATCH_FLOATING_TYPES(basic.scalar_type(), "sus2_contract_readout", [&] {
    using V = at::vec::Vectorized<scalar_t>;
    const auto prog = program_of<scalar_t>(p, q, m, o, slots, num_slots, nb);
    const scalar_t* b = basic.data_ptr<scalar_t>();
    const scalar_t* th = theta.data_ptr<scalar_t>();
    const scalar_t* Q = quad.data_ptr<scalar_t>();
    const int64_t* qs = quad_slots.data_ptr<int64_t>();
    scalar_t* xo = x.data_ptr<scalar_t>();
    scalar_t* gb = grad_basic.data_ptr<scalar_t>();
    for_each_block(prog, b, N, [&](int64_t i0, int64_t n, const scalar_t* M, scalar_t* G) {
      for (int64_t i = 0; i < kAtoms; i += V::size()) {
        V acc(0);
        for (size_t a = 0; a < prog.mapping.size(); ++a) {
          const int64_t s = prog.mapping[a] * kAtoms + i;
          const V t(th[a]);
          acc = at::vec::fmadd(t, V::loadu(M + s), acc);
          (V::loadu(G + s) + t).store(G + s);
        }
        for (int64_t r = 0; r < nq; ++r) {  // y = Q D; x += D . y; dx/dD = 2 y
          V y(0);
          for (int64_t c = 0; c < nq; ++c) {
            y = at::vec::fmadd(V(Q[r * nq + c]), V::loadu(M + qs[c] * kAtoms + i), y);
          }
          const int64_t s = qs[r] * kAtoms + i;
          acc = at::vec::fmadd(V::loadu(M + s), y, acc);
          at::vec::fmadd(V(scalar_t(2)), y, V::loadu(G + s)).store(G + s);
        }
        scalar_t lanes[V::size()];
        acc.store(lanes);
        for (int64_t j = 0; j < V::size() && i + j < n; ++j) xo[i0 + i + j] = lanes[j];
      }
      reverse(prog, M, G, i0, n, gb);
    });
  });
  return {x, grad_basic};
}

// --- training (docs/theory.md §4.6): the program's tangent and its vector-Jacobian product ----
//
// sus2::contract_jvp(basic, basic_dot, ...) returns B and its tangent dB for the tangent dM of
// the basic moments: dM_o += m (dM_p M_q + M_p dM_q) for every entry (M final first: an entry
// reads only slots that are complete). Its backward, with G = dL/dM and H = dL/d(dM) seeded by
// dL/dB and dL/d(dB), runs the entries in reverse order:
//   G_p += m (G_o M_q + H_o dM_q),   G_q += m (G_o M_p + H_o dM_p),
//   H_p += m H_o M_q,                H_q += m H_o M_p.

// dM [n_slots][kAtoms] of atoms [i0, i0 + n) from basic_dot [N, n_basic] and the block's M
template <typename T>
void evaluate_tangent(const Program<T>& prog, const T* basic_dot, const T* M, int64_t i0,
                      int64_t n, T* D) {
  for (int64_t i = 0; i < n; ++i) {
    const T* row = basic_dot + (i0 + i) * prog.n_basic;
    for (int64_t b = 0; b < prog.n_basic; ++b) D[b * kAtoms + i] = row[b];
  }
  for (int64_t b = 0; b < prog.n_basic; ++b) {
    std::fill(D + b * kAtoms + n, D + (b + 1) * kAtoms, T(0));
  }
  std::fill(D + prog.n_basic * kAtoms, D + prog.n_slots * kAtoms, T(0));
  using V = at::vec::Vectorized<T>;
  for (size_t k = 0; k < prog.p.size(); ++k) {
    const T* Mp = M + prog.p[k] * kAtoms;
    const T* Mq = M + prog.q[k] * kAtoms;
    const T* Dp = D + prog.p[k] * kAtoms;
    const T* Dq = D + prog.q[k] * kAtoms;
    T* Do = D + prog.o[k] * kAtoms;
    const V mk(prog.m[k]);
    for (int64_t i = 0; i < kAtoms; i += V::size()) {
      const V t = at::vec::fmadd(V::loadu(Dp + i), V::loadu(Mq + i), V::loadu(Mp + i) * V::loadu(Dq + i));
      at::vec::fmadd(mk, t, V::loadu(Do + i)).store(Do + i);
    }
  }
}

// M and dM of every block of atoms (threads over blocks)
template <typename T, typename F>
void for_each_tangent_block(const Program<T>& prog, const T* basic, const T* basic_dot, int64_t N,
                            const F& body) {
  at::parallel_for(0, N, 4 * kAtoms, [&](int64_t begin, int64_t end) {
    std::vector<T> M(prog.n_slots * kAtoms), D(prog.n_slots * kAtoms);
    for (int64_t i0 = begin; i0 < end; i0 += kAtoms) {
      const int64_t n = std::min(kAtoms, end - i0);
      evaluate(prog, basic, i0, n, M.data());
      evaluate_tangent(prog, basic_dot, M.data(), i0, n, D.data());
      body(i0, n, M.data(), D.data());
    }
  });
}

std::tuple<at::Tensor, at::Tensor> contract_jvp(const at::Tensor& basic_in,
                                                const at::Tensor& basic_dot_in,
                                                const at::Tensor& p, const at::Tensor& q,
                                                const at::Tensor& m, const at::Tensor& o,
                                                const at::Tensor& mapping, int64_t num_slots) {
  const char* op = "sus2::contract_jvp: ";
  TORCH_CHECK(basic_in.dim() == 2 && basic_dot_in.sizes() == basic_in.sizes() &&
                  basic_dot_in.scalar_type() == basic_in.scalar_type(),
              op, "basic and basic_dot must be [N, n_basic] of one dtype");
  TORCH_CHECK(basic_in.device().is_cpu(), op, "CPU only");
  const auto basic = basic_in.contiguous(), basic_dot = basic_dot_in.contiguous();
  const int64_t N = basic.size(0), n_basis = mapping.size(0);
  auto out = at::empty({N, n_basis}, basic.options());
  auto out_dot = at::empty({N, n_basis}, basic.options());
  AT_DISPATCH_FLOATING_TYPES(basic.scalar_type(), "sus2_contract_jvp", [&] {
    const auto prog = program_of<scalar_t>(p, q, m, o, mapping, num_slots, basic.size(1));
    scalar_t* y = out.data_ptr<scalar_t>();
    scalar_t* yd = out_dot.data_ptr<scalar_t>();
    for_each_tangent_block(
        prog, basic.data_ptr<scalar_t>(), basic_dot.data_ptr<scalar_t>(), N,
        [&](int64_t i0, int64_t n, const scalar_t* M, const scalar_t* D) {
          for (int64_t i = 0; i < n; ++i) {
            for (int64_t a = 0; a < n_basis; ++a) {
              y[(i0 + i) * n_basis + a] = M[prog.mapping[a] * kAtoms + i];
              yd[(i0 + i) * n_basis + a] = D[prog.mapping[a] * kAtoms + i];
            }
          }
        });
  });
  return {out, out_dot};
}

std::tuple<at::Tensor, at::Tensor> contract_jvp_backward(
    const at::Tensor& grad_in, const at::Tensor& grad_dot_in, const at::Tensor& basic_in,
    const at::Tensor& basic_dot_in, const at::Tensor& p, const at::Tensor& q, const at::Tensor& m,
    const at::Tensor& o, const at::Tensor& mapping, int64_t num_slots) {
  const auto basic = basic_in.contiguous(), basic_dot = basic_dot_in.contiguous();
  const auto grad = grad_in.to(basic.scalar_type()).contiguous();
  const auto grad_dot = grad_dot_in.to(basic.scalar_type()).contiguous();
  const int64_t N = basic.size(0), n_basis = mapping.size(0), nb = basic.size(1);
  for (const auto* g : {&grad, &grad_dot}) {
    TORCH_CHECK(g->dim() == 2 && g->size(0) == N && g->size(1) == n_basis,
                "sus2::contract_jvp_backward: grads must be [N, n_basis]");
  }
  auto grad_basic = at::empty_like(basic), grad_basic_dot = at::empty_like(basic);
  AT_DISPATCH_FLOATING_TYPES(basic.scalar_type(), "sus2_contract_jvp_backward", [&] {
    using V = at::vec::Vectorized<scalar_t>;
    const auto prog = program_of<scalar_t>(p, q, m, o, mapping, num_slots, nb);
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* gd = grad_dot.data_ptr<scalar_t>();
    scalar_t* out = grad_basic.data_ptr<scalar_t>();
    scalar_t* out_dot = grad_basic_dot.data_ptr<scalar_t>();
    for_each_tangent_block(
        prog, basic.data_ptr<scalar_t>(), basic_dot.data_ptr<scalar_t>(), N,
        [&](int64_t i0, int64_t n, const scalar_t* M, const scalar_t* D) {
          std::vector<scalar_t> G(prog.n_slots * kAtoms), H(prog.n_slots * kAtoms);
          for (int64_t a = 0; a < n_basis; ++a) {
            const int64_t s = prog.mapping[a] * kAtoms;
            for (int64_t i = 0; i < n; ++i) {
              G[s + i] += g[(i0 + i) * n_basis + a];
              H[s + i] += gd[(i0 + i) * n_basis + a];
            }
          }
          for (int64_t k = static_cast<int64_t>(prog.p.size()) - 1; k >= 0; --k) {
            const int64_t sp = prog.p[k] * kAtoms, sq = prog.q[k] * kAtoms;
            const int64_t so = prog.o[k] * kAtoms;
            const V mk(prog.m[k]);
            for (int64_t i = 0; i < kAtoms; i += V::size()) {
              const V go = mk * V::loadu(G.data() + so + i), ho = mk * V::loadu(H.data() + so + i);
              const V mp = V::loadu(M + sp + i), mq = V::loadu(M + sq + i);
              const V dp = V::loadu(D + sp + i), dq = V::loadu(D + sq + i);
              at::vec::fmadd(go, mq, at::vec::fmadd(ho, dq, V::loadu(G.data() + sp + i)))
                  .store(G.data() + sp + i);
              at::vec::fmadd(go, mp, at::vec::fmadd(ho, dp, V::loadu(G.data() + sq + i)))
                  .store(G.data() + sq + i);
              at::vec::fmadd(ho, mq, V::loadu(H.data() + sp + i)).store(H.data() + sp + i);
              at::vec::fmadd(ho, mp, V::loadu(H.data() + sq + i)).store(H.data() + sq + i);
            }
          }
          for (int64_t i = 0; i < n; ++i) {
            for (int64_t c = 0; c < nb; ++c) {
              out[(i0 + i) * nb + c] = G[c * kAtoms + i];
              out_dot[(i0 + i) * nb + c] = H[c * kAtoms + i];
            }
          }
        });
  });
  return {grad_basic, grad_basic_dot};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sus2, m) {
  m.def(
      "contract_moments(Tensor basic, Tensor p, Tensor q, Tensor m, Tensor o, Tensor mapping, "
      "int num_slots) -> Tensor");
  m.def(
      "contract_moments_backward(Tensor grad, Tensor basic, Tensor p, Tensor q, Tensor m, "
      "Tensor o, Tensor mapping, int num_slots) -> Tensor");
  m.def(
      "contract_readout(Tensor basic, Tensor p, Tensor q, Tensor m, Tensor o, Tensor slots, "
      "Tensor theta, Tensor quad_slots, Tensor quad, int num_slots) -> (Tensor, Tensor)");
  m.def(
      "contract_jvp(Tensor basic, Tensor basic_dot, Tensor p, Tensor q, Tensor m, Tensor o, "
      "Tensor mapping, int num_slots) -> (Tensor, Tensor)");
  m.def(
      "contract_jvp_backward(Tensor grad, Tensor grad_dot, Tensor basic, Tensor basic_dot, "
      "Tensor p, Tensor q, Tensor m, Tensor o, Tensor mapping, int num_slots) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sus2, CPU, m) {
  m.impl("contract_moments", &contract_moments);
  m.impl("contract_moments_backward", &contract_moments_backward);
  m.impl("contract_readout", &contract_readout);
  m.impl("contract_jvp", &contract_jvp);
  m.impl("contract_jvp_backward", &contract_jvp_backward);
}
