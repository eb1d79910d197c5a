"""Benchmark and performance-model tools behind `fastppo bench`."""
