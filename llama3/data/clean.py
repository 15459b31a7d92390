"""Text cleaning, step by step, each step on by default and each one can be switched off.

Order: Unicode NFKD normalisation → ASCII (characters without an ASCII form are dropped; after NFKD
accents split off, so "é" becomes "e") → lowercase → drop empty bracket pairs such as "()", "[ ]"
and "{}" (left behind where citations or formulas were removed from the source text).

``preprocess`` records the steps it applied in its ``preprocess.json``; ``train_tokenizer`` records
the steps its training text went through beside the model (:mod:`llama3.data.tokenizer`), and
every command that encodes text for a trained model applies them from there.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

_EMPTY_BRACKETS = re.compile(r"\(\s*\)|\[\s*\]|\{\s*\}")


@dataclass(frozen=True)
class Cleaner:
    nfkd: bool = True
    ascii: bool = True
    lowercase: bool = True
    drop_empty_brackets: bool = True

    def __call__(self, text: str) -> str:
        if not text.isascii():  # NFKD and the ASCII filter leave ASCII text unchanged
            if self.nfkd:
                text = unicodedata.normalize("NFKD", text)
            if self.ascii:
                text = text.encode("ascii", "ignore").decode("ascii")
        if self.lowercase:
            text = text.lower()
        if self.drop_empty_brackets and ("(" in text or "[" in text or "{" in text):
            text = _EMPTY_BRACKETS.sub("", text)
        return text

    def to_dict(self) -> dict[str, bool]:
        return asdict(self)

    @classmethod
    def from_dict(cls, steps: Mapping[str, Any]) -> Cleaner:
        """A cleaner from :meth:`to_dict`'s form; ValueError for unknown or non-boolean steps."""
        names = {f.name for f in dataclasses.fields(cls)}
        if set(steps) != names or not all(isinstance(v, bool) for v in steps.values()):
            raise ValueError(f"expected true or false for each of {', '.join(sorted(names))}")
        return cls(**steps)

    @classmethod
    def none(cls) -> Cleaner:
        """The cleaner that changes nothing (text used as given)."""
        return cls(nfkd=False, ascii=False, lowercase=False, drop_empty_brackets=False)

    @property
    def is_identity(self) -> bool:
        return not any(asdict(self).values())

    def describe(self) -> str:
        steps = {
            "nfkd": "NFKD",
            "ascii": "ASCII",
            "lowercase": "lowercase",
            "drop_empty_brackets": "empty brackets dropped",
        }
        done = [text for name, text in steps.items() if getattr(self, name)]
        return ", ".join(done) or "none (text used as given)"

    @classmethod
    def from_flags(cls, steps: Any, base: Cleaner | None = None) -> Cleaner:
        """The steps ``steps`` sets, one attribute each (parsed flags); those it leaves unset
        (None) take ``base``'s."""
        base = base or cls()
        return cls(
            **{
                name: getattr(base, name) if getattr(steps, name) is None else getattr(steps, name)
                for name in asdict(base)
            }
        )
