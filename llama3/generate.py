"""Text generation: the :class:`Generator` behind ``python -m llama3 generate``
(:mod:`llama3.commands.generate`).

Prompts of different lengths run as one batch: they are right-padded and prefilled together into a
pre-allocated :class:`~llama3.model.transformer.StaticKVCache`, then each row decodes from its own
length (``cache.lengths``). Decode steps have fixed shapes — tokens (B, 1), lengths (B,) — so on
CUDA one step is captured once in a CUDA graph and replayed; on CPU it runs eagerly. Sampling
(temperature, top-k, nucleus) happens outside the graph, from a seeded ``torch.Generator``, so a
seed fixes the output. A row stops at its end-of-sequence token or when the caller's ``until``
says so (stop strings); the batch stops when all rows have.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from llama3.errors import ConfigError
from llama3.model.transformer import StaticKVCache, cache_shape

CAPACITY_ROUNDING = 128  # cache capacity is rounded up so graphs are reused across similar calls
CHECK_EVERY = 8  # decode steps between looks at which rows are done (each look syncs the host)

# ------------------------------------------------------------------------------------ sampling


@dataclass
class SamplingSettings:
    """How to pick each next token. temperature 0 is greedy; top_k 0 and top_p 1 disable those.
    An invalid value raises :class:`ConfigError` naming its field."""

    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError("{max_new_tokens} must be at least 1, got {}", self.max_new_tokens)
        if not 0 <= self.temperature < math.inf:
            raise ConfigError("{temperature} must be a number ≥ 0, got {}", self.temperature)
        if self.top_k < 0:
            raise ConfigError("{top_k} must be ≥ 0 (0: off), got {}", self.top_k)
        if not 0 < self.top_p <= 1:
            raise ConfigError("{top_p} must be in (0, 1], got {}", self.top_p)


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    return logits / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row (ties at the k-th kept), the rest to −inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the most probable tokens until their mass reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more probable tokens
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def pick(logits: Tensor, settings: SamplingSettings, noise: Tensor | None) -> Tensor:
    """One token per row from logits (B, V): the argmax at temperature 0, else the draw that
    ``noise`` (B, V), i.i.d. Exp(1), selects: argmax(p / noise) is an exact sample of p, and needs
    neither a host synchronisation (unlike torch.multinomial) nor a generator of its own, so it can
    be captured in a CUDA graph while the noise is drawn outside."""
    logits = logits.float()
    if settings.temperature == 0:
        return logits.argmax(dim=-1)
    logits = apply_temperature(logits, settings.temperature)
    logits = top_p_filter(top_k_filter(logits, settings.top_k), settings.top_p)
    return (torch.softmax(logits, dim=-1) / noise).argmax(dim=-1)


def sample(logits: Tensor, settings: SamplingSettings, generator: torch.Generator) -> Tensor:
    """:func:`pick` with noise drawn from ``generator`` (none at temperature 0)."""
    noise = None
    if settings.temperature != 0:
        noise = torch.empty(logits.shape, device=logits.device).exponential_(
            1.0, generator=generator
        )
    return pick(logits, settings, noise)


# ---------------------------------------------------------------------------------- generator


@dataclass
class GenerationResult:
    """Generated ids per prompt (end-of-sequence excluded) and timings."""

    tokens: list[list[int]]
    finished: list[bool]  # the row produced its end-of-sequence token, or ``until`` ended it
    prompt_tokens: int
    prefill_s: float  # prefill and the first sampled token
    decode_s: float
    decode_steps: int
    texts: list[str] = field(default_factory=list)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def decode_tokens(self) -> int:
        """Tokens made by decode steps (the first of each row comes from the prefill)."""
        return sum(max(len(t) + f - 1, 0) for t, f in zip(self.tokens, self.finished))

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def stats_line(self) -> str:
        return (
            f"prefill: {self.prompt_tokens} tokens in {self.prefill_s:.3f} s "
            f"({self.prefill_tokens_per_s:.1f} tokens/s); decode: {self.decode_tokens} tokens "
            f"in {self.decode_s:.3f} s ({self.decode_tokens_per_s:.1f} tokens/s, batch "
            f"{len(self.tokens)})"
        )


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast without its cache of cast weights, whose copies a CUDA graph must not outlive."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


class _DecodeStep:
    """Static buffers — cache, the (B, 1) tokens fed next, finished rows, sampling noise — and one
    decode step over them: forward, sample, mark rows that produced end-of-sequence, feed the
    token back. On CUDA the step is captured in a CUDA graph (once per sampling settings) and
    replayed; elsewhere the same function runs eagerly."""

    def __init__(
        self,
        model: nn.Module,
        batch: int,
        capacity: int,
        n_ids: int,
        device: torch.device,
        dtype: torch.dtype,
        autocast_dtype: torch.dtype | None,
        use_graph: bool,
    ):
        self.model, self.batch, self.capacity, self.n_ids = model, batch, capacity, n_ids
        self.device, self.autocast_dtype, self.use_graph = device, autocast_dtype, use_graph
        self.cache = StaticKVCache.allocate(model.args, batch, capacity, device, dtype)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.noise = torch.ones(batch, n_ids, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: tuple | None = None
        self.settings, self.eos, self.pad = SamplingSettings(), None, 0

    def prepare(self, settings: SamplingSettings, eos: int | None, pad: int) -> None:
        """Empty the buffers; capture the step again if the sampling settings changed."""
        key = (settings.temperature, settings.top_k, settings.top_p, eos, pad)
        self.settings, self.eos, self.pad = settings, eos, pad
        if self.use_graph and key != self.key:
            self.graph = None
            self._capture()
        self.key = key
        self.reset()

    def reset(self) -> None:
        self.cache.reset()
        self.tokens.zero_()
        self.done.zero_()

    def start(self, first: Tensor) -> None:
        """Take the prefill's token (B,) as the first one fed to the decode steps."""
        if self.eos is not None:
            self.done |= first == self.eos
        self.tokens.copy_(first.view(-1, 1))

    def _step(self) -> None:
        with _autocast(self.device, self.autocast_dtype):
            logits = self.model(self.tokens, cache=self.cache)[:, -1, : self.n_ids]  # (B, V)
        self.cache.lengths.add_(1)
        token = torch.where(self.done, self.pad, pick(logits, self.settings, self.noise))
        if self.eos is not None:
            self.done |= token == self.eos
        self.tokens.copy_(token.view(-1, 1))

    def _capture(self) -> None:
        self.noise.fill_(1.0)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: lazy initialisation, kernel compilation, tuning
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self.graph = graph

    def __call__(self, generator: torch.Generator) -> Tensor:
        """One decode step; returns the tokens it produced (B,) (pad for finished rows)."""
        if self.settings.temperature != 0:
            self.noise.exponential_(1.0, generator=generator)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        return self.tokens[:, 0]


