"""Tasks and evaluation: metrics, error slices, label noise, comparison, and the run's evaluation stage."""
