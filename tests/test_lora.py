"""LoRA: exact at init, trains only adapters and <bkspc> rows, merges exactly."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from smatch_jax import losses, masks, models
from smatch_jax.models import lora
from tests.test_sampling import random_model

T = 10


def _rows(vocab, seed=0, B=6):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab - 2, (B, T)).astype(np.int32)
    tokens[:, 4] = vocab  # a <bkspc> action in every row: its row must learn
    m, n = np.full(B, 2, np.int32), np.full(B, T, np.int32)
    return tokens, m, n


def _forward(model, tokens, m, n):
    lay = masks.backspace_layout(tokens, m, n, bkspc_id=model.config.vocab_size)
    return model(lay.input_ids, lay.positions, lay.attn_mask)


@pytest.mark.parametrize("tied", [True, False])
def test_lora_trains_only_adapters_and_bkspc_rows(tied):
    cfg_name = "llama"
    model = random_model(cfg_name)
    if not tied:  # an untied copy with an lm_head
        cfg = models.ModelConfig(**{**model.config.__dict__, "tie_embeddings": False})
        model = models.Transformer(cfg, rngs=nnx.Rngs(1))
    V = model.config.vocab_size
    tokens, m, n = _rows(V)
    before = np.asarray(_forward(model, tokens, m, n))
    base_params = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Param)))

    lora.apply_lora(model, rank=4, alpha=8, rngs=nnx.Rngs(2))
    np.testing.assert_array_equal(np.asarray(_forward(model, tokens, m, n)), before)

    graphdef, trainable, rest = nnx.split(model, lora.trainable_filter(True), ...)
    mask = lora.update_mask(trainable, V)
    opt = optax.chain(optax.adamw(1e-2, weight_decay=0.1), lora.masked_updates(mask))
    opt_state = opt.init(trainable)

    @jax.jit
    def step(trainable, opt_state):
        def f(tr):
            logits = _forward(nnx.merge(graphdef, tr, rest), tokens, m, n)
            loss, _ = losses.bc_loss(
                logits, tokens, m, n, eos_id=V - 2, masked_actions="unrewarded"
            )
            return loss

        loss, g = jax.value_and_grad(f)(trainable)
        up, opt_state = opt.update(g, opt_state, trainable)
        return optax.apply_updates(trainable, up), opt_state, loss

    first = None
    for _ in range(20):
        trainable, opt_state, loss = step(trainable, opt_state)
        first = float(loss) if first is None else first
    assert float(loss) < first
    nnx.update(model, trainable)

    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat_before = dict(nnx.traversals.flatten_mapping(base_params))
    flat_after = dict(nnx.traversals.flatten_mapping(after))
    changed_lora = 0
    for path, new in flat_after.items():
        new = np.asarray(new)
        if "lora" in path:
            changed_lora += int(not np.allclose(new, 0.0))
            continue
        old = flat_before[tuple(p for p in path if p != "base")]
        if path[0] == "tok_embed":
            np.testing.assert_array_equal(new[:V], old[:V])
            assert not np.array_equal(new[V], old[V]), "<bkspc> input/output row trains"
        elif path[0] == "lm_head":
            np.testing.assert_array_equal(new[:, :V], old[:, :V])
            assert not np.array_equal(new[:, V], old[:, V])
        else:
            np.testing.assert_array_equal(new, old, err_msg=str(path))
    assert changed_lora > 0

    trained = np.asarray(_forward(model, tokens, m, n))
    lora.merge_lora(model)
    assert not any(
        "lora" in p for p in nnx.traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(model)))
    )
    np.testing.assert_allclose(np.asarray(_forward(model, tokens, m, n)), trained, atol=1e-4)


def test_lora_errors():
    model = random_model("gpt2")
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        lora.apply_lora(model, rank=2, targets=("c_attn",), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank"):
        lora.apply_lora(model, rank=0, rngs=nnx.Rngs(0))
    assert lora.trainable_filter(False) is nnx.Param
