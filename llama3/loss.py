"""The language-model loss: next-token cross entropy, summed for training steps and averaged over
fixed batches for evaluation (training's periodic evaluation, ``evaluate``, ``deploy``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama3.runtime import Precision

IGNORE_INDEX = -100  # target value that contributes no loss (padding)


def lm_loss_sum(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Summed next-token cross entropy (fp32) and the number of counted targets.

    Returning the sum, not the mean, lets callers average over every token of an accumulated batch.
    """
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (targets != IGNORE_INDEX).sum()


@dataclass
class EvalResult:
    loss: float  # mean cross entropy per target token, nats
    tokens: int  # target tokens counted
    batches: int

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device,
                  precision: Precision = Precision(),
                  all_reduce: Callable[[Tensor], None] | None = None) -> EvalResult:
    """Mean loss of ``model`` over (inputs, targets) batches; restores the model's train/eval mode.

    With several processes each evaluates its own batches and ``all_reduce`` (an in-place sum over
    ranks) combines the totals, so every rank returns the global mean.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    n_batches = 0
    for inputs, targets in batches:
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with precision.autocast(device):
            logits = model(inputs)
        loss, n = lm_loss_sum(logits, targets)
        total += loss.double()
        count += n
        n_batches += 1
    model.train(was_training)
    if all_reduce is not None:
        all_reduce(total)
        all_reduce(count)
    tokens = int(count.item())
    return EvalResult(loss=total.item() / max(tokens, 1), tokens=tokens, batches=n_batches)
