"""Retention evaluation: paired base-vs-SAFE statistics, the bypass check, reports."""
