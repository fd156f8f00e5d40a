"""Each figure function runs on a tiny problem and writes a non-empty PNG; bad input raises."""

import matplotlib

matplotlib.use("Agg")  # before anything imports pyplot; fmjax.plot itself never does

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import fmjax  # noqa: E402
from fmjax import plot  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(path, fig):
    assert isinstance(fig, Figure)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000  # a real image, not an empty canvas


@pytest.fixture(scope="module")
def problem2d():
    c = fmjax.random_joint_mixture(jax.random.key(1), 3, 2, mean_scale=2.5)
    return c, fmjax.schedules.linear()


@pytest.fixture(scope="module")
def problem1d():
    p0 = fmjax.GaussianMixture(jnp.ones(1), jnp.zeros((1, 1)), jnp.ones((1, 1, 1)))
    p1 = fmjax.GaussianMixture(
        jnp.array([0.3, 0.7]), jnp.array([[-2.0], [2.0]]), jnp.full((2, 1, 1), 0.2)
    )
    return fmjax.independent_coupling(p0, p1), fmjax.schedules.cosine()


@pytest.mark.parametrize("kind", ["quiver", "stream"])
def test_density_and_velocity(problem2d, tmp_path, kind):
    c, s = problem2d
    path = tmp_path / f"dv_{kind}.png"
    fig = plot.density_and_velocity(c, s, [0.0, 0.5, 1.0], n_grid=40, kind=kind, path=path)
    _check_png(path, fig)
    assert len(fig.axes) == 4  # three panels and one shared colour bar
    assert [ax.get_title() for ax in fig.axes[:3]] == ["t = 0.00", "t = 0.50", "t = 1.00"]


def test_density_and_velocity_image_is_exact_log_density(problem2d):
    # The panel image holds exact.log_prob on the grid (checks orientation: row i is x2 = xs[i]).
    c, s = problem2d
    lim = (-3.0, 4.0)
    fig = plot.density_and_velocity(c, s, [0.3], lim=lim, n_grid=9)
    img = np.asarray(fig.axes[0].images[0].get_array())
    xs = np.linspace(*lim, 9)
    want = fmjax.exact.log_prob(c, s, 0.3, jnp.array([xs[1], xs[6]]))
    np.testing.assert_allclose(img[6, 1], want, rtol=1e-5)


@pytest.mark.parametrize("mode", ["mix", "argmax"])
def test_responsibilities(problem2d, tmp_path, mode):
    c, s = problem2d
    path = tmp_path / f"resp_{mode}.png"
    fig = plot.responsibilities(c, s, [0.2, 0.9], n_grid=40, mode=mode, path=path)
    _check_png(path, fig)
    cbar = fig.axes[-1]
    assert cbar.get_ylabel() == "component k"


def test_trajectories_and_samples(tmp_path, key):
    # Straight lines from N(0, I) to a shifted copy: a stand-in for solver output.
    x0 = jax.random.normal(key, (50, 2))
    ts = jnp.linspace(0, 1, 11)
    traj = x0[None] + ts[:, None, None] * jnp.array([3.0, 1.0])[None, None]
    p = tmp_path / "traj.png"
    _check_png(p, plot.trajectories(traj, path=p))
    p = tmp_path / "samples_scatter.png"
    _check_png(p, plot.samples_grid({0.0: traj[0], 0.5: traj[5], 1.0: traj[-1]}, path=p))
    p = tmp_path / "samples_hist.png"
    fig = plot.samples_grid({0.0: traj[0], 1.0: traj[-1]}, kind="hist2d", bins=20, path=p)
    _check_png(p, fig)
    with pytest.raises(ValueError, match="traj"):
        plot.trajectories(traj[..., :1])


def test_one_dimensional_figures(problem1d, tmp_path, key):
    c, s = problem1d
    ts = np.linspace(0, 1, 30)
    xs = np.linspace(-4, 4, 60)
    p = tmp_path / "density_1d.png"
    fig = plot.density_over_time(c, s, xs, ts, path=p)
    _check_png(p, fig)
    # Paths drawn over the density image, into the same axes.
    traj = np.linspace(-1, 1, 8)[None] * (1 + ts[:, None])
    p = tmp_path / "traj_1d_over_density.png"
    fig2 = plot.trajectories_1d(ts, traj, ax=fig.axes[0], path=p)
    assert fig2 is fig
    _check_png(p, fig2)
    p = tmp_path / "traj_1d.png"
    _check_png(p, plot.trajectories_1d(ts, traj, path=p))
    with pytest.raises(ValueError, match="1-D problem"):
        plot.density_over_time(fmjax.random_joint_mixture(key, 2, 2), s, xs, ts)


def test_error_curve_and_histograms(problem1d, tmp_path, key):
    ts = np.linspace(0, 1, 9)
    p = tmp_path / "errors.png"
    fig = plot.error_curve(ts, {"model": 1e-2 * (1 + ts), "ema": 3e-3 * (1 + ts**2)}, path=p)
    _check_png(p, fig)
    assert fig.axes[0].get_yscale() == "log"
    c, _ = problem1d
    target = c.target()
    x = target.sample(key, 2000)
    p = tmp_path / "hist.png"
    fig = plot.histograms(
        {"target": x[:, 0], "pair": jnp.concatenate([x, -x], axis=1)},
        reference={"target": lambda g: np.exp(target.log_prob(jnp.asarray(g)[:, None]))},
        path=p,
    )
    _check_png(p, fig)
    assert [ax.get_title() for ax in fig.axes] == ["target", "pair[0]", "pair[1]"]
    with pytest.raises(ValueError, match="shape"):
        plot.error_curve(ts, {"bad": np.ones(3)})


def test_validation(problem2d):
    c, s = problem2d
    with pytest.raises(ValueError, match="ts"):
        plot.density_and_velocity(c, s, [0.5, 1.5])
    with pytest.raises(ValueError, match="kind"):
        plot.density_and_velocity(c, s, [0.5], kind="arrows")
    with pytest.raises(ValueError, match="coupling"):
        plot.responsibilities(c.target(), s, [0.5])
