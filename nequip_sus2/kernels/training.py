r"""The fused training path: exact loss gradients of a SUS2 model through the CPU kernels.

A loss of energies, forces and stresses needs, on the PyTorch path, the parameter gradient of
forces that are themselves an autograd gradient (a double backward through every per-edge
tensor). Here it is split into three cheap passes (docs/theory.md §4.6):

1. energies, forces, stresses and virials by the inference kernels (``enable_fused_moments``,
   no parameter graph), and the loss of them with its cotangents
   :math:`\bar e = \partial L/\partial E`, :math:`\bar f = \partial L/\partial F`,
   :math:`\bar\sigma = \partial L/\partial\sigma`, :math:`\bar W = \partial L/\partial W`;
2. every edge vector is given the tangent
   :math:`\delta_{ij} = -(\bar f_j - \bar f_i) + r_{ij}\,\mathrm{sym}(\bar\sigma/V - \bar W)`,
   and ``sus2::basic_moments_jvp`` returns the basic moments and their tangent, the contraction
   program and the readout carry the tangent to :math:`\dot E`;
3. the parameter gradient of :math:`\Phi = \sum \bar e\,E + \dot E` (the kernel's backward for
   :math:`\alpha, r_0, c, w`; autograd for :math:`\theta`, the scales and the shifts) is the
   loss gradient.

:class:`FusedLossGradient` does this for a NequIP model; the full-batch L-BFGS training module
uses it with ``fused_training: true``.
"""

from __future__ import annotations

import torch
from nequip.data import AtomicDataDict
from nequip.nn.utils import with_edge_vectors_

from ..data.frames import frame_index
from ..nn.readout import LinearReadout
from .fused import FusedMomentContraction, enable_fused_moments

__all__ = ["FusedLossGradient", "edge_tangents"]

#: the outputs a loss may read, and the modules a model may hold, on the fused path
_ENERGY = AtomicDataDict.TOTAL_ENERGY_KEY
_ATOM_ENERGY = AtomicDataDict.PER_ATOM_ENERGY_KEY
_FORCES = AtomicDataDict.FORCE_KEY
_STRESS = AtomicDataDict.STRESS_KEY
_VIRIAL = AtomicDataDict.VIRIAL_KEY
OUTPUTS = (_ENERGY, _ATOM_ENERGY, _FORCES, _STRESS, _VIRIAL)
_MODULES = {
    "repulsive_core",
    "scaling",
    "radial_basis",
    "embedding",
    "moments",
    "readout",
    "per_type_energy_scale_shift",
    "repulsive_core_energy",
    "total_energy_sum",
}


def _sus2_network(model: torch.nn.Module) -> torch.nn.Module:
    from ..model.sus2 import sus2_network

    net = sus2_network(model)
    if net is None:
        raise ValueError("fused training: not a SUS2 model (one network with `moments` expected)")
    extra = sorted(set(net._modules) - _MODULES)
    if extra:
        raise ValueError(
            f"fused training: the model has module(s) {extra} that the fused path does not "
            "evaluate (pair potentials, extrapolation grades); train without `fused_training`"
        )
    return net


