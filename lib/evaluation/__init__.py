"""Measuring the product: prompts derived from ground truth, Dice, benchmarks (used by tests and `make bench`)."""
