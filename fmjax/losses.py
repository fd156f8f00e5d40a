"""Flow-matching losses as factories returning ``loss_fn(params, key) -> scalar``.

Every loss draws ``batch_size`` pairs (x0, x1) and times t, forms x_t = b_t x0 + a_t x1 and
regresses ``apply_fn(params, t, x_t)`` onto a target. In place of ``apply_fn`` the losses take a
Flax NNX or Equinox module: the loss is then ``loss_fn(model, key)`` and calls ``model(t, x_t)``
(train it with ``fmjax.fit(loss_fn, model, ...)``, which passes the module at its current
parameters and state; the module given to the loss only says which convention to use):

* ``cfm``: the conditional target da x1 + db x0 (or x1, or x0 for prediction targets);
  with ``sigma_min`` the path of Lipman et al. (2023), x_t = (1 - (1 - sigma_min) t) x0 + t x1;
  with ``ot_pairs(sample_pairs)`` as the pair sampler, OT-CFM (Tong et al., Pooladian et al.).
* ``marginal_fm``: the exact marginal target u_t(x_t) (or E[X1 | x_t], E[X0 | x_t]) of a
  Gaussian-mixture coupling, from ``fmjax.exact``: the same gradients in expectation, less noise.
  With ``num_classes`` (as ``cfm``'s, for a labelled coupling) the exact class-conditional
  target u_t(x_t | y) of ``fmjax.conditional``.
* ``loss_floor``: the irreducible part of the CFM loss, E|target - E[target | X_t]|^2, by Monte
  Carlo with the exact conditional expectation; excess loss = loss - floor.

Reduction convention (``reduction``): "sum" (default) is the squared error summed over the d
coordinates and averaged over the batch, E|pred - target|^2; "mean" averages over all elements
(Meta's ``flow_matching`` examples), i.e. "sum" / d.

Times: a time sampler draws on [0, 1] and the losses map its draws onto the schedule's valid
interval ``[t_min, t_max]`` (the identity for schedules valid on all of [0, 1]), so a schedule
singular at an end (``vp``) is never trained where its target is infinite.

Run identity: the loss functions of ``cfm`` and ``marginal_fm`` carry ``loss_fn.structure``, a
dict of what defines them (the model's apply function, the pair sampler or coupling, schedule,
batch size, time sampler, target, reduction, divergence); ``fmjax.fit(checkpoint_dir=...)``
stores it, described by content (array hashes, closure values), in the run's fingerprint and
refuses to resume a checkpoint whose loss differs in any part.

Keys: every loss draws its points with ``fmjax.data.sample_path`` (pairs from ``split(key)[0]``,
times from ``split(key)[1]``, the latent noise z from ``fold_in(key, 0x5EED1)``), so ``cfm``,
``marginal_fm`` and ``loss_floor`` called with one key see the same (t, x0, x1, z, x_t), and so
do the metrics and ``fmjax.evaluate``.

Stochastic interpolants (a schedule with noise, ``schedule.with_noise(...)`` or
``schedules.trig(...)``): x_t = b_t x0 + a_t x1 + gamma_t z with z ~ N(0, I), and the targets

* "velocity": dX_t = db x0 + da x1 + dgamma z, the probability-flow velocity in the mean. Its
  variance is infinite where dgamma is (``brownian`` noise at t = 0, 1: E[dgamma^2] diverges), so
  ``cfm`` and ``loss_floor`` refuse it for such noise; learn "drift" and "score" instead.
* "drift": db x0 + da x1, the gamma = 0 part v (finite for any noise).
* "denoiser": z; the model predicts eta(t, x) = E[z | X_t = x] = -gamma s.
* "score": the denoiser parametrised as eta = -gamma * net, i.e. the loss is D(z, -gamma net)
  (denoising score matching with weight gamma^2); the minimiser net is the score s, finite at the
  ends, and ``convert.drift_to_velocity(schedule, t, x, v, score=net)`` = v - gamma dgamma net is
  the velocity, finite on all of [0, 1] (``dgamma eta`` from a plain denoiser is inf * 0 there).
* "x1", "x0": as without noise.

Bregman losses (``bregman=``): any divergence D(y, y_hat) = F(y) - F(y_hat) - grad F(y_hat) .
(y - y_hat) of a strictly convex F (``bregman(F)``, ``squared()`` (default), ``mahalanobis(M)``,
``exponential(scale)``, ``logsumexp(ridge)``) is minimised by the conditional mean, so CFM and
marginal FM keep the same minimiser and expected gradients and loss = marginal + floor in
expectation. Another callable (y, y_hat) -> (n,) is accepted (e.g. an L1 loss) but loses these.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from fmjax import _checks, conditional, convert, data, exact
from fmjax._typing import ApplyFn, LossFn, Module, PairSampler, TimeSampler
from fmjax.exact import PreparedCoupling
from fmjax.mixtures import JointGaussianMixture
from fmjax.schedules import Schedule, linear, sigma_min_schedule
from fmjax.train.modules import is_module

__all__ = [
    "LossFloor",
    "uniform_time",
    "uniform_eps_time",
    "logit_normal_time",
    "cfm",
    "ot_pairs",
    "marginal_fm",
    "loss_floor",
    "Bregman",
    "bregman",
    "squared",
    "mahalanobis",
    "exponential",
    "logsumexp",
    "TARGETS",
]


class LossFloor(NamedTuple):
    """Result of ``loss_floor``: the Monte Carlo estimate and its standard error.

    Attributes:
        mean: the floor estimate, scalar.
        stderr: its Monte Carlo standard error, scalar (``loss_floor`` requires n >= 2).
    """

    mean: Float[Array, ""]
    stderr: Float[Array, ""]


#: What a model can be trained to predict (module docs); "drift", "denoiser", "score" are for
#: schedules with noise ("drift" equals "velocity" without noise).
TARGETS = ("velocity", "x1", "x0", "drift", "denoiser", "score")
_NOISE_ONLY = ("denoiser", "score")
_REDUCTIONS = ("sum", "mean")


# ----------------------------------------------------------------------------- Bregman divergences


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["params"],
    meta_fields=["name", "potential", "closed_form"],
)
@dataclasses.dataclass(frozen=True)
class Bregman:
    """A divergence ``D(y, y_hat) -> (...)`` over the last axis; the prediction is second.

    A pytree: the arrays of ``params`` (e.g. the Mahalanobis matrix) are leaves, the functions
    static, so it passes through ``jit`` as an argument. Made by ``bregman``, ``squared``,
    ``mahalanobis``, ``exponential``, ``logsumexp``.

    Attributes:
        name: human-readable name.
        potential: F(y, *params) on one vector (d,) -> scalar, or None (``closed_form`` only).
        params: arrays passed to ``potential`` / ``closed_form``.
        closed_form: ``(y, y_hat, *params) -> (...)``, used instead of autodiff when given.
    """

    name: str
    potential: Callable[..., Array] | None
    params: tuple = ()
    closed_form: Callable[..., Array] | None = None

    def F(self, y: Float[ArrayLike, "... d"]) -> Float[Array, "..."]:  # noqa: N802 - math name
        """The potential F at each vector of ``y``, (..., d) -> (...)."""
        y = jnp.asarray(y)
        flat = y.reshape(-1, y.shape[-1])
        return jax.vmap(lambda v: self.potential(v, *self.params))(flat).reshape(y.shape[:-1])

    def __call__(
        self, y: Float[ArrayLike, "... d"], y_hat: Float[ArrayLike, "... d"]
    ) -> Float[Array, "..."]:
        """D_F(y, y_hat) over the last axis, broadcast over the leading ones."""
        y, y_hat = jnp.asarray(y), jnp.asarray(y_hat)
        d = y.shape[-1]
        if self.closed_form is _maha and self.params[0].shape != (d, d):  # shapes: also traced
            what = f"a (d, d) matrix for the data's d = {d}"
            _checks.fail("losses.mahalanobis", "matrix", what, f"shape {self.params[0].shape}")
        if self.closed_form is not None:
            return self.closed_form(y, y_hat, *self.params)
        shape = jnp.broadcast_shapes(y.shape, y_hat.shape)
        y, y_hat = jnp.broadcast_to(y, shape), jnp.broadcast_to(y_hat, shape)
        out = jax.eval_shape(self.potential, jax.ShapeDtypeStruct((d,), y.dtype), *self.params)
        if getattr(out, "shape", None) != () or not jnp.issubdtype(out.dtype, jnp.floating):
            got = f"output {getattr(out, 'shape', type(out).__name__)} {getattr(out, 'dtype', '')}"
            _checks.fail("losses.bregman", "potential", "a callable (d,) -> float scalar", got)

        def one(a, b):
            fb, gb = jax.value_and_grad(self.potential)(b, *self.params)
            return self.potential(a, *self.params) - fb - jnp.dot(gb, a - b)

        out = jax.vmap(one)(y.reshape(-1, d), y_hat.reshape(-1, d))
        return out.reshape(shape[:-1])


def bregman(potential: Callable[[Array], Array], name: str = "bregman") -> Bregman:
    """The Bregman divergence of a strictly convex ``potential`` F: R^d -> R (gradient by autodiff).

    Args:
        potential: F on one vector (d,) -> scalar; strictly convex and differentiable (not
            checked: a non-convex F makes a loss whose minimiser is not the conditional mean).
        name: a name for reports.

    Returns:
        a ``Bregman`` divergence ``D(y, y_hat) -> (...)``.
    """
    _checks.check_callable("losses.bregman", "potential", potential, "a callable (d,) -> scalar")
    return Bregman(name, potential)


def _sq(y, y_hat):
    e = y - y_hat
    return jnp.sum(e * e, axis=-1)


def _sq_potential(y):
    return jnp.dot(y, y)


_SQUARED = Bregman("squared", _sq_potential, (), _sq)


def squared() -> Bregman:
    """|y - y_hat|^2 (F = |y|^2): the default loss of ``cfm`` and ``marginal_fm``.

    Returns:
        the ``Bregman`` divergence, for ``bregman=``.
    """
    return _SQUARED


def _maha(y, y_hat, m):
    e = y - y_hat
    return jnp.einsum("...i,ij,...j->...", e, m, e)


def _maha_potential(y, m):
    return y @ m @ y


def mahalanobis(matrix: Float[ArrayLike, "d d"]) -> Bregman:
    """(y - y_hat)^T M (y - y_hat) (F = y^T M y) for a symmetric positive definite M.

    Args:
        matrix: M, (d, d), symmetric positive definite.

    Returns:
        the ``Bregman`` divergence, for ``bregman=``.

    Raises:
        ValueError: if M is not square, symmetric (to 1e-8 relative) and positive definite.
    """
    fn = "losses.mahalanobis"
    m = _checks.check_real_array(fn, "matrix", matrix, any_float=True)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        _checks.fail(fn, "matrix", "a square (d, d) matrix", f"shape {m.shape}")
    if _checks.is_concrete(m):
        mn = np.asarray(m, np.float64)
        scale = max(float(np.max(np.abs(mn))), 1e-300)
        if not np.all(np.isfinite(mn)) or np.max(np.abs(mn - mn.T)) > 1e-8 * scale:
            _checks.fail(fn, "matrix", "finite and symmetric", "an asymmetric matrix")
        if float(np.linalg.eigvalsh(mn).min()) <= 0:
            _checks.fail(fn, "matrix", "positive definite",
                         f"min eigenvalue {np.linalg.eigvalsh(mn).min():g}")  # fmt: skip
    return Bregman("mahalanobis", _maha_potential, (m,), _maha)


def _exp_potential(y, scale):
    return jnp.sum(jnp.exp(scale * y)) / (scale * scale)


def exponential(scale: float = 1.0) -> Bregman:
    """F(y) = sum_i exp(scale y_i) / scale^2 (strictly convex, not quadratic).

    D = sum_i [exp(s y_i) - exp(s yh_i) - s exp(s yh_i)(y_i - yh_i)] / s^2; tends to the
    squared loss / 2 as scale -> 0 and weighs errors by exp(scale * y_hat): keep |scale y|
    moderate (overflow in float32 beyond scale |y| ~ 80).

    Args:
        scale: s, > 0.

    Returns:
        the ``Bregman`` divergence, for ``bregman=``.
    """
    scale = _checks.check_positive("losses.exponential", "scale", scale)
    return Bregman(f"exponential({scale:g})", _exp_potential, (jnp.asarray(scale),))


def _lse_potential(y, ridge):
    return jax.nn.logsumexp(y) + 0.5 * ridge * jnp.dot(y, y)


def logsumexp(ridge: float = 0.1) -> Bregman:
    """F(y) = log sum_i exp(y_i) + ridge |y|^2 / 2 (strictly convex for ridge > 0).

    Args:
        ridge: weight of the quadratic term, > 0.

    Returns:
        the ``Bregman`` divergence, for ``bregman=``.
    """
    ridge = _checks.check_positive("losses.logsumexp", "ridge", ridge)
    return Bregman(f"logsumexp({ridge:g})", _lse_potential, (jnp.asarray(ridge),))


def as_divergence(fn: str, spec) -> Bregman:
    """None -> squared; a Bregman as is; any other callable (y, y_hat) -> (...) wrapped."""
    if spec is None:
        return _SQUARED
    if isinstance(spec, Bregman):
        return spec
    _checks.check_callable(
        fn,
        "bregman",
        spec,
        "a losses.Bregman (bregman(F), squared(), ...) or a callable (y, y_hat)",
    )
    try:
        return _custom(spec)
    except TypeError:  # an unhashable callable: a fresh wrapper (jitted callers retrace)
        return Bregman(getattr(spec, "__name__", "custom"), None, (), _Call(spec))


@functools.lru_cache(maxsize=64)
def _custom(div):
    # One wrapper per callable, so jitted code keyed on it does not retrace per call.
    return Bregman(getattr(div, "__name__", "custom"), None, (), _Call(div))


@dataclasses.dataclass(frozen=True)
class _Call:
    div: Callable

    def __call__(self, y, y_hat):
        return self.div(y, y_hat)


# ----------------------------------------------------------------------------- time samplers


def uniform_time() -> TimeSampler:
    """t ~ U[0, 1].

    Returns:
        a time sampler ``(key, n) -> t (n,)``.
    """
    return lambda key, n: jax.random.uniform(key, (n,))


def uniform_eps_time(eps: float = 1e-3) -> TimeSampler:
    """t ~ U[eps, 1 - eps], keeping away from singular ends (e.g. VP at t = 1).

    Args:
        eps: distance kept from each end, in (0, 1/2).

    Returns:
        a time sampler ``(key, n) -> t (n,)``.
    """
    eps = _checks.as_float("losses.uniform_eps_time", "eps", eps)
    if not 0.0 <= eps < 0.5:
        _checks.fail("losses.uniform_eps_time", "eps", "in [0, 0.5)", eps)
    return lambda key, n: eps + (1.0 - 2.0 * eps) * jax.random.uniform(key, (n,))


def logit_normal_time(mean: float = 0.0, std: float = 1.0) -> TimeSampler:
    """t = sigmoid(mean + std * N(0, 1)) (Esser et al., 2024): mass in the middle of [0, 1].

    Args:
        mean: mean of the normal before the sigmoid.
        std: its standard deviation, > 0.

    Returns:
        a time sampler ``(key, n) -> t (n,)``.
    """
    fn = "losses.logit_normal_time"
    mean = _checks.as_float(fn, "mean", mean)
    if not math.isfinite(mean):
        _checks.fail(fn, "mean", "finite", mean)
    std = _checks.check_positive(fn, "std", std)
    return lambda key, n: jax.nn.sigmoid(mean + std * jax.random.normal(key, (n,)))


_NAMED_TIMES = {
    "uniform": uniform_time,
    "uniform_eps": uniform_eps_time,
    "logit_normal": logit_normal_time,
}


# One instance per name, so jitted code keyed on the sampler does not retrace per call.
_DEFAULT_TIMES = {name: factory() for name, factory in _NAMED_TIMES.items()}


def _time_sampler(fn: str, spec) -> TimeSampler:
    if callable(spec):
        return spec
    if isinstance(spec, str) and spec in _DEFAULT_TIMES:
        return _DEFAULT_TIMES[spec]
    _checks.fail(
        f"losses.{fn}", "time_sampler", f"one of {tuple(_NAMED_TIMES)} or a callable (key, n)",
        spec, TypeError if not isinstance(spec, str) else ValueError,
    )  # fmt: skip


# ----------------------------------------------------------------------------- schedules


def _resolve_schedule(fn: str, schedule, sigma_min) -> Schedule:
    if sigma_min is None:
        return _checks.check_instance(f"losses.{fn}", "schedule", schedule, Schedule,
                                      "an fmjax Schedule")  # fmt: skip
    if schedule is not None and schedule != linear():
        _checks.fail(
            f"losses.{fn}", "schedule", "linear() or None with `sigma_min` (it defines its own)",
            schedule,
        )  # fmt: skip
    return sigma_min_schedule(sigma_min)


# ----------------------------------------------------------------------------- shared pieces


def _call_module(model, t, x):
    return model(t, x)


def _apply(fn: str, apply_fn) -> ApplyFn:
    """``apply(params, t, x)``: ``apply_fn`` itself, or for a module ``model(t, x)``."""
    if is_module(apply_fn):
        return _call_module
    _checks.check_callable(
        f"losses.{fn}", "apply_fn", apply_fn,
        "a callable apply(params, t, x) or a Flax NNX / Equinox module",
    )  # fmt: skip
    return apply_fn


def _check_common(fn, size_name, batch_size, target, reduction, bregman_spec):
    _checks.check_int(f"losses.{fn}", size_name, batch_size, 1)
    _checks.check_choice(f"losses.{fn}", "target", target, TARGETS)
    _checks.check_choice(f"losses.{fn}", "reduction", reduction, _REDUCTIONS)
    return as_divergence(f"losses.{fn}", bregman_spec)


def _check_target_noise(fn, schedule: Schedule, target: str, conditional: bool) -> None:
    """Noise-only targets need noise; a conditional "velocity" target needs finite dgamma."""
    if target in _NOISE_ONLY and not schedule.has_noise:
        _checks.fail(
            f"losses.{fn}", "target",
            f"one of 'velocity', 'x1', 'x0', 'drift' for a schedule without noise ({target!r} "
            "learns E[z | x_t]; add noise with schedule.with_noise(...))", target,
        )  # fmt: skip
    if conditional and target == "velocity" and schedule.has_noise:
        ends = np.asarray(schedule.interval, np.float64)
        dgamma = np.asarray(schedule.gamma(ends)[1], np.float64)
        if not np.all(np.isfinite(dgamma)):
            _checks.fail(
                f"losses.{fn}", "target",
                f"not 'velocity' for noise {schedule.noise.name} (dgamma is infinite at the "
                "ends, so the conditional target dX_t has infinite variance): learn "
                "target='drift' and target='score' and combine them with "
                "convert.drift_to_velocity", target,
            )  # fmt: skip


def _draw(fn, sample_pairs, times, schedule, key, n) -> data.PathSample:
    """The points of a loss: ``data.sample_path`` with errors naming ``losses.<fn>``."""
    return data._sample_path(f"losses.{fn}", key, sample_pairs, schedule, n, times=times)


def _conditional_target(schedule, target, path: data.PathSample):
    if target == "x1":
        return path.x1
    if target == "x0":
        return path.x0
    if target in _NOISE_ONLY:
        return path.z
    if target == "velocity":
        return path.velocity
    _, _, da, db = schedule(path.t)  # "drift": the velocity without the noise term
    return da[:, None] * path.x1 + db[:, None] * path.x0


def _prediction(schedule, target, t, out):
    """What the model's output stands for in the loss: -gamma * out for the "score" target."""
    if target == "score":
        return -schedule.gamma(t)[0][:, None] * out
    return out


