"""Accuracy of a deployed runner against PyTorch: output differences and eval loss side by side."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from llama3.deploy.runners import Runner, empty_cache
from llama3.loss import lm_loss_sum
from llama3.model.args import ModelArgs
from llama3.model.transformer import cache_shape


@dataclass
class Difference:
    """Largest absolute difference of each output, and relative to the reference's largest value."""

    logits_abs: float
    logits_rel: float
    k_cache_abs: float
    v_cache_abs: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _max_abs(a: Tensor, b: Tensor) -> float:
    return (a.float().cpu() - b.float().cpu()).abs().max().item() if a.numel() else 0.0


def compare_outputs(
    reference: Runner, candidate: Runner, tokens: Tensor, k_cache: Tensor, v_cache: Tensor
) -> Difference:
    """Run both on the same inputs (moved to each runner's device and cache dtype) and compare."""
    ref = reference(*_place(reference, tokens, k_cache, v_cache))
    got = candidate(*_place(candidate, tokens, k_cache, v_cache))
    logits_abs = _max_abs(ref[0], got[0])
    scale = ref[0].float().abs().max().item()
    return Difference(
        logits_abs=logits_abs,
        logits_rel=logits_abs / max(scale, 1e-30),
        k_cache_abs=_max_abs(ref[1], got[1]),
        v_cache_abs=_max_abs(ref[2], got[2]),
    )


def _place(runner: Runner, tokens: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    dtype = runner.cache_dtype
    return tokens.to(runner.device), k.to(runner.device, dtype), v.to(runner.device, dtype)


def check_inputs(
    args: ModelArgs, batch: int, query: int, cached: int, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Random tokens (batch, query) after ``cached`` positions of random fp32 cache."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, args.vocab_size, (batch, query), generator=generator)
    shape = cache_shape(args, batch, cached)
    return tokens, torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


@dataclass
class LossResult:
    loss: float  # mean next-token cross entropy, nats
    tokens: int


@torch.no_grad()
def runner_loss(
    runner: Runner, args: ModelArgs, batches: Iterable[tuple[Tensor, Tensor]]
) -> LossResult:
    """Mean loss of ``runner`` over (inputs, targets) windows, each a prefill with an empty
    cache."""
    total, count = 0.0, 0
    batches = list(batches)
    for inputs, targets in tqdm(
        batches,
        desc=f"eval loss: {runner.name} {runner.precision}",
        unit="batch",
        leave=False,
        dynamic_ncols=True,
    ):
        k, v = empty_cache(runner, args, inputs.shape[0])
        logits = runner(inputs.to(runner.device), k, v)[0]
        loss, n = lm_loss_sum(logits.float(), targets.to(logits.device))
        total += loss.item()
        count += int(n.item())
    return LossResult(loss=total / max(count, 1), tokens=count)
