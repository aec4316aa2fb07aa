"""Merging: pure tensor merge methods, resident sources and materialization."""
