"""Labelled mixtures and class-conditional exact quantities (fmjax.conditional), schedule change
(convert.change_schedule), guided sampling and the conditional report."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmjax
from fmjax import conditional as cond
from fmjax import exact, schedules

LABELS = np.array([0, 1, 0, 2, 1])


@pytest.fixture(scope="module")
def labelled():
    """A 2-D labelled target (5 components, 3 classes) from N(0, I), in float64 (built once)."""
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        p1 = fmjax.random_gaussian_mixture(jax.random.PRNGKey(0), 5, 2, dtype=jnp.float64)
        p1 = fmjax.GaussianMixture(p1.weights, p1.means, p1.covs, labels=LABELS)
        return p1, fmjax.independent_coupling(fmjax.standard_normal(2, jnp.float64), p1)
    finally:
        jax.config.update("jax_enable_x64", prev)


@pytest.fixture
def problem(x64, labelled):
    return labelled


def _sub(p1, y):
    """Class y's sub-coupling built by hand: its components only, weights renormalised."""
    m = LABELS == y
    w = p1.weights[m]
    target = fmjax.GaussianMixture(w / w.sum(), p1.means[m], p1.covs[m])
    return fmjax.independent_coupling(fmjax.standard_normal(2, jnp.float64), target)


def test_labels_validated_and_static(x64, problem):
    p1, c = problem
    w, m, s = p1.weights, p1.means, p1.covs
    for bad, err in (
        ([0, 1], ValueError),
        ([0, -1, 0, 1, 1], ValueError),
        (np.zeros(5), TypeError),
        (np.ones(5, bool), TypeError),
    ):
        with pytest.raises(err, match="`labels` must be"):
            fmjax.GaussianMixture(w, m, s, labels=bad)
    assert p1.labels == tuple(LABELS) and p1.n_classes == 3
    assert c.labels == tuple(LABELS) and c.target().labels == tuple(LABELS)
    assert jax.tree.unflatten(*reversed(jax.tree.flatten(c))).labels == c.labels
    assert jax.jit(lambda q: q)(c).labels == c.labels
    stacked = jax.tree.map(lambda *a: jnp.stack(a), p1, p1)
    assert stacked.labels == p1.labels
    assert jax.vmap(lambda q: q.n_classes + q.weights.sum())(stacked).shape == (2,)
    assert fmjax.GaussianMixture(w, m, s).labels is None  # unlabelled: as before


def test_conditional_quantities_equal_sub_mixture(problem):
    """u_t(x|y), log p_t(x|y), score(x|y) with one label per point (one t per point; one shared
    t) equal the engine on a sub-mixture built by hand, to 1e-12 (float64 rounding of two
    evaluation orders), also through exact.prepare; a wrong label and unnormalised weights (the
    controls) are far off."""
    p1, c = problem
    s = schedules.cosine()
    x = 2.0 * jax.random.normal(jax.random.PRNGKey(1), (8, 2))
    y = jnp.array([0, 1, 2, 0, 1, 2, 3, 3])  # 3 = the null class: unconditional
    ts = jnp.linspace(0.1, 0.9, 8)
    q = ("velocity", "log_prob", "score")
    ev = cond.evaluate(c, s, ts, x, y, q)
    for cls in range(4):
        sel = np.asarray(y) == cls
        ref = exact.evaluate(_sub(p1, cls) if cls < 3 else c, s, ts, x, q)
        for name in q:
            np.testing.assert_allclose(getattr(ev, name)[sel], getattr(ref, name)[sel], atol=1e-12)
    prepared = exact.prepare(c)
    np.testing.assert_allclose(cond.velocity(prepared, s, ts, x, y), ev.velocity, atol=1e-12)
    shared = cond.velocity(c, s, 0.3, x, y)  # one t for all points: the shared-t vmap
    zero = np.asarray(y) == 0
    np.testing.assert_allclose(
        shared[zero], exact.velocity(_sub(p1, 0), s, 0.3, x[zero]), atol=1e-12
    )
    scalar = cond.velocity(c, s, ts, x, 1)  # one label for all points
    np.testing.assert_allclose(scalar, exact.velocity(_sub(p1, 1), s, ts, x), atol=1e-12)
    # Controls: another class's field, and the log-density without renormalisation.
    assert jnp.max(jnp.abs(cond.velocity(c, s, ts, x, 0) - scalar)) > 0.1
    m = LABELS == 1
    raw = fmjax.independent_coupling(
        fmjax.standard_normal(2, jnp.float64),
        fmjax.GaussianMixture._from_leaves(p1.weights[m], p1.means[m], p1.covs[m]),
    )
    gap = exact.log_prob(raw, s, ts, x) - cond.log_prob(c, s, ts, x, 1)
    np.testing.assert_allclose(gap, jnp.log(p1.weights[m].sum()), atol=1e-12)


