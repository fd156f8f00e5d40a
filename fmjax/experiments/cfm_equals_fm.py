"""Experiment 4: conditional and marginal flow-matching gradients agree."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import _checks, losses, models, plot
from fmjax.experiments._common import (
    ExperimentResult,
    _Config,
    _f,
    _finish,
    _mlp,
    _outdir,
    _resolve,
    _train,
)
from fmjax.experiments.demo import demo_problem

_FN = "experiments.cfm_equals_fm"


@dataclasses.dataclass(frozen=True)
class CFMConfig(_Config):
    """Settings of :func:`cfm_equals_fm`.

    Attributes:
        batch_sizes: the batch sizes B compared, increasing multiples of the first (the larger
            batches are nested unions of chunks of the first size).
        repeats: independent CFM and FM gradients per batch size (the mean and std of their
            cosines).
        n_reference: points of the reference marginal-FM gradient (and of the CFM gradient
            behind ``cosine_large_batch``).
        width: hidden layer size of the MLP.
        depth: number of hidden layers of the MLP.
        pretrain_steps: CFM training steps (batch 256) before the gradients are taken; 0: a
            fresh initialisation.
        learning_rate: peak Adam learning rate of the pretraining (cosine decay).
        seed: seed of the run's PRNG key.
    """

    batch_sizes: tuple[int, ...] = (8, 32, 128, 512, 2048, 8192)
    repeats: int = 32
    n_reference: int = 65536
    width: int = 64
    depth: int = 2
    pretrain_steps: int = 20
    learning_rate: float = 3e-3
    seed: int = 0

    _QUICK = dict(batch_sizes=(8, 64, 512, 4096), repeats=8, n_reference=16384)


def _flat(tree):
    return jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])


@functools.partial(jax.jit, static_argnums=0)
def _batch_grad(loss, params, key):
    return _flat(jax.grad(loss)(params, key))


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _nested_cosines(loss, params, g_ref, key, n_chunks: int, repeats: int):
    """Cosine to ``g_ref`` of the running-mean gradient after each chunk: (n_chunks, repeats).

    Repeat r draws chunk gradients on independent keys; after c chunks of b0 points the running
    mean is the loss gradient on a batch of (c + 1) b0 points (nested batches), so one compiled
    scan gives every batch size that is a multiple of b0.
    """
    grad = jax.vmap(lambda k: _flat(jax.grad(loss)(params, k)))
    keys = jax.random.split(key, (n_chunks, repeats))
    ref = g_ref / jnp.linalg.norm(g_ref)

    def step(total, kc):
        c, k = kc
        total = total + grad(k)
        mean = total / (c + 1.0)
        return total, (mean @ ref) / jnp.linalg.norm(mean, axis=-1)

    init = jnp.zeros((repeats, g_ref.shape[0]), g_ref.dtype)
    _, cosines = jax.lax.scan(step, init, (jnp.arange(n_chunks, dtype=g_ref.dtype), keys))
    return cosines


def _check_sizes(sizes) -> None:
    if list(sizes) != sorted(set(sizes)) or any(b % sizes[0] for b in sizes):
        _checks.fail(_FN, "config.batch_sizes", "increasing multiples of the first", sizes)


def _models(cfg: CFMConfig) -> dict[str, models.MLP]:
    """The networks this experiment trains, by label: an MLP on the 2-D demo problem."""
    return {"MLP": _mlp(2, cfg.width, cfg.depth)}


def _start_params(model, coupling, s, cfg: CFMConfig, key, progress: bool):
    """Parameters after ``pretrain_steps`` of CFM (a fresh initialisation if 0)."""
    if not cfg.pretrain_steps:
        return models.init(model, key=jax.random.fold_in(key, 0))
    loss = losses.cfm(model.apply, coupling.sample, s, 256)
    return _train(model, loss, key, cfg.pretrain_steps, cfg.learning_rate, progress).params


def _cosines(model, coupling, s, params, g_ref, cfg: CFMConfig, key) -> dict:
    """Mean and std over repeats of the cosine to ``g_ref``, per kind and batch size."""
    b0 = cfg.batch_sizes[0]
    n_chunks = cfg.batch_sizes[-1] // b0
    at = np.asarray(cfg.batch_sizes) // b0 - 1  # chunk index after which the batch is complete
    loss = {
        "cfm": losses.cfm(model.apply, coupling.sample, s, b0),
        "fm": losses.marginal_fm(model.apply, coupling, s, b0),
    }
    cos = {}
    for kind in ("cfm", "fm"):
        k = jax.random.fold_in(key, len(kind))
        c = np.asarray(_nested_cosines(loss[kind], params, g_ref, k, n_chunks, cfg.repeats))[at]
        cos[f"cosine_{kind}"] = c.mean(axis=1).tolist()
        cos[f"cosine_{kind}_std"] = c.std(axis=1).tolist()
    return cos


@plot.styled
def _cosine_figure(batch_sizes, cos: dict, cfg: CFMConfig, path: Path) -> Path:
    fig, axes = plot.figure(1, 1, size=4.2)
    ax = axes[0, 0]
    bs = np.asarray(batch_sizes)
    for kind, label, color in (
        ("cfm", "conditional FM (CFM)", "tab:blue"),
        ("fm", "marginal FM (exact target)", "tab:orange"),
    ):
        m, sd = np.asarray(cos[f"cosine_{kind}"]), np.asarray(cos[f"cosine_{kind}_std"])
        ax.plot(bs, m, "o-", color=color, label=label)
        ax.fill_between(bs, m - sd, np.minimum(m + sd, 1.0), color=color, alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_xticks(bs, [str(b) for b in bs])
    ax.minorticks_off()
    ax.set_xlabel("batch size B")
    ax.set_ylabel(f"cosine to the FM gradient on {cfg.n_reference} points")
    ax.set_title(f"CFM and FM gradients agree (mean ± std, {cfg.repeats} batches)")
    ax.axhline(1.0, color="0.6", linewidth=0.8, linestyle="--")
    ax.legend(loc="lower right")
    return plot.save(fig, path)


def _cosine(a, b) -> float:
    return _f(jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def cfm_equals_fm(
    config: CFMConfig | None = None,
    *,
    quick: bool | None = None,
    out: str | os.PathLike = "outputs/cfm_equals_fm",
    progress: bool = False,
) -> ExperimentResult:
    """The conditional (CFM) and marginal (FM, exact target) losses have the same gradients.

    On the demo problem and an MLP briefly trained (``pretrain_steps``, so the gradient is not
    the easy one of a fresh network; the longer the training, the smaller the true gradient
    relative to the sampling noise and the larger the batch needed), the reference gradient is
    the marginal-FM gradient on ``n_reference`` points. For each batch size B, ``repeats``
    independent CFM and FM gradients on B points (nested batches, ``_nested_cosines``) are
    compared with it by cosine similarity: both converge to 1 (same
    expectation), FM faster (no conditional noise). ``cosine_large_batch`` compares the CFM and
    FM gradients on ``n_reference`` points directly.

    Args:
        config: the settings (a ``CFMConfig``); default: the quick or the full preset.
        quick: None: ``FMJAX_QUICK`` from the environment (``quick_from_env``); True:
            ``CFMConfig.quick()``; ignored when ``config`` is given.
        out: folder for ``results.json`` and the figures (PNG).
        progress: show a progress bar for each training and a status line per phase (stderr).

    Returns:
        an ``ExperimentResult(experiment, config, metrics, figures, wall_time_s)``; the same JSON
            values are written to ``out``/results.json.
    """
    cfg = _resolve(_FN, CFMConfig, config, quick)
    _check_sizes(cfg.batch_sizes)
    t0 = time.perf_counter()
    out = _outdir(out)
    k_train, k_ref, k_ref2, k_rep = jax.random.split(jax.random.key(cfg.seed), 4)
    coupling, s = demo_problem()
    model = _models(cfg)["MLP"]
    params = _start_params(model, coupling, s, cfg, k_train, progress)
    n_ref = cfg.n_reference
    g_ref = _batch_grad(losses.marginal_fm(model.apply, coupling, s, n_ref), params, k_ref)
    g_ref_cfm = _batch_grad(losses.cfm(model.apply, coupling.sample, s, n_ref), params, k_ref2)
    cos = _cosines(model, coupling, s, params, g_ref, cfg, k_rep)
    figures = {
        "gradient_cosine": _cosine_figure(cfg.batch_sizes, cos, cfg, out / "gradient_cosine.png")
    }
    metrics_ = {
        "batch_sizes": list(cfg.batch_sizes),
        **cos,
        "cosine_large_batch": _cosine(g_ref_cfm, g_ref),
    }
    return _finish("cfm_equals_fm", cfg, out, metrics_, figures, t0)
