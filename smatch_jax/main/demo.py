"""A 1-minute tour of the pieces, without the training system around them.

1. The method.md worked example through `backspace_layout` (ids, positions, attention sets).
2. A tiny Llama-family transformer trained on 2-digit addition written in characters, with
   ground-truth noise + `<bkspc>` augmentation and the loss factory (BC warm-up, then BC +
   SequenceMatch chi2-mix in offline mode, `value_on='data'`: no sampling, no replay buffer;
   `python -m smatch_jax.main` runs the whole algorithm).
3. Greedy decoding with the KV-cache backspace sampler, exact-match accuracy on held-out
   questions and backspace use.

    python -m smatch_jax.main.demo [--steps 2000] [--seed 0]
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from smatch_jax import masks, models, noise, objective, sampling
from smatch_jax.main import cli

CHARS = "0123456789+="
EOS, PAD = len(CHARS), len(CHARS) + 1
V = len(CHARS) + 2  # base vocabulary; <bkspc> is V
BK = V
T = 20


def encode(s: str) -> list[int]:
    return [CHARS.index(c) for c in s]


def decode(ids) -> str:
    names = {EOS: "<eos>", PAD: "", BK: "⌫"}
    return "".join(names.get(int(i), CHARS[int(i)] if int(i) < len(CHARS) else "?") for i in ids)


def addition_rows(rng: np.random.Generator, n: int):
    """Prompt `a+b=`, completion the sum then eos; rows padded to T."""
    tokens = np.full((n, T), PAD, np.int32)
    m = np.zeros(n, np.int32)
    ln = np.zeros(n, np.int32)
    questions = []
    for i in range(n):
        a, b = rng.integers(10, 100, 2)
        q, ans = encode(f"{a}+{b}="), [*encode(str(a + b)), EOS]
        tokens[i, : len(q) + len(ans)] = q + ans
        m[i], ln[i] = len(q), len(q) + len(ans)
        questions.append((a, b))
    return tokens, m, ln, questions


def show_worked_example() -> None:
    names = ["P0", "P1", "A", "B", "⌫", "C", "D", "⌫", "⌫", "E", "eos"]
    ids = [0, 1, 2, 3, BK, 4, 5, BK, BK, 6, EOS]
    lay = masks.backspace_layout(np.array([ids]), np.array([2]), np.array([11]), bkspc_id=BK)
    print("method.md §3 worked example: prompt P0 P1, actions A B ⌫ C D ⌫ ⌫ E eos")
    print(f"{'k':>3} {'token':>6} {'input':>6} {'pos':>4}  attends to")
    lookup = dict(zip(ids, names, strict=False))
    for k in range(11):
        att = " ".join(str(j) for j in np.flatnonzero(np.asarray(lay.attn_mask[0, k])))
        inp = lookup[int(lay.input_ids[0, k])]
        print(f"{k:>3} {names[k]:>6} {inp:>6} {int(lay.positions[0, k]):>4}  {att}")
    fin, n = masks.apply_backspaces(np.array([ids]), np.array([2]), np.array([11]), bkspc_id=BK)
    print("apply_backspaces ->", " ".join(lookup[int(i)] for i in fin[0, : int(n[0])]), "\n")


def main(argv: list[str] | None = None) -> None:
    ap = cli.ArgumentParser(
        prog="python -m smatch_jax.main.demo",
        description=__doc__,
        config_note="its model and data are fixed; its flags are its settings",
    )
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=500, help="BC-only warm-up steps")
    ap.add_argument("--noise_rate", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for name in ("steps", "batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name}={getattr(args, name)} must be >= 1")
    if not 0 <= args.noise_rate < 1 or args.warmup < 0 or args.seed < 0:
        ap.error("--noise_rate must be in [0, 1) and --warmup, --seed >= 0")

    show_worked_example()
    rng = np.random.default_rng(args.seed)
    train = addition_rows(rng, 4000)
    test_tokens, test_m, _, test_q = addition_rows(np.random.default_rng(args.seed + 1), 256)
    probs = noise.ground_truth_noise_probs(*train[:3], vocab_size=V, special_ids=[EOS, PAD])

    cfg = models.ModelConfig(
        family="llama",
        vocab_size=V,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=192,
        max_positions=T,
    )
    model = models.Transformer(cfg, rngs=nnx.Rngs(args.seed))
    graphdef, state = nnx.split(model, nnx.Param)
    opt = optax.adamw(
        optax.warmup_cosine_decay_schedule(0, 3e-3, min(50, args.steps // 4), args.steps),
        weight_decay=0.0,
    )
    opt_state = opt.init(state)
    loss_fn = objective.make_loss_fn(
        {"bc_weight": 1.0, "sm_weight": 1.0, "bc_warmup_steps": args.warmup, "value_on": "data"},
        eos_id=EOS,
    )

    @jax.jit
    def train_step(state, opt_state, key, tokens, m, n, step):
        nz = noise.add_noise(
            key,
            tokens,
            m,
            n,
            noise_probs=probs,
            bkspc_id=BK,
            noise_rate=args.noise_rate,
            pad_id=PAD,
        )
        batch = objective.Batch(nz.tokens, m, nz.length, jnp.zeros(m.shape, bool), nz.action_weight)
        lay = masks.backspace_layout(batch.tokens, m, batch.length, bkspc_id=BK)

        def f(state):
            logits = nnx.merge(graphdef, state)(lay.input_ids, lay.positions, lay.attn_mask)
            return loss_fn(logits, batch, step)

        (_, met), grads = jax.value_and_grad(f, has_aux=True)(state)
        updates, opt_state = opt.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, met

    n_params = sum(x.size for x in jax.tree.leaves(state))
    print(
        f"training a {cfg.family} model ({n_params:,} params) on 2-digit addition for "
        f"{args.steps} steps (BC warm-up {args.warmup}, then BC + SequenceMatch chi2_mix, "
        "value_on=data)"
    )
    key = jax.random.key(args.seed)
    t0 = time.time()
    for step in range(args.steps):
        idx = rng.integers(0, len(train[0]), args.batch)
        key, sub = jax.random.split(key)
        state, opt_state, met = train_step(
            state, opt_state, sub, train[0][idx], train[1][idx], train[2][idx], step
        )
        if step % 100 == 0 or step == args.steps - 1:
            met = jax.device_get(met)
            sm = ""
            if step >= args.warmup:
                sm = f" sm={met['sm/loss']:.3f} r_data={met['sm/r_data']:.2f}"
            print(
                f"  step {step:5d} loss={met['loss']:.3f} bc={met['bc/loss']:.3f}"
                f" acc={met['bc/token_accuracy']:.3f} pi_bkspc={met['sm/pi_bkspc_data']:.3f}"
                f"{sm}  ({time.time() - t0:.0f}s)",
                flush=True,
            )

    prompts = np.where(np.arange(T)[None] < test_m[:, None], test_tokens, PAD)[:, :8]
    scfg = sampling.SamplingConfig(max_new_tokens=5, max_actions=10, greedy=True)
    out = jax.device_get(
        sampling.sample(
            graphdef, prompts, test_m, key, eos_id=EOS, pad_id=PAD, cfg=scfg, params=state
        )
    )
    correct = [
        decode(out.final[i, test_m[i] : out.final_length[i]]).replace("<eos>", "") == str(a + b)
        for i, (a, b) in enumerate(test_q)
    ]
    print(
        f"\nheld-out exact match (greedy, KV-cache sampler): {np.mean(correct):.3f} on "
        f"{len(correct)} questions; rows using <bkspc>: {np.mean(out.n_bkspc > 0):.3f}"
    )
    print("  action stream -> final text")
    for i in range(6):
        acts = decode(out.actions[i, : out.length[i]])
        print(f"  {acts:24s} -> {decode(out.final[i, : out.final_length[i]])}")


if __name__ == "__main__":
    cli.run(main)
