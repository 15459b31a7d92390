"""One optimizer step, the numerical heart of training (used by the trainer and the benchmark).

The step's ``--batch_size`` windows run as ``--accumulation_steps`` micro-batches. The loss is the
mean over every target token of the step on every process: each micro-batch backpropagates its
summed loss divided by the step's total target count (counted before the first backward), so
micro-batches with more targets weigh more, exactly as in one large batch. Under FSDP gradients
are reduced only after the last micro-batch. Loss and gradients are checked before the update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llama3.loss import IGNORE_INDEX, lm_loss_sum
from llama3.runtime import Precision
from llama3.training.diagnostics import gradient_norms
from llama3.training.distributed import Distributed
from llama3.training.guard import check_finite
from llama3.training.optim import clip_gradients, set_lr, total_grad_norm
from llama3.training.parallel import set_gradient_sync


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean cross entropy over all targets of the step (all processes)
    grad_norm: float  # before clipping
    stop_requested: bool  # some process asked to stop after this step
    skipped: bool = False  # fp16 gradient overflow: the scaler skipped the update
    grad_norms: dict[str, float] | None = None  # per parameter role, when asked (diagnostics)


class TrainStep:
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        precision: Precision,
        dist: Distributed,
        *,
        accumulation_steps: int = 1,
        max_norm: float = 0.0,
    ):
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.precision, self.dist = precision, dist
        self.accumulation_steps, self.max_norm = accumulation_steps, max_norm

    def __call__(
        self,
        inputs: Tensor,
        targets: Tensor,
        *,
        lr: float,
        step: int,
        stop_requested: bool = False,
        grad_norms: bool = False,
    ) -> StepResult:
        """Train on (inputs, targets) (B, S) at learning rate ``lr``; ``step`` (1-based) names the
        step in errors; ``grad_norms`` adds each parameter role's gradient norm to the result.
        Raises NonFiniteError before updating if loss or gradients are not finite."""
        loss, stop = self._forward_backward(inputs, targets, stop_requested)
        self.scaler.unscale_(self.optimizer)
        roles = gradient_norms(self.model) if grad_norms else None
        norm = total_grad_norm(self.model.parameters())
        loss_value, stop_votes, grad_norm = torch.stack([loss, stop, norm.double()]).tolist()
        check_finite(
            step,
            loss_value,
            grad_norm,
            self.model,
            self.dist,
            overflow_expected=self.scaler.is_enabled(),
        )
        skipped = self._update(norm, grad_norm, lr)
        return StepResult(loss_value, grad_norm, stop_votes > 0, skipped, roles)

    def _forward_backward(
        self, inputs: Tensor, targets: Tensor, stop_requested: bool
    ) -> tuple[Tensor, Tensor]:
        """Accumulate gradients of all micro-batches; returns the step's mean loss and the number
        of processes that asked to stop (both as device scalars, combined over processes)."""
        dist, device, model = self.dist, self.dist.device, self.model
        n_targets = dist.all_reduce_sum((targets != IGNORE_INDEX).sum().to(device)).clamp(min=1)
        grad_scale = dist.world_size / n_targets  # FSDP averages gradients over processes
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        model.train()
        micro_batches = list(
            zip(inputs.chunk(self.accumulation_steps), targets.chunk(self.accumulation_steps))
        )
        for i, (x, y) in enumerate(micro_batches):
            set_gradient_sync(model, i == len(micro_batches) - 1)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with self.precision.autocast(device):
                logits = model(x)  # (b, S, vocab)
            loss, _ = lm_loss_sum(logits, y)
            self.scaler.scale(loss * grad_scale).backward()
            loss_sum += loss.detach().double()
        stop = torch.tensor(float(stop_requested), dtype=torch.float64, device=device)
        totals = dist.all_reduce_sum(torch.stack([loss_sum, stop]))
        return totals[0] / n_targets, totals[1]

    def _update(self, norm: Tensor, grad_norm: float, lr: float) -> bool:
        """Clip, step at ``lr``, clear gradients; returns whether the scaler skipped the update."""
        if self.max_norm > 0 and math.isfinite(grad_norm):
            clip_gradients(self.model.parameters(), self.max_norm, norm)
        set_lr(self.optimizer, lr)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return scale is not None and self.scaler.get_scale() < scale
