"""Text handling shared by the gateway and the workers.

:func:`split_sentences` cuts a whole text into the sentences the TTS worker synthesizes one by
one; :class:`SentenceSplitter` applies the same rules to text that arrives in pieces (an LLM's
streamed reply), so the gateway and the worker agree on where every sentence ends.
"""

from voice_text.sentences import SentenceSplitter, split_sentences

__all__ = ["SentenceSplitter", "split_sentences"]
