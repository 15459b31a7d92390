"""Every bad input ends in one line: each row is a command, the exit status it must give, words the
one ``error:`` line must hold, and files that must not exist afterwards (nothing half-written).

Commands run in this process through ``llama3.__main__.main``. Placeholders in a row: {tmp} (the
test's directory), {tok} (a tiny tokenizer), {ckpt} (a tiny model-only checkpoint), {run} (a copy
of a tiny training run saved at step 2), {train} and {eval} (tiny corpora), {file} and {dir} (an
existing file and an empty directory). ``limit`` caps the size of any file written while the
command runs (RLIMIT_FSIZE), which is how a full disk looks to the command; ``stdin`` is what the
command reads on standard input; ``needs`` names optional packages the row needs (skipped without
them). A new flag adds a row.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from faults import file_size_limit
from lm_eval_tasks import index_once, local_choice_task

from llama3.__main__ import main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = (
    "--dim 32 --n_layers 2 --core_dim 16 --max_seq_len 32 --batch_size 4 --warmup_steps 0 "
    "--eval_batches 1 --no-tensorboard"
)
TRAIN = (
    f"train --train_corpus {{train}} --eval_corpus {{eval}} --tokenizer {{tok}} {TINY} "
    "--total_steps 2"
)
RESUME = (
    "train --train_corpus {train} --tokenizer {tok} --to_checkpoint {run} --from_checkpoint {run} "
    "--total_steps 4"
)
EVALUATE = (
    "evaluate --from_checkpoint {ckpt} --tokenizer {tok} --eval_corpus {eval} --device cpu "
    "--no-progress"
)
DEPLOY = (
    "deploy --from_checkpoint {ckpt} --device cpu --export_dir {tmp}/deployed --iterations 1 "
    "--warmup 0"
)
GENERATE = "generate --from_checkpoint {ckpt} --tokenizer {tok} --device cpu --max_new_tokens 2"
EXPORT_HF = "export_hf --from_checkpoint {ckpt} --output {tmp}/hf"
IMPORT_HF = "import_hf --hf_dir {tmp}/hf --to_checkpoint {tmp}/imported"
LM_EVAL = (
    "lm_eval --model llama3 --tasks tiny_choice --include_path {tmp}/tasks --device cpu "
    "--model_args "
)
LM_MODEL = "checkpoint={ckpt},tokenizer={tok}"
TOKENIZER = (
    "train_tokenizer --train_corpus {train} --vocab_size 64 --n_most_frequent_words 4 --no-progress"
)


@dataclass(frozen=True)
class Paths:
    tmp: Path
    tok: Path
    ckpt: Path
    run: Path
    train: Path
    eval: Path
    file: Path
    dir: Path

    def format(self, text: str) -> str:
        return text.format(**{k: str(v) for k, v in vars(self).items()})


def damage(relative: str) -> Callable[[Paths], None]:
    """Overwrite the files matching ``relative`` (a glob under the run) with garbage."""

    def setup(p: Paths) -> None:
        files = sorted(p.run.glob(relative))
        assert files, relative
        for file in files:
            file.write_bytes(b"\x00garbage" * 8)

    return setup


def delete(relative: str) -> Callable[[Paths], None]:
    def setup(p: Paths) -> None:
        (p.run / relative).unlink()

    return setup


def write(relative: str, data: bytes) -> Callable[[Paths], None]:
    def setup(p: Paths) -> None:
        path = Path(p.format(relative))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return setup


def pretokenized(*corpora: str) -> Callable[[Paths], None]:
    """Encode the corpora first, so that only the command's own outputs meet the size limit."""

    def setup(p: Paths) -> None:
        for corpus in corpora:
            assert (
                main(
                    [
                        "pretokenize",
                        "--corpus",
                        p.format(corpus),
                        "--tokenizer",
                        str(p.tok),
                        "--no-progress",
                    ]
                )
                == 0
            )

    return setup


