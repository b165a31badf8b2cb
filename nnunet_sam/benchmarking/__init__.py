"""Benchmarks that print figures, with the compared settings measured side by side in one run."""
