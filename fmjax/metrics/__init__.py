"""Sample-based distances and errors against exact answers.

Two-sample distances between point clouds ``x`` (n, d) and ``y`` (m, d):

* ``energy_distance``: 2 E|X - Y| - E|X - X'| - E|Y - Y'| (U- or V-statistic),
* ``mmd``: squared maximum mean discrepancy with a sum of RBF kernels (unbiased),
* ``sliced_wasserstein``: mean over random directions of the 1-D W_p^p (ott-jax),
* ``w2``: squared 2-Wasserstein distance, exact (Hungarian) or entropic (debiased Sinkhorn
  divergence), via ott-jax,
* ``gaussian_w2``: closed-form W2^2 between two Gaussians (the reference for the above).

Errors of a learned model against the exact GMM answers:

* ``velocity_error``: E|v(t, X_t) - u_t(X_t)|^2 over X_t ~ p_t, as a curve over times,
* ``component_stats``: weights, means and covariances of samples per exact-responsibility
  component of the target (collapse and spread of each mode both show),
* ``sample_checks``: those moments and the cross-entropy E_q[-log p] of samples under the exact
  target (below its entropy: collapse, above: spread),
* ``nll``: mean negative log-likelihood of samples under an exact density,
* ``nfe_to_accuracy``: fewest solver steps whose samples are within a tolerance.

Everything except ``nfe_to_accuracy`` (a loop over a few separate solves) is jit-compatible,
with sizes and options static. ``sliced_wasserstein`` and ``w2`` need ott-jax (``fmjax[ot]``).
"""

from fmjax.metrics.components import ComponentStats as ComponentStats
from fmjax.metrics.components import SampleChecks as SampleChecks
from fmjax.metrics.components import component_stats as component_stats
from fmjax.metrics.components import sample_checks as sample_checks
from fmjax.metrics.errors import NFEResult as NFEResult
from fmjax.metrics.errors import nfe_to_accuracy as nfe_to_accuracy
from fmjax.metrics.errors import nll as nll
from fmjax.metrics.errors import velocity_error as velocity_error
from fmjax.metrics.kernels import energy_distance as energy_distance
from fmjax.metrics.kernels import mmd as mmd
from fmjax.metrics.wasserstein import gaussian_w2 as gaussian_w2
from fmjax.metrics.wasserstein import sliced_wasserstein as sliced_wasserstein
from fmjax.metrics.wasserstein import w2 as w2

__all__ = [
    "energy_distance",
    "mmd",
    "sliced_wasserstein",
    "w2",
    "gaussian_w2",
    "velocity_error",
    "nll",
    "nfe_to_accuracy",
    "NFEResult",
    "component_stats",
    "ComponentStats",
    "sample_checks",
    "SampleChecks",
]
