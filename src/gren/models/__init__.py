"""Backbones and the grid head."""
