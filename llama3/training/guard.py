"""Stop before a non-finite loss or gradient reaches the weights, and say where it appeared."""

from __future__ import annotations

import math

import torch
from torch import nn

from llama3.training.distributed import Distributed
from llama3.training.parallel import local_tensor, parameter_name


class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinity; the message names the step and the tensor."""


def first_nonfinite_grad(model: nn.Module, dist: Distributed) -> str | None:
    """Name of the first parameter (in model order) whose gradient holds a NaN or an infinity.

    Each process checks its own shards; the flags are combined so every process agrees.
    """
    named = [(parameter_name(n), p.grad) for n, p in model.named_parameters() if p.grad is not None]
    if not named:
        return None
    flags = torch.stack([~torch.isfinite(local_tensor(g)).all() for _, g in named]).to(torch.int32)
    dist.all_reduce_max(flags)
    bad = flags.nonzero()
    return named[int(bad[0])][0] if len(bad) else None


def check_finite(
    step: int,
    loss: float,
    grad_norm: float,
    model: nn.Module,
    dist: Distributed,
    *,
    overflow_expected: bool = False,
) -> None:
    """Raise :class:`NonFiniteError` for a non-finite loss or gradient at optimizer step ``step``.

    With an fp16 gradient scaler (``overflow_expected``) an overflowing gradient is normal: the
    scaler skips that step and lowers its scale, so only a non-finite loss stops training.
    """
    loss_ok, grads_ok = math.isfinite(loss), math.isfinite(grad_norm)
    if loss_ok and (grads_ok or overflow_expected):
        return
    name = None if grads_ok else first_nonfinite_grad(model, dist)
    what = [] if loss_ok else [f"loss is {loss}"]
    if name is not None:
        what.append(f"first non-finite gradient: {name}")
    elif not grads_ok:
        what.append(f"gradient norm is {grad_norm}")
    raise NonFiniteError(
        f"non-finite values at step {step}: "
        + "; ".join(what)
        + ". The optimizer step was not taken; the last checkpoint is unchanged."
    )
