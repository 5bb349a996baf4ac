"""Evaluation: running trained models over test splits, tables, figures."""
