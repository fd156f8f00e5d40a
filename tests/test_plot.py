"""Each figure function runs on a tiny problem and writes a non-empty PNG; bad input raises;
time grids stay inside the schedule's valid interval; the style is applied once."""

import subprocess
import sys

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
    p0 = fmjax.standard_normal(1)
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
    with pytest.raises(ValueError, match=r"plot.density_and_velocity: `ts` must be in \[0, 1\]"):
        plot.density_and_velocity(c, s, [0.5, 1.5])
    with pytest.raises(ValueError, match="plot.density_and_velocity: `kind` must be one of"):
        plot.density_and_velocity(c, s, [0.5], kind="arrows")
    with pytest.raises(TypeError, match="plot.responsibilities: `coupling` must be a Joint"):
        plot.responsibilities(c.target(), s, [0.5])
    with pytest.raises(TypeError, match="plot.responsibilities: `schedule` must be an fmjax"):
        plot.responsibilities(c, "linear", [0.5])
    with pytest.raises(ValueError, match="plot.responsibilities: `n_grid` must be an int >= 2"):
        plot.responsibilities(c, s, [0.5], n_grid=1)
    with pytest.raises(ValueError, match=r"plot.density_and_velocity: `lim` must be a pair"):
        plot.density_and_velocity(c, s, [0.5], lim=(1.0, -1.0))


def test_time_grids_respect_the_schedule_interval(problem1d, problem2d):
    # VP is singular at t = 1 (valid interval [0, 1 - eps]: db/dt = -inf at 1, the control).
    # The default time grids stop at t_max, so every column of the density image is finite and
    # the last one sits at t_max; a grid reaching t = 1 is refused.
    c, _ = problem1d
    vp = fmjax.schedules.vp()
    assert not np.isfinite(float(vp(1.0)[3])) and np.isfinite(float(vp(vp.t_max)[3]))
    xs = np.linspace(-4, 4, 40)
    fig = plot.density_over_time(c, vp, xs)
    mesh = fig.axes[0].collections[0]
    assert np.asarray(mesh.get_array()).size == 160 * 40
    assert np.all(np.isfinite(np.asarray(mesh.get_array())))
    edges = mesh.get_coordinates()[0, :, 0]  # shading="nearest": cell edges around the times
    centres = 0.5 * (edges[1:] + edges[:-1])
    np.testing.assert_allclose(centres[[0, -1]], vp.interval, atol=1e-12)
    with pytest.raises(ValueError, match=r"plot.density_over_time: `ts` must be in \[0, 0.999\]"):
        plot.density_over_time(c, vp, xs, np.linspace(0, 1, 11))
    c2, _ = problem2d
    fig = plot.density_and_velocity(c2, vp, n_grid=10, n_arrows=5)
    assert [ax.get_title() for ax in fig.axes[:4]] == [
        "t = 0.00",
        "t = 0.333",
        "t = 0.666",
        "t = 0.999",
    ]
    with pytest.raises(ValueError, match="plot.responsibilities: `ts` must be in"):
        plot.responsibilities(c2, vp, [0.5, 1.0])


def test_training_loss_draws_the_floor_and_writes_the_png(tmp_path):
    losses = 1.0 + np.exp(-np.arange(300) / 40.0) + 0.05 * np.sin(np.arange(300))
    path = tmp_path / "loss.png"
    fig = plot.training_loss(losses, floor=0.97, path=path)
    _check_png(path, fig)
    ax = fig.axes[0]
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed) == 1 and np.allclose(dashed[0].get_ydata(), 0.97)
    assert ax.get_ylim()[0] < 0.97 < ax.get_ylim()[1]
    assert ax.get_lines()[0].get_ydata().size == 300  # the raw losses, one point per step
    # Control: no floor, no dashed line; drawing into a given axes returns that axes' figure.
    fig2, axes = plot.figure(1, 2)
    assert plot.training_loss(losses, ax=axes[0, 1]) is fig2
    assert not [ln for ln in axes[0, 1].get_lines() if ln.get_linestyle() == "--"]
    with pytest.raises(ValueError, match="plot.training_loss: `losses` must be a non-empty"):
        plot.training_loss(np.zeros((0,)))
    with pytest.raises(ValueError, match="plot.training_loss: `floor` must be None or a finite"):
        plot.training_loss(losses, floor=float("nan"))


def test_every_figure_function_is_styled_once(tmp_path, monkeypatch, key):
    import fmjax.plot._style as style

    helpers = {"styled"}
    for name in plot.__all__:
        if name not in helpers:
            assert getattr(getattr(plot, name), "__fmjax_styled__", False), name
    # Inside a figure function the style is active (spines off, styled title size), outside it
    # the global rc is untouched.
    fig = plot.error_curve(np.arange(3.0), {"e": np.ones(3)})
    ax = fig.axes[0]
    assert not ax.spines["top"].get_visible() and ax.spines["left"].get_visible()
    assert ax.title.get_fontsize() == style._RC["axes.titlesize"]
    assert matplotlib.rcParams["axes.spines.top"] is True
    # A composed figure (own styled function, figure grid, figure functions drawing into its
    # axes, save) enters the rc context exactly once.
    entries = []
    real = style.mpl.rc_context

    def counting(*args, **kwargs):
        entries.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(style.mpl, "rc_context", counting)
    traj = jax.random.normal(key, (4, 6, 2)).cumsum(axis=0)

    @plot.styled
    def composed(path):
        fig, axes = plot.figure(1, 2, size=2.5)
        plot.trajectories(traj, ax=axes[0, 0])
        plot.training_loss(np.linspace(2.0, 1.0, 50), floor=0.9, ax=axes[0, 1])
        axes[0, 1].set_title("styled by the one context")
        return plot.save(fig, path), axes

    path, axes = composed(tmp_path / "composed.png")
    assert len(entries) == 1
    assert axes[0, 1].title.get_fontsize() == style._RC["axes.titlesize"]
    assert path.read_bytes()[:8] == PNG_MAGIC
    plot.error_curve(np.arange(3.0), {"e": np.ones(3)})  # control: a top-level call enters it
    assert len(entries) == 2


def test_missing_matplotlib_names_the_extra():
    # A fresh interpreter where `import matplotlib` fails, as when the extra is not installed.
    code = "import sys; sys.modules['matplotlib'] = None; import fmjax.plot"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0
    assert "ImportError: fmjax.plot needs matplotlib" in out.stderr
    assert "fmjax[plot]" in out.stderr
    ok = subprocess.run([sys.executable, "-c", "import fmjax.plot"], capture_output=True)
    assert ok.returncode == 0, ok.stderr  # control: the same import with matplotlib works