class Generator:
    """Batched generation with a static KV cache (and a CUDA-graphed decode step on CUDA).

    ``model`` runs in its parameter dtype, or under autocast to ``autocast_dtype``; the caches
    take the dtype the keys come out in. ``tokenizer`` is needed for text prompts
    (:meth:`generate`), which start with the tokenizer's ``start`` token ("eos": packed training
    puts one before every document but the first; "bos": padded training starts documents with
    it; None: nothing); :meth:`generate_ids` works on token ids alone. With a tokenizer, only its
    ids are sampled: a model whose vocabulary was padded beyond it never writes one it cannot
    decode.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: object | None = None,
        device: torch.device | str | None = None,
        *,
        cuda_graph: bool = True,
        eos_id: int | None = None,
        pad_id: int = 0,
        autocast_dtype: torch.dtype | None = None,
        start: str | None = "eos",
    ):
        param = next(model.parameters())
        self.device = torch.device(device) if device is not None else param.device
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.autocast_dtype = autocast_dtype
        self.dtype = autocast_dtype or param.dtype
        self.use_graph = cuda_graph and self.device.type == "cuda"
        self.eos_id = eos_id if eos_id is not None else getattr(tokenizer, "eos_id", None)
        self.pad_id = pad_id
        self.start_ids = [getattr(tokenizer, f"{start}_id")] if tokenizer and start else []
        self.n_ids = min(getattr(tokenizer, "vocab_size", math.inf), model.args.vocab_size)
        self._step: _DecodeStep | None = None

    def encode(self, prompt: str) -> list[int]:
        """A text prompt as the ids :meth:`generate` feeds: the start token, then the text cleaned
        as the tokenizer's training text was."""
        return self.start_ids + self.tokenizer.encode(self.tokenizer.clean(prompt))

    def generate(
        self,
        prompts: Sequence[str],
        settings: SamplingSettings = SamplingSettings(),
        on_step: Callable[[Tensor], None] | None = None,
    ) -> GenerationResult:
        """Text in, text out (see :meth:`encode`)."""
        if self.tokenizer is None:
            raise ValueError("Generator.generate needs a tokenizer; use generate_ids for token ids")
        ids = [self.encode(p) for p in prompts]
        result = self.generate_ids(ids, settings, on_step=on_step)
        result.texts = [completion_text(self.tokenizer, p, t) for p, t in zip(ids, result.tokens)]
        return result

    @torch.no_grad()
    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        settings: SamplingSettings = SamplingSettings(),
        *,
        on_step: Callable[[Tensor], None] | None = None,
        stop_at_eos: bool = True,
        until: Callable[[int, list[int]], bool] | None = None,
    ) -> GenerationResult:
        """Continue each prompt by up to ``settings.max_new_tokens`` tokens.

        ``on_step`` receives each step's sampled tokens (B,) on the CPU (rows already finished
        hold the pad id). With ``stop_at_eos=False`` every row runs the full length (benchmarks).
        ``until(row, new_ids)`` is asked every CHECK_EVERY steps for each running row: True ends
        that row there (a caller's stop strings), and the batch stops once every row has ended.
        """
        lengths = [len(p) for p in prompts]
        if not prompts or min(lengths) == 0:
            raise ValueError("every prompt needs at least one token")
        eos = self.eos_id if stop_at_eos else None
        step = self._decode_step(len(prompts), _capacity(max(lengths) + settings.max_new_tokens))
        step.prepare(settings, eos, self.pad_id)
        generator = torch.Generator(device=self.device).manual_seed(settings.seed)
        self._sync()
        start = time.perf_counter()
        first = self._prefill(step, prompts, lengths, settings, generator)
        self._sync()
        prefill_s = time.perf_counter() - start
        out, n_steps, ended = self._decode(step, first, settings, generator, on_step, until)
        self._sync()
        decode_s = time.perf_counter() - start - prefill_s
        tokens, finished = _trim(out.tolist(), eos)
        for row, length in ended.items():
            tokens[row], finished[row] = tokens[row][:length], True
        return GenerationResult(
            tokens=tokens,
            finished=finished,
            prompt_tokens=sum(lengths),
            prefill_s=prefill_s,
            decode_s=decode_s,
            decode_steps=n_steps,
        )

    def buffer_bytes(self, batch: int, longest_prompt: int, max_new_tokens: int) -> int:
        """Bytes :meth:`generate_ids` allocates for a batch: the cache of every layer for prompt
        and new tokens, and the new tokens' ids."""
        positions = _capacity(longest_prompt + max_new_tokens)
        cache = math.prod(cache_shape(self.model.args, batch, positions))
        return 2 * cache * self.dtype.itemsize + 8 * batch * max_new_tokens

    def _decode_step(self, batch: int, capacity: int) -> _DecodeStep:
        """The cache and graph for this batch size, reused when large enough."""
        step = self._step
        if step is None or step.batch != batch or step.capacity < capacity:
            self._step = None  # free the old buffers (and graph) before allocating new ones
            step = _DecodeStep(
                self.model,
                batch,
                capacity,
                self.n_ids,
                self.device,
                self.dtype,
                self.autocast_dtype,
                self.use_graph,
            )
            self._step = step
        return step

    def _prefill(
        self,
        step: _DecodeStep,
        prompts: Sequence[Sequence[int]],
        lengths: list[int],
        settings: SamplingSettings,
        generator: torch.Generator,
    ) -> Tensor:
        """Right-padded prompts into the cache; returns the first sampled token per row."""
        width = max(lengths)
        padded = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        for row, ids in enumerate(prompts):
            padded[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        with _autocast(self.device, self.autocast_dtype):
            logits = self.model(padded.to(self.device), cache=step.cache)  # (B, width, V)
        last = torch.as_tensor(lengths, device=self.device) - 1
        step.cache.lengths.copy_(last + 1)
        rows = torch.arange(len(prompts), device=self.device)
        return sample(logits[rows, last, : self.n_ids], settings, generator)

    def _decode(
        self,
        step: _DecodeStep,
        first: Tensor,
        settings: SamplingSettings,
        generator: torch.Generator,
        on_step: Callable[[Tensor], None] | None,
        until: Callable[[int, list[int]], bool] | None,
    ) -> tuple[Tensor, int, dict[int, int]]:
        """Decode until every row has finished or the budget is spent; returns the (B, n) ids
        (end-of-sequence included, pad after it), the number of decode steps and the rows
        ``until`` ended, with the number of ids each keeps."""
        out = torch.full(
            (first.shape[0], settings.max_new_tokens),
            self.pad_id,
            dtype=torch.long,
            device=self.device,
        )
        ended: dict[int, int] = {}
        step.start(first)
        for i in range(settings.max_new_tokens):
            token = first if i == 0 else step(generator)
            out[:, i] = token
            if on_step is not None:
                on_step(token.cpu())
            # Looking at ``done`` costs a host synchronisation: every step only when streaming.
            look = on_step is not None or i % CHECK_EVERY == CHECK_EVERY - 1
            if look and until is not None:
                self._end_rows(step, out[:, : i + 1], until, ended)
            if look and (step.eos is not None or until is not None) and bool(step.done.all()):
                return out[:, : i + 1], i, ended
        return out, settings.max_new_tokens - 1, ended

    @staticmethod
    def _end_rows(
        step: _DecodeStep,
        out: Tensor,
        until: Callable[[int, list[int]], bool],
        ended: dict[int, int],
    ) -> None:
        """Ask ``until`` about every running row; a row it ends gets padding from here on."""
        running = (~step.done).nonzero().flatten().tolist()
        for row, ids in zip(running, out[running].tolist()):
            if until(row, ids):
                ended[row] = len(ids)
                step.done[row] = True

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _capacity(positions: int) -> int:
    """Cache length for ``positions``, rounded up so that graphs are reused across calls."""
    return -(-positions // CAPACITY_ROUNDING) * CAPACITY_ROUNDING


def completion_text(tokenizer: object, prompt: Sequence[int], new: Sequence[int]) -> str:
    """The text ``new`` adds after ``prompt``. Decoding the ids alone would drop the space a
    leading word-boundary token stands for; decoding both and subtracting keeps it."""
    before = tokenizer.decode(list(prompt))
    after = tokenizer.decode(list(prompt) + list(new))
    return after[len(before) :] if after.startswith(before) else tokenizer.decode(list(new))


def _trim(rows: list[list[int]], eos: int | None) -> tuple[list[list[int]], list[bool]]:
    """Cut each row at its first end-of-sequence token (excluded)."""
    tokens, finished = [], []
    for row in rows:
        if eos is not None and eos in row:
            tokens.append(row[: row.index(eos)])
            finished.append(True)
        else:
            tokens.append(row)
            finished.append(False)
    return tokens, finished
