"""The call's playout with sentences that come in pieces: every byte goes out in order, padding only at a
sentence's end, one mark per sentence after its last piece, and what was heard never counts a sentence
whose end has not come."""

from __future__ import annotations

import asyncio

from voice_audio import Encoding
from voice_gateway.conversation.playout import CallStats, MediaFormat, Playout

EXOTEL_8K = MediaFormat(
    encoding=Encoding.PCM16, sample_rate=8000, chunk_bytes=3200, pad_to=320, min_chunk_bytes=3200, lead_s=60.0
)


class Recorder:
    """A dialect's transport that keeps what was sent, in order."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | str]] = []

    async def send_audio(self, audio: bytes) -> None:
        self.sent.append(("audio", audio))

    async def send_mark(self, name: str) -> bool:
        self.sent.append(("mark", name))
        return True

    async def clear(self) -> None:
        self.sent.append(("clear", ""))

    async def hang_up(self, action: object) -> None:
        return None

    def audio(self) -> bytes:
        return b"".join(item for kind, item in self.sent if kind == "audio")

    def marks(self) -> list[str]:
        return [str(item) for kind, item in self.sent if kind == "mark"]


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_pieces_of_a_sentence_go_out_in_order_with_padding_only_at_its_end():
    transport = Recorder()
    playout = Playout(transport, EXOTEL_8K, "test", CallStats())
    pieces = [bytes([n]) * size for n, size in ((1, 4458), (2, 8916), (3, 1234))]
    playout.enqueue("I'm sorry for any misunderstanding,", pieces[0], "t1-s0", final=False)
    await settle()
    assert transport.audio() == pieces[0][:3200], "the first chunk goes out at once, the rest waits"
    playout.enqueue("I'm sorry for any misunderstanding,", pieces[1], "t1-s0", final=False)
    playout.enqueue("I'm sorry for any misunderstanding,", pieces[2], "t1-s0", final=True)
    await settle()
    audio = transport.audio()
    joined = b"".join(pieces)
    assert audio[: len(joined)] == joined
    assert set(audio[len(joined) :]) <= {0} and len(audio) % 320 == 0
    assert all(len(item) >= 3200 for kind, item in transport.sent if kind == "audio")
    assert transport.marks() == ["t1-s0-1"] and transport.sent[-1][0] == "mark"
    await playout.close()


async def test_a_sentence_counts_as_heard_whole_only_after_its_last_piece():
    transport = Recorder()
    playout = Playout(transport, EXOTEL_8K, "test", CallStats())
    playout.enqueue("one two three four", b"\x01" * 3200, "t1-s0", final=False)
    await settle()
    await asyncio.sleep(0.45)
    heard = playout.heard_text()
    assert heard != "one two three four" and "one two three four".startswith(heard), "its end has not come"
    playout.enqueue("one two three four", b"", "t1-s0", final=True)
    await settle()
    playout.on_mark(transport.marks()[0])
    assert playout.heard_text() == "one two three four"
    await playout.close()


async def test_a_sentence_whose_last_piece_never_came_ends_before_the_next():
    transport = Recorder()
    playout = Playout(transport, EXOTEL_8K, "test", CallStats())
    playout.enqueue("cut off", b"\x01" * 4000, "t1-s0", final=False)
    playout.enqueue("next answer", b"\x02" * 3200, "t2-s0", final=True)
    await settle()
    assert transport.marks() == ["t1-s0-1", "t2-s0-2"]
    audio = transport.audio()
    assert audio.index(b"\x02") == 6400, "the cut sentence's last 800 bytes went out padded to a 3200 B chunk"
    await playout.close()
