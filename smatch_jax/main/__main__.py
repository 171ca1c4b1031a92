"""`python -m smatch_jax.main`: train (the same program as `python -m smatch_jax.main.train`)."""

from smatch_jax.main.train import run_cli

if __name__ == "__main__":
    run_cli()
