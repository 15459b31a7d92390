"""Hugging Face export and import through the real CLI, on tiny checkpoints the tests build.

Covers: tokenizer.json encodes raw text to the ids SentencePiece gives the cleaned text (special
tokens written in the text included) and declares the start token it puts first; a softmax
model with GQA and scaled RoPE loads as transformers' LlamaForCausalLM with our logits; softplus
and Combinator models load through the exported modelling code with our logits, and generate()
with a cache matches generate() without one (left-padded batches included); export → import →
export writes identical files, and an imported model trains on; a Llama directory saved by
transformers itself (sharded, tied embeddings) imports with its logits; bad input gets one line;
two exports to one directory never mix, and import_hf never writes into a directory a run holds.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from llama3 import ModelArgs, Transformer, load_checkpoint
from llama3.__main__ import main
from llama3.checkpoint import save_model_checkpoint, tokenizer_fingerprint
from llama3.data.clean import Cleaner
from llama3.data.tokenizer import Tokenizer, train_tokenizer

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

MODELS = {
    "softmax_gqa_scaled": dict(
        attention="softmax", n_heads=4, n_kv_heads=2, multiple_of=16, use_scaled_rope=True
    ),
    "softplus": dict(attention="softplus", core_dim=16),
    "softplus_wide": dict(attention="softplus", core_dim=48),  # output × 32/48 before o_proj
    "softmax_combinator": dict(attention="softmax", mixer="combinator", n_heads=4, n_kv_heads=2),
    "softplus_swiglu_constant": dict(
        attention="softplus", mixer="swiglu", core_dim=16, softplus_scale="constant", multiple_of=16
    ),
}
REMOTE = [name for name in MODELS if name != "softmax_gqa_scaled"]
pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = [
    "The River Thames, in London!",
    "Ça va? Naïve café — “quoted” résumé, ½ ﬁle, Ωmega; 日本語 and emoji 😀 stay out.",
    "Digits 1,234.56 and 2024-05-01; punctuation: (a) [b] {c} () [ ] { } <x> #y @z ~!",
    "Two lines\nand a blank one\n\n\tthen a tab,   extra   spaces  and   trailing   ",
    "THERE was THE theatre, and Thermal music; the school's cold mornings.",
]


def special_texts(model_file: Path) -> list[str]:
    """Raw text spelling special tokens, alone, between words and right after a user-defined piece
    (which leaves the rest a word of its own)."""
    from llama3.interop.hf_tokenizer import USER_DEFINED, read_proto

    word = next(p.piece for p in read_proto(model_file).pieces if p.type == USER_DEFINED)[1:]
    return [
        "<unk>",
        "WikiText is full of <unk> , and <unk> @-@ marks </s> <s>",
        f"{word}<unk> {word}</s>{word}<s> x{word}<pad> {word}<0x41>",
        "<s>The River</s>",
    ]


@pytest.fixture(scope="module")
def checkpoints(tiny_tokenizer, tmp_path_factory) -> dict[str, Path]:
    """One checkpoint per entry of MODELS (dim 32, two layers, non-trivial norm weights)."""
    vocab = Tokenizer(tiny_tokenizer).vocab_size
    root = tmp_path_factory.mktemp("hf_checkpoints")
    made = {}
    for i, (name, settings) in enumerate(MODELS.items()):
        torch.manual_seed(i)
        model = Transformer.build(
            ModelArgs(vocab_size=vocab, dim=32, n_layers=2, max_seq_len=64, **settings)
        )
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "norm" in key:
                    param.add_(0.1 * torch.randn_like(param))
        made[name] = save_model_checkpoint(
            root / name, model, tokenizer=tokenizer_fingerprint(tiny_tokenizer)
        ).parent
    return made


def export(checkpoint: Path, output: Path, tokenizer: Path | None, *flags: str) -> int:
    more = ["--tokenizer", str(tokenizer)] if tokenizer else []
    return main(
        ["export_hf", "--from_checkpoint", str(checkpoint), "--output", str(output), *more, *flags]
    )


@pytest.fixture(scope="module")
def exported(checkpoints, tiny_tokenizer, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_exported")
    for name, checkpoint in checkpoints.items():
        assert export(checkpoint, root / name, tiny_tokenizer) == 0
    return {name: root / name for name in checkpoints}


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / ours.abs().max())


def auto_model(directory: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs).eval()


# ------------------------------------------------------------------------------- tokenizer


def test_tokenizer_json_equals_sentencepiece_on_cleaned_text(exported, tiny_tokenizer):
    from transformers import AutoTokenizer

    sp, cleaner = Tokenizer(tiny_tokenizer), Cleaner()
    directory = exported["softmax_gqa_scaled"]
    hf = AutoTokenizer.from_pretrained(directory)
    for text in TEXTS:
        expected = sp.encode(cleaner(text))
        assert hf(text, add_special_tokens=False).input_ids == expected, text
        assert hf(text).input_ids == [sp.eos_id, *expected]  # the start token of packed training
        assert hf.decode(expected) == sp.decode(expected)
    assert (directory / "sentencepiece.model").read_bytes() == Path(tiny_tokenizer).read_bytes()
    assert Tokenizer(directory / "sentencepiece.model").cleaner == sp.cleaner == cleaner


def test_special_token_text_is_text_as_sentencepiece_reads_it(exported, tiny_tokenizer):
    """ "<unk>", "</s>" written in raw text (WikiText is full of <unk>) are the characters our
    SentencePiece path encodes, not special ids: through the tokenizers library and
    transformers."""
    from tokenizers import Tokenizer as TokenizerJson
    from transformers import AutoTokenizer

    sp, cleaner = Tokenizer(tiny_tokenizer), Cleaner()
    directory = exported["softmax_gqa_scaled"]
    raw = TokenizerJson.from_file(str(directory / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(directory)
    for text in special_texts(tiny_tokenizer):
        expected = sp.encode(cleaner(text))
        assert raw.encode(text, add_special_tokens=False).ids == expected, text
        assert hf(text).input_ids == [sp.eos_id, *expected], text


@pytest.mark.parametrize("start", ["eos", "bos", "none"])
def test_the_declared_start_token_is_the_one_put_first(
    checkpoints, tiny_tokenizer, tmp_path, start
):
    """bos_token in tokenizer_config.json, bos_token_id in config.json and generation_config.json:
    the start token the tokenizer puts before every text (add_bos_token), so that tools which add
    or strip it do as we do; with none, SentencePiece's own, and the tokenizer adds nothing."""
    from transformers import AutoTokenizer

    sp = Tokenizer(tiny_tokenizer)
    assert (
        export(
            checkpoints["softmax_gqa_scaled"],
            tmp_path / start,
            tiny_tokenizer,
            "--start_token",
            start,
        )
        == 0
    )
    start_id = sp.bos_id if start == "none" else getattr(sp, f"{start}_id")
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / start / name).read_text())["bos_token_id"] == start_id
    tokenizer_config = json.loads((tmp_path / start / "tokenizer_config.json").read_text())
    assert tokenizer_config["add_bos_token"] == (start != "none")
    hf = AutoTokenizer.from_pretrained(tmp_path / start)
    assert hf.bos_token_id == start_id and hf.eos_token_id == sp.eos_id
    first = [start_id] if start != "none" else []
    assert hf("The River").input_ids == first + sp.encode(Cleaner()("The River"))


