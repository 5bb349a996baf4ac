"""Datasets in the NIH ChestX-ray14 layout: CSV readers, image I/O, splits, caches, synthetic data."""
