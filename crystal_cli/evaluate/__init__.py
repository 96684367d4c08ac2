"""Evaluation of generated crystals with the field's metrics: validity, uniqueness, novelty, coverage,
distribution distances and stability (ML potential + convex hull). `pipeline.evaluate` runs them all;
each module holds one concern.
"""
