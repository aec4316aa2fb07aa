"""Tiny self-built models and data for tests, the demo and the benchmarks (no downloads)."""
