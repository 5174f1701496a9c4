"""Benchmarks (not tests): random prompt datasets, an HTTP load generator, offline engine runs."""
