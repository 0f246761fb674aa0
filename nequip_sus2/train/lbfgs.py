r"""Full-batch L-BFGS training (the original SUS2/MTP optimiser) as a NequIP training module.

The original code minimises the loss over the *whole* training set with BFGS. Here one Lightning
training step is one iteration of ``torch.optim.LBFGS`` with a strong-Wolfe line search, and
each function evaluation (the closure) is the loss of NequIP's ``loss:`` block over the whole
training set and its gradient, accumulated mini-batch by mini-batch (memory bounded by one
batch). Every loss term of a ``MetricsManager`` is a mean over its rows (``MeanSquaredError``,
``MeanAbsoluteError``, the site-energy regularisers, ...), so the full-set loss is

.. math::

    L = \sum_t c_t \frac{1}{N_t} \sum_b S_{t,b}, \qquad S_{t,b} = n_{t,b}\, v_{t,b}

with ``c_t`` the normalised coefficient of term ``t`` (per-type terms: one leaf per type, with
weight ``c_t/T``), ``v_{t,b}`` its value on batch ``b`` over ``n_{t,b}`` rows and ``N_t`` its
rows in the set (counted once per run). Each batch's ``sum_t c_t S_{t,b}/N_t`` is
back-propagated at once; ``L`` and its gradient are then exactly the loss of the concatenated
batch and its gradient. Under DDP every rank sums over its own share of the structures (rank
``r`` of ``W`` takes structures ``r, r + W, ...``, no padding) and one ``all_reduce`` sums ``L``
and the gradient over the ranks.

Lightning's epoch: the module sets ``trainer.limit_train_batches = 1``, so an epoch is one
training step, i.e. one L-BFGS iteration; validation, checkpoints, ``EarlyStopping`` and
``max_time`` work per iteration (the batch Lightning hands to ``training_step`` is not used).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from nequip.data.stats import _MeanX
from nequip.train import NequIPLightningModule
from nequip.train.metrics import RootMeanSquaredError
from nequip.utils import RankedLogger
from torch.utils.data import DataLoader, Subset
from torchmetrics import Metric

from .guards import NonFiniteLossError

logger = RankedLogger(__name__, rank_zero_only=True)

__all__ = ["FullBatchLBFGSLightningModule", "LossTerm", "loss_terms"]

#: ``torch.optim.LBFGS`` settings used for keys the ``optimizer:`` block does not set. One
#: iteration per training step; the tolerances are off (a loss near 1e-6 eV^2 would otherwise
#: stop too early): the module stops the run when even a steepest-descent step finds no
#: decrease.
DEFAULT_LBFGS = {
    "_target_": "torch.optim.LBFGS",
    "lr": 1.0,
    "max_iter": 1,
    "history_size": 100,
    "line_search_fn": "strong_wolfe",
    "tolerance_grad": 0.0,
    "tolerance_change": 0.0,
}
#: function evaluations allowed per iteration when ``max_eval`` is not set (torch's default,
#: ``1.25 max_iter``, leaves the line search no second evaluation at ``max_iter: 1``)
EVALS_PER_ITERATION = 25

_CKPT_KEY = "nequip_sus2_full_batch_lbfgs"


@dataclass(frozen=True)
class LossTerm:
    """One mean-type metric of the loss: its key in the ``MetricsManager`` output, the metric
    (holding the running ``sum`` and ``count``) and its weight in the weighted sum."""

    key: str
    metric: _MeanX
    coeff: float


def loss_terms(loss) -> list[LossTerm]:
    """The leaves of a loss ``MetricsManager`` with their weights in ``weighted_sum``; refuses
    terms whose full-set value is not the mean of per-batch row sums (RMSE, ``reduction:
    sum``, maxima, ...), for which the mini-batch accumulation would not be exact."""
    terms = []
    for name, entry in loss.entries.items():
        if entry.coeff is None:
            continue  # monitored, not part of the loss
        leaves = [(name, loss[name], 1.0)]
        if entry.per_type:
            type_coeffs = entry.per_type_coeffs or [1.0] * len(loss.type_names)
            total = sum(type_coeffs)
            leaves = [
                (f"{name}_{type_name}", loss[name][k], type_coeffs[k] / total)
                for k, type_name in enumerate(loss.type_names)
            ]
        for key, metric, factor in leaves:
            mean_type = isinstance(metric, _MeanX) and not isinstance(metric, RootMeanSquaredError)
            if not mean_type or getattr(metric, "reduction", "mean") != "mean":
                raise ValueError(
                    f"full-batch L-BFGS: the loss term `{name}` ({type(metric).__name__}) is not a "
                    "mean over rows; use mean-type metrics (MeanSquaredError, MeanAbsoluteError, "
                    "HuberLoss with reduction 'mean', the site-energy regularisers)"
                )
            terms.append(LossTerm(key, metric, float(entry.coeff) * factor))
    if not terms:
        raise ValueError("full-batch L-BFGS: the loss has no term with a coefficient")
    return terms


@dataclass
class _Evaluation:
    """Loss and gradient at one point (the closure's cache and the step's logged values)."""

    params: torch.Tensor
    loss: torch.Tensor
    grad: torch.Tensor
    logs: dict[str, torch.Tensor]


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    if _world()[1] > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def shard_indices(num_structures: int, rank: int, world_size: int) -> range:
    """The structures rank ``rank`` of ``world_size`` sums over: ``rank, rank + W, ...`` (a
    partition of the set, unlike ``DistributedSampler``, which pads with repeated structures)."""
    return range(rank, num_structures, world_size)


class FullBatchLBFGSLightningModule(NequIPLightningModule):
    """NequIP training module minimising the loss over the whole training set with L-BFGS.

    One training step (and one Lightning epoch) is one iteration of ``torch.optim.LBFGS`` with a
    strong-Wolfe line search; every function evaluation sums the ``loss:`` and its gradient over
    all training batches, normalised like the mean loss over the set, and over DDP ranks. The
    ``optimizer:`` block configures L-BFGS (missing keys from :data:`DEFAULT_LBFGS`):

    .. code-block:: yaml

      training_module:
        _target_: nequip_sus2.train.FullBatchLBFGSLightningModule
        optimizer:
          _target_: torch.optim.LBFGS
          history_size: 200    # pairs kept for the inverse-Hessian approximation
          max_iter: 1          # L-BFGS iterations per training step (epoch)
          max_eval: 25         # function evaluations per step (line search included)
        batch_size: 16         # structures per mini-batch of a full-set evaluation
        loss: ...              # any MetricsManager of mean-type terms
        model: ...

    When the parameters change between steps by something else than L-BFGS (``LinearPrefit``
    re-solving the readout, a user callback) the L-BFGS history is dropped, since its curvature
    pairs no longer describe the path. A step that finds no decrease drops the history too; if a
    steepest-descent step finds none either, training stops (converged). ``lr_scheduler`` and
    EMA are not used: the line search chooses the step.

    Logged: NequIP's ``train_loss_step/*`` and ``train_loss_epoch/*`` (the full-set loss at the
    start of the step; ``train_metric_*`` likewise), ``lbfgs/evaluations`` (full-set function
    evaluations so far), ``lbfgs/step_size`` and ``lbfgs/history``; the progress bar shows the
    loss and the evaluations.

    Args:
        batch_size (int): structures per mini-batch of a full-set evaluation (default: the
            training dataloader's ``batch_size``); memory grows with it, the result does not
        cache_batches (bool): keep the collated training batches (neighbour lists included) in
            memory after the first evaluation instead of rebuilding them for every evaluation
            (default ``True``; the memory of the batched training set)
        fused_training (bool): evaluate the full-set loss and its gradient with the fused CPU
            kernels (:mod:`nequip_sus2.kernels.training`; the same gradient to rounding, several
            times faster). SUS2 models on CPU only; validation then runs on the kernels too
        precondition (bool): run L-BFGS on ``q = p / d`` with ``d = diag(G)^(-1/2)``, ``G`` the
            Gauss-Newton matrix of the loss (estimated once, at the first iteration, from
            ``precondition_samples`` random projections; docs/theory.md §4.7), so that parameter
            blocks of very different curvature (scaling, radial coefficients, readout) start
            on one scale (default ``False``)
        precondition_samples (int): random projections of the estimate (each costs about one
            full-set evaluation; default 4)
        scaling_prior (float): adds ``scaling_prior * P`` to the loss, ``P`` the squared
            departure of the trainable pair scaling (alpha, r0) from its values at the start of
            training (:func:`nequip_sus2.nn.scaling.pair_scaling_prior`, docs/theory.md §4.8):
            pairs that few training structures see stay near their start (default 0, off)
        other arguments: as :class:`nequip.train.NequIPLightningModule`
    """

    def __init__(
        self,
        model: dict,
        num_datasets: dict[str, int],
        optimizer: dict | None = None,
        lr_scheduler: dict | None = None,
        loss: dict | None = None,
        train_metrics: dict | None = None,
        val_metrics: dict | None = None,
        test_metrics: dict | None = None,
        info_dict: dict | None = None,
        batch_size: int | None = None,
        cache_batches: bool = True,
        fused_training: bool = False,
        precondition: bool = False,
        precondition_samples: int = 4,
        scaling_prior: float = 0.0,
    ):
        if lr_scheduler is not None:
            raise ValueError(
                "FullBatchLBFGSLightningModule: `lr_scheduler` is not used with L-BFGS (the line "
                "search chooses the step); remove it from the config"
            )
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or null, got {batch_size}")
        if scaling_prior < 0:
            raise ValueError(f"scaling_prior must be >= 0, got {scaling_prior}")
        super().__init__(
            model=model,
            num_datasets=num_datasets,
            optimizer=lbfgs_settings(optimizer),
            loss=loss,
            train_metrics=train_metrics,
            val_metrics=val_metrics,
            test_metrics=test_metrics,
            info_dict=info_dict,
        )
        self.automatic_optimization = False
        self.full_batch_size = batch_size
        self.cache_batches = cache_batches
        self.fused_training = fused_training
        self._fused = None  # the fused path, set up at the first evaluation
        self.precondition = precondition
        self.precondition_samples = precondition_samples
        self._scale: torch.Tensor | None = None  # d (flat), powers of two
        self.scaling_prior = scaling_prior
        # (alpha, r0) of every trainable scaling block where training started (checkpointed)
        self._scaling_reference: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._terms: list[LossTerm] | None = None
        self._weights: torch.Tensor | None = None  # c_t / N_t
        self._batch_cache: list | None = None
        self._last: _Evaluation | None = None
        self._step_evaluations: list[_Evaluation] = []
        self._params_after_step: torch.Tensor | None = None
        self._epoch_logs: dict[str, torch.Tensor] = {}
        self.evaluations = 0  # full-set function evaluations (checkpointed)

    # ------------------------------------------------------------------------------------------
    # Lightning set-up
    # ------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        limit = self.trainer.limit_train_batches
        if limit != 1:
            logger.info(
                "FullBatchLBFGSLightningModule: setting trainer.limit_train_batches = 1 (was "
                f"{limit}): one epoch is one L-BFGS iteration over the whole training set"
            )
        self.trainer.limit_train_batches = 1

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        if not isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError(
                f"FullBatchLBFGSLightningModule needs torch.optim.LBFGS, got {type(optimizer)}"
            )
        if optimizer.param_groups[0]["line_search_fn"] != "strong_wolfe":
            raise ValueError("FullBatchLBFGSLightningModule: set line_search_fn: strong_wolfe")
        return optimizer

    def on_train_start(self) -> None:
        # the current parameters are where the (possibly restored) L-BFGS state ends
        self._params_after_step = _flat(self._params())
        self._batch_cache, self._last, self._weights = None, None, None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[_CKPT_KEY] = {
            "evaluations": self.evaluations,
            "scale": self._scale,
            "scaling_reference": self._scaling_reference,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(_CKPT_KEY, {})
        self.evaluations = int(state.get("evaluations", 0))
        self._scale = state.get("scale")
        self._scaling_reference = state.get("scaling_reference")

    # ------------------------------------------------------------------------------------------
    # the full-set loss and gradient
    # ------------------------------------------------------------------------------------------

    def _params(self) -> list[torch.nn.Parameter]:
        return list(self.optimizers().optimizer.param_groups[0]["params"])

    def training_batches(self):
        """This rank's share of the training set in a fixed order, on the module's device."""
        if self._batch_cache is not None:
            return self._batch_cache
        loader = self.trainer.train_dataloader
        rank, world = _world()
        dataset = loader.dataset
        subset = Subset(dataset, shard_indices(len(dataset), rank, world))
        batch_size = self.full_batch_size or loader.batch_size or 1
        full = DataLoader(
            subset, batch_size=batch_size, shuffle=False, collate_fn=loader.collate_fn
        )
        batches = (self.trainer.strategy.batch_to_device(b) for b in full)
        if not self.cache_batches:
            return batches
        self._batch_cache = list(batches)
        return self._batch_cache

    @contextlib.contextmanager
    def _local_metrics(self):
        """No cross-rank sync in the metrics' per-batch values (the sums are reduced once at the
        end) and no gradient all-reduce by a ``DistributedDataParallel`` wrapper."""
        metrics = [m for m in self.loss.modules() if isinstance(m, Metric)]
        saved = [m.dist_sync_on_step for m in metrics]
        wrapper = getattr(self._trainer, "strategy", None)
        wrapper = getattr(wrapper, "model", None)
        no_sync = wrapper.no_sync() if hasattr(wrapper, "no_sync") else contextlib.nullcontext()
        try:
            for m in metrics:
                m.dist_sync_on_step = False
            with no_sync:
                yield
        finally:
            for m, s in zip(metrics, saved, strict=True):
                m.dist_sync_on_step = s

    def _term_weights(self, batches) -> torch.Tensor:
        """``c_t / N_t`` per loss term, ``N_t`` the rows of term ``t`` in the training set (one
        forward pass over the set, summed over ranks)."""
        terms = self._terms = loss_terms(self.loss)
        self.loss.reset()
        with self._local_metrics():
            for k, batch in enumerate(batches):
                output = self._outputs(batch)
                with torch.no_grad():
                    self.loss(output, self.process_target(batch, k))
        counts = torch.stack([t.metric.count.to(torch.float64) for t in terms])
        counts = _sum_over_ranks(counts.to(self.device))
        self.loss.reset()
        empty = [t.key for t, n in zip(terms, counts.tolist(), strict=True) if n == 0]
        if empty:
            raise ValueError(f"full-batch L-BFGS: no training rows for loss term(s) {empty}")
        coeffs = torch.tensor([t.coeff for t in terms], dtype=torch.float64, device=self.device)
        return coeffs / counts

    def _outputs(self, batch):
        """The model's outputs for ``batch`` (the fused kernels' with ``fused_training``; the
        kernel modules are swapped in here, not when the module is built, so that a model
        loaded from the checkpoint is the plain one)."""
        if self.fused_training and self._fused is None:
            from ..kernels.training import FusedLossGradient

            self._fused = FusedLossGradient(self.model)
        if self._fused is not None:
            return self._fused.outputs(self, batch)
        return self(batch)

    def full_batch_loss(self, batches=None, backward: bool = True, weights=None) -> torch.Tensor:
        """The loss of this rank's batches (default :meth:`training_batches`), normalised by the
        row counts of the whole set (``weights``: ``c_t / N_t``, default counted once), and with
        ``backward`` its gradient accumulated into ``.grad``. Without reduction over ranks."""
        batches = self.training_batches() if batches is None else batches
        if weights is None:
            if self._weights is None:
                self._weights = self._term_weights(batches)
            weights = self._weights
        terms = self._terms if self._terms is not None else loss_terms(self.loss)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss.reset()
        if self.train_metrics is not None:
            self.train_metrics.reset()
        with self._local_metrics():
            for k, batch in enumerate(batches):
                target = self.process_target(batch, k)
                output = self._outputs(batch)
                before = [t.metric.count.clone() for t in terms]
                values = self.loss(output, target)
                part = torch.zeros((), dtype=torch.float64, device=self.device)
                for term, n0, w in zip(terms, before, weights, strict=True):
                    rows = term.metric.count - n0
                    if rows > 0:
                        part = part + w * rows * values[term.key].to(torch.float64)
                if backward:
                    self._backward(part, output)
                total += part.detach()
                if self.train_metrics is not None:
                    with torch.no_grad():
                        self.train_metrics(output, target)
        return total

    def _evaluate(self, key: torch.Tensor) -> _Evaluation:
        """One full-set evaluation at the current parameters (cached under ``key``): loss and
        gradient summed over ranks, with the logged values (NequIP's epoch computation of the
        same accumulated metrics)."""
        params = self._params()
        for p in params:
            p.grad = None
        loss = self.full_batch_loss()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        flat = _sum_over_ranks(torch.cat([_flat(grads), loss.view(1).to(grads[0].dtype)]))
        grad, loss = flat[:-1], flat[-1].to(torch.float64)
        d = self.logging_delimiter
        logs = self.loss.compute(prefix=f"train_loss_step{d}")
        if self.scaling_prior > 0:
            prior = self.scaling_prior * self._pair_scaling_prior()
            if prior.requires_grad:
                grads = [torch.zeros_like(p) for p in params]
                trained = [k for k, p in enumerate(params) if p.requires_grad]
                found = torch.autograd.grad(prior, [params[k] for k in trained], allow_unused=True)
                for k, g in zip(trained, found, strict=True):
                    if g is not None:
                        grads[k] = g
                grad = grad + _flat(grads).to(grad.dtype)
            loss = loss + prior.detach().to(torch.float64)
            logs[f"train_loss_step{d}scaling_prior"] = prior.detach()
        if self.train_metrics is not None:
            logs.update(self.train_metrics.compute(prefix=f"train_metric_step{d}"))
        self.evaluations += 1
        return _Evaluation(key, loss, grad, {k: v.detach() for k, v in logs.items()})

    def _pair_scaling_prior(self) -> torch.Tensor:
        """``P`` summed over the model's trainable scaling blocks; the reference is taken at the
        first call of a run (and restored from the checkpoint on resume)."""
        from ..nn.scaling import UniversalPairScaling, pair_scaling_prior

        blocks = [
            m
            for m in self.model.modules()
            if isinstance(m, UniversalPairScaling) and m.alpha.requires_grad
        ]
        if self._scaling_reference is None:
            self._scaling_reference = [
                (m.alpha.detach().clone(), m.r0.detach().clone()) for m in blocks
            ]
        value = torch.zeros((), dtype=torch.float64, device=self.device)
        for m, (alpha, r0) in zip(blocks, self._scaling_reference, strict=True):
            value = value + pair_scaling_prior(m, alpha.to(m.alpha), r0.to(m.r0)).to(value.dtype)
        return value

    def _closure(self) -> torch.Tensor:
        """L-BFGS's closure: the full-set loss, gradient in ``.grad``. A point already evaluated
        (the line search's accepted point is where the next iteration starts) is not recomputed."""
        params = self._params()
        here = _flat(params)  # q = p / d when preconditioned
        if self._last is None or not torch.equal(self._last.params, here):
            if self._scale is None:
                self._last = self._evaluate(here)
            else:
                self._rescale(params, to_q=False)
                try:
                    ev = self._evaluate(here)
                finally:
                    self._rescale(params, to_q=True)
                ev.grad = ev.grad * self._scale.to(ev.grad.dtype)  # dL/dq = d dL/dp
                self._last = ev
        ev = self._last
        offset = 0
        for p in params:
            p.grad = ev.grad[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        self._step_evaluations.append(ev)
        return ev.loss.to(here.dtype)

    # ------------------------------------------------------------------------------------------
    # diagonal Gauss-Newton preconditioning
    # ------------------------------------------------------------------------------------------

    def _rescale(self, params, to_q: bool) -> None:
        """``q = p / d`` (``to_q``) or ``p = q d`` in place (exact: ``d`` are powers of two)."""
        offset = 0
        with torch.no_grad():
            for p in params:
                d = self._scale[offset : offset + p.numel()].view_as(p).to(p.dtype)
                p.div_(d) if to_q else p.mul_(d)
                offset += p.numel()

    def _backward(self, value: torch.Tensor, output) -> None:
        """``dvalue/dparam`` into ``.grad`` for a loss-like ``value`` of ``output`` (the fused
        path's reverse pass, or autograd)."""
        if self._fused is not None:
            self._fused.backward(value, output)
        else:
            value.backward()

    def gauss_newton_scale(self) -> torch.Tensor:
        """``d = 2^round(log2(g^(-1/2)))`` per parameter, ``g`` the diagonal of the loss's
        Gauss-Newton matrix ``sum_t 2 w_t J_t^T J_t`` (docs/theory.md §4.7) by Hutchinson's
        estimate: for random signs ``z`` on every row of every mean-square loss term,
        ``E[(sum_t sqrt(2 w_t) J_t^T z_t)^2] = g``; each sample is one backward pass over the
        training set (summed over ranks)."""
        params = self._params()
        batches = self.training_batches()
        if self._weights is None:
            self._weights = self._term_weights(batches)
        # per loss entry: the sum of its leaves' weights c_t / N_t
        entry_weight: dict[str, float] = {}
        for term, w in zip(self._terms, self._weights.tolist(), strict=True):
            # a per-type leaf is ``{entry}_{type}``
            name = max((n for n in self.loss.entries if term.key.startswith(n)), key=len)
            entry_weight[name] = entry_weight.get(name, 0.0) + w
        diag = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
        # independent signs on every rank (the estimate, not the training, depends on the ranks)
        gen = torch.Generator().manual_seed(_world()[0])
        for _ in range(self.precondition_samples):
            for p in params:
                p.grad = None
            with self._local_metrics():
                for k, batch in enumerate(batches):
                    target = self.process_target(batch, k)
                    output = self._outputs(batch)
                    value = torch.zeros((), dtype=torch.float64)
                    for name, w in entry_weight.items():
                        field = self.loss.entries[name].field
                        if field is None:
                            continue  # whole-dict terms (regularisers): not in the estimate
                        pred, ref = field(output, target)
                        z = torch.randint(0, 2, pred.shape, generator=gen).to(pred.dtype) * 2 - 1
                        z = torch.where(torch.isfinite(ref), z, torch.zeros_like(z))
                        value = value + (2 * w) ** 0.5 * (z * pred).sum().to(torch.float64)
                    self._backward(value, output)
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
            g = _sum_over_ranks(_flat(grads).to(torch.float64))
            diag += g.cpu().square()
        for p in params:
            p.grad = None
        diag = diag / self.precondition_samples
        floor = 1e-3 * float(diag.mean()) if float(diag.mean()) > 0 else 1.0
        scale = torch.exp2(torch.round(-0.5 * torch.log2(diag.clamp(min=floor))))
        logger.info(
            f"L-BFGS preconditioning: parameter scales 2^{int(torch.log2(scale).min())} .. "
            f"2^{int(torch.log2(scale).max())} from {self.precondition_samples} samples"
        )
        return scale.to(self.device)

    # ------------------------------------------------------------------------------------------
    # one training step = one L-BFGS iteration
    # ------------------------------------------------------------------------------------------

    def training_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        """One L-BFGS iteration over the whole training set (``batch`` is not used)."""
        opt = self.optimizers()
        optimizer = opt.optimizer
        params = self._params()
        start = _flat(params)
        if self._params_after_step is not None and not torch.equal(start, self._params_after_step):
            reset_history(optimizer)
            logger.info(
                f"L-BFGS (epoch {self.current_epoch}): the parameters changed outside L-BFGS "
                "(e.g. LinearPrefit): history reset"
            )
        if self.precondition and self._scale is None:
            self._scale = self.gauss_newton_scale()
            self._last = None
            reset_history(optimizer)
        had_history = bool(lbfgs_state(optimizer).get("old_dirs"))
        self._step_evaluations = []
        evaluations_before = self.evaluations
        if self._scale is not None:
            self._rescale(params, to_q=True)
        try:
            opt.step(closure=self._closure)
        finally:
            if self._scale is not None:
                self._rescale(params, to_q=False)
        first = self._step_evaluations[0]
        if not math.isfinite(float(first.loss)):
            raise NonFiniteLossError(
                f"the full-batch training loss is {float(first.loss)} at epoch "
                f"{self.current_epoch}, step {self.global_step}. Usual causes: a nan/inf label "
                "or position in the training data, or a structure with atoms far too close"
            )
        end = _flat(params)
        if not bool(torch.isfinite(end).all()):
            raise NonFiniteLossError(
                f"L-BFGS produced non-finite parameters at epoch {self.current_epoch}"
            )
        if torch.equal(end, start):
            if had_history:
                reset_history(optimizer)
                logger.info(f"L-BFGS (epoch {self.current_epoch}): no decrease, history reset")
            else:
                logger.info(
                    f"L-BFGS (epoch {self.current_epoch}): no decrease along the steepest "
                    f"descent either (loss {float(first.loss):.6g}): converged, stopping"
                )
                self.trainer.should_stop = True
        self._params_after_step = end

        state = lbfgs_state(optimizer)
        t = state.get("t", 0.0)
        self._epoch_logs = dict(first.logs)
        self.log_dict(first.logs)
        self.log("loss", first.loss, prog_bar=True, logger=False)
        self.log("evals", float(self.evaluations - evaluations_before), prog_bar=True, logger=False)
        self._epoch_logs.update(
            {
                "lbfgs/step_size": torch.as_tensor(float(t), dtype=torch.float64),
                "lbfgs/history": torch.tensor(float(len(state.get("old_dirs") or []))),
            }
        )
        return first.loss

    def on_train_epoch_end(self) -> None:
        """NequIP's epoch names for the full-set loss (and train metrics) at the step's start."""
        d = self.logging_delimiter
        logs = {}
        for key, value in self._epoch_logs.items():
            for stage in ("train_loss", "train_metric"):
                key = key.replace(f"{stage}_step{d}", f"{stage}_epoch{d}")
            logs[key] = value
        if logs:
            self.log_dict(logs)
        self.log("lbfgs/evaluations", float(self.evaluations), prog_bar=True)


def lbfgs_settings(optimizer: dict | None) -> dict:
    """The ``optimizer:`` block with :data:`DEFAULT_LBFGS` for the keys it does not set
    (``max_eval``: ``EVALS_PER_ITERATION * max_iter``)."""
    settings = {**DEFAULT_LBFGS, **(optimizer or {})}
    settings.setdefault("max_eval", EVALS_PER_ITERATION * int(settings["max_iter"]))
    return settings


def lbfgs_state(optimizer: torch.optim.LBFGS) -> dict:
    """L-BFGS's global state (torch keeps it under the first parameter)."""
    return optimizer.state[optimizer.param_groups[0]["params"][0]]


def reset_history(optimizer: torch.optim.LBFGS) -> None:
    """Drop the curvature pairs and the last direction: the next iteration starts with a
    (scaled) steepest-descent step. The evaluation counter is kept."""
    state = lbfgs_state(optimizer)
    func_evals = state.get("func_evals", 0)
    state.clear()
    state["func_evals"] = func_evals
