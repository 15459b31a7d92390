"""The lm-evaluation-harness model ``llama3``, with requests built here (no task downloads):
loglikelihood equals a direct computation, loglikelihood_rolling equals the loss evaluate
measures on the same text, generate_until stops at its strings and fits its budget to the
context, requests it cannot score are one line, and ``python -m llama3 lm_eval`` runs a task from
a local file and ends in one line when the disk cannot hold its results; lm-eval's own ``hf`` model
on an export_hf directory gives our scores."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lm_eval_tasks import local_choice_task, local_rolling_task, python_m

from llama3 import load_checkpoint
from llama3.__main__ import main
from llama3.data.clean import Cleaner
from llama3.data.tokenizer import Tokenizer

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402 - lm-eval is optional: after the skip

REPO = Path(__file__).resolve().parents[2]
WINDOW = 8  # tokens per window of the rolling log-likelihood
pytestmark = pytest.mark.usefixtures("one_thread")


def harness_model(checkpoint: Path, tokenizer: Path, **settings):
    from llama3.interop.lm_eval import Llama3LM

    return Llama3LM(
        checkpoint=str(checkpoint), tokenizer=str(tokenizer), batch_size=3, device="cpu", **settings
    )


@pytest.fixture(scope="module")
def lm(tiny_checkpoint, tiny_tokenizer):
    """The harness model over the tiny softplus checkpoint (context 32)."""
    return harness_model(tiny_checkpoint("softplus"), tiny_tokenizer)


def requests(kind: str, *arguments: tuple) -> list[Instance]:
    return [
        Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(arguments)
    ]


def test_registered_beside_the_built_in_models():
    from lm_eval.api.registry import get_model, model_registry

    from llama3.interop.lm_eval import Llama3LM

    assert get_model("llama3") is Llama3LM and "hf" in model_registry


def test_cleaning_is_the_tokenizers_unless_a_step_is_given(lm, tiny_checkpoint, tiny_tokenizer):
    import dataclasses

    recorded = Tokenizer(tiny_tokenizer).cleaner
    assert lm.cleaner == recorded == Cleaner()  # the tiny corpus went through preprocess
    kept_case = harness_model(tiny_checkpoint("softplus"), tiny_tokenizer, lowercase=False)
    assert kept_case.cleaner == dataclasses.replace(recorded, lowercase=False)


@torch.no_grad()
def test_loglikelihood_equals_direct_computation(lm, tiny_checkpoint, tiny_tokenizer):
    pairs = [
        ("The River", " flows"),
        ("A quiet Morning in the", " Garden by the old mill"),
        ("", "Music"),
        ("Café", " au lait"),
        ("x y " * 20, " the end"),
    ]  # the last: truncated
    results = lm.loglikelihood(requests("loglikelihood", *pairs), disable_tqdm=True)
    model, sp, clean = (
        load_checkpoint(tiny_checkpoint("softplus")),
        Tokenizer(tiny_tokenizer),
        Cleaner(),
    )
    for (context, continuation), (logprob, greedy) in zip(pairs, results):
        whole = [sp.eos_id, *sp.encode(clean(context + continuation))]
        n = len(whole) - 1 - len(sp.encode(clean(context))) if context else len(whole) - 1
        window = whole[-(lm.max_length + 1) :]
        logits = model(torch.tensor([window[:-1]]))[0, -n:]
        target = torch.tensor(window[-n:])
        expected = F.log_softmax(logits.float(), -1).gather(-1, target[:, None]).sum()
        assert logprob == pytest.approx(float(expected), rel=1e-5, abs=1e-5)
        assert greedy == bool((logits.argmax(-1) == target).all())
    # scored tokens: the model's own greedy choice, and another one
    ids = [sp.eos_id, *sp.encode(clean("The River"))]
    best = int(model(torch.tensor([ids]))[0, -1].argmax())
    scored = lm._loglikelihood_tokens(
        [((None, None), ids, [best]), ((None, None), ids, [(best + 1) % sp.vocab_size])]
    )
    assert [greedy for _, greedy in scored] == [True, False]


def test_rolling_equals_evaluate_loss(tiny_checkpoint, tiny_tokenizer, tmp_path):
    """evaluate (packed windows of WINDOW tokens) on [A] and on [A, B], where A has WINDOW tokens:
    the windows over B are rolling's windows, EOS before B its prefix, so the difference of the
    two totals is B's log-likelihood."""
    sp, clean = Tokenizer(tiny_tokenizer), Cleaner()
    words = [sp.piece(i)[1:] for i in range(sp.vocab_size) if sp.piece(i).startswith("\u2581")]
    words = [w for w in words if clean(w) == w and len(sp.encode(w)) == 1]  # one token each
    a_text = " ".join(words[i % len(words)] for i in range(WINDOW))
    b_text = " ".join(words[(3 * i + 1) % len(words)] for i in range(2 * WINDOW))
    assert len(sp.encode(a_text)) == WINDOW and len(sp.encode(b_text)) == 2 * WINDOW
    totals = []
    for name, texts in (("a", [a_text]), ("ab", [a_text, b_text])):
        corpus = tmp_path / name
        corpus.mkdir()
        (corpus / "part.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        assert (
            main(
                [
                    "evaluate",
                    "--from_checkpoint",
                    str(tiny_checkpoint("softplus")),
                    "--tokenizer",
                    str(tiny_tokenizer),
                    "--eval_corpus",
                    str(corpus),
                    "--max_seq_len",
                    str(WINDOW),
                    "--batch_size",
                    "1",
                    "--no-progress",
                    "--output",
                    str(tmp_path / f"{name}.json"),
                ]
            )
            == 0
        )
        result = json.loads((tmp_path / f"{name}.json").read_text())
        totals.append(result["loss"] * result["tokens"])
    lm = harness_model(tiny_checkpoint("softplus"), tiny_tokenizer, max_length=WINDOW)
    (rolling,) = lm.loglikelihood_rolling(
        requests("loglikelihood_rolling", (b_text,)), disable_tqdm=True
    )
    assert -rolling == pytest.approx(totals[1] - totals[0], rel=1e-5)


