"""Training diagnostics (``--diagnostics_steps``): what each attention layer does, and how large
each parameter group's gradient is.

Every N steps the trainer adds a record ``{"kind": "diagnostics", "step", "tokens", "layers",
"grad_norms"}`` to ``metrics.jsonl``:

* ``layers``, one entry per block, measured after the step's update on fixed windows (the first
  windows of the first eval batch, else of the step's batch), for query rows that see at least two
  keys:

  - ``entropy``: entropy of the row's attention weights over the log of its visible keys (1: all
    keys weighted alike, 0: all weight on one key), averaged over rows (and heads);
  - ``top_share``: the largest weight of the row; ``previous_share``: the weight on the key just
    before the query;
  - ``score_q01``, ``score_q50``, ``score_q99``, ``score_std``: quantiles and spread of the scores
    over visible pairs: λ·⟨q, k⟩ for softplus, ⟨q, k⟩/sqrt(head_dim) for softmax;
  - ``branch_ratio``: root mean square of the attention branch's output (after ``wo``) over that
    of the block's input, the residual stream it is added to.

* ``grad_norms``: the L2 norm of the gradients of each parameter role (a parameter's name without
  its block index: ``attention.wq``, ``feed_forward.wa``, ``tok_embeddings``...), all blocks
  together, before clipping.

The attention is recorded by wrapping each block's ``attention.attend`` and ``attention.output``
for one forward pass (compiled blocks run eagerly for it), so the model's code holds no probes and
the numbers come from the very tensors the model computes.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama3.model.transformer import SoftmaxAttention, SoftplusAttention, TransformerBlock
from llama3.ops.reference import scores
from llama3.training.optim import total_grad_norm

WINDOWS = 4  # windows of the fixed batch measured
MAX_SCORES = 1 << 22  # scores sampled for the quantiles (torch.quantile's input is limited)
_WRAPPERS = re.compile(r"(_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)\.")
_BLOCK_INDEX = re.compile(r"^layers\.\d+\.")


def parameter_role(name: str) -> str:
    """``layers.2.attention.wq.weight`` → ``attention.wq``; wrappers' prefixes dropped."""
    name = _BLOCK_INDEX.sub("", _WRAPPERS.sub("", name))
    return name.removesuffix(".weight")


def gradient_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of the gradients of each parameter role (sharded gradients gathered)."""
    roles: dict[str, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            roles.setdefault(parameter_role(name), []).append(p)
    return {role: float(total_grad_norm(params)) for role, params in sorted(roles.items())}


class _Recorder:
    """Each block's queries, keys and attention-branch output, and the block's input, for one
    forward pass."""

    def __init__(self) -> None:
        self.calls: dict[int, dict[str, Tensor]] = {}

    @contextlib.contextmanager
    def wrapping(self, model: nn.Module) -> Iterator[None]:
        blocks = [m for m in model.modules() if isinstance(m, TransformerBlock)]
        hooks = [
            block.register_forward_pre_hook(self._input_hook(i)) for i, block in enumerate(blocks)
        ]
        for i, block in enumerate(blocks):
            self._wrap(i, block.attention)
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            for block in blocks:
                del block.attention.attend, block.attention.output  # the class's methods again

    def _input_hook(self, i: int):
        def hook(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            self.calls.setdefault(i, {})["x"] = inputs[0].detach()

        return hook

    def _wrap(self, i: int, layer: nn.Module) -> None:
        attend, output = layer.attend, layer.output

        def recorded_attend(q: Tensor, k: Tensor, v: Tensor, kv: Any) -> Tensor:
            self.calls.setdefault(i, {}).update(q=q.detach(), k=k.detach())
            return attend(q, k, v, kv)

        def recorded_output(attn: Tensor) -> Tensor:
            out = output(attn)
            self.calls.setdefault(i, {})["branch"] = out.detach()
            return out

        layer.attend, layer.output = recorded_attend, recorded_output


@torch.no_grad()
def attention_statistics(model: nn.Module, tokens: Tensor) -> list[dict[str, float]]:
    """Per block, the statistics of the module docstring on ``tokens`` (B, S)."""
    recorder = _Recorder()
    was_training = model.training
    model.eval()
    stance = (
        torch.compiler.set_stance("force_eager")
        if hasattr(torch.compiler, "set_stance")
        else contextlib.nullcontext()
    )
    try:
        with recorder.wrapping(model), stance:
            model(tokens)
    finally:
        model.train(was_training)
    layers = [m.attention for m in model.modules() if isinstance(m, TransformerBlock)]
    return [_layer_statistics(layer, recorder.calls[i]) for i, layer in enumerate(layers)]


def _layer_statistics(layer: nn.Module, call: dict[str, Tensor]) -> dict[str, float]:
    if isinstance(layer, SoftplusAttention):
        z, p, visible = _softplus_weights(call["q"], call["k"], layer.scale)
    elif isinstance(layer, SoftmaxAttention):
        z, p, visible = _softmax_weights(call["q"], call["k"])
    else:
        raise TypeError(f"no diagnostics for {type(layer).__name__}")
    return {
        **_weight_statistics(p, visible),
        **_score_statistics(z, visible),
        "branch_ratio": _rms(call["branch"]) / max(_rms(call["x"]), 1e-30),
    }


def _softplus_weights(q: Tensor, k: Tensor, scale: str) -> tuple[Tensor, Tensor, Tensor]:
    """Scores, weights (B, 1, S, T) and visibility (1, 1, S, T) of softplus attention."""
    _, z, visible = scores(q, k, scale, None)
    w = torch.where(visible, F.softplus(z), 0.0)
    return z.unsqueeze(1), (w / w.sum(-1, keepdim=True)).unsqueeze(1), visible.unsqueeze(1)


def _softmax_weights(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Scores, weights (B, H, S, T) and visibility (1, 1, S, T) of (grouped-query) softmax."""
    q, k = q.float().transpose(1, 2), k.float().transpose(1, 2)  # (B, heads, len, head_dim)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    S, T = q.shape[2], k.shape[2]
    z = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    visible = (
        torch.arange(T, device=q.device) <= torch.arange(S, device=q.device)[:, None] + (T - S)
    )[None, None]
    return z, torch.softmax(z.masked_fill(~visible, float("-inf")), dim=-1), visible


def _weight_statistics(p: Tensor, visible: Tensor) -> dict[str, float]:
    """Entropy over log(keys), top and previous-key shares, averaged over rows with ≥ 2 keys."""
    n = visible.sum(-1).float()  # (1, 1, S)
    rows = n >= 2
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1) / torch.log(n.clamp_min(2))
    previous = torch.diagonal(p, offset=p.shape[-1] - p.shape[-2] - 1, dim1=-2, dim2=-1)
    rows_expanded = rows.expand_as(entropy)
    return {
        "entropy": entropy[rows_expanded].mean().item(),
        "top_share": p.amax(-1)[rows_expanded].mean().item(),
        "previous_share": previous.mean().item(),
    }


def _score_statistics(z: Tensor, visible: Tensor) -> dict[str, float]:
    values = z.float()[visible.expand_as(z)]
    if values.numel() > MAX_SCORES:  # an evenly spaced sample
        values = values[:: math.ceil(values.numel() / MAX_SCORES)]
    q01, q50, q99 = torch.quantile(values, values.new_tensor([0.01, 0.5, 0.99])).tolist()
    return {"score_q01": q01, "score_q50": q50, "score_q99": q99, "score_std": values.std().item()}


def _rms(x: Tensor) -> float:
    return x.float().pow(2).mean().sqrt().item()