def test_tokenizer_follows_the_cleaning_flags_and_byte_fallback(tiny_corpus, tmp_path):
    """Cleaning without the ASCII step and lowercase; characters outside the vocabulary as bytes."""
    from llama3.interop.hf_tokenizer import build_tokenizer

    model_file = train_tokenizer(
        tiny_corpus["train"],
        tmp_path / "bytes.model",
        400,
        n_most_frequent_words=10,
        byte_fallback=True,
        progress=False,
    )
    sp = Tokenizer(model_file)
    for cleaner in (Cleaner(), Cleaner(ascii=False, lowercase=False)):
        hf = build_tokenizer(model_file, cleaner)
        for text in TEXTS + special_texts(model_file):
            expected = sp.encode(cleaner(text))
            assert hf.encode(text, add_special_tokens=False).ids == expected, text
            assert hf.decode(expected) == sp.decode(expected)


# ------------------------------------------------------------------------------- export


@torch.no_grad()
def test_softmax_swiglu_is_a_standard_llama(exported, checkpoints):
    directory = exported["softmax_gqa_scaled"]
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert config["rope_parameters"]["rope_type"] == "llama3"
    assert (
        config["num_key_value_heads"] == 2
        and not (directory / "modeling_llama3_softplus.py").exists()
    )
    hf = auto_model(directory)
    assert type(hf).__name__ == "LlamaForCausalLM"
    ours = load_checkpoint(checkpoints["softmax_gqa_scaled"])
    tokens = torch.randint(0, ours.args.vocab_size, (2, 40))
    assert relative_error(ours(tokens), hf(tokens).logits) <= 1e-5


