"""The training core: models, pure per-model steps, measurements, the pack trainer and evaluator.

Imports only jax, flax, optax, numpy and bnstudy.perf, so it runs on a bare JAX machine (tests enforce it).
"""
