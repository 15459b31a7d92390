"""An lm-evaluation-harness model over our checkpoints, registered as ``llama3``.

Importing this module registers it; ``python -m llama3 lm_eval`` (:mod:`llama3.interop.lm_eval_cli`)
is lm-eval's command line with the module imported::

    python -m llama3 lm_eval --model llama3 --model_args checkpoint=RUN,tokenizer=T --tasks ...

Model arguments: ``checkpoint`` and ``tokenizer`` (as for evaluate; both required), ``device``,
``dtype`` (fp32, bf16 or fp16), ``max_length`` (at least 2; default: the checkpoint's context),
``max_gen_toks`` (default 256, or half of ``max_length`` when that is less, so that a context
fits), ``start_token`` (eos for packed training, bos for padded), and the cleaning steps ``nfkd``,
``ascii``, ``lowercase``, ``drop_empty_brackets`` (true or false; default: the steps recorded
with the tokenizer, those its training text went through); lm-eval's ``--batch_size`` (a number)
sets the batch. Text — contexts, continuations, stop strings — goes through that cleaning, and
every context follows the start token, as the training documents did.
Scoring runs the plain forward on right-padded batches sorted by length; ``generate_until`` runs
our batched generator (static cache, CUDA graphs on GPUs) for ``max_gen_toks`` tokens, until
end-of-sequence, or until a row has written a stop string (looked for every 8 steps), and cuts the
text at the first stop string. A model trained on cleaned text never writes a newline, so a
newline as stop string only ends generation at ``max_gen_toks``. When more than 1% of the
requests' tokens are <unk>, the model says so once. A model argument of the wrong kind, a
continuation longer than ``max_length``, a continuation without tokens (an empty answer or
choice) and a generation budget that leaves no room for a context end the run with one line
naming what to change.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import lm_eval.models  # noqa: F401 - the built-in models first, so that registering ours keeps them
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from llama3.data.clean import Cleaner
from llama3.errors import UsageError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_GEN_TOKS = 256  # the generation budget of tasks that set none, when the context allows it
Request = tuple[tuple[str | None, str | None], list[int], list[int]]


@register_model("llama3")
class Llama3LM(TemplateLM):
    """Our checkpoint and SentencePiece tokenizer as an lm-eval ``LM`` (see the module
    docstring)."""

    def __init__(
        self,
        checkpoint: str | None = None,
        tokenizer: str | None = None,
        batch_size: int | str = 16,
        device: str | None = None,
        dtype: str = "fp32",
        max_length: int | None = None,
        max_gen_toks: int | None = None,
        start_token: str = "eos",
        nfkd: bool | None = None,
        ascii: bool | None = None,
        lowercase: bool | None = None,
        drop_empty_brackets: bool | None = None,
        max_batch_size: int | None = None,
        **unknown: Any,
    ):
        super().__init__()
        from llama3.checkpoint import model_from_record, read_model_file
        from llama3.data.tokenizer import load_tokenizer
        from llama3.model.args import ModelArgs

        if unknown:
            raise UsageError(
                f"--model_args: the llama3 model has no argument "
                f"{', '.join(sorted(unknown))} (see python -m llama3 lm_eval --help)"
            )
        for name, value in (("checkpoint", checkpoint), ("tokenizer", tokenizer)):
            if not value:
                raise UsageError(
                    f"--model_args: the llama3 model needs {name}= (give "
                    "checkpoint=RUN,tokenizer=MODEL_FILE, as to evaluate)"
                )
        if dtype not in DTYPES or start_token not in ("eos", "bos"):
            raise UsageError(
                f"--model_args: dtype must be one of {', '.join(DTYPES)} and "
                f"start_token eos or bos (got {dtype}, {start_token})"
            )
        steps = argparse.Namespace(
            **{
                name: _switch(name, value)
                for name, value in (
                    ("nfkd", nfkd),
                    ("ascii", ascii),
                    ("lowercase", lowercase),
                    ("drop_empty_brackets", drop_empty_brackets),
                )
            }
        )
        record = read_model_file(str(checkpoint))
        model_args = ModelArgs.from_dict(record["model_args"])
        self.max_length, self.max_gen_toks = _lengths(
            max_length, max_gen_toks, model_args.max_seq_len
        )
        self.tokenizer = load_tokenizer(
            str(tokenizer), record.get("tokenizer"), model_args.vocab_size
        )
        self._device = _device(device)
        self.model = model_from_record(record, device=self._device, dtype=DTYPES[dtype])
        self.batch_size = _batch_size(batch_size)
        self.start_id = getattr(self.tokenizer, f"{start_token}_id")
        self.cleaner = Cleaner.from_flags(steps, base=self.tokenizer.cleaner)
        self.tokenizer.note_cleaning()
        self._generator = None
        self._ids = [0, 0]  # <unk> ids and all ids of the requests' text so far
        self._warned = False

    @property
    def device(self) -> torch.device:
        return self._device

    # ------------------------------------------------------------------------- tokens

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.start_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.path)

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        """The cleaned text's ids, after the start token unless ``add_special_tokens`` is False."""
        ids = self.tokenizer.encode(self.cleaner(string))
        self._ids[0] += ids.count(self.tokenizer.unk_id)
        self._ids[1] += len(ids)
        return ids if add_special_tokens is False else [self.start_id, *ids]

    def _warn_unknown(self) -> None:
        """Say once when many of the requests' tokens are <unk> (text unlike the training's)."""
        from llama3.data.tokenizer import unknown_share_warning

        warning = unknown_share_warning("lm-eval requests", *self._ids)
        if warning and not self._warned:
            print(warning, file=sys.stderr)
            self._warned = True

    def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------------- scoring

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """TemplateLM's, after refusing a continuation without tokens: there is nothing to score
        (and lm-eval's encoding of an empty context with it fails)."""
        for context, continuation in (r.args for r in requests):
            if not self.tokenizer.encode(self.cleaner(continuation)):
                raise UsageError(
                    f"lm-eval asks for the log-likelihood of {continuation!r} after "
                    f"{context[-40:]!r}, which has no tokens: the task gives an "
                    "empty answer or choice (check its doc_to_target and "
                    "doc_to_choice)"
                )
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    @torch.no_grad()
    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation)
        per request, computed in batches of similar length."""
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        for start in tqdm(
            range(0, len(order), self.batch_size), disable=disable_tqdm, desc="scoring"
        ):
            batch = order[start : start + self.batch_size]
            for i, result in zip(batch, self._score([requests[i] for i in batch])):
                results[i] = result
                if requests[i][0][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], result)
        self._warn_unknown()
        return results

    def _score(self, batch: list[Request]) -> list[tuple[float, bool]]:
        rows = []
        for _, context, continuation in batch:
            if len(continuation) > self.max_length:
                raise UsageError(
                    f"lm-eval asks for a continuation of {len(continuation)} tokens, "
                    f"more than max_length {self.max_length}: give a larger "
                    "max_length= in --model_args"
                )
            rows.append((context + continuation)[-(self.max_length + 1) :][:-1])
        width = max(len(r) for r in rows)
        inputs = torch.full((len(rows), width), self.tokenizer.padding_id, dtype=torch.long)
        for b, row in enumerate(rows):
            inputs[b, : len(row)] = torch.as_tensor(row)
        logits = self.model(inputs.to(self.device))
        out = []
        for b, (row, (_, _, continuation)) in enumerate(zip(rows, batch)):
            n = len(continuation)
            logprobs = F.log_softmax(logits[b, len(row) - n : len(row)].float(), dim=-1)  # (n, V)
            target = torch.as_tensor(continuation, device=self.device)
            total = logprobs.gather(-1, target[:, None]).sum().item()
            out.append((total, bool((logprobs.argmax(-1) == target).all())))
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, in disjoint windows of ``max_length`` predictions,
        each window seeing the ``max_length`` tokens before its last prediction."""
        windows: list[Request] = []
        counts = []
        for (text,) in (r.args for r in requests):
            tokens = self.tok_encode(text, add_special_tokens=False)
            pairs = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    tokens, self.prefix_token_id, self.max_length, context_len=1
                )
            ]
            windows += [((None, None), context, continuation) for context, continuation in pairs]
            counts.append(len(pairs))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals, done = [], 0
        for request, count in zip(requests, counts):
            totals.append(sum(score for score, _ in scores[done : done + count]))
            done += count
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, totals[-1])
        return totals

    # ------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Continue each context; requests with the same generation settings run batched."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(i)
        results = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generating")
        for indices in groups.values():
            settings, stops = self._generation_settings(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                contexts = [requests[i].args[0] for i in batch]
                for i, text in zip(batch, self._generate(contexts, settings, stops)):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        self._warn_unknown()
        return results

    def _generation_settings(self, kwargs: dict[str, Any]) -> tuple[Any, list[str]]:
        """Our SamplingSettings and the cleaned stop strings for lm-eval's generation kwargs."""
        from llama3.generate import SamplingSettings

        until = kwargs.get("until") or []
        stops = [self.cleaner(s) for s in ([until] if isinstance(until, str) else until)]
        budget = next(
            (kwargs[k] for k in ("max_gen_toks", "max_new_tokens") if k in kwargs),
            self.max_gen_toks,
        )
        sample = kwargs.get("do_sample", float(kwargs.get("temperature", 0.0)) > 0)
        temperature = float(kwargs.get("temperature", 1.0)) if sample else 0.0
        settings = SamplingSettings(
            max_new_tokens=int(budget),
            temperature=temperature,
            top_k=int(kwargs.get("top_k") or 0),
            top_p=float(kwargs.get("top_p") or 1.0),
            seed=int(kwargs.get("seed") or 0),
        )
        return settings, [s for s in stops if s]

    def _generate(self, contexts: list[str], settings: Any, stops: list[str]) -> list[str]:
        from llama3.generate import Generator, completion_text

        if self._generator is None:
            self._generator = Generator(
                self.model,
                self.tokenizer,
                self.device,
                eos_id=self.tokenizer.eos_id,
                pad_id=self.tokenizer.padding_id,
            )
        room = self.max_length - settings.max_new_tokens
        if room < 1:
            raise UsageError(
                f"the task asks for max_gen_toks {settings.max_new_tokens}, which "
                f"leaves no room for a context in max_length {self.max_length}: give "
                f"--gen_kwargs max_gen_toks=N with N below {self.max_length}"
            )
        prompts = [self.tok_encode(c)[-room:] for c in contexts]

        def until(row: int, ids: list[int]) -> bool:  # a stop string written: the row is done
            text = completion_text(self.tokenizer, prompts[row], ids)
            return any(stop in text for stop in stops)

        result = self._generator.generate_ids(prompts, settings, until=until if stops else None)
        texts = [completion_text(self.tokenizer, p, t) for p, t in zip(prompts, result.tokens)]
        return [cut_at_stops(text, stops) for text in texts]


def cut_at_stops(text: str, stops: list[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def _device(name: str | None) -> torch.device:
    """The device asked for; lm-eval's command line asks for cuda:0 unless told otherwise, so on a
    machine without CUDA that request runs on the CPU (said once)."""
    from llama3.runtime import select_device

    if name and name.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"note: lm-eval asks for device {name}, but CUDA is not available: running on the CPU",
            file=sys.stderr,
        )
        name = "cpu"
    return select_device(name)


def _lengths(max_length: Any, max_gen_toks: Any, context: int) -> tuple[int, int]:
    """(max_length, max_gen_toks): the model's context by default, and a generation budget that
    leaves room for a context in it."""
    length = _count("max_length", context if max_length is None else max_length, 2)
    budget = (
        min(MAX_GEN_TOKS, length // 2)
        if max_gen_toks is None
        else _count("max_gen_toks", max_gen_toks, 1)
    )
    if budget >= length:
        raise UsageError(
            f"--model_args max_gen_toks={budget} leaves no room for a context in "
            f"max_length {length}: give a smaller max_gen_toks"
        )
    return length, budget


def _count(name: str, value: Any, least: int) -> int:
    """A whole-number model argument, at least ``least``."""
    text = str(value)
    if isinstance(value, bool) or not text.lstrip("-").isdecimal() or int(text) < least:
        raise UsageError(
            f"--model_args {name}={value}: expected a whole number of at least {least}"
        )
    return int(text)


def _switch(name: str, value: Any) -> bool | None:
    """A cleaning-step model argument: true, false, or None (the tokenizer's record)."""
    if value is not None and not isinstance(value, bool):
        raise UsageError(f"--model_args {name}={value}: expected true or false")
    return value


def _batch_size(value: int | str) -> int:
    """lm-eval passes its --batch_size through, possibly as "auto"; we take a number."""
    text = str(value)
    if text.startswith("auto"):
        raise UsageError("--batch_size auto is not supported by the llama3 model; give a number")
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"--batch_size {value}: expected a positive number")
    return int(text)
