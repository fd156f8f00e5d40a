"""The bad-input table: every bad input to the public API gets a clear error of the right type
naming the argument, or a checked correct result (issues 14 and 23).

Each case is one bad input to one entry point (wrong shape, dtype, complex, NaN, non-PD
covariance, t outside [0, 1], mixed float32 / float64 under x64, a callable that turns NaN, ...),
with the exception type and the argument a good error names and, where accepting the input is
right, a check of the result. Errors are classified by type and by the ``.arg`` every fmjax
argument error carries (``fmjax._checks.named_error``), never by their message:

- ``named``: the expected exception type, raised by fmjax, naming one of the case's arguments;
- ``correct``: no error and the result passes the case's check;
- ``misleading``: fmjax's error, but of another type or naming another argument;
- ``silent-wrong``: no error, and no check or a failed check (NaN, a wrong value);
- ``crash``: an error raised inside jax / flax / diffrax / numpy without fmjax's error;
- ``hang``: any outcome that took longer than ``SLOW`` seconds.

The table shows 0 misleading, 0 silent-wrong, 0 crash and 0 hang (~35 s CPU: it compiles
fits, solves and likelihoods). ``python -m tests.test_bad_inputs [-v] [--only SUBSTRING]`` prints
the counts.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmjax
from fmjax import data, exact, likelihood, losses, metrics, models, sample, schedules

OUTCOMES = ("named", "correct", "misleading", "silent-wrong", "crash", "hang")
GOOD = ("named", "correct")
SLOW = 30.0  # seconds: a case that takes longer to answer is a hang


class Case(NamedTuple):
    id: str
    thunk: Callable[[], Any]
    args: tuple[str | None, ...]  # arguments a good error may name (None: no single argument)
    check: Callable[[Any], bool] | None = None  # for inputs that may rightly be accepted
    error: type[Exception] = ValueError  # the type a good error has
    x64: bool = False  # run with jax_enable_x64


CASES: list[Case] = []


def case(id_: str, thunk, args, check=None, *, error=ValueError, x64=False) -> None:
    args = (args,) if isinstance(args, str) or args is None else tuple(args)
    CASES.append(Case(id_, thunk, args, check, error, x64))


# ----------------------------------------------------------------------------- fixtures

KEY = jax.random.key(0)
EYE = np.eye(2)
W2 = np.array([0.5, 0.5])
M2 = np.array([[-1.0, 0.0], [1.0, 0.0]])
C2 = np.stack([EYE, EYE])
GMM = fmjax.GaussianMixture(W2, M2, C2)
GMM3 = fmjax.GaussianMixture(np.array([1.0]), np.zeros((1, 3)), np.eye(3)[None])
COUPLING = fmjax.independent_coupling(fmjax.standard_normal(2), GMM)
LIN = schedules.linear()
X = np.array([[0.1, -0.2], [0.5, 0.3], [1.0, -1.0], [0.0, 0.0]], np.float32)
MODEL = models.MLP(dim=2, width=8, depth=1)
PARAMS = models.init(MODEL, key=KEY)


def V(t, x):  # a smooth velocity field
    return -x


def finite(r) -> bool:
    return all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(r))


def close(expected):
    return lambda r: np.allclose(np.asarray(r), np.asarray(expected), rtol=1e-5, atol=1e-6)


def _gmm(w=W2, m=M2, c=C2):
    return fmjax.GaussianMixture(w, m, c)


def _cfm(**kw):
    args = dict(apply_fn=MODEL.apply, sample_pairs=COUPLING.sample, schedule=LIN, batch_size=8)
    args.update(kw)
    return losses.cfm(
        args.pop("apply_fn"),
        args.pop("sample_pairs"),
        args.pop("schedule"),
        args.pop("batch_size"),
        **args,
    )


def _fit(loss=None, params=None, **kw):
    loss = loss or _cfm()
    kw = {"key": KEY, "steps": 2, "progress": False, **kw}
    return fmjax.fit(loss, PARAMS if params is None else params, **kw)


def _singular(cond: float):
    c = np.diag([1.0, 1.0 / cond])
    return fmjax.GaussianMixture(np.array([1.0]), np.zeros((1, 2)), c[None].astype(np.float32))


# ----------------------------------------------------------------------------- mixtures

case("gmm: negative weight", lambda: _gmm(w=np.array([1.5, -0.5])), "weights")
case("gmm: NaN weight", lambda: _gmm(w=np.array([np.nan, 0.5])), "weights")
case("gmm: weights not summing to 1", lambda: _gmm(w=np.array([0.5, 0.6])), "weights")
case("gmm: 2-D weights", lambda: _gmm(w=W2[None]), "weights")
case("gmm: K of means != K of weights", lambda: _gmm(m=np.zeros((3, 2))), ("means", "weights"))
case("gmm: asymmetric covariance", lambda: _gmm(c=np.stack([EYE, [[1, 0.5], [0, 1]]])), "covs")
case("gmm: indefinite covariance", lambda: _gmm(c=np.stack([EYE, np.diag([1, -1])])), "covs")
case("gmm: covs of shape (K, d)", lambda: _gmm(c=np.ones((2, 2))), "covs")
case("gmm: complex means", lambda: _gmm(m=M2 + 1j), "means", error=TypeError)
case("gmm: complex covs", lambda: _gmm(c=C2 + 0j), "covs", error=TypeError)
case("gmm: d = 0", lambda: _gmm(m=np.zeros((2, 0)), c=np.zeros((2, 0, 0))), ("means", "covs"))
case(
    "gmm: float16",
    lambda: _gmm(W2.astype(np.float16), M2.astype(np.float16), C2.astype(np.float16)),
    ("weights", "means", "covs", "dtype"),
    error=TypeError,
)
case("gmm: string weights", lambda: _gmm(w="uniform"), "weights", error=TypeError)
case("gmm: None means", lambda: _gmm(m=None), "means", error=TypeError)
case("gmm: NaN mean", lambda: _gmm(m=np.array([[np.nan, 0], [1, 0]])), "means")
case("gmm: inf covariance", lambda: _gmm(c=np.stack([EYE, np.diag([np.inf, 1])])), "covs")
case(
    "gmm: int arrays (accepted)",
    lambda: fmjax.GaussianMixture(
        np.array([1]), np.zeros((1, 2), int), np.eye(2, dtype=int)[None]
    ).log_prob(np.zeros(2)),
    (),
    close(-np.log(2 * np.pi)),
)
case(
    "gmm: lists (accepted)",
    lambda: fmjax.GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 0.0], [0.0, 1.0]]]).log_prob(
        np.zeros(2)
    ),
    (),
    close(-np.log(2 * np.pi)),
)
case("gmm: cond 1e8 in float32", lambda: _singular(1e8), "covs")
case("gmm.sample: n = -1", lambda: GMM.sample(KEY, -1), "n")
case("gmm.sample: n = 2.5", lambda: GMM.sample(KEY, 2.5), "n", error=TypeError)
case("gmm.sample: int seed for key", lambda: GMM.sample(0, 3), "key", error=TypeError)
case("gmm.log_prob: x of another d", lambda: GMM.log_prob(np.zeros((4, 3))), "x")
case("gmm.log_prob: complex x", lambda: GMM.log_prob(X + 1j), "x", error=TypeError)
case(
    "joint: odd dimension",
    lambda: fmjax.JointGaussianMixture(np.array([1.0]), np.zeros((1, 3)), np.eye(3)[None]),
    ("means", "covs"),
)
case(
    "independent_coupling: p0 d=3, p1 d=2",
    lambda: fmjax.independent_coupling(GMM3, GMM),
    ("p0", "p1"),
)
case(
    "independent_coupling: string p0",
    lambda: fmjax.independent_coupling("gmm", GMM),
    "p0",
    error=TypeError,
)
case("standard_normal: dim = 0", lambda: fmjax.standard_normal(0), "dim")
case("standard_normal: dim = 2.5", lambda: fmjax.standard_normal(2.5), "dim", error=TypeError)
case(
    "random_gaussian_mixture: 0 components",
    lambda: fmjax.random_gaussian_mixture(KEY, 0, 2),
    "n_components",
)

# ----------------------------------------------------------------------------- schedules

case("vp: beta_min < 0", lambda: schedules.vp(beta_min=-1.0), "beta_min")
case(
    "vp: beta_min > beta_max",
    lambda: schedules.vp(beta_min=30.0, beta_max=20.0),
    ("beta_min", "beta_max"),
)
case("polynomial: n = 0", lambda: schedules.polynomial(0.0), "n")
case("polynomial: n = -1", lambda: schedules.polynomial(-1.0), "n")
case("custom: a = b = 0", lambda: schedules.custom(lambda t: 0 * t, lambda t: 0 * t), ("a", "b"))
case(
    "custom: a = b = 0 at t = 0.5 only",
    lambda: schedules.custom(
        lambda t: t * (1 - 2 * t) ** 2 * 4 + 0 * t, lambda t: (1 - t) * (1 - 2 * t) ** 2 * 4
    ),
    ("a", "b"),
)
case("custom: a is a string", lambda: schedules.custom("t", lambda t: 1 - t), "a", error=TypeError)
case(
    "custom: interval (1, 0)",
    lambda: schedules.custom(lambda t: t, lambda t: 1 - t, interval=(1.0, 0.0)),
    "interval",
)
case("custom: a returns NaN", lambda: schedules.custom(lambda t: jnp.nan * t, lambda t: 1 - t), "a")
case("sigma_min_schedule: -0.1", lambda: schedules.sigma_min_schedule(-0.1), "sigma_min")
case("sigma_min_schedule: 1.5", lambda: schedules.sigma_min_schedule(1.5), "sigma_min")
case("brownian: sigma = -1", lambda: schedules.brownian(-1.0), "sigma")
case("schedule(t): complex t", lambda: LIN(0.5 + 1j), "t", error=TypeError)
case("schedule(t): string t", lambda: LIN("0.5"), "t", error=TypeError)

# ----------------------------------------------------------------------------- exact

case("exact.velocity: t = 1.5", lambda: exact.velocity(COUPLING, LIN, 1.5, X), "t")
case("exact.velocity: t = -0.1", lambda: exact.velocity(COUPLING, LIN, -0.1, X), "t")
case("exact.velocity: t = NaN", lambda: exact.velocity(COUPLING, LIN, np.nan, X), "t")
case(
    "exact.velocity: x of another d",
    lambda: exact.velocity(COUPLING, LIN, 0.5, np.zeros((4, 3))),
    "x",
)
case(
    "exact.velocity: complex x",
    lambda: exact.velocity(COUPLING, LIN, 0.5, X + 1j),
    "x",
    error=TypeError,
)
case(
    "exact.velocity: complex t",
    lambda: exact.velocity(COUPLING, LIN, 0.5 + 1j, X),
    "t",
    error=TypeError,
)
case(
    "exact.velocity: float16 x",
    lambda: exact.velocity(COUPLING, LIN, 0.5, X.astype(np.float16)),
    "x",
    error=TypeError,
)
case(
    "exact.velocity: t (3,) vs x (4, 2)",
    lambda: exact.velocity(COUPLING, LIN, np.array([0.1, 0.2, 0.3]), X),
    ("t", "x"),
)
case(
    "exact.velocity: a GaussianMixture for the coupling",
    lambda: exact.velocity(GMM, LIN, 0.5, X),
    "coupling",
    error=TypeError,
)
case(
    "exact.velocity: schedule 'linear'",
    lambda: exact.velocity(COUPLING, "linear", 0.5, X),
    "schedule",
    error=TypeError,
)
case(
    "exact.velocity: precision 'bogus'",
    lambda: exact.velocity(COUPLING, LIN, 0.5, X, precision="bogus"),
    "precision",
)
case("exact.velocity: vp at t = 1", lambda: exact.velocity(COUPLING, schedules.vp(), 1.0, X), "t")
case(
    "exact.velocity: int x (accepted)",
    lambda: exact.velocity(COUPLING, LIN, 0.5, np.zeros((1, 2), int)),
    (),
    lambda r: finite(r) and r.shape == (1, 2),
)
case(
    "exact.velocity: 1-D x (one point, accepted)",
    lambda: exact.velocity(COUPLING, LIN, 0.5, X[0]),
    (),
    lambda r: close(exact.velocity(COUPLING, LIN, 0.5, X[:1])[0])(r),
)
case("exact.log_prob: t = 2", lambda: exact.log_prob(COUPLING, LIN, 2.0, X), "t")
case("exact.score: string x", lambda: exact.score(COUPLING, LIN, 0.5, "x"), "x", error=TypeError)
case(
    "exact.divergence: x of rank 3 with wrong d",
    lambda: exact.divergence(COUPLING, LIN, 0.5, np.zeros((2, 2, 5))),
    "x",
)
case("exact.responsibilities: t = -1", lambda: exact.responsibilities(COUPLING, LIN, -1.0, X), "t")
case(
    "exact.evaluate: quantity 'bogus'",
    lambda: exact.evaluate(COUPLING, LIN, 0.5, X, ("bogus",)),
    "quantities",
)
case(
    "exact.evaluate: quantities as one string",
    lambda: exact.evaluate(COUPLING, LIN, 0.5, X, "velocity"),
    "quantities",
    error=TypeError,
)
case("exact.marginal: t = 2", lambda: exact.marginal(COUPLING, LIN, 2.0), "t")
case(
    "exact.marginal: t of shape (2,)",
    lambda: exact.marginal(COUPLING, LIN, np.array([0.1, 0.2])),
    "t",
)
case(
    "exact.velocity_field: t = 1.5 on call",
    lambda: exact.velocity_field(COUPLING, LIN)(1.5, X),
    "t",
)
case("exact.prepare: a string", lambda: exact.prepare("coupling"), "coupling", error=TypeError)

# ----------------------------------------------------------------------------- losses

case("cfm: apply_fn not callable", lambda: _cfm(apply_fn="mlp"), "apply_fn", error=TypeError)
case("cfm: batch_size = 0", lambda: _cfm(batch_size=0), "batch_size")
case("cfm: batch_size = 2.5", lambda: _cfm(batch_size=2.5), "batch_size", error=TypeError)
case("cfm: target 'bogus'", lambda: _cfm(target="bogus"), "target")
case("cfm: reduction 'bogus'", lambda: _cfm(reduction="bogus"), "reduction")
case("cfm: time_sampler 'bogus'", lambda: _cfm(time_sampler="bogus"), "time_sampler")
case("cfm: schedule 'linear'", lambda: _cfm(schedule="linear"), "schedule", error=TypeError)
case("cfm: sigma_min = -1", lambda: _cfm(schedule=None, sigma_min=-1.0), "sigma_min")
case(
    "cfm: sample_pairs of another d",
    lambda: _cfm(sample_pairs=lambda k, n: (jnp.zeros((n, 3)), jnp.zeros((n, 3))))(PARAMS, KEY),
    ("sample_pairs", "apply_fn", "x"),
)
case(
    "cfm: sample_pairs returning one array",
    lambda: _cfm(sample_pairs=lambda k, n: jnp.zeros((n, 2)))(PARAMS, KEY),
    "sample_pairs",
    error=TypeError,
)
case(
    "marginal_fm: a GaussianMixture",
    lambda: losses.marginal_fm(MODEL.apply, GMM, LIN, 8),
    "coupling",
    error=TypeError,
)
case("loss_floor: n = 0", lambda: losses.loss_floor(COUPLING, LIN, 0, key=KEY), "n")
case(
    "loss_floor: key None",
    lambda: losses.loss_floor(COUPLING, LIN, 10, key=None),
    "key",
    error=TypeError,
)
case("logit_normal_time: std = 0", lambda: losses.logit_normal_time(std=0.0), "std")
case("uniform_eps_time: eps = 0.6", lambda: losses.uniform_eps_time(0.6), "eps")

# ----------------------------------------------------------------------------- fit

case("fit: steps = -1", lambda: _fit(steps=-1), "steps")
case("fit: steps = 2.5", lambda: _fit(steps=2.5), "steps", error=TypeError)
case("fit: key = 0", lambda: _fit(key=0), "key", error=TypeError)
case("fit: learning_rate = -1", lambda: _fit(learning_rate=-1.0), "learning_rate")
case("fit: loss returning a vector", lambda: _fit(loss=lambda p, k: jnp.zeros(3)), "loss_fn")
case("fit: params = {}", lambda: _fit(params={}), "params")
case("fit: steps_per_call = 0", lambda: _fit(steps_per_call=0), "steps_per_call")
case("fit: ema_decay = 1.5", lambda: _fit(ema_decay=1.5), "ema_decay")
case(
    "fit: checkpoint_every = 0",
    lambda: _fit(checkpoint_dir="/tmp/fmjax-bad-inputs", checkpoint_every=0),
    "checkpoint_every",
)
case("fit: loss_fn not callable", lambda: _fit(loss="cfm"), "loss_fn", error=TypeError)
case("fit: checkpoint_dir is a file", lambda: _fit(checkpoint_dir=__file__), "checkpoint_dir")
case("fit: stop not callable", lambda: _fit(stop=True), "stop", error=TypeError)
case("fit: resume 'yes'", lambda: _fit(resume="yes"), "resume")

# ----------------------------------------------------------------------------- sample

case("ode: complex x0", lambda: sample.ode(V, X + 1j, t0=0.0, t1=1.0), "x0", error=TypeError)
case(
    "ode: float16 x0",
    lambda: sample.ode(V, X.astype(np.float16), t0=0.0, t1=1.0),
    "x0",
    error=TypeError,
)
case("ode: solver 'bogus'", lambda: sample.ode(V, X, solver="bogus", t0=0.0, t1=1.0), "solver")
case("ode: steps = 0", lambda: sample.ode(V, X, steps=0, t0=0.0, t1=1.0), "steps")
case("ode: rtol = -1", lambda: sample.ode(V, X, rtol=-1.0, t0=0.0, t1=1.0), "rtol")
case(
    "ode: velocity returning another d",
    lambda: sample.ode(lambda t, x: jnp.zeros((x.shape[0], 3)), X, t0=0.0, t1=1.0),
    "velocity",
)
case(
    "ode: velocity not callable",
    lambda: sample.ode("v", X, t0=0.0, t1=1.0),
    "velocity",
    error=TypeError,
)
case(
    "ode: exact VP field up to t = 1 (NaN there)",
    lambda: sample.ode(exact.velocity_field(COUPLING, schedules.vp()), X, t0=0.0, t1=1.0),
    ("velocity", "t1", "schedule"),
)
case(
    "ode: 1-D x0 (one point, accepted)",
    lambda: sample.ode(V, X[0], t0=0.0, t1=1.0).x,
    (),
    close(X[0] * np.exp(-1.0)),
)
case(
    "ode: save_ts outside [t0, t1]",
    lambda: sample.ode(V, X, t0=0.0, t1=1.0, save_ts=np.array([0.5, 2.0])),
    "save_ts",
)
case("sde: steps = 1", lambda: sample.sde(V, LIN, X, key=KEY, steps=1), "steps")
case("sde: diffusion = -1", lambda: sample.sde(V, LIN, X, key=KEY, diffusion=-1.0), "diffusion")
case("sde: key None", lambda: sample.sde(V, LIN, X, key=None), "key", error=TypeError)
case("sde: solver 'bogus'", lambda: sample.sde(V, LIN, X, key=KEY, solver="bogus"), "solver")
case("sde: complex x0", lambda: sample.sde(V, LIN, X + 1j, key=KEY), "x0", error=TypeError)
case("draw_source: n = 0", lambda: sample.draw_source(KEY, 0, 2), "n")
case(
    "draw_source: float16",
    lambda: sample.draw_source(KEY, 4, 2, dtype=jnp.float16),
    "dtype",
    error=TypeError,
)

# ----------------------------------------------------------------------------- likelihood

case(
    "log_likelihood: complex x",
    lambda: likelihood.log_likelihood(V, X + 1j, t=1.0),
    "x",
    error=TypeError,
)
case(
    "log_likelihood: source GMM of another d",
    lambda: likelihood.log_likelihood(V, X, t=1.0, source_log_prob=GMM3),
    "source_log_prob",
)
case(
    "log_likelihood: source returning (n, 2)",
    lambda: likelihood.log_likelihood(V, X, t=1.0, source_log_prob=lambda x: x),
    "source_log_prob",
)
case(
    "log_likelihood: method 'bogus'",
    lambda: likelihood.log_likelihood(V, X, t=1.0, method="bogus"),
    "method",
)
case(
    "log_likelihood: hutchinson without key",
    lambda: likelihood.log_likelihood(V, X, t=1.0, method="hutchinson"),
    "key",
    error=TypeError,
)
case(
    "log_likelihood: n_probes = 0",
    lambda: likelihood.log_likelihood(V, X, t=1.0, method="hutchinson", key=KEY, n_probes=0),
    "n_probes",
)
case(
    "sample_and_log_prob: source of another d",
    lambda: likelihood.sample_and_log_prob(V, X, t=1.0, source_log_prob=GMM3),
    "source_log_prob",
)
case(
    "standard_normal_log_prob: complex",
    lambda: likelihood.standard_normal_log_prob(X + 1j),
    "x",
    error=TypeError,
)

# ----------------------------------------------------------------------------- metrics

case("energy_distance: d 2 vs 3", lambda: metrics.energy_distance(X, np.zeros((4, 3))), "y")
case("energy_distance: 1-D x", lambda: metrics.energy_distance(X[0], X), "x")
case("energy_distance: complex x", lambda: metrics.energy_distance(X + 1j, X), "x", error=TypeError)
case("mmd: bandwidth 0", lambda: metrics.mmd(X, X, bandwidths=(0.0,)), "bandwidths")
case(
    "gaussian_w2: indefinite cov1",
    lambda: metrics.gaussian_w2(np.zeros(2), np.diag([1, -1]), np.zeros(2), EYE),
    "cov1",
)
case(
    "gaussian_w2: mean2 of another d",
    lambda: metrics.gaussian_w2(np.zeros(2), EYE, np.zeros(3), EYE),
    "mean2",
)
case(
    "velocity_error: ts outside [0, 1]",
    lambda: metrics.velocity_error(V, COUPLING, LIN, np.array([0.5, 1.5]), 10, key=KEY),
    "ts",
)
case(
    "velocity_error: n = 0",
    lambda: metrics.velocity_error(V, COUPLING, LIN, np.array([0.5]), 0, key=KEY),
    "n",
)
case(
    "nll: target_log_prob not callable",
    lambda: metrics.nll("p", X),
    "target_log_prob",
    error=TypeError,
)
case(
    "sliced_wasserstein: n_projections = 0",
    lambda: metrics.sliced_wasserstein(X, X, key=KEY, n_projections=0),
    "n_projections",
)
case(
    "nfe_to_accuracy: no step counts",
    lambda: metrics.nfe_to_accuracy(lambda n: X, X, [], 0.1),
    "step_counts",
)

# ----------------------------------------------------------------------------- models

case("models.init: key None", lambda: models.init(MODEL, key=None), "key", error=TypeError)
case("models.init: a string model", lambda: models.init("mlp", key=KEY), "model", error=TypeError)
case("MLP: dim = 0", lambda: models.init(models.MLP(dim=0), key=KEY), "dim")
case(
    "MLP: activation 'bogus'",
    lambda: models.init(models.MLP(dim=2, activation="bogus"), key=KEY),
    "activation",
)
case(
    "MLP: time_embedding 'bogus'",
    lambda: models.init(models.MLP(dim=2, time_embedding="bogus"), key=KEY),
    "time_embedding",
)
case("MLP: width = 0", lambda: models.init(models.MLP(dim=2, width=0), key=KEY), "width")
case("MLP apply: x of another d", lambda: MODEL.apply(PARAMS, 0.5, np.zeros((4, 3))), "x")

# ----------------------------------------------------------------------------- data

case(
    "checkerboard: n = 0 (empty sample, accepted)",
    lambda: data.checkerboard(KEY, 0),
    "n",
    lambda r: r.shape == (0, 2),
)
case("checkerboard: int seed for key", lambda: data.checkerboard(0, 10), "key", error=TypeError)
case("from_array: 1-D array", lambda: data.from_array(np.zeros(5)), "data")
case("from_array: no rows", lambda: data.from_array(np.zeros((0, 2))), "data")
case("from_array: complex", lambda: data.from_array(np.zeros((5, 2)) + 1j), "data", error=TypeError)
case("gaussian_source: dim = 0", lambda: data.gaussian_source(0), "dim")
case("gaussian_source: std = -1", lambda: data.gaussian_source(2, std=-1.0), "std")
case(
    "independent_pairs: a string sampler",
    lambda: data.independent_pairs("n", GMM.sample),
    "sample0",
    error=TypeError,
)
case(
    "coupling_pairs: a GaussianMixture",
    lambda: data.coupling_pairs(GMM),
    "coupling",
    error=TypeError,
)
case("from_mixture: a string", lambda: data.from_mixture("gmm"), "gmm", error=TypeError)


# ----------------------------------------------------------------------------- issue 23
# NaN policy (docs/concepts/errors.md): a non-finite input point gets a NaN result and a
# RuntimeWarning naming the argument; the other points are computed as usual.

XNAN = X.copy()
XNAN[1, 0] = np.nan


def _nan_rows_kept(result, clean, bad=1):
    """Row ``bad`` of ``result`` is NaN and the other rows equal ``clean``'s."""
    r, c = np.asarray(result), np.asarray(clean)
    keep = np.arange(len(r)) != bad
    return bool(np.isnan(r[bad]).all()) and np.allclose(r[keep], c[keep], rtol=1e-5, atol=1e-6)