def test_generate_until_stops_at_the_strings(lm, tiny_checkpoint, tiny_tokenizer):
    from llama3.generate import Generator, SamplingSettings, completion_text

    sp = Tokenizer(tiny_tokenizer)
    generator = Generator(load_checkpoint(tiny_checkpoint("softplus")), sp, eos_id=sp.eos_id)

    def greedy(context: str, n: int) -> str:
        """Our generator's greedy text after the cleaned context and the start token."""
        ids = [sp.eos_id, *sp.encode(Cleaner()(context))]
        result = generator.generate_ids([ids], SamplingSettings(max_new_tokens=n, temperature=0))
        return completion_text(sp, ids, result.tokens[0])

    context = "The River and the"
    (free,) = lm.generate_until(
        requests("generate_until", (context, {"until": [], "max_gen_toks": 12})), disable_tqdm=True
    )
    assert free == greedy(context, 12) and len(free) > 6
    stop = free[3:5]
    stopped, short = lm.generate_until(
        requests(
            "generate_until",
            (context, {"until": [stop, "zzz"], "max_gen_toks": 12}),
            ("The Garden", {"until": "\n", "max_gen_toks": 3, "do_sample": False}),
        ),
        disable_tqdm=True,
    )
    assert stopped == free[: free.find(stop)]
    assert short == greedy("The Garden", 3)  # no newline ever: max_gen_toks ends it


