"""Optimum sanity of the losses (method.md §2.4, 2.5) on a tabular problem with exact expectations.

The MDP. Base tokens {a, b, eos} (V = 3; logit index 3 is <bkspc>), prompt [a], at most H = 3
actions. A state is the prefix of actions after the prompt. At depth 0 and 1 the actions are
a, b, eos; at depth 2 only eos (forced termination, so the tree is finite). That is 7 states (3
free, 4 forced) and 7 trajectories ("eos", "a eos", ..., "b b eos"), each a row of T = 4 tokens
padded with eos (positions outside the episode are ignored by the losses).

The model. The logits are free parameters per state: a table theta [S, 3] over (a, b, eos); row
position j gets the entry of the state it represents, the position after the final eos a
constant dummy entry (its V is never used). Actions outside the action set (a, b at the forced
states, <bkspc> everywhere) have logit -inf, i.e. probability exactly 0. <bkspc> is removed: in
the tabular model the state after a backspace is an earlier prefix, which makes the MDP cyclic
with infinitely many trajectories (no exact enumeration), and the data never backspaces, so the
data-consistent restriction is to drop the action (the backtracking losses are tested elsewhere).

Why the expectations are exact. The batch holds every trajectory twice: as a data row with
row_weight = p_data(tau) and as a model row with row_weight = stop_gradient(pi(tau)) under the
current policy (samples carry no gradient in the real algorithm either). A row of weight k counts
as k copies, so E_data and E_model are the exact expectations under the two trajectory
distributions, normalised by the expected number of actions (the global token count). Gradient
descent on the loss is therefore the infinite-sample limit of training, with no noise.

The fixed point (derived below; the tests measure it). Tabular Q <-> r (r = Q(s,a) - gamma V(s'))
is a bijection, dV(s0)/dr(s,a) is the discounted visitation of (s,a) under pi = softmax(Q), and
the value term telescopes to V(s0) / L per group (L = expected length). At pi = p_data the model
terms equal the data terms and the gradient in r(s,a) is proportional to mu_data(s,a) times
  chi2_mix: 2c r          (zero iff r = 0 on the data support),
  kl:       1 - e^{-(r+1)} (zero iff r = -1 on the data support).
A constant r* fixes the policy: Q(s,a) = r* + gamma V(s') is the soft-optimal policy of the
constant reward r*, whatever p_data is. So pi = p_data is a fixed point exactly when p_data is
that policy (gamma = 1: uniform over trajectories for chi2_mix, p(tau) ~ e^{-|tau|} for kl).
Otherwise the fixed point is biased: in IQ-Learn's terms it trades the divergence against the
entropy of the soft MDP (argmin_pi D(rho_pi, rho_data) - H(pi)). For chi2_mix the divergence
weighs ~1/c against the entropy, so the bias is O(c); kl has no such knob (its bias also vanishes
on deterministic data, where the support constraint drives pi to 0 off the data).

Measured with the settings below (adam, lr 0.05 cosine-decayed over 5000 steps, gamma = 0.998;
trajectory TV before -> after): chi2_mix c=0.25 skewed 0.44 -> 0.055, peaked 0.76 -> 0.137
(0.22c-0.28c and 0.55c-0.59c for c in {0.25, 0.05, 0.01}: linear in c); kl skewed 0.44 -> 0.198,
peaked 0.76 -> 0.342, deterministic 0.95 -> 9e-4 (-> 0 with more steps); data = the soft-optimal
policy of r*: 3e-8 for both (exact up to float32); BC: 4e-8. The same at gamma = 1 and 0.9 to
within 0.006 (exact cases included), and the same fixed points from other initialisations.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from smatch_jax import losses
from smatch_jax.objective import LossConfig

A, B, EOS = 0, 1, 2
NA = 4  # V + 1 logits; index 3 is <bkspc>
H = 3  # at most 3 actions: two free steps, then a forced eos
T = 1 + H
GAMMA = 0.998
STEPS = 5000
LR = 0.05  # cosine-decayed to LR / 100: constant-lr adam jitters around the optimum
# The kernels have no defaults: these problems run revision 1 unless a test says otherwise.
REVISION_1 = LossConfig(**LossConfig.REVISION_1).kernel_args(losses.sequence_match_loss)

PREFIXES = [p for k in range(H) for p in itertools.product((A, B), repeat=k)]
S = len(PREFIXES)
SIDX = {p: i for i, p in enumerate(PREFIXES)}
DUMMY = S
FREE = np.array([len(p) < H - 1 for p in PREFIXES])
ALLOWED = np.ones((S, 3), bool)
ALLOWED[~FREE, :2] = False  # forced states: eos only


def _rows():
    """One row per trajectory `prefix + [eos]`: tokens, lengths and the state of each position."""
    tokens, length, state = [], [], []
    for p in PREFIXES:
        row = [A, *p, EOS]
        length.append(len(row))
        tokens.append(row + [EOS] * (T - len(row)))
        state.append([SIDX[p[:i]] for i in range(len(p) + 1)] + [DUMMY] * (T - len(p) - 1))
    return np.array(tokens, np.int32), np.array(length, np.int32), np.array(state, np.int32)


TOKENS, LENGTH, STATE = _rows()
R = len(TOKENS)  # 7 trajectories
TRAJ_LEN = LENGTH - 1  # number of actions
PROMPT_LEN = np.ones(R, np.int32)
# The SequenceMatch batch: the R trajectories as data rows, then again as model rows.
TOKENS2, PROMPT_LEN2, LENGTH2 = (np.concatenate([x, x]) for x in (TOKENS, PROMPT_LEN, LENGTH))
IS_MODEL2 = np.arange(2 * R) >= R


def traj_prob(policy):
    """[R] probability of each trajectory under a state policy [S, 3] (numpy or jax)."""
    xp = jnp if isinstance(policy, jax.Array) else np
    prob = xp.ones(R)
    for j in range(H):
        step = policy[np.minimum(STATE[:, j], S - 1), np.minimum(TOKENS[:, j + 1], 2)]
        prob = prob * xp.where(j < TRAJ_LEN, step, 1.0)
    return prob


def table_policy(per_state):
    """[S, 3] policy from `per_state(prefix) -> (p_a, p_b, p_eos)` on the free states."""
    return np.array([per_state(p) if FREE[i] else (0, 0, 1) for i, p in enumerate(PREFIXES)])


SKEWED = table_policy(
    lambda p: {(): (0.6, 0.3, 0.1), (A,): (0.2, 0.5, 0.3), (B,): (0.7, 0.1, 0.2)}[p]
)
PEAKED = table_policy(lambda p: (0.9, 0.05, 0.05) if not p else (0.04, 0.9, 0.06))
DETERMINISTIC = table_policy(lambda p: (1.0, 0.0, 0.0) if not p else (0.0, 1.0, 0.0))  # a b eos
DATA = {"skewed": SKEWED, "peaked": PEAKED}


def soft_optimal(r_star, gamma):
    """The policy with r = r_star everywhere: Q(s, a) = r_star + gamma V(s'), V(terminal) = 0."""
    v = np.zeros(S)
    pol = np.zeros((S, 3))
    for i in sorted(range(S), key=lambda i: -len(PREFIXES[i])):  # leaves first
        p = PREFIXES[i]
        q = np.full(3, -np.inf)
        q[EOS] = r_star
        if FREE[i]:
            q[A], q[B] = (r_star + gamma * v[SIDX[(*p, x)]] for x in (A, B))
        v[i] = np.logaddexp.reduce(q)
        pol[i] = np.exp(q - v[i])
    return pol


def logits_of(theta):
    """[R, T, NA] logits of every row: each position gets its state's table entry."""
    tab = jnp.where(ALLOWED, theta, -jnp.inf)
    tab = jnp.concatenate([tab, jnp.full((S, 1), -jnp.inf)], axis=1)  # <bkspc>: removed
    tab = jnp.concatenate([tab, jnp.zeros((1, NA))], axis=0)  # the dummy after eos
    return tab[STATE]


def policy_of(theta):
    return jax.nn.softmax(jnp.where(ALLOWED, theta, -jnp.inf), axis=-1)


def objective(theta, p_data, c, alpha, beta, *, kind, gamma):
    """`kind` in ('bc', 'chi2_mix', 'kl'); alpha, beta add alpha*data_term + beta*value_term
    (0, 0 is the loss itself; the contrasts use them to build wrong objectives)."""
    lg = logits_of(theta)
    if kind == "bc":
        return losses.bc_loss(
            lg,
            TOKENS,
            PROMPT_LEN,
            LENGTH,
            eos_id=EOS,
            row_weight=p_data,
            masked_actions="unrewarded",
        )[0]
    pi_tau = jax.lax.stop_gradient(traj_prob(policy_of(theta)))  # model rows, as if sampled
    loss, met = losses.sequence_match_loss(
        jnp.concatenate([lg, lg]),
        TOKENS2,
        PROMPT_LEN2,
        LENGTH2,
        IS_MODEL2,
        eos_id=EOS,
        row_weight=jnp.concatenate([p_data, pi_tau]),
        # c enters linearly; traced so that all cases share one compilation
        **{**REVISION_1, "divergence": kind, "gamma": gamma, "chi2_coef": c},
    )
    return loss + alpha * met["sm/data_term"] + beta * met["sm/value_term"]


@functools.partial(jax.jit, static_argnames=("kind", "gamma"))
def _train(theta0, p_data, c, alpha, beta, *, kind, gamma):
    """Adam from theta0 for STEPS steps, vmapped over the cases (leading axis of the args)."""
    opt = optax.adam(optax.cosine_decay_schedule(LR, STEPS, alpha=0.01))

    def one(p_data, c, alpha, beta):
        def step(carry, _):
            theta, state = carry
            g = jax.grad(objective)(theta, p_data, c, alpha, beta, kind=kind, gamma=gamma)
            upd, state = opt.update(g, state, theta)
            return (optax.apply_updates(theta, upd), state), None

        (theta, _), _ = jax.lax.scan(step, (theta0, opt.init(theta0)), None, length=STEPS)
        return theta

    return jax.vmap(one)(p_data, c, alpha, beta)


THETA0 = np.random.default_rng(0).normal(0.0, 1.0, (S, 3)).astype(np.float32)


def distances(policy, data):
    """(trajectory total variation, max |pi - p_data| over the free data-reachable states)."""
    p_data = traj_prob(data)
    tv = 0.5 * np.abs(traj_prob(policy) - p_data).sum()
    reach = np.array([p_data[[q[: len(p)] == p for q in PREFIXES]].sum() > 0 for p in PREFIXES])
    sel = FREE & reach
    return tv, np.abs(policy - data)[sel].max()


def fit(kind, cases, gamma=GAMMA):
    """cases: list of (data policy [S, 3], c, alpha, beta); returns [(tv0, tv1, state_err1)]."""
    data = [case[0] for case in cases]
    cols = [np.array([case[k] for case in cases], np.float32) for k in (1, 2, 3)]
    p_data = np.stack([traj_prob(d) for d in data]).astype(np.float32)
    theta = _train(THETA0, p_data, *cols, kind=kind, gamma=gamma)
    policy0 = np.asarray(policy_of(jnp.asarray(THETA0)), np.float64)
    out = []
    for d, th in zip(data, np.asarray(theta), strict=True):
        policy = np.asarray(policy_of(jnp.asarray(th)), np.float64)
        assert np.all(np.isfinite(policy))
        out.append((distances(policy0, d)[0], *distances(policy, d)))
    return out


def fit_named(kind, cases):
    """cases: {name: (data, c, alpha, beta)} -> {name: (tv0, tv1, state_err1)}."""
    return dict(zip(cases, fit(kind, list(cases.values())), strict=True))


@functools.cache
def chi2_results():
    exact = soft_optimal(0.0, GAMMA)
    cases = {(n, c): (d, c, 0.0, 0.0) for n, d in DATA.items() for c in (0.25, 0.05, 0.01)}
    cases["exact"] = (exact, 0.25, 0.0, 0.0)
    cases["flipped_data_term"] = (exact, 0.25, 2.0, 0.0)  # loss + 2 data_term
    cases["no_value_term"] = (exact, 0.25, 0.0, -1.0)  # loss - value_term
    return fit_named("chi2_mix", cases)


@functools.cache
def kl_results():
    exact = soft_optimal(-1.0, GAMMA)
    cases = {n: (d, 0.0, 0.0, 0.0) for n, d in DATA.items()}
    cases["deterministic"] = (DETERMINISTIC, 0.0, 0.0, 0.0)
    cases["exact"] = (exact, 0.0, 0.0, 0.0)
    cases["no_value_term"] = (exact, 0.0, 0.0, -1.0)  # a flipped data term diverges to -inf
    return fit_named("kl", cases)


def test_data_policies_are_distributions():
    for d in (SKEWED, PEAKED, DETERMINISTIC, soft_optimal(0.0, GAMMA), soft_optimal(-1.0, 1.0)):
        assert traj_prob(d).sum() == pytest.approx(1.0, abs=1e-12)
    # gamma = 1: r* = 0 is uniform over the trajectories, r* = -1 is p(tau) ~ e^{-|tau|}.
    assert traj_prob(soft_optimal(0.0, 1.0)) == pytest.approx(np.full(R, 1.0 / R))
    w = np.exp(-TRAJ_LEN)
    assert traj_prob(soft_optimal(-1.0, 1.0)) == pytest.approx(w / w.sum())


def test_bc_optimum_is_the_data_policy():
    """Tabular maximum likelihood: the optimum is p_data exactly (measured TV 4e-8)."""
    for tv0, tv1, err in fit("bc", [(d, 0, 0, 0) for d in DATA.values()]):
        assert tv0 > 0.4
        assert tv1 < 1e-4
        assert err < 1e-4


def test_chi2_mix_optimum_is_exact_when_data_is_soft_optimal():
    """p_data = the soft-optimal policy of r* = 0 is a fixed point (measured TV 3e-8)."""
    tv0, tv1, err = chi2_results()["exact"]
    assert tv0 > 0.3
    assert tv1 < 1e-4
    assert err < 1e-4


def test_chi2_mix_drives_the_policy_to_the_data_up_to_an_o_c_bias():
    """Default c = 0.25 cuts TV 0.44 -> 0.055 (skewed) and 0.76 -> 0.137 (peaked). The residual is
    the entropy bias of the fixed point: measured TV / c = 0.22-0.27 (skewed), 0.55-0.59
    (peaked) for c in {0.25, 0.05, 0.01}, so it is linear in c and vanishes as c -> 0."""
    res = chi2_results()
    for name, tv_max_over_c in (("skewed", 0.35), ("peaked", 0.7)):
        (tv0, tv_25, err_25), (_, tv_05, _), (_, tv_01, err_01) = (
            res[name, c] for c in (0.25, 0.05, 0.01)
        )
        assert tv_25 < 0.25 * tv0  # moves most of the way to the data
        assert err_25 < 0.2
        for tv, c in ((tv_25, 0.25), (tv_05, 0.05), (tv_01, 0.01)):
            assert 0.15 * c < tv < tv_max_over_c * c  # a real bias, O(c)
        assert 15.0 < tv_25 / tv_01 < 35.0  # ~25 = 0.25 / 0.01: linear in c
        assert err_01 < 0.01


def test_kl_moves_the_policy_toward_the_data_but_is_biased():
    """kl: TV 0.44 -> 0.198 (skewed), 0.76 -> 0.342 (peaked): an O(1) bias (no coefficient to
    shrink it). Its cause shows on the two exact cases: deterministic data (the support constraint
    wins, TV -> 0 as the logits diverge; 9e-4 here) and p_data = soft-optimal policy of r* = -1
    (TV 3e-8)."""
    res = kl_results()
    (s0, s1, _), (p0, p1, _) = res["skewed"], res["peaked"]
    (d0, d1, d_err), (e0, e1, e_err) = res["deterministic"], res["exact"]
    assert s1 < 0.5 * s0 and 0.15 < s1 < 0.25
    assert p1 < 0.5 * p0 and 0.25 < p1 < 0.4
    assert d0 > 0.9 and d1 < 3e-3 and d_err < 3e-3
    assert e0 > 0.15 and e1 < 1e-4 and e_err < 1e-4


def test_wrong_objectives_do_not_reach_the_data():
    """Contrast on the exact cases, where the loss itself reaches TV 3e-8. chi2_mix with the sign
    of the data term flipped (measured TV 0.84) or without the value term (TV 0.24: then r > 0,
    1/(2c) where pi matches the data, a positive reward that favours long trajectories); kl
    without the value term (TV 0.78: r -> +inf on the data, nothing anchors the policy)."""
    chi2, kl = chi2_results(), kl_results()
    assert chi2["exact"][1] < 1e-4 and kl["exact"][1] < 1e-4
    for res in (chi2["flipped_data_term"], chi2["no_value_term"], kl["no_value_term"]):
        assert res[1] > 0.2


# ---------------------------------------------------------------------------------------------
# The temperature (method.md §2.7): a one-step problem with 50 actions and one expert action.
#
# State s0 (the prompt) has NACT actions; the data always takes EXPERT. Every action leads to
# a terminal state: its position has the constant logits END (logsumexp 0, so V = 0 there; not
# a parameter), followed by a forced eos whose own step is identically zero (q = v = v_next =
# 0), so the problem is one-step under every option (terminal, normalize, truncated_weight).
# Closed form (alpha = temperature): the chi2_mix fixed point puts the non-expert logits at
# -1/(c alpha) and the expert's at (1 - pi*) / (c alpha (1 + pi*)); at alpha = 1, c = 1/4 that
# is pi* = 0.696 with 50 actions (0.31 with 1001), at alpha = 0.01 pi* > 0.999.
# Measured (adam 0.05, cosine, 5000 steps): alpha = 1: 0.6956 (= the closed form); alpha =
# 0.01 and 0.1: 0.9987 and 0.9991 (still rising toward 1: the logits move 0.05 per step).

NACT = 50
EOS50 = NACT
NA50 = NACT + 2  # NACT tokens, eos, <bkspc>
EXPERT = 7
_ROWS = np.array([[1, a, EOS50] for a in range(NACT)] * 2, np.int32)  # data rows, model rows
_IS_MODEL50 = np.arange(2 * NACT) >= NACT
_END = np.full(NA50, -np.inf, np.float32)
_END[EOS50] = 0.0


def _one_step_objective(theta, c, kw):
    s0 = jnp.concatenate([theta, jnp.full((2,), -jnp.inf)])  # eos and <bkspc> not allowed
    lg = jnp.broadcast_to(jnp.stack([s0, _END, _END]), (2 * NACT, 3, NA50))
    pi = jax.lax.stop_gradient(jax.nn.softmax(theta))  # model rows, as if sampled
    rw = jnp.concatenate([jax.nn.one_hot(EXPERT, NACT), pi])
    m, n = np.ones(2 * NACT, np.int32), np.full(2 * NACT, 3, np.int32)
    return losses.sequence_match_loss(
        lg,
        _ROWS,
        m,
        n,
        _IS_MODEL50,
        eos_id=EOS50,
        row_weight=rw,
        **{**REVISION_1, "chi2_coef": c, **kw},
    )[0]


def one_step_expert_prob(c, **kw):
    opt = optax.adam(optax.cosine_decay_schedule(LR, STEPS, alpha=0.01))

    def step(carry, _):
        theta, state = carry
        g = jax.grad(_one_step_objective)(theta, c, kw)
        upd, state = opt.update(g, state, theta)
        return (optax.apply_updates(theta, upd), state), None

    theta0 = jnp.asarray(np.random.default_rng(0).normal(0.0, 1.0, NACT), jnp.float32)
    run = jax.jit(lambda t: jax.lax.scan(step, (t, opt.init(t)), None, length=STEPS)[0][0])
    return float(jax.nn.softmax(run(theta0))[EXPERT])


def closed_form_expert_prob(n_actions, c, alpha):
    """The pi* with pi* = softmax(l*, -1/(c alpha) repeated n - 1 times)[0] and
    l* = (1 - pi*) / (c alpha (1 + pi*))."""
    lo, hi = 0.0, 1.0
    for _ in range(60):  # bisection: the residual is decreasing in pi*
        p = 0.5 * (lo + hi)
        gap = (1 - p) / (c * alpha * (1 + p)) + 1 / (c * alpha)  # l* - l_other
        resid = 1.0 / (1.0 + (n_actions - 1) * np.exp(-gap)) - p
        lo, hi = (p, hi) if resid > 0 else (lo, p)
    return p


def test_temperature_one_biases_the_fixed_point_closed_form():
    """Revision 1 (alpha = 1, c = 1/4) converges to the biased fixed point of the closed form."""
    assert closed_form_expert_prob(50, 0.25, 1.0) == pytest.approx(0.696, abs=1e-3)
    assert closed_form_expert_prob(1001, 0.25, 1.0) == pytest.approx(0.31, abs=5e-3)
    assert closed_form_expert_prob(50, 0.25, 0.01) > 0.999
    got = one_step_expert_prob(0.25, temperature=1.0)
    assert got == pytest.approx(closed_form_expert_prob(NACT, 0.25, 1.0), abs=2e-3)
    assert got < 0.95


def test_new_default_objective_puts_the_policy_on_the_expert():
    """The config defaults (objective.LossConfig) reach pi(expert) >= 0.95 on this problem."""
    from smatch_jax.config import base_config

    d = base_config().loss
    kw = {k: d[k] for k in ("temperature", "terminal", "masked_actions", "normalize")}
    kw.update(gamma=d.gamma, truncated_weight=d.truncated_weight, value_on=d.value_on)
    assert kw["temperature"] < 1.0  # else this is the test above
    assert one_step_expert_prob(d.chi2_coef, **kw) >= 0.95
