"""Tests of stt."""
