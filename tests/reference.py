"""Independent float64 NumPy reference for the exact GMM path quantities.

Written apart from fmjax.exact on purpose: it builds the linear map z = (x0, x1) -> (X_t, dX_t)
as a 2d x 2d matrix, pushes each joint Gaussian through it, and conditions with
``np.linalg.solve`` / ``slogdet``. No Cholesky factors, no blocks, no streaming.

Latent noise gamma_t z (z ~ N(0, I) independent of (x0, x1)) is the third input of the linear
map: (x0, x1, z) -> (X_t, dX_t) = (b x0 + a x1 + gamma z, db x0 + da x1 + dgamma z). Its
contribution to the joint covariance of (X_t, dX_t) is [[gamma^2 I, g_dg I], [g_dg I, .]], with
g_dg = gamma dgamma from ``schedule.gamma`` (finite where dgamma is not); the (dX, dX) block is
never used.
"""

import numpy as np


def _coeffs(schedule, t):
    return [float(v) for v in schedule(np.float64(t))]


def _noise(schedule, t):
    """(gamma^2, gamma dgamma) at t; zeros for a schedule without noise."""
    noise = getattr(schedule, "noise", None)
    if noise is None:
        return 0.0, 0.0
    g, _, g_dg = (float(v) for v in schedule.gamma(np.float64(t)))
    return g * g, g_dg


def component_gaussians(weights, means, covs, coeffs):
    """Per component: mean and covariance of (X_t, dX_t) as one 2d-dimensional Gaussian."""
    a, b, da, db = coeffs
    d = means.shape[1] // 2
    eye = np.eye(d)
    lin = np.block([[b * eye, a * eye], [db * eye, da * eye]])
    mu = means @ lin.T
    cov = np.einsum("ij,kjl,ml->kim", lin, covs, lin)
    return mu, cov


def reference(weights, means, covs, schedule, t, x, *, divergence=False):
    """(velocity (N, d), log_prob (N,), score (N, d), responsibilities (N, K)) at scalar t,
    and the divergence (N,) last when ``divergence``."""
    weights, means, covs, x = (np.asarray(v, np.float64) for v in (weights, means, covs, x))
    d = means.shape[1] // 2
    mu, cov = component_gaussians(weights, means, covs, _coeffs(schedule, t))
    g2, g_dg = _noise(schedule, t)
    cov = cov.copy()
    cov[:, :d, :d] += g2 * np.eye(d)
    cov[:, d:, :d] += g_dg * np.eye(d)
    n, k = x.shape[0], weights.shape[0]
    logp = np.empty((n, k))
    vel = np.empty((n, k, d))
    scr = np.empty((n, k, d))
    trs = np.empty(k)
    for j in range(k):
        sxx = cov[j, :d, :d]
        svx = cov[j, d:, :d]
        diff = x - mu[j, :d]
        sol = np.linalg.solve(sxx, diff.T).T  # S^{-1}(x - mu)
        _, logdet = np.linalg.slogdet(sxx)
        logp[:, j] = (
            np.log(weights[j])
            - 0.5 * np.sum(diff * sol, axis=1)
            - 0.5 * logdet
            - 0.5 * d * np.log(2 * np.pi)
        )
        vel[:, j] = mu[j, d:] + sol @ svx.T
        scr[:, j] = -sol
        trs[j] = np.trace(np.linalg.solve(sxx, svx))  # tr(C S^-1) = tr(S^-1 C)
    top = logp.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logp - top).sum(axis=1))
    resp = np.exp(logp - lse[:, None])
    u = np.einsum("nk,nkd->nd", resp, vel)
    s = np.einsum("nk,nkd->nd", resp, scr)
    out = (u, lse, s, resp)
    if divergence:
        # div u = sum_k alpha_k (tr_k + (s_k - s) . (v_k - u)), centred: no cancellation.
        cen = np.einsum("nkd,nkd->nk", scr - s[:, None], vel - u[:, None])
        out = out + (np.einsum("nk,nk->n", resp, trs[None] + cen),)
    return out