def _ll(x, **kw):
    return likelihood.log_likelihood(V, x, t=1.0, **kw).log_prob


case(
    "log_likelihood: one NaN row in x (NaN there, the others kept)",
    lambda: _ll(XNAN),
    "x",
    lambda r: _nan_rows_kept(r, _ll(X)),
)
case(
    "sample_and_log_prob: one NaN row in x0 (NaN there, the others kept)",
    lambda: likelihood.sample_and_log_prob(V, XNAN, t=1.0).log_prob,
    "x0",
    lambda r: _nan_rows_kept(r, likelihood.sample_and_log_prob(V, X, t=1.0).log_prob),
)
case(
    "ode: one NaN row in x0 (NaN there, the others kept)",
    lambda: sample.ode(V, XNAN, t0=0.0, t1=1.0).x,
    "x0",
    lambda r: _nan_rows_kept(r, X * np.exp(-1.0)),
)
case(
    "sde: one NaN row in x0 (NaN there, the others kept)",
    lambda: sample.sde(V, LIN, XNAN, key=KEY, steps=8).x,
    "x0",
    lambda r: _nan_rows_kept(r, sample.sde(V, LIN, X, key=KEY, steps=8).x),
)


def _nan_after(t_bad):
    return lambda t, x: jnp.where(jnp.asarray(t)[..., None] > t_bad, jnp.nan, -x)


