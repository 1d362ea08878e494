"""Benchmarks (`make bench`): each timing next to a lower bound measured in the same run."""
