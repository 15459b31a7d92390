"""``python -m llama3 lm_eval ARGS``: lm-evaluation-harness's command line (``lm_eval ARGS``) with
our ``llama3`` model registered. lm-eval finds models only in its own list, so its ``lm_eval``
command alone does not know ours; this one imports :mod:`llama3.interop.lm_eval` first.
"""

from __future__ import annotations

import sys

from llama3.interop import require

USAGE = """\
python -m llama3 lm_eval --model llama3 --model_args checkpoint=RUN,tokenizer=MODEL_FILE[,...] \\
    --tasks TASKS [lm_eval's other flags]

llama3 model arguments: checkpoint, tokenizer, device, dtype (fp32|bf16|fp16), max_length,
max_gen_toks (256), start_token (eos|bos), nfkd, ascii, lowercase, drop_empty_brackets (default:
the cleaning recorded with the tokenizer);
lm_eval's --batch_size sets the batch. lm_eval's own help follows.
"""


def main(argv: list[str]) -> int:
    """Run lm-eval's command line on ``argv`` with the llama3 model registered."""
    require("eval", "lm_eval")
    import llama3.interop.lm_eval  # noqa: F401 - registers the model
    from lm_eval.__main__ import cli_evaluate

    if not argv or "-h" in argv or "--help" in argv:
        print(USAGE)
    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
