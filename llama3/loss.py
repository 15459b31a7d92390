"""The language-model loss: next-token cross entropy, summed for training steps and averaged over
fixed batches for evaluation (training's periodic evaluation, ``evaluate``, ``deploy``), overall
and by position within the window."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama3.runtime import Precision

IGNORE_INDEX = -100  # target value that contributes no loss (padding)


def lm_loss_sum(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Summed next-token cross entropy (fp32) and the number of counted targets.

    Returning the sum, not the mean, lets callers average over every token of an accumulated batch.
    """
    loss = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, (targets != IGNORE_INDEX).sum()


def lm_loss_per_token(logits: Tensor, targets: Tensor) -> Tensor:
    """Next-token cross entropy of every target, (B, S) in fp32; 0 where the target is ignored."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(targets.shape)


@dataclass
class EvalResult:
    loss: float  # mean cross entropy per target token, nats
    tokens: int  # target tokens counted
    batches: int
    position_nats: list[float] = field(default_factory=list)  # summed loss at each window position
    position_tokens: list[int] = field(default_factory=list)  # counted targets at each position

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    def position_buckets(self, n_buckets: int) -> list[dict[str, float | int]]:
        """Mean loss over ``n_buckets`` contiguous ranges of window positions of (nearly) equal
        width: ``{"start", "end" (exclusive), "tokens", "loss"}`` each; their token-weighted mean
        is :attr:`loss`. Position p predicts the token after the first p + 1 of the window."""
        width = len(self.position_nats)
        n_buckets = min(n_buckets, width)
        edges = [b * width // n_buckets for b in range(n_buckets + 1)]
        buckets = []
        for start, end in zip(edges, edges[1:]):
            tokens = sum(self.position_tokens[start:end])
            nats = sum(self.position_nats[start:end])
            buckets.append(
                {
                    "start": start,
                    "end": end,
                    "tokens": tokens,
                    "loss": nats / tokens if tokens else None,
                }
            )
        return buckets


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    precision: Precision = Precision(),
    all_reduce: Callable[[Tensor], None] | None = None,
) -> EvalResult:
    """Mean loss of ``model`` over (inputs, targets) batches of one window length, overall and
    by position within the window; restores the model's train/eval mode.

    With several processes each evaluates its own batches and ``all_reduce`` (an in-place sum over
    ranks) combines the totals, so every rank returns the global mean.
    """
    was_training = model.training
    model.eval()
    nats = count = None  # (S,) sums by window position, fp64 and int64
    n_batches = 0
    for inputs, targets in batches:
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with precision.autocast(device):
            logits = model(inputs)
        if nats is None:
            nats = torch.zeros(targets.shape[1], dtype=torch.float64, device=device)
            count = torch.zeros(targets.shape[1], dtype=torch.int64, device=device)
        nats += lm_loss_per_token(logits, targets).double().sum(0)
        count += (targets != IGNORE_INDEX).sum(0)
        n_batches += 1
    model.train(was_training)
    if nats is None:
        return EvalResult(loss=0.0, tokens=0, batches=0)
    if all_reduce is not None:
        all_reduce(nats)
        all_reduce(count)
    tokens = int(count.sum().item())
    return EvalResult(
        loss=nats.sum().item() / max(tokens, 1),
        tokens=tokens,
        batches=n_batches,
        position_nats=nats.tolist(),
        position_tokens=count.tolist(),
    )