def copied_corpus(p: Paths) -> None:
    shutil.copytree(p.train, p.tmp / "corpus", ignore=shutil.ignore_patterns(".tokens"))


def hf_directory(
    config: dict | None = None,
    files: dict[str, bytes] | None = None,
) -> Callable[[Paths], None]:
    """{tmp}/hf: a tiny softmax model exported as a LlamaForCausalLM directory whose config.json
    states the model alone (no recorded ModelArgs), updated with ``config``; ``files`` added."""

    def setup(p: Paths) -> None:
        import torch

        from llama3 import ModelArgs, Transformer
        from llama3.checkpoint import save_model_checkpoint
        from llama3.interop.hf_format import ARGS_KEY

        torch.manual_seed(0)
        model = Transformer.build(
            ModelArgs(
                vocab_size=256,
                attention="softmax",
                dim=32,
                n_layers=1,
                n_heads=4,
                multiple_of=16,
                max_seq_len=32,
            )
        )
        save_model_checkpoint(p.tmp / "softmax", model)
        assert (
            main(
                [
                    "export_hf",
                    "--from_checkpoint",
                    str(p.tmp / "softmax"),
                    "--output",
                    str(p.tmp / "hf"),
                ]
            )
            == 0
        )
        path = p.tmp / "hf" / "config.json"
        stated = {k: v for k, v in json.loads(path.read_text()).items() if k != ARGS_KEY}
        path.write_text(json.dumps({**stated, **(config or {})}))
        for name, data in (files or {}).items():
            (p.tmp / "hf" / name).write_bytes(data)

    return setup


def fp16_overflow(p: Paths) -> None:
    """{tmp}/big: the tiny checkpoint with one weight beyond fp16's range."""
    import torch

    from llama3 import load_checkpoint
    from llama3.checkpoint import save_model_checkpoint

    model = load_checkpoint(p.ckpt)
    with torch.no_grad():
        model.output.weight[0, 0] = 1e5
    save_model_checkpoint(p.tmp / "big", model)


def local_task(p: Paths) -> None:
    """{tmp}/tasks/tiny_choice.yaml: a multiple-choice task over a local file."""
    (p.tmp / "tasks").mkdir()
    local_choice_task(p.tmp / "tasks", [("The River", [" flows", " music"], 0)])


@dataclass(frozen=True)
class Case:
    id: str
    argv: str
    code: int
    words: tuple[str, ...]
    absent: tuple[str, ...] = ()
    setup: Callable[[Paths], None] | None = None
    limit: int | None = None  # bytes any written file may reach (a full disk)
    stdin: bytes | None = None
    needs: tuple[str, ...] = ()


