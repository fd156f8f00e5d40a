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

Part 3, class-conditional: a UNet with a label input (``num_classes=10``) is trained by CFM with
label dropout (``p_uncond``) on labelled pairs of the labelled digits GMM
(``fmjax.problems.digits_gmm_labelled``: one GMM per digit, so the exact class-conditional
field u_t(x | y) and the Bayes classifier are known in 64-D), and sampled with classifier-free
guidance (``sample.guided``) at several weights w. The learned UNet and the exact conditional
field (the reference row) are scored by ``fmjax.evaluate_conditional`` (accuracy under the exact
Bayes classifier against the Bayes accuracy, cross-entropy minus the class entropy, relative
velocity error against u_t(x | y)) and by the in-run classifier of real digits (the fraction of
the samples generated for class y that it labels y). Shown: a sample grid per class at a few w,
and the guidance curves.
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
    conditional,
    data,
    evaluation,
    exact,
    guidance,
    losses,
    mixtures,
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
_CLASSES = 10
_COND = "UNet (class-conditional)"  # the part-3 network's label in ``_models``


@dataclasses.dataclass(frozen=True)
class DigitsConfig(_Config):
    """Settings of :func:`digits`. The defaults are meant for a GPU (on 2 CPU cores a run had not
    finished after 40 min); ``quick()`` takes ~100 s on 2 CPU cores (part 3: ~30-40 s). For a
    longer GPU run try ``steps=20000, unet_channels=64, batch_size=256``.

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
        cond_steps: CFM training steps of the class-conditional UNet (part 3).
        cond_p_uncond: label dropout of its training, in (0, 1): the probability that a label is
            replaced by the null class.
        cond_components: Gaussian components per digit of the labelled digits GMM (part 3).
        cond_weights: guidance weights w (>= 0) at which both fields are scored.
        cond_grid_weights: the weights shown in the sample grid (each one of ``cond_weights``).
        cond_n: samples per class and points per class of each estimate (part 3).
        cond_ode_steps: fixed midpoint steps of the part-3 solves, or None for adaptive Tsit5 at
            ``tol``.
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
    cond_steps: int = 3000
    cond_p_uncond: float = 0.2
    cond_components: int = 2
    cond_weights: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0)
    cond_grid_weights: tuple[float, ...] = (0.0, 1.0, 3.0)
    cond_n: int = 200
    cond_ode_steps: int | None = None
    tol: float = 1e-5
    seed: int = 0

    # Quick (CI; mostly compilation): tiny networks (a one-level UNet of 8 channels), 100
    # steps, 200 samples at NFE 2 and 8 (no adaptive solve), bits/dim of 32 test digits by 4
    # midpoint steps, and the 64-D evaluation of the MLP and UNet (not of the exact field) on
    # 200 points with a 4-step likelihood: every part of the report, with numbers only good
    # enough to check that it runs. Part 3: a 200-step conditional UNet, scored with the exact
    # field at w = 0, 1, 3 on 20 samples per class by 16 midpoint steps (the guidance effect
    # shows; the learned field is far from u_t(x | y)).
    _QUICK = dict(
        steps=100, batch_size=32, mlp_width=64, mlp_depth=2, unet_channels=8,
        unet_channel_mults=(1,), unet_embedding=16, n_samples=200, nfe_steps=(1, 4),
        adaptive=False, n_likelihood=32, likelihood_steps=4, gmm_steps=100, n_eval=200,
        n_times=4, tol=1e-3, gmm_nfe_steps=(1, 4, 16), gmm_likelihood_steps=4, gmm_pool=4096,
        gmm_exact=False, cond_steps=200, cond_weights=(0.0, 1.0, 3.0), cond_n=20,
        cond_ode_steps=16,
    )  # fmt: skip

    def __post_init__(self):
        """The field checks of ``_Config``, then: ``cond_p_uncond`` < 1 and each grid weight
        one of ``cond_weights`` (``ValueError`` naming the field)."""
        super().__post_init__()
        fn = f"experiments.{type(self).__name__}"
        if self.cond_p_uncond >= 1:
            _checks.fail(fn, "cond_p_uncond", "in (0, 1)", self.cond_p_uncond)
        if not set(self.cond_grid_weights) <= set(self.cond_weights):
            _checks.fail(fn, "cond_grid_weights", f"among cond_weights {self.cond_weights}",
                         self.cond_grid_weights)  # fmt: skip


def _models(cfg: DigitsConfig) -> dict:
    """The networks this experiment trains, by label: the MLP and the UNet of parts 1 and 2,
    and the class-conditional UNet of part 3 (the same UNet with a label input)."""
    unet = models.UNet(
        image_shape=_SHAPE,
        channels=cfg.unet_channels,
        channel_mults=cfg.unet_channel_mults,
        embedding_dim=cfg.unet_embedding,
    )
    return {
        "MLP": models.MLP(dim=_DIM, width=cfg.mlp_width, depth=cfg.mlp_depth),
        "UNet": unet,
        _COND: unet.clone(num_classes=_CLASSES),
    }


def _unconditional(cfg: DigitsConfig) -> dict:
    """The networks of parts 1 and 2 (no label input)."""
    return {k: m for k, m in _models(cfg).items() if k != _COND}


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


def _real_digits(cfg: DigitsConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat digits in [-1, 1]: train (n_train, 64), test (rest, 64), and all labels."""
    x_all, y_all = np.asarray(data.digits(flat=True)), np.asarray(data.digits_labels())
    return x_all[: cfg.n_train], x_all[cfg.n_train :], y_all


