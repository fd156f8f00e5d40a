"""The exact engine's dispatch table (``fmjax.exact._plan``), walked row by row, and what goes
through it: the velocity Jacobian on every row that computes it, the centred divergence of the
time-free per-point row in float32, ``PreparedCoupling`` consistency, dtype promotion."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmjax
from fmjax import exact, schedules
from fmjax.exact import _pencil, _plan, _stream
from tests.reference import component_terms, reference
from tests.test_exact_maps import _map_coupling

# ----------------------------------------------------------------------------- the table


def _tables():
    """Tables A and B of ``_plan``'s docstring: lists of row dicts, in order."""
    tables, rows, header = [], None, None
    for line in _plan.__doc__.splitlines():
        if not line.startswith("|"):
            rows = None
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if rows is None:
            header, rows = cells, []
            tables.append(rows)
        elif not set(cells[0]) <= {"-"}:
            rows.append(dict(zip(header, cells, strict=True)))
    assert len(tables) == 2, tables
    return tables


def _matches(col: str, cell: str, value) -> bool:
    if cell == "any":
        return True
    if col == "d":
        return value <= 8 if cell == "<=8" else value > 8
    if col == "quantities":  # "responsibilities" or "low"
        return value == {cell} if cell == "responsibilities" else value <= _plan.LOW
    if col == "prepared":
        return ("yes" if value else "no") == cell
    return value in cell.split(",")


def _first(table, **inputs):
    for i, row in enumerate(table):
        if all(_matches(col, row[col], v) for col, v in inputs.items()):
            return i, row
    raise AssertionError(f"no row for {inputs}")


_QSETS = [
    frozenset({"responsibilities"}),
    frozenset({"velocity"}),
    frozenset({"velocity", "log_prob", "score"}),
    frozenset({"divergence"}),
    frozenset({"jacobian"}),
    frozenset({"velocity", "log_prob", "divergence"}),
]


def test_plan_is_its_table_row_by_row():
    """Over every combination of the plan's inputs, ``plan`` answers what the first matching row
    of tables A and B says (``checked``: a device-side choice between the rows of ``pencil``
    and ``cholesky``), and every row of both tables is the answer somewhere (reachable).
    Control: a table with two rows swapped disagrees with ``plan``."""
    table_a, table_b = _tables()
    hit_a, hit_b = set(), set()

    def lookup_b(form, times, d, q, backend):
        i, row = _first(table_b, quantities=q, form=form, times=times, d=d)
        hit_b.add(i)
        chunks = {"never": False, "cpu": backend == "cpu", "cpu, >8": backend == "cpu" and d > 8}
        return _plan.Kernel(row["kernel"], chunks[row["chunks"]])

    disagree = 0
    domain = itertools.product(
        ("general", "independent", "map"),
        (True, False),
        ("none", "diagonal", "full", "unknown"),
        ("shared", "per_point"),
        (1, 8, 9, 64),
        _QSETS,
        ("cpu", "gpu"),
    )
    for structure, prepared, noise, times, d, q, backend in domain:
        i, row = _first(table_a, structure=structure, prepared=prepared, times=times, noise=noise)
        hit_a.add(i)
        if row["form"] == "checked":
            want = _plan.Kernel(
                "checked",
                branches=(
                    lookup_b("pencil", times, d, q, backend),
                    lookup_b("cholesky", times, d, q, backend),
                ),
            )
        else:
            want = lookup_b(row["form"], times, d, q, backend)
        got = _plan.plan(
            structure,
            prepared=prepared,
            noise=noise,
            times=times,
            d=d,
            quantities=q,
            backend=backend,
        )
        assert got == want, (structure, prepared, noise, times, d, sorted(q), backend)
        # control: table B with its rows "lowd" and "lowd_pencil" after the general ones
        swapped = table_b[:4] + table_b[6:] + table_b[4:6]
        if row["form"] != "checked":
            form = row["form"]
            _, other = _first(swapped, quantities=q, form=form, times=times, d=d)
            disagree += other["kernel"] != want.name
    assert hit_a == set(range(len(table_a))), hit_a
    assert hit_b == set(range(len(table_b))), hit_b
    assert disagree > 0