def _exact_target(coupling, schedule, target, t, xt, y=None):
    """E[conditional target | X_t = x_t (, Y = y)] from the exact engine ((n, d), one t per
    point); with labels ``y`` (n,) the class-conditional engine (``fmjax.conditional``, y = C
    the null class: unconditional)."""
    if y is None:
        ev = functools.partial(exact.evaluate, coupling, schedule, t, xt)
        velocity = functools.partial(exact.velocity, coupling, schedule, t, xt)
        score = functools.partial(exact.score, coupling, schedule, t, xt)
    else:
        ev = functools.partial(conditional.evaluate, coupling, schedule, t, xt, y)
        velocity = functools.partial(conditional.velocity, coupling, schedule, t, xt, y)
        score = functools.partial(conditional.score, coupling, schedule, t, xt, y)
    if not schedule.has_noise:
        u = velocity()
        if target in ("velocity", "drift"):
            return u
        conv = convert.velocity_to_x1 if target == "x1" else convert.velocity_to_x0
        return conv(schedule, t, xt, u)
    if target == "velocity":
        return velocity()
    g, _, g_dg = (c[:, None] for c in schedule.gamma(t))
    if target in _NOISE_ONLY:
        return -g * score()  # E[z | x] = -gamma s
    out = ev(("velocity", "score"))
    if target == "drift":
        return out.velocity + g_dg * out.score
    conv = convert.velocity_to_x1 if target == "x1" else convert.velocity_to_x0
    return conv(schedule, t, xt, out.velocity, score=out.score)


