"""Training signals: gradient health and the training recorder."""