# ----------------------------------------------------------------------------- the Jacobian

_NOISY = schedules.linear().with_noise(schedules.brownian(0.5))


def _general(d, k=3):
    return fmjax.random_joint_mixture(jax.random.key(d), k, d, mean_scale=2.0)


def _independent(d, normal_source=True):
    p0 = (
        fmjax.standard_normal(d)
        if normal_source
        else fmjax.random_gaussian_mixture(jax.random.key(11), 2, d, mean_scale=2.0)
    )
    return fmjax.independent_coupling(p0, fmjax.random_gaussian_mixture(jax.random.key(12), 3, d))


# (name, coupling factory, schedule, one t per point, d, the kernels expected, in order)
_CASES = [
    ("general shared", lambda d: _general(d), schedules.cosine(), False, 3, ["cholesky"]),
    ("general shared noise", lambda d: _general(d), _NOISY, False, 3, ["cholesky"]),
    ("general per point", lambda d: _general(d), _NOISY, True, 3, ["cholesky_points"]),
    (
        "general per point d9",
        lambda d: _general(d, 2),
        schedules.cosine(),
        True,
        9,
        ["cholesky_vmap"],
    ),
    (
        "prepared shared",
        lambda d: exact.prepare(_independent(d, False)),
        schedules.vp(),
        False,
        3,
        ["pencil"],
    ),
    (
        "independent per point noise",
        lambda d: _independent(d),
        _NOISY,
        True,
        3,
        ["pencil", "cholesky_points"],
    ),  # checked on device: V^T V diagonal, the first runs
    (
        "independent per point noise, not diagonal",
        lambda d: _independent(d, False),
        _NOISY,
        True,
        3,
        ["pencil", "cholesky_points"],
    ),  # checked on device: the second runs
    (
        "map prepared shared",
        lambda d: exact.prepare(_map_coupling(d=d)[0]),
        schedules.cosine(),
        False,
        3,
        ["otmap"],
    ),
    ("map per point", lambda d: _map_coupling(d=d)[0], schedules.linear(), True, 3, ["otmap"]),
    ("map noise", lambda d: _map_coupling(d=d)[0], _NOISY, True, 3, ["cholesky_points"]),
]


def _jacfwd(c, sched, ts, x):
    """jax.jacfwd of exact.velocity, one point at a time: (N, d, d)."""
    return jax.vmap(jax.jacfwd(lambda xi, ti: exact.velocity(c, sched, ti, xi)))(x, ts)


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1.0))


@pytest.mark.parametrize("case", _CASES, ids=[c[0] for c in _CASES])
def test_velocity_jacobian_is_jacfwd_of_velocity_on_every_row(x64, case, kernel_calls):
    """velocity_jacobian equals jax.jacfwd of exact.velocity to 1e-10 (float64 round-off of d x d
    factors of condition < ~1e3; the two go through different kernels), and its trace is the
    divergence of the same pass to 1e-12; each case through the rows it names. Control: the
    Jacobians of the neighbouring points fail the comparison (a perturbed term: the next test)."""
    _, make, sched, per_point, d, rows = case
    c = make(d)
    n = 8
    x = 2.0 * jax.random.normal(jax.random.key(5), (n, d))
    ts = jnp.linspace(0.1, 0.9, n) * sched.t_max
    t = ts if per_point else 0.4
    got = exact.evaluate(c, sched, t, x, ("jacobian", "divergence"))
    assert kernel_calls == rows, kernel_calls
    assert got.jacobian.shape == (n, d, d)
    want = _jacfwd(c, sched, jnp.broadcast_to(t, (n,)), x)
    assert _rel(got.jacobian, want) < 1e-10
    np.testing.assert_allclose(exact.velocity_jacobian(c, sched, t, x), got.jacobian, rtol=1e-12)
    trace = jnp.trace(got.jacobian, axis1=-2, axis2=-1)
    np.testing.assert_allclose(trace, got.divergence, rtol=1e-12, atol=1e-12)
    assert _rel(jnp.roll(got.jacobian, 1, axis=0), want) > 1e-3


