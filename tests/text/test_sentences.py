"""Tests of the sentence splitter: the whole-text rules and the streaming splitter over them."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voice_text import SentenceSplitter, split_sentences

CASES = [
    ("Hello world.", ["Hello world."]),
    ("One. Two! Three? Four", ["One.", "Two!", "Three?", "Four"]),
    ("Dr. Smith paid $3.50 today. He left.", ["Dr. Smith paid $3.50 today.", "He left."]),
    ("Use e.g. apples, i.e. fruit. Then stop.", ["Use e.g. apples, i.e. fruit.", "Then stop."]),
    ("Mr. and Mrs. Jones arrived at 9 a.m. today.", ["Mr. and Mrs. Jones arrived at 9 a.m. today."]),
    ("J. R. R. Tolkien wrote books. So do I. Great.", ["J. R. R. Tolkien wrote books.", "So do I.", "Great."]),
    ("Wait... what? Really?! Ok.", ["Wait... what?", "Really?!", "Ok."]),
    ("Well… maybe so. Yes.", ["Well… maybe so.", "Yes."]),
    ('He said "Hello." Then he left.', ['He said "Hello."', "Then he left."]),
    ("Pens, paper, etc. The shop opens.", ["Pens, paper, etc.", "The shop opens."]),
    ("Version 2.0 is out. Visit example.com now.", ["Version 2.0 is out.", "Visit example.com now."]),
    ("Line one\nLine two\n\n  Line three  ", ["Line one", "Line two", "Line three"]),
    ("Too   many\tspaces here.", ["Too many spaces here."]),
    ("Done. —", ["Done. —"]),
    ("See No. 5 on p. 12. The answer is no. Fine.", ["See No. 5 on p. 12.", "The answer is no.", "Fine."]),
    ("", []),
    ("  \n ", []),
]

# Streaming-specific shapes: CRLF, a leading piece with no word, punctuation runs, dashes.
MORE_TEXTS = [
    "First line.\r\nSecond line!\r\n",
    "— Hello there. — And you?",
    "!! Hi. ?? Yes.",
    "He paid 3.14 dollars. Then left...   ",
    "A) one. B) two.\n\n\nC) three",
    "Call me at 5 p.m. Tomorrow works? No. 7 is fine. etc. Etc. Done",
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_split_sentences(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


def stream(text: str, cuts: list[int], **kwargs: int) -> list[list[str]]:
    """Feed ``text`` cut at ``cuts``; the chunks of each feed, then of the flush."""
    splitter = SentenceSplitter(**kwargs)
    bounds = [0, *sorted(set(cuts)), len(text)]
    outputs = [splitter.feed(text[a:b]) for a, b in itertools.pairwise(bounds)]
    return [*outputs, splitter.flush()]


def flat(outputs: list[list[str]]) -> list[str]:
    return [chunk for output in outputs for chunk in output]


@pytest.mark.parametrize("text", [text for text, _ in CASES] + MORE_TEXTS)
def test_any_cut_gives_the_whole_text_split(text: str) -> None:
    expected = split_sentences(text)
    assert flat(stream(text, [])) == expected
    assert flat(stream(text, list(range(len(text))))) == expected, "one character at a time"
    for cut in range(len(text) + 1):
        assert flat(stream(text, [cut])) == expected, f"cut at {cut}"


ALPHABET = [*"aAbZ .!?…\"')—,-\n\r\t3", "Dr.", " e.g.", " No. 5", " J. ", " I.", " etc.", " so", " It"]


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.sampled_from(ALPHABET), max_size=40).map("".join),
    st.lists(st.integers(min_value=0, max_value=200), max_size=12),
)
def test_streaming_equals_split_sentences(text: str, cuts: list[int]) -> None:
    assert flat(stream(text, [c for c in cuts if c <= len(text)])) == split_sentences(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30), st.lists(st.integers(min_value=0, max_value=30), max_size=8))
def test_streaming_equals_split_sentences_on_any_characters(text: str, cuts: list[int]) -> None:
    assert flat(stream(text, [c for c in cuts if c <= len(text)])) == split_sentences(text)


def test_a_sentence_is_returned_once_the_next_one_starts() -> None:
    splitter = SentenceSplitter()
    assert splitter.feed("Hello world.") == []
    assert splitter.feed(" ") == [], "the next word decides"
    assert splitter.feed("H") == ["Hello world."]
    assert splitter.feed("ow are you? Fi") == ["How are you?"]
    assert splitter.flush() == ["Fi"]
    assert splitter.flush() == []


@pytest.mark.parametrize(
    ("deltas", "expected"),
    [
        (["It costs 3.", "14 today. Ok"], [[], ["It costs 3.14 today."], ["Ok"]]),
        (["Ask Dr.", " Smith. Now"], [[], ["Ask Dr. Smith."], ["Now"]]),
        (["Wait... ", "what? So"], [[], ["Wait... what?"], ["So"]]),
        (["Done. ", "!!", " Next"], [[], [], ["Done. !!"], ["Next"]]),
        (["Done.", " —", " Next"], [[], [], ["Done."], ["— Next"]]),
        (["Line one\n", "Line two"], [[], ["Line one"], ["Line two"]]),
    ],
)
def test_lookahead_waits_for_the_deciding_text(deltas: list[str], expected: list[list[str]]) -> None:
    splitter = SentenceSplitter()
    assert [splitter.feed(delta) for delta in deltas] + [splitter.flush()] == expected


def test_a_line_break_decides_at_once() -> None:
    splitter = SentenceSplitter()
    assert splitter.feed("Hi.\nThere") == ["Hi."]
    assert splitter.flush() == ["There"]


def test_min_chars_joins_a_short_sentence_to_the_next() -> None:
    splitter = SentenceSplitter(min_chars=12)
    assert splitter.feed("Sure. ") == []
    assert splitter.feed("I can help with that. And") == ["Sure. I can help with that."]
    assert splitter.flush() == ["And"], "the flush returns what is held, however short"


def test_min_chars_holds_until_the_flush() -> None:
    splitter = SentenceSplitter(min_chars=12)
    assert splitter.feed("Ok. Yes. Fine. ") == []
    assert splitter.flush() == ["Ok. Yes. Fine."]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(ALPHABET), max_size=40).map("".join),
    st.lists(st.integers(min_value=0, max_value=200), max_size=12),
    st.integers(min_value=1, max_value=20),
)
def test_min_chars_only_joins_sentences(text: str, cuts: list[int], min_chars: int) -> None:
    chunks = flat(stream(text, [c for c in cuts if c <= len(text)], min_chars=min_chars))
    assert chunks == flat(stream(text, [], min_chars=min_chars)), "the same however the text is cut"
    assert " ".join(chunks) == " ".join(split_sentences(text))
    assert all(len(chunk) >= min_chars for chunk in chunks[:-1])


def test_first_clause_is_off_by_default() -> None:
    splitter = SentenceSplitter()
    assert splitter.feed("Well, I think we should go now, before") == []
    assert splitter.flush() == ["Well, I think we should go now, before"]


def test_first_clause_cuts_the_first_chunk_at_a_comma_after_enough_words() -> None:
    splitter = SentenceSplitter(first_clause_min_words=3)
    assert splitter.feed("Well, I think we should go") == [], "one word before the first comma"
    assert splitter.feed(" now,") == [], "the next word is not here yet"
    assert splitter.feed(" before it rains, I guess. Later, ok") == [
        "Well, I think we should go now,",
        "before it rains, I guess.",
    ], "only the first chunk is cut at a clause"
    assert splitter.flush() == ["Later, ok"]
    assert splitter.feed("Again, this time we cut - here") == ["Again, this time we cut -"], "a new text"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([*ALPHABET, ", ", " — ", " - ", "; "]), max_size=40).map("".join),
    st.lists(st.integers(min_value=0, max_value=200), max_size=12),
    st.integers(min_value=1, max_value=4),
    st.integers(min_value=0, max_value=15),
)
def test_first_clause_only_cuts_the_text_further(text: str, cuts: list[int], words: int, min_chars: int) -> None:
    cuts = [c for c in cuts if c <= len(text)]
    expected = split_sentences(text)
    chunks = flat(stream(text, cuts, first_clause_min_words=words, min_chars=min_chars))
    assert " ".join(chunks) == " ".join(expected)
    chunks = flat(stream(text, cuts, first_clause_min_words=words))
    assert chunks == flat(stream(text, [], first_clause_min_words=words)), "the same however the text is cut"
    if chunks != expected:
        assert len(chunks) == len(expected) + 1, "at most the first sentence is cut, once"
        assert f"{chunks[0]} {chunks[1]}" == expected[0]
        assert chunks[2:] == expected[1:]


def test_negative_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        SentenceSplitter(min_chars=-1)
    with pytest.raises(ValueError):
        SentenceSplitter(first_clause_min_words=-1)
