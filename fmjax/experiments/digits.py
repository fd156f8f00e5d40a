"""Experiment: flow matching on the 8x8 digits (MLP vs UNet), and a 64-D exact ground truth.

Part 1, real images: an MLP and a UNet (``fmjax.models``, flat x) are trained by CFM from
N(0, I) to the digits in [-1, 1] (dequantised: uniform noise of one grey level, 1/8). Shown:
samples at several NFE, samples over t, nearest training images (memorisation check), bits per
dimension from the likelihood, and a sample-quality score from a digits classifier trained in
the same run (scikit-learn's logistic regression): the class histogram of the samples, their
mean confidence, and the Frechet distance between real and generated images in the space of
the classifier's 10 logits.

Part 2, exact answers in 64-D: the same networks are trained on samples of the digits GMM
(``fmjax.problems`` "digits_gmm", a 20-component full-covariance mixture fitted to the digits)
and scored by ``fmjax.evaluate`` against its exact velocity, loss floor and density.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import (
    _checks,
    data,
    evaluation,
    exact,
    losses,
    models,
    plot,
    problems,
    sample,
    schedules,
)
from fmjax.experiments._common import (
    ExperimentResult,
    _Config,
    _finish,
    _outdir,
    _resolve,
    _train,
)
from fmjax.likelihood import log_likelihood

_FN = "experiments.digits"
_SHAPE = problems.DIGITS_SHAPE
_DIM = 64
_LEVEL = 1.0 / 8.0  # one grey level in [-1, 1]


@dataclasses.dataclass(frozen=True)
class DigitsConfig(_Config):
    """Settings of :func:`digits`. The defaults are meant for a GPU (on 2 CPU cores a run had not
    finished after 40 min); ``quick()`` takes ~70 s on 2 CPU cores. For a longer GPU run try
    ``steps=20000, unet_channels=64, batch_size=256``.

    Attributes:
        steps: CFM training steps of each network on the digit images (part 1).
        batch_size: pairs per training step (both parts).
        learning_rate: peak Adam learning rate (cosine decay; both parts).
        mlp_width: hidden layer size of the MLP.
        mlp_depth: number of hidden layers of the MLP.
        unet_channels: UNet channels at the first level.
        unet_channel_mults: UNet channel multiplier per level (8x8 images: at most 4 levels).
        unet_embedding: UNet sinusoidal time features (even).
        n_train: the first ``n_train`` of the 1797 digits train the networks and the classifier;
            the rest are the test digits.
        n_samples: generated images per sampler (part 1).
        nfe_steps: fixed midpoint step counts of the part-1 samplers (NFE = 2 per step); with
            ``adaptive`` False the last one also gives the samples over t.
        adaptive: also sample by adaptive Tsit5 (at ``tol``), which gives the samples over t.
        n_likelihood: test digits whose bits per dimension are estimated.
        likelihood_steps: fixed midpoint steps of the (Hutchinson) likelihood behind bits/dim.
        gmm_steps: CFM training steps of each network on the 64-D digits GMM (part 2).
        n_eval: points per estimate of ``fmjax.evaluate`` on the digits GMM (part 2).
        gmm_nfe_steps: step counts tried by ``fmjax.evaluate``'s NFE measurement (part 2).
        gmm_likelihood_steps: fixed midpoint steps of the part-2 likelihood, or None for
            adaptive Tsit5 at ``tol``.
        gmm_pool: 0: each part-2 training step draws fresh exact pairs; n > 0: the targets come
            from a pool of n exact target draws (faster to compile; the source stays fresh).
        gmm_exact: also evaluate the exact velocity field in part 2.
        n_times: points of the part-2 velocity-error curves.
        tol: rtol = atol of every adaptive solve.
        seed: seed of the run's PRNG key.
    """

    steps: int = 3000
    batch_size: int = 128
    learning_rate: float = 2e-3
    mlp_width: int = 256
    mlp_depth: int = 3
    unet_channels: int = 32
    unet_channel_mults: tuple[int, ...] = (1, 2)
    unet_embedding: int = 32
    n_train: int = 1500
    n_samples: int = 500
    nfe_steps: tuple[int, ...] = (1, 2, 4, 8, 16)
    adaptive: bool = True
    n_likelihood: int = 297
    likelihood_steps: int = 32
    gmm_steps: int = 3000
    n_eval: int = 1000
    gmm_nfe_steps: tuple[int, ...] = (1, 4, 16, 64)
    gmm_likelihood_steps: int | None = None
    gmm_pool: int = 0
    gmm_exact: bool = True
    n_times: int = 11
    tol: float = 1e-5
    seed: int = 0

    # Quick (CI; mostly compilation): tiny networks (a one-level UNet of 8 channels), 100
    # steps, 200 samples at NFE 2 and 8 (no adaptive solve), bits/dim of 32 test digits by 4
    # midpoint steps, and the 64-D evaluation of the MLP and UNet (not of the exact field) on
    # 200 points with a 4-step likelihood: every part of the report, with numbers only good
    # enough to check that it runs.
    _QUICK = dict(
        steps=100, batch_size=32, mlp_width=64, mlp_depth=2, unet_channels=8,
        unet_channel_mults=(1,), unet_embedding=16, n_samples=200, nfe_steps=(1, 4),
        adaptive=False, n_likelihood=32, likelihood_steps=4, gmm_steps=100, n_eval=200,
        n_times=4, tol=1e-3, gmm_nfe_steps=(1, 4, 16), gmm_likelihood_steps=4, gmm_pool=4096,
        gmm_exact=False,
    )  # fmt: skip


def _models(cfg: DigitsConfig) -> dict:
    """The networks this experiment trains, by label (the same two in both parts)."""
    return {
        "MLP": models.MLP(dim=_DIM, width=cfg.mlp_width, depth=cfg.mlp_depth),
        "UNet": models.UNet(
            image_shape=_SHAPE,
            channels=cfg.unet_channels,
            channel_mults=cfg.unet_channel_mults,
            embedding_dim=cfg.unet_embedding,
        ),  # fmt: skip
    }


def _dequantised(train: jax.Array):
    """Sampler of training digits plus uniform noise of one grey level (1/8 in [-1, 1])."""

    def sampler(key, n):
        k1, k2 = jax.random.split(key)
        x = train[jax.random.randint(k1, (n,), 0, train.shape[0])]
        return x + _LEVEL * (jax.random.uniform(k2, x.shape, x.dtype) - 0.5)

    return sampler


# ----------------------------------------------------------------------------- classifier


def _classifier(x_train, y_train):
    _checks.require("sklearn", _FN)
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return LogisticRegression(max_iter=2000, C=1.0).fit(x_train, y_train)


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance |m_a - m_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets."""
    from scipy import linalg

    ma, mb = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(sa @ sb)
    root = root.real if np.iscomplexobj(root) else root
    return float(np.sum((ma - mb) ** 2) + np.trace(sa + sb - 2.0 * root))