@pytest.mark.parametrize("name", REMOTE)
@torch.no_grad()
def test_remote_code_gives_our_logits_and_caches(exported, checkpoints, name):
    directory = exported[name]
    config = json.loads((directory / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_llama3_softplus.")
    hf = auto_model(directory, trust_remote_code=True)
    ours = load_checkpoint(checkpoints[name])
    tokens = torch.randint(4, ours.args.vocab_size, (3, 40))
    assert relative_error(ours(tokens), hf(tokens).logits) <= 1e-5

    prompt = tokens[:, :7]
    cached = hf.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    uncached = hf.generate(
        prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12, use_cache=False
    )
    assert cached.shape == (3, 19) and torch.equal(cached, uncached)

    # a left-padded batch: each row as if alone
    pad = torch.full((1, 3), 1)
    padded = torch.cat([torch.cat([pad, prompt[:1, 3:]], dim=1), prompt[1:2]])
    mask = torch.ones_like(padded)
    mask[0, :3] = 0
    both = hf.generate(
        padded, attention_mask=mask, max_new_tokens=6, do_sample=False, min_new_tokens=6
    )
    alone = hf.generate(prompt[:1, 3:], max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert torch.equal(both[0, 3:], alone[0])


@torch.no_grad()
def test_remote_code_calls_our_kernels_where_they_apply(exported, monkeypatch):
    """On CUDA the exported code runs the llama3 package's Triton kernels; here Triton's CPU
    interpreter runs them in CUDA's place, and the logits match the dense formula's."""
    pytest.importorskip("triton")
    hf = auto_model(exported["softplus"], trust_remote_code=True)
    module = sys.modules[type(hf).__module__]
    tokens = torch.randint(4, hf.config.vocab_size, (2, 24))
    dense = hf(tokens).logits
    kernel, calls = module._softplus_kernel, []
    assert kernel is not None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(module, "kernel_applies", lambda q: True)
    monkeypatch.setattr(
        module, "_softplus_kernel", lambda *a, **k: calls.append(1) or kernel(*a, **k)
    )
    assert relative_error(dense, hf(tokens).logits) <= 1e-5 and len(calls) == 2  # two layers


def test_export_import_export_is_exact_and_trains_on(
    exported, checkpoints, tiny_tokenizer, tiny_corpus, tmp_path
):
    for name in ("softmax_gqa_scaled", "softplus", "softplus_wide"):
        assert (
            main(
                [
                    "import_hf",
                    "--hf_dir",
                    str(exported[name]),
                    "--to_checkpoint",
                    str(tmp_path / name),
                ]
            )
            == 0
        )
        assert export(tmp_path / name, tmp_path / f"{name}_again", tiny_tokenizer) == 0
        files = sorted(p.name for p in exported[name].iterdir())
        assert files == sorted(p.name for p in (tmp_path / f"{name}_again").iterdir())
        for file in files:
            assert (exported[name] / file).read_bytes() == (
                tmp_path / f"{name}_again" / file
            ).read_bytes(), (name, file)
        original, imported = load_checkpoint(checkpoints[name]), load_checkpoint(tmp_path / name)
        assert original.args == imported.args
        for key, value in original.state_dict().items():
            assert torch.equal(value, imported.state_dict()[key]), key
    assert (
        main(
            [
                "train",
                "--train_corpus",
                str(tiny_corpus["train"]),
                "--tokenizer",
                str(tiny_tokenizer),
                "--from_checkpoint",
                str(tmp_path / "softplus"),
                "--to_checkpoint",
                str(tmp_path / "continued"),
                "--total_steps",
                "2",
                "--batch_size",
                "2",
                "--max_seq_len",
                "64",
                "--no-tensorboard",
            ]
        )
        == 0
    )


def test_sharded_weights_and_bf16(checkpoints, tiny_tokenizer, tmp_path):
    directory = tmp_path / "sharded"
    assert (
        export(
            checkpoints["softplus"], directory, None, "--max_shard_size", "20KB", "--dtype", "bf16"
        )
        == 0
    )
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert (
        len(set(index["weight_map"].values())) > 2 and not (directory / "tokenizer.json").exists()
    )
    assert (
        main(
            [
                "import_hf",
                "--hf_dir",
                str(directory),
                "--to_checkpoint",
                str(tmp_path / "back"),
                "--tokenizer",
                str(tiny_tokenizer),
            ]
        )
        == 0
    )
    original, back = load_checkpoint(checkpoints["softplus"]), load_checkpoint(tmp_path / "back")
    for key, value in original.state_dict().items():
        assert torch.equal(value.to(torch.bfloat16), back.state_dict()[key]), key


@torch.no_grad()
def test_import_a_llama_saved_by_transformers(tmp_path):
    """Sharded safetensors, tied embeddings, Llama 3.1 RoPE, no llama3_model_args."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "llama", max_shard_size="40KB")
    assert (tmp_path / "llama" / "model.safetensors.index.json").is_file()
    assert (
        main(
            [
                "import_hf",
                "--hf_dir",
                str(tmp_path / "llama"),
                "--to_checkpoint",
                str(tmp_path / "ours"),
            ]
        )
        == 0
    )
    ours = load_checkpoint(tmp_path / "ours")
    assert ours.args.hidden_dim == 176 and ours.args.use_scaled_rope
    tokens = torch.randint(0, 96, (2, 30))
    assert relative_error(ours(tokens), hf(tokens).logits) <= 1e-5


def test_an_edited_directory_imports_as_its_config_reads(exported, tmp_path):
    """The vocabulary grown by 8 after export: config.json and the weights disagree with the
    ModelArgs export_hf recorded, and config.json wins."""
    from safetensors.torch import load_file, save_file

    directory = tmp_path / "resized"
    shutil.copytree(exported["softplus"], directory)
    tensors = load_file(directory / "model.safetensors")
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[key] = torch.cat([tensors[key], torch.zeros(8, tensors[key].shape[1])])
    save_file(tensors, directory / "model.safetensors")
    config = json.loads((directory / "config.json").read_text())
    config["vocab_size"] += 8
    (directory / "config.json").write_text(json.dumps(config))
    assert (
        main(["import_hf", "--hf_dir", str(directory), "--to_checkpoint", str(tmp_path / "ours")])
        == 0
    )
    args = load_checkpoint(tmp_path / "ours").args
    assert (args.vocab_size, args.attention, args.core_dim) == (
        config["vocab_size"],
        "softplus",
        16,
    )


@torch.no_grad()
def test_a_directory_older_than_the_core_output_scale_keeps_its_model(exported, tmp_path):
    """config.json and the recorded ModelArgs without core_output_scale (as export_hf wrote them
    before it existed): the model is that of "none", in transformers and once imported."""
    from llama3.interop.hf_format import ARGS_KEY

    directory = tmp_path / "older"
    shutil.copytree(exported["softplus_wide"], directory)
    config = json.loads((directory / "config.json").read_text())
    del config["core_output_scale"], config[ARGS_KEY]["core_output_scale"]
    (directory / "config.json").write_text(json.dumps(config))
    assert (
        main(["import_hf", "--hf_dir", str(directory), "--to_checkpoint", str(tmp_path / "ours")])
        == 0
    )
    ours = load_checkpoint(tmp_path / "ours")
    assert ours.args.core_output_scale == "none" and ours.args.core_output_multiplier == 1.0
    hf = auto_model(directory, trust_remote_code=True)
    tokens = torch.randint(4, ours.args.vocab_size, (2, 20))
    assert relative_error(ours(tokens), hf(tokens).logits) <= 1e-5


def test_llama_configs_of_transformers_4_and_5_read_alike(tmp_path):
    from llama3.interop.hf_import import stated_fields

    base = {
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "intermediate_size": 100,
        "vocab_size": 96,
        "max_position_embeddings": 256,
    }
    scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    v4 = {**base, "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **scaling}}
    v5 = {**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **scaling}}
    fields = stated_fields(v4, "llama", tmp_path)
    assert fields == stated_fields(v5, "llama", tmp_path)
    args = ModelArgs(**fields)  # intermediate_size below Meta's 8/3·dim needs the multiplier
    assert (args.rope_theta, args.use_scaled_rope, args.hidden_dim) == (5e5, True, 100)


# ------------------------------------------------------------------------------- bad input


def test_export_errors_name_the_setting(checkpoints, tiny_tokenizer, tmp_path, capsys):
    assert export(checkpoints["softplus"], tmp_path / "out", None, "--format", "llama") == 2
    assert "--attention softplus" in capsys.readouterr().err
    assert (
        export(checkpoints["softmax_combinator"], tmp_path / "out", None, "--format", "llama") == 2
    )
    assert "--mixer combinator" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert export(checkpoints["softplus"], tmp_path / "full", None) == 2
    assert "--output" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_import_refuses_other_architectures_by_name(tmp_path, capsys):
    directory = tmp_path / "gpt2"
    directory.mkdir()
    (directory / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    assert (
        main(["import_hf", "--hf_dir", str(directory), "--to_checkpoint", str(tmp_path / "ours")])
        == 2
    )
    err = capsys.readouterr().err
    assert "GPT2LMHeadModel is not LlamaForCausalLM" in err and len(err.strip().splitlines()) == 1

    (directory / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": 64,
                "num_attention_heads": 4,
                "num_hidden_layers": 1,
                "intermediate_size": 128,
                "vocab_size": 32,
                "attention_bias": True,
            }
        )
    )
    assert (
        main(["import_hf", "--hf_dir", str(directory), "--to_checkpoint", str(tmp_path / "ours")])
        == 2
    )
    assert "attention_bias True cannot be imported" in capsys.readouterr().err
    assert not (tmp_path / "ours").exists()


def test_exports_to_one_output_at_once_never_mix(
    checkpoints, tiny_tokenizer, tmp_path, monkeypatch, capsys
):
    """A second export to the same --output runs to completion while the first writes its
    weights: the second's directory is published whole, and the first is refused, leaving
    nothing of its own."""
    from llama3.interop import hf_export

    output, write_weights = tmp_path / "out", hf_export.write_weights

    def interrupted(directory: Path, tensors: dict, shard_bytes: int) -> int:
        monkeypatch.setattr(hf_export, "write_weights", write_weights)
        assert (
            export(checkpoints["softplus"], output, tiny_tokenizer, "--max_shard_size", "20KB") == 0
        )
        return write_weights(directory, tensors, shard_bytes)

    monkeypatch.setattr(hf_export, "write_weights", interrupted)
    assert (
        export(
            checkpoints["softmax_gqa_scaled"], output, tiny_tokenizer, "--max_shard_size", "20KB"
        )
        == 2
    )
    assert "--output" in capsys.readouterr().err
    index = json.loads((output / "model.safetensors.index.json").read_text())
    assert all((output / file).is_file() for file in index["weight_map"].values())
    assert json.loads((output / "config.json").read_text())["attention"] == "softplus"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_export_leaves_a_file_named_like_its_staging_alone(checkpoints, tmp_path):
    (tmp_path / "out.tmp").write_text("mine")
    assert export(checkpoints["softplus"], tmp_path / "out", None) == 0
    assert (tmp_path / "out.tmp").read_text() == "mine"


def test_import_refuses_a_directory_a_training_run_holds(exported, tmp_path, capsys):
    from llama3.checkpoint import RUN_LOCK
    from llama3.fileio import locked

    busy = tmp_path / "busy"
    busy.mkdir()
    with locked(busy / RUN_LOCK, wait=False):
        assert (
            main(["import_hf", "--hf_dir", str(exported["softplus"]), "--to_checkpoint", str(busy)])
            == 2
        )
    assert "in use by another training process" in capsys.readouterr().err
    assert [p.name for p in busy.iterdir()] == [RUN_LOCK]
