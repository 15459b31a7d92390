"""``python -m llama3 SUBCOMMAND [flags]``: dispatches to the subcommand's module.

Only the chosen subcommand's module is imported, so ``--help`` of one command stays quick.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from llama3.cli import ArgumentParser, HelpFormatter, flag_of
from llama3.errors import ConfigError, UsageError

# name → (module defining add_arguments(parser) and run(args), or main(argv) for a command that
# hands its arguments to another program's command line; one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "preprocess": (
        "llama3.commands.preprocess",
        "clean and split JSON-lines or parquet corpora into train/eval shards",
    ),
    "train_tokenizer": ("llama3.commands.train_tokenizer", "train a SentencePiece BPE tokenizer"),
    "pretokenize": (
        "llama3.commands.pretokenize",
        "encode a corpus into cached binary token shards",
    ),
    "train": ("llama3.training.train", "train a model in one process"),
    "multitrain": (
        "llama3.training.multitrain",
        "train with FSDP2 under torchrun (one or many nodes)",
    ),
    "evaluate": (
        "llama3.commands.evaluate",
        "loss, perplexity and bits per byte on an eval corpus",
    ),
    "generate": ("llama3.commands.generate", "sample text from a checkpoint"),
    "deploy": (
        "llama3.deploy.command",
        "export to ONNX and TensorRT, check accuracy, measure latency",
    ),
    "import_meta": ("llama3.commands.import_meta", "convert a Meta Llama 3 checkpoint into ours"),
    "export_hf": (
        "llama3.commands.export_hf",
        "write a checkpoint as a Hugging Face model directory",
    ),
    "import_hf": ("llama3.commands.import_hf", "convert a Hugging Face Llama directory into ours"),
    "lm_eval": ("llama3.interop.lm_eval_cli", "lm-evaluation-harness with our model as llama3"),
    "plot": ("llama3.commands.plot", "draw the loss curves of one or more runs into a PNG"),
    "plot_lengths": (
        "llama3.commands.plot_lengths",
        "draw eval loss by window length and by position (evaluate's JSON) into a PNG",
    ),
}


def _top_parser() -> argparse.ArgumentParser:
    lines = [f"  {name:<16} {summary}" for name, (_, summary) in COMMANDS.items()]
    return argparse.ArgumentParser(
        prog="python -m llama3",
        description="Llama 3 pretraining with softmax or softplus attention.\n\nsubcommands:\n"
        + "\n".join(lines)
        + "\n\nRun 'python -m llama3 SUBCOMMAND --help' for its flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        parser = _top_parser()
        parser.add_argument("subcommand", choices=list(COMMANDS), help=argparse.SUPPRESS)
        parser.parse_args(argv[:1])  # prints help or a "choose from" error and exits
        return 2
    name, rest = argv[0], argv[1:]
    module_name, summary = COMMANDS[name]
    module = importlib.import_module(module_name)
    if hasattr(module, "main"):
        return _guarded(lambda: module.main(rest))
    parser = ArgumentParser(
        prog=f"python -m llama3 {name}", description=summary, formatter_class=HelpFormatter
    )
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    return _guarded(lambda: module.run(args))


def _guarded(command: Callable[[], int | None]) -> int:
    """Run a command: a usage error prints one line (exit 2), naming the flag that sets each
    setting a configuration error names; Ctrl-C exits with 130. A file that could not be read or
    written where no command expected it still gets one line (exit 1)."""
    try:
        return int(command() or 0)
    except (UsageError, ConfigError) as err:
        message = err.naming(flag_of) if isinstance(err, ConfigError) else err
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
