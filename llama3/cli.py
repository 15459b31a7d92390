"""Command-line flag groups, each defined once; subcommands compose the groups they need.

A subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int``; ``__main__`` lists
them in its ``COMMANDS``. Errors a user can fix are :mod:`llama3.errors` types, printed as one line
without a traceback. This module turns flags into plain values; nothing below the commands imports
it.

Each flag is declared once, as a :class:`Flag`; a flag that a configuration dataclass holds is
declared as its field (:meth:`Flag.field`), from which the parser's argument comes too
(:func:`add_fields`). A :class:`~llama3.errors.ConfigError` names the settings at fault by their
fields; the command line names the flag that sets each (:func:`flag_of`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import typing
from typing import Any

from llama3.data.sources import ProblemLog
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


# Settings set by a flag of another name; every other setting's flag is --FIELD.
_FLAGS_OF_FIELDS = {"top_p": "--nucleus_prob"}  # SamplingSettings.top_p: generate's flag


def flag_of(field: str) -> str:
    """The flag that sets the configuration field ``field``."""
    return _FLAGS_OF_FIELDS.get(field, f"--{field}")


def _typed(kind: Any) -> dict[str, Any]:
    """argparse's options for a value of type ``kind`` (``int | None`` is int): its type, or for
    ``bool`` a --name/--no-name switch; none for None."""
    kind = next((k for k in typing.get_args(kind) or [kind] if k is not type(None)), None)
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": kind} if kind else {}


class Flag:
    """A flag declared once: its help, its default and argparse's options (type, choices, metavar,
    action, required). :meth:`add` puts it on a parser; as the field of a configuration dataclass
    (:meth:`field`, :func:`add_fields`) it also holds the value parsed."""

    def __init__(self, help: str, *, default: Any = None, **options: Any):
        self.help, self.default, self.options = help, default, options

    def add(
        self, group: argparse._ActionsContainer, name: str, kind: Any = None, **changes: Any
    ) -> None:
        """``--name`` on ``group``, typed as a value of type ``kind`` (a field's) unless declared
        otherwise; ``changes`` replace declared options."""
        group.add_argument(
            f"--{name}",
            default=self.default,
            help=self.help,
            **{**_typed(kind), **self.options, **changes},
        )

    def field(self, *, resumable: bool = False) -> Any:
        """A dataclass field declaring this flag, its default the flag's (none if required).
        ``resumable``: a resumed training run takes the checkpoint's value unless it is given."""
        default = dataclasses.MISSING if self.options.get("required") else self.default
        return dataclasses.field(default=default, metadata={"flag": self, "resumable": resumable})

    def for_resume(self, *, taken: bool) -> Flag:
        """This flag defaulting to None (not given), its help naming a new run's default and, if
        ``taken``, that a resumed run takes the checkpoint's value."""
        notes = [f"new run: {self.default}"] * (self.default is not None)
        notes += ["resumed: the checkpoint's"] * taken
        return Flag(f"{self.help} ({'; '.join(notes)})" if notes else self.help, **self.options)


def declared_flags(cls: type) -> list[tuple[dataclasses.Field, Flag]]:
    """The fields of dataclass ``cls`` that declare a flag (:meth:`Flag.field`), with the flag."""
    return [(f, f.metadata["flag"]) for f in dataclasses.fields(cls) if "flag" in f.metadata]


def add_fields(group: argparse._ActionsContainer, cls: type, skip: tuple[str, ...] = ()) -> None:
    """The flags that the fields of dataclass ``cls`` declare, in field order, each typed by its
    field; a resumable one as :meth:`Flag.for_resume` makes it."""
    types = typing.get_type_hints(cls)
    for field, flag in declared_flags(cls):
        if field.name not in skip:
            flag = flag.for_resume(taken=True) if field.metadata["resumable"] else flag
            flag.add(group, field.name, types[field.name])


# Model flags, by ModelArgs field: types and defaults come from ModelArgs, one source of truth.
_MODEL_FLAGS: dict[str, Flag] = {
    "attention": Flag(f"attention layer: {' | '.join(ATTENTIONS)}", choices=ATTENTIONS),
    "mixer": Flag(
        f"feed-forward mixer: {' | '.join(MIXERS)} (default: swiglu for softmax, "
        "combinator for softplus)",
        choices=MIXERS,
    ),
    "n_layers": Flag("number of transformer blocks"),
    "dim": Flag("model width"),
    "n_heads": Flag("query heads (softmax attention)"),
    "n_kv_heads": Flag("key/value heads for grouped-query attention (default: --n_heads)"),
    "core_dim": Flag(
        "softplus core width r, a multiple of 8 (default: the multiple of 8 nearest to 5·dim − 216)"
    ),
    "softplus_scale": Flag(
        f"softplus score scale: {' | '.join(SOFTPLUS_SCALES)} (log(n)/sqrt(r) or 1/sqrt(r))",
        choices=SOFTPLUS_SCALES,
    ),
    "core_output_scale": Flag(
        "softplus core output before wo: width (× min(1, dim/r), so a core "
        "wider than dim does not dominate the residual stream) | none (as "
        "checkpoints saved before this setting, which keep it) | a factor "
        "such as 0.3"
    ),
    "init": Flag(
        f"initial weights: {' | '.join(INITS)} (N(0, 0.02) everywhere; 1/sqrt(fan_in); "
        "torchtitan's depth-scaled output projections)",
        choices=INITS,
    ),
    "multiple_of": Flag("SwiGLU hidden width is rounded up to a multiple of this"),
    "ffn_dim_multiplier": Flag("SwiGLU hidden width multiplier"),
    "norm_eps": Flag("RMSNorm epsilon"),
    "rope_theta": Flag("RoPE base"),
    "max_seq_len": Flag("context length (tokens per training window)"),
    "dropout": Flag("dropout on embeddings and on the attention output"),
    "use_scaled_rope": Flag("apply the Llama 3.1 RoPE frequency scaling"),
}


def add_model_flags(
    parser: argparse.ArgumentParser, *, from_checkpoint: bool = False, resumable: bool = False
) -> None:
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
        title = (
            "model (a new run uses the defaults shown; --from_checkpoint takes the checkpoint's "
            "values, and flags given must agree)"
        )
    else:
        title = "model"
    group = parser.add_argument_group(title)
    fields, types = ModelArgs.__dataclass_fields__, typing.get_type_hints(ModelArgs)
    for name, flag in _MODEL_FLAGS.items():
        if from_checkpoint and name == "max_seq_len":
            continue
        default = None if from_checkpoint else fields[name].default
        flag = Flag(flag.help, default=default, **flag.options)
        (flag.for_resume(taken=False) if resumable else flag).add(group, name, types[name])


def model_flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The model flags given (set, not None), by ModelArgs field name."""
    return {
        name: getattr(args, name) for name in _MODEL_FLAGS if getattr(args, name, None) is not None
    }


class Spelled(argparse.Action):
    """Stores the value like ``store`` and remembers which of the flag's spellings was given
    (``DEST_flag``), so that a message names the flag the user typed."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_flag", option_string)


