"""Tests of tts."""
