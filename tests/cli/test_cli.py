"""The command line as a whole: every flag of every subcommand is documented, the flags that a
trained model's commands renamed keep their older spellings, the shell scripts and the README use
only flags that exist, the modules below the commands import neither the command line nor a
command, and a library's configuration error reaches the user naming the flag."""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llama3.__main__ import COMMANDS, main
from llama3.cli import flag_of
from llama3.errors import ConfigError


def parser_of(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
    return parser


# commands whose flags are ours (lm_eval passes its arguments on to lm-evaluation-harness)
PARSED = [c for c in COMMANDS if hasattr(importlib.import_module(COMMANDS[c][0]), "add_arguments")]


@pytest.mark.parametrize("command", PARSED)
def test_every_flag_is_documented(command):
    undocumented = [a.option_strings for a in parser_of(command)._actions if not a.help]
    assert not undocumented


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_runs(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and "--" in capsys.readouterr().out


REQUIRED = {
    "evaluate": ["--from_checkpoint", "c", "--tokenizer", "t", "--eval_corpus", "e"],
    "deploy": ["--from_checkpoint", "c"],
    "generate": ["--from_checkpoint", "c", "--tokenizer", "t"],
}


@pytest.mark.parametrize("command", list(REQUIRED))
def test_window_length_keeps_its_older_spelling(command, capsys):
    parser = parser_of(command)
    assert parser.parse_args([*REQUIRED[command], "--seq_len", "24"]).seq_len == 24
    assert parser.parse_args([*REQUIRED[command], "--max_seq_len", "24"]).seq_len == 24
    assert parser.parse_args(REQUIRED[command]).seq_len is None  # the checkpoint's context
    with pytest.raises(SystemExit):
        main([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--max_seq_len is accepted as an older spelling" in help_text


def test_evaluated_batches_keep_their_older_spelling():
    parser = parser_of("evaluate")
    assert parser.parse_args([*REQUIRED["evaluate"], "--eval_batches", "5"]).eval_batches == 5
    assert parser.parse_args([*REQUIRED["evaluate"], "--total_steps", "5"]).eval_batches == 5
    assert parser.parse_args(REQUIRED["evaluate"]).eval_batches == 0


LIBRARIES = [
    "llama3.loss",
    "llama3.checkpoint",
    "llama3.runtime",
    "llama3.data.dataset",
    "llama3.data.preprocess",
    "llama3.data.tokenizer",
    "llama3.data.tokens",
    "llama3.generate",
    "llama3.import_meta",
    "llama3.plot",
    "llama3.plot_lengths",
    "llama3.interop.hf_export",
    "llama3.interop.hf_import",
    "llama3.training.parallel",
    "llama3.training.step",
    "llama3.training.state",
]


def test_lower_layers_import_no_command_line():
    """The libraries (loss, data, checkpoints, runtime, generation, import and export, figures,
    training's pieces) import neither llama3.cli nor a command."""
    code = (
        f"import sys, {', '.join(LIBRARIES)}; "
        "print(sorted(m for m in sys.modules if m in ('llama3.cli', 'llama3.deploy.command') "
        "or m.startswith('llama3.commands')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_configuration_errors_name_the_flag_a_user_typed(capsys):
    """A library's ConfigError names fields; the command line names the flag that sets each."""
    error = ConfigError("{dim} ({}) must be divisible by {n_heads} ({})", 30, 4)
    assert str(error) == "dim (30) must be divisible by n_heads (4)"
    assert (
        error.at("params.json").naming(flag_of)
        == "params.json: --dim (30) must be divisible by --n_heads (4)"
    )
    assert pickle.loads(pickle.dumps(error)).fields == ("dim", "n_heads")
    argv = ["generate", "--from_checkpoint", "c", "--tokenizer", "t", "--prompt", "p"]
    assert main([*argv, "--nucleus_prob", "2"]) == 2  # SamplingSettings.top_p
    assert capsys.readouterr().err == "error: --nucleus_prob must be in (0, 1], got 2.0\n"


REPO = Path(__file__).resolve().parents[2]
SCRIPTS = [
    "quickstart.sh",
    "train_tokenizer.sh",
    "train_llama3.sh",
    "eval_llama3.sh",
    "deploy_llama3.sh",
    "generate_llama3.sh",
]
FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*")


def script_commands(text: str) -> list[tuple[str, list[str]]]:
    """(subcommand, flags) of each ``-m llama3 SUBCOMMAND ...`` in a script, continuation lines
    joined; ``$SUBCOMMAND`` stands for its default."""
    text = text.replace("\\\n", " ")
    default = re.search(r'SUBCOMMAND="\$\{SUBCOMMAND:-(\w+)\}"', text)
    found = []
    for line in text.splitlines():
        match = re.search(r'-m llama3 ("\$SUBCOMMAND"|\w+)(.*)', line)
        if match:
            name = default.group(1) if "SUBCOMMAND" in match.group(1) else match.group(1)
            found.append((name, FLAG.findall(match.group(2))))
    return found


def readme_commands() -> list[tuple[str, list[str]]]:
    """(subcommand, flags) of the README's parameter table and of its ``python -m llama3``
    commands."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    found = [
        (m.group(1), FLAG.findall(m.group(2)))
        for m in re.finditer(r"^\| `(\w+)` \|[^|]*\|(.*)\|$", text, re.MULTILINE)
        if m.group(1) in PARSED
    ]
    found += [
        (m.group(1), FLAG.findall(m.group(2)))
        for m in re.finditer(r"python -m llama3 (\w+)(.*)", text)
        if m.group(1) in PARSED
    ]
    return found


@pytest.mark.parametrize("source", [*SCRIPTS, "README.md"])
def test_scripts_and_readme_use_flags_that_exist(source):
    commands = (
        readme_commands() if source == "README.md" else script_commands((REPO / source).read_text())
    )
    assert commands
    for command, flags in commands:
        known = parser_of(command)._option_string_actions
        assert [f for f in flags if f not in known] == [], f"{source}: {command}"


def test_project_metadata_reads_without_deprecation_warnings():
    """setuptools reads pyproject.toml as an installation does, every warning an error (the
    license as a TOML table is deprecated: an SPDX string is the current form)."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} predates SPDX license strings (77)")
    code = (
        "import warnings; warnings.simplefilter('error'); "
        "from setuptools.config.pyprojecttoml import apply_configuration; "
        "from setuptools.dist import Distribution; "
        "apply_configuration(Distribution(), 'pyproject.toml')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_scripts_and_benchmarks_let_idle_openmp_threads_sleep(given, expected, monkeypatch):
    """On a shared machine, spinning OpenMP threads slow training by up to 30 times
    (benchmarks/threads.py): the scripts and the benchmarks' child processes wait passively
    unless the user chose a policy."""
    from benchmarks.common import child_env

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    shown = subprocess.run(
        ["bash", "-c", 'source scripts/common.sh && echo "$OMP_WAIT_POLICY"'],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert shown.stdout.strip() == expected
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    if given:
        monkeypatch.setenv("OMP_WAIT_POLICY", given)
    assert child_env()["OMP_WAIT_POLICY"] == expected


@pytest.mark.parametrize(
    "script", [*SCRIPTS, "multitrain_llama3.sh", "slurm_llama3.sbatch", "run_tests.sh"]
)
def test_every_script_prints_its_manual(script):
    done = subprocess.run(
        ["bash", script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "Usage:" in done.stdout and "#" not in done.stdout.splitlines()[0]


@pytest.mark.parametrize(
    "script, env, words",
    [
        ("slurm_llama3.sbatch", {}, "submit this script with sbatch"),
        ("multitrain_llama3.sh", {"RDZV_BACKEND": "etcd"}, "RDZV_BACKEND must be c10d or static"),
    ],
)
def test_launch_scripts_refuse_what_they_cannot_run_in_one_line(script, env, words):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run(
        ["bash", script],
        cwd=REPO,
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and done.stderr.startswith("error: ") and words in done.stderr