case(
    "ode: velocity NaN after t = 0.5 (adaptive; was blamed on t1)",
    lambda: sample.ode(_nan_after(0.5), X, t0=0.0, t1=1.0),
    "velocity",
)
case(
    "ode: velocity NaN after t = 0.5 (fixed steps; was blamed on t1)",
    lambda: sample.ode(_nan_after(0.5), X, t0=0.0, t1=1.0, solver="euler", steps=10),
    "velocity",
)
case(
    "log_likelihood: velocity NaN everywhere (was blamed on t1)",
    lambda: likelihood.log_likelihood(_nan_after(-1.0), X, t=1.0),
    "velocity",
)
case(
    "evaluate: a NaN velocity (was '`max_steps` must be large enough')",
    lambda: fmjax.evaluate(
        _nan_after(-1.0), "gmm_2d", key=KEY, n=16, n_times=2, w2=False, likelihood_steps=4
    ),
    "velocity",
)
case(
    "evaluate: a velocity of another dimension",
    lambda: fmjax.evaluate(lambda t, x: -x[..., :2], "two_modes_3d", key=KEY, n=16, w2=False),
    "velocity",
)
case(
    "evaluate: n = 1 (a standard error needs n >= 2)",
    lambda: fmjax.evaluate(V, "gmm_2d", key=KEY, n=1),
    "n",
)
case(
    "loss_floor: n = 1 (a standard error needs n >= 2)",
    lambda: losses.loss_floor(COUPLING, LIN, 1, key=KEY),
    "n",
)
case(
    "sample_checks: 1 sample (a standard error needs n >= 2)",
    lambda: metrics.sample_checks(X[:1], GMM),
    "samples",
)

