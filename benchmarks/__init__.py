"""Benchmarks of smatch_jax: side-by-side ratios (`python -m benchmarks.run`); see RESULTS.md."""