def edge_tangents(
    data: AtomicDataDict.Type,
    vec: torch.Tensor,
    forces_bar: torch.Tensor | None,
    stress_bar: torch.Tensor | None,
    virial_bar: torch.Tensor | None,
) -> torch.Tensor:
    r""":math:`\delta_{ij} = -(\bar f_j - \bar f_i) + r_{ij}\,\mathrm{sym}(\bar\sigma/V - \bar W)`
    [E, 3] (docs/theory.md §4.6): the edge-vector direction whose energy derivative has the
    parameter gradient of :math:`\sum \bar f F + \bar\sigma\sigma + \bar W W`."""
    center, neighbor = data[AtomicDataDict.EDGE_INDEX_KEY]
    dvec = torch.zeros_like(vec)
    if forces_bar is not None:
        fb = forces_bar.to(vec.dtype)
        dvec = dvec - (fb.index_select(0, neighbor) - fb.index_select(0, center))
    if stress_bar is None and virial_bar is None:
        return dvec
    frames = AtomicDataDict.num_frames(data)
    strain = vec.new_zeros((frames, 3, 3))
    if stress_bar is not None:
        cell = data[AtomicDataDict.CELL_KEY].view(-1, 3, 3).to(vec.dtype).expand(frames, 3, 3)
        volume = torch.linalg.det(cell).abs().view(-1, 1, 1)
        has_volume = volume > 0
        safe = torch.where(has_volume, volume, torch.ones_like(volume))
        bar = torch.nan_to_num(stress_bar.view(frames, 3, 3).to(vec.dtype), nan=0.0)
        strain = strain + torch.where(has_volume, bar / safe, torch.zeros_like(bar))
    if virial_bar is not None:
        strain = strain - virial_bar.view(frames, 3, 3).to(vec.dtype)
    strain = 0.5 * (strain + strain.transpose(-1, -2))
    frame = frame_index(data)[0].index_select(0, center)
    return dvec + torch.bmm(vec.unsqueeze(1), strain.index_select(0, frame)).squeeze(1)