def test_class_posterior_is_bayes(problem):
    """P(y | X_t = x) = pi_y p_t(x|y) / p_t(x) (Bayes, with the densities of p_t's components
    grouped by label by hand, mixtures code) to 1e-12; sums to 1; the control without the
    prior pi_y fails. Under jit."""
    _, c = problem
    s = schedules.linear()
    x = 2.0 * jax.random.normal(jax.random.PRNGKey(2), (6, 2))
    post = jax.jit(cond.class_posterior, static_argnums=1)(c, s, 0.7, x)
    pt = exact.marginal(c, s, 0.7)
    pi = np.array([pt.weights[LABELS == y].sum() for y in range(3)])
    logp_y = np.stack(
        [
            fmjax.GaussianMixture(
                pt.weights[m] / pt.weights[m].sum(), pt.means[m], pt.covs[m]
            ).log_prob(x)
            for m in (LABELS == y for y in range(3))
        ],
        -1,
    )
    bayes = np.exp(np.log(pi)[None] + logp_y - np.asarray(pt.log_prob(x))[:, None])
    np.testing.assert_allclose(post, bayes, atol=1e-12)
    np.testing.assert_allclose(post.sum(-1), 1.0, atol=1e-12)
    np.testing.assert_allclose(cond.class_weights(c), pi, atol=1e-15)
    assert np.max(np.abs(jax.nn.softmax(logp_y, -1) - post)) > 1e-2  # control: no prior


def test_change_schedule_exact_for_every_pair(x64):
    """The exact field of each built-in noise-free schedule, changed to any other, equals the
    exact field of that other to 1e-10 (relative to 1 + |u|; float64, bisection to 2^-64) on
    64 times spanning the overlap of their ratio ranges, ends included (VP's a_0 > 0 and its
    interval's end 1 - eps narrow the overlap; it is the field's `schedule.interval`). Control:
    a wrong inverse of the ratio (linear's, for cosine) is off by > 1e-2; cosine's own closed
    form agrees."""
    p1 = fmjax.random_gaussian_mixture(jax.random.PRNGKey(0), 3, 2, dtype=jnp.float64)
    c = exact.prepare(fmjax.independent_coupling(fmjax.standard_normal(2, jnp.float64), p1))
    scheds = [
        schedules.linear(),
        schedules.cosine(),
        schedules.polynomial(2.0),
        schedules.polynomial(0.5),
        schedules.vp(),
    ]
    x = 2.0 * jax.random.normal(jax.random.PRNGKey(1), (64, 2))

    def err(field, target):
        r = jnp.linspace(*field.schedule.interval, 64)
        ref = exact.velocity(c, target, r, x)
        return float(jnp.max(jnp.abs(field(r, x) - ref) / (1.0 + jnp.abs(ref))))

    for source in scheds:
        for target in scheds:
            changed = fmjax.convert.change_schedule(exact.velocity_field(c, source), source, target)
            assert err(changed, target) < 1e-10, (source.name, target.name)
    lo, hi = fmjax.convert.change_schedule(lambda t, x: x, scheds[4], scheds[0]).schedule.interval
    assert 6e-3 < lo < 7e-3 and 0.98 < hi < 0.995  # VP's ends: a_0 = 6.6e-3, t_max = 1 - 1e-3
    cos, lin = scheds[1], scheds[0]
    right = fmjax.convert.change_schedule(
        exact.velocity_field(c, cos), cos, lin, snr_inverse=lambda r: jnp.arctan(r) / (0.5 * jnp.pi)
    )
    wrong = fmjax.convert.change_schedule(
        exact.velocity_field(c, cos), cos, lin, snr_inverse=lambda r: 1.0 - 1.0 / (1.0 + r)
    )
    assert err(right, lin) < 1e-10 and err(wrong, lin) > 1e-2