# Crashes inside libraries, now named.
case(
    "fit: an integer leaf in params",
    lambda: _fit(params=jax.tree.map(lambda a: a.astype(jnp.int32), PARAMS)),
    "params",
    error=TypeError,
)
case(
    "fit: a loss returning an int",
    lambda: _fit(loss=lambda p, k: jnp.asarray(1)),
    "loss_fn",
    error=TypeError,
)
case(
    "ode: t1 = t0 + 1e-8 (one time in float32)",
    lambda: sample.ode(V, X, t0=0.5, t1=0.5 + 1e-8),
    "t1",
)
case(
    "mahalanobis: a 3 x 3 matrix on d = 2 data",
    lambda: losses.mahalanobis(np.eye(3))(jnp.ones((4, 2)), jnp.zeros((4, 2))),
    "matrix",
)
case(
    "mahalanobis: a 3 x 3 matrix in cfm on d = 2 data",
    lambda: _cfm(bregman=losses.mahalanobis(np.eye(3)))(PARAMS, KEY),
    "matrix",
)
case(
    "bregman: a vector-valued potential",
    lambda: losses.bregman(lambda y: y)(jnp.ones((4, 2)), jnp.zeros((4, 2))),
    "potential",
)


def _ill_ot():
    """A valid Gaussian OT coupling, ill-conditioned in float32 (cond 5e4 < 1 / eps)."""
    c0 = np.diag([1.0, 2e-5]).astype(np.float32)
    p0 = fmjax.GaussianMixture(np.ones(1, np.float32), np.zeros((1, 2), np.float32), c0[None])
    ot = fmjax.couplings.gaussian_ot(p0, fmjax.standard_normal(2))
    return fmjax.couplings.check_path(ot.coupling, LIN)


