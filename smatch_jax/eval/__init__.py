"""Evaluation: accuracy (and, with the evaluation issue, MAUVE, n-gram metrics, perplexity)."""
