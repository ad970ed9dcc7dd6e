"""Runnable examples: ``python -m optzoo.examples.train``."""