def _per_sample(div: Bregman, y, pred, reduction):
    """Divergence D(y, pred) per sample (n,) under the reduction convention ("mean": / d)."""
    out = div(y, pred)
    return out / y.shape[-1] if reduction == "mean" else out


# ----------------------------------------------------------------------------- losses


def cfm(
    apply_fn: ApplyFn | Module,
    sample_pairs: PairSampler,
    schedule: Schedule | None,
    batch_size: int,
    *,
    time_sampler: str | TimeSampler = "uniform",
    target: str = "velocity",
    sigma_min: float | None = None,
    reduction: str = "sum",
    bregman: Bregman | None = None,
    num_classes: int | None = None,
    p_uncond: float = 0.0,
) -> LossFn:
    """Conditional flow matching loss ``loss_fn(params, key) -> scalar`` (jit- and grad-able).

    loss = mean_i D(y_i, apply_fn(params, t_i, x_t,i)) with x_t = b x0 + a x1 (+ gamma z) and
    y = da x1 + db x0 (+ dgamma z) ("velocity"), da x1 + db x0 ("drift"), z ("denoiser"; for
    "score" the prediction is -gamma * output), x1 ("x1") or x0 ("x0"); D = |.|^2 by default.

    Args:
        apply_fn: model ``apply_fn(params, t (n,), x (n, d)) -> (n, d)``, or a Flax NNX /
            Equinox module ``model(t (n,), x (n, d)) -> (n, d)``: the loss is then
            ``loss_fn(model, key)`` (the module it is given is the one called).
        sample_pairs: ``(key, n) -> (x0 (n, d), x1 (n, d))``, e.g. ``data.independent_pairs``,
            a JointGaussianMixture's ``.sample``, or ``ot_pairs(...)`` for OT-CFM.
        schedule: affine schedule; must be ``linear()`` or None when ``sigma_min`` is given.
        batch_size: pairs per loss evaluation (static).
        time_sampler: "uniform", "uniform_eps" (1e-3), "logit_normal" (0, 1), or a callable
            ``(key, n) -> (n,)`` such as ``logit_normal_time(mean, std)``.
        target: one of ``TARGETS``: "velocity", "x1", "x0", "drift", and with noise
            "denoiser" and "score" (module docs); "velocity" is refused for noise whose dgamma
            is infinite at the ends (``brownian``).
        sigma_min: use ``sigma_min_schedule(sigma_min)`` (Lipman et al.'s path).
        reduction: "sum" (over d, mean over batch) or "mean" (over all elements, i.e. / d).
        bregman: the divergence D(y, y_hat) (``squared()`` if None; ``bregman(F)``,
            ``mahalanobis(M)``, ``exponential()``, ``logsumexp()``, or a callable).
        num_classes: class-conditional training (classifier-free guidance): ``sample_pairs``
            returns ``(x0, x1, y)`` with labels y (n,) in 0..C-1 (e.g.
            ``conditional.labelled_pairs(coupling)``) and the model is called
            ``apply_fn(params, t, x_t, y)`` (``model(t, x_t, y)``), y replaced by the null
            class C = ``num_classes`` with probability ``p_uncond`` (dropout drawn from
            ``fold_in(key, 0xC1A55)``, independent of the points).
        p_uncond: label-dropout probability in [0, 1] (with ``num_classes``).

    Returns:
        ``loss_fn(params, key) -> scalar`` (``loss_fn(model, key)`` for a module).
    """
    div = _check_common("cfm", "batch_size", batch_size, target, reduction, bregman)
    if num_classes is not None:
        args = (apply_fn, sample_pairs, schedule, batch_size, time_sampler, target, sigma_min)
        return _cfm_conditional(*args, reduction, div, num_classes, p_uncond)
    schedule = _resolve_schedule("cfm", schedule, sigma_min)
    _check_target_noise("cfm", schedule, target, conditional=True)
    times = _time_sampler("cfm", time_sampler)
    apply_fn = _apply("cfm", apply_fn)
    _checks.check_callable("losses.cfm", "sample_pairs", sample_pairs)

    def loss_fn(params, key):
        path = _draw("cfm", sample_pairs, times, schedule, key, batch_size)
        t, xt = path.t, path.xt
        y = _conditional_target(schedule, target, path)
        pred = _prediction(schedule, target, t, apply_fn(params, t, xt))
        return jnp.mean(_per_sample(div, y, pred, reduction))

    loss_fn.structure = dict(
        loss="cfm",
        apply_fn=apply_fn,
        sample_pairs=sample_pairs,
        schedule=schedule,
        batch_size=batch_size,
        time_sampler=times,
        target=target,
        reduction=reduction,
        bregman=div,
    )
    return loss_fn