def spelling(args: argparse.Namespace, dest: str) -> str:
    """The spelling of flag ``dest`` given on the command line (its first one if none was)."""
    return getattr(args, f"{dest}_flag", None) or f"--{dest}"


def add_seq_len_flag(group: argparse._ActionsContainer, what: str) -> None:
    """``--seq_len`` of the commands that run a trained model: tokens per sequence, ``what`` they
    are for. ``--max_seq_len`` is accepted as the same flag, for scripts written before."""
    group.add_argument(
        "--seq_len",
        "--max_seq_len",
        dest="seq_len",
        type=int,
        default=None,
        action=Spelled,
        metavar="N",
        help=f"tokens per sequence: {what} (default: the checkpoint's context, "
        "--max_seq_len of training); --max_seq_len is accepted as an older "
        "spelling of this flag",
    )


def seq_len_from_flags(args: argparse.Namespace, model_args: ModelArgs) -> int:
    """``--seq_len``, or the checkpoint's context when not given (0 is refused, not a default)."""
    if args.seq_len is None:
        return model_args.max_seq_len
    if args.seq_len <= 0:
        raise UsageError(f"{spelling(args, 'seq_len')} must be positive, got {args.seq_len}")
    return args.seq_len


DEVICE = Flag("cuda, cuda:N or cpu (default: cuda when available, else cpu)")
ALLOW_TF32 = Flag(
    "allow TF32 matmuls and convolutions on Ampere and newer GPUs",
    default=False,
    action=argparse.BooleanOptionalAction,
)


def add_precision_flags(parser: argparse.ArgumentParser) -> None:
    """Device and numeric precision."""
    group = parser.add_argument_group("device and precision")
    DEVICE.add(group, "device")
    ALLOW_TF32.add(group, "allow_tf32")
    add_precision_modes(group)


def add_precision_modes(group: argparse._ActionsContainer) -> None:
    """The precision modes, one at most (:func:`llama3.runtime.precision_flag`)."""
    mode = group.add_mutually_exclusive_group()
    mode.add_argument(
        "--fp32",
        action="store_true",
        help="fp32 parameters and arithmetic (the default when no other mode is given)",
    )
    mode.add_argument(
        "--amp_fp16",
        action="store_true",
        help="autocast to float16 with fp32 master weights and a gradient scaler",
    )
    mode.add_argument(
        "--amp_bf16", action="store_true", help="autocast to bfloat16 with fp32 master weights"
    )
    mode.add_argument(
        "--bf16",
        action="store_true",
        help="pure bfloat16 parameters and activations (FSDP: fp32 gradient reduction)",
    )


