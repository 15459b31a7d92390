"""Processes: one (``train``) or many under torchrun (``multitrain``), behind one small interface.

The training loop calls the same methods either way; with one process every collective is a no-op,
so world size 1 runs the very same code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from llama3.errors import UsageError
from llama3.runtime import select_device

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job and the collectives the trainer needs."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    sharded: bool = False  # True under multitrain: the model is wrapped with FSDP2

    @classmethod
    def single(cls, device_flag: str | None) -> "Distributed":
        """One process on ``--device`` (default: CUDA when present, else CPU)."""
        return cls(device=select_device(device_flag))

    @classmethod
    def from_torchrun(cls, device_flag: str | None) -> "Distributed":
        """Join the process group described by torchrun's environment (one node or many).

        CUDA uses NCCL with one GPU per process (``LOCAL_RANK``); the CPU uses gloo.
        """
        missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
        if missing:
            raise UsageError(
                "multitrain must be launched by torchrun (missing "
                + ", ".join(missing)
                + "), e.g. "
                "torchrun --nproc_per_node N -m llama3 multitrain ...; for one process use "
                "python -m llama3 train"
            )
        local_rank = int(os.environ["LOCAL_RANK"])
        device = _process_device(device_flag, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device, **_attempt_store())
        else:
            dist.init_process_group("gloo", **_attempt_store())
        return cls(
            device=device,
            rank=dist.get_rank(),
            local_rank=local_rank,
            world_size=dist.get_world_size(),
            sharded=True,
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether a process group is running (collectives communicate)."""
        return dist.is_available() and dist.is_initialized()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over processes; returns ``tensor``."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def any_failed(self, failed: bool) -> bool:
        """Whether this or any other process failed (collective): each calls it with its own
        outcome, so all stop together instead of waiting for one that raised."""
        if not self.active:
            return failed
        flag = torch.tensor(int(failed), device=self.device)
        return bool(self.all_reduce_max(flag).item())

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.active:
            dist.destroy_process_group()


def _process_device(device_flag: str | None, local_rank: int) -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is present (or asked for), else the CPU."""
    if device_flag and ":" in device_flag:
        raise UsageError(
            f"--device {device_flag}: under multitrain give only the type (cuda or "
            "cpu); each process uses GPU number LOCAL_RANK"
        )
    kind = select_device(device_flag).type
    if kind == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UsageError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) "
                "on this node: lower --nproc_per_node"
            )
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _attempt_store() -> dict[str, object]:
    """torchrun's store (``env://``). Where it is the agents' store, kept across restarts
    (torchrun's default), under a prefix of this attempt's own: the workers torchrun restarts
    after a failure then do not read the addresses their predecessors published there, which a
    restarted gloo group otherwise tries to connect to, and fails. The prefix counts this node's
    restarts, which every node counts alike only when they all fail together; so
    multitrain_llama3.sh asks torchrun for a new store per attempt instead
    (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, hosted by rank 0), which needs no prefix."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}  # a store of this attempt's own
    store, rank, world_size = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefixed = dist.PrefixStore(f"llama3/attempt_{attempt}/", store)
    return {"store": prefixed, "rank": rank, "world_size": world_size}
