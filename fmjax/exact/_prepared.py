"""``exact.prepare``: a coupling with its time-free factors, consistent by construction."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import _checks
from fmjax.exact import _otmap, _pencil
from fmjax.mixtures import JointGaussianMixture, structure_of


def _structure(c: JointGaussianMixture) -> str:
    """The declared structure; a "general" concrete coupling is read off its numbers (``prepare``
    is the one place that looks; a traced one stays "general")."""
    if c.structure != "general" or not _checks.is_concrete(c.covs):
        return c.structure
    return structure_of(np.asarray(c.covs), c.dim)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity, as the mixtures are
class PreparedCoupling:
    """A coupling with its time-free factorisation, made by ``prepare``.

    A pytree (the coupling's and the factors' arrays are leaves, the flags are static),
    accepted by every ``exact`` function in place of the coupling and passing through ``jit``
    and ``vmap``. Consistent by construction: the factors and flags are derived from
    ``coupling`` and ``request`` here, so ``dataclasses.replace(p, coupling=other)`` factors
    ``other`` anew (the flags cannot be replaced: they are not fields of the constructor), and
    factors whose dtype no longer is the one they were computed in (e.g. a float32 one cast by
    ``jax.tree.map``) are recomputed from the coupling where they are used.

    Attributes:
        coupling: the joint mixture of (X0, X1).
        request: ``(independent, noise_diagonal, deterministic)`` as given to ``prepare``
            (``None`` where it equals what ``prepare`` derives).
        factors: the per-component time-free factors (private layout), ``None`` when the
            coupling is neither independent nor deterministic.
        independent: whether the time-free path of an independent coupling is taken (static).
        noise_diagonal: whether V^T V is diagonal in every component, so that schedules with
            latent noise keep the time-free path too (static; factors computed under a trace
            are not inspected: False unless declared).
        deterministic: whether the time-free path of a deterministic coupling
            x1 = m1 + A (x0 - m0), A symmetric positive-definite, is taken (static; schedules
            with latent noise take the per-time path).
        dtype: the dtype the factors were computed in (static).
    """

    coupling: JointGaussianMixture
    request: tuple = (None, None, None)
    factors: _pencil.Pencil | _otmap.Map | None = dataclasses.field(init=False)
    independent: bool = dataclasses.field(init=False)
    noise_diagonal: bool | None = dataclasses.field(init=False)
    deterministic: bool = dataclasses.field(init=False)
    dtype: str = dataclasses.field(init=False)

    def __post_init__(self):
        c, (independent, noise_diagonal, deterministic) = self.coupling, self.request
        _checks.check_instance(
            "exact.prepare", "coupling", c, JointGaussianMixture, "a JointGaussianMixture"
        )
        structure = _structure(c)
        request = list(self.request)
        if independent is None or independent == (structure == "independent"):
            independent, request[0] = structure == "independent", None  # as derived
        factors = _pencil.factor(c) if independent else None
        if factors is None:
            noise_diagonal = False
        elif _checks.is_concrete(factors.v):  # prepare looks once, here, when it can
            found = bool(_pencil.gram_is_diagonal(factors))
            if noise_diagonal is None or noise_diagonal == found:
                noise_diagonal, request[1] = found, None
        elif noise_diagonal is None:
            noise_diagonal = False  # traced factors are not inspected: the per-time path
        if independent:
            deterministic = False
        elif deterministic is None or deterministic == (structure == "map"):
            deterministic, request[2] = structure == "map", None
        if deterministic:
            factors = _otmap.factor(c)
        for name, value in (
            ("request", tuple(request)),  # normalised: equal preparations are equal pytrees
            ("factors", factors),
            ("independent", bool(independent)),
            ("noise_diagonal", noise_diagonal),
            ("deterministic", bool(deterministic)),
            ("dtype", str(c.means.dtype)),
        ):
            object.__setattr__(self, name, value)

    @property
    def dim(self) -> int:
        """Dimension d of each of X0 and X1."""
        return self.coupling.dim

    @property
    def n_components(self) -> int:
        """Number of components K."""
        return self.coupling.n_components

    def reweighted(self, log_scale) -> PreparedCoupling:
        """The same components with weights w_k exp(log_scale_k) (0 where log_scale_k = -inf):
        the coupling's weights and the factors' log-weights shifted together, nothing refactored
        (e.g. a class sub-coupling, ``conditional.given``)."""
        (w, *rest), treedef = jax.tree.flatten(self.coupling)
        w = jnp.where(jnp.isfinite(log_scale), w * jnp.exp(log_scale), 0.0)
        f = self.factors
        if f is not None:
            f = f._replace(log_w=f.log_w + log_scale)
        leaves = (jax.tree.unflatten(treedef, [w, *rest]), f)
        return _unflatten(tuple(getattr(self, m) for m in _META), leaves)

    def astype(self, dtype) -> PreparedCoupling:
        """This prepared coupling in ``dtype``: the coupling cast, the factors recomputed in it
        (the same object when nothing changes)."""
        if self.dtype == str(jnp.dtype(dtype)) and all(
            a.dtype == dtype for a in jax.tree.leaves((self.coupling, self.factors))
        ):
            return self
        c = jax.tree.map(lambda a: a.astype(dtype), self.coupling)
        out = object.__new__(PreparedCoupling)
        object.__setattr__(out, "coupling", c)
        for name in _META:
            object.__setattr__(out, name, getattr(self, name))
        object.__setattr__(out, "dtype", str(jnp.dtype(dtype)))
        form = _pencil if self.independent else _otmap if self.deterministic else None
        object.__setattr__(out, "factors", None if form is None else form.factor(c))
        return out


_META = ("request", "independent", "noise_diagonal", "deterministic", "dtype")


def _unflatten(meta, leaves):
    out = object.__new__(PreparedCoupling)  # no refactoring: the leaves are given
    for name, value in zip(("coupling", "factors") + _META, leaves + tuple(meta), strict=True):
        object.__setattr__(out, name, value)
    return out


jax.tree_util.register_pytree_node(
    PreparedCoupling,
    lambda p: ((p.coupling, p.factors), tuple(getattr(p, m) for m in _META)),
    lambda meta, leaves: _unflatten(meta, tuple(leaves)),
)


def prepare(
    coupling: JointGaussianMixture,
    *,
    independent: bool | None = None,
    noise_diagonal: bool | None = None,
    deterministic: bool | None = None,
) -> PreparedCoupling:
    """Factor a coupling once for all times: pass the result wherever a coupling is taken.

    For an independent coupling (S01 = S10 = 0 in every component) the factorisation is
    time-free (``fmjax.exact._pencil``): any pattern of times, one shared or one per point,
    then costs two large matrix products per block of components and no factorisation. With a
    schedule that carries latent noise this holds when V^T V is diagonal (e.g. an isotropic
    source or target in every component); otherwise such schedules take the per-time path.
    A deterministic coupling x1 = m1 + A (x0 - m0) in every component, A symmetric
    positive-definite (a Gaussian optimal-transport map; the joint covariance is singular), is
    time-free too, through the eigendecomposition of A (schedules without noise). Other
    couplings are wrapped as they are and keep the per-time Cholesky path. Which kernel runs:
    the table in ``fmjax.exact._plan``.

    Args:
        coupling: the joint mixture of (X0, X1).
        independent: ``None`` (default) takes the coupling's declared ``structure``, and reads
            a concrete "general" one off its numbers; ``True`` or ``False`` decides without
            looking. ``True`` on a coupling with cross-covariance drops it (wrong answers).
        noise_diagonal: ``None`` (default) checks on concrete factors whether V^T V is
            diagonal (traced ones are taken as not); ``True`` or ``False`` decides without
            looking. ``True`` when it is not diagonal drops its off-diagonal
            part in schedules with noise (wrong answers).
        deterministic: ``None`` (default) as ``independent``, for a deterministic coupling
            (A = S10 S00^{-1} symmetric positive-definite and S11 = A S00 A to
            max(1e-10, 1e3 eps) relative); ``True`` or ``False`` decides without looking
            (``True`` on another coupling gives wrong answers).

    Returns:
        A ``PreparedCoupling``.

    Raises:
        TypeError: for a coupling of the wrong type or a non-bool flag.
    """
    _checks.check_instance(
        "exact.prepare", "coupling", coupling, JointGaussianMixture, "a JointGaussianMixture"
    )
    flags = {"independent": independent, "noise_diagonal": noise_diagonal}
    for name, flag in {**flags, "deterministic": deterministic}.items():
        if flag is not None and not isinstance(flag, bool):
            _checks.fail("exact.prepare", name, "None, True or False", flag, TypeError)
    return PreparedCoupling(coupling, (independent, noise_diagonal, deterministic))
