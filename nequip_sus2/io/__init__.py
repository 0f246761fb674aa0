"""File formats: MLIP-2 ``.cfg`` data sets and trained ``.mtp`` models."""
