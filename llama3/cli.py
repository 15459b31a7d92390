"""Command-line flag groups, each defined once; subcommands compose the groups they need.

A subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int``; ``__main__`` lists
them in :data:`COMMANDS`. Errors a user can fix raise :class:`UsageError` (or
:class:`~llama3.model.args.ConfigError`), printed as one line without a traceback.
"""

from __future__ import annotations

import argparse
from typing import Any

from llama3.model.args import ATTENTIONS, MIXERS, SOFTPLUS_SCALES, ModelArgs


class UsageError(Exception):
    """A problem the user can fix (bad flag, missing file); the message says what to change."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the description's line breaks."""


# Model flags: (flag, type, help). Defaults come from ModelArgs so there is one source of truth.
_MODEL_FLAGS: list[tuple[str, Any, str]] = [
    ("attention", str, f"attention layer: {' | '.join(ATTENTIONS)}"),
    ("mixer", str, f"feed-forward mixer: {' | '.join(MIXERS)} (default: swiglu for softmax, "
                   "combinator for softplus)"),
    ("n_layers", int, "number of transformer blocks"),
    ("dim", int, "model width"),
    ("n_heads", int, "query heads (softmax attention)"),
    ("n_kv_heads", int, "key/value heads for grouped-query attention (default: --n_heads)"),
    ("core_dim", int, "softplus core width r, a multiple of 8 (default: the multiple of 8 nearest "
                      "to 5·dim − 216)"),
    ("softplus_scale", str, f"softplus score scale: {' | '.join(SOFTPLUS_SCALES)} "
                            "(log(n)/sqrt(r) or 1/sqrt(r))"),
    ("multiple_of", int, "SwiGLU hidden width is rounded up to a multiple of this"),
    ("ffn_dim_multiplier", float, "SwiGLU hidden width multiplier"),
    ("norm_eps", float, "RMSNorm epsilon"),
    ("rope_theta", float, "RoPE base"),
    ("max_seq_len", int, "context length (tokens per training window)"),
    ("dropout", float, "dropout on embeddings and on the attention output"),
]
_MODEL_CHOICES = {"attention": ATTENTIONS, "mixer": MIXERS, "softplus_scale": SOFTPLUS_SCALES}


def add_model_flags(parser: argparse.ArgumentParser, *, from_checkpoint: bool = False) -> None:
    """Model shape flags. With ``from_checkpoint`` they default to the checkpoint's values and, if
    given, must agree with them (see :func:`check_model_flags`)."""
    title = "model (taken from the checkpoint; if given, must agree)" if from_checkpoint else "model"
    group = parser.add_argument_group(title)
    defaults = ModelArgs.__dataclass_fields__
    for name, kind, text in _MODEL_FLAGS:
        default = None if from_checkpoint else defaults[name].default
        group.add_argument(f"--{name}", type=kind, default=default, choices=_MODEL_CHOICES.get(name),
                           help=text)
    default_scaled = None if from_checkpoint else False
    group.add_argument("--use_scaled_rope", action=argparse.BooleanOptionalAction,
                       default=default_scaled, help="apply the Llama 3.1 RoPE frequency scaling")


def model_args_from_flags(args: argparse.Namespace, vocab_size: int) -> ModelArgs:
    """ModelArgs from parsed model flags; ``vocab_size`` comes from the tokenizer."""
    values = {name: getattr(args, name) for name, _, _ in _MODEL_FLAGS}
    values["use_scaled_rope"] = args.use_scaled_rope
    return ModelArgs(vocab_size=vocab_size, **values)


def check_model_flags(args: argparse.Namespace, model_args: ModelArgs) -> None:
    """Raise UsageError naming each model flag that was given and differs from the checkpoint."""
    names = [name for name, _, _ in _MODEL_FLAGS] + ["use_scaled_rope"]
    diffs = [
        f"--{n} {getattr(args, n)} (checkpoint: {getattr(model_args, n)})"
        for n in names
        if getattr(args, n, None) is not None and getattr(args, n) != getattr(model_args, n)
    ]
    if diffs:
        raise UsageError("model flags disagree with the checkpoint: " + "; ".join(diffs))


def add_precision_flags(parser: argparse.ArgumentParser) -> None:
    """Device and numeric precision."""
    group = parser.add_argument_group("device and precision")
    group.add_argument("--device", default=None,
                       help="cuda, cuda:N or cpu (default: cuda when available, else cpu)")
    group.add_argument("--allow_tf32", action="store_true",
                       help="allow TF32 matmuls and convolutions on Ampere and newer GPUs")
    mode = group.add_mutually_exclusive_group()
    mode.add_argument("--amp_fp16", action="store_true",
                      help="autocast to float16 with fp32 master weights and a gradient scaler")
    mode.add_argument("--amp_bf16", action="store_true",
                      help="autocast to bfloat16 with fp32 master weights")
    mode.add_argument("--bf16", action="store_true",
                      help="pure bfloat16 parameters and activations (FSDP: fp32 gradient reduction)")


def add_tokenizer_flag(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The SentencePiece model file."""
    parser.add_argument("--tokenizer", required=required, metavar="MODEL_FILE",
                        help="SentencePiece model file written by train_tokenizer")


def add_seed_flag(parser: argparse.ArgumentParser, default: int = 0) -> None:
    parser.add_argument("--seed", type=int, default=default,
                        help="random seed (data order, initialisation, sampling)")
