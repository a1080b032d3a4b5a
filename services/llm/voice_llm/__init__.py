"""LLM worker."""
