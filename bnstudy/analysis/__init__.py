"""From run folders to verdicts: statistics, aggregation, comparisons, figures and study reports.

Needs only pandas, scipy and matplotlib; never imports jax (tests enforce it).
"""
