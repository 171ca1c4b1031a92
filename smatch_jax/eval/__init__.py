"""Evaluation: arithmetic accuracy, MAUVE, featurizers, n-gram statistics and perplexity."""
