"""Datasets, readers and training-time data handling (augmentation, targets, loaders)."""
