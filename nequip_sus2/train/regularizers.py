r"""Site-energy regularisers of the original SUS2/MTP training (docs/theory.md §4.2) as NequIP loss
terms.

Both are ``torchmetrics`` metrics that take the whole prediction and target ``AtomicDataDict``
(``field: null`` entries of a :class:`nequip.train.MetricsManager`), so they go into the
``loss:`` block next to the standard terms, e.g. through ``extra_metrics`` of
``nequip.train.EnergyForceStressLoss``:

.. code-block:: yaml

  loss:
    _target_: nequip.train.EnergyForceStressLoss
    per_atom_energy: true
    coeffs: {total_energy: 1.0, forces: 1.0, stress: 1.0}
    extra_metrics:
      - name: site_energy_spread
        coeff: 0.01
        metric: {_target_: nequip_sus2.train.SiteEnergySpread, force_scale: 1.0}
      - name: site_energy_centre
        coeff: 0.01
        metric: {_target_: nequip_sus2.train.SiteEnergyCentre}

Groups ``g`` are the (configuration, species) pairs of a batch; ``E_i`` are the predicted site
energies (``atomic_energy``), ``n_g`` the atoms in a group, ``N`` the atoms in the batch.

* :class:`SiteEnergySpread`: the force-weighted variance of the site energies within each group,
  averaged over atoms,

  .. math:: R_\mathrm{spread} = \frac{1}{N}\sum_g \sum_{i\in g} \tilde w_i (E_i - m_g)^2,
     \quad m_g = \frac{\sum_{i\in g} w_i E_i}{\sum_{i\in g} w_i},
     \quad \tilde w_i = \frac{n_g w_i}{\sum_{j\in g} w_j},
     \quad w_i = \frac{f_0^2}{f_0^2 + |F^\mathrm{ref}_i|^2}

  (``= sum_g n_g Var_w(g) / N``). Atoms under large reference forces sit in distorted, genuinely
  different environments, so their site energies are allowed to differ more (``f_0 =
  force_scale``; ``None``: all ``w_i = 1``, the plain variance). Single-atom groups add 0.
* :class:`SiteEnergyCentre`: the squared difference between the mean predicted site energy of
  each group and the configuration's reference energy per atom, averaged over atoms,

  .. math:: R_\mathrm{centre} = \frac{1}{N}\sum_g n_g
     \left(\frac{1}{n_g}\sum_{i\in g} E_i - \frac{E^\mathrm{ref}_{f(g)}}{N_{f(g)}}\right)^2

  Configurations without an energy label (NaN) are left out (their atoms count for neither
  sum).

Both values are in eV^2 and are accumulated over an epoch as atom-weighted means (like the
host's MSE metrics); the loss coefficients are normalised with the others by ``MetricsManager``.
"""

from __future__ import annotations

import torch
from nequip.data import AtomicDataDict
from nequip.data.stats import Mean

from ..data.frames import frame_index

__all__ = ["SiteEnergyCentre", "SiteEnergySpread"]


def _groups(preds: AtomicDataDict.Type) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Per atom: frame index and group index ``frame * C + type``; number of frames and C."""
    types = preds[AtomicDataDict.ATOM_TYPE_KEY].view(-1)
    frame, num_frames = frame_index(preds)
    num_types = int(types.max().item()) + 1 if types.numel() else 1
    return frame, frame * num_types + types, num_frames, num_types


def _group_sum(values: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    return values.new_zeros(num_groups).index_add(0, group, values)


class SiteEnergySpread(Mean):
    """Force-weighted spread of predicted site energies within each (configuration, species)
    group (see the module docstring). Use with ``field: null`` in a ``MetricsManager``.

    Args:
        force_scale (float): ``f_0`` in eV/A of the weights ``f_0^2/(f_0^2 + |F_ref|^2)``;
            ``None`` for unweighted variances (default 1.0)
    """

    def __init__(self, force_scale: float | None = 1.0, **kwargs):
        super().__init__(**kwargs)
        if force_scale is not None and not force_scale > 0:
            raise ValueError(f"force_scale must be positive or None, got {force_scale}")
        self.force_scale = force_scale

    def update(self, preds: AtomicDataDict.Type, target: AtomicDataDict.Type) -> None:
        """"""
        energy = preds[AtomicDataDict.PER_ATOM_ENERGY_KEY].view(-1).to(torch.float64)
        _, group, num_frames, num_types = _groups(preds)
        n = num_frames * num_types
        if self.force_scale is None or AtomicDataDict.FORCE_KEY not in target:
            w = torch.ones_like(energy)
        else:
            f2 = torch.nan_to_num(target[AtomicDataDict.FORCE_KEY].to(torch.float64))
            s2 = float(self.force_scale) ** 2
            w = s2 / (s2 + f2.square().sum(-1))
        w_sum = _group_sum(w, group, n)
        mean = _group_sum(w * energy, group, n) / w_sum.clamp_min(1e-300)
        count = _group_sum(torch.ones_like(w), group, n)
        w_tilde = w * (count / w_sum.clamp_min(1e-300)).index_select(0, group)
        super().update(w_tilde * (energy - mean.index_select(0, group)).square())

    def __str__(self) -> str:
        return "site_energy_spread"


class SiteEnergyCentre(Mean):
    """Squared deviation of the mean predicted site energy of each (configuration, species)
    group from the configuration's reference energy per atom (see the module docstring). Use
    with ``field: null`` in a ``MetricsManager``."""

    def update(self, preds: AtomicDataDict.Type, target: AtomicDataDict.Type) -> None:
        """"""
        energy = preds[AtomicDataDict.PER_ATOM_ENERGY_KEY].view(-1).to(torch.float64)
        frame, group, num_frames, num_types = _groups(preds)
        n = num_frames * num_types
        ref = target[AtomicDataDict.TOTAL_ENERGY_KEY].view(-1).to(torch.float64)
        atoms_per_frame = torch.bincount(frame, minlength=num_frames).to(torch.float64)
        ref_per_atom = ref / atoms_per_frame.clamp_min(1.0)
        count = _group_sum(torch.ones_like(energy), group, n)
        mean = _group_sum(energy, group, n) / count.clamp_min(1.0)
        dev = mean.index_select(0, group) - ref_per_atom.index_select(0, frame)
        keep = ~torch.isnan(ref_per_atom.index_select(0, frame))
        super().update(dev[keep].square())

    def __str__(self) -> str:
        return "site_energy_centre"
