"""Metrics and the evaluation recipe."""
