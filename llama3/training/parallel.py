"""Wrappers applied to a built, single-device model, always in this order:

1. activation checkpointing of each block (its activations are recomputed in backward),
2. ``torch.compile`` of each block (the compiled region includes the checkpointing),
3. FSDP2: ``fully_shard`` each block, then the root (embedding, final norm, output projection).

Sharding comes last so that its hooks surround the compiled blocks, and every wrapper works per
block so that memory and compilation scale with one block, not the whole model. The model code
itself stays single-device.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llama3.errors import UsageError

try:  # torch >= 2.6
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
except ImportError:  # pragma: no cover - older torch
    from torch.distributed._composable.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

# torch's activation-checkpoint wrapper; state_dict() and the distributed state-dict helpers
# remove its name from parameter names, so checkpoints are unchanged by it.
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

WRAPPER_PREFIX = "_checkpoint_wrapped_module."


@dataclass(frozen=True)
class ParallelPlan:
    activation_checkpointing: bool = False
    compile: bool = False
    fsdp: bool = False
    bf16: bool = False  # pure bf16 parameters; FSDP then reduces gradients in fp32
    prefetching: int = 0  # blocks all-gathered ahead in forward and backward (0: FSDP's default)


def parallelize(model: nn.Module, plan: ParallelPlan, device: torch.device) -> nn.Module:
    """Apply the plan to ``model`` (in place) in the documented order; returns the model."""
    if plan.activation_checkpointing:
        apply_activation_checkpointing(model)
    if plan.compile:
        check_compile_supported(device)
        apply_compile(model)
    if plan.fsdp:
        apply_fsdp(model, device, bf16=plan.bf16, prefetching=plan.prefetching)
    return model


def apply_activation_checkpointing(model: nn.Module) -> None:
    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=True)


def apply_compile(model: nn.Module) -> None:
    """Compile each block in place (parameter names do not change)."""
    for block in model.layers:
        block.compile()


def check_compile_supported(device: torch.device) -> None:
    """Refuse --compile where torch.compile's code generator cannot run."""
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise UsageError("--compile on CUDA needs Triton (pip install triton), or drop --compile")
    if device.type == "cpu":
        compilers = [os.environ.get("CXX"), "c++", "g++", "clang++"]
        if not any(c and shutil.which(c) for c in compilers):
            raise UsageError(
                "--compile on the CPU needs a C++ compiler (g++ or clang++, or set CXX); "
                "install one or drop --compile"
            )


def apply_fsdp(model: nn.Module, device: torch.device, *, bf16: bool, prefetching: int) -> None:
    """Shard each block, then the root, over all processes.

    The model is already materialised with the same seed on every process, so sharding it keeps
    the initialisation identical to a one-process run. With ``bf16`` the parameters are bf16 and
    gradients are reduced in fp32. Inputs are not cast, so numerics match a one-process run.
    """
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None,
        reduce_dtype=torch.float32 if bf16 else None,
        cast_forward_inputs=False,
    )
    blocks = list(model.layers)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    # The root's parameters are used last in forward and first in backward: keep them gathered.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    if prefetching > 0:
        for i, block in enumerate(blocks):
            block.set_modules_to_forward_prefetch(blocks[i + 1 : i + 1 + prefetching])
            block.set_modules_to_backward_prefetch(blocks[max(0, i - prefetching) : i][::-1])


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Under FSDP, whether this backward reduces gradients (off for non-final micro-steps)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The whole model's weights on the CPU, gathered from every shard.

    Every process must call it; under FSDP only rank 0 receives the weights (others get ``{}``).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not isinstance(model, FSDPModule):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def parameter_name(name: str) -> str:
    """A parameter's name as in checkpoints (without wrapper prefixes)."""
    return name.replace(WRAPPER_PREFIX, "")


def local_tensor(tensor: Tensor) -> Tensor:
    """This process's shard of a possibly sharded tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