TOKENIZER = Flag(
    "SentencePiece model file written by train_tokenizer", required=True, metavar="MODEL_FILE"
)


def add_tokenizer_flag(parser: argparse._ActionsContainer, required: bool = True) -> None:
    """The SentencePiece model file."""
    TOKENIZER.add(parser, "tokenizer", required=required)


DATA_MODES = ("packed", "padded")
START_TOKENS = ("eos", "bos", "none")


def add_start_token_flag(group: argparse._ActionsContainer, what: str) -> None:
    """``--start_token``: the token ``what`` follows (see :func:`start_token`)."""
    group.add_argument(
        "--start_token",
        choices=START_TOKENS,
        default="eos",
        help=f"token put before {what}: eos for models trained on packed windows "
        "(documents follow an end-of-sequence token), bos for --data_mode "
        "padded (documents start with beginning-of-sequence)",
    )


def start_token(args: argparse.Namespace) -> str | None:
    """``--start_token`` as the tokenizer's special token name, or None for "none"."""
    return None if args.start_token == "none" else args.start_token


def add_checkpoint_source_flags(
    group: argparse._ActionsContainer, *, tokenizer_required: bool = True
) -> None:
    """``--from_checkpoint`` and ``--tokenizer`` of the commands that load a trained model."""
    group.add_argument(
        "--from_checkpoint",
        required=True,
        metavar="DIR",
        help="run directory (its latest checkpoint), step directory or model.pt",
    )
    add_tokenizer_flag(group, required=tokenizer_required)


DATA_MODE = Flag(
    "packed: documents joined (EOS between) into full windows; padded: one document "
    "per window, as the original, padding not counted by the loss",
    default="packed",
    choices=DATA_MODES,
)
CACHE_DIR = Flag(
    "where the corpus's encoded token shards are kept (default: CORPUS/.tokens/, or "
    "the user cache when the corpus folder is read-only)",
    metavar="DIR",
)


def add_token_cache_flags(group: argparse._ActionsContainer, *, data_mode: bool = True) -> None:
    """Where a corpus's tokens are cached and (with ``data_mode``) how they become windows."""
    if data_mode:
        DATA_MODE.add(group, "data_mode")
    CACHE_DIR.add(group, "cache_dir")


def add_bad_input_flags(parser: argparse.ArgumentParser) -> None:
    """What to do with bad input (:class:`~llama3.data.sources.ProblemLog`)."""
    group = parser.add_argument_group("bad input")
    group.add_argument(
        "--strict",
        action="store_true",
        help="stop with an error at the first bad input (malformed JSON, missing "
        "text, invalid UTF-8, empty, truncated or unreadable file, parquet file "
        "without a text column) instead of skipping and counting it",
    )
    group.add_argument(
        "--max_reports",
        type=int,
        default=5,
        help="bad inputs reported individually (with file and line) before only counting them",
    )


def problem_log_from_flags(
    args: argparse.Namespace, report: str | os.PathLike | None = None
) -> ProblemLog:
    """The log of bad input the flags ask for, listing every problem in ``report``."""
    return ProblemLog(strict=args.strict, max_reports=args.max_reports, report=report)


def add_cleaning_flags(parser: argparse.ArgumentParser, *, recorded: bool = False) -> None:
    """The cleaning steps (:class:`~llama3.data.clean.Cleaner`), each on by default;
    ``recorded``: unset flags take the steps the tokenizer's cleaning record holds (commands that
    encode text for a trained model; :meth:`Cleaner.from_flags` reads them)."""
    if recorded:
        group = parser.add_argument_group(
            "cleaning (default: the steps recorded with the tokenizer, i.e. those the training "
            "text went through; a flag overrides its step)"
        )
    else:
        group = parser.add_argument_group("cleaning (each step on by default, as in the original)")
    flag = argparse.BooleanOptionalAction
    default = None if recorded else True
    group.add_argument(
        "--nfkd",
        action=flag,
        default=default,
        help="Unicode NFKD normalisation (splits accents from letters, expands ligatures)",
    )
    group.add_argument(
        "--ascii",
        action=flag,
        default=default,
        help="keep only ASCII characters (after NFKD, accented letters keep their base letter)",
    )
    group.add_argument("--lowercase", action=flag, default=default, help="lowercase the text")
    group.add_argument(
        "--drop_empty_brackets",
        action=flag,
        default=default,
        help='remove empty bracket pairs: "()", "[]", "{}" (also with spaces inside)',
    )