_DROPOUT_SALT = 0xC1A55


def _check_labels(fn: str, num_classes, p_uncond) -> tuple[int, float]:
    """``num_classes`` >= 1 and ``p_uncond`` in [0, 1], checked eagerly."""
    num_classes = _checks.check_int(f"losses.{fn}", "num_classes", num_classes, 1)
    p_uncond = _checks.as_float(f"losses.{fn}", "p_uncond", p_uncond)
    if not 0.0 <= p_uncond <= 1.0:
        _checks.fail(f"losses.{fn}", "p_uncond", "in [0, 1]", p_uncond)
    return num_classes, p_uncond


def _draw_labelled(fn, sample_pairs, times, schedule, key, n, num_classes, p_uncond):
    """(path, labels (n,)) from a labelled pair sampler ``(key, n) -> (x0, x1, y)``: the labels
    ride along the pairs' own key (``sample_path``'s convention), each replaced by the null class
    ``num_classes`` with probability ``p_uncond`` (drawn from ``fold_in(key, 0xC1A55)``)."""
    drawn = {}

    def pairs(k, m):
        out = sample_pairs(k, m)
        if not isinstance(out, tuple | list) or len(out) != 3:
            what = "a callable (key, n) -> (x0, x1, y) with `num_classes`"
            _checks.fail(f"losses.{fn}", "sample_pairs", what, type(out).__name__, TypeError)
        drawn["y"] = jnp.asarray(out[2], jnp.int32)
        return out[0], out[1]

    path = _draw(fn, pairs, times, schedule, key, n)
    drop = jax.random.bernoulli(jax.random.fold_in(key, _DROPOUT_SALT), p_uncond, (n,))
    return path, jnp.where(drop, num_classes, drawn["y"])


