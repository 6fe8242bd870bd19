"""Datasets shipped inside the package, as TFDS builders whose source files are package data."""