CASES = [
    # resuming from a damaged checkpoint
    Case(
        "resume-damaged-rank-file",
        RESUME,
        2,
        ("rank_00000.pt", "step_00000002"),
        setup=damage("step_00000002/rank_00000.pt"),
    ),
    Case(
        "resume-damaged-distcp",
        RESUME,
        2,
        ("step_00000002/state",),
        setup=damage("step_00000002/state/*.distcp"),
    ),
    Case(
        "resume-missing-metadata",
        RESUME,
        2,
        ("step_00000002/state",),
        setup=delete("step_00000002/state/.metadata"),
    ),
    Case(
        "resume-damaged-trainer-record",
        RESUME,
        2,
        ("trainer.pt",),
        setup=damage("step_00000002/trainer.pt"),
    ),
    # training flags no run can use
    Case(
        "train-negative-seed",
        TRAIN + " --to_checkpoint {tmp}/new --seed -1",
        2,
        ("--seed",),
        absent=("{tmp}/new/metrics.jsonl",),
    ),
    Case(
        "train-beta1",
        TRAIN + " --to_checkpoint {tmp}/new --beta1 1.5",
        2,
        ("--beta1",),
        absent=("{tmp}/new",),
    ),
    Case("train-adam-eps", TRAIN + " --to_checkpoint {tmp}/new --adam_eps -1", 2, ("--adam_eps",)),
    Case(
        "train-base-lr-nan",
        TRAIN + " --to_checkpoint {tmp}/new --base_lr nan",
        2,
        ("--base_lr", "nan"),
    ),
    Case(
        "train-base-lr-negative-exponent",
        TRAIN + " --to_checkpoint {tmp}/new --base_lr -1e-3",
        2,
        ("--base_lr", "negative"),
    ),
    Case(
        "train-unknown-flag-is-one-line",
        TRAIN + " --to_checkpoint {tmp}/new --base_rate 1",
        2,
        ("--base_rate",),
    ),
    Case(
        "train-core-output-scale-word",
        TRAIN + " --to_checkpoint {tmp}/new --core_output_scale wide",
        2,
        ("--core_output_scale", "width, none or a positive number", "'wide'"),
        absent=("{tmp}/new/metrics.jsonl",),
    ),
    Case(
        "train-core-output-scale-zero",
        TRAIN + " --to_checkpoint {tmp}/new --core_output_scale 0",
        2,
        ("--core_output_scale", "'0'"),
    ),
    Case(
        "train-init-unknown",
        TRAIN + " --to_checkpoint {tmp}/new --init xavier",
        2,
        ("--init", "xavier"),
    ),
    Case(
        "train-diagnostics-negative",
        TRAIN + " --to_checkpoint {tmp}/new --diagnostics_steps -1",
        2,
        ("--diagnostics_steps", "negative"),
    ),
    # tokenizers
    Case(
        "pretokenize-empty-tokenizer",
        "pretokenize --corpus {eval} --tokenizer {tmp}/zero.model",
        2,
        ("--tokenizer", "zero.model", "empty"),
        setup=write("{tmp}/zero.model", b""),
    ),
    Case(
        "train-empty-tokenizer",
        "train --train_corpus {train} --tokenizer {tmp}/zero.model --to_checkpoint {tmp}/new "
        + TINY,
        2,
        ("--tokenizer", "empty"),
        setup=write("{tmp}/zero.model", b""),
        absent=("{tmp}/new/metrics.jsonl",),
    ),
    Case(
        "deploy-empty-tokenizer",
        DEPLOY + " --tokenizer {tmp}/zero.model",
        2,
        ("--tokenizer", "empty"),
        setup=write("{tmp}/zero.model", b""),
        absent=("{tmp}/deployed/model.onnx",),
    ),
    Case(
        "deploy-missing-tokenizer",
        DEPLOY + " --tokenizer {tmp}/missing.model",
        2,
        ("--tokenizer", "missing.model"),
        absent=("{tmp}/deployed/model.onnx",),
    ),
    # outputs that are an existing file or directory
    Case(
        "preprocess-output-is-a-file",
        "preprocess --input {train} --output {file} --no-progress",
        2,
        ("--output", "is a file"),
    ),
    Case(
        "train-to-checkpoint-is-a-file",
        TRAIN + " --to_checkpoint {file}",
        2,
        ("--to_checkpoint", "is a file"),
    ),
    Case(
        "deploy-export-dir-is-a-file",
        DEPLOY.replace("{tmp}/deployed", "{file}"),
        2,
        ("--export_dir", "is a file"),
    ),
    Case(
        "evaluate-output-is-a-directory",
        EVALUATE + " --output {dir}",
        2,
        ("--output", "is a directory"),
    ),
    Case(
        "train-tokenizer-model-file-is-a-directory",
        TOKENIZER + " --model_file {dir}",
        2,
        ("--model_file", "is a directory"),
        absent=("{dir}.tmp",),
    ),
    Case(
        "plot-output-is-a-directory",
        "plot {run} --output {dir}",
        2,
        ("--output", "is a directory"),
        absent=("{dir}.png",),
    ),
    Case(
        "plot-output-type-unknown",
        "plot {run} --output {tmp}/curves.txt",
        2,
        ("--output", ".txt", ".png"),
        absent=("{tmp}/curves.txt",),
    ),
    Case(
        "plot-lengths-output-is-a-directory",
        "plot_lengths {tmp}/e.json --output {dir}",
        2,
        ("--output", "is a directory"),
        setup=write("{tmp}/e.json", b"{}"),
    ),
    # prompts and sampling
    Case(
        "generate-binary-prompt-file",
        GENERATE + " --prompt_file {tmp}/prompts.bin",
        2,
        ("--prompt_file", "UTF-8"),
        setup=write("{tmp}/prompts.bin", b"\xff\xfe\x00\x81binary\n"),
    ),
    Case(
        "generate-temperature-nan",
        GENERATE + " --prompt hello --temperature nan",
        2,
        ("--temperature", "nan"),
    ),
    Case(
        "generate-binary-stdin",
        GENERATE,
        2,
        ("standard input", "UTF-8"),
        stdin=b"\xff\xfe\x00\x81binary\n",
    ),
    Case(
        "generate-cache-beyond-memory",
        GENERATE + " --max_new_tokens 10000000000 --prompt hello",
        2,
        ("--max_new_tokens 10000000000", "GiB", "free on cpu"),
    ),
    Case(
        "generate-prompt-beyond-memory",
        GENERATE + " --prompt_file {tmp}/long.txt",
        2,
        ("out of memory", "shorten the prompts"),
        setup=write("{tmp}/long.txt", b"the river " * 500_000),
    ),  # a million tokens
    # window lengths and counts
    Case(
        "evaluate-max-seq-len-zero", EVALUATE + " --max_seq_len 0", 2, ("--max_seq_len", "positive")
    ),
    Case("evaluate-seq-len-zero", EVALUATE + " --seq_len 0", 2, ("--seq_len", "positive")),
    Case("evaluate-negative-eval-batches", EVALUATE + " --total_steps -1", 2, ("--total_steps",)),
    Case("evaluate-seq-lens-zero", EVALUATE + " --seq_lens 0,64", 2, ("--seq_lens", "positive")),
    Case(
        "evaluate-seq-lens-and-seq-len",
        EVALUATE + " --seq_lens 64 --seq_len 32",
        2,
        ("--seq_lens", "not allowed"),
    ),
    Case(
        "evaluate-seq-lens-one-too-long",
        EVALUATE + " --seq_lens 32,1000000 --output {tmp}/e.json",
        2,
        ("--seq_len 1000000", "too small"),
        absent=("{tmp}/e.json",),
    ),
    Case(
        "evaluate-position-buckets-zero",
        EVALUATE + " --position_buckets 0",
        2,
        ("--position_buckets", "positive"),
    ),
    Case(
        "plot-lengths-damaged-json",
        "plot_lengths {tmp}/e.json --output {tmp}/l.png",
        2,
        ("e.json", "cannot read"),
        setup=write("{tmp}/e.json", b"{not json"),
        absent=("{tmp}/l.png",),
    ),
    Case(
        "plot-lengths-not-evaluate-json",
        "plot_lengths {tmp}/e.json --output {tmp}/l.png",
        2,
        ("e.json", "not a file of evaluate"),
        setup=write("{tmp}/e.json", b'{"rows": []}'),
        absent=("{tmp}/l.png",),
    ),
    Case(
        "plot-lengths-not-utf8",
        "plot_lengths {tmp}/e.json --output {tmp}/l.png",
        2,
        ("e.json", "cannot read"),
        setup=write("{tmp}/e.json", b'{"seq_len": "\xff"}'),
        absent=("{tmp}/l.png",),
    ),
    Case(
        "plot-lengths-wrong-types",
        "plot_lengths {tmp}/e.json --output {tmp}/l.png",
        2,
        ("e.json", "not a file of evaluate"),
        absent=("{tmp}/l.png",),
        setup=write(
            "{tmp}/e.json",
            b'{"lengths": [1, {"seq_len": "32", "loss": 1.0, "positions": [{"start": 0}]}]}',
        ),
    ),
    Case(
        "plot-lengths-missing-window",
        "plot_lengths {tmp}/e.json --seq_len 64 --output {tmp}/l.png",
        2,
        ("--seq_len 64", "holds 32"),
        absent=("{tmp}/l.png",),
        setup=write(
            "{tmp}/e.json", b'{"max_seq_len": 32, "seq_len": 32, "loss": 1.0, "positions": []}'
        ),
    ),
    Case(
        "deploy-seq-len-zero",
        DEPLOY + " --max_seq_len 0",
        2,
        ("--max_seq_len", "positive"),
        absent=("{tmp}/deployed/model.onnx",),
    ),
    Case(
        "deploy-negative-accuracy-batches",
        DEPLOY + " --accuracy_batches -1",
        2,
        ("--accuracy_batches",),
        absent=("{tmp}/deployed/model.onnx",),
    ),
    Case(
        "deploy-negative-iterations",
        DEPLOY + " --iterations -1",
        2,
        ("--iterations",),
        absent=("{tmp}/deployed/model.onnx",),
    ),
    Case(
        "deploy-workspace-nan",
        DEPLOY + " --workspace_gib nan",
        2,
        ("--workspace_gib", "nan"),
        absent=("{tmp}/deployed/model.onnx",),
    ),
    Case(
        "deploy-workspace-negative",
        DEPLOY + " --workspace_gib -1",
        2,
        ("--workspace_gib", "-1"),
        absent=("{tmp}/deployed/model.onnx",),
    ),
    Case(
        "deploy-tensorrt-runner-without-tensorrt",
        DEPLOY + " --latency_runners tensorrt --no_tensorrt",
        2,
        ("--latency_runners", "--no_tensorrt"),
        absent=("{tmp}/deployed/model.onnx",),
    ),
    # checkpoints: latest, files, precision
    Case(
        "latest-names-a-missing-step",
        EVALUATE.replace("{ckpt}", "{run}"),
        2,
        ("latest", "step_00000099"),
        setup=write("{run}/latest", b"step_00000099\n"),
    ),
    Case(
        "latest-empty",
        EVALUATE.replace("{ckpt}", "{run}"),
        2,
        ("latest",),
        setup=write("{run}/latest", b""),
    ),
    Case(
        "latest-missing",
        EVALUATE.replace("{ckpt}", "{run}"),
        2,
        ("latest",),
        setup=delete("latest"),
    ),
    Case(
        "checkpoint-file-of-another-kind",
        EVALUATE.replace("{ckpt}", "{run}/step_00000002/trainer.pt"),
        2,
        ("trainer.pt", "not a llama3 model"),
    ),
    Case("resume-switching-to-pure-bf16", RESUME + " --bf16", 2, ("--bf16", "fp32")),
    # Hugging Face directories
    Case(
        "export-hf-shard-size-inf",
        EXPORT_HF + " --max_shard_size inf",
        2,
        ("--max_shard_size inf",),
        absent=("{tmp}/hf",),
        needs=("safetensors",),
    ),
    Case(
        "export-hf-shard-size-nan",
        EXPORT_HF + " --max_shard_size nan",
        2,
        ("--max_shard_size nan",),
        absent=("{tmp}/hf",),
        needs=("safetensors",),
    ),
    Case(
        "export-hf-shard-size-below-a-byte",
        EXPORT_HF + " --max_shard_size 1e-9",
        2,
        ("--max_shard_size 1e-9", "at least one byte"),
        absent=("{tmp}/hf",),
        needs=("safetensors",),
    ),
    Case(
        "export-hf-fp16-overflow",
        EXPORT_HF.replace("{ckpt}", "{tmp}/big") + " --dtype fp16",
        2,
        ("--dtype fp16", "output.weight", "bf16"),
        setup=fp16_overflow,
        absent=("{tmp}/hf", "{tmp}/hf.*"),
        needs=("safetensors",),
    ),
    Case(
        "import-hf-architectures-a-string",
        IMPORT_HF,
        2,
        ("config.json", "architectures"),
        setup=hf_directory({"architectures": "LlamaForCausalLM"}),
        absent=("{tmp}/imported",),
        needs=("safetensors",),
    ),
    Case(
        "import-hf-rope-parameters-a-string",
        IMPORT_HF,
        2,
        ("config.json", "rope_parameters"),
        setup=hf_directory({"rope_parameters": "llama3"}),
        absent=("{tmp}/imported",),
        needs=("safetensors",),
    ),
    Case(
        "import-hf-heads-a-string",
        IMPORT_HF,
        2,
        ("config.json", "num_attention_heads", '"4"'),
        setup=hf_directory({"num_attention_heads": "4"}),
        absent=("{tmp}/imported",),
        needs=("safetensors",),
    ),
    Case(
        "import-hf-hidden-size-a-list",
        IMPORT_HF,
        2,
        ("config.json", "hidden_size"),
        setup=hf_directory({"hidden_size": [32]}),
        absent=("{tmp}/imported",),
        needs=("safetensors",),
    ),
    Case(
        "import-hf-epsilon-a-string",
        IMPORT_HF,
        2,
        ("config.json", "rms_norm_eps"),
        setup=hf_directory({"rms_norm_eps": "1e-5"}),
        absent=("{tmp}/imported",),
        needs=("safetensors",),
    ),
    Case(
        "import-hf-rope-theta-a-string",
        IMPORT_HF,
        2,
        ("config.json", "rope_theta"),
        setup=hf_directory({"rope_parameters": {"rope_type": "default", "rope_theta": "x"}}),
        absent=("{tmp}/imported",),
        needs=("safetensors",),
    ),
    Case(
        "import-hf-weight-map-a-list",
        IMPORT_HF,
        2,
        ("model.safetensors.index.json", "weight_map"),
        setup=hf_directory(
            files={"model.safetensors.index.json": b'{"weight_map": ["model.safetensors"]}'}
        ),
        absent=("{tmp}/imported",),
        needs=("safetensors",),
    ),
    Case(
        "import-hf-into-a-run",
        IMPORT_HF.replace("{tmp}/imported", "{run}"),
        2,
        ("--to_checkpoint", "already holds a checkpoint", "step_00000002"),
        setup=hf_directory(),
        absent=("{run}/step_00000000",),
        needs=("safetensors",),
    ),
    # lm-evaluation-harness
    Case(
        "lm-eval-without-checkpoint",
        LM_EVAL + "tokenizer={tok}",
        2,
        ("checkpoint=",),
        setup=local_task,
        needs=("lm_eval",),
    ),
    Case(
        "lm-eval-without-tokenizer",
        LM_EVAL + "checkpoint={ckpt}",
        2,
        ("tokenizer=",),
        setup=local_task,
        needs=("lm_eval",),
    ),
    Case(
        "lm-eval-max-length-a-word",
        LM_EVAL + LM_MODEL + ",max_length=abc",
        2,
        ("max_length=abc", "at least 2"),
        setup=local_task,
        needs=("lm_eval",),
    ),
    Case(
        "lm-eval-max-length-negative",
        LM_EVAL + LM_MODEL + ",max_length=-5",
        2,
        ("max_length=-5",),
        setup=local_task,
        needs=("lm_eval",),
    ),
    Case(
        "lm-eval-max-length-one",
        LM_EVAL + LM_MODEL + ",max_length=1",
        2,
        ("max_length=1",),
        setup=local_task,
        needs=("lm_eval",),
    ),
    Case(
        "lm-eval-max-length-zero",
        LM_EVAL + LM_MODEL + ",max_length=0",
        2,
        ("max_length=0",),
        setup=local_task,
        needs=("lm_eval",),
    ),
    Case(
        "lm-eval-lowercase-maybe",
        LM_EVAL + LM_MODEL + ",lowercase=maybe",
        2,
        ("lowercase=maybe", "true or false"),
        setup=local_task,
        needs=("lm_eval",),
    ),
    Case(
        "lm-eval-unknown-task",
        LM_EVAL.replace("tiny_choice", "no_such_task") + LM_MODEL,
        2,
        ("--tasks", "no_such_task"),
        setup=local_task,
        needs=("lm_eval",),
    ),
    Case(
        "lm-eval-output-path-is-a-file",
        LM_EVAL + LM_MODEL + " --output_path {file}",
        2,
        ("--output_path", "is a file"),
        needs=("lm_eval",),
    ),
    # data
    Case(
        "preprocess-every-line-bad",
        "preprocess --input {tmp}/bad.jsonl --output {tmp}/out --no-progress",
        2,
        ("no documents", "bad.jsonl"),
        absent=("{tmp}/out/preprocess.json",),
        setup=write("{tmp}/bad.jsonl", b'{"text": 1}\nnot json\n{"other": "x"}\n'),
    ),
    Case(
        "preprocess-truncated-gzip",
        "preprocess --input {tmp}/cut.json.gz --output {tmp}/out --no-progress",
        2,
        ("no documents", "truncated_gzip", "cut.json.gz"),
        absent=("{tmp}/out/preprocess.json",),
        setup=write("{tmp}/cut.json.gz", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"),
    ),
    Case(
        "preprocess-truncated-parquet",
        "preprocess --input {tmp}/cut.parquet --output {tmp}/out --no-progress",
        2,
        ("no documents", "corrupt_parquet", "cut.parquet"),
        absent=("{tmp}/out/preprocess.json",),
        setup=write("{tmp}/cut.parquet", b"PAR1" + bytes(64)),
        needs=("pyarrow",),
    ),
    # a full disk
    Case(
        "preprocess-disk-full",
        "preprocess --input {train} --output {tmp}/out --no-progress",
        2,
        ("cannot write", "{tmp}/out", "space"),
        limit=4096,
        absent=("{tmp}/out/preprocess.json", "{tmp}/out/*/.*.tmp", "{tmp}/out/*/part-*"),
    ),
    Case(
        "pretokenize-disk-full",
        "pretokenize --corpus {tmp}/corpus --tokenizer {tok} --no-progress",
        2,
        ("cannot write", "space"),
        limit=4096,
        setup=copied_corpus,
        absent=("{tmp}/corpus/.tokens/*/meta.json", "{tmp}/corpus/.tokens/*/.*.tmp"),
    ),
    Case(
        "train-tokenizer-disk-full",
        TOKENIZER + " --model_file {tmp}/t.model",
        2,
        ("cannot write", "t.model", "space"),
        limit=1024,
        absent=("{tmp}/t.model", "{tmp}/t.model.tmp", "{tmp}/t.vocab"),
    ),
    Case(
        "evaluate-disk-full",
        EVALUATE + " --output {tmp}/eval.json",
        2,
        ("cannot write", "eval.json", "space"),
        limit=100,
        setup=pretokenized("{eval}"),
        absent=("{tmp}/eval.json", "{tmp}/eval.json.tmp"),
    ),
    Case(
        "checkpoint-save-disk-full",
        TRAIN + " --to_checkpoint {tmp}/r --save_steps 2",
        2,
        ("cannot write", "checkpoint", "step_00000002", "space"),
        limit=16384,
        setup=pretokenized("{train}", "{eval}"),
        absent=(
            "{tmp}/r/step_00000002",
            "{tmp}/r/step_00000002.tmp",
            "{tmp}/r/latest",
            "{tmp}/r/summary.json",
        ),
    ),
    Case(
        "export-hf-disk-full",
        EXPORT_HF + " --tokenizer {tok}",
        2,
        ("cannot write", "--output", "{tmp}/hf", "space"),
        limit=4096,
        absent=("{tmp}/hf", "{tmp}/hf.*"),
        needs=("safetensors", "tokenizers"),
    ),
    Case(
        "plot-disk-full-keeps-the-previous-figure",
        "plot {run} --output {tmp}/curves.png",
        2,
        ("cannot write", "curves.png"),
        limit=512,
        setup=write("{tmp}/curves.png", b"previous"),
        absent=("{tmp}/curves.png.tmp",),
    ),
]


def run_command(argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of ``python -m llama3 ARGV`` run in this process."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_run(tiny_corpus, tiny_tokenizer, tmp_path_factory) -> Path:
    """Two steps of a tiny model, saved at step 2."""
    run = tmp_path_factory.mktemp("bad_input") / "run"
    argv = shlex.split(
        TRAIN.format(train=tiny_corpus["train"], eval=tiny_corpus["eval"], tok=tiny_tokenizer)
    ) + ["--to_checkpoint", str(run)]
    assert main(argv) == 0
    return run


@pytest.fixture
def paths(tmp_path, trained_run, tiny_corpus, tiny_tokenizer, tiny_checkpoint) -> Paths:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (tmp_path / "existing_file").write_text("x")
    (tmp_path / "existing_dir").mkdir()
    return Paths(
        tmp=tmp_path,
        tok=tiny_tokenizer,
        ckpt=tiny_checkpoint("softplus"),
        run=run,
        train=tiny_corpus["train"],
        eval=tiny_corpus["eval"],
        file=tmp_path / "existing_file",
        dir=tmp_path / "existing_dir",
    )


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_line(case: Case, paths: Paths, capsys, monkeypatch, request):
    for module in case.needs:
        pytest.importorskip(module)
    if "lm_eval" in case.needs:
        index_once(request.getfixturevalue("lm_eval_index"), monkeypatch)
    for handler in logging.getLogger("lm_eval").handlers:  # made in an earlier test, on its stderr
        if type(handler) is logging.StreamHandler:
            monkeypatch.setattr(handler, "stream", sys.stderr)
    if case.stdin is not None:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(case.stdin), encoding="utf-8"))
    if case.setup is not None:
        case.setup(paths)
        capsys.readouterr()
    with file_size_limit(case.limit):
        code, err = run_command(shlex.split(paths.format(case.argv)), capsys)
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1, err[-3000:]
    print(errors[0])  # shown by pytest -rA
    assert code == case.code, err[-3000:]
    for word in case.words:
        assert paths.format(word) in errors[0], errors[0]
    for pattern in case.absent:
        pattern = paths.format(pattern)
        left = [str(p) for p in Path("/").glob(pattern.lstrip("/"))]
        assert not left, f"{case.id} left {left}"
    if case.id.startswith("plot-disk-full"):
        assert (paths.tmp / "curves.png").read_bytes() == b"previous"