def _labelled_coupling(fn: str, coupling, num_classes: int):
    """The labelled pair sampler of ``coupling``, whose classes must number ``num_classes``."""
    inner = coupling.coupling if isinstance(coupling, PreparedCoupling) else coupling
    if inner.labels is None:
        _checks.fail(
            f"losses.{fn}", "coupling",
            "labelled with `num_classes` (built with `labels=`, or from a labelled target)",
            "labels=None",
        )  # fmt: skip
    if inner.n_classes != num_classes:
        _checks.fail(
            f"losses.{fn}", "num_classes",
            f"the coupling's number of classes {inner.n_classes} (its null class)", num_classes,
        )  # fmt: skip
    return conditional.labelled_pairs(coupling)


def _cfm_conditional(
    apply_fn,
    sample_pairs,
    schedule,
    batch_size,
    time_sampler,
    target,
    sigma_min,
    reduction,
    div,
    num_classes,
    p_uncond,
) -> LossFn:
    """``cfm`` with labels from the pair sampler and label dropout to the null class."""
    fn = "losses.cfm"
    num_classes, p_uncond = _check_labels("cfm", num_classes, p_uncond)
    schedule = _resolve_schedule("cfm", schedule, sigma_min)
    _check_target_noise("cfm", schedule, target, conditional=True)
    times = _time_sampler("cfm", time_sampler)
    module = is_module(apply_fn)
    _apply("cfm", apply_fn)
    _checks.check_callable(fn, "sample_pairs", sample_pairs)

    def loss_fn(params, key):
        args = (sample_pairs, times, schedule, key, batch_size, num_classes, p_uncond)
        path, labels = _draw_labelled("cfm", *args)
        t, xt = path.t, path.xt
        y = _conditional_target(schedule, target, path)
        out = params(t, xt, labels) if module else apply_fn(params, t, xt, labels)
        pred = _prediction(schedule, target, t, out)
        return jnp.mean(_per_sample(div, y, pred, reduction))

    loss_fn.structure = dict(
        loss="cfm",
        apply_fn=apply_fn,
        sample_pairs=sample_pairs,
        schedule=schedule,
        batch_size=batch_size,
        time_sampler=times,
        target=target,
        reduction=reduction,
        bregman=div,
        num_classes=num_classes,
        p_uncond=p_uncond,
    )
    return loss_fn