def _part_images(cfg: DigitsConfig, key, clf, progress: bool, out: Path) -> tuple[dict, dict]:
    x_train, x_test, y_all = _real_digits(cfg)
    ref_logits = clf.decision_function(x_test)
    k_train, k_x0, k_ll = jax.random.split(key, 3)
    x0 = jax.random.normal(k_x0, (cfg.n_samples, _DIM))
    pairs = data.independent_pairs(data.gaussian_source(_DIM), _dequantised(jnp.asarray(x_train)))
    s = schedules.linear()
    metrics_, samples, over_t = {}, {}, {}
    for name, model in _unconditional(cfg).items():
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
    for name, model in _unconditional(cfg).items():
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


# ----------------------------------------------------------------------------- part 3


def _per_class(values: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class mean (C,) and its standard error (C,) of ``values`` (N,) grouped by ``y`` (N,)."""
    groups = [values[y == c] for c in range(_CLASSES)]
    mean = np.array([g.mean() for g in groups])
    se = np.array([g.std() / math.sqrt(g.size) for g in groups])
    return mean, se


def _class_mean_se(se: np.ndarray) -> float:
    """Standard error of the mean over classes of independent per-class estimates."""
    return float(np.sqrt(np.sum(np.asarray(se) ** 2)) / len(se))


def _guidance_row(r: guidance.ConditionalReport, real: np.ndarray, real_se: np.ndarray) -> dict:
    """One (field, w) row: class means of the report and of the real-digit classifier's accuracy."""
    gap_se = np.sqrt(r.cross_entropy_stderr**2 + r.entropy_stderr**2)
    return {
        "accuracy": r.mean_accuracy,
        "accuracy_stderr": _class_mean_se(r.accuracy_stderr),
        "bayes_accuracy": r.mean_bayes_accuracy,
        "bayes_accuracy_stderr": _class_mean_se(r.bayes_accuracy_stderr),
        "cross_entropy_gap": r.mean_cross_entropy_gap,
        "cross_entropy_gap_stderr": _class_mean_se(gap_se),
        "relative_velocity_error": r.relative_velocity_error,
        "real_classifier_accuracy": float(real.mean()),
        "real_classifier_accuracy_stderr": _class_mean_se(real_se),
        "accuracy_per_class": r.accuracy,
        "real_classifier_accuracy_per_class": real,
        "nfe": r.nfe,
    }


def guidance_table(metrics_: dict) -> str:
    """The part-3 table (markdown): one row per guidance weight and field.

    Args:
        metrics_: ``result.metrics["conditional"]`` of :func:`digits`.

    Returns:
        the table as markdown text, one line per (w, field): Bayes-classifier accuracy (and the
        Bayes accuracy), CE - H in nats, the real-digit classifier's accuracy and the relative
        velocity error.
    """
    head = ("| w | field | accuracy (Bayes classifier) | Bayes accuracy | CE − H (nats) | "
            "real-digit classifier accuracy | relative velocity error |")  # fmt: skip
    lines = [head, "|" + "---|" * 7]
    for w in metrics_["weights"]:
        for field in ("exact", "learned"):
            r = metrics_.get(field, {}).get(f"w={w:g}")
            if r is None:
                continue
            lines.append(
                f"| {w:g} | {field} | {r['accuracy']:.3f} ± {r['accuracy_stderr']:.3f} | "
                f"{r['bayes_accuracy']:.3f} | {r['cross_entropy_gap']:+.2f} ± "
                f"{r['cross_entropy_gap_stderr']:.2f} | {r['real_classifier_accuracy']:.3f} | "
                f"{r['relative_velocity_error']:.3f} |"
            )
    return "\n".join(lines)


def _part_conditional(cfg: DigitsConfig, key, clf, progress: bool, out: Path):
    target = problems.digits_gmm_labelled(components_per_class=cfg.cond_components)
    c = mixtures.independent_coupling(mixtures.standard_normal(_DIM, target.means.dtype), target)
    prepared, s = exact.prepare(c), schedules.linear()
    k_train, k_x0, k_eval = jax.random.split(key, 3)
    model = _models(cfg)[_COND]
    t0 = time.perf_counter()
    loss = losses.cfm(model.apply, conditional.labelled_pairs(c), s, cfg.batch_size,
                      num_classes=_CLASSES, p_uncond=cfg.cond_p_uncond)  # fmt: skip
    fit = _train(model, loss, k_train, cfg.cond_steps, cfg.learning_rate, progress)
    t_train = time.perf_counter() - t0
    fields = {"exact": conditional.velocity_field(prepared, s),
              "learned": functools.partial(model.apply, fit.params)}  # fmt: skip
    solve = (dict(solver="midpoint", steps=cfg.cond_ode_steps) if cfg.cond_ode_steps
             else dict(rtol=cfg.tol, atol=cfg.tol))  # fmt: skip
    # cond_n samples per class from the same source points at every w (the compiled solve of
    # each field is reused: the weight is a leaf of the guided field)
    y = np.repeat(np.arange(_CLASSES), cfg.cond_n)
    x0 = jax.random.normal(k_x0, (y.size, _DIM), target.means.dtype)
    rows, grids = {}, {}
    for name, field in fields.items():
        rows[name] = {}
        for w in cfg.cond_weights:
            r = guidance.evaluate_conditional(field, prepared, s, key=k_eval, weight=w,
                                              n=cfg.cond_n, null=_CLASSES, **solve)  # fmt: skip
            guided = sample.guided(field, jnp.asarray(y), w, null=_CLASSES, schedule=s)
            x = np.clip(np.asarray(sample.ode(guided, x0, schedule=s, **solve).x), -1.0, 1.0)
            real, real_se = _per_class((clf.predict(x.astype(np.float64)) == y) * 1.0, y)
            rows[name][f"w={w:g}"] = _guidance_row(r, real, real_se)
            if w in cfg.cond_grid_weights:
                grids[(name, w)] = x.reshape(_CLASSES, cfg.cond_n, _DIM)
    metrics_ = {
        "weights": list(cfg.cond_weights),
        "p_uncond": cfg.cond_p_uncond,
        "final_loss": float(np.mean(np.asarray(fit.losses)[-max(1, cfg.cond_steps // 10) :])),
        "train_time_s": round(t_train, 2),
        **rows,
    }
    metrics_["table"] = guidance_table(metrics_)
    figures = {"conditional_samples": out / "conditional_samples.png",
               "guidance_curves": out / "guidance_curves.png"}  # fmt: skip
    _class_grids(grids, cfg.cond_grid_weights, path=figures["conditional_samples"])
    _guidance_curves(metrics_, path=figures["guidance_curves"])
    return metrics_, figures


def _mosaic(x: np.ndarray, ncols: int) -> np.ndarray:
    """(C, n, 64) images as one (C * 9 - 1, k * 9 - 1) picture of C rows and k = min(ncols, n)
    columns, with 1-pixel gaps (NaN: drawn blank)."""
    h, w = _SHAPE[:2]
    k = min(ncols, x.shape[1])
    tiles = np.pad(x[:, :k].reshape(x.shape[0], k, h, w), ((0, 0), (0, 0), (0, 1), (0, 1)),
                   constant_values=np.nan)  # fmt: skip
    return tiles.transpose(0, 2, 1, 3).reshape(x.shape[0] * (h + 1), k * (w + 1))[:-1, :-1]


@plot.styled
def _class_grids(grids: dict, weights: tuple[float, ...], *, path: Path, ncols: int = 8):
    """Samples per class (rows: digits 0-9) at each grid weight, learned UNet and exact field."""
    names = [n for n in ("learned", "exact") if any(k[0] == n for k in grids)]
    fig, axes = plot.figure(len(names), len(weights), size=2.6)
    for i, name in enumerate(names):
        for j, w in enumerate(weights):
            ax = axes[i, j]
            ax.imshow(_mosaic(grids[(name, w)], ncols), cmap="gray", vmin=-1.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks(np.arange(_CLASSES) * (_SHAPE[0] + 1) + _SHAPE[0] / 2 - 0.5)
            ax.set_yticklabels([str(c) for c in range(_CLASSES)] if j == 0 else [])
            ax.set_title(f"{'UNet' if name == 'learned' else 'exact field'}, w = {w:g}")
    fig.suptitle("Class-conditional digits (labelled digits GMM): one row per class, CFG")
    plot.save(fig, path)


@plot.styled
def _guidance_curves(metrics_: dict, *, path: Path):
    """Accuracy (Bayes and real-digit classifiers) and CE - H against w, exact and learned."""
    ws = np.asarray(metrics_["weights"], float)
    fig, axes = plot.figure(1, 2, size=3.4)
    ax_acc, ax_ce = axes[0]
    for name, style in (("exact", "--"), ("learned", "-")):
        if name not in metrics_:
            continue
        rows = [metrics_[name][f"w={w:g}"] for w in ws]
        for key, label in (("accuracy", "Bayes classifier"),
                           ("real_classifier_accuracy", "real-digit classifier")):  # fmt: skip
            ax_acc.errorbar(ws, [r[key] for r in rows], [r[f"{key}_stderr"] for r in rows],
                            linestyle=style, marker="o", markersize=3, capsize=2,
                            label=f"{name}: {label}")  # fmt: skip
        ax_ce.errorbar(ws, [r["cross_entropy_gap"] for r in rows],
                       [r["cross_entropy_gap_stderr"] for r in rows], linestyle=style,
                       marker="o", markersize=3, capsize=2, label=name)  # fmt: skip
    bayes = metrics_["exact" if "exact" in metrics_ else "learned"][f"w={ws[0]:g}"]
    ax_acc.axhline(bayes["bayes_accuracy"], color="gray", linewidth=0.8, label="Bayes accuracy")
    ax_acc.axhline(1.0 / _CLASSES, color="gray", linestyle=":", linewidth=0.8, label="chance")
    ax_ce.axhline(0.0, color="gray", linewidth=0.8)
    ax_ce.set_yscale("symlog", linthresh=1.0)
    for ax, ylabel in ((ax_acc, "accuracy of the samples"), (ax_ce, "CE − H (nats)")):
        ax.set_xlabel("guidance weight w")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("CFG on the labelled digits GMM: exact field vs class-conditional UNet")
    plot.save(fig, path)


def digits(
    config: DigitsConfig | None = None,
    *,
    quick: bool | None = None,
    out: str | os.PathLike = "outputs/digits",
    progress: bool = False,
) -> ExperimentResult:
    """MLP vs UNet on the 8x8 digits, then on the 64-D digits GMM against its exact answers, then
    a class-conditional UNet with CFG against the exact per-class answers of the labelled GMM.

    Metrics: ``images[model]`` for "MLP" and "UNet": ``bits_per_dim`` (dequantised test digits,
    Hutchinson likelihood with fixed midpoint steps), ``nearest_train_distance`` (mean L2
    distance of samples to their nearest training image; ``images.real`` has the same for test
    images), ``quality[sampler]`` (per NFE: ``class_histogram``, ``max_class_fraction``,
    ``mean_confidence``, ``frechet_logits`` against held-out real digits), ``final_loss``,
    ``n_params``, timings (adaptive solves at rtol = atol = ``tol``); ``images.real``: the
    classifier's own numbers on real test digits (the best a model can hope for).
    ``gmm64[field]`` for "exact" (with ``gmm_exact``), "MLP", "UNet": the ``fmjax.evaluate``
    summary on "digits_gmm". ``conditional``: part 3, with ``weights`` (the guidance weights),
    ``exact`` and ``learned`` (the class-conditional UNet), each ``{"w=<w>": row}`` whose row
    holds the class means of ``fmjax.evaluate_conditional`` (``accuracy`` under the exact Bayes
    classifier, ``bayes_accuracy``, ``cross_entropy_gap`` = CE - H in nats,
    ``relative_velocity_error``, with standard errors) and ``real_classifier_accuracy`` (the
    in-run classifier of real digits on the samples of each class, class mean and per class);
    ``table``: those rows as markdown (``guidance_table``); ``final_loss``, ``train_time_s``.
    ``time_s``: seconds per part.

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
    k_cond = jax.random.fold_in(jax.random.key(cfg.seed), 3)  # parts 1 and 2 keep their keys
    x_train, _, y_all = _real_digits(cfg)
    clf = _classifier(x_train, y_all[: cfg.n_train])
    images, figures = _part_images(cfg, k_img, clf, progress, out)
    t1 = time.perf_counter()
    gmm, gmm_figures = _part_gmm(cfg, k_gmm, progress, out)
    t2 = time.perf_counter()
    cond, cond_figures = _part_conditional(cfg, k_cond, clf, progress, out)
    figures.update(gmm_figures)
    figures.update(cond_figures)
    metrics_ = {
        "images": images,
        "gmm64": gmm,
        "conditional": cond,
        "time_s": {
            "images": round(t1 - t0, 1),
            "gmm64": round(t2 - t1, 1),
            "conditional": round(time.perf_counter() - t2, 1),
        },  # fmt: skip
    }
    return _finish("digits", cfg, out, metrics_, figures, t0)