def test_guided_report_exact_at_w1_and_guidance_sharpens(problem):
    """The exact conditional field at w = 1, scored by ``fmjax.evaluate(..., guidance=1)``: the
    unconditional part (the null-label field) has velocity error 0 and excess loss 0; the
    conditional part has velocity error 0 (to 1e-20: w(v_y - v_0) + v_0 in float64), Bayes
    accuracy and cross-entropy of the ODE samples at the exact values within 4 standard errors
    (Monte Carlo noise of n = 200 samples per class), and is in the JSON report and its
    summary. Controls (``evaluate_conditional``, the same compiled programs): w = 3 moves the
    rare, overlapping class 1's accuracy and cross-entropy beyond 4 standard errors, and w = 0
    (the unconditional field) loses the classes."""
    _, c = problem
    s = schedules.linear()
    field = cond.velocity_field(exact.prepare(c), s)
    key = jax.random.PRNGKey(3)

    def report(f, w):
        return fmjax.evaluate_conditional(f, c, s, key=key, weight=w, n=200, null=3)

    def off(a, b, sa, sb):
        return np.abs(a - b) / np.sqrt(sa**2 + sb**2)

    labelled = fmjax.problems.Problem("labelled", c, s, "5 components, 3 classes")
    cheap = dict(n_times=2, w2=False, nfe_step_counts=(4,), likelihood_steps=4)
    full = fmjax.evaluate(field, labelled, key=key, n=200, guidance=1.0, **cheap)
    assert full.mean_velocity_error < 1e-20 and abs(full.excess_loss) < 1e-12
    r1 = full.conditional
    assert r1.weight == 1.0 and r1.n == 200 and r1.accuracy.shape == (3,)
    summary = full.summary()["conditional"]
    assert summary["mean_accuracy"] == r1.mean_accuracy and "accuracy" not in summary
    assert json.loads(json.dumps(full.to_dict()))["conditional"]["accuracy"] == list(r1.accuracy)
    assert np.all(r1.velocity_error < 1e-20) and np.all(r1.velocity_scale > 1.0)
    acc_z = off(r1.accuracy, r1.bayes_accuracy, r1.accuracy_stderr, r1.bayes_accuracy_stderr)
    ce_z = off(r1.cross_entropy, r1.entropy, r1.cross_entropy_stderr, r1.entropy_stderr)
    assert np.all(acc_z < 4) and np.all(ce_z < 4), (acc_z, ce_z)
    r3 = report(field, 3.0)
    assert np.all(r3.velocity_error > 1.0)
    acc_z = off(r3.accuracy, r3.bayes_accuracy, r3.accuracy_stderr, r3.bayes_accuracy_stderr)
    ce_z = off(r3.cross_entropy, r3.entropy, r3.cross_entropy_stderr, r3.entropy_stderr)
    assert acc_z[1] > 4 and ce_z[1] > 4 and r3.accuracy[1] > r1.accuracy[1]
    r0 = report(field, 0.0)  # unconditional: the classes are lost
    assert r0.mean_accuracy < r1.mean_accuracy - 0.3 and r0.mean_cross_entropy_gap > 1.0


