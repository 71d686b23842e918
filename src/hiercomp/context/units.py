"""Cut a text into the units compressors keep or drop (words, sentences, documents) and glue kept ones back.

A unit is a character span ``[start, end)`` of the original text. Rendering the kept units puts back the
whitespace that stood before each one in the original; where two kept units were not neighbours and that
whitespace is empty (``(with`` after dropping ``(``), a space is put so words never fuse.

Words: a number with its inner separators (``23.5``, ``1,000``), a word with inner apostrophes or hyphens
(``Levi's``, ``Mercedes-Benz``), or one other non-space character (punctuation is its own unit, so it can go
while the words stay whole).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

WORD_RE = re.compile(r"\d+(?:[.,:]\d+)+|\w+(?:['’\-]\w+)*|[^\w\s]")
# A sentence ends at . ! ? (with closing quotes/brackets) followed by whitespace, or at a line break.
SENTENCE_END_RE = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+|\n+")
DOCUMENT_SEP_RE = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class Units:
    text: str
    spans: tuple[tuple[int, int], ...]

    def __len__(self) -> int:
        return len(self.spans)

    def piece(self, i: int) -> str:
        start, end = self.spans[i]
        return self.text[start:end]

    def leading_space(self, i: int) -> str:
        """The whitespace between unit i-1 (or the text's start) and unit i."""
        prev_end = self.spans[i - 1][1] if i > 0 else 0
        gap = self.text[prev_end:self.spans[i][0]]
        return gap if gap.isspace() else ""

    def standalone(self, i: int) -> str:
        """Unit i as it costs inside a rendered text: one space before it when it had whitespace before it."""
        return (" " if i > 0 and self.leading_space(i) else "") + self.piece(i)

    def render(self, kept: list[int] | tuple[int, ...]) -> str:
        out: list[str] = []
        prev = -2
        for i in sorted(kept):
            if out:
                sep = self.leading_space(i)
                if i != prev + 1:
                    if "\n" in self.text[self.spans[prev][1]:self.spans[i][0]] and "\n" not in sep:
                        sep = sep or " "
                    if not sep and out[-1][-1:].isalnum() and self.piece(i)[:1].isalnum():
                        sep = " "
                out.append(sep)
            out.append(self.piece(i))
            prev = i
        return "".join(out)


def _spans(pattern: re.Pattern[str], text: str) -> tuple[tuple[int, int], ...]:
    return tuple((m.start(), m.end()) for m in pattern.finditer(text))


def words(text: str) -> Units:
    return Units(text, _spans(WORD_RE, text))


def _split(text: str, separator: re.Pattern[str]) -> Units:
    spans = []
    start = 0
    for m in separator.finditer(text):
        _add_stripped(text, start, m.start(), spans)
        start = m.end()
    _add_stripped(text, start, len(text), spans)
    return Units(text, tuple(spans))


def _add_stripped(text: str, start: int, end: int, spans: list[tuple[int, int]]) -> None:
    piece = text[start:end]
    if piece.strip():
        lead = len(piece) - len(piece.lstrip())
        trail = len(piece) - len(piece.rstrip())
        spans.append((start + lead, end - trail))


def sentences(text: str) -> Units:
    return _split(text, SENTENCE_END_RE)


def documents(text: str) -> Units:
    """Documents are separated by blank lines."""
    return _split(text, DOCUMENT_SEP_RE)
