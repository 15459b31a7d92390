"""Models trained here, elsewhere: Hugging Face directories (export and import) and an
lm-evaluation-harness model. transformers, tokenizers, safetensors and lm_eval are optional
(extras ``.[hf]`` and ``.[eval]``) and imported only where used."""

from __future__ import annotations

import importlib.util

from llama3.errors import UsageError


def require(extra: str, *modules: str) -> None:
    """UsageError naming the missing packages and the extra that installs them."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(
            f"{', '.join(missing)} not installed: pip install -e '.[{extra}]' in this "
            "repository, or pip install " + " ".join(missing)
        )
