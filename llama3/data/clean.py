"""Text cleaning, step by step as the original preprocessing did it; each step can be switched off.

Order: Unicode NFKD normalisation → ASCII (characters without an ASCII form are dropped; after NFKD
accents split off, so "é" becomes "e") → lowercase → drop empty bracket pairs such as "()", "[ ]"
and "{}" (left behind where citations or formulas were removed from the source text).
"""

from __future__ import annotations

import argparse
import re
import unicodedata
from dataclasses import asdict, dataclass

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
    def from_flags(cls, args: argparse.Namespace) -> Cleaner:
        return cls(nfkd=args.nfkd, ascii=args.ascii, lowercase=args.lowercase,
                   drop_empty_brackets=args.drop_empty_brackets)


def add_cleaning_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cleaning (each step on by default, as in the original)")
    flag = argparse.BooleanOptionalAction
    group.add_argument("--nfkd", action=flag, default=True,
                       help="Unicode NFKD normalisation (splits accents from letters, expands "
                            "ligatures)")
    group.add_argument("--ascii", action=flag, default=True,
                       help="keep only ASCII characters (after NFKD, accented letters keep their "
                            "base letter)")
    group.add_argument("--lowercase", action=flag, default=True, help="lowercase the text")
    group.add_argument("--drop_empty_brackets", action=flag, default=True,
                       help='remove empty bracket pairs: "()", "[]", "{}" (also with spaces inside)')
