"""``python -m llama3 generate``: sample continuations of prompts from a checkpoint with
:class:`~llama3.generate.Generator`; the prompts come from flags, a file or stdin, and the
completions stream to stdout."""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import torch
from torch import Tensor

from llama3.cli import (
    add_checkpoint_source_flags,
    add_model_flags,
    add_precision_flags,
    add_seq_len_flag,
    add_start_token_flag,
    model_flag_values,
    seq_len_from_flags,
    start_token,
)
from llama3.errors import UsageError
from llama3.generate import GenerationResult, Generator, SamplingSettings

_ALLOCATION_FAILED = ("not enough memory", "can't allocate memory")  # torch's CPU allocator


DESCRIPTION = """\
Sample continuations of prompts from a checkpoint. Each prompt is cleaned as the tokenizer's
training text was (the cleaning recorded with the tokenizer) and printed as cleaned; a prompt with
many characters the tokenizer never saw gets a warning. One prompt streams its completion as it is
generated; several run as one batch (right-padded, each row decoding from its own length) and
print in order, each after a "--- [i]" line, when all are done. A row stops at the end-of-sequence
token. Timings (prefill and decode tokens/s) go to stderr. On CUDA each decode step replays a
captured CUDA graph; on CPU it runs eagerly.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    source = parser.add_argument_group("checkpoint")
    add_checkpoint_source_flags(source)
    add_model_flags(parser, from_checkpoint=True)
    prompts = parser.add_argument_group("prompts (default: one per line on stdin)")
    prompts.add_argument(
        "--prompt", action="append", default=[], metavar="TEXT", help="a prompt; repeat for a batch"
    )
    prompts.add_argument(
        "--prompt_file",
        metavar="FILE",
        help="a file of prompts, one per line (blank lines skipped)",
    )
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument(
        "--max_new_tokens", type=int, default=128, help="tokens to generate per prompt at most"
    )
    sampling.add_argument(
        "--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy"
    )
    sampling.add_argument(
        "--top_k", type=int, default=0, help="sample among the k most probable tokens only; 0 = off"
    )
    sampling.add_argument(
        "--nucleus_prob",
        type=float,
        default=0.9,
        help="nucleus (top-p) sampling: the smallest set of tokens with this "
        "much probability; 1 = off",
    )
    sampling.add_argument(
        "--seed",
        type=int,
        default=0,
        help="sampling seed: the same seed, prompts and flags give the same text",
    )
    decoding = parser.add_argument_group("decoding")
    add_seq_len_flag(
        decoding,
        "a prompt and its completion longer than this get a warning "
        "(set it to generate past the training context on purpose)",
    )
    decoding.add_argument(
        "--max_batch_size",
        type=int,
        default=64,
        help="prompts generated together; more run in successive batches",
    )
    decoding.add_argument(
        "--no_cuda_graph",
        action="store_true",
        help="decode eagerly on CUDA instead of replaying a captured CUDA graph",
    )
    add_start_token_flag(decoding, "each prompt")
    add_precision_flags(parser)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            data = Path(args.prompt_file).read_bytes()
        except OSError as err:
            raise UsageError(f"--prompt_file {args.prompt_file}: {err.strerror or err}") from err
        prompts += prompt_lines(data, f"--prompt_file {args.prompt_file}")
    if not args.prompt and not args.prompt_file:
        if sys.stdin.isatty():
            raise UsageError(
                "no prompts: give --prompt TEXT, --prompt_file FILE, or pipe prompts "
                "on stdin, one per line"
            )
        buffer = getattr(sys.stdin, "buffer", None)  # None: stdin replaced by a text stream
        text = sys.stdin.read() if buffer is None else buffer.read()
        prompts = prompt_lines(text, "standard input")
    if not prompts:
        raise UsageError("no prompts: the given prompt file or stdin holds only blank lines")
    return prompts


def prompt_lines(data: bytes | str, source: str) -> list[str]:
    """The non-blank lines of ``data``; UsageError naming ``source`` when it is not UTF-8 text."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as err:
        raise UsageError(
            f"{source}: not UTF-8 text (byte {err.start} is "
            f"{data[err.start : err.start + 1]!r}); give text, one prompt per "
            "line"
        ) from err
    return [line for line in text.splitlines() if line.strip()]


def run(args: argparse.Namespace) -> int:
    from llama3.checkpoint import model_from_record, read_checked_record
    from llama3.data.tokenizer import load_tokenizer
    from llama3.runtime import Precision, configure_matmul, select_device

    settings = SamplingSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.nucleus_prob,
        seed=args.seed,
    )
    if args.max_batch_size < 1:
        raise UsageError(f"--max_batch_size must be at least 1, got {args.max_batch_size}")
    prompts = read_prompts(args)
    record, model_args = read_checked_record(args.from_checkpoint, model_flag_values(args))
    seq_len = seq_len_from_flags(args, model_args)
    tokenizer = load_tokenizer(args.tokenizer, record.get("tokenizer"), model_args.vocab_size)
    tokenizer.note_cleaning()
    device = select_device(args.device)
    configure_matmul(args.allow_tf32)
    precision = Precision.from_flags(args)
    model = model_from_record(record, device=device, dtype=precision.param_dtype)
    generator = Generator(
        model,
        tokenizer,
        device,
        cuda_graph=not args.no_cuda_graph,
        pad_id=tokenizer.padding_id,
        autocast_dtype=precision.autocast_dtype,
        start=start_token(args),
    )
    longest = check_prompts(generator, prompts, settings, seq_len)
    check_memory(generator, min(len(prompts), args.max_batch_size), longest, settings)
    with out_of_memory_said(device):
        for start in range(0, len(prompts), args.max_batch_size):
            batch = prompts[start : start + args.max_batch_size]
            result = generate_and_print(generator, tokenizer, batch, settings, first_index=start)
            print(result.stats_line(), file=sys.stderr, flush=True)
    return 0