def test_generate_until_stops_decoding_once_a_string_is_written(lm, monkeypatch):
    """A stop string ends its row's decoding at the next look (every CHECK_EVERY steps), not
    after max_gen_toks, and the text is what running to the end and cutting gives."""
    from llama3.generate import CHECK_EVERY, Generator

    steps = []
    original = Generator.generate_ids

    def counting(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        steps.append(result.decode_steps)
        return result

    monkeypatch.setattr(Generator, "generate_ids", counting)
    context = "The River and the"
    (free,) = lm.generate_until(
        requests("generate_until", (context, {"until": [], "max_gen_toks": 24})), disable_tqdm=True
    )
    stop = free[3:5]
    (stopped,) = lm.generate_until(
        requests("generate_until", (context, {"until": [stop], "max_gen_toks": 24})),
        disable_tqdm=True,
    )
    assert stopped == free[: free.find(stop)]
    assert steps[1] == CHECK_EVERY - 1 < steps[0], steps


def test_requests_mostly_unknown_to_the_tokenizer_are_said_once(
    tiny_checkpoint, tiny_tokenizer, capsys
):
    lm = harness_model(tiny_checkpoint("softplus"), tiny_tokenizer, ascii=False, nfkd=False)
    seen = ("The River", " and the")
    lm.loglikelihood(requests("loglikelihood", seen), disable_tqdm=True)
    assert "<unk>" not in capsys.readouterr().err
    unseen = ("The River", " ЖЖЖ ЖЖЖ ЖЖЖ ЖЖЖ")  # letters the tiny corpus never had
    lm.loglikelihood(requests("loglikelihood", unseen, unseen), disable_tqdm=True)
    lm.generate_until(
        requests("generate_until", (unseen[1], {"max_gen_toks": 2})), disable_tqdm=True
    )
    err = capsys.readouterr().err
    assert err.count("are <unk>") == 1 and "lm-eval requests" in err, err


def harness_command(
    command: list[str], model_args: str, tasks: Path, names: str, output: Path, *flags: str
) -> list[str]:
    """lm-eval's command line (``command``: the module and model) on the tasks ``names`` in
    ``tasks``, its results in ``output``."""
    return [
        *command,
        "--model_args",
        model_args,
        "--tasks",
        names,
        "--include_path",
        str(tasks),
        "--device",
        "cpu",
        "--batch_size",
        "4",
        "--output_path",
        str(output),
        *flags,
    ]


def run_harness(
    tasks: Path, index: Path, *commands: list[str], preexec_fn=None
) -> subprocess.CompletedProcess:
    """The harness ``commands`` (of :func:`harness_command`) one after the other in one process,
    offline, with the datasets cache beside the tasks and lm-eval's index of its built-in tasks
    in ``index``."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "HF_DATASETS_CACHE": str(tasks / "datasets"),
    }
    return subprocess.run(
        python_m(index, *commands),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=preexec_fn,
    )


def run_lm_eval(
    tiny_checkpoint,
    tokenizer: Path,
    tasks: Path,
    output: Path,
    index: Path,
    *flags: str,
    names: str = "tiny_choice",
    attention: str = "softplus",
    preexec_fn=None,
) -> subprocess.CompletedProcess:
    """``python -m llama3 lm_eval`` on a tiny checkpoint and the tasks ``names`` in ``tasks``."""
    command = harness_command(
        ["llama3", "lm_eval", "--model", "llama3"],
        f"checkpoint={tiny_checkpoint(attention)},tokenizer={tokenizer}",
        tasks,
        names,
        output,
        *flags,
    )
    return run_harness(tasks, index, command, preexec_fn=preexec_fn)


def logged_loglikelihoods(output: Path, task: str) -> list[float]:
    """Every log-likelihood lm-eval logged for ``task`` (--log_samples), in document order: one
    per text of a rolling task, one per choice of a multiple-choice task."""
    (samples,) = output.rglob(f"samples_{task}_*.jsonl")
    rows = sorted(
        (json.loads(line) for line in samples.read_text().splitlines()),
        key=lambda row: row["doc_id"],
    )
    responses = [r for row in rows for r in row["filtered_resps"]]
    return [float(r[0] if isinstance(r, list) else r) for r in responses]  # r: ll or (ll, greedy)


QUESTIONS = [
    ("The River", [" flows", " music"], 0),
    ("The city", [" of", " garden"], 1),
    ("A quiet", [" morning", " the"], 0),
    ("Old stone", [" bridge", " window"], 1),
]
TEXTS = [
    "The river and the garden of the old city by the water. " * 4,
    "Music school in the <unk> village, a quiet morning.",
    "Stone",
]


@pytest.fixture(scope="module")
def ours(tiny_checkpoint, tiny_tokenizer, lm_eval_index, tmp_path_factory) -> Path:
    """``python -m llama3 lm_eval`` on the tiny softmax model, run once for the tests below: a
    multiple-choice task (QUESTIONS) and a perplexity task (TEXTS) from local files in the
    returned folder, their samples logged, the results in its ``ours`` (the datasets cache beside
    the tasks is warm afterwards)."""
    tasks = local_rolling_task(
        local_choice_task(tmp_path_factory.mktemp("lm_eval_tasks"), QUESTIONS), TEXTS
    )
    done = run_lm_eval(
        tiny_checkpoint,
        tiny_tokenizer,
        tasks,
        tasks / "ours",
        lm_eval_index,
        "--log_samples",
        names="tiny_choice,tiny_rolling",
        attention="softmax",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return tasks


def test_the_lm_eval_command_runs_a_local_task(ours, tiny_checkpoint, tiny_tokenizer):
    """``python -m llama3 lm_eval`` with a multiple-choice task read from a local JSON file; its
    accuracy is the share of questions whose right answer our loglikelihood scores highest."""
    (result,) = (ours / "ours").rglob("results_*.json")
    accuracy = json.loads(result.read_text())["results"]["tiny_choice"]["acc,none"]
    lm = harness_model(tiny_checkpoint("softmax"), tiny_tokenizer)
    right = 0
    for question, choices, label in QUESTIONS:
        scores = lm.loglikelihood(
            requests("loglikelihood", *[(question, c) for c in choices]), disable_tqdm=True
        )
        right += max(range(len(choices)), key=lambda i: scores[i][0]) == label
    assert accuracy == pytest.approx(right / len(QUESTIONS))


def test_lm_evals_hf_backend_on_the_export_gives_our_scores(
    ours, tiny_checkpoint, tiny_tokenizer, lm_eval_index, tmp_path
):
    """lm-eval's own ``hf`` model on an export_hf directory scores as our ``llama3`` model does:
    multiple choice with default settings, and whole texts (perplexity) with add_bos_token=False,
    since its loglikelihood_rolling puts the start token (the declared bos) before the text's own
    encoding, which holds the start token already when the tokenizer adds it, as ours does."""
    directory = tmp_path / "hf"
    assert (
        main(
            [
                "export_hf",
                "--from_checkpoint",
                str(tiny_checkpoint("softmax")),
                "--tokenizer",
                str(tiny_tokenizer),
                "--output",
                str(directory),
            ]
        )
        == 0
    )
    config = json.loads((directory / "config.json").read_text())
    generation = json.loads((directory / "generation_config.json").read_text())
    start = Tokenizer(tiny_tokenizer).eos_id  # the start token of packed training
    assert config["bos_token_id"] == generation["bos_token_id"] == start

    settings = {"tiny_choice": "", "tiny_rolling": ",add_bos_token=False"}
    theirs = run_harness(
        ours,
        lm_eval_index,
        *[
            harness_command(
                ["lm_eval", "--model", "hf"],
                f"pretrained={directory}{setting}",
                ours,
                task,
                tmp_path / task,
                "--log_samples",
            )
            for task, setting in settings.items()
        ],
    )
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    for task in settings:
        expected = logged_loglikelihoods(ours / "ours", task)
        assert len(expected) == (2 * len(QUESTIONS) if task == "tiny_choice" else len(TEXTS))
        assert logged_loglikelihoods(tmp_path / task, task) == pytest.approx(expected, abs=1e-4)


def test_the_generation_budget_fits_the_context_unless_a_task_asks_for_more(lm):
    """A model of context 32: tasks that set no budget generate 16 tokens; one whose budget
    leaves no room for a context is refused in one line naming --gen_kwargs."""
    from llama3.errors import UsageError

    assert (lm.max_length, lm.max_gen_toks) == (32, 16)
    (text,) = lm.generate_until(
        requests("generate_until", ("The River", {"until": []})), disable_tqdm=True
    )
    assert 0 < len(lm.tok_encode(text, add_special_tokens=False)) <= 16
    with pytest.raises(UsageError, match="--gen_kwargs max_gen_toks"):
        lm.generate_until(
            requests("generate_until", ("The River", {"max_gen_toks": 32})), disable_tqdm=True
        )


@pytest.mark.parametrize(
    "context, continuation, words",
    [
        ("The River", " the" * 40, "more than max_length 32"),
        ("The River", "", "no tokens"),
        ("The River", " ", "no tokens"),  # an empty choice after the target delimiter
        ("", "", "no tokens"),
    ],
)
def test_requests_that_cannot_be_scored_are_one_line(lm, context, continuation, words):
    from llama3.errors import UsageError

    with pytest.raises(UsageError, match=words):
        lm.loglikelihood(requests("loglikelihood", (context, continuation)), disable_tqdm=True)


def test_results_the_disk_cannot_hold_are_one_line(
    ours, tiny_checkpoint, tiny_tokenizer, lm_eval_index, tmp_path
):
    """A full disk (a file size limit) when lm-eval saves its results: it would log this and
    exit 0; the command prints its table, removes the partial files and ends with one line. The
    tasks are those the run of ``ours`` read, so their datasets cache needs no writing."""
    import resource

    def full_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))

    done = run_lm_eval(
        tiny_checkpoint,
        tiny_tokenizer,
        ours,
        tmp_path / "full",
        lm_eval_index,
        "--log_samples",
        preexec_fn=full_disk,
    )
    errors = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-3000:]
    assert "--output_path" in errors[0] and "tiny_choice" in done.stdout
    assert not [p for p in (tmp_path / "full").rglob("*") if p.is_file()]
