"""``python -m llama3 train``: train in one process (one GPU, or the CPU)."""

from __future__ import annotations

import argparse

from llama3.training.distributed import Distributed
from llama3.training.flags import add_training_flags
from llama3.training.trainer import run_training


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_flags(parser, multiprocess=False)


def run(args: argparse.Namespace) -> int:
    return run_training(args, Distributed.single(args.device))
