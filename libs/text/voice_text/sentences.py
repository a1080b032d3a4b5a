"""Where sentences end, for speaking text one sentence at a time.

The TTS worker synthesizes a text sentence by sentence and the gateway cuts the LLM's streamed
reply into sentences as its tokens arrive, so speech starts before the reply is finished. Both use
the rules here: :func:`split_sentences` on a whole text, :class:`SentenceSplitter` on text that
arrives in pieces. Fed any cut of a text, the splitter returns exactly what :func:`split_sentences`
returns for the whole (with its defaults), only as soon as each sentence is certain.
"""

from __future__ import annotations

import re

__all__ = ["SentenceSplitter", "split_sentences"]

# Words ending in "." that are followed by more of the same sentence.
_NON_TERMINAL_ABBREVIATIONS = frozenset(
    "mr mrs ms mx dr prof st sr jr rev hon gen col capt lt sgt gov sen rep pres mt "
    "vs approx cf e.g i.e a.m p.m u.s u.k ph.d".split()
)

# Abbreviations that continue the sentence when a number follows ("No. 5", "p. 12").
_NUMBER_ABBREVIATIONS = frozenset("no nos p pp fig figs eq vol ch sec".split())

# Abbreviations that may also close a sentence: they end it only before a capital.
_AMBIGUOUS_ABBREVIATIONS = frozenset({"etc", "inc", "ltd", "co", "corp", "al"})

_TERMINATOR = re.compile(r"[.!?…]+[\"'”’)\]»]*(?=\s|$)")
_WORD_BEFORE = re.compile(r"([\w.]+)$")
_SPEAKABLE = re.compile(r"\w")
# A clause mark a first chunk may end at: a comma, semicolon, colon or dash followed by more words.
_CLAUSE = re.compile(r"(?:[,;:–—]|(?<=\s)-)(?=\s+\w)")


def split_sentences(text: str) -> list[str]:
    """Split text into sentences for sentence-by-sentence synthesis.

    Sentences end at ".", "!", "?", "…" (and runs of them such as "?!" or
    "..."), optionally followed by closing quotes or brackets, when whitespace or
    the end of the text follows; every line break also ends a sentence. A period
    or ellipsis does not end a sentence when the next word starts in lower case,
    nor does a period after a title or common abbreviation ("Dr.", "e.g.",
    "vs.", "No. 5") or a single-letter initial ("J. Smith"). Decimals ("3.14") and dotted names ("example.com")
    never split because no whitespace follows their period. Pieces with no
    letter or digit (a stray "—" or "!!") are merged into the previous sentence.

    Args:
        text: Text to split.

    Returns:
        Stripped, non-empty sentences in order; empty for blank text.
    """
    pieces: list[str] = []
    for line in text.splitlines():
        start = 0
        for match in _TERMINATOR.finditer(line):
            if _ends_sentence(line, start, match):
                pieces.append(line[start : match.end()])
                start = match.end()
        pieces.append(line[start:])

    sentences: list[str] = []
    for piece in pieces:
        piece = " ".join(piece.split())
        if not piece:
            continue
        if sentences and not _SPEAKABLE.search(piece):
            sentences[-1] = f"{sentences[-1]} {piece}"
        elif sentences and not _SPEAKABLE.search(sentences[-1]):
            sentences[-1] = f"{sentences[-1]} {piece}"
        else:
            sentences.append(piece)
    return sentences


def _ends_sentence(line: str, start: int, match: re.Match[str]) -> bool:
    """Tell whether the terminator ``match`` in ``line`` closes a sentence."""
    punctuation = match.group().rstrip("\"'”’)]»")
    following = line[match.end() :].lstrip()
    next_char = following[:1]
    if not next_char:
        return True
    if "!" in punctuation or "?" in punctuation:
        return True
    if next_char.islower():
        return False
    if punctuation != ".":
        return True
    word_match = _WORD_BEFORE.search(line, start, match.start())
    if word_match is None:
        return True
    word = word_match.group(1).lower()
    if word in _NON_TERMINAL_ABBREVIATIONS:
        return False
    if word in _NUMBER_ABBREVIATIONS:
        return not next_char.isdigit()
    if word in _AMBIGUOUS_ABBREVIATIONS:
        return next_char.isupper()
    if len(word) == 1 and word.isalpha() and word_match.group(1) not in ("I", "i"):
        return False
    return True


def _cut(line: str, scan: int, complete: bool) -> tuple[list[str], int, int]:
    """Cut one line (without its line break) at the sentence ends decided so far.

    Args:
        line: The line, from the last sentence end on.
        scan: Where to resume looking for terminators: no undecided one starts before it.
        complete: Whether the line is whole (its break or the end of the text has arrived).

    Returns:
        The decided pieces, the offset the undecided rest starts at, and where to resume scanning.
    """
    pieces: list[str] = []
    start = 0
    for match in _TERMINATOR.finditer(line, scan):
        if not complete and not line[match.end() :].strip():
            break  # the next word (or more punctuation, or the line break) decides it
        if _ends_sentence(line, start, match):
            pieces.append(line[start : match.end()])
            start = match.end()
        scan = match.end()
    if complete:
        pieces.append(line[start:])
        start = scan = len(line)
    return pieces, start, scan