def ot_pairs(
    sample_pairs: PairSampler, *, epsilon: float | None = None, **sinkhorn_kwargs
) -> PairSampler:
    """Re-pair each minibatch by optimal transport for the squared Euclidean cost (OT-CFM).

    ``epsilon=None``: exact OT between the two uniform empirical measures, solved by the
    Hungarian algorithm (``ott.tools.unreg.hungarian``). With equal uniform weights the optimal
    plan is a permutation (Birkhoff-von Neumann), so x1 is returned permuted: every drawn x1
    appears exactly once, no duplicates and none dropped.

    ``epsilon > 0``: entropic OT by Sinkhorn (``ott.solvers.linear.solve``; epsilon absolute, in
    units of squared distance). Each source row i keeps its x0 and draws one partner j from the
    row-normalised plan P_ij / P_i. (Gumbel-max, ``jax.random.categorical``, on the logits
    (g_j - C_ij) / epsilon, which avoids underflow of P). So each x0 is used exactly once,
    without duplicates, and the pair law is the plan itself (rows of P have mass 1/n); the
    entropic plan is not a permutation, so an x1 may repeat or be left out, though each x1 is
    drawn once in expectation (columns have mass 1/n). As epsilon -> 0 this tends to the exact
    permutation, but Sinkhorn needs more iterations (ott's defaults: threshold 1e-3, at most
    2000 iterations; an unconverged plan is used as it stands).

    Labelled pairs (``sample_pairs`` returning ``(x0, x1, y)``, e.g.
    ``conditional.labelled_pairs(coupling)``, for ``cfm(..., num_classes=C)``) are re-paired
    within their classes only: x0_i keeps its label y_i and is paired with an x1 of the same
    class (the cost of pairing across classes is raised by n max C_ij + 1, more than any
    within-class plan costs, so the optimal plan has no cross-class pair), and ``(x0, x1, y)``
    is returned with y unchanged. Each class then keeps its own source points, so x0 given y
    keeps its law (for an independent coupling, p0), which a re-pairing across classes would
    bias toward the class's region.

    Args:
        sample_pairs: ``(key, n) -> (x0, x1)`` or ``(key, n) -> (x0, x1, y)`` (labels (n,),
            ints); called with the same key (independent pairs in OT-CFM, but any pair
            sampler works).
        epsilon: None for exact OT, else the entropic regularisation (> 0).
        **sinkhorn_kwargs: passed to ott's Sinkhorn (e.g. ``threshold``, ``max_iterations``).

    Returns:
        a jitted pair sampler ``(key, n) -> (x0 (n, d), x1 (n, d))`` (with labels:
        ``(x0, x1, y (n,))``); x0 (and y) are returned unchanged.
    """
    _checks.check_callable("losses.ot_pairs", "sample_pairs", sample_pairs, "a callable (key, n)")
    if epsilon is not None:
        epsilon = _checks.check_positive("losses.ot_pairs", "epsilon", epsilon)
    # ott (and jaxopt under it) is imported here: a heavy import only OT-CFM needs.
    _checks.require("ott", "losses.ot_pairs")
    from ott.geometry import geometry, pointcloud
    from ott.solvers import linear as ott_linear
    from ott.tools import unreg

    def sample(key, n):
        out = sample_pairs(key, n)
        x0, x1 = out[0], out[1]
        labelled = isinstance(out, tuple | list) and len(out) == 3
        geom = pointcloud.PointCloud(x0, x1, epsilon=epsilon)
        if labelled:  # pairs across classes cost more than any plan within them
            y = jnp.asarray(out[2])
            cost = geom.cost_matrix
            penalty = n * jnp.max(cost) + 1.0
            cost = cost + jnp.where(y[:, None] != y[None, :], penalty, 0.0).astype(cost.dtype)
            geom = geometry.Geometry(cost_matrix=cost, epsilon=epsilon)
        if epsilon is None:
            _, res = unreg.hungarian(geom)
            i, j = res.paired_indices
            x1 = x1[j[jnp.argsort(i)]]
        else:
            # ott's Sinkhorn relies on implicit rank promotion; allow it for this call only.
            with jax.numpy_rank_promotion("allow"):
                res = ott_linear.solve(geom, **sinkhorn_kwargs)
            logits = (res.g[None, :] - geom.cost_matrix) / epsilon  # log P_ij - f_i / epsilon
            x1 = x1[jax.random.categorical(jax.random.fold_in(key, 1), logits, axis=-1)]
        return (x0, x1, out[2]) if labelled else (x0, x1)

    return jax.jit(sample, static_argnums=1)


