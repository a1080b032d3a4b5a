"""Tracing, trace-aware logging and Prometheus metrics."""
