"""Independent float64 NumPy reference for the exact GMM path quantities.

Written apart from fmjax.exact on purpose: it builds the linear map z = (x0, x1) -> (X_t, dX_t)
as a 2d x 2d matrix, pushes each joint Gaussian through it, and conditions with
``np.linalg.solve`` / ``slogdet``. No Cholesky factors, no blocks, no streaming.
"""

import numpy as np


def _coeffs(schedule, t):
    return [float(v) for v in schedule(np.float64(t))]


def component_gaussians(weights, means, covs, coeffs):
    """Per component: mean and covariance of (X_t, dX_t) as one 2d-dimensional Gaussian."""
    a, b, da, db = coeffs
    d = means.shape[1] // 2
    eye = np.eye(d)
    lin = np.block([[b * eye, a * eye], [db * eye, da * eye]])
    mu = means @ lin.T
    cov = np.einsum("ij,kjl,ml->kim", lin, covs, lin)
    return mu, cov


def reference(weights, means, covs, schedule, t, x):
    """(velocity (N, d), log_prob (N,), score (N, d), responsibilities (N, K)) at scalar t."""
    weights, means, covs, x = (np.asarray(v, np.float64) for v in (weights, means, covs, x))
    d = means.shape[1] // 2
    mu, cov = component_gaussians(weights, means, covs, _coeffs(schedule, t))
    n, k = x.shape[0], weights.shape[0]
    logp = np.empty((n, k))
    vel = np.empty((n, k, d))
    scr = np.empty((n, k, d))
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
    top = logp.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logp - top).sum(axis=1))
    resp = np.exp(logp - lse[:, None])
    return (
        np.einsum("nk,nkd->nd", resp, vel),
        lse,
        np.einsum("nk,nkd->nd", resp, scr),
        resp,
    )
