"""Optimiser, learning-rate schedule and gradient norms (sharded or not)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

SCHEDULES = ("linear", "cosine")


@dataclass(frozen=True)
class OptimizerSettings:
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (projections, embedding), none on norm gains."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    plain = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_optimizer(
    model: nn.Module, settings: OptimizerSettings, device: torch.device
) -> torch.optim.AdamW:
    """AdamW, fused on CUDA."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        parameter_groups(model, settings.weight_decay),
        lr=settings.lr,
        betas=settings.betas,
        eps=settings.eps,
        fused=fused,
        foreach=None if fused else True,
    )


def apply_settings(optimizer: torch.optim.Optimizer, settings: OptimizerSettings) -> None:
    """Make the flags win over hyper-parameters restored from a checkpoint."""
    decay_group, plain_group = optimizer.param_groups
    decay_group["weight_decay"] = settings.weight_decay
    plain_group["weight_decay"] = 0.0
    for group in optimizer.param_groups:
        group["betas"] = settings.betas
        group["eps"] = settings.eps


@dataclass(frozen=True)
class LRSchedule:
    """Linear warm-up to ``base_lr``, then linear or cosine decay to ``min_ratio · base_lr``.

    A pure function of the step, so a resumed run follows it exactly with nothing to restore.
    """

    base_lr: float
    warmup_steps: int
    total_steps: int
    kind: str = "linear"
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if self.kind == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            factor = 1.0 - progress
        return self.base_lr * (self.min_ratio + (1.0 - self.min_ratio) * factor)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def total_grad_norm(parameters: Iterable[nn.Parameter]) -> Tensor:
    """The L2 norm of all gradients together, as a plain tensor even when they are sharded."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float, norm: Tensor) -> None:
    """Scale gradients so their total norm is at most ``max_norm`` (given the measured ``norm``)."""
    torch.nn.utils.clip_grads_with_norm_(list(parameters), max_norm, norm)
