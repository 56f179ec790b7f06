"""Evaluation: the accuracy harness and the provenance every benchmark row carries."""
