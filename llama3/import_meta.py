"""A Meta Llama 3 checkpoint (``params.json`` and ``consolidated.*.pth``) → our model, softmax
attention with SwiGLU (``python -m llama3 import_meta`` saves it as a checkpoint at step 0).

Shards are read memory-mapped where the file format allows, merged along Meta's model-parallel
axes (:func:`llama3.model.meta.merge_shards`) and assigned to a model built on the ``meta`` device,
so the weights are held once, in the dtype Meta stored them in.

Meta's ``tokenizer.model`` for Llama 3 is a tiktoken BPE file, while our commands read SentencePiece
models; it is therefore not recorded in the checkpoint (a SentencePiece ``tokenizer.model``, as
Llama 2 shipped, is).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from llama3.checkpoint import tokenizer_fingerprint
from llama3.errors import UsageError
from llama3.model.args import ConfigError, ModelArgs
from llama3.model.meta import merge_shards, model_args_from_params
from llama3.model.transformer import Transformer

PARAMS_FILE = "params.json"
SHARD_PATTERN = "consolidated.*.pth"
TOKENIZER_FILE = "tokenizer.model"


def read_params(params_path: Path, shard_paths: list[Path], max_seq_len: int) -> ModelArgs:
    """Our ModelArgs from ``params.json``; an invalid setting is a :class:`ConfigError` of the
    file, naming the setting."""
    try:
        params = json.loads(params_path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{params_path}: cannot read it as JSON ({err})") from err
    if not isinstance(params, dict):
        raise UsageError(f"{params_path}: expected a JSON object")
    if params.get("vocab_size", 0) <= 0:
        rows = embedding_rows(shard_paths)
        raise UsageError(
            f"{params_path}: vocab_size is {params.get('vocab_size')}; set it to the "
            f"tokenizer's vocabulary size (the embedding in "
            f"{', '.join(p.name for p in shard_paths)} has {rows} rows)"
        )
    try:
        return model_args_from_params(params, max_seq_len=max_seq_len)
    except ConfigError as err:
        raise err.at(params_path) from err


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """One shard on CPU: memory-mapped when its format allows, tensors only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (non-zip) format cannot be mapped; try reading it whole
        pass
    except Exception as err:
        raise UsageError(f"cannot read {path}: {_first_line(err)}") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UsageError(
            f"cannot read {path} as a PyTorch file of tensors: {_first_line(err)}"
        ) from err


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def embedding_rows(shard_paths: list[Path]) -> int | str:
    """Rows of the whole embedding: Meta splits it by rows, evenly, over the shards."""
    weight = load_shard(shard_paths[0]).get("tok_embeddings.weight")
    if weight is None:
        return "no tok_embeddings.weight, so unknown"
    return weight.shape[0] * len(shard_paths)


def load_shards(shard_paths: list[Path]) -> dict[str, torch.Tensor]:
    shards = []
    for path in shard_paths:
        print(f"reading {path}", file=sys.stderr, flush=True)
        shard = load_shard(path)
        if not isinstance(shard, dict):
            raise UsageError(f"{path}: expected a state dict of tensors")
        shards.append(shard)
    try:
        return merge_shards(shards)
    except ConfigError as err:
        raise UsageError(f"{', '.join(p.name for p in shard_paths)}: {err}") from err


def build_model(
    model_args: ModelArgs, state: dict[str, torch.Tensor], source: str, reference: str
) -> Transformer:
    """Our model holding ``state``'s tensors (assigned, not copied), after checking their names and
    shapes; ``source`` names the files they came from, ``reference`` the file the shapes follow."""
    with torch.device("meta"):
        model = Transformer(model_args)
    check_state(
        {k: tuple(v.shape) for k, v in model.state_dict().items()}, state, source, reference
    )
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def check_state(
    expected: dict[str, tuple[int, ...]],
    state: dict[str, torch.Tensor],
    source: str,
    reference: str,
) -> None:
    """UsageError naming ``source`` and each missing, unexpected or misshapen tensor."""
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k} has shape {tuple(state[k].shape)}, {reference} implies {shape}"
        for k, shape in expected.items()
        if k in state and tuple(state[k].shape) != shape
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; … {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        raise UsageError(f"{source} do not match {reference}: {shown}")


def tokenizer_record(path: Path) -> tuple[dict[str, str] | None, str]:
    """The fingerprint to record (SentencePiece files only) and a note for the user."""
    if not path.is_file():
        return None, f"note: no {path.name} in {path.parent}; no tokenizer recorded"
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_proto=path.read_bytes())
    except Exception:
        return None, (
            f"note: {path} is not a SentencePiece model (Llama 3 ships a tiktoken BPE file), so "
            "no tokenizer is recorded. Our evaluate and generate commands read SentencePiece "
            "models; the imported checkpoint loads with llama3.load_checkpoint and runs "
            "'python -m llama3 deploy --from_checkpoint CKPT' (export, logits checks, latency) "
            "without one."
        )
    return tokenizer_fingerprint(path), f"tokenizer: recorded {path} (SentencePiece)"
