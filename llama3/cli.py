"""Command-line flag groups, each defined once; subcommands compose the groups they need.

A subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int``; ``__main__`` lists
them in its ``COMMANDS``. Errors a user can fix are :mod:`llama3.errors` types, printed as one line
without a traceback. This module turns flags into plain values; nothing below the commands imports
it.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from llama3.errors import UsageError  # also importable from here, as code written before expects
from llama3.model.args import ATTENTIONS, INITS, MIXERS, SOFTPLUS_SCALES, ModelArgs


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors and negative numbers in every notation as values
    (``--base_lr -1e-3`` is a value to check, not an unknown option)."""

    _NEGATIVE = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.IGNORECASE)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = self._NEGATIVE

    def error(self, message: str):  # noqa: ANN201 - argparse's signature
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows meaningful defaults (not None or False) and keeps the description's line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


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
    ("core_output_scale", str, "softplus core output before wo: width (× min(1, dim/r), so a core "
                               "wider than dim does not dominate the residual stream) | none (as "
                               "checkpoints saved before this setting, which keep it) | a factor "
                               "such as 0.3"),
    ("init", str, f"initial weights: {' | '.join(INITS)} (N(0, 0.02) everywhere; 1/sqrt(fan_in); "
                  "torchtitan's depth-scaled output projections)"),
    ("multiple_of", int, "SwiGLU hidden width is rounded up to a multiple of this"),
    ("ffn_dim_multiplier", float, "SwiGLU hidden width multiplier"),
    ("norm_eps", float, "RMSNorm epsilon"),
    ("rope_theta", float, "RoPE base"),
    ("max_seq_len", int, "context length (tokens per training window)"),
    ("dropout", float, "dropout on embeddings and on the attention output"),
]
_MODEL_CHOICES = {"attention": ATTENTIONS, "mixer": MIXERS, "softplus_scale": SOFTPLUS_SCALES,
                  "init": INITS}


def add_model_flags(parser: argparse.ArgumentParser, *, from_checkpoint: bool = False,
                    resumable: bool = False) -> None:
    """Model shape flags.

    ``from_checkpoint``: the values come from a checkpoint; flags given must agree with it (see
    :func:`llama3.checkpoint.check_model_flags`). Those commands run the model on sequences of
    their own length, so they take ``--seq_len`` (:func:`add_seq_len_flag`) instead of the
    model's ``--max_seq_len``. ``resumable`` (training): a new run uses ModelArgs' defaults, shown
    per flag, and a resumed run takes the checkpoint's. Both leave unset flags as None.
    """
    if from_checkpoint:
        title = "model (taken from the checkpoint; if given, must agree)"
    elif resumable:
        title = "model (a new run uses the defaults shown; --from_checkpoint takes the checkpoint's " \
                "values, and flags given must agree)"
    else:
        title = "model"
    group = parser.add_argument_group(title)
    fields = ModelArgs.__dataclass_fields__
    for name, kind, text in [*_MODEL_FLAGS, ("use_scaled_rope", None,
                                             "apply the Llama 3.1 RoPE frequency scaling")]:
        if from_checkpoint and name == "max_seq_len":
            continue
        default = fields[name].default
        if resumable and default is not None:
            text = f"{text} (new run: {default})"
        value = None if (from_checkpoint or resumable) else default
        if kind is None:
            group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=value,
                               help=text)
        else:
            group.add_argument(f"--{name}", type=kind, default=value,
                               choices=_MODEL_CHOICES.get(name), help=text)


def model_flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The model flags given (set, not None), by ModelArgs field name."""
    names = [name for name, _, _ in _MODEL_FLAGS] + ["use_scaled_rope"]
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


class Spelled(argparse.Action):
    """Stores the value like ``store`` and remembers which of the flag's spellings was given
    (``DEST_flag``), so that a message names the flag the user typed."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_flag", option_string)


def spelling(args: argparse.Namespace, dest: str) -> str:
    """The spelling of flag ``dest`` given on the command line (its first one if none was)."""
    return getattr(args, f"{dest}_flag", None) or f"--{dest}"


