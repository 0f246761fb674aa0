"""Data sets: generators of training data for the tutorials."""
