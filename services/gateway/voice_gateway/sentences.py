"""Cutting a streamed LLM reply into sentences as the tokens arrive, so speech can start early."""

from __future__ import annotations

import re

_END = re.compile(r"[.!?…]+[\"')\]]*(?=\s)|\n+")
_ABBREVIATION = re.compile(r"\b(?:mr|mrs|ms|dr|prof|st|jr|sr|vs|etc|e\.g|i\.e|no|approx|a\.m|p\.m)\.$", re.IGNORECASE)
_NUMBER_DOT = re.compile(r"\d\.$")


class SentenceStream:
    """Feeds text deltas in, gets complete sentences out.

    Args:
        min_chars: A sentence shorter than this is held and joined to the next one (avoids
            synthesizing "Sure." on its own when more follows quickly).
    """

    def __init__(self, min_chars: int = 12) -> None:
        self._buffer = ""
        self._min_chars = min_chars

    def feed(self, delta: str) -> list[str]:
        """Adds a delta; returns the sentences it completed, in order."""
        self._buffer += delta
        sentences: list[str] = []
        start = 0
        for match in _END.finditer(self._buffer):
            candidate = self._buffer[start : match.end()].strip()
            if not candidate:
                start = match.end()
                continue
            head = self._buffer[start : match.end()].rstrip("\"')]")
            if _ABBREVIATION.search(head) or (_NUMBER_DOT.search(head) and match.group().strip() == "."):
                continue
            if len(candidate) < self._min_chars and match.group().strip():
                continue
            sentences.append(candidate)
            start = match.end()
        self._buffer = self._buffer[start:]
        return sentences

    def flush(self) -> list[str]:
        """Returns what is left as a last sentence (if it has any words)."""
        rest, self._buffer = self._buffer.strip(), ""
        return [rest] if re.search(r"\w", rest) else []
