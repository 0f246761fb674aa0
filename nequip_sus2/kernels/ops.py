"""Load the fused operators and register their shape functions and autograd formulas.

Importing this module builds the library if needed (:func:`nequip_sus2.kernels.build`) and
loads it; it is the library name that models using the kernels record for NequIP's AOTI loader
(``_nequip_custom_ops_libs``), so compiled models find the operators when they are loaded.

* ``sus2::basic_moments(vec [E, 3], center [E], neighbor [E], types [N],
  alpha [N_eta, C*C], r0 [N_eta, C*C], coeffs [N_mu, R], eta_of_mu [N_mu], weights [C],
  basic [n_basic, 4], r_max, sigma, num_nodes)`` returns the basic moments
  ``[num_nodes, n_basic]`` (docs/theory.md §2.2-2.5, see ``src/edge_moments.cpp``).
* ``sus2::basic_moments_from_positions(pos [N, 3], cell [B, 3, 3], shift [E, 3], batch [N],
  center, ...)`` is the same from positions, cell and edge cell shifts (float64; empty
  ``cell``/``shift`` without a cell, empty ``batch`` for one frame): its backward returns the
  position and cell gradients directly.
* ``sus2::contract_moments(basic [N, n_basic], p, q, m, o, mapping, num_slots)`` runs the
  contraction program on them and returns the scalar basis ``[N, N_B]`` (docs/theory.md §2.6,
  ``src/contraction.cpp``).
* ``sus2::contract_readout(basic, p, q, m, o, slots, theta, quad_slots, quad, num_slots)`` runs
  a program and the linear readout together (the degree-4 products as a quadratic form,
  docs/theory.md §6.7) and returns ``x = theta . B`` ``[N, 1]`` with ``dx/dbasic``
  ``[N, n_basic]`` (its backward is one multiply).

* ``sus2::basic_moments_jvp(vec, dvec, center, neighbor, types, alpha, r0, coeffs, eta_of_mu,
  weights, basic, r_max, sigma, num_nodes)`` returns the basic moments and their tangent along
  the edge-vector directions ``dvec`` [E, 3] (both ``[num_nodes, n_basic]``); its backward
  differentiates the parameters ``alpha``, ``r0``, ``coeffs`` and ``weights`` (not the
  geometry). It is the training path (:mod:`nequip_sus2.kernels.training`): the loss gradient
  of forces and stresses is the parameter gradient of such a tangent.
* ``sus2::contract_jvp(basic, basic_dot, p, q, m, o, mapping, num_slots)`` runs a program on
  the basic moments and their tangent and returns the scalar basis and its tangent (both
  ``[N, N_B]``); differentiable in both inputs (the training path's contraction).

The backward operators of the other three (``*_backward``) differentiate the edge vectors and
the basic moments only and are not differentiable again: those kernels serve inference
(energies, forces, stresses).
"""

from __future__ import annotations

import torch

from . import build

__all__ = [
    "basic_moments",
    "basic_moments_from_positions",
    "basic_moments_jvp",
    "contract_jvp",
    "contract_moments",
    "contract_readout",
]