def _quality(clf, x: np.ndarray, ref_logits: np.ndarray) -> dict:
    x = np.clip(np.asarray(x, np.float64), -1.0, 1.0)
    probs = clf.predict_proba(x)
    hist = np.bincount(probs.argmax(1), minlength=10) / x.shape[0]
    return {
        "class_histogram": hist,
        "max_class_fraction": float(hist.max()),
        "mean_confidence": float(probs.max(1).mean()),
        "frechet_logits": _frechet(clf.decision_function(x), ref_logits),
    }


def _nearest(x: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index and distance of each row's nearest training image."""
    d2 = (x**2).sum(1)[:, None] + (train**2).sum(1)[None] - 2.0 * x @ train.T
    idx = d2.argmin(1)
    return idx, np.sqrt(np.maximum(d2[np.arange(x.shape[0]), idx], 0.0))


# ----------------------------------------------------------------------------- part 1


_TS = np.linspace(0.0, 1.0, 6)  # times of the samples-over-t figure


def _sample_all(v, x0, cfg: DigitsConfig) -> tuple[dict, np.ndarray]:
    """Samples by fixed-step midpoint at each count in ``nfe_steps`` and (``adaptive``) by
    adaptive Tsit5; and the first 10 trajectories of the last sampler at the times ``_TS``."""
    out = {}
    fixed = cfg.nfe_steps if cfg.adaptive else cfg.nfe_steps[:-1]
    for k in fixed:
        out[f"NFE {2 * k}"] = np.asarray(sample.ode(v, x0, solver="midpoint", steps=k).x)
    if cfg.adaptive:
        sol = sample.ode(v, x0, rtol=cfg.tol, atol=cfg.tol, save_ts=_TS)
        out[f"adaptive (NFE {int(sol.nfe)})"] = np.asarray(sol.x)
    else:
        k = cfg.nfe_steps[-1]
        sol = sample.ode(v, x0, solver="midpoint", steps=k, save_ts=_TS)
        out[f"NFE {2 * k}"] = np.asarray(sol.x)
    return out, np.asarray(sol.xs[:, :10])


def _bits_per_dim(v, x_test, key, cfg: DigitsConfig) -> float:
    """Bits per dimension of dequantised test digits: NLL / (d ln 2) + log2(8) (grey-level bins
    of width 1/8), i.e. an upper bound on the discrete model's bits per pixel."""
    k1, k2 = jax.random.split(key)
    x = x_test + _LEVEL * (jax.random.uniform(k1, x_test.shape, x_test.dtype) - 0.5)
    ll = log_likelihood(v, x, method="hutchinson", key=k2, solver="midpoint",
                        steps=cfg.likelihood_steps)  # fmt: skip
    nll = -float(jnp.mean(ll.log_prob))
    return nll / (_DIM * math.log(2.0)) + math.log2(8.0)


def _part_images(cfg: DigitsConfig, key, progress: bool, out: Path) -> tuple[dict, dict]:
    x_all, y_all = np.asarray(data.digits(flat=True)), np.asarray(data.digits_labels())
    x_train, y_train = x_all[: cfg.n_train], y_all[: cfg.n_train]
    x_test = x_all[cfg.n_train :]
    clf = _classifier(x_train, y_train)
    ref_logits = clf.decision_function(x_test)
    k_train, k_x0, k_ll = jax.random.split(key, 3)
    x0 = jax.random.normal(k_x0, (cfg.n_samples, _DIM))
    pairs = data.independent_pairs(data.gaussian_source(_DIM), _dequantised(jnp.asarray(x_train)))
    s = schedules.linear()
    metrics_, samples, over_t = {}, {}, {}
    for name, model in _models(cfg).items():
        t0 = time.perf_counter()
        fit = _train(model, losses.cfm(model.apply, pairs, s, cfg.batch_size), k_train,
                     cfg.steps, cfg.learning_rate, progress)  # fmt: skip
        # a partial (not jitted): the solvers trace the parameters, so the compiled solves are
        # shared by every network of the same architecture
        v = functools.partial(model.apply, fit.params)
        t_train = time.perf_counter() - t0
        by_nfe, over_t[name] = _sample_all(v, x0, cfg)
        samples[name] = by_nfe
        final = list(by_nfe.values())[-1]
        _, dist = _nearest(final, x_train)
        bpd = _bits_per_dim(v, jnp.asarray(x_test[: cfg.n_likelihood]), k_ll, cfg)
        metrics_[name] = {
            "final_loss": float(np.mean(np.asarray(fit.losses)[-max(1, cfg.steps // 10) :])),
            "bits_per_dim": bpd,
            "nearest_train_distance": float(dist.mean()),
            "quality": {k: _quality(clf, x, ref_logits) for k, x in by_nfe.items()},
            "n_params": int(sum(a.size for a in jax.tree.leaves(fit.params))),
            "train_time_s": round(t_train, 2),
            "eval_time_s": round(time.perf_counter() - t0 - t_train, 2),
        }
    _, test_dist = _nearest(x_test, x_train)
    metrics_["real"] = {
        "quality": _quality(clf, x_test, ref_logits),
        "nearest_train_distance": float(test_dist.mean()),
        "classifier_test_accuracy": float(clf.score(x_test, y_all[cfg.n_train :])),
    }
    figures = _image_figures(samples, over_t, x_train, x_test, out)
    return metrics_, figures


def _image_figures(samples: dict, over_t: dict, x_train, x_test, out: Path) -> dict:
    figures = {name: out / f"{name}.png" for name in ("samples_nfe", "samples_over_t", "nearest")}
    rows = {"real (test)": x_test[:10]}
    for name, by_nfe in samples.items():
        rows.update({f"{name}, {k}": x[:10] for k, x in by_nfe.items()})
    plot.image_rows(rows, _SHAPE, title="Digits: real and samples at several NFE (midpoint; "
                    "adaptive if named)", path=figures["samples_nfe"])  # fmt: skip
    rows = {}
    for name, xs in over_t.items():
        rows.update({f"{name}, t = {t:.1f}": x for t, x in zip(_TS, xs, strict=True)})
    plot.image_rows(rows, _SHAPE, title="Samples over t (one row per time)",
                    path=figures["samples_over_t"])  # fmt: skip
    rows = {}
    for name, by_nfe in samples.items():
        final = list(by_nfe.values())[-1][:10]
        idx, _ = _nearest(final, x_train)
        rows[f"{name} sample"] = final
        rows[f"{name}: nearest train"] = x_train[idx]
    plot.image_rows(rows, _SHAPE, title="Samples and their nearest training images",
                    path=figures["nearest"])  # fmt: skip
    return figures


# ----------------------------------------------------------------------------- part 2


def _part_gmm(cfg: DigitsConfig, key, progress: bool, out: Path) -> tuple[dict, dict]:
    problem = problems.get("digits_gmm")
    c, s = problem.coupling, problem.schedule
    k_train, k_eval = jax.random.split(key)
    reports, curves, samples = {}, {}, {}
    fields = {"exact": exact.velocity_field(exact.prepare(c), s)} if cfg.gmm_exact else {}
    pairs = c.sample
    if cfg.gmm_pool:
        # a pool of exact target draws (about steps x batch of them: little reuse): sampling
        # the 20-component mixture inside the training step bakes its factors into the program
        # as constants, whose folding costs XLA ~10 s per network on 2 cores
        pool = problem.target().sample(jax.random.fold_in(k_train, 7), cfg.gmm_pool)
        pairs = data.independent_pairs(data.gaussian_source(_DIM), data.from_array(pool))
    for name, model in _models(cfg).items():
        fit = _train(model, losses.cfm(model.apply, pairs, s, cfg.batch_size), k_train,
                     cfg.gmm_steps, cfg.learning_rate, progress)  # fmt: skip
        fields[name] = functools.partial(model.apply, fit.params)
    # n_eval source points: the same call as evaluate's adaptive solve, so its compiled solve
    # is reused; the figure shows the first 10
    x0 = jax.random.normal(jax.random.fold_in(k_eval, 1), (cfg.n_eval, _DIM))
    for name, v in fields.items():
        r = evaluation.evaluate(v, problem, key=k_eval, n=cfg.n_eval, n_times=cfg.n_times,
                                w2=False, nfe_step_counts=cfg.gmm_nfe_steps, rtol=cfg.tol,
                                atol=cfg.tol,
                                likelihood_steps=cfg.gmm_likelihood_steps)  # fmt: skip
        reports[name] = r.summary()
        if name != "exact":
            curves[name] = np.asarray(r.velocity_error)
        sol = sample.ode(v, x0, schedule=s, rtol=cfg.tol, atol=cfg.tol)
        samples[name] = np.asarray(sol.x[:10])
    curves["zero field"] = np.asarray(r.velocity_scale)
    figures = {"gmm_velocity_error": out / "gmm_velocity_error.png",
               "gmm_samples": out / "gmm_samples.png"}  # fmt: skip
    plot.error_curve(np.asarray(r.ts), curves, ylabel=r"$E\,|v_t - u_t|^2$",
                     title="64-D digits GMM: learned vs exact velocity",
                     path=figures["gmm_velocity_error"])  # fmt: skip
    rows = {"GMM (exact samples)": np.asarray(problem.target().sample(k_eval, 10))}
    rows.update({f"{k} (ODE)": x for k, x in samples.items()})
    plot.image_rows(rows, _SHAPE, title="64-D digits GMM: exact samples and ODE samples from the "
                    "same source points", path=figures["gmm_samples"])  # fmt: skip
    return reports, figures


def digits(
    config: DigitsConfig | None = None,
    *,
    quick: bool | None = None,
    out: str | os.PathLike = "outputs/digits",
    progress: bool = False,
) -> ExperimentResult:
    """MLP vs UNet on the 8x8 digits, then on the 64-D digits GMM against its exact answers.

    Metrics: ``images[model]`` for "MLP" and "UNet": ``bits_per_dim`` (dequantised test digits,
    Hutchinson likelihood with fixed midpoint steps), ``nearest_train_distance`` (mean L2
    distance of samples to their nearest training image; ``images.real`` has the same for test
    images), ``quality[sampler]`` (per NFE: ``class_histogram``, ``max_class_fraction``,
    ``mean_confidence``, ``frechet_logits`` against held-out real digits), ``final_loss``,
    ``n_params``, timings (adaptive solves at rtol = atol = ``tol``); ``images.real``: the
    classifier's own numbers on real test digits (the best a model can hope for).
    ``gmm64[field]`` for "exact" (with ``gmm_exact``), "MLP", "UNet": the ``fmjax.evaluate``
    summary on "digits_gmm". ``time_s``: seconds per part.

    Args:
        config: the settings (a ``DigitsConfig``); default: the quick or the full preset.
        quick: None: ``FMJAX_QUICK`` from the environment (``quick_from_env``); True:
            ``DigitsConfig.quick()``; ignored when ``config`` is given.
        out: folder for ``results.json`` and the figures (PNG).
        progress: show a progress bar for each training and a status line per phase (stderr).

    Returns:
        an ``ExperimentResult(experiment, config, metrics, figures, wall_time_s)``; the same JSON
            values are written to ``out``/results.json.
    """
    cfg = _resolve(_FN, DigitsConfig, config, quick)
    _checks.require("sklearn", _FN)
    t0 = time.perf_counter()
    out = _outdir(out)
    k_img, k_gmm = jax.random.split(jax.random.key(cfg.seed))
    images, figures = _part_images(cfg, k_img, progress, out)
    t1 = time.perf_counter()
    gmm, gmm_figures = _part_gmm(cfg, k_gmm, progress, out)
    figures.update(gmm_figures)
    metrics_ = {
        "images": images,
        "gmm64": gmm,
        "time_s": {"images": round(t1 - t0, 1), "gmm64": round(time.perf_counter() - t1, 1)},
    }
    return _finish("digits", cfg, out, metrics_, figures, t0)
