"""The benchmark scripts and their registry, ``benchmarks.problems``."""
