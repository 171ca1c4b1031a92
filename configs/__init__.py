"""Experiment configs (ml-collections); see configs/arithmetic.py."""
