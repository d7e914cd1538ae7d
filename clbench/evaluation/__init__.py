"""Evaluation: per-example text metrics and the continual-learning accuracy matrix."""