case(
    "check_path: a valid ill-conditioned OT coupling (accepted; was 'particles meet')",
    _ill_ot,
    "coupling",
    lambda r: 0 < r < 1e-4,
)

# Dtypes under jax_enable_x64: float32 inputs are promoted.
case(
    "sde: float32 x0 under x64 (accepted; was 'Must have t0==ts[0]')",
    lambda: sample.sde(V, LIN, X, key=KEY, steps=8).x,
    "x0",
    lambda r: finite(r) and r.dtype == np.float64,
    x64=True,
)
case(
    "ode: float32 x0 under x64 (accepted)",
    lambda: sample.ode(V, X, t0=0.0, t1=1.0).x,
    "x0",
    lambda r: close(X * np.exp(-1.0))(r) and r.dtype == np.float64,
    x64=True,
)


# Validation a construction grid can miss: checked again at the concrete times of a call.


def _bump(t):  # 1 at t = 0.3001 only, 0 on every point of the construction grids
    return jnp.maximum(0.0, 1.0 - jnp.abs(t - 0.3001) / 1e-5)


def _collapsing():  # a = b = 0 at t = 0.3001 only
    return schedules.custom(lambda t: t * (1 - _bump(t)), lambda t: (1 - t) * (1 - _bump(t)))


def _spiky_trig():  # gamma = 2 > 1 at t = 0.3001 only: the trig coefficients are NaN there
    spike = schedules.custom_noise(lambda t: 0.5 * t * (1 - t) + 2.0 * _bump(t))
    return schedules.trig(spike)