def test_a_read_only_run_directory_is_one_line(paths: Paths, capsys):
    """A run directory nobody may write in (chattr +i for root, who ignores permissions)."""
    target = paths.tmp / "read_only"
    target.mkdir()
    with read_only(target):
        code, err = run_command(
            shlex.split(paths.format(TRAIN)) + ["--to_checkpoint", str(target)], capsys
        )
        assert not any(target.iterdir())
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert code == 2 and len(errors) == 1, err[-3000:]
    assert "--to_checkpoint" in errors[0] and "writable" in errors[0]


def test_a_read_only_output_folder_is_one_line(paths: Paths, capsys):
    """export_hf into a folder nobody may write in: one line naming --output, nothing written."""
    pytest.importorskip("safetensors")
    target = paths.tmp / "read_only"
    target.mkdir()
    with read_only(target):
        code, err = run_command(
            ["export_hf", "--from_checkpoint", str(paths.ckpt), "--output", str(target / "hf")],
            capsys,
        )
        assert not any(target.iterdir())
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert code == 2 and len(errors) == 1, err[-3000:]
    assert "--output" in errors[0] and "writable" in errors[0]


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    import os

    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(0o755)
        return
    if (
        shutil.which("chattr") is None
        or subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0
    ):
        pytest.skip("running as root on a filesystem without chattr +i: nothing is read-only")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)