def test_guided_sampler_and_conditional_cfm(problem):
    """sample.guided at w = 0 / 1 is the unconditional / conditional exact field (to 1e-12);
    losses.cfm with labels: the labels arrive aligned with their pairs (a predictor of the class
    mean E[X1 | y] scores lower at the true labels than at shifted ones, the control), label
    dropout with p_uncond = 1 feeds only the null class; the conditional MLP responds to y."""
    _, c = problem
    s = schedules.linear()
    field = cond.velocity_field(c, s)
    x = jax.random.normal(jax.random.PRNGKey(4), (6, 2))
    y = jnp.array([0, 1, 2, 0, 1, 2])
    both = field(0.4, jnp.concatenate([x, x]), jnp.concatenate([y, jnp.full(6, 3)]))
    np.testing.assert_allclose(both[6:], exact.velocity(c, s, 0.4, x), atol=1e-12)  # null class
    for w, ref in ((0.0, both[6:]), (1.0, both[:6])):
        np.testing.assert_allclose(fmjax.sample.guided(field, y, w)(0.4, x), ref, atol=1e-12)
    seen = []
    target = c.target()
    means = jnp.stack([cond.given(c, k).target().mean() for k in range(3)] + [target.mean()])

    def apply(params, t, xt, labels):  # predicts E[X1 | y] of the label it is given (+ params)
        return means[jnp.where(labels < 3, (labels + params) % 3, labels)]

    pairs = cond.labelled_pairs(c)
    loss = jax.jit(fmjax.losses.cfm(apply, pairs, s, 256, target="x1", num_classes=3))
    k = jax.random.PRNGKey(5)
    assert float(loss(0, k)) < float(loss(1, k)) - 1.0
    dropped = fmjax.losses.cfm(
        lambda p, t, xt, labels: seen.append(labels) or xt, pairs, s, 8, num_classes=3, p_uncond=1.0
    )
    dropped(0, k)
    assert np.all(np.asarray(seen[-1]) == 3)
    mlp = fmjax.models.MLP(dim=2, width=16, depth=2, num_classes=3)

    @jax.jit
    def responses(k):
        params = mlp.init(k, 0.5, x)
        return jnp.stack([mlp.apply(params, 0.5, x, jnp.full(6, label)) for label in range(4)])

    outs = responses(k)  # (4 labels: 3 classes and the null, 6, 2)
    gaps = jnp.max(jnp.abs(outs[:, None] - outs[None]), axis=(2, 3)) + jnp.eye(4)
    assert float(jnp.min(gaps)) > 1e-3


def test_conditional_marginal_fm_floor_and_ot_pairs(problem):
    """losses.marginal_fm with labels: the exact conditional field as the model has loss 0
    (float64 rounding, < 1e-20) with label dropout (the null class: the unconditional target);
    the unconditional field as the model (control) has a positive loss. The dropout rate is
    honoured (0.3 within 4 sd of n = 256 draws; none at p_uncond = 0). The conditional floor
    equals the conditional CFM loss of the exact conditional field on the same key (to 1e-12);
    the unconditional field's loss is above it (control). ot_pairs (exact OT) re-pairs
    labelled pairs within their classes only (each x1 keeps its class, a permutation per
    class); the control, the optimal pairing of the same points without labels (scipy), mixes
    classes."""
    _, c = problem
    s = schedules.linear()
    field = cond.velocity_field(exact.prepare(c), s)
    seen = []

    def exact_model(p, t, x, y):
        seen.append(y)
        return field(t, x, y)

    k = jax.random.PRNGKey(6)
    kw = dict(num_classes=3, p_uncond=0.3)
    assert float(fmjax.losses.marginal_fm(exact_model, c, s, 256, **kw)(None, k)) < 1e-20
    assert np.mean(np.asarray(seen[-1]) == 3) == pytest.approx(0.3, abs=4 * np.sqrt(0.21 / 256))
    uncond = fmjax.losses.marginal_fm(
        lambda p, t, x, y: exact.velocity(c, s, t, x), c, s, 256, **kw
    )
    assert float(uncond(None, k)) > 0.1
    fmjax.losses.marginal_fm(exact_model, c, s, 256, num_classes=3)(None, k)
    assert not np.any(np.asarray(seen[-1]) == 3)
    floor = fmjax.losses.loss_floor(c, s, 256, key=k, **kw)
    pairs = cond.labelled_pairs(c)
    cfm = fmjax.losses.cfm(lambda p, t, x, y: field(t, x, y), pairs, s, 256, **kw)(None, k)
    np.testing.assert_allclose(floor.mean, cfm, rtol=1e-12)
    cfm_uncond = fmjax.losses.cfm(lambda p, t, x, y: field(t, x), pairs, s, 256, **kw)(None, k)
    assert float(cfm_uncond) > float(floor.mean) + 0.1  # control: the labels inform
    pytest.importorskip("ott")
    x0, x1, y = pairs(k, 48)
    ox0, ox1, oy = fmjax.losses.ot_pairs(pairs)(k, 48)
    np.testing.assert_array_equal(ox0, x0)
    np.testing.assert_array_equal(oy, y)
    for cls in range(3):  # the class's x1 permuted among its own pairs
        m = np.asarray(y) == cls
        np.testing.assert_array_equal(np.sort(ox1[m], 0), np.sort(x1[m], 0))
    from scipy.optimize import linear_sum_assignment

    cost = np.sum((np.asarray(x0)[:, None] - np.asarray(x1)[None]) ** 2, -1)
    _, free = linear_sum_assignment(cost)  # control: the optimal pairing without labels
    assert np.any(np.asarray(y)[free] != np.asarray(y))  # mixes classes


