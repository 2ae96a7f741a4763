"""Data health: shift between splits, duplicates and leakage, robustness, the inference profile."""
