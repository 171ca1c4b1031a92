"""Sample text with `<bkspc>` from a pretrained model.

    python -m smatch_jax.main.generate --pretrained=smollm2 --greedy \\
        --prompt "The capital of France is"
    python -m smatch_jax.main.generate --pretrained=hf:/path/to/gpt2 --tokenizer=gpt2 \\
        --prompt "Once upon a time" --temperature 0.8 --top_p 0.95 --show_actions

    python -m smatch_jax.main.generate --workdir=/tmp/sm --greedy \\
        --prompt "In base 7, what is 12 + 3? "

Prints the final text of each sample (backspaces applied) and, with `--show_actions`, the raw
action stream with each `<bkspc>` shown as ⌫. `--workdir` loads the latest readable checkpoint
of a training run (or `--step`) with its own tokenizer. A chat model (SmolLM2-Instruct) stops at
its end of turn, `<|im_end|>`, as at its end of text. A GPT-2-family model refuses a prompt +
`--max_new_tokens` longer than its position table. Mistakes end with one `error:` line (exit 2).
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from smatch_jax import sampling
from smatch_jax.data.tokenizer_base import Tokenizer
from smatch_jax.data.tokenizers import BpeTokenizer, get_tokenizer
from smatch_jax.errors import UserError
from smatch_jax.main import cli
from smatch_jax.models import convert


def _tokenizer(name: str) -> Tokenizer:
    try:
        return get_tokenizer(name)
    except ValueError as e:
        raise UserError(f"--tokenizer={name}: {e}") from None


def load_pretrained(spec: str, tokenizer: str | None = None, dtype: str = "float32"):
    """`smollm2` or `hf:<dir>` -> (model, tokenizer)."""
    if spec == "smollm2":
        return convert.smollm2(dtype=dtype), _tokenizer(tokenizer or "smollm2")
    if spec.startswith("hf:"):
        directory = spec[3:]
        if not os.path.isdir(directory):
            raise UserError(f"--pretrained={spec}: {directory} is not a directory")
        model = convert.load_hf(directory, dtype=dtype)
        if tokenizer:
            tok: Tokenizer = _tokenizer(tokenizer)
        elif os.path.exists(os.path.join(directory, "tokenizer.json")):
            tok = BpeTokenizer.load(os.path.join(directory, "tokenizer.json"))
        elif model.config.family == "gpt2":
            tok = get_tokenizer("gpt2")
        else:
            raise UserError(f"{directory} has no tokenizer.json: pass --tokenizer=NAME")
        return model, tok
    raise UserError(f"--pretrained={spec!r} is unknown; use 'smollm2' or 'hf:<checkpoint dir>'")


def stop_ids(tok: Tokenizer) -> int | tuple[int, ...]:
    """The ids that end a sample: eos, and a chat model's end of turn."""
    turn = getattr(tok, "im_end_id", None)
    return tok.eos_id if turn is None or turn == tok.eos_id else (tok.eos_id, turn)


def main(argv: list[str] | None = None) -> None:
    ap = cli.ArgumentParser(
        prog="python -m smatch_jax.main.generate",
        description=__doc__,
        config_note="a --workdir model comes with the config saved there; "
        "the sampling flags are its own",
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--pretrained", help="'smollm2' or 'hf:<checkpoint dir>'")
    src.add_argument("--workdir", help="a training workdir (latest checkpoint)")
    ap.add_argument("--step", type=int, default=None, help="with --workdir: checkpoint step")
    ap.add_argument("--tokenizer", default=None, help="gpt2 | smollm2 | bpe:<json> | char:<abc>")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--num_samples", type=int, default=1)
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--max_actions", type=int, default=None, help="default 2 * max_new_tokens")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--bkspc_logit_bias", type=float, default=0.0)
    ap.add_argument("--no_bkspc", action="store_true", help="never emit <bkspc>")
    ap.add_argument(
        "--no_repeat_deleted",
        action="store_true",
        help="never choose a token again at a state it was deleted from",
    )
    ap.add_argument("--show_actions", action="store_true", help="also print the action stream")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    t0 = time.time()
    try:
        cfg = sampling.SamplingConfig(
            max_new_tokens=args.max_new_tokens,
            max_actions=args.max_actions,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            greedy=args.greedy,
            bkspc_logit_bias=args.bkspc_logit_bias,
            allow_bkspc=not args.no_bkspc,
            no_repeat_deleted=args.no_repeat_deleted,
        )
    except ValueError as e:  # the flags' ranges, named as flags
        raise UserError(f"--{e}") from None
    if not args.prompt:
        raise UserError("the prompt is empty; give a non-empty --prompt")
    if args.num_samples < 1:
        raise UserError(f"--num_samples={args.num_samples} must be >= 1")
    # The flags above are checked before the model is loaded (seconds).
    if args.workdir:
        from smatch_jax.eval import report

        run, _, model = report.load_model(args.workdir, args.step)
        tok = run.data.tokenizer
    else:
        model, tok = load_pretrained(args.pretrained, args.tokenizer, args.dtype)
    ids = tok.encode(args.prompt)
    if not ids:
        raise UserError("the prompt encodes to no tokens; give a non-empty --prompt")
    n = args.num_samples
    prompts = np.tile(np.asarray(ids, np.int32), (n, 1))
    out = jax.device_get(
        sampling.sample(
            model,
            prompts,
            np.full(n, len(ids), np.int32),
            jax.random.key(args.seed),
            eos_id=stop_ids(tok),
            pad_id=tok.pad_id,
            cfg=cfg,
        )
    )
    for i in range(n):
        final = out.final[i, : out.final_length[i]].tolist()
        if out.ended[i]:
            final = final[:-1]  # drop the eos
        print(f"--- sample {i} ({out.n_bkspc[i]} backspaces)")
        print(tok.decode(final))
        if args.show_actions:
            print(f"actions: {tok.render_actions(out.actions[i, len(ids) : out.length[i]])}")
    print(f"({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    cli.run(main)