def check_prompts(
    generator: Generator, prompts: list[str], settings: SamplingSettings, context: int
) -> int:
    """Refuse empty prompts; warn when a prompt has many unknown tokens, and when a prompt and its
    completion exceed ``context`` tokens (the model's context, or ``--seq_len``). Returns the
    length of the longest prompt in tokens."""
    from llama3.data.tokenizer import unknown_share_warning

    encoded = [generator.encode(p) for p in prompts]
    lengths = [len(ids) for ids in encoded]
    if min(lengths) == 0:
        raise UsageError("an empty prompt with --start_token none has no token to continue from")
    unk, start = generator.tokenizer.unk_id, len(generator.start_ids)
    for i, ids in enumerate(encoded):
        warning = unknown_share_warning(f"prompt {i}", ids[start:].count(unk), len(ids) - start)
        if warning:
            print(warning, file=sys.stderr)
    if max(lengths) + settings.max_new_tokens > context:
        print(
            f"warning: prompt ({max(lengths)} tokens) + --max_new_tokens "
            f"{settings.max_new_tokens} exceeds the context of {context} tokens",
            file=sys.stderr,
        )
    return max(lengths)


def check_memory(
    generator: Generator, batch: int, longest: int, settings: SamplingSettings
) -> None:
    """Refuse, before allocating it, a cache larger than the device's free memory (on the CPU the
    kernel's out-of-memory killer would end the process without a word)."""
    need = generator.buffer_bytes(batch, longest, settings.max_new_tokens)
    free = free_memory(generator.device)
    if free is not None and need > free:
        raise UsageError(
            f"--max_new_tokens {settings.max_new_tokens}: the cache for {batch} "
            f"prompt(s) of up to {longest} tokens and the new tokens would need "
            f"{need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free on "
            f"{generator.device}; lower --max_new_tokens (or --max_batch_size)"
        )


def free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` now; None where unknown."""
    from llama3.deploy.runners import available_memory

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_memory() if device.type == "cpu" else None


@contextlib.contextmanager
def out_of_memory_said(device: torch.device) -> Iterator[None]:
    """An allocation that fails (a long prompt's prefill) as one line saying what to lower."""
    try:
        yield
    except RuntimeError as err:
        if not (
            isinstance(err, torch.OutOfMemoryError)
            or any(words in str(err) for words in _ALLOCATION_FAILED)
        ):
            raise
        size = re.search(r"tried to allocate (\d[\d.]* ?\w+)", str(err), re.IGNORECASE)
        raise UsageError(
            f"generation ran out of memory on {device}"
            + (f" (it tried to allocate {size[1]} at once)" if size else "")
            + ": shorten the prompts, or lower --max_new_tokens or --max_batch_size"
        ) from err


def generate_and_print(
    generator: Generator,
    tokenizer: object,
    prompts: list[str],
    settings: SamplingSettings,
    first_index: int = 0,
) -> GenerationResult:
    """One prompt: print it, then stream the completion. Several: print each when all are done.
    Each prompt is printed as the model reads it: cleaned as the training text was."""
    if len(prompts) == 1:
        print(tokenizer.clean(prompts[0]), end="", flush=True)
        stream = TextStream(tokenizer, generator.encode(prompts[0]), generator.eos_id)
        result = generator.generate(prompts, settings, on_step=stream)
        print(flush=True)
        return result
    result = generator.generate(prompts, settings)
    for i, (prompt, text) in enumerate(zip(prompts, result.texts), start=first_index):
        print(f"--- [{i}]\n{tokenizer.clean(prompt)}{text}")
    return result


class TextStream:
    """Prints row 0's completion as it grows. Each step decodes prompt and completion so far and
    prints what was added, so characters spanning tokens and word-boundary spaces come out right."""

    def __init__(
        self,
        tokenizer: object,
        prompt: Sequence[int],
        eos_id: int | None,
        out: IO[str] | None = None,
    ):
        self.tokenizer, self.eos_id, self.out = tokenizer, eos_id, out or sys.stdout
        self.ids = list(prompt)
        self.shown = tokenizer.decode(self.ids)
        self.stopped = False

    def __call__(self, tokens: Tensor) -> None:
        token = int(tokens[0])
        if self.stopped or token == self.eos_id:
            self.stopped = True
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.startswith(self.shown):
            self.out.write(text[len(self.shown) :])
            self.out.flush()
            self.shown = text
