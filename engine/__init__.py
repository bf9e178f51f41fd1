"""Diff-Mix data engine."""