case(
    "exact.velocity: custom a = b = 0 at t = 0.3001, off the check grid",
    lambda: exact.velocity(COUPLING, _collapsing(), 0.3001, X),
    "t",
)
case(
    "exact.velocity: custom schedule, a good time (accepted)",
    lambda: exact.velocity(COUPLING, _collapsing(), 0.5, X),
    (),
    lambda r: close(exact.velocity(COUPLING, LIN, 0.5, X))(r),
)
case(
    "ode: t1 = 0.3001, where a custom a = b = 0",
    lambda: sample.ode(V, X, schedule=_collapsing(), t0=0.0, t1=0.3001),
    "t1",
)
case(
    "exact.velocity: trig noise spike above 1 at t = 0.3001, off the check grid",
    lambda: exact.velocity(COUPLING, _spiky_trig(), 0.3001, X),
    "t",
)
case(
    "metrics.velocity_error: ts at a trig noise spike",
    lambda: metrics.velocity_error(V, COUPLING, _spiky_trig(), np.array([0.3001]), 8, key=KEY),
    "ts",
)


def _collapsing_at(t0):  # a = b = 0 at t0 only (width 1e-7)
    def bump(t):
        return jnp.maximum(0.0, 1.0 - jnp.abs(t - t0) / 1e-7)

    return schedules.custom(lambda t: t * (1 - bump(t)), lambda t: (1 - t) * (1 - bump(t)))


