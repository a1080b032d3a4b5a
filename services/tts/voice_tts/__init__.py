"""Text-to-speech worker."""