def test_velocity_jacobian_merges_across_blocks_and_its_terms_matter(x64, monkeypatch):
    """One component per block (every component a Chan merge of the outer co-moment) and chunks
    of 8 points: the same Jacobian as one block to 1e-12. Control: the time-free term with its
    two factors swapped, (V) diag(r) (S00 V)^T, fails against jacfwd."""
    jax.clear_caches()
    c = exact.prepare(_independent(3, False))
    sched = schedules.cosine()
    x = 2.0 * jax.random.normal(jax.random.key(5), (20, 3))
    ts = jnp.linspace(0.1, 0.9, 20)
    whole = exact.velocity_jacobian(c, sched, ts, x)
    want = _jacfwd(c, sched, ts, x)
    assert _rel(whole, want) < 1e-10
    monkeypatch.setattr(_stream, "BLOCK_BUDGET", 1)
    jax.clear_caches()
    split = exact.velocity_jacobian(c, sched, ts, x)
    np.testing.assert_allclose(split, whole, rtol=1e-12, atol=1e-12)
    rows = _pencil.outer_rows
    monkeypatch.setattr(_pencil, "outer_rows", lambda left, right: rows(right, left))
    jax.clear_caches()
    assert _rel(exact.velocity_jacobian(c, sched, ts, x), want) > 1e-3
    jax.clear_caches()


# ----------------------------------------------------------------------------- float32


def test_time_free_per_point_divergence_float32_far_from_the_mass():
    """Issue 23 item 8: one t per point on the time-free row (prepared and unprepared independent
    coupling, d = 12) in float32 against float64 at |x| up to 1e6: within 4e-5 relative to
    1 + |div| (the per-time rows' worst; measured 1.7e-6). The co-moment is centred on the
    per-component terms in x space, so a block dominated by one component cancels exactly.
    Control: the uncentred sum_k alpha_k (tr_k + s_k . v_k) - s . u from the same float32
    per-component terms is O(1) wrong there."""
    d = 12
    p0 = fmjax.random_gaussian_mixture(jax.random.key(1), 3, d, dtype=jnp.float32)
    p1 = fmjax.random_gaussian_mixture(jax.random.key(2), 3, d, dtype=jnp.float32)
    c = fmjax.independent_coupling(p0, p1)
    sched = schedules.linear()
    dirs = jax.random.normal(jax.random.key(3), (4, d))
    dirs = dirs / jnp.linalg.norm(dirs, axis=1, keepdims=True)
    x = (jnp.array([1e2, 1e4, 1e5, 1e6])[:, None, None] * dirs[None]).reshape(-1, d)
    ts = jnp.full((x.shape[0],), 0.5, jnp.float32)
    w, m, s = (np.asarray(a, np.float64) for a in (c.weights, c.means, c.covs))
    want = reference(w, m, s, sched, 0.5, np.asarray(x, np.float64), divergence=True)[4]
    for arg in (exact.prepare(c), c):
        got = np.asarray(exact.divergence(arg, sched, ts, x), np.float64)
        assert np.max(np.abs(got - want) / (1 + np.abs(want))) < 4e-5
    logp, vel, scr, trs = component_terms(w, m, s, sched, 0.5, np.asarray(x[-4:], np.float64))
    resp = np.exp(logp - logp.max(1, keepdims=True))
    resp = (resp / resp.sum(1, keepdims=True)).astype(np.float32)
    vel, scr, trs = vel.astype(np.float32), scr.astype(np.float32), trs.astype(np.float32)
    u, sc = np.einsum("nk,nkd->nd", resp, vel), np.einsum("nk,nkd->nd", resp, scr)
    old = np.einsum("nk,nk->n", resp, trs[None] + np.sum(scr * vel, -1)) - np.sum(sc * u, -1)
    assert np.max(np.abs(old - want[-4:]) / (1 + np.abs(want[-4:]))) > 0.1


# ----------------------------------------------------------------------------- PreparedCoupling


