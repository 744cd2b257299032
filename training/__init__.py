"""genserve training: datasets, models, trainer, checkpoints, pictures and metrics."""