def _load() -> None:
    if hasattr(torch.ops.sus2, "basic_moments"):  # already loaded in this process
        return
    torch.ops.load_library(str(build()))

    @torch.library.register_fake("sus2::basic_moments")
    def _(vec, center, neighbor, types, alpha, r0, coeffs, eta, weights, basic, r_max, sigma, n):
        return vec.new_empty((n, basic.shape[0]))

    @torch.library.register_fake("sus2::basic_moments_backward")
    def _(grad, vec, *args):
        return vec.new_empty(vec.shape)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:10])
        ctx.r_max, ctx.sigma = inputs[10], inputs[11]

    def backward(ctx, grad):
        if any(ctx.needs_input_grad[4:9]):
            raise RuntimeError(
                "sus2::basic_moments differentiates the edge vectors only; the fused SUS2 kernel "
                "(enable_fused_moments) is for inference - train without it"
            )
        grad_vec = torch.ops.sus2.basic_moments_backward(
            grad, *ctx.saved_tensors, ctx.r_max, ctx.sigma
        )
        return (grad_vec,) + (None,) * 12

    def no_second_derivative(ctx, *grads):
        raise RuntimeError(
            "the fused SUS2 kernels (enable_fused_moments) have no second derivatives: they "
            "are for inference - train without them"
        )

    @torch.library.register_fake("sus2::basic_moments_from_positions")
    def _(pos, cell, shift, batch, center, neighbor, types, alpha, *args):
        return alpha.new_empty((pos.shape[0], args[-3].shape[0]))

    @torch.library.register_fake("sus2::basic_moments_from_positions_backward")
    def _(grad, pos, cell, *args):
        return pos.new_empty(pos.shape), cell.new_empty(cell.shape)

    def setup_positions(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:13])
        ctx.r_max, ctx.sigma = inputs[13], inputs[14]

    def backward_positions(ctx, grad):
        if any(ctx.needs_input_grad[7:12]):
            raise RuntimeError(
                "sus2::basic_moments_from_positions differentiates positions and cell only; the "
                "fused SUS2 kernel (enable_fused_moments) is for inference - train without it"
            )
        grad_pos, grad_cell = torch.ops.sus2.basic_moments_from_positions_backward(
            grad, *ctx.saved_tensors, ctx.r_max, ctx.sigma
        )
        return (grad_pos, grad_cell) + (None,) * 13

    @torch.library.register_fake("sus2::contract_moments")
    def _(basic, p, q, m, o, mapping, num_slots):
        return basic.new_empty((basic.shape[0], mapping.shape[0]))

    @torch.library.register_fake("sus2::contract_moments_backward")
    def _(grad, basic, *args):
        return basic.new_empty(basic.shape)

    def setup_contract(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:6])
        ctx.num_slots = inputs[6]

    def backward_contract(ctx, grad):
        grad_basic = torch.ops.sus2.contract_moments_backward(
            grad, *ctx.saved_tensors, ctx.num_slots
        )
        return (grad_basic,) + (None,) * 6

    @torch.library.register_fake("sus2::contract_readout")
    def _(basic, p, q, m, o, slots, theta, quad_slots, quad, num_slots):
        return basic.new_empty((basic.shape[0], 1)), basic.new_empty(basic.shape)

    def setup_readout(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.set_materialize_grads(False)

    def backward_readout(ctx, grad_x, grad_dx_dbasic):
        if grad_dx_dbasic is not None:  # only reached when differentiating forces again
            no_second_derivative(ctx)
        if grad_x is None:
            return (None,) * 10
        (dx_dbasic,) = ctx.saved_tensors
        return (grad_x * dx_dbasic,) + (None,) * 9

    @torch.library.register_fake("sus2::basic_moments_jvp")
    def _(vec, dvec, center, neighbor, types, alpha, r0, coeffs, eta, weights, basic, *args):
        n = args[-1]
        return vec.new_empty((n, basic.shape[0])), vec.new_empty((n, basic.shape[0]))

    @torch.library.register_fake("sus2::basic_moments_jvp_backward")
    def _(grad_m, grad_mdot, vec, dvec, center, neighbor, types, alpha, r0, coeffs, eta, w, *a):
        return (alpha.new_empty(alpha.shape), r0.new_empty(r0.shape),
                coeffs.new_empty(coeffs.shape), w.new_empty(w.shape))  # fmt: skip

    def setup_jvp(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:11])
        ctx.r_max, ctx.sigma = inputs[11], inputs[12]
        ctx.set_materialize_grads(False)

    def backward_jvp(ctx, grad_m, grad_mdot):
        if any(ctx.needs_input_grad[:2]):
            raise RuntimeError(
                "sus2::basic_moments_jvp differentiates the parameters alpha, r0, coeffs and "
                "weights only, not the edge vectors or their tangents"
            )
        saved = ctx.saved_tensors
        if grad_m is None and grad_mdot is None:
            return (None,) * 14
        like = saved[0].new_zeros((saved[4].shape[0], saved[10].shape[0]))
        grads = torch.ops.sus2.basic_moments_jvp_backward(
            like if grad_m is None else grad_m,
            like if grad_mdot is None else grad_mdot,
            *saved,
            ctx.r_max,
            ctx.sigma,
        )
        alpha, r0, coeffs, weights = grads
        needs = ctx.needs_input_grad
        return (
            (None,) * 5
            + (alpha if needs[5] else None, r0 if needs[6] else None)
            + (coeffs if needs[7] else None, None, weights if needs[9] else None)
            + (None,) * 4
        )

    @torch.library.register_fake("sus2::contract_jvp")
    def _(basic, basic_dot, p, q, m, o, mapping, num_slots):
        shape = (basic.shape[0], mapping.shape[0])
        return basic.new_empty(shape), basic.new_empty(shape)

    @torch.library.register_fake("sus2::contract_jvp_backward")
    def _(grad, grad_dot, basic, basic_dot, *args):
        return basic.new_empty(basic.shape), basic.new_empty(basic.shape)

    def setup_contract_jvp(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:7])
        ctx.num_slots = inputs[7]
        ctx.set_materialize_grads(False)

    def backward_contract_jvp(ctx, grad, grad_dot):
        saved = ctx.saved_tensors
        if grad is None and grad_dot is None:
            return (None,) * 8
        like = saved[0].new_zeros((saved[0].shape[0], saved[6].shape[0]))
        g, g_dot = torch.ops.sus2.contract_jvp_backward(
            like if grad is None else grad,
            like if grad_dot is None else grad_dot,
            *saved,
            ctx.num_slots,
        )
        return (g, g_dot) + (None,) * 6

    torch.library.register_autograd("sus2::basic_moments", backward, setup_context=setup_context)
    torch.library.register_autograd(
        "sus2::contract_jvp", backward_contract_jvp, setup_context=setup_contract_jvp
    )
    torch.library.register_autograd(
        "sus2::basic_moments_jvp", backward_jvp, setup_context=setup_jvp
    )
    torch.library.register_autograd(
        "sus2::basic_moments_from_positions", backward_positions, setup_context=setup_positions
    )
    torch.library.register_autograd(
        "sus2::contract_moments", backward_contract, setup_context=setup_contract
    )
    torch.library.register_autograd(
        "sus2::contract_readout", backward_readout, setup_context=setup_readout
    )
    for name in (
        "basic_moments_backward",
        "basic_moments_from_positions_backward",
        "contract_moments_backward",
        "basic_moments_jvp_backward",
        "contract_jvp_backward",
    ):
        torch.library.register_autograd(f"sus2::{name}", no_second_derivative)


_load()

# the operators themselves (signatures in the module docstring)
basic_moments = torch.ops.sus2.basic_moments
basic_moments_from_positions = torch.ops.sus2.basic_moments_from_positions
basic_moments_jvp = torch.ops.sus2.basic_moments_jvp
contract_moments = torch.ops.sus2.contract_moments
contract_readout = torch.ops.sus2.contract_readout
contract_jvp = torch.ops.sus2.contract_jvp