def marginal_fm(
    apply_fn: ApplyFn | Module,
    coupling: JointGaussianMixture | PreparedCoupling,
    schedule: Schedule | None,
    batch_size: int,
    *,
    time_sampler: str | TimeSampler = "uniform",
    target: str = "velocity",
    sigma_min: float | None = None,
    reduction: str = "sum",
    bregman: Bregman | None = None,
    time_groups: int | None = None,
    num_classes: int | None = None,
    p_uncond: float = 0.0,
) -> LossFn:
    """Flow matching with the exact marginal target of a Gaussian-mixture coupling.

    loss = mean_i D(y(t_i, x_t,i), apply_fn(params, t_i, x_t,i)) with y = u_t (exact marginal
    velocity, ``fmjax.exact.velocity`` with one t per point), E[X1 | x_t], E[X0 | x_t] (by
    ``fmjax.convert``), the exact drift u + gamma dgamma s, or the exact denoiser -gamma s.
    For a Bregman D its gradient has the same expectation as ``cfm``'s and its value is lower by
    the loss floor. Arguments as ``cfm``, with the coupling (a ``JointGaussianMixture`` or an
    ``exact.prepare``d one, sampled through ``.coupling``) in place of sample_pairs; the
    "velocity" target is allowed for any noise here (the exact target is finite). A Flax NNX /
    Equinox module in place of ``apply_fn`` makes it ``loss_fn(model, key)``, as for ``cfm``.

    ``time_groups=G`` (a divisor of ``batch_size``) draws G times per batch, each shared by
    batch_size / G consecutive points, instead of one per point: the loss stays an unbiased
    estimate of the same objective (slightly noisier in t), and the exact target factors K
    covariances per group instead of per point. Use it for general joint couplings (with
    cross-covariance, no time-free form), where one t per point costs K Cholesky factorisations
    per point; couplings with a time-free form (independent, OT maps, ``exact.prepare``d) gain
    nothing from it.

    ``num_classes=C`` (a labelled coupling with C classes) trains a class-conditional model
    ``apply(params, t, x, y)``: pairs are drawn with their labels
    (``conditional.labelled_pairs``), each label is dropped to the null class C with
    probability ``p_uncond`` (as in ``cfm``), and the target of a point with label y is the
    exact class-conditional one (u_t(x | y) by ``fmjax.conditional``; for the null class the
    unconditional u_t(x)). The exact conditional field ``conditional.velocity_field`` has loss 0.

    Args:
        apply_fn: ``apply(params, t (n,), x (n, d)) -> (n, d)``, or a Flax NNX / Equinox module
            called as ``model(t, x)`` (with ``num_classes``: ``apply(params, t, x, y (n,))``,
            ``model(t, x, y)``).
        coupling: the Gaussian-mixture coupling (or an ``exact.prepare``d one) whose exact target is
            regressed on.
        schedule: the schedule of the path (None: the coupling's own, for a Schrodinger bridge).
        batch_size: points per loss evaluation.
        time_sampler: as in ``cfm``.
        target: "velocity", "x1", "x0", "drift" or "denoiser", as in ``cfm``.
        sigma_min: as in ``cfm``.
        reduction: as in ``cfm``.
        bregman: as in ``cfm``.
        time_groups: G times per batch (a divisor of ``batch_size``), or None for one per point.
        num_classes: class-conditional training with labels (above), or None.
        p_uncond: label-dropout probability in [0, 1] (with ``num_classes``).

    Returns:
        ``loss_fn(params, key) -> scalar`` (``loss_fn(model, key)`` for a module).
    """
    div = _check_common("marginal_fm", "batch_size", batch_size, target, reduction, bregman)
    sample_pairs = _check_coupling("marginal_fm", coupling)
    if num_classes is not None:
        num_classes, p_uncond = _check_labels("marginal_fm", num_classes, p_uncond)
        sample_pairs = _labelled_coupling("marginal_fm", coupling, num_classes)
    schedule = _resolve_schedule("marginal_fm", schedule, sigma_min)
    _check_target_noise("marginal_fm", schedule, target, conditional=False)
    times = _time_sampler("marginal_fm", time_sampler)
    module = is_module(apply_fn)
    apply_fn = _apply("marginal_fm", apply_fn)
    target_fn = functools.partial(_exact_target, coupling, schedule, target)
    if time_groups is not None:
        groups = _checks.check_int("losses.marginal_fm", "time_groups", time_groups, 1)
        if batch_size % groups:
            _checks.fail("losses.marginal_fm", "time_groups",
                         f"a divisor of batch_size={batch_size}", groups)  # fmt: skip
        times = _grouped_times(times, groups)
        target_fn = _grouped_target(target_fn, groups)

    def loss_fn(params, key):
        if num_classes is None:
            path = _draw("marginal_fm", sample_pairs, times, schedule, key, batch_size)
            t, xt = path.t, path.xt
            y = jax.lax.stop_gradient(target_fn(t, xt))
            out = apply_fn(params, t, xt)
        else:
            args = (sample_pairs, times, schedule, key, batch_size, num_classes, p_uncond)
            path, labels = _draw_labelled("marginal_fm", *args)
            t, xt = path.t, path.xt
            y = jax.lax.stop_gradient(target_fn(t, xt, labels))
            out = params(t, xt, labels) if module else apply_fn(params, t, xt, labels)
        pred = _prediction(schedule, target, t, out)
        return jnp.mean(_per_sample(div, y, pred, reduction))

    loss_fn.structure = dict(
        loss="marginal_fm",
        apply_fn=apply_fn,
        coupling=coupling,
        schedule=schedule,
        batch_size=batch_size,
        time_sampler=times,
        target=target,
        reduction=reduction,
        bregman=div,
        time_groups=time_groups,
    )
    if num_classes is not None:  # unconditional losses keep their fingerprint
        loss_fn.structure.update(num_classes=num_classes, p_uncond=p_uncond)
    return loss_fn


