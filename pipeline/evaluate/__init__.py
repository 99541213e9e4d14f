"""Evaluation: implicit preference accuracy, generation, reward scorers, reports."""