case(
    "sde: a = b = 0 at the step time 3/7, off the check grid",
    lambda: sample.sde(V, _collapsing_at(3 / 7), X, key=KEY, steps=7, eps=0.0),
    "schedule",
)
case(
    "gmm: float32 covariance 1e-40 I (below the normal range)",
    lambda: _gmm(c=(1e-40 * C2).astype(np.float32)),
    "covs",
)
case(
    "gmm: float64 covariance 1e-40 I (accepted: normal in float64)",
    lambda: _gmm(c=1e-40 * C2).log_prob(np.zeros(2)),
    "covs",
    lambda r: np.isfinite(np.asarray(r)),
    x64=True,
)


# ----------------------------------------------------------------------------- classify


def classify(c: Case) -> tuple[str, str]:
    """(outcome, detail) of one case."""
    start = time.perf_counter()
    with warnings.catch_warnings(), jax.enable_x64(c.x64):
        warnings.simplefilter("ignore")
        outcome, detail = _classify(c)
    elapsed = time.perf_counter() - start
    if elapsed > SLOW:
        return "hang", f"{elapsed:.0f} s ({outcome}: {detail})"
    return outcome, detail


def _classify(c: Case) -> tuple[str, str]:
    try:
        result = jax.block_until_ready(c.thunk())
    except Exception as e:  # noqa: BLE001 - classifying is the point
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        if not hasattr(e, "arg"):  # not raised by fmjax's checks
            return "crash", msg
        if isinstance(e, c.error) and e.arg in c.args:
            return "named", msg
        return "misleading", f"{msg}  [want {c.error.__name__} naming one of {c.args}]"
    if c.check is not None:
        try:
            ok = bool(c.check(result))
        except Exception as e:  # noqa: BLE001
            ok, result = False, e
        if ok:
            return "correct", "accepted, result checked"
    return "silent-wrong", f"accepted: {str(result)[:200]!s}"


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input_is_answered(case):
    outcome, detail = classify(case)
    assert outcome in GOOD, f"{outcome}: {detail}"


