"""A divergence added from outside the package: defined and registered in this file only.

Neyman's chi^2, `f(u) = (1 - u)^2 / u`, has the conjugate `f*(t) = 2 - 2 sqrt(1 - t)` (t < 1),
so in the convention of method.md §2.4 (`phi(r) = -f*(-r)`, as `kl`: `-exp(-(r + 1))`)
`phi(r) = 2 (sqrt(1 + r) - 1)`, defined for `r > -1`. It is registered with
`losses.register_divergence`, checked against a float64 loop written here, accepted by the
config section, and trained with through `train.train`. Each registration is removed again
(the registry is module state shared with the other test files of the process).
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import arithmetic
from smatch_jax import losses, train
from smatch_jax.objective import Batch, LossConfig, make_loss_fn
from tests import reference

V = 5  # base vocabulary 0..4
EOS = 4
BK = V  # <bkspc>
T = 8
GAMMA = 0.9


def neyman_phi(r):
    return 2.0 * (jnp.sqrt(1.0 + r) - 1.0)


def neyman_phi_ref(r):
    return 2.0 * (math.sqrt(1.0 + r) - 1.0)


@pytest.fixture
def register():
    """`register(name, phi, ...)` adds a divergence for the test; all are removed after it."""
    names = []

    def add(name, phi, **kw):
        losses.register_divergence(losses.Divergence(name, phi, **kw))
        names.append(name)
        return name

    yield add
    for name in names:
        losses.unregister_divergence(name)
    assert not set(names) & set(losses.DIVERGENCES)


def make_batch(seed, n_rows=6, n_model=3):
    """Rows ending with eos, with eos in the middle, or truncated; backspaces; junk padding."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((n_rows, T), np.int32)
    m = rng.integers(1, 3, n_rows).astype(np.int32)
    n = np.zeros(n_rows, np.int32)
    for b in range(n_rows):
        n[b] = rng.integers(m[b] + 2, T + 1)
        tokens[b, : m[b]] = rng.integers(0, EOS, m[b])
        acts = rng.integers(0, EOS, n[b] - m[b])
        acts[rng.random(len(acts)) < 0.25] = BK
        if b % 3 == 0:
            acts[-1] = EOS
        elif b % 3 == 1:
            acts[len(acts) // 2] = EOS
        tokens[b, m[b] : n[b]] = acts
        tokens[b, n[b] :] = rng.integers(0, V + 1, T - n[b])
    is_model = np.arange(n_rows) >= n_rows - n_model
    logits = rng.normal(0.0, 1.5, (n_rows, T, V + 1)).astype(np.float32)
    logits[::2] += (3.0 * (T - np.arange(T)))[None, :, None].astype(np.float32)  # some r > -1
    aw = (rng.random((n_rows, T)) < 0.8).astype(np.float32)
    rw = rng.uniform(0.5, 2.0, n_rows).astype(np.float32)
    return logits, tokens, m, n, is_model, aw, rw


def loop_reference(logits, tokens, m, n, is_model, aw, rw, *, r2_on, **o):
    """method.md §2.4 with Neyman's phi, as loops in float64 (masked_actions='unrewarded',
    normalize='token'; the other options as in `o`)."""
    logits, aw, rw = (np.asarray(x, np.float64) for x in (logits, aw, rw))
    alpha, gamma = o["temperature"], o["gamma"]
    sums = {g: {"phi": 0.0, "val": 0.0, "r2": 0.0, "n": 0.0} for g in ("data", "model")}
    for b in range(len(tokens)):
        g = "model" if is_model[b] else "data"
        row = tokens[b].tolist()
        acts = reference._episode(row, m[b], n[b], EOS)
        ended = row[acts[-1]] == EOS
        wb = rw[b] * (o["truncated_weight"] if is_model[b] and not ended else 1.0)
        for k, t in enumerate(acts):
            q = alpha * logits[b, t - 1, row[t]]
            v = alpha * reference._lse(logits[b, t - 1])
            zero = row[t] == EOS and o["terminal"] == "zero"
            v_next = 0.0 if zero else alpha * reference._lse(logits[b, t])
            r = q - gamma * v_next
            w = wb * gamma**k
            sums[g]["phi"] += w * aw[b, t] * neyman_phi_ref(max(r, -1.0 + o["clamp_margin"]))
            sums[g]["val"] += w * (v - gamma * v_next)
            sums[g]["r2"] += w * aw[b, t] * r * r
            sums[g]["n"] += wb

    def e(group, key):
        if group == "data" or sums["model"]["n"] == 0:
            return sums["data"][key] / sums["data"]["n"]
        return 0.5 * (
            sums["data"][key] / sums["data"]["n"] + sums["model"][key] / sums["model"]["n"]
        )

    r2 = o["chi2_coef"] * e(r2_on, "r2") if r2_on else 0.0
    return (-e("data", "phi") + e(o["value_on"], "val") + r2) / alpha


OPTIONS = {
    "rev1": {},
    "rev2": {"temperature": 0.5, "terminal": "bootstrap", "truncated_weight": 0.0},
}


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("value_on", losses.VALUE_ON)
@pytest.mark.parametrize("r2_on", [None, "data", "mix"])
def test_registered_divergence_matches_a_loop_reference(register, r2_on, value_on, options):
    name = register(f"neyman_chi2_{r2_on}", neyman_phi, lower=-1.0, r2_on=r2_on)
    o = {
        **LossConfig(**LossConfig.REVISION_1).kernel_args(losses.sequence_match_loss),
        "divergence": name,
        "gamma": GAMMA,
        "value_on": value_on,
        **OPTIONS[options],
    }
    logits, tokens, m, n, is_model, aw, rw = batch = make_batch(7)

    def loss_fn(x):
        return losses.sequence_match_loss(
            x, tokens, m, n, is_model, eos_id=EOS, action_weight=aw, row_weight=rw, **o
        )

    (loss, met), grad = jax.value_and_grad(loss_fn, has_aux=True)(logits)
    assert 0.0 < float(met["sm/clamp_frac"]) < 1.0  # both sides of the domain bound
    assert (float(met["sm/r2_term"]) != 0.0) == (r2_on is not None)

    def ref(x):
        return loop_reference(x, *batch[1:], r2_on=r2_on, **o)

    assert float(loss) == pytest.approx(ref(logits), rel=5e-5, abs=1e-5)
    rng = np.random.default_rng(1)  # directional derivatives against central differences
    x = logits.astype(np.float64)
    for _ in range(2):
        d = rng.normal(size=x.shape)
        fd = (ref(x + 1e-5 * d) - ref(x - 1e-5 * d)) / 2e-5
        assert float(np.sum(np.asarray(grad, np.float64) * d)) == pytest.approx(fd, rel=2e-4)
    # Finite where the logits outside the episode are garbage, as every divergence must be.
    b = int(np.argmin(n))
    assert n[b] < T
    bad = logits.copy()
    bad[b, n[b] :] = -1e4
    bad[b, n[b] :, 0] = -np.inf
    val, g = jax.value_and_grad(lambda x: loss_fn(x)[0])(bad)
    assert np.isfinite(float(val)) and np.isfinite(np.asarray(g)).all()


def test_config_accepts_a_divergence_while_it_is_registered(register):
    with pytest.raises(ValueError, match=r"loss.divergence='neyman_chi2' is unknown; choose"):
        LossConfig(divergence="neyman_chi2")
    with pytest.raises(ValueError, match="r2_on='model'"):
        losses.Divergence("bad", neyman_phi, r2_on="model")
    register("neyman_chi2", neyman_phi, lower=-1.0)
    with pytest.raises(ValueError, match="already registered"):
        losses.register_divergence(losses.Divergence("neyman_chi2", neyman_phi))
    cfg = LossConfig(divergence="neyman_chi2", bc_weight=0.0, bc_warmup_steps=0, gamma=GAMMA)
    logits, tokens, m, n, is_model, aw, _ = make_batch(3)
    total, met = make_loss_fn(cfg, eos_id=EOS)(logits, Batch(tokens, m, n, is_model, aw), 0)
    sm, _ = losses.sequence_match_loss(
        logits,
        tokens,
        m,
        n,
        is_model,
        eos_id=EOS,
        action_weight=aw,
        **cfg.kernel_args(losses.sequence_match_loss),
    )
    assert float(total) == pytest.approx(float(sm), rel=1e-6)
    assert float(met["sm/loss"]) == pytest.approx(float(sm), rel=1e-6)
    hel, _ = losses.sequence_match_loss(
        logits,
        tokens,
        m,
        n,
        is_model,
        eos_id=EOS,
        action_weight=aw,
        **{**cfg.kernel_args(losses.sequence_match_loss), "divergence": "hellinger"},
    )
    assert abs(float(sm) - float(hel)) > 1e-3  # the plug-in's phi is the one that ran


def test_train_with_a_registered_divergence(register, tmp_path):
    """Three steps of the training program, SequenceMatch with the plug-in from the first step
    on rows sampled from the model; its phi is traced into the step. ~18 s on 2 busy cores from
    a cold compilation cache (the final evaluation is cut to greedy decoding: 26 s otherwise)."""
    traced = []

    def phi(r):
        traced.append(r.shape)
        return neyman_phi(r)

    c = arithmetic.get_config("smoke")
    c.loss.divergence = register("neyman_chi2", phi, lower=-1.0)
    c.data.data_dir = str(tmp_path / "data")
    c.data.train_size, c.data.test_size = 64, 8
    c.train.num_steps, c.loss.bc_warmup_steps, c.sampling.sample_every = 3, 0, 1
    c.train.batch_size, c.train.model_rows, c.replay.capacity = 8, 8, 16
    c.train.log_every, c.train.eval_every, c.train.ckpt_every = 1, 1000, 1000
    c.eval.decodings, c.eval.recovery = "greedy", False
    state, _ = train.train(c, str(tmp_path / "run"))
    assert int(state.step) == 3 and traced
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    sm = [x for x in map(json.loads, lines) if x.get("sm/weight") == 1.0]
    assert len(sm) == 3 and all(np.isfinite(x["sm/loss"]) for x in sm)
    assert any(x["sm/n_model_actions"] > 0 for x in sm)  # on the model's own rows
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["loss"]["divergence"] == "neyman_chi2"
