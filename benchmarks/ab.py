"""Before/after of an optimisation: this tree's model vs `smatch_jax/models/transformer.py` at
a git revision, timed side by side (`python -m benchmarks.ab --rev <rev> [--size s]`).

Both models get the same weights (same seed) and run through the same sampler and the same
train step; the script checks that they produce the same greedy samples and the same loss,
then reports new/old speed ratios (> 1: this tree is faster).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import figures
from benchmarks import harness as h
from smatch_jax import sampling
from smatch_jax.models import transformer

PATH = "smatch_jax/models/transformer.py"


def load_old(rev: str):
    """The transformer module of `rev`, imported under another name."""
    src = subprocess.run(["git", "show", f"{rev}:{PATH}"], capture_output=True, check=True).stdout
    tmp = Path(tempfile.mkdtemp()) / "old_transformer.py"
    tmp.write_bytes(src)
    spec = importlib.util.spec_from_file_location("old_transformer", tmp)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _models(old, size: h.Size) -> dict:
    cfg = size.model_config()
    mods = {"old": old, "new": transformer}
    return {k: m.Transformer(cfg, rngs=nnx.Rngs(0)) for k, m in mods.items()}


def sampler_ab(old, size: h.Size, n_new: int, reps: int) -> dict:
    prompts, m = figures._prompts(size, 16)
    cfg = figures.sampler_configs(size, n_new)["bkspc"]
    calls, outs = {}, {}
    for k, model in _models(old, size).items():
        g, p = nnx.split(model)
        calls[k] = lambda g=g, p=p: sampling.sample(
            g, prompts, m, jax.random.key(0), cfg=cfg, params=p, eos_id=0, pad_id=0
        )
        outs[k] = calls[k]()
    t = h.interleave(calls, reps)
    return {
        "new_tokens": n_new,
        "same_samples": bool(jnp.array_equal(outs["old"].actions, outs["new"].actions)),
        "tokens_per_s": {k: size.batch * n_new / h.med(v) for k, v in t.items()},
        "speedup": h.median_ratio(t["old"], t["new"]),
    }


def train_ab(old, size: h.Size, reps: int) -> dict:
    tokens, _, m, n = (jnp.asarray(x) for x in h.synthetic_rows(size))
    half = jnp.arange(size.batch) >= size.batch // 2
    calls, losses = {}, {}
    for k, model in _models(old, size).items():
        fns, params, opt_state = figures.make_step_fns(model, size)
        calls[k] = lambda f=fns["sm"], p=params, o=opt_state: f(p, o, tokens, m, n, half)
        losses[k] = float(calls[k]()[2])
    t = h.interleave(calls, reps)
    speedup = h.median_ratio(t["old"], t["new"])
    return {"same_loss": losses["old"] == losses["new"], "speedup": speedup}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rev", default="HEAD")
    ap.add_argument("--size", default="s")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args(argv)
    old, size = load_old(args.rev), h.SIZES[args.size]
    res = {
        "rev": args.rev,
        "size": args.size,
        "sampler": [sampler_ab(old, size, n, args.reps) for n in (256, 1024)],
        "train_step": train_ab(old, size, args.reps),
    }
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
