"""Tokenizers and (later) datasets and input pipelines."""