def add_seq_len_flag(group: argparse._ActionsContainer, what: str) -> None:
    """``--seq_len`` of the commands that run a trained model: tokens per sequence, ``what`` they
    are for. ``--max_seq_len`` is accepted as the same flag, for scripts written before."""
    group.add_argument("--seq_len", "--max_seq_len", dest="seq_len", type=int, default=None,
                       action=Spelled, metavar="N",
                       help=f"tokens per sequence: {what} (default: the checkpoint's context, "
                            "--max_seq_len of training); --max_seq_len is accepted as an older "
                            "spelling of this flag")


def seq_len_from_flags(args: argparse.Namespace, model_args: ModelArgs) -> int:
    """``--seq_len``, or the checkpoint's context when not given (0 is refused, not a default)."""
    if args.seq_len is None:
        return model_args.max_seq_len
    if args.seq_len <= 0:
        raise UsageError(f"{spelling(args, 'seq_len')} must be positive, got {args.seq_len}")
    return args.seq_len


def add_precision_flags(parser: argparse.ArgumentParser) -> None:
    """Device and numeric precision."""
    group = parser.add_argument_group("device and precision")
    group.add_argument("--device", default=None,
                       help="cuda, cuda:N or cpu (default: cuda when available, else cpu)")
    group.add_argument("--allow_tf32", action=argparse.BooleanOptionalAction, default=False,
                       help="allow TF32 matmuls and convolutions on Ampere and newer GPUs")
    mode = group.add_mutually_exclusive_group()
    mode.add_argument("--fp32", action="store_true",
                      help="fp32 parameters and arithmetic (the default when no other mode is given)")
    mode.add_argument("--amp_fp16", action="store_true",
                      help="autocast to float16 with fp32 master weights and a gradient scaler")
    mode.add_argument("--amp_bf16", action="store_true",
                      help="autocast to bfloat16 with fp32 master weights")
    mode.add_argument("--bf16", action="store_true",
                      help="pure bfloat16 parameters and activations (FSDP: fp32 gradient reduction)")


def add_tokenizer_flag(parser: argparse._ActionsContainer, required: bool = True) -> None:
    """The SentencePiece model file."""
    parser.add_argument("--tokenizer", required=required, metavar="MODEL_FILE",
                        help="SentencePiece model file written by train_tokenizer")


DATA_MODES = ("packed", "padded")
START_TOKENS = ("eos", "bos", "none")


def add_start_token_flag(group: argparse._ActionsContainer, what: str) -> None:
    """``--start_token``: the token ``what`` follows (see :func:`start_token`)."""
    group.add_argument("--start_token", choices=START_TOKENS, default="eos",
                       help=f"token put before {what}: eos for models trained on packed windows "
                            "(documents follow an end-of-sequence token), bos for --data_mode "
                            "padded (documents start with beginning-of-sequence)")


def start_token(args: argparse.Namespace) -> str | None:
    """``--start_token`` as the tokenizer's special token name, or None for "none"."""
    return None if args.start_token == "none" else args.start_token


def add_checkpoint_source_flags(group: argparse._ActionsContainer, *,
                                tokenizer_required: bool = True) -> None:
    """``--from_checkpoint`` and ``--tokenizer`` of the commands that load a trained model."""
    group.add_argument("--from_checkpoint", required=True, metavar="DIR",
                       help="run directory (its latest checkpoint), step directory or model.pt")
    add_tokenizer_flag(group, required=tokenizer_required)


def add_token_cache_flags(group: argparse._ActionsContainer, *, data_mode: bool = True) -> None:
    """Where a corpus's tokens are cached and (with ``data_mode``) how they become windows."""
    if data_mode:
        group.add_argument("--data_mode", choices=DATA_MODES, default="packed",
                           help="packed: documents joined (EOS between) into full windows; padded: "
                                "one document per window, as the original, padding not counted by "
                                "the loss")
    group.add_argument("--cache_dir", metavar="DIR",
                       help="where the corpus's encoded token shards are kept (default: "
                            "CORPUS/.tokens/, or the user cache when the corpus folder is read-only)")


def seed_value(text: str) -> int:
    """argparse type of ``--seed``: an integer from 0 to 2**63 − 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**63 - 1, got {value}")
    return value


def add_seed_flag(parser: argparse.ArgumentParser, default: int = 0) -> None:
    parser.add_argument("--seed", type=seed_value, default=default,
                        help="random seed (data order, initialisation, sampling)")
