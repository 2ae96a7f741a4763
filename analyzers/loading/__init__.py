"""Loading and sandboxing: models, datasets, run directories and the upload workspace."""
