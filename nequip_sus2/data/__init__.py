"""Data: `.cfg` data sets, generators of training data for the tutorials, helpers on batches."""
