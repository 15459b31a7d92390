"""A Hugging Face Llama directory → our model (``python -m llama3 import_hf`` saves it as a
checkpoint, weights only, step 0, for continued pretraining with ``train --from_checkpoint`` or
for evaluate, generate and deploy).

Reads ``LlamaForCausalLM`` directories (from export_hf or anywhere else) and the remote-code
directories export_hf writes for softplus attention and the Combinator; weights in
``model.safetensors`` or sharded with ``model.safetensors.index.json``. Tied embeddings are untied
(our model has separate input and output matrices). A directory export_hf wrote carries our
ModelArgs, so export → import → export gives identical files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llama3.errors import UsageError
from llama3.interop import hf_format
from llama3.model.args import LEGACY, ConfigError, ModelArgs

CONFIG_FILE = "config.json"
IGNORED_KEYS = ("rotary_emb.inv_freq",)  # a precomputed table in some older directories


def read_config(hf_dir: Path) -> dict[str, Any]:
    if not hf_dir.is_dir():
        raise UsageError(f"--hf_dir {hf_dir}: no such directory")
    path = hf_dir / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except OSError as err:
        raise UsageError(
            f"--hf_dir {hf_dir}: cannot read {CONFIG_FILE} ({err.strerror or err})"
        ) from err
    except ValueError as err:
        raise UsageError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise UsageError(f"{path}: expected a JSON object")
    return config


def detect_format(config: dict[str, Any], hf_dir: Path) -> str:
    """``llama`` or ``remote``; UsageError naming any other architecture."""
    where = hf_dir / CONFIG_FILE
    architectures = _typed(config, "architectures", list, where, [])
    if not all(isinstance(name, str) for name in architectures):
        raise UsageError(
            f"{where}: architectures is {json.dumps(architectures)}; expected a list of class names"
        )
    model_type = _typed(config, "model_type", str, where, None)
    if model_type == hf_format.REMOTE_MODEL_TYPE:
        return "remote"
    if model_type == "llama" and architectures in ([], [hf_format.LLAMA_ARCHITECTURE]):
        return "llama"
    name = ", ".join(architectures) or f"model_type {model_type!r}"
    raise UsageError(
        f"--hf_dir {hf_dir}: {name} is not {hf_format.LLAMA_ARCHITECTURE}; import_hf "
        f"reads {hf_format.LLAMA_ARCHITECTURE} directories and those export_hf writes"
    )


# What config.json states itself; the ModelArgs export_hf recorded are used when they agree on all.
STATED = (
    "attention",
    "mixer",
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "vocab_size",
    "hidden_dim",
    "core_dim",
    "softplus_scale",
    "norm_eps",
    "rope_theta",
    "use_scaled_rope",
    "max_seq_len",
)
REMOTE_STATED = STATED + ("core_output_scale",)


def model_args_from_config(config: dict[str, Any], form: str, hf_dir: Path) -> ModelArgs:
    """Our ModelArgs as config.json states them. The ModelArgs export_hf recorded beside them also
    hold what config.json cannot say (--multiple_of, --ffn_dim_multiplier, --dropout); they are
    taken when they agree, so a config edited since (a resized vocabulary) imports as it reads.
    An invalid setting is a :class:`ConfigError` of config.json, naming the setting."""
    where = hf_dir / CONFIG_FILE
    try:
        stated = ModelArgs(**stated_fields(config, form, where))
        recorded = config.get(hf_format.ARGS_KEY)
        if isinstance(recorded, dict):
            ours = ModelArgs.from_dict(recorded)
            names = REMOTE_STATED if form == "remote" else STATED
            if all(getattr(ours, name) == getattr(stated, name) for name in names):
                return ours
        return stated
    except ConfigError as err:
        raise err.at(where) from err
    except TypeError as err:  # a recorded value of the wrong type
        raise UsageError(f"{where}: {err}") from err


_REQUIRED = object()
_KINDS = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    dict: "an object",
    list: "a list",
}


def _typed(
    config: dict[str, Any], key: str, kind: type, where: Path, default: Any = _REQUIRED
) -> Any:
    """``config[key]``, which must be of ``kind`` (an int is a float; a bool is neither);
    ``default`` when absent or null, and UsageError naming the key when it is required or of
    another kind."""
    value = config.get(key)
    if value is None and default is not _REQUIRED:
        return default
    if key not in config:
        raise UsageError(f"{where}: lacks {key}")
    kinds = (int, float) if kind is float else kind
    if not isinstance(value, kinds) or (isinstance(value, bool) and kind is not bool):
        raise UsageError(f"{where}: {key} is {json.dumps(value)}; expected {_KINDS[kind]}")
    return float(value) if kind is float else value


def stated_fields(config: dict[str, Any], form: str, where: Path) -> dict[str, Any]:
    """ModelArgs fields from config.json's own keys; UsageError naming a setting we lack."""
    dim = _typed(config, "hidden_size", int, where)
    heads = _typed(config, "num_attention_heads", int, where)
    hidden = _typed(config, "intermediate_size", int, where)
    meta_hidden = int(2 * 4 * dim / 3)  # SwiGLU width before Meta's multiplier and rounding
    fields = {
        "dim": dim,
        "n_heads": heads,
        "n_layers": _typed(config, "num_hidden_layers", int, where),
        "n_kv_heads": _typed(config, "num_key_value_heads", int, where, heads),
        "vocab_size": _typed(config, "vocab_size", int, where),
        # rounding up to a multiple of intermediate_size itself reproduces it exactly
        "multiple_of": hidden,
        "ffn_dim_multiplier": None if meta_hidden <= hidden else hidden / meta_hidden,
        "norm_eps": _typed(config, "rms_norm_eps", float, where, 1e-6),
        "max_seq_len": _typed(config, "max_position_embeddings", int, where, 4096),
    }
    if form == "remote":
        # a directory written before a setting existed holds the model of its LEGACY value
        return {
            **fields,
            **{key: config.get(key, value) for key, value in LEGACY.items()},
            **{
                key: _typed(config, key, kind, where)
                for key, kind in (
                    ("attention", str),
                    ("mixer", str),
                    ("core_dim", int),
                    ("softplus_scale", str),
                    ("rope_theta", float),
                    ("use_scaled_rope", bool),
                )
            },
        }
    for key, ours in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if config.get(key, ours) != ours:
            raise UsageError(
                f"{where}: {key} {config[key]!r} cannot be imported (our model has {key} {ours!r})"
            )
    if heads > 0 and config.get("head_dim") not in (None, dim // heads):  # ModelArgs: heads ≤ 0
        raise UsageError(
            f"{where}: head_dim {config['head_dim']} cannot be imported (ours is "
            f"hidden_size / num_attention_heads = {dim // heads})"
        )
    theta, scaled = rope_settings(config, where)
    return {
        **fields,
        "attention": "softmax",
        "mixer": "swiglu",
        "rope_theta": theta,
        "use_scaled_rope": scaled,
    }


def rope_settings(config: dict[str, Any], where: Path) -> tuple[float, bool]:
    """(rope_theta, use_scaled_rope) from transformers 5's rope_parameters or 4's keys."""
    rope = _typed(config, "rope_parameters", dict, where, None) or _typed(
        config, "rope_scaling", dict, where, {}
    )
    theta = _typed(rope, "rope_theta", float, where, None)
    theta = _typed(config, "rope_theta", float, where, 10000.0) if theta is None else theta
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return theta, False
    expected = {k: v for k, v in hf_format.LLAMA3_ROPE.items() if k != "rope_type"}
    differs = [f"{k} {rope.get(k)} (ours: {v})" for k, v in expected.items() if rope.get(k) != v]
    if kind != "llama3" or differs:
        detail = f"rope_type {kind!r}" if kind != "llama3" else ", ".join(differs)
        raise UsageError(
            f"{where}: RoPE scaling {detail} cannot be imported (ours: none, or Llama 3.1's rule)"
        )
    return theta, True


def read_weights(hf_dir: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Every tensor of the directory, and the file names they came from."""
    from safetensors.torch import load_file

    index = hf_dir / hf_format.INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise UsageError(f"{index}: not a safetensors index ({err})") from err
        if not isinstance(weight_map, dict) or not all(
            isinstance(file, str) for file in weight_map.values()
        ):
            raise UsageError(
                f"{index}: not a safetensors index (its weight_map is not an object "
                "of tensor names to file names)"
            )
        files = sorted(set(weight_map.values()))
    elif (hf_dir / hf_format.SAFETENSORS_FILE).is_file():
        files = [hf_format.SAFETENSORS_FILE]
    else:
        found = ", ".join(sorted(p.name for p in hf_dir.glob("*.bin"))) or "none"
        raise UsageError(
            f"--hf_dir {hf_dir}: no {hf_format.SAFETENSORS_FILE} or "
            f"{hf_format.INDEX_FILE} (PyTorch .bin files: {found}; save the model "
            "with safe_serialization=True)"
        )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(hf_dir / file)))
        except Exception as err:  # noqa: BLE001 - missing, truncated or not safetensors
            raise UsageError(f"cannot read {hf_dir / file}: {err}") from err
    return state, ", ".join(files)


def untie(hf_state: dict[str, torch.Tensor], config: dict[str, Any], where: Path) -> bool:
    """Give a tied model its own lm_head (a copy of the embedding); True if it was tied."""
    tied = _typed(config, "tie_word_embeddings", bool, where, False)
    if "lm_head.weight" in hf_state or not tied:
        return False
    if "model.embed_tokens.weight" in hf_state:
        hf_state["lm_head.weight"] = hf_state["model.embed_tokens.weight"].clone()
    return True


def to_our_names(
    hf_state: dict[str, torch.Tensor], model_args: ModelArgs, form: str, source: str
) -> dict[str, torch.Tensor]:
    """Our state dict, after checking names and shapes against config.json."""
    from llama3.import_meta import check_state

    state = {k: v for k, v in hf_state.items() if not k.endswith(IGNORED_KEYS)}
    check_state(hf_format.hf_shapes(model_args), state, source, CONFIG_FILE)
    return hf_format.from_hf_state(state, model_args, form)


def tokenizer_record(
    flag: str | None, hf_dir: Path, model_args: ModelArgs
) -> tuple[dict[str, str] | None, str]:
    """The tokenizer fingerprint to record, and a line for the user."""
    from llama3.checkpoint import tokenizer_fingerprint
    from llama3.data.tokenizer import Tokenizer

    path = Path(flag) if flag else hf_dir / hf_format.SENTENCEPIECE_FILE
    if flag is None and not path.is_file():
        return None, (
            f"note: no tokenizer recorded ({hf_dir} has no "
            f"{hf_format.SENTENCEPIECE_FILE}); training needs --tokenizer with a "
            f"SentencePiece model of {model_args.vocab_size} tokens"
        )
    tokenizer = Tokenizer(path)
    if tokenizer.vocab_size > model_args.vocab_size:
        raise UsageError(
            f"--tokenizer {path} has {tokenizer.vocab_size} tokens but the model only "
            f"{model_args.vocab_size}"
        )
    return tokenizer_fingerprint(path), f"tokenizer: recorded {path}"