def test_cases_are_distinct():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 149


def test_nan_rows_warn_naming_the_argument():
    """A NaN point of x warns naming `x` and its row; control: finite x does not warn."""
    with pytest.warns(RuntimeWarning, match=r"`x` has 1 point\(s\) .* at \[1\]"):
        _ll(XNAN)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert np.isfinite(np.asarray(_ll(X))).all()


@pytest.mark.parametrize("solver, steps", [("tsit5", None), ("euler", 10)])
def test_velocity_turning_nan_is_blamed_at_its_time(solver, steps):
    """The time in the error brackets where the velocity turns NaN (t > 0.5); control: the
    same velocity turning NaN only after t1 = 0.45 solves."""
    with pytest.raises(ValueError) as info:
        sample.ode(_nan_after(0.5), X, t0=0.0, t1=1.0, solver=solver, steps=steps)
    assert info.value.arg == "velocity"
    m = re.search(
        r"non-finite at (?:a time between )?t = ([\d.]+)(?: and ([\d.]+))?", str(info.value)
    )
    ta = float(m.group(1))
    tb = float(m.group(2) or ta)
    assert 0.5 <= ta <= 0.6 + 1e-6 and tb <= 0.7 + 1e-6, (ta, tb)
    out = sample.ode(_nan_after(0.5), X, t0=0.0, t1=0.45, solver=solver, steps=steps)
    assert np.isfinite(np.asarray(out.x)).all()


def _crash():
    raise ZeroDivisionError("inside a library")


def _wrong_arg():
    raise fmjax._checks.named_error("f", "y", "f: `y` must be ...", ValueError)


@pytest.mark.parametrize(
    "thunk, check, outcome",
    [
        (_crash, None, "crash"),
        (_wrong_arg, None, "misleading"),
        (lambda: fmjax._checks.fail("f", "x", "...", 1, TypeError), None, "misleading"),
        (lambda: jnp.nan, None, "silent-wrong"),
        (lambda: jnp.nan, lambda r: np.isfinite(r), "silent-wrong"),
        (lambda: fmjax._checks.fail("f", "x", "...", 1), None, "named"),
    ],
)
def test_classify_control(thunk, check, outcome):
    """Control: the classifier sees each bad outcome (a case expecting a ValueError naming x)."""
    assert classify(Case("control", thunk, ("x",), check))[0] == outcome


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help="run the cases whose id contains this")
    p.add_argument("-v", "--verbose", action="store_true", help="print every case")
    args = p.parse_args(argv)
    counts = Counter()
    for c in CASES:
        if args.only and args.only not in c.id:
            continue
        outcome, detail = classify(c)
        counts[outcome] += 1
        if args.verbose or outcome not in GOOD:
            print(f"{outcome:13s} {c.id}\n              {detail}", flush=True)
    print(f"\n{sum(counts.values())} bad inputs:")
    for o in OUTCOMES:
        print(f"  {o:13s} {counts.get(o, 0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