class SentenceSplitter:
    """Cuts text that arrives in pieces into sentences, by the rules of :func:`split_sentences`.

    The rules look ahead (a terminator needs whitespace after it; a period before a lower-case
    word or after "Dr" does not end a sentence; a piece with no word joins the sentence before),
    so a sentence is returned once the first character of the next one has arrived, and the rest
    at :meth:`flush`. With the defaults, the sentences of all :meth:`feed` calls and the final
    :meth:`flush` are exactly ``split_sentences(text)`` however the text was cut.

    After :meth:`flush` the splitter is empty and ready for another text.

    Args:
        min_chars: A sentence shorter than this is held and joined (with one space) to the next,
            so "Sure." is not spoken on its own when more follows; 0 holds nothing.
        first_clause_min_words: When above 0, the first chunk of a text may end early at a comma,
            semicolon, colon or spaced dash that follows at least this many words and is followed
            by another word, so speech can start before a long first sentence ends. The cut is the
            same however the text arrives; later sentences are never cut. 0 (the default) turns it
            off.
    """

    def __init__(self, min_chars: int = 0, first_clause_min_words: int = 0) -> None:
        if min_chars < 0 or first_clause_min_words < 0:
            raise ValueError("min_chars and first_clause_min_words must be >= 0")
        self._min_chars = min_chars
        self._first_clause_min_words = first_clause_min_words
        self._reset()

    def _reset(self) -> None:
        self._buffer = ""  # text after the last decided sentence end, within one line
        self._scan = 0  # no undecided terminator in _buffer starts before this
        self._pending: str | None = None  # the last sentence: a piece with no word may still join it
        self._held = ""  # chunks shorter than min_chars, waiting for the next one
        self._started = False  # whether a chunk was returned or held since the last reset

    def feed(self, delta: str) -> list[str]:
        """Add the next piece of text.

        Args:
            delta: Text that follows everything fed so far; may be empty or cut anywhere.

        Returns:
            The sentences this piece completed, in order, stripped and with runs of whitespace
            collapsed to one space; often empty.
        """
        out: list[str] = []
        lines = (self._buffer + delta).splitlines(keepends=True)
        tail = lines.pop() if lines and lines[-1].splitlines()[0] == lines[-1] else ""
        scan = self._scan
        for line in lines:
            pieces, _, _ = _cut(line.splitlines()[0], scan, complete=True)
            scan = 0
            for piece in pieces:
                self._add(piece, out)
        pieces, start, scan = _cut(tail, scan, complete=False)
        for piece in pieces:
            self._add(piece, out)
        self._buffer, self._scan = tail[start:], scan - start
        if self._pending is not None and _SPEAKABLE.search(self._pending) and _SPEAKABLE.search(self._buffer):
            # The next piece has a word, so it starts a sentence of its own: the pending one is done.
            self._emit(self._pending, out)
            self._pending = None
        if self._first_clause_min_words and not self._started and self._pending is None:
            # The first sentence is still arriving: cut it as soon as its clause mark is certain.
            cut = self._clause_end(self._buffer)
            if cut:
                self._started = True
                self._emit(" ".join(self._buffer[:cut].split()), out)
                self._buffer, self._scan = self._buffer[cut:], max(0, self._scan - cut)
        return out

    def flush(self) -> list[str]:
        """End the text: return what is left and empty the splitter.

        Returns:
            The remaining sentences, including any held for being shorter than ``min_chars``.
        """
        out: list[str] = []
        for piece in _cut(self._buffer, self._scan, complete=True)[0]:  # the buffer is one line
            self._add(piece, out)
        if self._pending is not None:
            self._emit(self._pending, out)
        if self._held:
            out.append(self._held)
        self._reset()
        return out

    def _add(self, piece: str, out: list[str]) -> None:
        """Take a decided piece: join it to the pending sentence or make it the pending one."""
        piece = " ".join(piece.split())
        if not piece:
            return
        if self._pending is not None and not (_SPEAKABLE.search(piece) and _SPEAKABLE.search(self._pending)):
            self._pending = f"{self._pending} {piece}"
            return
        if self._pending is not None:
            self._emit(self._pending, out)
        self._pending = piece

    def _emit(self, chunk: str, out: list[str]) -> None:
        """Return a chunk, or hold it (joined to any held before) while shorter than min_chars."""
        if not self._started and self._first_clause_min_words:
            # The first sentence arrived whole: cut it where it would have been cut while arriving.
            self._started = True
            cut = self._clause_end(chunk)
            if cut:
                self._emit(chunk[:cut], out)
                chunk = chunk[cut:].lstrip()
        self._started = True
        chunk = f"{self._held} {chunk}" if self._held else chunk
        if len(chunk) < self._min_chars:
            self._held = chunk
            return
        self._held = ""
        out.append(chunk)

    def _clause_end(self, text: str) -> int:
        """Return the offset just past the first sentence's first clause mark with enough words, or 0.

        ``text`` is the first sentence or the part of it that has arrived. Whitespace and a word
        follow the mark, so no rule of a later terminator looks across the cut, and a mark that
        qualifies in part of the sentence qualifies in all of it.
        """
        for match in _CLAUSE.finditer(text):
            if len(text[: match.start()].split()) >= self._first_clause_min_words:
                return match.end()
        return 0
