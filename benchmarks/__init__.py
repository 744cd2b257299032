"""Benchmarks (not tests): serving_bench and training_bench; see docs/benchmarks.md."""