def test_ot_couplings_carry_labels(problem):
    """mixture_ot (and the Schrodinger bridges, Gaussian OT) from a labelled target label each
    pair (i, j) with target component j's class: the class-y target marginal, log p_1(x | y) by
    fmjax.conditional, equals the log-density of the target's class-y sub-mixture to 1e-10
    (float64), the class posterior at t = 1 is Bayes' pi_y p_1(x | y) / p_1(x), and the null
    class gives the unconditional velocity. Control: the same coupling with its labels rolled by
    one class is far off."""
    p1, _ = problem
    covs = np.stack([0.5 * np.eye(2), 0.8 * np.eye(2)])
    p0 = fmjax.GaussianMixture(np.array([0.4, 0.6]), np.array([[-1.0, 0.0], [1.0, 0.5]]), covs)
    ot = fmjax.couplings.mixture_ot(p0, p1).coupling
    assert ot.n_components > p1.n_components and ot.n_classes == 3  # the plan splits mass
    assert fmjax.couplings.schrodinger_bridge(p0, p1, 0.5).coupling.labels == ot.labels
    x = 2.0 * jax.random.normal(jax.random.PRNGKey(8), (16, 2))
    lin = schedules.linear()
    logp = []
    for y in range(3):
        m = LABELS == y
        sub = fmjax.GaussianMixture(p1.weights[m] / p1.weights[m].sum(), p1.means[m], p1.covs[m])
        logp.append(cond.log_prob(ot, lin, 1.0, x, y))
        np.testing.assert_allclose(logp[-1], sub.log_prob(x), rtol=0, atol=1e-10)
        if y == 0:
            sub0 = sub
    joint = np.log(np.asarray(cond.class_weights(ot)))[:, None] + np.stack(logp)  # (C, n)
    post = cond.class_posterior(ot, lin, 1.0, x)
    np.testing.assert_allclose(post, jax.nn.softmax(joint, axis=0).T, atol=1e-10)
    np.testing.assert_allclose(
        cond.velocity(ot, lin, 0.5, x, 3), exact.velocity(ot, lin, 0.5, x), atol=1e-12
    )
    g0 = fmjax.GaussianMixture(jnp.ones(1), p0.means[:1], p0.covs[:1])
    g1 = fmjax.GaussianMixture(jnp.ones(1), p1.means[3:4], p1.covs[3:4], labels=[2])
    assert fmjax.couplings.gaussian_ot(g0, g1).coupling.labels == (2,)
    assert fmjax.couplings.gaussian_entropic_ot(g0, g1, 0.5).coupling.labels == (2,)
    assert fmjax.couplings.schrodinger_bridge(g0, g1, 0.5).coupling.labels == (2,)
    rolled = fmjax.JointGaussianMixture._from_leaves(
        ot.weights, ot.means, ot.covs, ot.structure, tuple((v + 1) % 3 for v in ot.labels)
    )
    assert np.max(np.abs(cond.log_prob(rolled, lin, 1.0, x, 0) - sub0.log_prob(x))) > 0.1