def test_prepared_coupling_is_consistent_by_construction(x64):
    """A float32 PreparedCoupling cast to float64 by jax.tree.map is factored anew in float64
    (its answers equal a float64 prepare to 1e-12), and ``dataclasses.replace`` with another
    coupling factors that one (flags cannot be replaced). Controls: the float32 factors cast up
    are 1e-9 off, and the old factors with the new coupling are visibly wrong."""
    c = _independent(3, False)
    c32 = jax.tree.map(lambda a: a.astype(jnp.float32), c)
    c64 = jax.tree.map(lambda a: a.astype(jnp.float64), c32)
    sched = schedules.cosine()
    x = jax.random.normal(jax.random.key(0), (16, 3), jnp.float64)
    ts = jnp.linspace(0.1, 0.9, 16)
    cast = jax.tree.map(lambda a: a.astype(jnp.float64), exact.prepare(c32))
    assert cast.factors.v.dtype == jnp.float64 and cast.dtype == "float32"
    want = exact.velocity(exact.prepare(c64), sched, ts, x)
    got = exact.velocity(cast, sched, ts, x)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    stale = _plan.run(
        _plan.Kernel("pencil"), c64, cast.factors, sched, ts, x, frozenset({"velocity"}), "highest"
    )["velocity"]
    assert _rel(stale, want) > 1e-9
    # replace: the new coupling's factors, not the old ones
    p = exact.prepare(c)
    other = _independent(3, True)
    q = dataclasses.replace(p, coupling=other)
    want = exact.velocity(exact.prepare(other), sched, ts, x)
    np.testing.assert_allclose(exact.velocity(q, sched, ts, x), want, rtol=1e-12)
    old = _plan.run(
        _plan.Kernel("pencil"), other, p.factors, sched, ts, x, frozenset({"velocity"}), "highest"
    )["velocity"]
    assert _rel(old, want) > 1e-3
    for field, value in (("factors", p.factors), ("independent", False)):
        with pytest.raises(ValueError, match="init=False"):
            dataclasses.replace(p, **{field: value})


def test_every_exact_entry_point_promotes_mixed_dtypes(x64):
    """Issue 23 item 4: under x64, a float64 coupling with float32 points and times (and the
    reverse, a float32 coupling with float64 points) computes in float64 at every exact entry
    point (it raised a scan-carry TypeError), equal to the all-float64 call to 1e-12. Control:
    the all-float32 answer is 1e-9 off, so the comparison sees a lost float64."""
    c64 = _independent(2, False)
    c32 = jax.tree.map(lambda a: a.astype(jnp.float32), c64)
    sched = schedules.cosine()
    x64 = jax.random.normal(jax.random.key(0), (6, 2), jnp.float64)
    t64 = jnp.linspace(0.2, 0.8, 6)
    x32, t32 = x64.astype(jnp.float32), t64.astype(jnp.float32)
    x64, t64 = x32.astype(jnp.float64), t32.astype(jnp.float64)

    def entry(fn):
        return lambda c, t, x: fn(c, sched, t, x)

    names = ("velocity", "log_prob", "score", "divergence", "velocity_jacobian", "responsibilities")
    entries = {name: entry(getattr(exact, name)) for name in names}
    entries["evaluate"] = lambda c, t, x: exact.evaluate(c, sched, t, x, ("velocity", "score"))
    entries["velocity_field"] = lambda c, t, x: exact.velocity_field(c, sched)(t, x)
    entries["marginal"] = lambda c, t, x: exact.marginal(c, sched, t[0]).log_prob(x)
    lossy = 0
    for name, f in entries.items():
        for coupling in (c64, exact.prepare(c64)):
            for tt32, tt64 in ((t32, t64), (t32[:1], t64[:1])):  # one t per point, one t
                want = f(coupling, tt64, x64)
                got = f(coupling, tt32, x32)
                for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                    assert g.dtype == jnp.float64, name
                    np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12, err_msg=name)
        both = f(exact.prepare(c32), t64, x64)  # a float32 coupling, float64 points
        assert all(a.dtype == jnp.float64 for a in jax.tree.leaves(both)), name
        low = f(c32, t32, x32)
        lossy += max(
            _rel(a, b) for a, b in zip(jax.tree.leaves(low), jax.tree.leaves(want), strict=True)
        )
    assert lossy > 1e-9