class FusedLossGradient:
    """Loss gradients of one SUS2 model by the fused kernels (CPU, float32 or float64).

    ``outputs(call, batch)`` evaluates the model (``call``, e.g. the training module's forward)
    with the inference kernels and returns its output dict detached, with the total and
    per-atom energies, forces, stresses and virials as fresh leaves (a loss may read any of
    them; other outputs carry no gradient); ``backward(loss, outputs)`` then accumulates
    ``dloss/dparam`` into the parameters' ``.grad`` as ``loss.backward()`` would on the PyTorch
    path. The model's kernel modules are swapped in once (same parameters and state dict; in
    train mode they run the PyTorch path, in eval mode, e.g. validation, the kernels).
    """

    def __init__(self, model: torch.nn.Module):
        net = _sus2_network(model)
        if not isinstance(net._modules["moments"], FusedMomentContraction):
            enable_fused_moments(model)
        self.model = model
        mods = net._modules
        self.core = mods.get("repulsive_core")
        self.moments = mods["moments"]
        self.scaling, self.basis, self.embedding = self.moments._sources
        self.readout = mods["readout"]
        self.scale_shift = mods.get("per_type_energy_scale_shift")

    def outputs(self, call, batch: AtomicDataDict.Type) -> AtomicDataDict.Type:
        """``call(batch)`` in eval mode (the kernels), outputs detached as leaves with grad."""
        if self.scaling.alpha.device.type != "cpu":
            raise ValueError("fused training runs on CPU only; set trainer.accelerator: cpu")
        was_training = self.model.training
        self.model.eval()
        try:
            out = call(batch)
        finally:
            self.model.train(was_training)
        out = {k: v.detach() if torch.is_tensor(v) else v for k, v in out.items()}
        for key in OUTPUTS:
            if key in out:
                out[key].requires_grad_(True)
        return out

    def backward(self, loss: torch.Tensor, out: AtomicDataDict.Type) -> None:
        """Add ``dloss/dparam`` to the parameters' ``.grad`` (``out`` from :meth:`outputs`)."""
        self.loss_objective(loss, out).backward()

    def loss_objective(self, loss: torch.Tensor, out: AtomicDataDict.Type) -> torch.Tensor:
        """:meth:`objective` for the cotangents of ``loss`` (a function of ``out``'s leaves):
        its parameter gradient is ``dloss/dparam``."""
        keys = [k for k in OUTPUTS if k in out]
        grads = torch.autograd.grad(loss, [out[k] for k in keys], allow_unused=True)
        return self.objective(out, dict(zip(keys, grads, strict=True)))

    def objective(self, out: AtomicDataDict.Type, bars: dict) -> torch.Tensor:
        r""":math:`\Phi = \sum_i \bar e_i E_i + \dot E` with a graph to the parameters, for
        the cotangents ``bars`` (output key -> dL/doutput, ``None`` where unused)."""
        data = {
            k: out[k].detach()
            for k in (
                AtomicDataDict.POSITIONS_KEY,
                AtomicDataDict.EDGE_INDEX_KEY,
                AtomicDataDict.ATOM_TYPE_KEY,
                AtomicDataDict.CELL_KEY,
                AtomicDataDict.EDGE_CELL_SHIFT_KEY,
                AtomicDataDict.BATCH_KEY,
                AtomicDataDict.NUM_NODES_KEY,
            )
            if k in out
        }
        dtype = self.scaling.alpha.dtype
        vec = with_edge_vectors_(dict(data))[AtomicDataDict.EDGE_VECTORS_KEY].to(dtype)
        dvec = edge_tangents(data, vec, bars.get(_FORCES), bars.get(_STRESS), bars.get(_VIRIAL))
        if self.core is not None:
            vec, dvec = torch.func.jvp(lambda v: self._floored(data, v), (vec,), (dvec,))
        types = data[AtomicDataDict.ATOM_TYPE_KEY].view(-1)
        center, neighbor = data[AtomicDataDict.EDGE_INDEX_KEY]
        alpha = self.scaling.alpha
        basic, basic_dot = torch.ops.sus2.basic_moments_jvp(
            vec.contiguous(),
            dvec.contiguous(),
            center,
            neighbor,
            types,
            alpha.reshape(alpha.shape[0], -1),
            self.scaling.r0.reshape(alpha.shape[0], -1),
            self.embedding.coeffs,
            self.embedding.eta_of_mu,
            self.embedding.weights,
            self.moments.basic_table,
            self.basis.r_max,
            self.basis.radial_scaling,
            types.shape[0],
        )
        mom = self.moments
        basis, basis_dot = torch.ops.sus2.contract_jvp(
            basic, basic_dot, mom.times_p, mom.times_q, mom.times_m, mom.times_o, mom.mapping,
            mom.num_slots,
        )  # fmt: skip
        x = self._readout(basis)
        x_dot = self._readout(basis_dot)
        energy = self._scale_shift(types, x)
        energy_dot = self._scale_shift(types, x_dot) - self._scale_shift(
            types, torch.zeros_like(x_dot)
        )
        seed = torch.zeros_like(energy)
        e_bar = bars.get(_ENERGY)
        if e_bar is not None:
            frame = frame_index(data)[0]
            seed = seed + e_bar.view(-1).to(seed.dtype).index_select(0, frame)
        if bars.get(_ATOM_ENERGY) is not None:
            seed = seed + bars[_ATOM_ENERGY].view(-1).to(seed.dtype)
        return (seed * energy).sum() + energy_dot.sum()

    def _readout(self, basis: torch.Tensor) -> torch.Tensor:
        # the plain readout's forward (a folded FusedReadout skips its work in eval mode)
        data = LinearReadout.forward(self.readout, {self.readout.in_field: basis})
        return data[self.readout.out_field].view(-1)

    def _scale_shift(self, types: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.scale_shift is None:
            return x.to(torch.float64)
        mod = self.scale_shift
        data = {AtomicDataDict.ATOM_TYPE_KEY: types, mod.field: x.view(-1, 1)}
        return mod.forward(data)[mod.out_field].view(-1)

    def _floored(self, data: AtomicDataDict.Type, vec: torch.Tensor) -> torch.Tensor:
        """The edge vectors the learned part sees under the repulsive core."""
        d = {
            AtomicDataDict.EDGE_INDEX_KEY: data[AtomicDataDict.EDGE_INDEX_KEY],
            AtomicDataDict.ATOM_TYPE_KEY: data[AtomicDataDict.ATOM_TYPE_KEY],
            AtomicDataDict.EDGE_VECTORS_KEY: vec,
            AtomicDataDict.EDGE_LENGTH_KEY: torch.linalg.norm(vec, dim=-1, keepdim=True),
        }
        return self.core.forward(d)[AtomicDataDict.EDGE_VECTORS_KEY]
