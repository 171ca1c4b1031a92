"""Losses (method.md §2) against the loop-by-loop float64 reference: values and gradients."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smatch_jax import losses, noise, objective, unlikelihood
from tests import reference

V = 6  # base vocabulary 0..5
EOS = 5
BK = V  # <bkspc>
T = 10
GAMMA = 0.9  # far from 1 so that discounting errors show
REFERENCE_DIVERGENCES = ("chi2_mix", "chi2", "kl", "js", "hellinger")  # tests/reference.py's
# The kernels have no defaults: these tests start from revision 1 (LossConfig.REVISION_1 over
# the config defaults) and override what they test.
REVISION_1 = objective.LossConfig(**objective.LossConfig.REVISION_1)
BC_REV1 = REVISION_1.kernel_args(losses.bc_loss)


def sm_args(**over):
    """The options of `sequence_match_loss` under revision 1, with `over`."""
    return {**REVISION_1.kernel_args(losses.sequence_match_loss), **over}


def make_batch(seed, *, n_rows=6, n_model=3, offsets=True):
    """Random rows: backspaces, eos at the end / in the middle / absent (truncated), padding."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((n_rows, T), np.int32)
    m = np.zeros(n_rows, np.int32)
    n = np.zeros(n_rows, np.int32)
    for b in range(n_rows):
        m[b] = rng.integers(1, 4)
        n[b] = rng.integers(m[b] + 1, T + 1)
        tokens[b, : m[b]] = rng.integers(0, EOS, m[b])
        acts = rng.integers(0, EOS, n[b] - m[b])
        acts[rng.random(n[b] - m[b]) < 0.25] = BK
        kind = b % 3
        if kind == 0:
            acts[-1] = EOS  # ends with eos
        elif kind == 1 and len(acts) > 2:
            acts[len(acts) // 2] = EOS  # eos in the middle: the rest is not in the episode
        tokens[b, m[b] : n[b]] = acts  # kind 2: truncated, no eos
        tokens[b, n[b] :] = rng.integers(0, V + 1, T - n[b])  # junk padding must be ignored
    is_model = np.arange(n_rows) >= n_rows - n_model
    logits = rng.normal(0.0, 1.5, (n_rows, T, V + 1)).astype(np.float32)
    if offsets:  # make r positive on some rows so js/hellinger run unclamped there
        logits[::2] += (3.0 * (T - np.arange(T)))[None, :, None].astype(np.float32)
    aw = (rng.random((n_rows, T)) < 0.8).astype(np.float32)
    rw = rng.uniform(0.5, 2.0, n_rows).astype(np.float32)
    return logits, tokens, m, n, is_model, aw, rw


OPTIONS = {  # revision-2 options of method.md §2.7, each alone, and together
    "rev1": {},
    "temperature": {"temperature": 0.05},
    "bootstrap": {"terminal": "bootstrap"},
    "environment": {"masked_actions": "environment"},
    "row": {"normalize": "row"},
    "drop_truncated": {"truncated_weight": 0.0},
    "half_truncated": {"truncated_weight": 0.5},
    "all": {
        "temperature": 0.1,
        "terminal": "bootstrap",
        "masked_actions": "environment",
        "normalize": "row",
        "truncated_weight": 0.0,
    },
}


@functools.cache
def _sm(div, value_on, options="rev1", gamma=GAMMA):
    fn = functools.partial(
        losses.sequence_match_loss,
        eos_id=EOS,
        **sm_args(
            divergence=div,
            gamma=gamma,
            chi2_coef=0.25,
            value_on=value_on,
            clamp_margin=1e-3,
            **OPTIONS[options],
        ),
    )
    return jax.jit(jax.value_and_grad(lambda lg, *a, **k: fn(lg, *a, **k)[0]))


def _ref_sm(div, value_on, logits, tokens, m, n, is_model, aw, rw, options="rev1", gamma=GAMMA):
    return reference.sm_loss(
        logits,
        tokens.tolist(),
        m,
        n,
        is_model,
        eos=EOS,
        div=div,
        gamma=gamma,
        c=0.25,
        value_on=value_on,
        aw=aw.tolist(),
        rw=rw.tolist(),
        clamp=1e-3,
        **OPTIONS[options],
    )


def _check_grad(ref_fn, logits, grad, seed):
    """Directional derivatives of the float64 reference (central differences) vs `grad`."""
    rng = np.random.default_rng(seed)
    x = logits.astype(np.float64)
    for _ in range(3):
        d = rng.normal(size=x.shape)
        h = 1e-5
        fd = (ref_fn(x + h * d) - ref_fn(x - h * d)) / (2 * h)
        got = float(np.sum(np.asarray(grad, np.float64) * d))
        assert got == pytest.approx(fd, rel=2e-4, abs=2e-4)


def _check_against_reference(div, value_on, options, batch, gamma=GAMMA):
    logits, tokens, m, n, is_model, aw, rw = batch
    loss, grad = _sm(div, value_on, options, gamma)(
        logits, tokens, m, n, is_model, action_weight=aw, row_weight=rw
    )
    ref = functools.partial(_ref_sm, div, value_on, options=options, gamma=gamma)
    want = ref(logits, tokens, m, n, is_model, aw, rw)
    # float32 vs float64: hellinger's phi'(r) = 1/(1+r)^2 is ~1e6 near its clamp bound.
    assert float(loss) == pytest.approx(want, rel=5e-5, abs=1e-5)
    _check_grad(lambda x: ref(x, tokens, m, n, is_model, aw, rw), logits, grad, seed=1)
    return float(loss)


@pytest.mark.parametrize("div", REFERENCE_DIVERGENCES)
@pytest.mark.parametrize("value_on", losses.VALUE_ON)
@pytest.mark.parametrize("n_model", [0, 3])
@pytest.mark.parametrize("options", ["rev1", "all"])
def test_sequence_match_matches_reference(div, value_on, n_model, options):
    seed = 100 * REFERENCE_DIVERGENCES.index(div) + 10 * losses.VALUE_ON.index(value_on) + n_model
    batch = make_batch(seed, n_model=n_model)
    _check_against_reference(div, value_on, options, batch)


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize(
    ("div", "value_on", "gamma"), [("chi2_mix", "mix", GAMMA), ("kl", "mix", 1.0)]
)
def test_each_option_matches_reference_and_matters(options, div, value_on, gamma):
    """Each option alone against the loop reference; and each changes the loss on these rows
    (so the reference comparison cannot pass by ignoring it)."""
    batch = make_batch(21, n_model=3)
    got = _check_against_reference(div, value_on, options, batch, gamma)
    if options != "rev1":
        base = _ref_sm(div, value_on, *batch, options="rev1", gamma=gamma)
        assert abs(got - base) > 1e-3


def noisy_batch(seed, *, rate=0.4, max_burst=3, n_rows=6, n_model=2):
    """Rows as the trainer builds them: clean data rows, then `noise.add_noise` (masked noise
    tokens of weight 0 followed by their backspaces, bursts up to `max_burst`)."""
    rng = np.random.default_rng(seed)
    T2 = 16
    tokens = np.zeros((n_rows, T2), np.int32)
    m = rng.integers(1, 3, n_rows).astype(np.int32)
    n = np.zeros(n_rows, np.int32)
    for b in range(n_rows):
        k = rng.integers(2, 6)
        n[b] = m[b] + k
        tokens[b, : n[b]] = rng.integers(0, EOS, n[b])
        if b % 2 == 0:
            tokens[b, n[b] - 1] = EOS
    nz = noise.add_noise(
        jax.random.key(seed),
        tokens,
        m,
        n,
        noise_probs=np.full(V, 1.0 / (V - 1)) * (np.arange(V) != EOS),
        bkspc_id=BK,
        noise_rate=rate,
        max_burst=max_burst,
        pad_id=0,
    )
    tokens, n, aw = (np.asarray(x) for x in (nz.tokens, nz.length, nz.action_weight))
    assert (aw[:, 1:] == 0).sum() > 3  # noise was inserted, with runs of it
    is_model = np.arange(n_rows) >= n_rows - n_model
    aw = np.where(is_model[:, None], 1.0, aw).astype(np.float32)  # model rows: all weight 1
    logits = rng.normal(0.0, 1.5, (n_rows, T2, V + 1)).astype(np.float32)
    return logits, tokens, m, n, is_model, aw, np.ones(n_rows, np.float32)


@pytest.mark.parametrize("div", ["chi2_mix", "chi2", "kl", "js"])
@pytest.mark.parametrize("gamma", [GAMMA, 1.0])
@pytest.mark.parametrize("options", ["environment", "all"])
def test_noise_as_environment_matches_reference(div, gamma, options):
    _check_against_reference(div, "mix", options, noisy_batch(3), gamma)


def _discounted_nll(logits, tokens, m, n, is_model, aw, gamma, normalize="token"):
    """E_data[w * -log pi(a|s)] over agent actions (the BC identity's right-hand side)."""
    total, count, rows = 0.0, 0, 0
    for b in range(len(tokens)):
        if is_model[b]:
            continue
        agent = [t for t in reference._episode(tokens[b], m[b], n[b], EOS) if aw[b, t] > 0]
        for k, t in enumerate(agent):
            lp = logits[b, t - 1].astype(np.float64)
            total += gamma**k * (reference._lse(lp) - lp[tokens[b, t]])
        count += len(agent)
        rows += bool(agent)
    return total / (rows if normalize == "row" else count)


@pytest.mark.parametrize("gamma", [GAMMA, 1.0])
@pytest.mark.parametrize("terminal", losses.TERMINAL)
@pytest.mark.parametrize("normalize", losses.NORMALIZE)
def test_bc_identity_holds_with_noise_as_environment(gamma, terminal, normalize):
    """method.md §2.7: value_on=data, c=0, alpha=1: L_SM = E_data[w * -log pi] over agent actions,
    exactly, for any logits and noise; at gamma = 1 it is L_BC (agent actions counted)."""
    logits, tokens, m, n, is_model, aw, _ = noisy_batch(5)
    kw = dict(gamma=gamma, chi2_coef=0.0, value_on="data", terminal=terminal)
    sm, _ = losses.sequence_match_loss(
        logits,
        tokens,
        m,
        n,
        is_model,
        eos_id=EOS,
        action_weight=aw,
        **sm_args(masked_actions="environment", normalize=normalize, **kw),
    )
    want = _discounted_nll(logits, tokens, m, n, is_model, aw, gamma, normalize)
    assert float(sm) == pytest.approx(want, rel=1e-5)
    if gamma == 1.0 and normalize == "token":
        bc, _ = losses.bc_loss(
            logits,
            tokens,
            m,
            n,
            is_model,
            eos_id=EOS,
            action_weight=aw,
            masked_actions="environment",
        )
        assert float(sm) == pytest.approx(float(bc), rel=1e-5)
    # Revision 1 ('unrewarded') leaves V(s) - gamma V(s + noise) per masked action: no identity.
    sm1, _ = losses.sequence_match_loss(
        logits,
        tokens,
        m,
        n,
        is_model,
        eos_id=EOS,
        action_weight=aw,
        **sm_args(masked_actions="unrewarded", **kw),
    )
    want1 = _discounted_nll(logits, tokens, m, n, is_model, aw, gamma)
    assert abs(float(sm1) - want1) > 1e-2


@pytest.mark.parametrize("div", ["chi2_mix", "chi2"])
@pytest.mark.parametrize("terminal", losses.TERMINAL)
def test_chi2_telescopes_to_bc_plus_a_boundary_term(div, terminal):
    """method.md §2.7: with gamma = 1 and c = 0 the linear part telescopes along each row,
    L_SM = L_BC + 0.5 (E_model - E_data)[V(s_0) - V(s_n)] (row sums over the group's action
    count; V(s_n) = 0 after eos under terminal='zero', read at the last position otherwise)."""
    logits, tokens, m, n, is_model, _, _ = make_batch(31, n_model=3)
    ones = np.ones(tokens.shape, np.float32)
    sm, _ = losses.sequence_match_loss(
        logits,
        tokens,
        m,
        n,
        is_model,
        eos_id=EOS,
        **sm_args(divergence=div, gamma=1.0, chi2_coef=0.0, value_on="mix", terminal=terminal),
    )
    bc, _ = losses.bc_loss(
        logits, tokens, m, n, is_model, eos_id=EOS, action_weight=ones, **BC_REV1
    )
    boundary = {"data": 0.0, "model": 0.0}
    count = {"data": 0, "model": 0}
    for b in range(len(tokens)):
        g = "model" if is_model[b] else "data"
        acts = reference._episode(tokens[b].tolist(), m[b], n[b], EOS)
        last = acts[-1]
        v0 = reference._lse(logits[b, m[b] - 1].astype(np.float64))
        zero_end = tokens[b, last] == EOS and terminal == "zero"
        vn = 0.0 if zero_end else reference._lse(logits[b, last].astype(np.float64))
        boundary[g] += v0 - vn
        count[g] += len(acts)
    want = float(bc) + 0.5 * (boundary["model"] / count["model"] - boundary["data"] / count["data"])
    assert float(sm) == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_model_ended_fraction_and_truncated_weight():
    """`sm/model_ended_frac` counts model rows that end with eos; truncated_weight=0 removes
    the others from every term (the loss equals that of the batch without them)."""
    logits, tokens, m, n, is_model, _, _ = make_batch(41, n_model=3)
    fn = functools.partial(losses.sequence_match_loss, eos_id=EOS, **sm_args(gamma=GAMMA))
    ended = [EOS in tokens[b, m[b] : n[b]].tolist() for b in range(len(tokens))]
    _, met = fn(logits, tokens, m, n, is_model)
    want = np.mean([e for e, mod in zip(ended, is_model, strict=True) if mod])
    assert 0 < want < 1
    assert float(met["sm/model_ended_frac"]) == pytest.approx(want)
    dropped, _ = fn(logits, tokens, m, n, is_model, truncated_weight=0.0)
    keep = np.array([e or not mod for e, mod in zip(ended, is_model, strict=True)])
    sub, _ = fn(logits[keep], tokens[keep], m[keep], n[keep], is_model[keep])
    assert float(dropped) == pytest.approx(float(sub), rel=1e-6)


def test_temperature_scales_as_specified():
    """alpha = 1 is revision 1; the linear terms keep their scale in alpha and the r^2 term is
    c * alpha * (l[a] - gamma lse(l'))^2: the loss is affine in alpha."""
    logits, tokens, m, n, is_model, aw, rw = make_batch(51, n_model=3)
    fn = functools.partial(losses.sequence_match_loss, eos_id=EOS, action_weight=aw, row_weight=rw)
    val = {
        a: float(fn(logits, tokens, m, n, is_model, **sm_args(gamma=GAMMA, temperature=a))[0])
        for a in (1.0, 0.5, 0.01)
    }
    rev1, _ = fn(logits, tokens, m, n, is_model, **sm_args(gamma=GAMMA))
    assert val[1.0] == pytest.approx(float(rev1))
    slope = (val[1.0] - val[0.5]) / 0.5
    assert val[0.01] == pytest.approx(val[1.0] - 0.99 * slope, rel=1e-4, abs=1e-4)


def test_defaults_no_weights():
    """action_weight=None and row_weight=None mean all ones."""
    logits, tokens, m, n, is_model, _, _ = make_batch(7)
    loss, _ = losses.sequence_match_loss(
        logits, tokens, m, n, is_model, eos_id=EOS, **sm_args(gamma=GAMMA)
    )
    ones = np.ones((len(tokens), T), np.float32)
    want = _ref_sm("chi2_mix", "mix", logits, tokens, m, n, is_model, ones, np.ones(len(tokens)))
    assert float(loss) == pytest.approx(want, rel=1e-5)


def test_row_weight_equals_duplicated_rows():
    logits, tokens, m, n, is_model, _, _ = make_batch(3)
    rw = np.array([2, 1, 1, 3, 1, 1], np.float32)
    fn = functools.partial(
        losses.sequence_match_loss, eos_id=EOS, action_weight=None, **sm_args(gamma=GAMMA)
    )
    weighted, _ = fn(logits, tokens, m, n, is_model, row_weight=rw)
    rep = np.repeat(np.arange(len(rw)), rw.astype(int))
    dup, _ = fn(logits[rep], tokens[rep], m[rep], n[rep], is_model[rep])
    assert float(weighted) == pytest.approx(float(dup), rel=1e-5)


def test_hand_computed_single_action():
    """Prompt [1], action eos: r = q(eos) (terminal), value term = V(s0), w = 1."""
    logits = np.zeros((1, 2, V + 1), np.float32)
    logits[0, 0, EOS] = 2.0
    tokens = np.array([[1, EOS]], np.int32)
    args = (logits, tokens, np.array([1]), np.array([2]), np.array([False]))
    v0 = np.log(V + np.exp(2.0))
    loss, met = losses.sequence_match_loss(*args, eos_id=EOS, **sm_args(chi2_coef=0.25))
    assert float(met["sm/r_data"]) == pytest.approx(2.0)
    assert float(loss) == pytest.approx(-2.0 + v0 + 0.25 * 4.0, rel=1e-6)
    bc, _ = losses.bc_loss(*args, eos_id=EOS, **BC_REV1)
    assert float(bc) == pytest.approx(v0 - 2.0, rel=1e-6)


def test_truncated_row_bootstraps_last_state():
    """Without eos, the last action's v_next is read at position n-1 (gamma ** k weights)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 4, V + 1)).astype(np.float32)
    tokens = np.array([[1, 2, 3, 0]], np.int32)
    _, met = losses.sequence_match_loss(
        logits,
        tokens,
        np.array([1]),
        np.array([3]),
        np.array([False]),
        eos_id=EOS,
        **sm_args(gamma=GAMMA),
    )
    lse = jax.nn.logsumexp(logits[0], axis=-1)
    r = [logits[0, 0, 2] - GAMMA * lse[1], logits[0, 1, 3] - GAMMA * lse[2]]
    assert float(met["sm/r_data"]) == pytest.approx(float(np.mean(r)), rel=1e-5)


@pytest.mark.parametrize("n_model", [0, 3])
def test_bc_matches_reference(n_model):
    logits, tokens, m, n, is_model, aw, rw = make_batch(11, n_model=n_model)
    fn = jax.value_and_grad(
        lambda lg: losses.bc_loss(
            lg, tokens, m, n, is_model, eos_id=EOS, action_weight=aw, row_weight=rw, **BC_REV1
        )[0]
    )
    loss, grad = fn(logits)

    def ref(x):
        return reference.bc_loss(
            x, tokens.tolist(), m, n, is_model, eos=EOS, aw=aw.tolist(), rw=rw.tolist()
        )

    assert float(loss) == pytest.approx(ref(logits), rel=1e-5)
    _check_grad(ref, logits, grad, seed=2)


def test_diagnostics_present_and_finite():
    logits, tokens, m, n, is_model, aw, _ = make_batch(5)
    _, met = losses.sequence_match_loss(
        logits, tokens, m, n, is_model, eos_id=EOS, action_weight=aw, **sm_args(divergence="js")
    )
    for key in (
        "sm/r_data",
        "sm/r_model",
        "sm/v_mean",
        "sm/value_term",
        "sm/r2_term",
        "sm/clamp_frac",
        "sm/pi_bkspc_data",
        "sm/pi_bkspc_model",
    ):
        assert np.isfinite(float(met[key])), key
    assert 0.0 < float(met["sm/clamp_frac"]) < 1.0  # the offsets make some r unclamped
    # pi(<bkspc>) on model rows is a mean of softmax probabilities over their valid states.
    valid = losses.action_valid(jnp.asarray(tokens), jnp.asarray(m), jnp.asarray(n), EOS)
    p = jax.nn.softmax(logits[:, :-1], axis=-1)[..., BK]
    sel = np.asarray(valid) & is_model[:, None]
    assert float(met["sm/pi_bkspc_model"]) == pytest.approx(float(p[sel].mean()), rel=1e-5)


def test_loss_factory_warmup_and_validation():
    logits, tokens, m, n, is_model, aw, _ = make_batch(9)
    batch = objective.Batch(tokens, m, n, is_model, aw)
    cfg = {"bc_weight": 0.5, "sm_weight": 2.0, "bc_warmup_steps": 10, "gamma": GAMMA}
    fn = jax.jit(objective.make_loss_fn(cfg, eos_id=EOS))
    d = objective.LossConfig()  # the defaults of every other field (revision 2)
    bc, _ = losses.bc_loss(
        logits,
        tokens,
        m,
        n,
        is_model,
        eos_id=EOS,
        action_weight=aw,
        masked_actions=d.masked_actions,
    )
    rev2 = {k: getattr(d, k) for k in objective.LossConfig.REVISION_1}
    sm, _ = losses.sequence_match_loss(
        logits,
        tokens,
        m,
        n,
        is_model,
        eos_id=EOS,
        action_weight=aw,
        divergence=d.divergence,
        gamma=GAMMA,
        chi2_coef=d.chi2_coef,
        value_on=d.value_on,
        clamp_margin=d.clamp_margin,
        **rev2,
    )
    warm, met = fn(logits, batch, 3)
    assert float(warm) == pytest.approx(0.5 * float(bc), rel=1e-5)
    assert float(met["sm/weight"]) == 0.0
    full, _ = fn(logits, batch, 10)
    assert float(full) == pytest.approx(0.5 * float(bc) + 2.0 * float(sm), rel=1e-5)
    with pytest.raises(
        ValueError, match=r"unknown config key .loss.gama.; did you mean .loss.gamma."
    ):
        objective.make_loss_fn({"gama": 0.9}, eos_id=EOS)
    with pytest.raises(ValueError, match="choose one of"):
        objective.make_loss_fn({"divergence": "chi"}, eos_id=EOS)


def test_revision_1_values_are_reachable():
    """`LossConfig.REVISION_1` over the config defaults is revision 1: the options the float64
    reference defaults to (the tests above compare the kernels against it with these values),
    and what `config.upgrade` gives a config saved before revision 2."""
    from smatch_jax import config

    params = inspect.signature(reference.sm_loss).parameters
    ref_defaults = {k: p.default for k, p in params.items() if p.default is not p.empty}
    assert ref_defaults == objective.LossConfig.REVISION_1
    d = objective.LossConfig()
    changed = {k for k in d.defaults() if getattr(REVISION_1, k) != getattr(d, k)}
    assert changed and changed <= set(ref_defaults)  # revision 2 changed these fields only
    upgraded = config.upgrade({"loss": {"divergence": "kl"}})["loss"]
    assert objective.LossConfig.from_mapping(upgraded) == objective.LossConfig(
        divergence="kl", **objective.LossConfig.REVISION_1
    )


def test_unregistered_divergence_names_the_registered_ones():
    logits, tokens, m, n, is_model, _, _ = make_batch(9)
    with pytest.raises(ValueError, match=r"'tv' is not registered; choose one of \['chi2_mix'"):
        losses.sequence_match_loss(
            logits, tokens, m, n, is_model, eos_id=EOS, **sm_args(divergence="tv")
        )


@pytest.mark.parametrize("div", list(losses.DIVERGENCES))
def test_garbage_logits_outside_the_episode_give_finite_gradients(div):
    """-inf / huge logits at padding and after eos must not turn the gradient into NaN."""
    lg = np.zeros((2, 4, V + 1), np.float32)
    lg[0, 1, 0] = -np.inf  # state after the eos action: q of the padding "action" is -inf
    lg[1, 2:] = -1e4  # far outside exp's range, at padding
    tokens = np.array([[1, EOS, 0, 0], [1, 2, 3, 0]], np.int32)
    m, n = np.array([1, 1]), np.array([2, 2])
    for fn in (
        lambda x: losses.sequence_match_loss(
            x, tokens, m, n, np.array([False, True]), eos_id=EOS, **sm_args(divergence=div)
        )[0],
        lambda x: losses.bc_loss(x, tokens, m, n, eos_id=EOS, **BC_REV1)[0],
    ):
        val, grad = jax.value_and_grad(fn)(lg)
        assert np.isfinite(float(val)) and np.isfinite(np.asarray(grad)).all()


def test_unlikelihood_matches_loop_reference():
    logits, tokens, m, n, is_model, _, _ = make_batch(13, n_model=2)
    tokens = np.where(tokens == BK, 1, tokens)  # the baseline trains on clean rows
    got, _ = unlikelihood.unlikelihood_loss(logits, tokens, m, n, is_model, eos_id=EOS)
    total, count = 0.0, 0
    for b in range(len(tokens)):
        if is_model[b]:
            continue
        for t in range(m[b], n[b]):
            if EOS in tokens[b, m[b] : t].tolist():
                break
            p = np.exp(logits[b, t - 1].astype(np.float64))
            p /= p.sum()
            cands = set(tokens[b, :t].tolist()) - {int(tokens[b, t])}
            total += sum(np.log(max(1 - p[c], 1e-6)) for c in cands)
            count += 1
    assert float(got) == pytest.approx(-total / count, rel=1e-5)
    fn = objective.make_loss_fn({"sm_weight": 0.0, "unlikelihood_weight": 0.5}, eos_id=EOS)
    batch = objective.Batch(tokens, m, n, is_model, np.ones(tokens.shape, np.float32))
    tot, met = fn(logits, batch, 0)
    assert "ul/loss" in met
    bc, _ = losses.bc_loss(logits, tokens, m, n, is_model, eos_id=EOS, **BC_REV1)
    assert float(tot) == pytest.approx(float(bc) + 0.5 * float(got), rel=1e-5)
