"""``torchrun ... -m llama3 multitrain``: the same training with FSDP2 over every process that
torchrun started, on one node or many (torchrun's RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT). One GPU per process with NCCL, or CPU processes with gloo.

Example, 8 GPUs on one node::

    torchrun --nproc_per_node 8 -m llama3 multitrain --train_corpus ... --to_checkpoint runs/a
"""

from __future__ import annotations

import argparse

from llama3.training.distributed import Distributed
from llama3.training.flags import add_training_flags
from llama3.training.trainer import run_training


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (parser.description or "") + "\n\n" + __doc__.split("\n\n", 1)[1]
    add_training_flags(parser, multiprocess=True)


def run(args: argparse.Namespace) -> int:
    dist = Distributed.from_torchrun(args.device)
    try:
        return run_training(args, dist)
    finally:
        dist.close()
