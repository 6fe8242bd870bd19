"""Performance plumbing: process settings made before JAX starts, stored traces, cached data, time accounting.

Nothing here changes a number a run reports; it changes how fast the run gets there. Imports no app or
analysis library (hydra, wandb, tfds, pandas, ...), so the core may use it.
"""
