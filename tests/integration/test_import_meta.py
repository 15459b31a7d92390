"""import_meta: a synthetic Meta-format checkpoint (params.json + two model-parallel shards) round
trips to a model with the same logits; bad inputs give errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from meta_layout import fairscale_shards

from llama3 import Transformer, load_checkpoint
from llama3.checkpoint import read_model_file
from llama3.model.meta import model_args_from_params

PARAMS = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 320,
    "multiple_of": 32,
    "ffn_dim_multiplier": 1.3,
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
}


def meta_checkpoint(
    directory: Path,
    params: dict = PARAMS,
    tokenizer: bytes | None = None,
    seed: int = 0,
    n_shards: int = 2,
) -> dict[str, torch.Tensor]:
    """Write ``params`` as params.json and weights of :data:`PARAMS`'s shape as consolidated.*.pth,
    split over ``n_shards`` ranks as Meta's fairscale layers split them (bf16); returns the merged
    state."""
    torch.manual_seed(seed)
    model = Transformer.build(model_args_from_params(PARAMS))
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    for name in state:
        if name.endswith("norm.weight"):  # non-trivial norms, so a mix-up would show
            state[name] = (1 + 0.1 * torch.randn(state[name].shape)).to(torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.json").write_text(json.dumps(params))
    for i, shard in enumerate(fairscale_shards(state, n_shards)):
        torch.save(shard, directory / f"consolidated.{i:02d}.pth")
    if tokenizer is not None:
        (directory / "tokenizer.model").write_bytes(tokenizer)
    return state


TIKTOKEN_LINES = b"IQ== 0\nIg== 1\nIw== 2\n"  # the format of Llama 3's tokenizer.model


@pytest.mark.parametrize("n_shards", [1, 2, 4])
def test_round_trip_gives_the_same_logits(tmp_path, capsys, n_shards):
    """Llama 3 70B and 405B come in several files: the embedding (320, 64) arrives as n_shards
    row blocks of (320 / n_shards, 64), as VocabParallelEmbedding holds it."""
    from llama3.__main__ import main

    state = meta_checkpoint(tmp_path / "meta", tokenizer=TIKTOKEN_LINES, n_shards=n_shards)
    shard = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    assert shard["tok_embeddings.weight"].shape == (320 // n_shards, 64)
    code = main(
        [
            "import_meta",
            "--meta_dir",
            str(tmp_path / "meta"),
            "--to_checkpoint",
            str(tmp_path / "ours"),
            "--max_seq_len",
            "512",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "not a SentencePiece model" in out and "tiktoken" in out
    record = read_model_file(tmp_path / "ours")
    assert record["tokenizer"] is None and record["step"] == 0
    assert record["model_args"]["max_seq_len"] == 512
    model = load_checkpoint(tmp_path / "ours")
    expected = Transformer.build(model_args_from_params(PARAMS, max_seq_len=512), init=False)
    expected.load_state_dict(state)
    tokens = torch.randint(0, 320, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), expected.eval()(tokens), atol=0, rtol=0)
    for name, tensor in state.items():  # weights kept exactly, in Meta's dtype
        assert torch.equal(record["model"][name], tensor), name


def test_sentencepiece_tokenizer_is_recorded(tmp_path, tiny_tokenizer, capsys):
    from llama3.__main__ import main

    meta_checkpoint(tmp_path / "meta", tokenizer=Path(tiny_tokenizer).read_bytes())
    assert (
        main(
            [
                "import_meta",
                "--meta_dir",
                str(tmp_path / "meta"),
                "--to_checkpoint",
                str(tmp_path / "ours"),
            ]
        )
        == 0
    )
    record = read_model_file(tmp_path / "ours")
    assert record["tokenizer"]["sha256"] and "recorded" in capsys.readouterr().out


def _error(tmp_path: Path, capsys) -> str:
    from llama3.__main__ import main

    code = main(
        [
            "import_meta",
            "--meta_dir",
            str(tmp_path / "meta"),
            "--to_checkpoint",
            str(tmp_path / "ours"),
        ]
    )
    assert code == 2 and not (tmp_path / "ours").exists()
    return capsys.readouterr().err


def test_errors_name_the_file(tmp_path, capsys):
    meta = tmp_path / "meta"
    meta_checkpoint(meta)
    (meta / "params.json").unlink()
    assert "params.json is missing" in _error(tmp_path, capsys)

    for shard in meta.glob("consolidated.*.pth"):
        shard.unlink()
    (meta / "params.json").write_text(json.dumps(PARAMS))
    assert "no consolidated.*.pth shards" in _error(tmp_path, capsys)

    meta_checkpoint(meta, params={**PARAMS, "vocab_size": -1})
    message = _error(tmp_path, capsys)
    assert "params.json: vocab_size is -1" in message and "has 320 rows" in message

    meta_checkpoint(meta)
    (meta / "params.json").write_text(json.dumps({**PARAMS, "n_kv_heads": 4}))
    message = _error(tmp_path, capsys)
    assert "consolidated.00.pth, consolidated.01.pth do not match params.json" in message
    assert (
        "layers.0.attention.wk.weight has shape (32, 64), params.json implies (64, 64)" in message
    )


@pytest.mark.parametrize("broken", [b"not a torch file", b""])
def test_unreadable_shard_is_named(tmp_path, capsys, broken):
    meta = tmp_path / "meta"
    meta_checkpoint(meta)
    (meta / "consolidated.01.pth").write_bytes(broken)
    assert "consolidated.01.pth" in _error(tmp_path, capsys)
