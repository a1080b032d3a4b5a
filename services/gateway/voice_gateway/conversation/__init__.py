"""The conversation core, independent of dialect: sessions, the one turn runner, the turn engine
(STT, the LLM and tool loop, speech), real-time calls (VAD, endpointing, barge-in, playout) and their metrics."""