def test_digits_gmm_labelled():
    """One Gaussian per digit (the cheap setting): labels 0-9, weights = class frequencies, and
    the exact Bayes classifier of the labelled mixture classifies the real digits (> 0.9;
    control: the same mixture with its labels rolled by one scores < 0.2)."""
    pytest.importorskip("sklearn")
    g = fmjax.problems.digits_gmm_labelled(1, dtype=jnp.float32)
    assert g.labels == tuple(range(10)) and g.dim == 64
    y = np.asarray(fmjax.data.digits_labels())
    np.testing.assert_allclose(g.weights, np.bincount(y) / y.size, atol=1e-6)
    post = np.asarray(g.responsibilities(fmjax.data.digits(flat=True)))  # component k = class k
    assert np.mean(post.argmax(-1) == y) > 0.9
    assert np.mean(np.roll(post, 1, axis=-1).argmax(-1) == y) < 0.2


def test_bad_inputs_are_named(problem):
    _, c = problem
    s = schedules.linear()
    x = jnp.zeros((2, 2))
    plain = fmjax.independent_coupling(fmjax.standard_normal(2), fmjax.standard_normal(2))
    with pytest.raises(ValueError, match="conditional.velocity: `coupling` must be labelled"):
        cond.velocity(plain, s, 0.5, x, 0)
    with pytest.raises(ValueError, match=r"conditional.velocity: `y` must be in 0..3"):
        cond.velocity(c, s, 0.5, x, 4)
    with pytest.raises(TypeError, match="conditional.velocity: `y` must be an integer"):
        cond.velocity(c, s, 0.5, x, 1.0)
    with pytest.raises(ValueError, match="sample.guided: `null` must be given"):
        fmjax.sample.guided(lambda t, x, y: x, jnp.zeros(2, int))
    noisy = s.with_noise(schedules.brownian())
    with pytest.raises(ValueError, match="convert.change_schedule: `target` must be a schedule"):
        fmjax.convert.change_schedule(lambda t, x: x, s, noisy)
    labelled = fmjax.problems.Problem("labelled", c, s, "")
    with pytest.raises(ValueError, match="evaluation.evaluate: `guidance` must be None for"):
        fmjax.evaluate(cond.velocity_field(c, s), "gmm_2d", key=jax.random.key(0), guidance=1.0)
    with pytest.raises(TypeError, match="`velocity` must be a conditional field"):
        fmjax.evaluate(lambda t, x: x, labelled, key=jax.random.key(0), guidance=1.0)
    with pytest.raises(ValueError, match="evaluation.evaluate: `null` must be None without"):
        fmjax.evaluate(lambda t, x: x, labelled, key=jax.random.key(0), null=3)
    with pytest.raises(ValueError, match="losses.marginal_fm: `coupling` must be labelled"):
        fmjax.losses.marginal_fm(lambda p, t, x, y: x, plain, s, 8, num_classes=1)
    with pytest.raises(ValueError, match="losses.loss_floor: `num_classes` must be the coupl"):
        fmjax.losses.loss_floor(c, s, 8, key=jax.random.key(0), num_classes=4)
    with pytest.raises(ValueError, match="losses.cfm: `p_uncond` must be in"):
        fmjax.losses.cfm(
            lambda p, t, x, y: x, cond.labelled_pairs(c), s, 8, num_classes=3, p_uncond=1.5
        )