def _grouped_times(times: TimeSampler, groups: int) -> TimeSampler:
    """G draws of ``times``, each repeated n / G times (consecutive points share a time)."""

    def sampler(key, n):
        return jnp.repeat(jnp.asarray(times(key, groups)), n // groups, axis=0)

    return sampler


def _grouped_target(target_fn, groups: int):
    """``target_fn(t (n,), x (n, d)[, y (n,)])`` for times shared within G consecutive groups: one
    shared-t evaluation per group (K factorisations each), vmapped over the groups."""

    def fn(t, x, *labels):  # labels: (n,) with num_classes, grouped like the points
        n, d = x.shape
        tg = t.reshape(groups, n // groups)[:, :1]  # (G, 1): one time per group
        lg = [y.reshape(groups, n // groups) for y in labels]
        out = jax.vmap(target_fn)(tg, x.reshape(groups, n // groups, d), *lg)
        return out.reshape(n, d)

    return fn


def _check_coupling(fn, coupling) -> PairSampler:
    """The coupling's pair sampler (``.coupling.sample`` for a PreparedCoupling)."""
    _checks.check_instance(
        f"losses.{fn}", "coupling", coupling, (JointGaussianMixture, PreparedCoupling),
        "a JointGaussianMixture (fmjax.independent_coupling(p0, p1) joins two mixtures) or an "
        "exact.prepare(...)",
    )  # fmt: skip
    return coupling.coupling.sample if isinstance(coupling, PreparedCoupling) else coupling.sample


def loss_floor(
    coupling: JointGaussianMixture | PreparedCoupling,
    schedule: Schedule | None,
    n: int,
    *,
    key: PRNGKeyArray,
    time_sampler: str | TimeSampler = "uniform",
    target: str = "velocity",
    sigma_min: float | None = None,
    reduction: str = "sum",
    chunk_size: int = 4096,
    bregman: Bregman | None = None,
    num_classes: int | None = None,
    p_uncond: float = 0.0,
) -> LossFloor:
    """Irreducible CFM loss E D(y_cond, E[y_cond | X_t]) by Monte Carlo with the exact targets.

    ``cfm(...)(params, key)`` is, in expectation, ``marginal_fm(...)(params, key) + floor``;
    no model can go below the floor. Same arguments and conventions as ``cfm``. With
    ``num_classes`` (a labelled coupling) it is the floor of class-conditional CFM with label
    dropout ``p_uncond``, E D(y_cond, E[y_cond | X_t, Y]) with Y the label after dropout (the
    null class C: unconditional), drawn as ``cfm(..., num_classes=C)`` draws them from
    ``conditional.labelled_pairs(coupling)``: with one key, that loss of the exact conditional
    field equals this floor's estimate.

    Args:
        coupling: the joint mixture of (X0, X1), or an ``exact.prepare``d one.
        schedule: affine schedule (or None with ``sigma_min``), with or without noise.
        n: number of Monte Carlo samples (static), at least 2 (the standard error needs two).
        key: PRNG key.
        time_sampler, target, sigma_min, reduction, bregman: as in ``cfm``.
        chunk_size: points per exact-velocity evaluation (memory bound; static).
        num_classes: the coupling's number of classes C for the class-conditional floor, or
            None (unconditional).
        p_uncond: label-dropout probability in [0, 1] (with ``num_classes``).

    Returns:
        ``LossFloor(mean, stderr)``: the estimate and its Monte Carlo standard error.
    """
    div = _check_common("loss_floor", "n", n, target, reduction, bregman)
    _checks.check_int("losses.loss_floor", "n", n, 2)  # a standard error needs two samples
    _check_coupling("loss_floor", coupling)
    _checks.check_key("losses.loss_floor", "key", key)
    if num_classes is not None:
        num_classes, p_uncond = _check_labels("loss_floor", num_classes, p_uncond)
        _labelled_coupling("loss_floor", coupling, num_classes)
    schedule = _resolve_schedule("loss_floor", schedule, sigma_min)
    _check_target_noise("loss_floor", schedule, target, conditional=True)
    times = _time_sampler("loss_floor", time_sampler)
    chunk_size = _checks.check_int("losses.loss_floor", "chunk_size", chunk_size, 1)
    labels = None if num_classes is None else (num_classes, p_uncond)
    terms = _floor_terms(
        coupling, schedule, key, div, int(n), times, target, reduction, chunk_size, labels
    )
    return LossFloor(jnp.mean(terms), jnp.std(terms, ddof=1) / math.sqrt(n))


@functools.partial(
    jax.jit, static_argnames=("n", "times", "target", "reduction", "chunk_size", "labels")
)
def _floor_terms(coupling, schedule, key, div, n, times, target, reduction, chunk_size, labels):
    """Per-sample D(y_cond, E[y_cond | x_t (, y)]), shape (n,), exact targets in chunks;
    ``labels``: None, or (num_classes, p_uncond) for the class-conditional floor."""
    if labels is None:
        inner = coupling.coupling if isinstance(coupling, PreparedCoupling) else coupling
        path = _draw("loss_floor", inner.sample, times, schedule, key, n)
        classes = jnp.zeros((n,), jnp.int32)  # unused
    else:
        pairs = conditional.labelled_pairs(coupling)
        path, classes = _draw_labelled("loss_floor", pairs, times, schedule, key, n, *labels)
    t, xt = path.t, path.xt
    y = _conditional_target(schedule, target, path)

    def one(args):
        ti, xi, yi, ci = args
        extra = () if labels is None else (ci,)
        pred = _exact_target(coupling, schedule, target, ti, xi, *extra)
        return _per_sample(div, yi, pred, reduction)

    args = (t[:, None], xt[:, None], y[:, None], classes[:, None])
    return jax.lax.map(one, args, batch_size=min(chunk_size, n))[:, 0]
